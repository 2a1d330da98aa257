"""What every registered method costs on top of plain SGD, measured in one process.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--tasks fmnist-mlp,mnist1d-mlp] [--rounds 7]
        [--methods 'hd-*,sgd'] [--variant 'hd-train[flat=False]'] [--device cpu|cuda] [--json out.json]

Two tables per task:

* **Step-level** (every method except the epoch-level pilots): seconds per optimizer step on the same
  model and the same fixed mini-batches, divided by the seconds per step of ``sgd`` (``torch.optim.SGD``,
  momentum 0.9, as registered) in the same round. A step is what the training loop does: zero the
  gradients, forward, backward, ``optimizer.step`` (with the closure or the validation closure the method
  asks for), read the loss (``float(loss)``, as ``Trainer`` does) and the pilot's ``on_step_end`` (the
  schedule adapters step their scheduler there). Evaluation is not included.
* **Epoch-level** (``kind == "epoch-pilot"``): seconds of one full epoch through ``Trainer`` (training,
  evaluation, the pilot's epoch-end signals and decisions) divided by ``sgd``'s epoch through the same
  loop in the same round, each pilot with its default options.

Times are this thread's CPU time by default on CPU (``--clock cpu``: ``time.thread_time``, so the time
the process spends descheduled on a shared machine does not count; run with ``OMP_NUM_THREADS=1`` so
all the work is on this thread) and wall-clock time on CUDA. Setup times are wall-clock. Rounds are
interleaved: every round times every method once, in an order rotated by one each round,
so a burst of load from other processes hits all methods alike. The tables give the median ratio and the
interquartile range over rounds.

``--variant 'METHOD[key=value,...]'`` (repeatable) also times a step-level method with other options, in
the same rounds (values are Python literals, as the CLI's ``-o``): a change measured against what it
replaces on the same machine at the same time.

Work a method does before its first step (the tuned baselines' grid search, mi-decay's LR range test)
is measured once, when it is built, and reported separately as ``setup s`` (and as a multiple of one
``sgd`` epoch on the same data): it is charged to the run, not to its steps. The methods are built by
``Trainer`` on ``--train-subset`` training samples with a budget that covers every step timed; a grid
search (``search_epochs``) runs ``--budget-epochs`` epochs per LR, so it costs what it costs at that
budget (it scales with both). mi-decay's range test runs with its defaults (``rrt_epochs=3``).

The step-level table also gives the host reads per step inside ``optimizer.step`` and ``on_step_end``
(the loop's own ``float(loss)`` excluded): every ``item()``/``float()``/``bool()`` of a tensor, boolean mask
index or ``nonzero``, counted at the dispatcher (``lrpilot.core.host_reads``) over ``--sync-steps`` extra
steps after timing, on any device: on a GPU each is a host-device sync. With ``--device cuda`` it also
gives CUDA's own count of syncs (``torch.cuda.set_sync_debug_mode("warn")``) over as many more steps.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lrpilot.bench.tasks import get_task, make_loaders
from lrpilot.cli import parse_option
from lrpilot.core.contract import StepSignals
from lrpilot.core.host_reads import count_host_reads, host_resident_state
from lrpilot.core.registry import list_methods
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.cooldown import DEFAULT_FRACTION as COOLDOWN_FRACTION

BASELINE = "sgd"
_clock = time.perf_counter  # set by --clock


@dataclass
class Entry:
    """One method under test on one task."""

    name: str
    kind: str
    trainer: Trainer
    setup_s: float
    times: list[float] = field(default_factory=list)  # seconds per step (or per epoch), per round
    syncs_per_step: float | None = None
    host_reads_per_step: float | None = None
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _make_step(entry: Entry, batches: list[tuple[torch.Tensor, torch.Tensor]],
               val_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[int], float]:
    """One training step of ``entry`` on batch ``i``, as ``Trainer._train_step`` does it."""
    trainer = entry.trainer
    model, optimizer, parts, loss_fn = trainer.model, trainer.optimizer, trainer.parts, trainer.loss_fn
    pilot = parts.pilot
    unknown = set(parts.step_kwargs) - {"val_closure"}
    if unknown:
        raise ValueError(f"{entry.name} asks for step signals {sorted(unknown)} this benchmark does not provide")

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        kwargs: dict[str, Any] = {}
        if "val_closure" in parts.step_kwargs:
            xv, yv = val_batches[i % len(val_batches)]
            kwargs["val_closure"] = lambda: loss_fn(model(xv), yv)
        if parts.needs_closure:

            def closure(*, backward: bool = True) -> torch.Tensor:
                if not backward:
                    return loss_fn(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure, **kwargs)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step(**kwargs)
        value = float(loss.detach())  # the loop reads every loss (its non-finite check)
        if pilot is not None:
            pilot.on_step_end(StepSignals(epoch=0, step=i + 1, loss=value))
        return value

    return step


@contextlib.contextmanager
def _cuda_sync_counter(device: torch.device) -> Any:
    """Counts CUDA's own sync warnings (``torch.cuda.set_sync_debug_mode``) inside the block."""
    counted = [0]
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            torch.cuda.set_sync_debug_mode("default")
            counted[0] = sum("synchroniz" in str(w.message) for w in caught)


