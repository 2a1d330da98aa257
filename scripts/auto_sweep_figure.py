"""The root cause behind ``auto``'s centred sweep (issue 20): a causal average moves the LR it picks.

    python scripts/auto_sweep_figure.py [--task fmnist-lenet] [--train-subset 12000] [--seeds 100,101,102]
                                        [--store runs/auto-dev/bench.sqlite] [--out docs/figures/auto-sweep.png]

Left: ``auto``'s sweep on each seed (raw training loss per step against the ramp's LR), its causal EMA with
``beta = 0.98`` (what LR finders usually pick from) and the centred average ``auto`` picks from, each
minimum marked. Right, when ``--store`` holds the auto-dev suite: the mean training loss per epoch of
``auto``, of ``auto[EMA-smoothed sweep]`` and of the same without the stall clause (``stall factor 1.05``)
on the same task and seeds (a flat line at ln 10 = 2.30 is a network stuck at chance). Prints the LRs
each smoothing picks.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lrpilot.bench.tasks import run_task  # noqa: E402
from lrpilot.pilots.auto import centred, smoothed  # noqa: E402
from lrpilot.pilots.auto.sweep import EMA_SELECTION_BETA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="fmnist-lenet")
    ap.add_argument("--train-subset", type=int, default=12000)
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--store", default="runs/auto-dev/bench.sqlite")
    ap.add_argument("--out", default="docs/figures/auto-sweep.png")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, seed in enumerate(seeds):
        record = run_task(args.task, "auto", seed=seed, epochs=1, train_subset=args.train_subset, progress=False)
        sweep = record["info"]["method"]["sweep"]
        lrs, losses = sweep["lrs"], sweep["losses"]
        ema, mid = smoothed(losses, EMA_SELECTION_BETA), centred(losses, 10)
        at_ema = lrs[min(range(len(ema)), key=ema.__getitem__)]
        at_mid = lrs[min(range(len(mid)), key=mid.__getitem__)]
        print(f"{args.task} seed {seed}: minimum of the EMA at LR {at_ema:.3g}, of the centred average at "
              f"{at_mid:.3g}; auto picks {sweep['lr']:.3g} ({sweep['steps']} steps, {sweep['stopped']})")
        color = f"C{i}"
        left.plot(lrs, losses, color=color, alpha=0.25, lw=0.8)
        left.plot(lrs, ema, color=color, ls="--", lw=1.2, label=f"seed {seed}: EMA 0.98 (min {at_ema:.2g})")
        left.plot(lrs, mid, color=color, lw=1.8, label=f"seed {seed}: centred (min {at_mid:.2g})")
        left.axvline(at_ema, color=color, ls="--", lw=0.8)
        left.axvline(at_mid, color=color, lw=0.8)
    left.set(xscale="log", xlabel="LR of the ramp", ylabel="training loss", ylim=(0, 4),
             title=f"auto's sweep on {args.task}: raw loss, causal EMA, centred average")
    left.legend(fontsize=7)

    store = Path(args.store)
    if store.exists():
        db = sqlite3.connect(store)
        for label, ls in (("auto", "-"), ("auto[EMA-smoothed sweep]", "--"),
                          ("auto[EMA-smoothed sweep, stall factor 1.05]", ":")):
            for i, seed in enumerate(seeds):
                row = db.execute("SELECT record FROM runs WHERE task = ? AND label = ? AND seed = ?",
                                 (args.task, label, seed)).fetchone()
                if row is None:
                    continue
                rec = json.loads(row[0])
                losses = [e["train_loss"] if e["train_loss"] is not None else math.nan for e in rec["epochs"]]
                lr = rec["info"]["method"]["lr"]
                right.plot(range(1, len(losses) + 1), losses, color=f"C{i}", ls=ls, marker="o", ms=3,
                           label=f"{label}, seed {seed} (LR {lr:.3g})")
        right.axhline(math.log(10), color="grey", lw=0.8)
        right.set(xlabel="epoch", ylabel="mean training loss", title="the runs that follow (grey: ln 10, chance)")
        right.legend(fontsize=7)
    else:
        right.set_axis_off()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
