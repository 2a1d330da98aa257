"""A default changed: the same suite's runs before and after, side by side (median over seeds of the best and
final metric, failures as in docs/robustness.md), as a Markdown table per task.

    cp -r runs/results/robustness runs/results/robustness-before     # before re-running the methods
    lrpilot bench --suite robustness --out runs/results/robustness --methods ...
    python scripts/before_after.py runs/results/robustness-before runs/results/robustness --methods aalr,hd-train

Runs are matched by (task, label, seed), each store's latest; a method missing from either store is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from robustness_table import REFERENCE, failed

from lrpilot.bench.leaderboard import latest_runs
from lrpilot.bench.store import Store


def cells(store_dir: Path) -> dict[tuple[str, str], list[dict]]:
    with Store.open(store_dir) as store:
        runs = [r for r in latest_runs(store) if r["status"] != "running"]
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        out[(r["task"], r["label"])].append(r)
    return out


def _median(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if r[key] is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def tables(before_dir: Path, after_dir: Path, methods: list[str], tasks: list[str] | None) -> str:
    before, after = cells(before_dir), cells(after_dir)
    task_order = [t for t, _ in after if tasks is None or t in tasks]
    lines: list[str] = []
    for task in dict.fromkeys(task_order):
        ref = _median(after.get((task, REFERENCE), []), "best_val_metric")
        lines += [f"**{task}** ({REFERENCE}: median best {_fmt(ref)})", "",
                  "| method | median best: before -> after | median final: before -> after | failed: before -> after |",
                  "|---|---|---|---|"]  # fmt: skip
        for m in methods:
            b, a = before.get((task, m), []), after.get((task, m), [])
            if not b or not a:
                continue
            fails = f"{sum(map(failed, b))}/{len(b)} -> {sum(map(failed, a))}/{len(a)}"
            lines.append(
                f"| {m} | {_fmt(_median(b, 'best_val_metric'))} -> {_fmt(_median(a, 'best_val_metric'))} | "
                f"{_fmt(_median(b, 'final_val_metric'))} -> {_fmt(_median(a, 'final_val_metric'))} | {fails} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--methods", required=True, help="comma-separated labels")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task of the after store)")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    print(tables(args.before, args.after, args.methods.split(","), tasks))


if __name__ == "__main__":
    main()
