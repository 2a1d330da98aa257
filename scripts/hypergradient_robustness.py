"""RT-HPO's robustness claim (Table 1 of the paper): final test accuracy over a grid of initial LRs and betas.

    python scripts/hypergradient_robustness.py run --out runs/hypergradient_robustness.jsonl
    python scripts/hypergradient_robustness.py table --out runs/hypergradient_robustness.jsonl

For each task, every (initial LR, beta) pair trains ``hd-train``, ``hd-val`` and ``rt-hpo``, and every
initial LR trains constant-LR SGD (momentum 0: the paper's inner optimizer), one seed each. ``run``
appends one JSON line per finished run and skips runs already in the file, so a killed run resumes.

Splits, as in the paper (the hypergradient's validation set is not the set the accuracy is reported
on): the last ``--holdout`` samples of the task's training split form the *hypergradient* validation set
(the batches ``val_closure`` hands out, batch size = the training batch size); the first
``--train-subset`` samples are the training set; the task's validation split (Fashion-MNIST's 10k test
images, MNIST-1D's 2k) is the *test* set, touched only to report the final accuracy. Every method,
SGD included, trains on the same samples.

``table`` prints, per task and method, the paper's three columns: "fixed eta" (mean +- std over beta at
the best initial LR), "fixed beta" (mean +- std over initial LRs at the best beta) and "top" (the best
run). "Best" is read two ways: the setting of the top run (the paper's wording) and, as a check, the
setting with the highest mean over the other hyperparameter. A run that diverged counts with the
accuracy of its final weights (chance level).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lrpilot.bench.tasks import get_task
from lrpilot.core.data import TensorLoader
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.hypergradient.register import PAPER_METHOD_OPTIONS

HD_METHODS = ("hd-train", "hd-val", "rt-hpo")
# The budgets: MNIST-1D's default (30 epochs, all 8k training samples but the holdout); Fashion-MNIST on
# 20k of its 60k training images for its default 10 epochs (the full set would take ~3x longer on one core).
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d-mlp": {"epochs": 30, "train_subset": 7000, "holdout": 1000},
    "fmnist-mlp": {"epochs": 10, "train_subset": 20000, "holdout": 5000},
}


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["task"], row["method"], row["lr"], row["beta"], row["seed"])


def _splits(task: str, train_subset: int, holdout: int):
    data = get_task(task).load_data()
    n = len(data.x_train)
    if train_subset + holdout > n:
        raise ValueError(f"{task}: train_subset + holdout = {train_subset + holdout} > {n} training samples")
    train = (data.x_train[:train_subset], data.y_train[:train_subset])
    hyperval = (data.x_train[n - holdout :], data.y_train[n - holdout :])
    test = (data.x_val, data.y_val)
    return data, train, hyperval, test


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()}
    lrs = [float(v) for v in args.lrs.split(",")]
    betas = [float(v) for v in args.betas.split(",")]
    for task in args.tasks.split(","):
        budget = {**DEFAULTS[task]}
        info = get_task(task)
        data, train, hyperval, test = _splits(task, budget["train_subset"], budget["holdout"])
        batch = info.batch_size
        configs = [("sgd", lr, None) for lr in lrs]
        configs += [(m, lr, beta) for m in args.methods.split(",") for lr in lrs for beta in betas]
        for method, lr, beta in configs:
            row = {"task": task, "method": method, "lr": lr, "beta": beta, "seed": args.seed}
            if _key(row) in done:
                continue
            # the paper's form (additive step, vanilla SGD, undecayed tangent), not the robustness defaults
            options = ({"lr": lr, "momentum": 0.0} if method == "sgd"
                       else {**PAPER_METHOD_OPTIONS, "lr": lr, "beta": beta})
            seed_everything(args.seed)
            model = info.model()
            trainer = Trainer(
                model,
                TensorLoader(*train, batch, shuffle=True, seed=args.seed),
                TensorLoader(*hyperval, batch, shuffle=False),
                method=method,
                epochs=budget["epochs"],
                loss_fn=info.loss(),
                metric=info.build_metric(data),
                seed=args.seed,
                progress=False,
                method_options=options,
            )
            t0 = time.perf_counter()
            history = trainer.run()
            wall = time.perf_counter() - t0
            test_loss, test_acc = trainer.evaluate(TensorLoader(*test, 1000, shuffle=False))
            lr_traj = [lr_ for _, lr_ in history.step_lr] if history.step_lr else []
            row.update(
                test_acc=test_acc,
                test_loss=test_loss if math.isfinite(test_loss) else None,
                status=history.status,
                epochs=len(history.epochs),
                final_lr=trainer.optimizer.param_groups[0]["lr"],
                max_lr=max((v[0] for v in lr_traj), default=lr),
                min_lr=min((v[0] for v in lr_traj), default=lr),
                train_s=history.epochs[-1].train_s if history.epochs else None,
                wall_s=wall,
                budget=budget,
            )
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task} {method:<8} lr={lr:<6g} beta={beta!s:<7} acc={test_acc:.4f} {history.status:<9} "
                  f"final_lr={row['final_lr']:.4g} ({wall:.0f}s)", flush=True)


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fixed(runs: list[dict[str, Any]], fixed: str, best: dict[str, Any], rule: str) -> str:
    """Mean +- std over the other hyperparameter, ``fixed`` held at its best value (top run's, or by mean)."""
    groups: dict[Any, list[float]] = {}
    for r in runs:
        groups.setdefault(r[fixed], []).append(r["test_acc"])
    value = best[fixed] if rule == "top" else max(groups, key=lambda v: statistics.fmean(groups[v]))
    label = {"lr": "η̄", "beta": "β"}[fixed]
    return _mean_std(groups[value]) + ("" if value is None else f" ({label} {value:g})")


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    for task in dict.fromkeys(r["task"] for r in rows):
        print(f"\n### {task}\n")
        print("| method | fixed η̄: over β | fixed β: over η̄ | top (η̄, β) | fixed η̄, best mean | "
              "fixed β, best mean | diverged | s/run |")
        print("|---|---|---|---|---|---|---|---|")
        for method in ("sgd", *HD_METHODS):
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            best = max(runs, key=lambda r: r["test_acc"])
            diverged = sum(r["status"] != "completed" for r in runs)
            secs = statistics.median(r["wall_s"] for r in runs)
            beta = "-" if best["beta"] is None else f"{best['beta']:g}"
            top = f"{100 * best['test_acc']:.2f} ({best['lr']:g}, {beta})"
            cells = []
            for rule in ("top", "mean"):
                fixed_eta = _fixed(runs, "lr", best, rule)
                fixed_beta = _fixed(runs, "beta", best, rule)
                cells.append(("-" if method == "sgd" else fixed_eta, fixed_beta))
            print(f"| {method} | {cells[0][0]} | {cells[0][1]} | {top} | {cells[1][0]} | {cells[1][1]} | "
                  f"{diverged}/{len(runs)} | {secs:.0f} |")
        for method in HD_METHODS:
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            lrs = sorted({r["lr"] for r in runs})
            betas = sorted({r["beta"] for r in runs})
            print(f"\n{task}, {method}: test accuracy % (final LR) by initial LR (rows) and beta (columns)\n")
            print("| η̄ \\ β | " + " | ".join(f"{b:g}" for b in betas) + " |")
            print("|---|" + "---|" * len(betas))
            for lr in lrs:
                cells = []
                for b in betas:
                    r = next((r for r in runs if r["lr"] == lr and r["beta"] == b), None)
                    cells.append("" if r is None else f"{100 * r['test_acc']:.1f} ({r['final_lr']:.3g})")
                print(f"| {lr:g} | " + " | ".join(cells) + " |")
        sgd = [r for r in rows if r["task"] == task and r["method"] == "sgd"]
        if sgd:
            print(f"\n{task}, sgd: " + ", ".join(f"η={r['lr']:g}: {100 * r['test_acc']:.1f}" for r in sgd))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", default="runs/hypergradient_robustness.jsonl")
    parser.add_argument("--tasks", default="mnist1d-mlp,fmnist-mlp")
    parser.add_argument("--methods", default=",".join(HD_METHODS))
    parser.add_argument("--lrs", default="0.001,0.01,0.1,1.0")
    parser.add_argument("--betas", default="1e-5,1e-4,1e-3,1e-2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
