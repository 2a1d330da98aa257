"""The bench driver: resolve a suite, skip what the store already holds, run the rest, store each outcome.

::

    plan = load_suite("quick").resolve()
    result = run_bench(plan, "runs/demo", workers=2)
    print(result.summary())

The driver is the only writer of the store; each outcome is stored the moment it arrives, in one
transaction, so an interrupted bench (Ctrl-C, ``kill -9``, a lost machine) resumes with the same call.

:func:`make_executor` picks an executor by name (``lrpilot bench --executor``). It lives here, above
both :mod:`lrpilot.bench.executors` and :mod:`lrpilot.bench.ray_executor`, so that neither imports the
other's way back: the Ray executor builds on the executors module, which knows nothing of Ray.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.bench.executors import DEFAULT_THREADS, Executor, LocalExecutor, Outcome, available_cores
from lrpilot.bench.store import Store
from lrpilot.bench.suites import Plan, RunSpec

__all__ = ["EXECUTORS", "BenchResult", "bench", "make_executor", "order_runs", "run_bench"]

log = logging.getLogger("lrpilot.bench")


@dataclass
class BenchResult:
    """What one bench invocation did."""

    out: Path
    planned: int
    reused: int
    ran: int = 0
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    kept_failed: int = 0
    wall_s: float = 0.0
    executor: str = ""

    def summary(self) -> str:
        parts = [f"{self.planned} runs planned", f"{self.reused} already in the store", f"{self.ran} run now"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.kept_failed:
            parts.append(f"{self.kept_failed} earlier failures kept (--retry-failed runs them again)")
        return f"{', '.join(parts)}; {self.wall_s:.1f} s with {self.executor}"


#: The executors :func:`make_executor` (``lrpilot bench --executor``) knows.
EXECUTORS = ("local", "ray")


def make_executor(
    kind: str = "local",
    *,
    workers: int | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    imports: Sequence[str] = (),
    log_dir: str | Path | None = None,
    address: str | None = None,
    isolate: bool = False,
) -> Executor:
    """The executor ``kind`` (one of :data:`EXECUTORS`) with the bench's common settings.

    Args:
        kind: ``"local"`` (:class:`~lrpilot.bench.executors.LocalExecutor`) or ``"ray"``
            (:class:`~lrpilot.bench.ray_executor.RayExecutor`, imported only then: Ray is optional).
        workers: runs at a time (local: default the cores available; Ray: the local instance's CPUs, or a
            cap on a cluster's runs in flight).
        threads: torch threads per run (Ray: the CPUs each run asks); default
            :data:`~lrpilot.bench.executors.DEFAULT_THREADS`.
        timeout: seconds after which a run is killed and recorded as failed.
        imports: modules every worker imports before its run.
        log_dir: where each run's stdout and stderr go (``<key>.log``).
        address: Ray only: the cluster to join (``"auto"``, ``"ray://host:10001"``); ``None``: a local instance.
        isolate: a fresh worker process for every run instead of reusing workers (both executors).
    """
    if kind == "local":
        if address is not None:
            raise ValueError(f"address={address!r} is for the Ray executor (--executor ray), not the local pool")
        return LocalExecutor(workers, threads=threads, timeout=timeout, imports=imports, log_dir=log_dir, isolate=isolate)
    if kind == "ray":
        from lrpilot.bench.ray_executor import RayExecutor

        return RayExecutor(workers, address=address, cpus_per_run=threads or DEFAULT_THREADS, timeout=timeout,
                           imports=imports, log_dir=log_dir, isolate=isolate)  # fmt: skip
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def order_runs(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """Seed-major order: every method's first seed before any second seed, so an interrupted bench
    already holds a complete (if thinner) leaderboard."""
    task_rank = {t: i for i, t in enumerate(dict.fromkeys(s.task for s in specs))}
    label_rank = {m: i for i, m in enumerate(dict.fromkeys(s.label for s in specs))}
    seed_rank = {seed: i for i, seed in enumerate(sorted({s.seed for s in specs}))}
    return sorted(specs, key=lambda s: (seed_rank[s.seed], task_rank[s.task], label_rank[s.label]))


def run_bench(
    plan: Plan,
    out: str | Path,
    *,
    executor: Executor | None = None,
    workers: int | None = None,
    retry_failed: bool = False,
    progress: bool | None = None,
    argv: Sequence[str] | None = None,
) -> BenchResult:
    """Run every run of ``plan`` that the store in ``out`` does not hold yet.

    Args:
        plan: a resolved suite (:meth:`lrpilot.bench.suites.Suite.resolve`).
        out: the output folder (its ``bench.sqlite`` is created or resumed).
        executor: where runs execute (default: :class:`LocalExecutor` with ``workers``).
        workers: runs at a time for the default executor (default: the cores available, at most the
            number of runs to do).
        retry_failed: run again the runs stored as failed (default: keep them).
        progress: ``True``: a progress bar over runs; ``False``: silent; ``None`` (default): a bar when
            stderr is a terminal, otherwise one line per finished run.
        argv: the command line, recorded with the invocation.
    """
    out = Path(out)
    t0 = time.perf_counter()
    with Store.open(out) as store:
        done = store.finished_keys(include_failed=not retry_failed)
        failed_before = store.finished_keys(include_failed=True) - store.finished_keys()
        todo = order_runs([s for s in plan.specs if s.key not in done])
        if executor is None:
            n = min(workers or available_cores(), max(len(todo), 1))
            executor = LocalExecutor(n, log_dir=out / "logs")
        result = BenchResult(
            out=out, planned=len(plan.specs), reused=len(plan.specs) - len(todo), executor=executor.describe(),
            kept_failed=0 if retry_failed else len(failed_before & {s.key for s in plan.specs}),
        )  # fmt: skip
        suite = plan.suite
        info = {"name": suite.name, "description": suite.description, "reference": suite.reference,
                "claims": list(suite.claims), "notes": suite.notes, "source": suite.source}  # fmt: skip
        invocation = store.begin_invocation(suite.name, list(argv or sys.argv), [s.key for s in plan.specs], len(todo),
                                            result.executor, info)  # fmt: skip
        store.record_skips(plan.skipped, plan.suite.name, invocation)
        if todo:
            log.info("%s: %d runs to do (%d already stored) on %s", plan.suite.name, len(todo), result.reused, result.executor)
        bar = _Progress(len(todo), progress)
        runs = executor.run(todo)
        try:
            for spec, outcome in runs:
                store.put(spec, outcome, suite=plan.suite.name, invocation=invocation)
                result.ran += 1
                if outcome.status != "ok":
                    result.failed.append((spec, outcome.error))
                bar.update(spec, outcome, len(result.failed))
        finally:
            runs.close()  # an interrupted bench stops its workers
            bar.close()
        store.end_invocation(invocation)
    result.wall_s = time.perf_counter() - t0
    return result


class _Progress:
    """A bar over runs on a terminal; one line per finished run otherwise (logs, CI)."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.total, self.done = total, 0
        # None: a bar on a terminal, lines elsewhere; True: a bar; False: nothing.
        self.lines = enabled is None and not sys.stderr.isatty()
        self.bar: Any = None
        if (enabled or (enabled is None and not self.lines)) and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="run", desc="bench", dynamic_ncols=True, file=sys.stderr)

    def update(self, spec: RunSpec, outcome: Outcome, failures: int) -> None:
        self.done += 1
        line = f"{spec.describe()}: {_outcome_text(outcome)}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"failed={failures} last: {line}"[:90], refresh=False)
            self.bar.update(1)
        elif self.lines:
            print(f"[{self.done}/{self.total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _outcome_text(outcome: Outcome) -> str:
    if outcome.record is None:
        return f"FAILED {outcome.error.splitlines()[0] if outcome.error else ''}"[:200]
    s = outcome.record["summary"]
    best = s.get("best_val_metric")
    best_text = "nan" if best is None else f"{best:.4f}"
    return f"{s['status']}, best {outcome.record['metric']['name']} {best_text}, {outcome.finished_at - outcome.started_at:.1f} s"


@dataclass
class SuiteRun:
    """What :func:`bench` did: the run summary, the leaderboard, the report."""

    result: BenchResult
    leaderboard: Any
    report: Path | None


def bench(
    suite: str | Path,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    executor: Executor | str | None = None,
    address: str | None = None,
    isolate: bool = False,
    retry_failed: bool = False,
    timeout: float | None = None,
    imports: Sequence[str] = (),
    device: str = "cpu",
    data_dir: str | None = None,
    report: bool = True,
    progress: bool | None = None,
    argv: Sequence[str] | None = None,
) -> SuiteRun:
    """``lrpilot bench``: resolve ``suite``, run what the store lacks, score, write the report.

    Args:
        suite: a shipped suite's name or a suite file.
        out: the output folder (``bench.sqlite``, ``report.html``, ``figures/``, ``logs/``).
        methods, tasks, seeds: subsets of the suite (seeds: any list).
        workers: runs at a time (default: the cores available; on a Ray cluster, no cap).
        threads: torch threads per run (default 1, whatever ``workers``: the count changes a run's result).
        executor: where runs execute: an :class:`Executor`, or a name of
            :data:`EXECUTORS` built with ``workers``, ``timeout``, ``imports``, ``address``, ``isolate``
            and ``out/logs`` (default: ``"local"``, a :class:`LocalExecutor`).
        address: the Ray cluster to join with ``executor="ray"`` (``"auto"``, ``"ray://host:10001"``;
            default: a local Ray instance).
        isolate: a fresh worker process for every run (default: workers are reused; the results are the same).
        retry_failed: run again the runs stored as failed.
        timeout: seconds after which a run is killed and recorded as failed.
        imports: modules that register extra methods or tasks, imported here and in every worker.
        device: where runs train.
        data_dir: Fashion-MNIST's folder.
        report: write ``out/report.html``.
    """
    import importlib

    from lrpilot.bench.leaderboard import leaderboard_from_store
    from lrpilot.bench.suites import load_suite

    if executor is None or isinstance(executor, str):
        executor = make_executor(executor or "local", workers=workers, threads=threads, timeout=timeout, imports=imports,
                                 log_dir=Path(out) / "logs", address=address, isolate=isolate)  # fmt: skip
    elif address is not None or isolate:
        raise ValueError("address and isolate are for an executor given by name; an executor given as an object carries its own")
    for module in imports:
        importlib.import_module(module)
    loaded = load_suite(suite)
    plan = loaded.resolve(methods=methods, tasks=tasks, seeds=seeds, device=device, data_dir=data_dir)
    if not plan.specs:
        raise ValueError(f"suite {loaded.name!r} resolves to no runnable run on this install (see the warnings above)")
    result = run_bench(plan, out, executor=executor, retry_failed=retry_failed, progress=progress, argv=argv)
    with Store.open(out) as store:
        keys = {s.key for s in plan.specs}
        board = leaderboard_from_store(store, reference=loaded.reference, suite=loaded.name, keys=keys)
    path = None
    if report:
        from lrpilot.bench.report import write_report

        path = write_report(out, reference=loaded.reference)
    return SuiteRun(result, board, path)
