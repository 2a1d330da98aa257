"""AlgoPerf scoring rules on hand-made tables and hand-made run records, with values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrpilot.bench.leaderboard import RunResult, Target, build_leaderboard
from lrpilot.bench.scoring import (
    benchmark_scores,
    cut_slow,
    median_time,
    performance_profiles,
    performance_ratios,
    taus,
    time_to_target,
)

INF = math.inf


# ----------------------------------------------------------------------------------------------------
# rule by rule
# ----------------------------------------------------------------------------------------------------
def test_time_to_target_is_the_first_evaluation_reaching_it():
    values = [0.5, 0.8, 0.7, 0.9, 0.95]
    times = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert time_to_target(values, times, 0.8, higher_is_better=True) == 2.0  # >= counts, later ones ignored
    assert time_to_target(values, times, 0.91, higher_is_better=True) == 5.0
    assert time_to_target(values, times, 0.99, higher_is_better=True) == INF
    losses = [3.0, 2.0, float("nan"), 0.5, None]
    assert time_to_target(losses, times, 0.5, higher_is_better=False) == 4.0  # <= for loss-like metrics
    assert time_to_target(losses, times, 0.1, higher_is_better=False) == INF  # NaN / None never reach
    with pytest.raises(ValueError, match="same length"):
        time_to_target([1.0], [1.0, 2.0], 0.5, higher_is_better=True)


def test_median_follows_numpy_with_infinities():
    assert median_time([3.0, 1.0, 2.0]) == 2.0
    assert median_time([1.0, 3.0]) == 2.0  # mean of the middle two
    assert median_time([1.0, 2.0, INF]) == 2.0  # one seed never reaching does not sink a method
    assert median_time([1.0, INF]) == INF  # ... but half of them does
    assert median_time([]) == INF
    with pytest.raises(ValueError, match="NaN"):
        median_time([1.0, float("nan")])


def test_cut_slow_drops_times_beyond_r_max_of_the_fastest():
    times = {"a": {"t": 10.0}, "b": {"t": 40.0}, "c": {"t": 40.001}, "d": {}}
    cut = cut_slow(times, 4.0)
    assert cut == {"a": {"t": 10.0}, "b": {"t": 40.0}, "c": {"t": INF}, "d": {"t": INF}}  # missing task = never
    with pytest.raises(ValueError, match="r_max"):
        cut_slow(times, 1.0)


def test_ratios_with_ties_and_an_unsolved_task():
    times = {"a": {"t1": 5.0, "t2": INF}, "b": {"t1": 5.0, "t2": INF}, "c": {"t1": 10.0, "t2": INF}}
    r = performance_ratios(times)
    assert r["a"]["t1"] == r["b"]["t1"] == 1.0  # a tie: both are fastest
    assert r["c"]["t1"] == 2.0
    assert all(r[s]["t2"] == INF for s in "abc")  # nobody reached t2: nobody gets credit for it


def test_profile_is_the_fraction_of_tasks_within_tau():
    times = {"a": {"t1": 1.0, "t2": 1.0}, "b": {"t1": 2.0, "t2": 3.0}}
    grid, rho = performance_profiles(times, num_points=7)  # tau = 1, 1.5, ..., 4
    np.testing.assert_allclose(grid, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(rho["a"], [1.0] * 7)
    np.testing.assert_allclose(rho["b"], [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0])


def test_score_of_a_method_fastest_everywhere_is_one_and_of_a_method_never_there_zero():
    times = {
        "fast": {"t1": 1.0, "t2": 10.0, "t3": 100.0},
        "slow": {"t1": 2.0, "t2": 20.0, "t3": 200.0},
        "never": {"t1": INF, "t2": INF, "t3": INF},
        "too-slow": {"t1": 4.5, "t2": 45.0, "t3": 450.0},
    }
    s = benchmark_scores(times)
    assert s["fast"] == pytest.approx(1.0, abs=1e-12)
    assert s["never"] == 0.0
    assert s["too-slow"] == 0.0  # every time beyond 4x the fastest
    # slow: ratio 2 on every task, rho = 1 from tau >= 2 on: area (4 - 2) / 3, less the grid's
    # trapezoid at the step (the step falls between two of the 100 points).
    t = taus()
    first = np.searchsorted(t, 2.0)
    expected = (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)((t >= 2.0).astype(float), t) / 3
    assert s["slow"] == pytest.approx(expected, abs=1e-12)
    assert s["slow"] == pytest.approx((4 - t[first]) / 3 + 0.5 * (t[first] - t[first - 1]) / 3, abs=1e-12)


def test_ties_give_equal_scores():
    times = {"a": {"t1": 3.0, "t2": 6.0}, "b": {"t1": 3.0, "t2": 6.0}, "c": {"t1": 4.0, "t2": 5.0}}
    s = benchmark_scores(times)
    assert s["a"] == s["b"]
    assert s["a"] < 1.0 and s["c"] < 1.0  # each fastest on one task only


def test_docstring_example_value_by_hand():
    # b: t1 ratio 2 (counts for tau >= 2), t2 never: rho = 0.5 from tau = 2 on -> about (4 - 2) / 3 * 0.5.
    s = benchmark_scores({"a": {"t1": 10.0, "t2": 20.0}, "b": {"t1": 20.0, "t2": INF}})
    assert s["a"] == pytest.approx(1.0)
    assert s["b"] == pytest.approx(1 / 3, abs=0.01)


# ----------------------------------------------------------------------------------------------------
# the bench's leaderboard on hand-made runs
# ----------------------------------------------------------------------------------------------------
def run(task, label, seed, metrics, *, secs_per_epoch=1.0, steps_per_epoch=10, search=(0, 0.0), tuned=False,
        status="completed", cpu_per_epoch="secs", tags=()) -> RunResult:  # fmt: skip
    """A hand-made run; its CPU seconds equal its wall seconds unless ``cpu_per_epoch`` says (None: none)."""
    evals = tuple(((i + 1) * steps_per_epoch, (i + 1) * secs_per_epoch, m) for i, m in enumerate(metrics))
    finite = [m for m in metrics if m is not None and math.isfinite(m)]
    cpu = secs_per_epoch if cpu_per_epoch == "secs" else cpu_per_epoch
    return RunResult(task, label, seed, status, evals, best=max(finite, default=None), final=metrics[-1],
                     steps=len(metrics) * steps_per_epoch, train_s=len(metrics) * secs_per_epoch,
                     search_steps=search[0], search_train_s=search[1], tuned=tuned, higher_is_better=True,
                     train_cpu_s=None if cpu is None else len(metrics) * cpu, tags=frozenset(tags))  # fmt: skip


TARGETS = {"t1": Target("t1", 0.9, "accuracy"), "t2": Target("t2", 0.8, "accuracy")}


def test_targets_never_reached_score_zero_and_show_as_inf():
    results = [run("t1", "sgd", 0, [0.5, 0.9]), run("t1", "bad", 0, [0.1, 0.2]),
               run("t2", "sgd", 0, [0.8, 0.8]), run("t2", "bad", 0, [0.3, 0.4])]  # fmt: skip
    board = build_leaderboard(results, TARGETS)
    assert board.labels == ["sgd", "bad"]
    assert board.scores["train_s"] == {"sgd": pytest.approx(1.0), "bad": 0.0}
    assert board.cell("bad", "t1").times["train_s"] == INF
    assert board.cell("sgd", "t1").times == {"train_s": 2.0, "steps": 20.0, "train_s_free": 2.0, "steps_free": 20.0}
    assert board.cell("sgd", "t2").times["steps"] == 10.0
    text = board.to_text()
    assert "bad" in text and "-" in text


def test_a_method_faster_than_all_others_on_every_task_scores_one():
    results = []
    for task in ("t1", "t2"):
        for seed in (0, 1, 2):
            results += [run(task, "fast", seed, [0.95, 0.95]), run(task, "mid", seed, [0.5, 0.95]),
                        run(task, "slowest", seed, [0.1, 0.2, 0.5, 0.95])]  # fmt: skip
    board = build_leaderboard(results, TARGETS)
    assert board.labels == ["fast", "mid", "slowest"]
    assert board.scores["train_s"]["fast"] == pytest.approx(1.0)
    assert board.scores["steps"]["fast"] == pytest.approx(1.0)
    assert board.scores["train_s"]["fast"] > board.scores["train_s"]["mid"] > board.scores["train_s"]["slowest"] > 0
    assert board.cell("slowest", "t1").times["steps"] == 40.0  # exactly 4x: still counts (<= r_max)
    assert board.cell("fast", "t1").seeds == [0, 1, 2]


def test_median_over_seeds_and_failed_runs_count_as_never():
    results = [run("t1", "m", 0, [0.9]), run("t1", "m", 1, [0.1, 0.9]), RunResult.failed("t1", "m", 2),
               run("t1", "other", 0, [0.1, 0.1, 0.9])]  # fmt: skip
    board = build_leaderboard(results, {"t1": TARGETS["t1"]})
    cell = board.cell("m", "t1")
    assert cell.times["train_s"] == 2.0  # median of (1, 2, inf)
    assert (cell.failed, cell.reached, cell.seeds) == (1, 2, [0, 1, 2])
    assert cell.best == pytest.approx(0.9)


def test_ties_between_methods_share_the_rank_score():
    results = [run("t1", "a", 0, [0.95]), run("t1", "b", 0, [0.95]), run("t1", "c", 0, [0.5, 0.95])]
    board = build_leaderboard(results, {"t1": TARGETS["t1"]})
    assert board.scores["train_s"]["a"] == board.scores["train_s"]["b"] == pytest.approx(1.0)
    assert board.labels[:2] == ["a", "b"]  # ties broken by name, for a stable table


def test_tuned_baselines_are_scored_with_and_without_their_search():
    results = [run("t1", "sgd", 0, [0.5, 0.5, 0.95]),  # 3 s, 30 steps
               run("t1", "tuned", 0, [0.95], search=(50, 4.0), tuned=True),  # 1 s + 4 s, 10 + 50 steps
               run("t1", "self", 0, [0.95], search=(50, 4.0))]  # searches, but is not a tuned baseline  # fmt: skip
    board = build_leaderboard(results, {"t1": TARGETS["t1"]})
    tuned = board.cell("tuned", "t1").times
    assert tuned == {"train_s": 5.0, "steps": 60.0, "train_s_free": 1.0, "steps_free": 10.0}
    assert board.cell("self", "t1").times["train_s_free"] == 5.0  # a method's own search is always charged
    assert board.tuned == {"tuned"}
    assert board.scores["train_s"]["sgd"] == pytest.approx(1.0)  # 3 s beats 5 s when tuning is charged
    assert board.scores["train_s_free"]["tuned"] == pytest.approx(1.0)  # ... and loses when it is free
    assert board.scores["train_s_free"]["sgd"] < 1.0
    assert "(tuned)" in board.to_text()


def test_overhead_per_step_against_the_reference():
    results = [run("t1", "sgd", 0, [0.95] * 4, secs_per_epoch=1.0), run("t1", "heavy", 0, [0.95] * 4, secs_per_epoch=3.0),
               run("t2", "sgd", 0, [0.95] * 4, secs_per_epoch=2.0), run("t2", "heavy", 0, [0.95] * 4, secs_per_epoch=2.0 * 1.5)]  # fmt: skip
    board = build_leaderboard(results, TARGETS, reference="sgd")
    assert board.cell("heavy", "t1").overhead == pytest.approx(3.0)
    assert board.cell("heavy", "t2").overhead == pytest.approx(1.5)
    assert board.overhead["heavy"] == pytest.approx(math.sqrt(3.0 * 1.5))  # geometric mean
    assert board.overhead["sgd"] == pytest.approx(1.0)
    assert build_leaderboard(results, TARGETS, reference="absent").overhead["heavy"] is None


def test_overhead_is_cpu_seconds_so_a_busy_machine_cannot_make_more_work_look_cheaper():
    """SGD's runs shared the CPU (2 s of wall per epoch for 1 s of CPU), 'heavy' ran alone (1 s of wall
    for 1.1-1.5 s of CPU): wall seconds say heavy costs 0.5x-0.75x SGD, CPU seconds 1.1x-1.5x."""
    results = []
    for seed, heavy_cpu in zip((0, 1, 2), (1.1, 1.2, 1.5)):
        results += [run("t1", "sgd", seed, [0.95] * 4, secs_per_epoch=2.0, cpu_per_epoch=1.0),
                    run("t1", "heavy", seed, [0.95] * 4, secs_per_epoch=1.0 + 0.5 * (seed == 2), cpu_per_epoch=heavy_cpu),
                    run("t2", "sgd", seed, [0.95] * 4, secs_per_epoch=2.0, cpu_per_epoch=0.5),
                    run("t2", "heavy", seed, [0.95] * 4, secs_per_epoch=1.0, cpu_per_epoch=1.0)]  # fmt: skip
    board = build_leaderboard(results, TARGETS, reference="sgd")
    heavy = board.cell("heavy", "t1")
    assert heavy.s_per_step == pytest.approx(0.1) and heavy.cpu_per_step == pytest.approx(0.12)
    assert heavy.overhead == pytest.approx(1.2)  # median of 1.1, 1.2, 1.5
    assert heavy.overhead_range == pytest.approx((1.1, 1.5))
    assert board.cell("heavy", "t2").overhead == pytest.approx(2.0)
    assert board.overhead["heavy"] == pytest.approx(math.sqrt(1.2 * 2.0))
    assert board.overhead_range["heavy"] == pytest.approx((1.1, 2.0))
    assert board.overhead["sgd"] == pytest.approx(1.0) and board.overhead_range["sgd"] == (1.0, 1.0)
    text = board.to_text()
    assert "1.55x [1.10-2.00]" in text  # the leaderboard: geometric mean [min-max over tasks and seeds]
    assert "1.20x [1.10-1.50]" in text  # heavy on t1
    assert "overhead (CPU)" in text


def test_no_cpu_seconds_no_overhead_ratio():
    """Runs from before CPU seconds were recorded: no ratio at all, rather than one from wall seconds."""
    results = [run("t1", "sgd", 0, [0.95] * 4, cpu_per_epoch=None), run("t1", "heavy", 0, [0.95] * 4, secs_per_epoch=3.0)]
    board = build_leaderboard(results, {"t1": TARGETS["t1"]}, reference="sgd")
    assert board.cell("heavy", "t1").overhead is None and board.overhead["heavy"] is None
    assert board.overhead_range["heavy"] is None
    assert "x" not in board.to_text().split("heavy")[1].splitlines()[0]  # an empty overhead cell


def test_task_without_target_is_shown_but_not_scored():
    results = [run("t1", "a", 0, [0.95]), run("nope", "a", 0, [0.5])]
    board = build_leaderboard(results, {"t1": TARGETS["t1"]})
    assert board.tasks == ["t1"] and "nope" in board.unscored
    assert board.scores["train_s"]["a"] == pytest.approx(1.0)
    assert "not scored: nope" in board.to_text()


def test_loss_like_targets_are_reached_from_above():
    results = [RunResult("r", "m", 0, "completed", ((10, 1.0, 50.0), (20, 2.0, 40.0)), higher_is_better=False)]
    board = build_leaderboard(results, {"r": Target("r", 45.0, "mae", higher_is_better=False)})
    assert board.cell("m", "r").times["steps"] == 20.0


def test_from_record_reads_the_run_record_contract():
    record = {
        "task": "t1", "method": "fake-tuned", "seed": 3, "metric": {"name": "accuracy", "higher_is_better": True},
        "epochs": [{"epoch": 1, "step": 5, "train_s": 0.5, "val_metric": 0.5}, {"epoch": 2, "step": 10, "train_s": 1.0, "val_metric": 0.92}],
        "summary": {"best_val_metric": 0.92, "final_val_metric": 0.92, "steps": 10, "train_s": 1.0, "status": "completed"},
        "info": {"method": {"search": {"grid": [0.1, 1.0], "chosen": 0.1, "runs": 2, "total_epochs": 4, "total_steps": 20,
                                       "total_train_s": 2.5}}},
    }  # fmt: skip
    r = RunResult.from_record(record, tags=["tuned", "baseline"])
    assert (r.label, r.seed, r.tuned, r.search_steps, r.search_train_s) == ("fake-tuned", 3, True, 20.0, 2.5)
    assert r.time_to(TARGETS["t1"]) == (10.0, 1.0)


def test_equal_scores_are_ordered_by_how_close_each_best_metric_came():
    """Nobody reaches the target: every score is 0, and the table orders the methods by the mean rank of
    their best metric over the tasks (loss-like metrics ranked from below), names only breaking exact ties."""
    targets = {"t1": TARGETS["t1"], "loss": Target("loss", 1.0, "mae", higher_is_better=False)}
    def loss_run(label: str, mae: float) -> RunResult:
        return RunResult("loss", label, 0, "completed", ((10, 1.0, mae),), best=mae, final=mae, higher_is_better=False)

    results = [run("t1", "a", 0, [0.5]), run("t1", "b", 0, [0.8]), run("t1", "c", 0, [0.7]),
               loss_run("a", 5.0), loss_run("b", 3.0), loss_run("c", 2.0)]  # fmt: skip
    board = build_leaderboard(results, targets)
    assert all(board.scores["train_s"][lb] == 0.0 for lb in "abc")
    assert board.best_rank == {"a": 3.0, "b": 1.5, "c": 1.5}
    assert board.labels == ["b", "c", "a"]
    assert "rank(best)" in board.to_text() and board.to_dict()["ranking"][0]["best_rank"] == 1.5
