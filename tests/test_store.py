"""The results store: what goes in comes out, one run per transaction, retries replace, CSV export."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from lrpilot.bench.executors import Outcome
from lrpilot.bench.store import Store
from lrpilot.bench.suites import RunSpec, Skip


def record(seed: int = 0, *, lr_groups: int = 2, search: dict | None = None) -> dict:
    """A hand-made run record (format 1) with a rollback decision and per-step LRs."""
    return {
        "format": 1, "lrpilot_version": "x", "task": "iris-softmax", "method": "sgd", "seed": seed,
        "config": {"epochs": 3, "batch_size": 16, "device": "cpu", "train_subset": None, "method_options": {"lr": 0.1}},
        "metric": {"name": "accuracy", "higher_is_better": True},
        "epochs": [{"epoch": e, "step": 8 * e, "train_loss": 1.0 / e, "val_loss": None if e == 2 else 0.5,
                    "val_metric": 0.3 * e, "lr": [0.1 / e] * lr_groups, "wall_s": 0.2 * e, "train_s": 0.1 * e,
                    "extra": {"train_eval_loss": 0.4}} for e in (1, 2, 3)],
        "decisions": [{"epoch": 2, "step": 16, "lr": [0.05] * lr_groups, "action": "rollback", "reason": "nan-rollback",
                       "info": {"loss": None}},
                      {"epoch": 3, "step": 24, "lr": [0.025] * lr_groups, "action": "set-lr", "reason": "halve", "info": {}}],
        "step_lr": [[0, [0.1] * lr_groups], [5, [0.08] * lr_groups]],
        "summary": {"best_val_metric": 0.9, "final_val_metric": 0.9, "steps": 24, "epochs": 3, "wall_s": 0.6,
                    "train_s": 0.3, "status": "completed", "status_reason": ""},
        "final": {}, "info": {"method": {"search": search}} if search else {},
        "versions": {"python": "3", "torch": "2"},
    }  # fmt: skip


def spec(seed: int = 0, method: str = "sgd") -> RunSpec:
    return RunSpec("iris-softmax", method, seed, 3, 16, {"lr": 0.1}, tags=("baseline",), lrpilot_version="x")


def ok(s: RunSpec, rec: dict) -> Outcome:
    return Outcome(s.key, "ok", record=rec, started_at=100.0, finished_at=103.5, worker={"host": "h", "pid": 1})


def test_a_run_round_trips(tmp_path):
    s = spec()
    with Store.open(tmp_path) as store:
        store.put(s, ok(s, record(search={"total_steps": 40, "total_train_s": 1.5, "total_epochs": 5})), suite="t", invocation=None)
        (row,) = store.runs()
        assert (row["key"], row["label"], row["status"], row["steps"], row["run_s"]) == (s.key, "sgd", "completed", 24, 3.5)
        assert (row["search_steps"], row["search_train_s"], row["search_epochs"]) == (40.0, 1.5, 5.0)
        assert row["tags"] == ["baseline"] and row["worker"]["host"] == "h" and row["versions"]["torch"] == "2"
        assert row["config"]["method_options"] == {"lr": 0.1}
        epochs = store.epochs(s.key)
        assert [e["val_metric"] for e in epochs] == pytest.approx([0.3, 0.6, 0.9])
        assert epochs[1]["val_loss"] is None  # JSON null (a non-finite value) stays missing
        assert json.loads(epochs[0]["extra"]) == {"train_eval_loss": 0.4}
        assert store.epoch_lrs(s.key) == {1: [0.1, 0.1], 2: [0.05, 0.05], 3: pytest.approx([0.1 / 3] * 2)}
        assert store.step_lrs(s.key) == {0: [0.1, 0.1], 5: [0.08, 0.08]}
        decisions = store.decisions(s.key)
        assert [(d["seq"], d["action"], d["reason"], d["lr"]) for d in decisions] == [
            (0, "rollback", "nan-rollback", [0.05, 0.05]), (1, "set-lr", "halve", [0.025, 0.025])]  # fmt: skip
        assert decisions[0]["info"] == {"loss": None}
        assert store.record(s.key)["summary"]["best_val_metric"] == 0.9
        assert store.finished_keys() == {s.key}


def test_failed_runs_are_kept_and_a_retry_replaces_them_without_duplicates(tmp_path):
    s = spec()
    with Store.open(tmp_path) as store:
        store.put(s, Outcome(s.key, "failed", error="RuntimeError: boom", traceback="tb"))
        assert store.finished_keys() == set() and store.finished_keys(include_failed=True) == {s.key}
        assert store.runs()[0]["error"] == "RuntimeError: boom"
        assert store.record(s.key) is None
        store.put(s, ok(s, record()))
        store.put(s, ok(s, record()))  # the same run stored twice: still one of everything
        counts = store.counts()
        assert (counts["runs"], counts["epochs"], counts["lrs"], counts["step_lrs"], counts["decisions"]) == (1, 3, 6, 4, 2)
        assert store.runs()[0]["error"] == ""


def test_a_write_that_fails_half_way_leaves_nothing(tmp_path):
    s = spec()
    bad = record()
    del bad["epochs"][2]["train_s"]  # fails after the runs row is written, while the epochs are
    with Store.open(tmp_path) as store:
        with pytest.raises(KeyError):
            store.put(s, ok(s, bad))
        assert all(n == 0 for t, n in store.counts().items() if t != "invocations")


def test_concurrent_reader_never_sees_half_a_run(tmp_path):
    s = spec()
    with Store.open(tmp_path) as store:
        reader = sqlite3.connect(tmp_path / "bench.sqlite")
        store._db.execute("BEGIN IMMEDIATE")
        store._db.execute("INSERT INTO runs(key, task, method, label, seed, tags, config, lrpilot_version, status) "
                          "VALUES ('k', 't', 'm', 'l', 0, '[]', '{}', 'x', 'completed')")  # fmt: skip
        assert reader.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0  # WAL: the reader sees the last commit
        store._db.execute("ROLLBACK")
        store.put(s, ok(s, record()))
        assert reader.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 3
        reader.close()


def test_invocations_plans_and_skips(tmp_path):
    with Store.open(tmp_path) as store:
        assert store.plan_keys() is None
        first = store.begin_invocation("quick", ["lrpilot", "bench"], ["a", "b"], 2, "local", {"reference": "sgd"})
        store.record_skips([Skip("method", "aalr", "not registered")], "quick", first)
        second = store.begin_invocation("quick", ["lrpilot", "bench"], ["b"], 0, "local")
        store.record_skips([], "quick", second)  # the suite's skips are the latest invocation's
        store.end_invocation(second)
        assert store.plan_keys() == {"b"} and store.plan_keys(first) == {"a", "b"}
        assert store.skips() == []
        inv = store.invocations()
        assert [i["planned"] for i in inv] == [2, 1] and inv[0]["suite_info"] == {"reference": "sgd"}
        assert inv[0]["finished_at"] is None and inv[1]["finished_at"] is not None


def test_csv_export_has_one_file_per_table(tmp_path):
    s = spec()
    with Store.open(tmp_path / "out") as store:
        store.put(s, ok(s, record()))
        paths = store.export_csv(tmp_path / "csv")
    assert sorted(p.name for p in paths) == sorted(f"{t}.csv" for t in (
        "runs", "epochs", "lrs", "step_lrs", "decisions", "skips", "invocations", "plans"))  # fmt: skip
    with (tmp_path / "csv" / "epochs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0]["run_key"] == s.key
    with (tmp_path / "csv" / "runs.csv").open() as f:
        (run,) = list(csv.DictReader(f))
    assert run["label"] == "sgd" and "record" not in run


def test_a_store_of_another_schema_is_refused(tmp_path):
    with Store.open(tmp_path) as store:
        store._db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(ValueError, match="schema version 999"):
        Store.open(tmp_path)


def test_cpu_seconds_are_stored_and_an_older_store_gains_the_column(tmp_path):
    """``train_cpu_s`` (summary) goes to its column; a store made before the column existed is opened,
    gains it (NULL for its runs: no CPU seconds were measured) and takes new runs with it."""
    old = tmp_path / "old"
    with Store.open(old) as store:
        s0 = spec(0)
        store.put(s0, ok(s0, record(0)), suite="t")
    db = sqlite3.connect(old / "bench.sqlite")
    db.execute("ALTER TABLE runs DROP COLUMN train_cpu_s")  # as lrpilot wrote it before
    db.commit()
    db.close()
    with Store.open(old) as store:
        s1 = spec(1)
        rec = record(1)
        rec["summary"]["train_cpu_s"] = 0.25
        store.put(s1, ok(s1, rec), suite="t")
        assert {r["seed"]: r["train_cpu_s"] for r in store.runs()} == {0: None, 1: 0.25}