def _host_read_counter(optimizer: torch.optim.Optimizer) -> Callable[[torch.device], Any]:
    @contextlib.contextmanager
    def counter(device: torch.device) -> Any:
        """Counts the tensor reads to Python inside the block (``lrpilot.core.host_reads``: any device),
        except those of the step counts torch's optimizers keep on the host on a GPU too."""
        counted = [0]
        with count_host_reads(host_resident_state(optimizer)) as reads:
            try:
                yield counted
            finally:
                counted[0] = reads.count

    return counter


def _count_per_step(entry: Entry, step: Callable[[int], float], steps: int, device: torch.device,
                    counter: Callable[[torch.device], Any]) -> float:
    """What ``counter`` counts per step inside ``optimizer.step`` and ``on_step_end`` (the loop's own
    ``float(loss)`` excluded): CUDA's syncs, or the host reads of ``lrpilot.core.host_reads``."""
    trainer = entry.trainer
    optimizer, pilot = trainer.optimizer, trainer.parts.pilot
    count = 0

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            result = [0]
            try:
                with counter(device) as result:
                    return fn(*args, **kwargs)
            finally:  # the counter fills result when its block exits
                count += result[0]

        return wrapper

    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in ((optimizer, "step"), (pilot, "on_step_end"))
             if obj is not None]
    optimizer.step = counted(optimizer.step)  # type: ignore[method-assign]
    if pilot is not None:
        pilot.on_step_end = counted(pilot.on_step_end)  # type: ignore[method-assign]
    try:
        for i in range(steps):
            step(i)
    finally:
        for obj, name, value in saved:  # back to what the instance had (usually nothing: the class's method)
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
    return count / steps


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"hd-train[flat=False,beta=0.01]"`` -> ``("hd-train", {"flat": False, "beta": 0.01})``: the options
    read as the CLI's ``-o`` reads them (:func:`lrpilot.cli.parse_option`)."""
    match = re.fullmatch(r"\s*([\w.-]+)\[(.*)\]\s*", text)
    if match is None:
        raise SystemExit(f"--variant is METHOD[key=value,...], got {text!r}")
    try:
        options = dict(parse_option(part.strip()) for part in match.group(2).split(",") if part.strip())
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"--variant {text!r}: {err}") from None
    return match.group(1), options


