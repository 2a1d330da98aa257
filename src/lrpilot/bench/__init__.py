"""The bench: tasks, suites, runner, results store, AlgoPerf-style scoring and report (``docs/bench.md``).

::

    from lrpilot.bench import bench
    done = bench("quick", "runs/demo", workers=2)     # resumable; the same as `lrpilot bench`
    print(done.leaderboard.to_text(), done.report)

The names below are imported on first use, so ``import lrpilot.bench.tasks`` stays as cheap as it was.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "bench": "runner",
    "run_bench": "runner",
    "Suite": "suites",
    "RunSpec": "suites",
    "load_suite": "suites",
    "list_suites": "suites",
    "Store": "store",
    "Executor": "executors",
    "LocalExecutor": "executors",
    "InlineExecutor": "executors",
    "RayExecutor": "ray_executor",
    "make_executor": "runner",
    "Outcome": "executors",
    "execute_run": "executors",
    "build_leaderboard": "leaderboard",
    "leaderboard_from_store": "leaderboard",
    "load_targets": "leaderboard",
    "benchmark_scores": "scoring",
    "performance_profiles": "scoring",
    "score_algoperf": "algoperf",
    "write_report": "report",
    "calibrate_targets": "calibrate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lrpilot.bench' has no attribute {name!r}")
    module = import_module(f"lrpilot.bench.{_EXPORTS[name]}")
    return getattr(module, "calibrate" if name == "calibrate_targets" else name)
