"""The AALR study behind ``docs/methods/aalr.md``: accuracy, epochs and LR trajectories, no tuning.

    OMP_NUM_THREADS=1 python benchmarks/aalr_study.py run --out runs/aalr [--only mnist1d,ablation,lr10,fmnist,adv]
    python benchmarks/aalr_study.py report --out runs/aalr

``run`` trains every configuration below once per seed, one thread, one after the other, and writes
one run record (JSON) per run under ``--out`` (an existing record is not run again, so a killed study
resumes). ``report`` prints the markdown tables of the method page from those records. Accuracy
figures are deterministic (seeded); the timings in the records are not (other load on the machine).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from lrpilot.bench.tasks import run_task
from lrpilot.loop.history import load_record, save_record

SEEDS = (0, 1, 2)
ADV = {"eval_samples": 2000}  # PGD-10 on the first 2,000 validation images (cost; see the page)

# (group, task, method, options, epochs, seeds, adversarial)
CONFIGS: list[tuple[str, str, str, dict[str, Any], int, tuple[int, ...], dict[str, Any] | None]] = []
for _epochs in (30, 60):
    for _method in ("aalr", "sgd", "sgd-cosine"):
        CONFIGS.append(("mnist1d", "mnist1d-mlp", _method, {}, _epochs, SEEDS, None))
    for _opts in (
        {"trial_length": "p+1"},
        {"phase1_reset_best": False},
        {"objective": "train-mean"},
        {"objective": "val"},
        {"rollback_optimizer": "checkpoint"},
        {"optimizer": "adam"},
    ):
        CONFIGS.append(("ablation", "mnist1d-mlp", "aalr", _opts, _epochs, SEEDS, None))
    CONFIGS.append(("ablation", "mnist1d-mlp", "adam", {}, _epochs, SEEDS, None))
    for _method in ("aalr", "sgd", "sgd-cosine"):
        CONFIGS.append(("lr10", "mnist1d-mlp", _method, {"lr": 10.0}, _epochs, SEEDS, None))
for _method in ("aalr", "sgd", "sgd-cosine"):
    CONFIGS.append(("fmnist", "fmnist-lenet", _method, {}, 20, (0,), None))
CONFIGS.append(("lr10", "fmnist-lenet", "aalr", {"lr": 10.0}, 20, (0,), None))
for _method in ("aalr", "sgd", "sgd-cosine"):
    CONFIGS.append(("adv", "fmnist-lenet", _method, {}, 15, (0,), ADV))


def _key(task: str, method: str, options: dict[str, Any], epochs: int, seed: int, adv: dict | None) -> str:
    opts = "-".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
    return f"{task}__{method}__{opts}__e{epochs}__s{seed}" + ("__adv" if adv else "")


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    groups = set(args.only.split(",")) if args.only else None
    for group, task, method, options, epochs, seeds, adv in CONFIGS:
        if groups is not None and group not in groups:
            continue
        for seed in seeds:
            path = out / f"{_key(task, method, options, epochs, seed, adv)}.json"
            if path.exists():
                continue
            record = run_task(task, method, epochs=epochs, seed=seed, progress=False, method_options=options,
                              adversarial=adv)  # fmt: skip
            save_record(record, path)
            s = record["summary"]
            print(f"{path.name}: best {s['best_val_metric']:.4f} final {s['final_val_metric']:.4f} "
                  f"{s['wall_s']:.0f} s", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def discarded_epochs(record: dict[str, Any]) -> int:
    """Epochs whose training a rollback threw away during the run (phase-1 restarts, NaN rollbacks)."""
    since_initial, since_best, total = 0, 0, 0
    for d in record["decisions"]:
        e = d["epoch"]
        if d["reason"] in ("phase1-worse", "phase1-nan"):
            total += e - since_initial
            since_initial = e
        elif d["reason"] in ("phase1-done", "phase2-improved"):
            since_best = e
        elif d["reason"] == "nan-rollback":
            total += e - since_best
            since_best = e
    return total


def lr_runs(record: dict[str, Any]) -> str:
    """The LR trajectory, run-length encoded: ``0.1x10 0.05x4 ...`` (epoch by epoch, group 0)."""
    lrs = [e["lr"][0] for e in record["epochs"]]
    parts: list[str] = []
    i = 0
    while i < len(lrs):
        j = i
        while j < len(lrs) and lrs[j] == lrs[i]:
            j += 1
        parts.append(f"{lrs[i]:.3g}" + (f"x{j - i}" if j - i > 1 else ""))
        i = j
    return " ".join(parts)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    epochs = record["epochs"]
    vals = [e["val_metric"] for e in epochs]
    finite = [v for v in vals if v is not None]
    best = max(finite) if finite else math.nan
    last = vals[-1] if vals[-1] is not None else math.nan
    final = record["final"].get("val_metric", last)
    out = {
        "best": best,
        "best_epoch": vals.index(best) + 1 if finite else None,
        "last": last,
        "final": final if final is not None else math.nan,
        "discarded": discarded_epochs(record),
        "passes": 1 + sum("train_eval_loss" in e["extra"] for e in epochs) if record["method"] == "aalr" else 0,
        "epochs": len(epochs),
        "status": record["summary"]["status"],
        "lr": lr_runs(record),
        "wall_s": record["summary"]["wall_s"],
    }
    adv = [e["extra"].get("adv_val_metric") for e in epochs]
    if any(a is not None for a in adv):
        adv_f = [a for a in adv if a is not None]
        out["adv_best"] = max(adv_f)
        out["adv_last"] = adv[-1] if adv[-1] is not None else math.nan
        out["adv_final"] = record["final"].get("adv_val_metric", out["adv_last"])
    return out


def _f(v: float | None, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _cell(values: list[float]) -> str:
    """Median over seeds, then the seeds' values."""
    med = statistics.median(values)
    return f"{_f(med)} ({', '.join(_f(v) for v in values)})" if len(values) > 1 else _f(med)


