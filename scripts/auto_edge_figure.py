"""Round 2 of ``auto`` (issue 20): why the sweep's LR is placed from its valley's upper edge, not its minimum.

    lrpilot bench --suite <round 2's grid suite> --out runs/auto-r2      (docs/methods/auto.md, round 2)
    python scripts/auto_edge_figure.py [--store runs/auto-r2/bench.sqlite] [--tasks mnist1d-mlp,fmnist-lenet]
                                       [--out docs/figures/auto-edge.png]

Reads the store, trains nothing. Per task, left: the centred sweep curve of every seed of ``auto`` (round 1's
rule, the same ramp), its minimum (circle) and its valley's upper edge at ``edge_fraction`` 0.2 (triangle).
Right: what ``auto``'s cosine run reaches at fixed LRs (``auto[lr X]``, best validation accuracy per seed,
the median joined), with the LR each rule would pick for each seed marked on the curve of that seed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lrpilot.pilots.auto import centred
from lrpilot.pilots.auto.sweep import valley_edge

FIXED = re.compile(r"^auto\[lr ([0-9.e-]+)\]$")


def _interpolate(points: dict[float, float], lr: float) -> float:
    """The accuracy at ``lr``, linear in log LR between the grid's neighbours (clamped at its ends)."""
    xs = sorted(points)
    if lr <= xs[0] or lr >= xs[-1]:
        return points[xs[0] if lr <= xs[0] else xs[-1]]
    hi = next(i for i, x in enumerate(xs) if x >= lr)
    a, b = xs[hi - 1], xs[hi]
    t = (math.log(lr) - math.log(a)) / (math.log(b) - math.log(a))
    return points[a] + t * (points[b] - points[a])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/auto-r2/bench.sqlite")
    ap.add_argument("--tasks", default="mnist1d-mlp,fmnist-lenet")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--out", default="docs/figures/auto-edge.png")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    db = sqlite3.connect(args.store)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for (curves, response), task in zip(axes, tasks):
        grid: dict[int, dict[float, float]] = defaultdict(dict)
        picks: dict[int, tuple[float, float]] = {}
        for label, seed, best, record in db.execute(
                "SELECT label, seed, best_val_metric, record FROM runs WHERE task = ? AND status = 'completed'", (task,)):
            fixed = FIXED.match(label)
            if fixed and best is not None:
                grid[seed][float(fixed.group(1))] = best
            if label == "auto" and seed not in picks:  # a store may hold the same run from two invocations
                sweep = json.loads(record)["info"]["method"]["sweep"]
                lrs, curve = sweep["lrs"], centred(sweep["losses"], 10)
                low = min(range(len(curve)), key=curve.__getitem__)
                edge = valley_edge(curve, args.fraction)
                edge = low if edge is None else edge
                picks[seed] = (lrs[low], lrs[edge])
                color = f"C{len(picks) - 1}"
                curves.plot(lrs, curve, color=color, lw=1.6, label=f"seed {seed}")
                curves.plot(lrs[low], curve[low], "o", color=color, ms=7)
                curves.plot(lrs[edge], curve[edge], "^", color=color, ms=8)
                print(f"{task} seed {seed}: minimum at {lrs[low]:.3g}, edge at {lrs[edge]:.3g}; "
                      f"picks (divisor 2) {lrs[low] / 2:.3g} / {lrs[edge] / 2:.3g}")
        top = max((line.get_ydata()[0] for line in curves.get_lines()), default=3.0)
        curves.set(xscale="log", xlabel="LR of the ramp", ylabel="training loss, centred average", ylim=(0, 1.5 * top),
                   title=f"{task}: the sweep (o minimum, ^ valley edge, f = {args.fraction})")
        curves.legend(fontsize=8)
        seeds = sorted(grid)
        for i, seed in enumerate(seeds):
            lrs = sorted(grid[seed])
            color = f"C{i}"
            response.plot(lrs, [grid[seed][lr] for lr in lrs], color=color, alpha=0.35, marker=".")
            if seed in picks:
                for lr, marker in zip(picks[seed], ("o", "^")):
                    at = lr / 2  # the LR the run trains at: the point over the divisor
                    response.plot(at, _interpolate(grid[seed], at), marker, color=color, ms=8)
        common = sorted(set.intersection(*(set(grid[s]) for s in seeds))) if seeds else []
        response.plot(common, [statistics.median(grid[s][lr] for s in seeds) for lr in common], color="black",
                      lw=2, label="median over seeds")
        response.set(xscale="log", xlabel="LR (cosine from it, weight decay 0)", ylabel="best validation accuracy",
                     title=f"{task}: auto at fixed LRs (o / ^: the two picks)")
        response.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
