"""Run bench suites and publish their verdicts and leaderboards in docs/results.md (one command).

    python scripts/publish_results.py --suites standard,robustness --workers 2

Each suite runs (resumably) into ``runs/results/<suite>``; then ``lrpilot report`` prints its per-task
tables, the verdict and the leaderboard, which go into ``docs/results.md`` with the command, the machine,
the wall time of this invocation and the lrpilot commit. A suite already in the page is replaced; the
others are kept. Re-running after a kill resumes where the bench stopped.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
HEADER = """# Published results

Made by `python scripts/publish_results.py` (see its docstring): each section is one suite run on the machine
it names, with the commit it ran. The verdict comes first (per task: the best untuned autopilot, the tuned
baseline with and without its search charged, the best LR-free peer), then the AlgoPerf-style leaderboard.
Metrics are on the scored validation split, which no decision of any untuned method saw (`info.decision_split`
in each run record); the grid-tuned references select their LR on it, as AlgoPerf's external tuning does.
"""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def _machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__}, load average {load:.1f} at the end")  # fmt: skip


def report_store(suite: str) -> tuple[str, float, str]:
    """Report every run already in ``runs/results/<suite>`` (``lrpilot report --all``) without running any:
    for a store filled by several invocations (a suite that does not fit one session)."""
    out = ROOT / "runs" / "results" / suite
    report = subprocess.run([sys.executable, "-m", "lrpilot", "report", "--all", str(out)], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    return report, 0.0, f"lrpilot report --all runs/results/{suite}"


def run_suite(suite: str, workers: int, extra: list[str]) -> tuple[str, float, str]:
    """Run ``suite`` and return (the report's printed text, wall seconds, the command)."""
    out = ROOT / "runs" / "results" / suite
    bench = [sys.executable, "-m", "lrpilot", "bench", "--suite", suite, "--out", str(out), "--workers", str(workers), *extra]
    t0 = time.perf_counter()
    subprocess.run(bench, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    report = subprocess.run([sys.executable, "-m", "lrpilot", "report", str(out)], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    shown = " ".join(["lrpilot", "bench", "--suite", suite, "--out", f"runs/results/{suite}", "--workers", str(workers), *extra])
    return report, wall, shown


def section(suite: str, report: str, wall: float, command: str) -> str:
    """One suite's section; ``wall == 0``: reported from the store (``--report-only``), nothing was run."""
    commit = _git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if _git("status", "--porcelain") else "")
    if wall:
        how = (f"- command: `{command}` (then `lrpilot report runs/results/{suite}`)\n"
               f"- wall time of this invocation: {wall / 60:.1f} min (a resumed run counts only what it ran)\n")
    else:
        how = f"- reported from the store, every run in it (`{command}`); the runs came from several invocations\n"
    return (
        f"## Suite `{suite}`\n\n{how}"
        f"- lrpilot commit: `{commit}`; reported on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {_machine()}\n\n"
        f"```\n{report.strip()}\n```\n"
    )


def write_page(sections: dict[str, str]) -> None:
    old = PAGE.read_text() if PAGE.exists() else HEADER
    kept = dict(re.findall(r"(?ms)^## Suite `([^`]+)`\n(.*?)(?=^## Suite `|\Z)", old))
    kept = {name: f"## Suite `{name}`\n{body}" for name, body in kept.items()}
    kept.update(sections)
    PAGE.write_text(HEADER + "\n" + "\n".join(kept[name].rstrip() + "\n" for name in kept))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="standard,robustness", help="comma-separated suite names")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report every run already in each suite's store (lrpilot report --all)")
    parser.add_argument("extra", nargs="*", help="more `lrpilot bench` arguments, after --")
    args = parser.parse_args(argv)
    sections = {}
    for suite in [s for s in args.suites.split(",") if s]:
        report, wall, command = report_store(suite) if args.report_only else run_suite(suite, args.workers, args.extra)
        sections[suite] = section(suite, report, wall, command)
    write_page(sections)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
