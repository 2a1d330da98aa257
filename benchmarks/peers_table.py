"""Final/best validation accuracy and wall time of every peer on a task, beside the grid-tuned baselines.

    OMP_NUM_THREADS=1 python benchmarks/peers_table.py --task mnist1d-mlp [--epochs N] [--methods a,b]
        [--out DIR] [--seed 0]

One process, one thread, the methods run one after the other with the task's budget (or ``--epochs``).
Accuracies are deterministic (seeded); wall times are whatever the machine gives while the table runs
(on a shared machine the load moves between rows, so compare speeds with ``peer_step_time.py``, which
interleaves). For a tuned baseline, "search" is the cost of its grid (every grid run's training seconds,
and its optimizer steps) and "total" adds the run. With ``--out`` every run record is written there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from lrpilot.bench.tasks import run_task
from lrpilot.loop.history import save_record

DEFAULT = ("sgd-cosine,dadapt-sgd,dadapt-adam,prodigy,schedulefree-sgd,schedulefree-adamw,dog,ldog,"
           "sgd-cosine-tuned,adam-cosine-tuned")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--methods", default=DEFAULT)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the run records")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        record = run_task(args.task, method, epochs=args.epochs, seed=args.seed, progress=False)
        wall = time.perf_counter() - t0
        if args.out:
            save_record(record, Path(args.out) / f"{args.task}-{method}-seed{args.seed}.json")
        s = record["summary"]
        search = record["info"].get("method", {}).get("search")
        search_s = search["total_train_s"] if search else 0.0
        rows.append({"method": method, "best": s["best_val_metric"], "final": s["final_val_metric"],
                     "status": s["status"], "epochs": s["epochs"], "train_s": s["train_s"], "run_wall_s": s["wall_s"],
                     "search_s": search_s, "search_steps": search["total_steps"] if search else 0,
                     "chosen_lr": search["chosen"]["lr"] if search else None, "process_s": wall})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.task}, seed {args.seed}, {rows[0]['epochs']} epochs, torch {torch.__version__}, "
          f"{args.threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n")
    print("| method | best acc | final acc | status | run wall s | search s (steps), chosen LR | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["run_wall_s"] + r["search_s"]
        search = f"{r['search_s']:.1f} ({r['search_steps']}), lr {r['chosen_lr']:g}" if r["search_steps"] else "-"
        print(f"| {r['method']} | {_fmt(r['best'])} | {_fmt(r['final'])} | {r['status']} | {r['run_wall_s']:.1f} | "
              f"{search} | {total:.1f} |")


if __name__ == "__main__":
    main()
