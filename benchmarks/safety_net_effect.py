"""What the safety net changes on runs that diverge: each case with and without it, same seed.

    OMP_NUM_THREADS=1 python benchmarks/safety_net_effect.py [--task mnist1d-mlp] [--epochs N]

Prints, per case, best/final validation accuracy, the status, the number of rollbacks (with the epoch
and the reason of each), the LR multiplier in force at the end (the first group's LR of the last epoch)
and the wall seconds. Accuracies are deterministic; the wall seconds depend on the machine's load.
"""

from __future__ import annotations

import argparse
import math

import torch

from lrpilot.bench.tasks import run_task

CASES = [
    ("sgd", {"lr": 10.0}),
    ("adam", {"lr": 1.0}),
    ("sgd-cosine", {"lr": 10.0}),
    ("schedulefree-sgd", {"lr": 50.0}),
    ("schedulefree-adamw", {"lr": 0.5}),
    ("prodigy", {"d_coef": 100.0}),
    ("dadapt-adam", {}),
]


def _fmt(v: float | None) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| method | options | net | best acc | final acc | status | rollbacks (epoch:why) | last epoch LR | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, options in CASES:
        for net in (False, True):
            r = run_task(args.task, method, epochs=args.epochs, method_options=options, safety_net=net or None,
                         progress=False)
            s = r["summary"]
            rollbacks = [d for d in r["decisions"] if d["reason"] == "safety-net-rollback"]
            where = " ".join(f"{d['epoch']}:{d['info']['why']}" for d in rollbacks) or "-"
            lr = r["epochs"][-1]["lr"][0] if r["epochs"] else None
            print(f"| {method} | {options} | {'on' if net else 'off'} | {_fmt(s['best_val_metric'])} | "
                  f"{_fmt(s['final_val_metric'])} | {s['status']} | {len(rollbacks)} ({where}) | "
                  f"{'nan' if lr is None else f'{lr:.3g}'} | {s['wall_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
