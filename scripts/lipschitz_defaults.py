"""Measure the LipschitzLR family's default forms (issue 15): median best, final and failures over seeds.

Usage (CPU, one thread per process; every run is seeded; rows land in ``runs/lipschitz-defaults.jsonl``,
which git ignores, and the table is printed from whatever rows exist)::

    export OMP_NUM_THREADS=1 PYTHONPATH=src
    python scripts/lipschitz_defaults.py run --methods lipschitz,auto-adam,adamo --tasks mnist1d-cnn,digits-mlp
    python scripts/lipschitz_defaults.py run --methods adamo --label continuous -o k1_start=continuous
    python scripts/lipschitz_defaults.py table

"Failure" is the robustness study's criterion: the run diverged or was stopped, never got above chance
(best < 0.15), or ended more than 5 points below its own best.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time
from pathlib import Path

from lrpilot.bench.tasks import run_task

OUT = Path("runs/lipschitz-defaults.jsonl")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(args: argparse.Namespace) -> None:
    options = dict(kv.split("=", 1) for kv in args.option)
    options = {k: _value(v) for k, v in options.items()}
    OUT.parent.mkdir(exist_ok=True)
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.perf_counter()
                rec = run_task(task, method, seed=seed, method_options=options, progress=False)
                s = rec["summary"]
                row = {"method": method, "label": args.label, "options": options, "task": task, "seed": seed,
                       "best": s["best_val_metric"], "final": s["final_val_metric"], "status": s["status"],
                       "status_reason": s["status_reason"],
                       "stopped": any(d.get("action") == "stop" for d in rec["decisions"]),
                       "epochs": len(rec["epochs"]), "wall_s": round(time.perf_counter() - t0, 1)}
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def failed(row: dict) -> str | None:
    if row["status"] != "completed" or row["stopped"]:
        return row["status_reason"] or row["status"]
    if row["best"] is None or row["best"] < 0.15:
        return "chance"
    if row["final"] is None or row["final"] < row["best"] - 0.05:
        return "ended >5 pts below best"
    return None


def table(_: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["label"], r["task"]), []).append(r)
    print("| method | form | task | seeds | median best | median final | failures | wall s (median) |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    for (method, label, task), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        fails = [f"s{r['seed']} {failed(r)}" for r in rs if failed(r)]

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] if r[key] is not None else float("nan") for r in rs)

        print(f"| {method} | {label} | {task} | {len(rs)} | {med('best'):.4f} | {med('final'):.4f} | "
              f"{len(fails)}{': ' + ', '.join(fails) if fails else ''} | {statistics.median(r['wall_s'] for r in rs):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", default="lipschitz,auto-adam,adamo")
    r.add_argument("--tasks", default="mnist1d-cnn,digits-mlp")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--label", default="default")
    r.add_argument("-o", "--option", action="append", default=[], help="KEY=VALUE method option")
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.set_defaults(func=table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
