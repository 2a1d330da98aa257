"""Measure the hypergradient family's default forms (issue 15): 3 seeds, the task's default budget.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/measure_hypergradient.py run --methods rt-hpo
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/measure_hypergradient.py run --methods hd-train,hd-val
    PYTHONPATH=src python scripts/measure_hypergradient.py table

Rows append to ``runs/hypergradient/measure.jsonl`` (git ignores ``runs/``); a finished (method, task,
seed) is not re-run. "Failure" is the study's: diverged, stopped by the pilot, best below 0.15 (chance),
or a final more than 5 points below the run's own best.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from lrpilot.bench.tasks import run_task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "hypergradient" / "measure.jsonl"
TARGETS = ROOT / "src" / "lrpilot" / "bench" / "data" / "targets.json"


def _done() -> set[tuple[str, str, int]]:
    if not OUT.exists():
        return set()
    return {(r["method"], r["task"], r["seed"]) for r in map(json.loads, OUT.read_text().splitlines())}


def run(methods: list[str], tasks: list[str], seeds: list[int]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for task in tasks:
            for seed in seeds:
                if (method, task, seed) in _done():
                    continue
                t0 = time.perf_counter()
                rec = run_task(task, method, seed=seed, progress=False)
                s = rec["summary"]
                row = {"method": method, "task": task, "seed": seed, "best": s["best_val_metric"],
                       "final": s["final_val_metric"], "status": s["status"], "status_reason": s["status_reason"],
                       "stopped": any(d.get("action") == "stop" for d in rec["decisions"]),
                       "final_lr": rec["epochs"][-1]["lr"] if rec["epochs"] else None,
                       "epochs": len(rec["epochs"]), "wall_s": time.perf_counter() - t0}
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{method} {task} s{seed}: best {row['best']} final {row['final']} {row['status']} "
                      f"lr {row['final_lr']} ({row['wall_s']:.0f} s)", flush=True)


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def _failure(r: dict) -> str | None:
    best, final = _num(r["best"]), _num(r["final"])
    if r["status"] != "ok" and r["status"] != "completed":
        return r["status"]
    if r["stopped"]:
        return "stopped"
    if not best >= 0.15:
        return "chance"
    if not final >= best - 0.05:
        return "drop"
    return None


def table() -> str:
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    targets = json.loads(TARGETS.read_text())
    lines = ["| method | task | seeds | median best (seeds 0 / 1 / 2) | median final | failures | sgd-cosine-tuned | vs tuned |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    keys = sorted({(r["method"], r["task"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for method, task in keys:
        rs = sorted((r for r in rows if (r["method"], r["task"]) == (method, task)), key=lambda r: r["seed"])
        best = statistics.median(_num(r["best"]) for r in rs)
        final = statistics.median(_num(r["final"]) for r in rs)
        fails = [f"s{r['seed']} {f}" for r in rs if (f := _failure(r))]
        ref = _target(targets, task)
        per_seed = " / ".join(f"{_num(r['best']):.4f}" for r in rs)
        lines.append(f"| {method} | {task} | {len(rs)} | {best:.4f} ({per_seed}) | {final:.4f} | "
                     f"{len(fails)}{': ' + ', '.join(fails) if fails else ''} | {ref:.4f} | "
                     f"{100 * (best - ref):+.1f} pts |")
    return "\n".join(lines)


def _target(targets: dict, task: str) -> float:
    """``sgd-cosine-tuned``'s stored median best (the study's reference), not the task's target."""
    try:
        return float(targets["tasks"][task]["methods"]["sgd-cosine-tuned"]["median_best"])
    except KeyError:
        return math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cmd", choices=["run", "table"])
    ap.add_argument("--methods", default="hd-train,hd-val,rt-hpo")
    ap.add_argument("--tasks", default="mnist1d-cnn,mnist1d-mlp")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.methods.split(","), a.tasks.split(","), [int(s) for s in a.seeds.split(",")])
    else:
        print(table())


if __name__ == "__main__":
    main()
