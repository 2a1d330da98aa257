"""The report: every figure it references exists and is a PNG, its tables hold the leaderboard; in a real
headless browser (slow), every image loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lrpilot.bench.executors import InlineExecutor, Outcome
from lrpilot.bench.leaderboard import Target
from lrpilot.bench.report import write_report
from lrpilot.bench.runner import run_bench
from lrpilot.bench.store import Store
from lrpilot.bench.suites import RunSpec, Suite
from lrpilot.cli import main

TARGETS = {"iris-softmax": Target("iris-softmax", 0.9, "accuracy"), "digits-softmax": Target("digits-softmax", 0.9, "accuracy")}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    suite = Suite.from_json({
        "name": "tiny", "description": "two tasks, three methods", "seeds": [0, 1], "reference": "sgd",
        "tasks": [{"name": "iris-softmax", "epochs": 8}, {"name": "digits-softmax", "epochs": 4}],
        "methods": ["sgd", {"name": "sgd-step", "options": {"milestones": [0.5]}}, "sgd-cosine", "no-such-method"],
        "claims": [{"claim": "sgd is fine", "source": "nowhere", "check": "the table"}],
    })  # fmt: skip
    plan = suite.resolve()
    run_bench(plan, out, executor=InlineExecutor(), progress=False)
    with Store.open(out) as store:  # one failed run, as a worker would report it
        bad = RunSpec("iris-softmax", "adam", 0, 8, 16, {}, label="adam")
        store.put(bad, Outcome(bad.key, "failed", error="RuntimeError: boom", traceback="Traceback ...boom"))
        plan_keys = [s.key for s in plan.specs] + [bad.key]
        store.begin_invocation("tiny", ["test"], plan_keys, 0, "inline", {"name": "tiny", "reference": "sgd",
                               "description": "two tasks, three methods", "claims": suite.claims})  # fmt: skip
    write_report(out, targets=TARGETS)
    return out


def test_every_image_of_the_report_exists_and_is_a_png(bench_dir):
    page = (bench_dir / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    expected = {"figures/scores.png", "figures/profiles.png", "figures/curves-iris-softmax.png",
                "figures/lr-iris-softmax.png", "figures/curves-digits-softmax.png", "figures/lr-digits-softmax.png"}  # fmt: skip
    assert set(parser.srcs) == expected
    for src in parser.srcs:
        data = (bench_dir / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src
    assert sorted(p.name for p in (bench_dir / "figures").iterdir()) == sorted(Path(s).name for s in expected)


def test_report_holds_leaderboard_targets_skips_failures_and_claims(bench_dir):
    page = (bench_dir / "report.html").read_text()
    for text in ("Leaderboard", "sgd-step[milestones=(0.5)]", "sgd-cosine", "accuracy &gt;= 0.9", "no-such-method",
                 "not registered on this install", "RuntimeError: boom", "Traceback ...boom", "sgd is fine",
                 "Claims this suite replays", "overhead/step"):  # fmt: skip
        assert text in page, text
    leaderboard = page.split("<h2>Leaderboard</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr><td class='l'>(\d+)</td><td class='l'>([^<]+)", leaderboard)
    assert [int(i) for i, _ in rows] == [1, 2, 3, 4]  # one leaderboard row per method, adam (failed) included
    assert "adam" in {label for _, label in rows}


def test_report_cli_prints_the_leaderboard_and_the_path(bench_dir, tmp_path, capsys):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"tasks": {t: {"target": x.value, "metric": x.metric, "higher_is_better": True}
                                             for t, x in TARGETS.items()}}))  # fmt: skip
    assert main(["report", str(bench_dir), "--targets", str(targets)]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard (tiny)" in out and f"report: {bench_dir / 'report.html'}" in out
    assert "iris-softmax: target accuracy >= 0.9" in out


def test_export_cli_writes_csv(bench_dir, tmp_path, capsys):
    assert main(["export", str(bench_dir), "--to", str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "runs.csv").read_text().count("\n") == 1 + 13  # 12 runs + the failed one


def test_report_of_a_folder_without_a_bench_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bench.sqlite here"):
        write_report(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium: apt-get install -y chromium")
def test_every_image_loads_in_headless_chromium(bench_dir, tmp_path):
    """Open a copy of the report (same folder, so the same relative paths) with a script appended that
    writes each image's load state into the DOM, and read the DOM back."""
    page = (bench_dir / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load', () => { const s = [...document.images].map("
        "i => i.getAttribute('src') + '=' + (i.complete && i.naturalWidth > 0 ? 'ok' : 'broken'));"
        "const p = document.createElement('pre'); p.id = 'image-probe'; p.textContent = s.join('\\n');"
        "document.body.appendChild(p); });</script>"
    )
    check = bench_dir / "report-check.html"
    check.write_text(page.replace("</body>", probe + "</body>"))
    try:
        dom = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    finally:
        check.unlink()
    found = re.search(r"<pre id=\"image-probe\">(.*?)</pre>", dom, re.S)
    assert found, dom[-2000:]
    states = dict(line.rsplit("=", 1) for line in found.group(1).strip().splitlines())
    assert len(states) == 6 and set(states.values()) == {"ok"}, states


def test_the_verdict_comes_first(bench_dir):
    page = (bench_dir / "report.html").read_text()
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>Leaderboard</h2>") < page.index("<h2>Per task</h2>")
    verdict = page.split("<h2>Verdict</h2>")[1].split("<h2>")[0]
    # The tiny suite has no autopilot, tuned baseline or peer: each kind says so, on both tasks.
    assert verdict.count("none in this bench") == 6


def test_lr_panels_span_the_runs_optimizer_steps(tmp_path):
    """A per-step LR series holds only the steps where the LR changed (Schedule-Free: its warm-up); the
    panel still runs to the run's last step, like a per-epoch series."""
    from lrpilot.bench.report import _lr_series
    from tests.test_store import ok, record, spec

    per_step, per_epoch = spec(0), spec(1)
    with Store.open(tmp_path) as store:
        store.put(per_step, ok(per_step, record(0, lr_groups=1)))  # step_lr changes at 0 and 5; 24 steps in all
        flat = record(1, lr_groups=1)
        flat["step_lr"] = []
        store.put(per_epoch, ok(per_epoch, flat))
        rows = {r["seed"]: r for r in store.runs()}
        a, b = _lr_series(store, rows[0]), _lr_series(store, rows[1])
    assert a["steps"] == [0, 5, 24] and a["lrs"] == [[0.1], [0.08], [0.08]]
    assert b["steps"] == [0, 8, 16, 24] and [x for (x,) in b["lrs"]] == pytest.approx([0.1, 0.05, 0.1 / 3, 0.1 / 3])
