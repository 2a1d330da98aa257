"""What a fresh process per run costs: the local pool, reusing its worker or not, against running in-process.

    python benchmarks/bench_executors.py [--runs 6] [--task iris-softmax] [--epochs 5] [--rounds 2]

Runs the same small runs with ``InlineExecutor`` (this process), ``LocalExecutor(1)`` (one worker process
reused for every run, the default) and ``LocalExecutor(1, isolate=True)`` (one spawned process per run),
rounds interleaved, each into its own fresh store, and prints the wall and CPU seconds per run of each
and their excess over in-process runs. The isolated pool's excess is the interpreter start-up plus
``import torch`` plus the first data load that every isolated run pays; the reused worker pays it once.
Wall seconds depend on the machine's load, CPU seconds much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch

from lrpilot.bench.executors import InlineExecutor, LocalExecutor
from lrpilot.bench.runner import run_bench
from lrpilot.bench.suites import Suite


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="runs per round (seeds 0..runs-1)")
    parser.add_argument("--task", default="iris-softmax")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    suite = Suite.from_json({"name": "overhead", "seeds": list(range(args.runs)),
                             "tasks": [{"name": args.task, "epochs": args.epochs}], "methods": ["sgd"]})  # fmt: skip
    plan = suite.resolve()
    executors = {"inline": lambda: InlineExecutor(threads=1), "local": lambda: LocalExecutor(1, threads=1),
                 "isolated": lambda: LocalExecutor(1, threads=1, isolate=True)}  # fmt: skip
    totals = {name: [0.0, 0.0] for name in executors}
    for _ in range(args.rounds):
        for name, make in executors.items():
            with tempfile.TemporaryDirectory() as out:
                w0, c0 = time.perf_counter(), _cpu_s()
                result = run_bench(plan, out, executor=make(), progress=False)
                assert not result.failed, result.failed
                totals[name][0] += time.perf_counter() - w0
                totals[name][1] += _cpu_s() - c0
    n = args.runs * args.rounds
    print(f"{n} runs of sgd on {args.task} ({args.epochs} epochs) per executor, torch {torch.__version__}, 1 thread")
    print(f"{'executor':<10} {'wall s/run':>10} {'cpu s/run':>10}")
    for name, (wall, cpu) in totals.items():
        print(f"{name:<10} {wall / n:>10.2f} {cpu / n:>10.2f}")
    wi, ci = totals["inline"]
    for name in ("local", "isolated"):
        wl, cl = totals[name]
        print(f"{name}: +{(wl - wi) / n:.2f} wall s and +{(cl - ci) / n:.2f} cpu s per run over inline "
              f"({wl / wi:.1f}x wall, {cl / ci:.1f}x cpu)")  # fmt: skip


if __name__ == "__main__":
    main()