def _load(out: Path, task, method, options, epochs, seeds, adv) -> list[dict[str, Any]] | None:
    records = []
    for seed in seeds:
        path = out / f"{_key(task, method, options, epochs, seed, adv)}.json"
        if not path.exists():
            return None
        records.append(load_record(path))
    return records


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    groups: dict[str, list[tuple]] = {}
    for cfg in CONFIGS:
        groups.setdefault(cfg[0], []).append(cfg)
    for group, cfgs in groups.items():
        print(f"\n### {group}\n")
        adv_cols = group == "adv"
        head = ("| task | method | options | epochs | best | best at epoch | final (in hand) | last epoch | discarded "
                "| J passes | status |")
        if adv_cols:
            head += " PGD best | PGD final |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        lr_lines = []
        for _, task, method, options, epochs, seeds, adv in cfgs:
            records = _load(out, task, method, options, epochs, seeds, adv)
            if records is None:
                continue
            ss = [summary(r) for r in records]
            opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
            row = (f"| {task} | {method} | {opts} | {epochs} | {_cell([s['best'] for s in ss])} | "
                   f"{', '.join(str(s['best_epoch']) for s in ss)} | {_cell([s['final'] for s in ss])} | {_cell([s['last'] for s in ss])} | "
                   f"{', '.join(str(s['discarded']) for s in ss)} | {', '.join(str(s['passes']) for s in ss)} | "
                   f"{','.join(sorted({s['status'] for s in ss}))} |")  # fmt: skip
            if adv_cols:
                row += f" {_cell([s['adv_best'] for s in ss])} | {_cell([s['adv_final'] for s in ss])} |"
            print(row)
            if method == "aalr" or "lr" in options:
                lr_lines.append(f"- {task} {method} {opts} {epochs} ep, seed {seeds[0]}: `{ss[0]['lr']}`")
        if lr_lines:
            print("\nLR per epoch (seed 0):\n")
            print("\n".join(lr_lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--only", help="comma-separated groups: mnist1d, ablation, lr10, fmnist, adv")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
