"""Wall seconds per epoch of every task with plain SGD on this machine.

    python benchmarks/epoch_time.py [--tasks a,b] [--epochs 2] [--threads N]

Reports the mean training seconds per epoch (evaluation excluded) and the evaluation seconds, over
the epochs after the first (which pays for warm-up), plus steps per epoch.
"""

from __future__ import annotations

import argparse
import time

import torch

from lrpilot.bench.tasks import DataUnavailableError, get_task, list_tasks, run_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default=",".join(t.name for t in list_tasks()))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'task':<24} {'steps/ep':>8} {'train s/ep':>10} {'eval s':>8} {'load s':>7}")
    for name in args.tasks.split(","):
        task = get_task(name)
        t0 = time.perf_counter()
        try:
            task.load_data()
        except DataUnavailableError as err:
            print(f"{name:<24} skipped: {err}")
            continue
        load_s = time.perf_counter() - t0
        epochs = args.epochs
        record = run_task(name, "sgd", epochs=epochs, seed=0, progress=False)
        ep = record["epochs"]
        train = [b["train_s"] - a["train_s"] for a, b in zip(ep, ep[1:])] or [ep[0]["train_s"]]
        wall = [b["wall_s"] - a["wall_s"] for a, b in zip(ep, ep[1:])] or [ep[0]["wall_s"]]
        train_s = sum(train) / len(train)
        eval_s = sum(w - t for w, t in zip(wall, train)) / len(wall)
        steps = ep[0]["step"]
        print(f"{name:<24} {steps:>8} {train_s:>10.3f} {eval_s:>8.3f} {load_s:>7.2f}")


if __name__ == "__main__":
    main()
