"""The hyper-regularization report's initial-LR experiment: training loss after a fixed budget vs initial LR.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hyperreg_lr_sweep.py \\
        --out runs/hyperreg_sweep.jsonl [--epochs 5] [--train-subset 10000] [--lrs 1e-4,...,1e3]

Every variant (the twelve ``hyperreg-*``, ``adagrad-diag``, ``wngrad``, the unfixed pole of reverse KL
and Hellinger 2/3 as the report's code had it, reverse KL 2/3 without growth clipping, with our pole and
with the report's, as its MNIST code ran) and constant-LR SGD
(no momentum) at every initial LR, on ``fmnist-mlp500-sigmoid`` (the report's 784-500-10 sigmoid MLP,
on Fashion-MNIST), L2 1e-4 as in the report, seed 0. One JSON line per run goes to ``--out``; a run
already there is not repeated (so an interrupted sweep resumes). The table printed at the end (and by
``--table-only``) gives the last epoch's mean training loss, ``div@k`` for a run that hit a non-finite
loss in epoch k.

Our loss is the batch *mean*; the report's MNIST code used the batch *sum*. Hyper-regularization sees
the gradient's scale (a = g^2/beta^2), and a sum is a mean times the batch size B, so the report's
initial LR ``lr_sum`` is our ``lr = B * lr_sum`` exactly (128x: their 1e-4 ... 10 is our 0.0128 ... 1280).
The default grid, 1e-4 ... 1e3, covers both readings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lrpilot.bench.tasks import run_task

TASK = "fmnist-mlp500-sigmoid"
LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
L2 = 1e-4


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, registry method, options) of every row of the table."""
    rows: list[tuple[str, str, dict[str, Any]]] = [("sgd (constant)", "sgd", {"momentum": 0.0, "weight_decay": L2})]
    for div in ("kl", "rkl", "hellinger", "chi2"):
        for alg in (1, 2, 3):
            rows.append((f"hyperreg-{div}-{alg}", f"hyperreg-{div}-{alg}", {"weight_decay": L2}))
    for name in ("adagrad-diag", "wngrad"):
        rows.append((name, name, {"weight_decay": L2}))
    for div in ("rkl", "hellinger"):
        for alg in (2, 3):
            rows.append((f"hyperreg-{div}-{alg} pole=report", f"hyperreg-{div}-{alg}",
                         {"weight_decay": L2, "pole": "report"}))
    for alg in (2, 3):
        rows.append((f"hyperreg-rkl-{alg} no clip", f"hyperreg-rkl-{alg}", {"weight_decay": L2, "growth_clip": None}))
    for alg in (2, 3):
        rows.append((f"hyperreg-rkl-{alg} pole=report, no clip", f"hyperreg-rkl-{alg}",
                     {"weight_decay": L2, "pole": "report", "growth_clip": None}))
    return rows


def run_one(method: str, options: dict[str, Any], lr: float, epochs: int, subset: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    record = run_task(TASK, method, epochs=epochs, seed=seed, train_subset=subset, progress=False,
                      method_options={**options, "lr": lr})
    epochs_done = record["epochs"]
    last = epochs_done[-1]
    def num(v: Any) -> float:  # the run record writes non-finite numbers as null
        return math.nan if v is None else float(v)

    return {
        "status": record["summary"]["status"],
        "train_loss": num(last["train_loss"]),
        "val_metric": num(last["val_metric"]),
        "final_lr": num(last["lr"][0]),
        "epochs_run": len(epochs_done),
        "wall_s": time.perf_counter() - t0,
    }


def key(label: str, lr: float) -> str:
    return f"{label}@{lr:g}"


def load(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[key(row["label"], row["lr"])] = row
    return done


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "diverged" or not math.isfinite(row["train_loss"]):
        return f"div@{row['epochs_run']}"
    return f"{row['train_loss']:.3g}"


def table(done: dict[str, dict[str, Any]], lrs: tuple[float, ...], what: str = "train_loss") -> str:
    head = "| variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " |"
    lines = [head, "|---|" + "---|" * len(lrs)]
    for label, _, _ in variants():
        if what == "train_loss":
            cells = [cell(done.get(key(label, lr))) for lr in lrs]
        else:
            cells = []
            for lr in lrs:
                row = done.get(key(label, lr))
                cells.append("-" if row is None else f"{row[what]:.3g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged_table(runs: list[dict[str, dict[str, Any]]], lrs: tuple[float, ...]) -> str:
    """Median [min, max] of the final training loss over several sweeps (seeds); a diverged run is inf."""
    lines = ["| variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for label, _, _ in variants():
        cells = []
        for lr in lrs:
            rows = [r[key(label, lr)] for r in runs if key(label, lr) in r]
            if not rows:
                cells.append("-")
                continue
            losses = sorted(math.inf if (row["status"] == "diverged" or not math.isfinite(row["train_loss"]))
                            else row["train_loss"] for row in rows)
            med = losses[len(losses) // 2]
            fmt = lambda v: "div" if math.isinf(v) else f"{v:.3g}"  # noqa: E731
            cells.append(f"{fmt(med)} [{fmt(losses[0])}, {fmt(losses[-1])}]" if len(losses) > 1 else fmt(med))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/hyperreg_sweep.jsonl"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="print the median [min, max] training loss over these result files (seeds) and exit")
    args = parser.parse_args()
    if args.merge:
        runs = [load(path) for path in args.merge]
        print(merged_table(runs, tuple(float(v) for v in args.lrs.split(","))))
        return
    torch.set_num_threads(1)
    lrs = tuple(float(v) for v in args.lrs.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = load(args.out)
    only = set(filter(None, args.only.split(",")))
    if not args.table_only:
        for label, method, options in variants():
            if only and label not in only:
                continue
            for lr in lrs:
                if key(label, lr) in done:
                    continue
                result = run_one(method, options, lr, args.epochs, args.train_subset, args.seed)
                row = {"label": label, "method": method, "options": options, "lr": lr, "epochs": args.epochs,
                       "train_subset": args.train_subset, "seed": args.seed, **result}
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")  # NaN as JSON's NaN extension: json.loads reads it back
                done[key(label, lr)] = row
                print(f"{label:<40} lr={lr:<8g} {cell(row):>10}  final lr {result['final_lr']:.3g}  "
                      f"({result['wall_s']:.1f} s)", flush=True)
    print(f"\nTraining loss after {args.epochs} epochs of {args.train_subset} samples ({TASK}, seed {args.seed}), "
          f"initial LR across:\n")
    print(table(done, lrs))
    print("\nFinal mean LR (mean of 1/beta):\n")
    print(table(done, lrs, "final_lr"))
    print("\nValidation accuracy:\n")
    print(table(done, lrs, "val_metric"))


if __name__ == "__main__":
    main()
