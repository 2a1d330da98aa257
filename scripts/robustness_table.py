"""Issue 15's table from a robustness-suite store: per method and task, the median best and final metric
over seeds and the failures, in docs/robustness.md (one command after the bench).

    lrpilot bench --suite robustness --out runs/results/robustness     # or scripts/publish_results.py
    python scripts/robustness_table.py runs/results/robustness [--out docs/robustness.md]

A run *fails* when it did not complete (diverged, stopped by its pilot, crashed), when it ended more than
5 points (0.05 of a metric in [0, 1]) below its own best (the criterion of issue 15), or when its best
accuracy stayed below 0.15, i.e. at chance on these 10-class tasks: a network that collapsed at the start
never ends below a best it never had (the robustness study's "best below 0.15"). A method's row is marked
when its median best is more than 2 points below `sgd-cosine-tuned`'s on the same task.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpilot.bench.leaderboard import latest_runs
from lrpilot.bench.store import Store

DROP = 0.05  # a final this far below the run's own best is a failure
COLLAPSED = 0.15  # a best accuracy below this is chance on a 10-class task: collapsed from the start
GAP = 0.02  # the "within 2 points of sgd-cosine-tuned"
REFERENCE = "sgd-cosine-tuned"
KEEP = "<!-- written by hand below this line: kept when the page is re-made -->"


def failed(run: dict) -> bool:
    if run["status"] != "completed":
        return True
    best, final = run["best_val_metric"], run["final_val_metric"]
    return best is None or final is None or (run["higher_is_better"] and (best - final > DROP or best < COLLAPSED))


def table(store_dir: Path, tasks_wanted: list[str] | None = None) -> str:
    with Store.open(store_dir) as store:
        # the most recent run of each (task, label, seed): a default changed since (new options, so a new
        # run key) replaces the older run instead of being counted beside it
        runs = [r for r in latest_runs(store) if r["status"] != "running" and (not tasks_wanted or r["task"] in tasks_wanted)]
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    tasks: list[str] = []
    methods: list[str] = []
    for r in runs:
        cells[(r["label"], r["task"])].append(r)
        if r["task"] not in tasks:
            tasks.append(r["task"])
        if r["label"] not in methods:
            methods.append(r["label"])

    def median(key: str, rs: list[dict]) -> float | None:
        values = [r[key] for r in rs if r[key] is not None]
        return statistics.median(values) if values else None

    reference = {t: median("best_val_metric", cells.get((REFERENCE, t), [])) for t in tasks}
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        row = []
        for t in tasks:
            rs = cells.get((m, t), [])
            if not rs:
                row.append("")
                continue
            best, final = median("best_val_metric", rs), median("final_val_metric", rs)
            n_fail = sum(failed(r) for r in rs)
            gap = reference[t] is not None and best is not None and reference[t] - best > GAP and m != REFERENCE
            text = f"{best:.4f} / {final:.4f}" if best is not None and final is not None else "-"
            row.append(f"{'**' if n_fail else ''}{text}, {n_fail}/{len(rs)} failed{'**' if n_fail else ''}" + (" (gap)" if gap else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def gap_table(store_dir: Path, tasks_wanted: list[str] | None = None) -> str:
    """Every (gap) cell of :func:`table` with the LR the method trained at (first group, per epoch, median over
    seeds of the first, median and last epoch's LR) beside the tuned reference's: its grid search's accuracy at
    each LR and the LR it chose. The measurement behind each family's "why" in ``docs/methods/``."""
    with Store.open(store_dir) as store:
        runs = [r for r in latest_runs(store) if r["status"] == "completed" and (not tasks_wanted or r["task"] in tasks_wanted)]
        cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in runs:
            cells[(r["label"], r["task"])].append(r)
        lrs = {r["key"]: [v[0] for _, v in sorted(store.epoch_lrs(r["key"]).items()) if v and v[0] is not None] for r in runs}
        grids: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        chosen: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            if r["label"] != REFERENCE:
                continue
            search = ((store.record(r["key"]) or {}).get("info", {}).get("method") or {}).get("search") or {}
            for trial in search.get("runs", []):
                if trial.get("best_val_metric") is not None:
                    grids[r["task"]][trial["lr"]].append(trial["best_val_metric"])
            if search.get("chosen"):
                chosen[r["task"]].append(search["chosen"]["lr"])
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        ref = cells.get((REFERENCE, task))
        if not ref:
            continue
        ref_best = statistics.median(r["best_val_metric"] for r in ref)
        rows = []
        for (label, t), rs in cells.items():
            best = statistics.median(r["best_val_metric"] for r in rs)
            if t != task or label == REFERENCE or ref_best - best <= GAP:
                continue
            trail = [lrs[r["key"]] for r in rs if lrs[r["key"]]]
            firsts, middles, lasts = zip(*[(x[0], statistics.median(x), x[-1]) for x in trail]) if trail else ((), (), ())
            lr = " / ".join(f"{statistics.median(v):.3g}" for v in (firsts, middles, lasts)) if trail else "-"
            rows.append(f"| {label} | {best:.4f} | {100 * (best - ref_best):+.1f} | {lr} |")
        if not rows:
            continue
        grid = ", ".join(f"{lr:g}: {statistics.median(v):.3f}" for lr, v in sorted(grids[task].items()))
        pick = " or ".join(f"{lr:g}" for lr in sorted(set(chosen[task])))
        out += [f"**{task}**: `{REFERENCE}` median best {ref_best:.4f} at LR {pick}; its grid (LR: best accuracy) {grid}.",
                "", "| method | median best | vs tuned (points) | its LR: first / median / last epoch |", "|---|---|---|---|",
                *rows, ""]
    lines = out
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "robustness.md")
    parser.add_argument("--tasks", help="comma-separated tasks to show (default: every task in the store)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    body = table(args.store, args.tasks.split(",") if args.tasks else None)
    # what was written by hand below the marker (which runs ran when, on which machine) survives a re-make
    kept = args.out.read_text().partition(KEEP)[2] if args.out.exists() else ""
    args.out.write_text(
        "# Robustness: every seed method in its default form, conv nets and batch norm included (issue 15)\n\n"
        f"Made by `python scripts/robustness_table.py {args.store}` from a run of `lrpilot bench --suite robustness`"
        f" (lrpilot `{commit}`, {time.strftime('%Y-%m-%d', time.gmtime())}; the suite's budgets are in"
        " `src/lrpilot/bench/suites/robustness.json`: on CPU, LeNet-5 on 12,000 samples for 8 epochs and ResNet-20 on"
        " 5,000 samples for 3 epochs). Cells: median best / median final over seeds 0-2, then the failures: a run that"
        f" did not complete, ended more than {DROP * 100:.0f} points below its own best, or never rose above"
        f" {COLLAPSED} (chance: collapsed at the start) (bold when any). `(gap)`: a"
        f" median best more than {GAP * 100:.0f} points below `{REFERENCE}`'s on that task. The full leaderboard and"
        " verdict of the same run are in `docs/results.md`.\n\n" + body + "\n\n"
        "## The gaps, measured\n\n"
        "Every `(gap)` cell above with the LR the method trained at (its first param group's LR in each epoch; median"
        " over seeds of the first, the median and the last epoch's) beside the tuned reference's grid search (SGD,"
        " momentum 0.9, cosine to 0 over the budget: the LR it chose, and each grid LR's best accuracy, median over"
        " seeds). An LR of a method without momentum moves the weights about a tenth as far per step as the same LR"
        " with momentum 0.9; Adam-type LRs are not comparable. A cooled method's last-epoch LR is its LR times the"
        " cooldown's factor at the end of the budget (`pilots/cooldown.py`). Each family's page says what the numbers"
        " mean for it.\n\n"
        + gap_table(args.store, args.tasks.split(",") if args.tasks else None) + "\n\n" + KEEP + (kept or "\n")
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
