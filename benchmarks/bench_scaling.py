"""Wall time of one suite with 1 and 2 local workers and on a local Ray instance: parallel efficiency.

    python benchmarks/bench_scaling.py [--suite quick] [--workers 2] [--methods a,b] [--tasks a,b] [--skip-ray]

Runs the same plan three times, each into a fresh store: ``LocalExecutor(1)``, ``LocalExecutor(N)`` and
``RayExecutor(N)`` (a local Ray instance with N CPUs, one per run), and prints each one's wall seconds,
its speed-up over one local worker and its parallel efficiency (speed-up / N). It also checks that the
three stores hold the same metrics for every run: the executors may change how long a bench takes,
never what it finds.

Wall seconds need a quiet machine (nothing else using its cores); the report is not written (only the
runs are timed).
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import tempfile
import time
from pathlib import Path

from lrpilot.bench.executors import LocalExecutor
from lrpilot.bench.runner import run_bench
from lrpilot.bench.suites import load_suite


def _metrics(out: str) -> dict[str, str]:
    """Run key -> its per-epoch losses and metrics, the part of a record that must not depend on the executor."""
    with sqlite3.connect(Path(out) / "bench.sqlite") as db:
        rows = db.execute("SELECT run_key, epoch, train_loss, val_loss, val_metric FROM epochs ORDER BY run_key, epoch").fetchall()
    per_run: dict[str, list] = {}
    for key, *values in rows:
        per_run.setdefault(key, []).append(values)
    return {key: json.dumps(values) for key, values in per_run.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", help="comma-separated subset of the suite's methods")
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--skip-ray", action="store_true", help="time the local pool only")
    args = parser.parse_args()
    split = lambda s: s.split(",") if s else None  # noqa: E731
    plan = load_suite(args.suite).resolve(methods=split(args.methods), tasks=split(args.tasks))
    n = args.workers

    executors = {"local x1": lambda: LocalExecutor(1), f"local x{n}": lambda: LocalExecutor(n)}
    if not args.skip_ray:
        from lrpilot.bench.ray_executor import RayExecutor

        executors[f"ray x{n}"] = lambda: RayExecutor(n)
    print(f"suite {args.suite}: {len(plan.specs)} runs")
    walls, metrics = {}, {}
    for name, make in executors.items():
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = run_bench(plan, out, executor=make(), progress=False)
            walls[name] = time.perf_counter() - t0
            metrics[name] = _metrics(out)
        print(f"  {name:<9} {walls[name]:8.1f} s  ({len(result.failed)} failed)", flush=True)

    base = walls["local x1"]
    print(f"\n{'executor':<10} {'wall s':>8} {'speed-up':>9} {'efficiency':>10}")
    for name, wall in walls.items():
        workers = 1 if name == "local x1" else n
        print(f"{name:<10} {wall:8.1f} {base / wall:9.2f} {base / wall / workers:10.2f}")
    # Runs with the same threads per run must agree bit for bit; one local worker gives each run all the
    # cores (threads = cores // workers), which changes the order of float reductions in torch's kernels
    # and so the last bits of the results (the record's worker.threads says which it was).
    same_threads = metrics[f"local x{n}"]
    for name, got in metrics.items():
        if name not in ("local x1", f"local x{n}"):
            print(f"{name}: identical per-epoch losses and metrics to local x{n} (same threads per run) "
                  f"for all {len(same_threads)} runs: {got == same_threads}")
    ref, other = metrics[f"local x{n}"], metrics["local x1"]
    differ = [key for key in ref if ref[key] != other.get(key)]
    worst_metric = max(
        (abs(a[3] - b[3]) for key in differ for a, b in zip(json.loads(ref[key]), json.loads(other[key]))
         if a[3] is not None and b[3] is not None and math.isfinite(a[3]) and math.isfinite(b[3])),
        default=0.0,
    )  # fmt: skip
    print(f"local x1 (more threads per run) vs local x{n}: {len(differ)} of {len(ref)} runs differ in some bit; "
          f"largest difference of a validation metric {worst_metric:.4f}")


if __name__ == "__main__":
    main()
