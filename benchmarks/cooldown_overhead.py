"""What the cooldown (pilots/cooldown.py) costs per step while it is active, and over a whole run.

    OMP_NUM_THREADS=1 python benchmarks/cooldown_overhead.py [--tasks mnist1d-mlp,fmnist-mlp] [--rounds 9]

A cooldown step is the method's step plus, on the general path, one copy of the weights before it and one
interpolation after it (two multi-tensor kernels, whatever the method); for torch's own SGD, Adam and
AdamW it only scales the LR for the step. So the cost is measured on plain ``sgd`` (the registry's,
momentum 0.9), against itself: the same model and fixed mini-batches, ``sgd`` alone, ``sgd`` inside a
cooldown whose clock is always in its cooling phase (the LR path), and the same forced onto the general
path, timed in interleaved rounds in one process (``benchmarks/overhead.py``'s step, clock and data).
Printed per task and path: the median ratio of a cooling step to a plain step with its interquartile
range, and what that makes a whole run with the default fraction 0.2 cost against the same run without a
cooldown: ``1 + 0.2 * (ratio - 1)``, relative to an ``sgd`` step (a slower method's step makes the share
smaller).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead

from lrpilot.bench.tasks import get_task
from lrpilot.pilots.cooldown import DEFAULT_FRACTION, with_cooldown


def _cooled(info, data, args, device, name: str, general: bool) -> overhead.Entry:
    entry = overhead._build("sgd", "optimizer", info, data, args, device, 1)
    # Always cooling: a cooldown over the whole of a budget far longer than the steps timed (m_k < 1).
    parts = with_cooldown(entry.trainer.parts, total_steps=10**9, fraction=1.0)
    if general:  # what every optimizer but torch's SGD/Adam/AdamW pays: copy and interpolate the weights
        parts.pilot._scales_lr = lambda optimizer: False  # type: ignore[method-assign]
    parts.pilot.attach(entry.trainer.model)
    entry.trainer.parts = parts
    entry.name = name
    return entry


def measure(task: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    info = get_task(task)
    data = info.load_data().subset(args.train_subset)
    device = torch.device("cpu")
    steps = args.steps or (40 if task.startswith("fmnist") else 200)
    batches = [(x, y) for x, y in zip(data.x_train.split(info.batch_size), data.y_train.split(info.batch_size))]
    batches = [b for b in batches if len(b[1]) == info.batch_size][: args.batches]
    plain = overhead._build("sgd", "optimizer", info, data, args, device, 1)
    entries = [plain, _cooled(info, data, args, device, "LR path", False),
               _cooled(info, data, args, device, "weights path", True)]
    stepper = {e.name: overhead._make_step(e, batches, []) for e in entries}
    for e in entries:
        e.trainer.model.train()
        for i in range(args.warmup):
            stepper[e.name](i)
    assert all(e.trainer.parts.pilot.multiplier() < 1.0 for e in entries[1:]), "must be cooling while timed"
    ratios: dict[str, list[float]] = {e.name: [] for e in entries[1:]}
    sgd_ms = []
    for r in range(args.rounds):
        times = {}
        shift = r % len(entries)
        for e in entries[shift:] + entries[:shift]:  # rotated: load bursts hit every entry alike
            t0 = overhead._clock()
            for i in range(steps):
                stepper[e.name](i)
            times[e.name] = (overhead._clock() - t0) / steps
        sgd_ms.append(1e3 * times["sgd"])
        for name in ratios:
            ratios[name].append(times[name] / times["sgd"])
    out = {}
    for name, values in ratios.items():
        low, mid, high = overhead._quantiles(values)
        out[name] = {"ratio": mid, "q1": low, "q3": high, "run": 1 + DEFAULT_FRACTION * (mid - 1),
                     "sgd_step_ms": sorted(sgd_ms)[len(sgd_ms) // 2]}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d-mlp,fmnist-mlp")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default 200, 40 on Fashion-MNIST)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--train-subset", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overhead._clock = overhead.time.thread_time
    torch.set_num_threads(1)
    print("| task | path | a cooling step / an sgd step, median [IQR] | a whole run, fraction 0.2 | sgd step (ms) |")
    print("|---|---|---|---|---|")
    for task in args.tasks.split(","):
        for path, m in measure(task, args).items():
            print(f"| {task} | {path} | {m['ratio']:.3f}x [{m['q1']:.3f}-{m['q3']:.3f}] | {m['run']:.3f}x | "
                  f"{m['sgd_step_ms']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
