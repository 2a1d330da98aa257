"""The verdict: per task the best untuned autopilot, tuned baseline and LR-free peer, picked as AlgoPerf
ranks (time to target with the 4x cut), ties by best metric; exact rows on hand-made runs."""

from __future__ import annotations

import math

import pytest

from lrpilot.bench.leaderboard import Target, build_leaderboard
from lrpilot.bench.verdict import verdict_of
from tests.test_scoring import run

TARGETS = {"t1": Target("t1", 0.9, "accuracy"), "t2": Target("t2", 0.8, "accuracy")}
AP, TUNED, PEER = ("seed-method",), ("baseline", "tuned"), ("peer",)


def _runs():
    rs = []
    for seed, best in zip((0, 1, 2), (0.95, 0.96, 0.97)):
        # t1, autopilots: ap-fast reaches at 2 s (epoch 2); ap-x at 9 s and ap-z at 10 s, both beyond 4x the
        # task's fastest (2 s): AlgoPerf counts them as never, so ap-z's better best metric beats ap-x's time.
        rs += [run("t1", "ap-fast", seed, [0.5, best, best], tags=AP),
               run("t1", "ap-x", seed, [0.5] * 8 + [0.91], tags=AP),
               run("t1", "ap-z", seed, [0.5] * 9 + [0.97], tags=AP),
               # tuned: a reaches at 1 s + 4 s of search, b at 2 s + 2 s: charged b (4 s) beats a (5 s).
               run("t1", "tuned-a", seed, [0.95], search=(40, 4.0), tuned=True, tags=TUNED),
               run("t1", "tuned-b", seed, [0.5, 0.95], search=(20, 2.0), tuned=True, tags=TUNED),
               run("t1", "sgd", seed, [0.5, 0.5, 0.95], tags=("baseline", "main-baseline")),
               # t2: nobody of these kinds reaches 0.8: the best metric decides; ties of that go by name.
               run("t2", "ap-fast", seed, [0.5, 0.6], tags=AP), run("t2", "ap-z", seed, [0.7], tags=AP),
               run("t2", "peer-b", seed, [0.75], tags=PEER), run("t2", "peer-a", seed, [0.75], tags=PEER),
               run("t2", "tuned-a", seed, [0.79], search=(40, 4.0), tuned=True, tags=TUNED),
               run("t2", "sgd", seed, [0.85], tags=("baseline", "main-baseline"))]  # fmt: skip
    return rs


def test_best_of_each_kind_per_task():
    board = build_leaderboard(_runs(), TARGETS)
    verdict = verdict_of(board)
    ap = verdict.row("t1", "autopilot")
    assert (ap.label, ap.secs, ap.steps, ap.reached, ap.seeds, ap.candidates) == ("ap-fast", 2.0, 20.0, 3, 3, 3)
    assert ap.best == pytest.approx(0.96) and ap.best_range == pytest.approx((0.95, 0.97))
    tuned = verdict.row("t1", "tuned")
    assert (tuned.label, tuned.secs, tuned.secs_free, tuned.steps, tuned.steps_free) == ("tuned-b", 4.0, 2.0, 40.0, 20.0)
    assert verdict.row("t1", "peer") is None and verdict.missing["t1"] == ["peer"]
    # t2: the best metric decides (0.7 beats 0.6), then the name (peer-a before peer-b at 0.75).
    assert verdict.row("t2", "autopilot").label == "ap-z"
    assert math.isinf(verdict.row("t2", "autopilot").secs)
    assert verdict.row("t2", "peer").label == "peer-a"
    assert verdict.row("t2", "tuned").label == "tuned-a"
    assert "t2" not in verdict.missing


def test_the_4x_cut_makes_slow_reachers_tie_with_never():
    slow = [r for r in _runs() if r.label in ("ap-x", "ap-z")]  # t1: 9 s (best 0.91) and 10 s (best 0.97)
    assert verdict_of(build_leaderboard(slow, TARGETS)).row("t1", "autopilot").label == "ap-x"  # faster, both within 4x
    # A baseline reaching the target in 1 s puts both beyond 4 s: AlgoPerf counts both as never, and the
    # better best metric wins; the row still shows the measured median time.
    fast_other = [run("t1", "adam", seed, [0.95], tags=("baseline",)) for seed in (0, 1, 2)]
    row = verdict_of(build_leaderboard(slow + fast_other, TARGETS)).row("t1", "autopilot")
    assert (row.label, row.secs, row.reached) == ("ap-z", 10.0, 3)


def test_verdict_text_then_the_score_table():
    text = verdict_of(build_leaderboard(_runs(), TARGETS)).to_text()
    lines = text.splitlines()
    t1 = lines.index("t1: target accuracy >= 0.9")
    assert lines[t1 + 2].split() == ["untuned", "autopilot", "ap-fast", "0.9600", "[0.9500-0.9700]", "3/3", "2.00", "20"]
    assert lines[t1 + 3].split() == ["tuned", "baseline", "tuned-b", "0.9500", "3/3", "4.00", "40", "2.00,", "20"]
    assert lines[t1 + 4].split() == ["LR-free", "peer", "(none", "in", "this", "bench)"]
    t2 = lines.index("t2: target accuracy >= 0.8")
    assert lines[t2 + 2].split() == ["untuned", "autopilot", "ap-z", "0.7000", "0/3", "-", "-"]
    score = lines.index("Benchmark score (every scored task; * = tuned baselines' search free):")
    assert score > t2 and lines[score + 1].split()[:3] == ["#", "method", "score"]
    assert lines[score + 3].split()[:2] == ["1", "sgd"]


def test_auto_gets_its_own_row_only_when_it_ran():
    runs = _runs()
    assert all(r.role != "auto" for rows in verdict_of(build_leaderboard(runs, TARGETS)).rows.values() for r in rows)
    auto = [run("t1", "auto", seed, [0.5, 0.5, 0.5, 0.95], tags=("auto",)) for seed in (0, 1, 2)]
    verdict = verdict_of(build_leaderboard(runs + auto, TARGETS))
    row = verdict.row("t1", "auto")
    assert (row.label, row.secs, row.reached) == ("auto", 4.0, 3)
    assert verdict.rows["t1"][0].role == "auto"  # first: what the user reads first
    assert "auto" not in verdict.missing.get("t2", [])  # no auto run on t2: no row, and not "missing"
    text = verdict.to_text().splitlines()
    assert text[text.index("t1: target accuracy >= 0.9") + 2].split()[:3] == ["lrpilot", "auto", "auto"]
