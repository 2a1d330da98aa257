"""Reachable targets: per tuned baseline, its worst seed's best validation metric (or another quantile, the
median being AlgoPerf's rule); the target is the best of these over the tuned baselines."""

from __future__ import annotations

import json

import pytest

from lrpilot.bench.calibrate import (
    DEFAULT_QUANTILE,
    FALLBACK_METHODS,
    calibrate,
    calibration_plan,
    compute_targets,
    default_targets_path,
    recompute_targets,
    target_from_bests,
)
from lrpilot.bench.executors import InlineExecutor, Outcome
from lrpilot.bench.leaderboard import load_targets
from lrpilot.bench.store import Store
from lrpilot.bench.tasks import get_task


@pytest.fixture
def fakes():
    import importlib

    plugin = importlib.import_module("tests.bench_plugin")
    plugin.register_fakes()
    yield plugin
    plugin.unregister_fakes()


def _record(task: str, method: str, seed: int, best: float, hib: bool = True) -> dict:
    return {"task": task, "method": method, "seed": seed, "metric": {"name": "m", "higher_is_better": hib},
            "epochs": [{"epoch": 1, "step": 1, "val_metric": best, "lr": [0.1], "wall_s": 1.0, "train_s": 1.0}],
            "decisions": [], "summary": {"best_val_metric": best, "steps": 1, "epochs": 1, "status": "completed"}}  # fmt: skip


def _stored_targets(tmp_path, task: str, bests: dict[str, list[float]], hib: bool = True, **kw) -> dict:
    plan, _ = calibration_plan([task], seeds=list(range(len(next(iter(bests.values()))))), methods=list(bests))
    with Store.open(tmp_path) as store:
        for spec in plan.specs:
            record = _record(spec.task, spec.method, spec.seed, bests[spec.label][spec.seed], hib=hib)
            store.put(spec, Outcome(spec.key, "ok", record=record))
        return compute_targets(store, plan, fallback=False, **kw)[task]


def test_target_is_the_best_over_tuned_baselines_of_their_worst_seed(tmp_path, fakes):
    """The default rule: each method's worst seed's best (0.80, 0.85); the target is the better, 0.85,
    which its method reaches in every seed and the other in the two seeds at or above it."""
    assert DEFAULT_QUANTILE == 0.0
    entry = _stored_targets(tmp_path, "iris-softmax", {"fake-tuned": [0.90, 0.80, 0.95], "adam": [0.85, 0.99, 0.86]})
    assert entry["target"] == 0.85 and entry["from"] == "adam" and entry["quantile"] == 0.0
    assert entry["methods"]["adam"] == {"median_best": 0.86, "quantile_best": 0.85, "seeds_reaching": 3,
                                        "best_per_seed": {"0": 0.85, "1": 0.99, "2": 0.86}}  # fmt: skip
    assert entry["methods"]["fake-tuned"]["seeds_reaching"] == 2 and entry["methods"]["fake-tuned"]["median_best"] == 0.90
    assert entry["seeds"] == [0, 1, 2] and entry["fallback"] is False and entry["higher_is_better"] is True


def test_quantile_one_half_is_algoperfs_median_rule(tmp_path, fakes):
    entry = _stored_targets(tmp_path, "iris-softmax", {"fake-tuned": [0.90, 0.80, 0.95], "adam": [0.85, 0.99, 0.86]},
                            quantile=0.5)  # fmt: skip
    assert entry["target"] == 0.90 and entry["from"] == "fake-tuned"  # medians 0.90 and 0.86
    assert entry["methods"]["fake-tuned"]["seeds_reaching"] == 2 and entry["methods"]["adam"]["seeds_reaching"] == 1


def test_lower_is_better_counts_the_worst_seed_from_above(tmp_path):
    bests = {"sgd": [50.0, 40.0], "adam": [60.0, 44.0]}
    entry = _stored_targets(tmp_path / "q0", "diabetes-linear", bests, hib=False)
    assert entry["target"] == 50.0 and entry["from"] == "sgd" and entry["higher_is_better"] is False
    assert entry["methods"]["sgd"]["seeds_reaching"] == 2 and entry["methods"]["adam"]["seeds_reaching"] == 1
    median = _stored_targets(tmp_path / "q5", "diabetes-linear", bests, hib=False, quantile=0.5)
    assert median["target"] == 45.0 and median["from"] == "sgd"  # medians 45 and 52


def test_target_from_bests_checks_its_input():
    assert target_from_bests({"a": [0.7, 0.9], "b": [0.8, 0.8]}, higher_is_better=True) == (0.8, "b")
    assert target_from_bests({"a": [0.7, 0.9]}, higher_is_better=True, quantile=1.0) == (0.9, "a")
    with pytest.raises(ValueError, match=r"quantile must be within \[0, 1\], got 1.5"):
        target_from_bests({"a": [0.7]}, higher_is_better=True, quantile=1.5)
    with pytest.raises(ValueError, match="no method has a finished run"):
        target_from_bests({"a": []}, higher_is_better=True)


