"""Compare two bench results stores run by run: are their results bit-identical?

    python scripts/compare_stores.py A B          # A, B: a bench's output folder or its bench.sqlite
    python scripts/compare_stores.py A B --quiet  # only the differing runs and the summary

For every run key in either store it prints ``identical`` or ``different`` (with the first fields that
differ), or ``only in A`` / ``only in B``. Compared: the run's row (status, best metric, epochs, steps,
error ...), its full record, every epoch (losses, metrics, LRs, extras), the per-epoch and per-step LR
trajectories and the pilot's decisions, all exactly (floats bit for bit). Left out: what measures time or
place (wall and train seconds, start and end times, the worker, the invocation). Exits 0 when every run
of both stores is identical, 1 otherwise: the check that a change to how runs execute (worker reuse, an
executor, a refactor) changed no result.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from lrpilot.bench.store import Store

#: Keys (by suffix) that measure time: the only things allowed to differ (``mi_s``, ``ixy_s``: seconds
#: MI-decay spent estimating mutual information, recorded with its decisions and search cost).
TIMING = ("wall_s", "train_s", "started_at", "finished_at", "run_s", "cpu_s", "mi_s", "ixy_s")
#: Row columns that say where and when a run ran, not what it computed.
PLACE = ("worker", "invocation")


def strip_timing(obj: Any) -> Any:
    """``obj`` without the keys of :data:`TIMING`, at any depth."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not k.endswith(TIMING)}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def store_contents(path: str | Path) -> dict[str, dict[str, Any]]:
    """Everything a store holds per run key, timings and the worker's identity aside."""
    folder = Path(path)
    if folder.name == "bench.sqlite":
        folder = folder.parent
    if not (folder / "bench.sqlite").exists():
        raise FileNotFoundError(f"no results store at {folder / 'bench.sqlite'}")
    with Store.open(folder) as store:
        runs = {}
        for row in store.runs():
            key = row["key"]
            runs[key] = {
                "row": {k: v for k, v in row.items() if not k.endswith(TIMING) and k not in PLACE},
                "record": strip_timing(store.record(key)),
                "epochs": [strip_timing(e) for e in store.epochs(key)],
                "lrs": store.epoch_lrs(key),
                "step_lrs": store.step_lrs(key),
                "decisions": strip_timing(store.decisions(key)),
            }
        return runs


def differences(a: Any, b: Any, where: str = "", limit: int = 3) -> list[str]:
    """Up to ``limit`` paths at which ``a`` and ``b`` differ (NaN equals NaN; otherwise exact)."""
    out: list[str] = []

    def walk(x: Any, y: Any, at: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if k not in x or k not in y:
                    out.append(f"{at}.{k}: only in {'B' if k not in x else 'A'}")
                else:
                    walk(x[k], y[k], f"{at}.{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                out.append(f"{at}: {len(x)} items against {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{at}[{i}]")
        elif isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return
        elif x != y or type(x) is not type(y):
            out.append(f"{at}: {x!r} != {y!r}")

    walk(a, b, where)
    return out


def label(run: dict[str, Any]) -> str:
    row = run["row"]
    return f"{row.get('task')} {row.get('label')} seed={row.get('seed')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", metavar="A", help="a bench output folder or its bench.sqlite")
    parser.add_argument("b", metavar="B", help="the same for the other store")
    parser.add_argument("--quiet", action="store_true", help="print only the runs that are not identical")
    args = parser.parse_args(argv)
    a, b = store_contents(args.a), store_contents(args.b)
    counts = {"identical": 0, "different": 0, "only in A": 0, "only in B": 0}
    for key in sorted(set(a) | set(b), key=lambda k: label(a.get(k) or b[k])):
        if key not in b:
            verdict, detail = "only in A", []
        elif key not in a:
            verdict, detail = "only in B", []
        else:
            detail = differences(a[key], b[key])
            verdict = "different" if detail else "identical"
        counts[verdict] += 1
        if verdict != "identical" or not args.quiet:
            print(f"{verdict:<10} {label(a.get(key) or b[key])}  [{key[:12]}]")
            for line in detail:
                print(f"    {line}")
    print(", ".join(f"{n} {what}" for what, n in counts.items()) + f" ({len(set(a) | set(b))} runs)")
    return 0 if counts["identical"] == len(set(a) | set(b)) else 1


if __name__ == "__main__":
    sys.exit(main())
