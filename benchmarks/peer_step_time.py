"""Training time per epoch of every peer (and of the safety net) as a ratio to plain SGD, in one process.

    OMP_NUM_THREADS=1 python benchmarks/peer_step_time.py --task mnist1d-mlp [--rounds 5] [--methods a,b]

Each round trains every method for 2 epochs from a fresh model, one method after the other, and keeps
the second epoch's training seconds (evaluation excluded; the first epoch pays for warm-up). Odd rounds
run the methods in reverse order, so a load that drifts during the benchmark (a shared machine) falls on
all of them alike over an even number of rounds. The table gives the median over rounds and its ratio to
``sgd``'s median. ``METHOD+net`` runs ``METHOD`` with the safety net (a checkpoint every epoch).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from lrpilot.bench.tasks import run_task

DEFAULT = ("sgd,sgd+net,sgd-cosine,adam,dadapt-sgd,dadapt-adam,prodigy,schedulefree-sgd,schedulefree-adamw,"
           "dog,ldog,dog+net")


def _epoch_s(task: str, method: str) -> float:
    name, _, net = method.partition("+")
    record = run_task(task, name, epochs=2, progress=False, safety_net=True if net else None)
    if len(record["epochs"]) < 2:  # diverged in its first epoch: no second epoch to time
        return math.nan
    first, second = record["epochs"][:2]
    return second["train_s"] - first["train_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--methods", default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if "sgd" not in methods:
        methods.insert(0, "sgd")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            times[method].append(_epoch_s(args.task, method))
    ref = statistics.median(times["sgd"])
    print(f"{args.task}: training seconds per epoch, median of {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    print("| method | s / epoch | x sgd |")
    print("|---|---|---|")
    for method in methods:
        finite = [t for t in times[method] if math.isfinite(t)]
        if not finite:
            print(f"| {method} | diverged in epoch 1 | - |")
            continue
        med = statistics.median(finite)
        print(f"| {method} | {med:.3f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