def test_recompute_applies_the_rule_to_the_recorded_bests_without_running(tmp_path):
    path = tmp_path / "targets.json"
    entry = {"target": 0.9, "metric": "accuracy", "higher_is_better": True, "from": "a", "seeds": [0, 1, 2], "fallback": False,
             "calibrated_at": "2026-11-28", "methods": {"a": {"median_best": 0.9, "best_per_seed": {"0": 0.95, "1": 0.9, "2": 0.7}},
                                                        "b": {"median_best": 0.8, "best_per_seed": {"0": 0.8, "1": 0.8, "2": 0.81}}}}  # fmt: skip
    path.write_text(json.dumps({"format": 1, "how": "old", "tasks": {"t1": entry, "t2": dict(entry)}}))
    data = recompute_targets(path, tasks=["t1"])
    t1, t2 = data["tasks"]["t1"], data["tasks"]["t2"]
    assert (t1["target"], t1["from"], t1["quantile"], t1["calibrated_at"]) == (0.8, "b", 0.0, "2026-11-28")
    assert t1["methods"]["a"]["seeds_reaching"] == 2 and t1["methods"]["b"]["seeds_reaching"] == 3
    assert t2["target"] == 0.9 and "quantile" not in t2  # not asked: left as it was, and the file says so
    assert "different quantiles" in data["warning"]
    assert load_targets(path)["t1"].value == 0.8


def test_calibrate_cli_recompute_and_bad_quantile(tmp_path, capsys):
    from lrpilot.cli import main

    path = tmp_path / "targets.json"
    path.write_text(default_targets_path().read_text())
    assert main(["calibrate", "--recompute", "--quantile", "0.5", "--out", str(path), "--tasks", "digits-mlp"]) == 0
    entry = json.loads(path.read_text())["tasks"]["digits-mlp"]
    assert entry["quantile"] == 0.5
    assert entry["target"] == max(e["median_best"] for e in entry["methods"].values())
    assert "seeds reaching it:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="quantile must be within"):
        calibrate(tasks=["iris-softmax"], quantile=-0.1, store_dir=tmp_path / "s", targets_path=path)


def _no_tuned_methods(monkeypatch):
    import lrpilot.core.registry as registry

    real = registry.list_methods
    monkeypatch.setattr(registry, "list_methods", lambda *a, tags=(), **k: [] if "tuned" in tags else real(*a, tags=tags, **k))


def test_with_tuned_methods_calibration_uses_them(tmp_path):
    plan, fallback = calibration_plan(["iris-softmax"], seeds=[0])
    assert not fallback and set(plan.labels) == {"sgd-cosine-tuned", "adam-cosine-tuned"}


def test_without_tuned_methods_calibration_falls_back_and_says_so(tmp_path, monkeypatch):
    _no_tuned_methods(monkeypatch)
    plan, fallback = calibration_plan(["iris-softmax"], seeds=[0])
    assert fallback and plan.labels == list(FALLBACK_METHODS)


def test_calibrate_runs_writes_the_file_and_the_task_reads_it(tmp_path, monkeypatch):
    _no_tuned_methods(monkeypatch)  # the fallback methods are cheaper to run here than a grid search
    out = tmp_path / "targets.json"
    out.write_text(json.dumps({"format": 1, "tasks": {"other-task": {"target": 0.5}}}))
    data = calibrate(tasks=["iris-softmax"], seeds=[0, 1, 2], store_dir=tmp_path / "store", targets_path=out,
                     executor=InlineExecutor(), progress=False)  # fmt: skip
    written = json.loads(out.read_text())
    assert written == data and "other-task" in written["tasks"]  # tasks not recalibrated are kept
    entry = written["tasks"]["iris-softmax"]
    assert entry["fallback"] is True and entry["from"] in FALLBACK_METHODS and entry["epochs"] == get_task("iris-softmax").epochs
    with Store.open(tmp_path / "store") as store:
        runs = [r for r in store.runs() if r["label"] == entry["from"]]
    assert entry["target"] == min(r["best_val_metric"] for r in runs)  # the worst seed's best of the chosen method
    assert entry["methods"][entry["from"]]["seeds_reaching"] == 3
    assert "AlgoPerf" in written["how"] and "fallback" in written["how"] and "worst" in written["how"]
    assert written["status"].startswith("FALLBACK for iris-softmax")
    assert load_targets(out)["iris-softmax"].value == entry["target"]
    # Calibrating again reuses the stored runs: nothing trains twice.
    calibrate(tasks=["iris-softmax"], seeds=[0, 1, 2], store_dir=tmp_path / "store", targets_path=out,
              executor=InlineExecutor(), progress=False)  # fmt: skip
    with Store.open(tmp_path / "store") as store:
        assert [i["to_run"] for i in store.invocations()] == [6, 0]


def test_shipped_targets_say_how_they_were_set():
    data = json.loads(default_targets_path().read_text())
    assert "AlgoPerf" in data["how"]
    if any(e["fallback"] for e in data["tasks"].values()):
        assert data["status"].startswith("FALLBACK")
    assert "warning" not in data  # one rule for every task
    for task, entry in data["tasks"].items():
        assert get_task(task).target == entry["target"]
        assert {"metric", "higher_is_better", "from", "seeds", "fallback", "methods", "quantile"} <= set(entry)
        # The rule's promise: the method that sets a target reaches it in every calibration seed.
        assert entry["quantile"] == 0.0 and entry["methods"][entry["from"]]["seeds_reaching"] == len(entry["seeds"]), task