def _build(name: str, kind: str, info: Any, data: Any, args: argparse.Namespace, device: torch.device,
           epochs: int, options: dict[str, Any] | None = None, label: str | None = None) -> Entry:
    seed_everything(args.seed)
    model = info.model()
    train_loader, val_loader = make_loaders(data, info.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    trainer = Trainer(
        model, train_loader, val_loader, method=name, epochs=epochs, loss_fn=info.loss(),
        metric=info.build_metric(data), seed=args.seed, device=device, progress=False, task_kind=info.kind,
        method_options=options,
    )
    _sync(device)
    return Entry(label or name, kind, trainer, time.perf_counter() - t0)


def run_task(task: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    info = get_task(task)
    data = info.load_data().subset(args.train_subset)
    patterns = args.methods.split(",")
    methods = [m for m in list_methods() if m.name == BASELINE or any(fnmatch.fnmatch(m.name, p) for p in patterns)]
    skipped = {m.name: f"needs the {m.extra} extra" for m in methods if not m.available}
    methods = [m for m in methods if m.available]
    step_methods = [m for m in methods if m.kind != "epoch-pilot"]
    epoch_methods = [m for m in methods if m.kind == "epoch-pilot"]
    if not any(m.name == BASELINE for m in methods):
        raise SystemExit(f"the baseline {BASELINE!r} must be available")

    steps = args.steps or (40 if task.startswith("fmnist") else 200)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data.x_train), generator=gen)
    bs = info.batch_size
    n_batches = min(args.batches, len(order) // bs)
    batches = [(data.x_train[order[j * bs:(j + 1) * bs]].to(device), data.y_train[order[j * bs:(j + 1) * bs]].to(device))
               for j in range(n_batches)]
    val_batches = [(data.x_val[j * bs:(j + 1) * bs].to(device), data.y_val[j * bs:(j + 1) * bs].to(device))
                   for j in range(min(args.batches, len(data.x_val) // bs))]

    # -- step-level ---------------------------------------------------------------------------------
    _build(BASELINE, "optimizer", info, data, args, device, 1)  # first-use costs (imports, allocator)
    # The budget the methods are built for covers every step timed here (a schedule such as OneCycle
    # refuses to step past its budget, and a cosine decayed to 0 would time a different code path);
    # a grid search runs for --budget-epochs whatever that budget (its cost is reported, not timed).
    # It is also long enough that no step timed here falls in a seed method's default cooldown (its last
    # 20 %): a cooling step costs the same whatever the method, measured by benchmarks/cooldown_overhead.py.
    spe = len(make_loaders(data, info.batch_size, seed=args.seed)[0])
    total = args.warmup + args.rounds * steps + args.sync_steps * (2 if device.type == "cuda" else 1)
    before_cooldown = math.ceil(total / (1.0 - COOLDOWN_FRACTION))
    # A method with a decision split (hd-val, rt-hpo) trains on what is left of the training set (fewer steps
    # per epoch): size the budget as if half of it were carved out.
    epochs = max(args.budget_epochs, -(-before_cooldown // max(1, spe // 2)) + 1)
    entries: list[Entry] = []
    variants = [(m, m.name, {}) for m in step_methods]
    for text in args.variant:
        name, options = parse_variant(text)
        found = [m for m in list_methods() if m.name == name]
        if not found or found[0].kind == "epoch-pilot":
            raise SystemExit(f"--variant {text!r}: {name!r} is not a registered step-level method")
        variants.append((found[0], text, options))
    for m, label, given in variants:
        options = {"search_epochs": args.budget_epochs} if "search_epochs" in m.defaults else {}
        entry = _build(m.name, m.kind, info, data, args, device, epochs, {**options, **given}, label=label)
        entries.append(entry)
        print(f"  built {label} ({entry.setup_s:.2f} s)", file=sys.stderr, flush=True)
    stepper = {e.name: _make_step(e, batches, val_batches) for e in entries}
    for e in entries:  # warm-up: allocator, lazy state, first-step branches
        e.trainer.model.train()
        if e.trainer.parts.train_mode is not None:
            e.trainer.parts.train_mode()  # e.g. Schedule-Free's optimizer.train(), as the loop does
        try:
            for i in range(args.warmup):
                stepper[e.name](i)
        except Exception as err:  # noqa: BLE001 - a method that fails here is reported, not fatal
            e.error = f"{type(err).__name__}: {err}"
    _sync(device)
    for r in range(args.rounds):
        shift = r % len(entries)
        for e in entries[shift:] + entries[:shift]:
            if e.error:
                continue
            try:
                _sync(device)
                t0 = _clock()
                for i in range(steps):
                    stepper[e.name](i)
                _sync(device)
                e.times.append((_clock() - t0) / steps)
            except Exception as err:  # noqa: BLE001 - a method that fails here is reported, not fatal
                e.error = f"{type(err).__name__}: {err}"
        print(f"  step round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    cooled = [e.name for e in entries if getattr(e.trainer.parts.pilot, "multiplier", lambda: 1.0)() != 1.0]
    assert not cooled, f"{cooled} reached their cooldown while timed: the budget above is too short"
    for e in entries:
        if e.error:
            continue
        e.host_reads_per_step = _count_per_step(e, stepper[e.name], args.sync_steps, device,
                                                _host_read_counter(e.trainer.optimizer))
        if device.type == "cuda":
            e.syncs_per_step = _count_per_step(e, stepper[e.name], args.sync_steps, device, _cuda_sync_counter)

    # -- epoch-level ----------------------------------------------------------------------------------
    epoch_entries: list[Entry] = []
    if epoch_methods:
        for m in [get_baseline(methods)] + epoch_methods:
            entry = _build(m.name, m.kind, info, data, args, device, args.rounds + 1)
            entry.trainer.run(until_epoch=1)  # warm-up epoch (and the initial evaluation)
            epoch_entries.append(entry)
            print(f"  built {m.name} ({entry.setup_s:.2f} s)", file=sys.stderr, flush=True)
        for r in range(args.rounds):
            shift = r % len(epoch_entries)
            for e in epoch_entries[shift:] + epoch_entries[:shift]:
                if e.error:
                    continue
                before = e.trainer.epoch
                _sync(device)
                t0 = _clock()
                e.trainer.run(until_epoch=before + 1)
                _sync(device)
                if e.trainer.epoch == before:
                    e.error = f"stopped after {before} epochs"
                    continue
                e.times.append(_clock() - t0)
            print(f"  epoch round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    return {
        "task": task,
        "steps_per_round": steps,
        "batch_size": bs,
        "train_samples": len(data.x_train),
        "steps_per_epoch": len(make_loaders(data, bs, seed=args.seed)[0]),
        "step": _summarise(entries),
        "epoch": _summarise(epoch_entries),
        "skipped": skipped,
    }


def get_baseline(methods: list[Any]) -> Any:
    return next(m for m in methods if m.name == BASELINE)


def _summarise(entries: list[Entry]) -> list[dict[str, Any]]:
    if not entries:
        return []
    base = next(e for e in entries if e.name == BASELINE)
    rows = []
    for e in entries:
        n = min(len(e.times), len(base.times))
        ratios = [e.times[i] / base.times[i] for i in range(n)]
        q1, med, q3 = _quantiles(ratios) if ratios else (math.nan,) * 3
        rows.append({
            "method": e.name, "kind": e.kind, "seconds": statistics.median(e.times) if e.times else math.nan,
            "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3, "rounds": n, "setup_s": e.setup_s,
            "syncs_per_step": e.syncs_per_step, "host_reads_per_step": e.host_reads_per_step, "error": e.error,
        })
    return rows


def _table(rows: list[dict[str, Any]], unit: str, cuda: bool) -> str:
    reads = any(r["host_reads_per_step"] is not None for r in rows)  # the step-level table
    head = (f"| method | kind | {unit} | x sgd (median) | IQR | setup s |" + (" host reads/step |" if reads else "")
            + (" syncs/step |" if cuda else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        setup = f"{r['setup_s']:.2f}" if r["setup_s"] >= 0.05 else "-"
        cells = [r["method"], r["kind"], f"{r['seconds'] * (1e3 if unit == 'ms/step' else 1):.3g}",
                 f"{r['ratio_median']:.2f}", f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}", setup]
        if reads:
            cells.append("-" if r["host_reads_per_step"] is None else f"{r['host_reads_per_step']:.1f}")
        if cuda:
            cells.append("-" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.1f}")
        line = "| " + " | ".join(cells) + " |"
        if r["error"]:
            line += f" {r['error'][:80]}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="fmnist-mlp,mnist1d-mlp")
    parser.add_argument("--methods", default="*", help="comma-separated fnmatch patterns (sgd is always timed)")
    parser.add_argument("--variant", action="append", default=[],
                        help="METHOD[key=value,...]: also time this step-level method with these options")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 40 fmnist, 200 others)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=16, help="distinct fixed mini-batches cycled through")
    parser.add_argument("--train-subset", type=int, default=16384, help="training samples the Trainer sees")
    parser.add_argument("--budget-epochs", type=int, default=2, help="budget the step-level methods are built for")
    parser.add_argument("--sync-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="cpu: this thread's CPU time (time.thread_time), robust to other processes on a "
                             "shared machine, right with one thread on CPU; wall: time.perf_counter. "
                             "Default: cpu on CPU, wall on CUDA (GPU time is not CPU time)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if clock == "cpu" and torch.get_num_threads() > 1:
        print("warning: --clock cpu counts this thread only; use OMP_NUM_THREADS=1 (or --threads 1)", file=sys.stderr)
    global _clock
    _clock = time.thread_time if clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"{clock} clock")
    results = []
    for task in args.tasks.split(","):
        print(f"{task} ...", file=sys.stderr, flush=True)
        res = run_task(task, args, device)
        results.append(res)
        cuda = device.type == "cuda"
        print(f"\n### {task}: step-level ({res['steps_per_round']} steps per round, batch {res['batch_size']})\n")
        print(_table(res["step"], "ms/step", cuda))
        if res["epoch"]:
            base_epoch = next(r["seconds"] for r in res["epoch"] if r["method"] == BASELINE)
            print(f"\n### {task}: epoch-level ({res['train_samples']} training samples, "
                  f"{res['steps_per_epoch']} steps per epoch, evaluation included)\n")
            print(_table(res["epoch"], "s/epoch", False))
            for r in res["epoch"]:
                if r["setup_s"] >= 1.0:
                    print(f"\n{r['method']}: setup {r['setup_s']:.1f} s = {r['setup_s'] / base_epoch:.1f} sgd epochs")
        if res["skipped"]:
            print("\nskipped: " + ", ".join(f"{k} ({v})" for k, v in res["skipped"].items()))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
