"""Targets the AlgoPerf way: median over seeds of the best validation metric of the tuned baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lrpilot.bench.calibrate import (
    FALLBACK_METHODS,
    calibrate,
    calibration_plan,
    compute_targets,
    default_targets_path,
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


def test_target_is_the_best_median_over_seeds_of_the_tuned_baselines(tmp_path, fakes):
    plan, fallback = calibration_plan(["iris-softmax"], seeds=[0, 1, 2], methods=["fake-tuned", "adam"])
    assert not fallback and len(plan.specs) == 6
    bests = {"fake-tuned": [0.90, 0.80, 0.95], "adam": [0.85, 0.99, 0.86]}  # medians 0.90 and 0.86
    with Store.open(tmp_path) as store:
        for spec in plan.specs:
            value = bests[spec.label][spec.seed]
            store.put(spec, Outcome(spec.key, "ok", record=_record(spec.task, spec.method, spec.seed, value)))
        targets = compute_targets(store, plan, fallback=False)
    entry = targets["iris-softmax"]
    assert entry["target"] == 0.90 and entry["from"] == "fake-tuned"
    assert entry["methods"]["adam"]["median_best"] == 0.86
    assert entry["methods"]["fake-tuned"]["best_per_seed"] == {"0": 0.90, "1": 0.80, "2": 0.95}
    assert entry["seeds"] == [0, 1, 2] and entry["fallback"] is False and entry["higher_is_better"] is True


def test_lower_is_better_takes_the_lowest_median(tmp_path):
    plan, _ = calibration_plan(["diabetes-linear"], seeds=[0, 1], methods=["sgd", "adam"])
    bests = {"sgd": [50.0, 40.0], "adam": [60.0, 44.0]}  # medians 45 and 52
    with Store.open(tmp_path) as store:
        for spec in plan.specs:
            store.put(spec, Outcome(spec.key, "ok", record=_record(spec.task, spec.method, spec.seed,
                                                                   bests[spec.label][spec.seed], hib=False)))  # fmt: skip
        entry = compute_targets(store, plan, fallback=False)["diabetes-linear"]
    assert entry["target"] == 45.0 and entry["from"] == "sgd" and entry["higher_is_better"] is False


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
    assert entry["target"] == pytest.approx(float(np.median([r["best_val_metric"] for r in runs])))
    assert "AlgoPerf" in written["how"] and "fallback" in written["how"]
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
    for task, entry in data["tasks"].items():
        assert get_task(task).target == entry["target"]
        assert {"metric", "higher_is_better", "from", "seeds", "fallback", "methods"} <= set(entry)
