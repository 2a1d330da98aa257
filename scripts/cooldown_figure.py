"""The cooldown (issue 15): ResNet-20's last-epoch failures, before and after, from the robustness stores.

    cp -r runs/results/robustness runs/results/robustness-before-cooldown    # before the re-run
    lrpilot bench --suite robustness --out runs/results/robustness --methods <the cooled methods>
    python scripts/cooldown_figure.py [--before runs/results/robustness-before-cooldown]
                                      [--after runs/results/robustness] [--out docs/figures/cooldown.png]

Reads the stores, trains nothing. Left: one run's validation accuracy per epoch without and with the
cooldown (``hd-train``, seed 2, the case docs/robustness.md analyses); middle: its reported LR per step
(the cooldown's factor included). Right: every cooled method's final accuracy per seed on
``fmnist-resnet20``, before and after, against the 5-point failure line below its own best.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TASK = "fmnist-resnet20"
METHODS = ["aalr", "hd-train", "hd-val", "rt-hpo", "lipschitz", "adamo", "auto-adam", "hyperreg-kl-1",
           "hyperreg-rkl-2", "hyperreg-chi2-2"]  # fmt: skip


def _runs(store: Path, cooled: bool) -> dict[tuple[str, int], dict]:
    """The latest completed run per (label, seed) on TASK whose config has (``cooled``) or lacks the option."""
    db = sqlite3.connect(store / "bench.sqlite")
    out: dict[tuple[str, int], dict] = {}
    rows = db.execute("select label, seed, config, record, finished_at from runs where task = ? and status = "
                      "'completed' order by finished_at", (TASK,))  # fmt: skip
    for label, seed, config, record, _ in rows:
        if label in METHODS and ('"cooldown"' in config) == cooled:
            out[(label, seed)] = json.loads(record)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=Path("runs/results/robustness-before-cooldown"))
    parser.add_argument("--after", type=Path, default=Path("runs/results/robustness"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/cooldown.png"))
    args = parser.parse_args(argv)
    before, after = _runs(args.before, False), _runs(args.after, True)
    fig, (ax_acc, ax_lr, ax_all) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 2]})
    for name, runs, style in (("without (cooldown=0)", before, "o--"), ("with (default)", after, "s-")):
        rec = runs[("hd-train", 2)]
        ax_acc.plot([e["epoch"] for e in rec["epochs"]], [e["val_metric"] for e in rec["epochs"]], style, label=name)
        steps, lrs = zip(*[(s, lr[0]) for s, lr in rec["step_lr"]])
        ax_lr.plot(steps, lrs, style[-1], label=name, drawstyle="steps-post")
    ax_acc.set(title=f"hd-train, {TASK}, seed 2", xlabel="epoch", ylabel="validation accuracy", xticks=[1, 2, 3])
    ax_acc.legend()
    ax_lr.set(title="its reported LR per step", xlabel="step", ylabel="LR (times the cooldown factor)")
    ax_lr.legend()
    for i, m in enumerate(METHODS):
        for runs, dx, marker, color in ((before, -0.15, "o", "tab:red"), (after, 0.15, "s", "tab:blue")):
            for seed in (0, 1, 2):
                rec = runs.get((m, seed))
                if rec is None:
                    continue
                s = rec["summary"]
                ax_all.plot(i + dx, s["final_val_metric"], marker, color=color, alpha=0.8)
                ax_all.plot([i + dx - 0.08, i + dx + 0.08], [s["best_val_metric"] - 0.05] * 2, "-", color=color, lw=0.8)
    ax_all.plot([], [], "o", color="tab:red", label="final, before (cooldown=0)")
    ax_all.plot([], [], "s", color="tab:blue", label="final, after (default)")
    ax_all.plot([], [], "-", color="gray", lw=0.8, label="its best - 5 points (below: failed)")
    ax_all.set_xticks(range(len(METHODS)), METHODS, rotation=35, ha="right")
    ax_all.set(title=f"{TASK} (5,000 samples, 3 epochs), seeds 0-2", ylabel="final validation accuracy")
    ax_all.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
