"""The tables of docs/methods/auto.md from bench stores (issue 20): the ablation on the development set,
and the confirmation against the tuned reference and the LR-free peers.

    lrpilot bench --suite auto-dev --out runs/auto-dev
    python scripts/auto_tables.py ablation runs/auto-dev
    python scripts/auto_tables.py confirm runs/results/standard [--tasks a,b] [--labels auto,sgd-cosine-tuned,...]
    python scripts/auto_tables.py confirm runs/auto-r7-confirm --auto 'auto[race]'
    python scripts/auto_tables.py races runs/auto-r8 [--auto LABEL]

``ablation``: per variant of ``auto`` (and the references in the same store) and task, the median best
validation metric over seeds with its min-max, the difference to ``auto``'s median, and the runs that
failed (did not complete, or ended more than 5 points below their own best, or never left chance: a best
below 0.12 on these 10-class tasks).

``confirm`` (the runs of the store's last bench invocation, as ``lrpilot report``; with ``--all`` every run of the
store, the latest of each task, label and seed, as ``lrpilot report --all``): per task, ``auto``'s median best beside ``sgd-cosine-tuned``'s and the best peer's (methods
tagged ``peer``), the margins, and the failures; then the AlgoPerf benchmark scores of the same store
(time to target, the search charged) for ``auto`` and every peer.

``races``: what each race of ``--auto``'s runs chose (rounds 7-8): per task and seed the winner, each
challenger's McNemar z against the incumbent, the racers' held-out accuracies and the run's best.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lrpilot.bench.leaderboard import latest_runs, leaderboard_from_store  # noqa: E402
from lrpilot.bench.store import Store  # noqa: E402

DROP = 0.05
CHANCE = 0.12
REFERENCE = "sgd-cosine-tuned"


def _failed(run: dict) -> bool:
    if run["status"] != "completed":
        return True
    best, final = run["best_val_metric"], run["final_val_metric"]
    if best is None or final is None:
        return True
    stuck = best < CHANCE  # never left chance (every task here has 10 balanced classes)
    return bool(run["higher_is_better"]) and (best - final > DROP or stuck)


def _cells(store_dir: Path, tasks: list[str] | None, *, planned: bool = False) -> tuple[dict, list[str], list[str], dict]:
    with Store.open(store_dir) as store:
        keys = store.plan_keys() if planned else None
        runs = [r for r in latest_runs(store, keys) if r["status"] != "running" and (not tasks or r["task"] in tasks)]
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    order_t: list[str] = []
    order_l: list[str] = []
    tags: dict[str, set[str]] = {}
    for r in runs:
        cells[(r["label"], r["task"])].append(r)
        order_t += [r["task"]] if r["task"] not in order_t else []
        order_l += [r["label"]] if r["label"] not in order_l else []
        tags[r["label"]] = set(r["tags"] if isinstance(r["tags"], (list, tuple, set)) else [])
    return cells, order_t, order_l, tags


def _median(rs: list[dict]) -> float | None:
    values = [r["best_val_metric"] for r in rs if r["best_val_metric"] is not None]
    return statistics.median(values) if values else None


def _cell(rs: list[dict]) -> str:
    values = [r["best_val_metric"] for r in rs if r["best_val_metric"] is not None]
    if not values:
        return "-"
    n_fail = sum(_failed(r) for r in rs)
    text = f"{statistics.median(values):.4f} [{min(values):.4f}-{max(values):.4f}]"
    return text + (f", **{n_fail}/{len(rs)} failed**" if n_fail else "")


def ablation(store_dir: Path, tasks: list[str] | None) -> str:
    cells, order_t, order_l, _ = _cells(store_dir, tasks)
    base = {t: _median(cells.get(("auto", t), [])) for t in order_t}
    lines = ["| variant | " + " | ".join(order_t) + " |", "|---|" + "---|" * len(order_t)]
    variants = sorted((lb for lb in order_l if lb == "auto" or lb.startswith("auto[")), key=lambda lb: lb != "auto")
    for label in variants + [lb for lb in order_l if lb not in variants]:
        row = []
        for t in order_t:
            rs = cells.get((label, t), [])
            med = _median(rs)
            delta = "" if label == "auto" or med is None or base[t] is None else f" ({(med - base[t]) * 100:+.1f})"
            row.append(_cell(rs) + delta if rs else "")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def confirm(store_dir: Path, tasks: list[str] | None, labels: list[str] | None, *, every_run: bool = False,
            auto: str = "auto") -> str:
    cells, order_t, order_l, tags = _cells(store_dir, tasks, planned=not every_run)
    peers = [lb for lb in order_l if "peer" in tags.get(lb, set()) and (not labels or lb in labels)]
    lines = [f"| task | {auto} | sgd-cosine-tuned | best peer | auto - tuned | auto - best peer |", "|---|---|---|---|---|---|"]
    for t in order_t:
        a, ref = cells.get((auto, t), []), cells.get((REFERENCE, t), [])
        if not a:
            continue
        ranked = sorted((p for p in peers if cells.get((p, t))), key=lambda p: -(_median(cells[(p, t)]) or 0.0))
        best_peer = ranked[0] if ranked else None
        ma, mr = _median(a), _median(ref)
        mp = _median(cells[(best_peer, t)]) if best_peer else None
        lines.append(
            f"| {t} | {_cell(a)} | {_cell(ref) if ref else '-'} | "
            f"{f'{best_peer} {_cell(cells[(best_peer, t)])}' if best_peer else '-'} | "
            f"{'' if mr is None else f'{(ma - mr) * 100:+.2f}'} | {'' if mp is None else f'{(ma - mp) * 100:+.2f}'} |"
        )
    with Store.open(store_dir) as store:
        plan = None if every_run else store.plan_keys()
        keys = {r["key"] for r in latest_runs(store, plan) if not tasks or r["task"] in tasks}
        board = leaderboard_from_store(store, keys=keys)
    shown = [lb for lb in board.labels if lb == auto or lb.startswith("auto[") or lb in peers or lb == REFERENCE]
    lines += ["", "| method | AlgoPerf score (search charged) | score, search free | tasks reached (median) |",
              "|---|---|---|---|"]
    for lb in shown:
        reached = sum(1 for t in board.tasks if (c := board.cell(lb, t)) is not None and c.times["train_s"] < float("inf"))
        lines.append(f"| {lb} | {board.scores['train_s'].get(lb, 0.0):.3f} | {board.scores['train_s_free'].get(lb, 0.0):.3f} "
                     f"| {reached}/{len(board.tasks)} |")
    return "\n".join(lines)


def races(store_dir: Path, tasks: list[str] | None, auto: str = "auto") -> str:
    cells, order_t, _, _ = _cells(store_dir, tasks)
    with Store.open(store_dir) as store:
        records = {r["key"]: store.record(r["key"]) or {} for rs in cells.values() for r in rs if r["label"] == auto}
    lines = ["| task | seed | winner | z against the incumbent | held-out accuracy of each racer | best |",
             "|---|---|---|---|---|---|"]
    for t in order_t:
        for r in sorted(cells.get((auto, t), []), key=lambda r: r["seed"]):
            race = records[r["key"]].get("info", {}).get("method", {}).get("race")
            if not race:
                continue
            if "skipped" in race:
                lines.append(f"| {t} | {r['seed']} | {race['winner']} (skipped) | | | {r['best_val_metric']:.4f} |")
                continue
            tests = race.get("tests") or {"adamw": {"z": race["z"]}}  # round 7's record
            racers = [k for k in race if isinstance(race[k], dict) and "held_out_accuracy" in race[k]]
            zs = ", ".join(f"{k} {v['z']:+.1f}" for k, v in tests.items())
            accs = ", ".join(f"{k} {race[k]['held_out_accuracy']:.3f}" for k in racers)
            lines.append(f"| {t} | {r['seed']} | {race['winner']} | {zs} | {accs} | {r['best_val_metric']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["ablation", "confirm", "races"])
    parser.add_argument("store", type=Path)
    parser.add_argument("--tasks", help="comma-separated tasks (default: all in the store)")
    parser.add_argument("--labels", help="confirm: the peers to compare with (default: every peer in the store)")
    parser.add_argument("--auto", default="auto",
                        help="confirm: the label that plays auto (e.g. 'auto[race]' where a round's candidate ran "
                             "under its option's label); every auto[...] label gets its AlgoPerf score")
    parser.add_argument("--all", action="store_true",
                        help="confirm: every run of the store (the latest of each task, label and seed), as "
                             "`lrpilot report --all`, not only the last bench invocation's")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else None
    if args.table == "ablation":
        print(ablation(args.store, tasks))
    elif args.table == "races":
        print(races(args.store, tasks, args.auto))
    else:
        print(confirm(args.store, tasks, args.labels.split(",") if args.labels else None, every_run=args.all,
                      auto=args.auto))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
