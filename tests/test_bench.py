"""The bench end to end: runner, executors, failures, kill -9 and resume, tuned baselines' search cost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrpilot.bench.executors import InlineExecutor, LocalExecutor, execute_run
from lrpilot.bench.leaderboard import Target, leaderboard_from_store
from lrpilot.bench.runner import bench, order_runs, run_bench
from lrpilot.bench.store import Store
from lrpilot.bench.suites import RunSpec, Suite

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "tests.bench_plugin"


@pytest.fixture
def fakes():
    """The fake methods of tests/bench_plugin.py, registered for one test only."""
    import importlib

    plugin = importlib.import_module(PLUGIN)
    plugin.register_fakes()
    yield plugin
    plugin.unregister_fakes()


def plan_of(data: dict, **resolve):
    return Suite.from_json({"name": "t", **data}, source="test").resolve(**resolve)


def test_tuned_baseline_is_charged_its_search_and_scored_free_too(tmp_path, fakes):
    plan = plan_of({"seeds": [0, 1], "tasks": [{"name": "iris-softmax", "epochs": 6}], "methods": ["sgd", "fake-tuned"]})
    result = run_bench(plan, tmp_path, executor=InlineExecutor(), progress=False)
    assert (result.planned, result.ran, result.failed) == (4, 4, [])
    target = Target("iris-softmax", 0.7, "accuracy")
    with Store.open(tmp_path) as store:
        board = leaderboard_from_store(store, {"iris-softmax": target}, keys={s.key for s in plan.specs})
        rows = {(r["label"], r["seed"]): r for r in store.runs()}
        assert rows[("fake-tuned", 0)]["search_steps"] == fakes.FAKE_SEARCH["total_steps"]
        assert rows[("fake-tuned", 0)]["tags"] == ["tuned"]
        # The same method, the same seed: fake-tuned trains exactly like sgd (momentum 0.9, lr 0.1).
        first = {}
        for seed in (0, 1):
            epochs = store.epochs(rows[("fake-tuned", seed)]["key"])
            hit = next(e for e in epochs if e["val_metric"] >= 0.7)
            first[seed] = (hit["step"], hit["train_s"])
    cell = board.cell("fake-tuned", "iris-softmax")
    steps = sorted(s for s, _ in first.values())
    assert cell.times["steps_free"] == pytest.approx(sum(steps) / 2)  # median of two seeds
    assert cell.times["steps"] == pytest.approx(sum(steps) / 2 + 100)  # + the search's total_steps
    secs = sorted(t for _, t in first.values())
    assert cell.times["train_s"] == pytest.approx(sum(secs) / 2 + 5.0)  # + the search's total_train_s
    assert board.tuned == {"fake-tuned"}
    assert board.cell("sgd", "iris-softmax").times["steps"] == pytest.approx(sum(steps) / 2)  # same training as sgd
    assert board.scores["steps"]["sgd"] == pytest.approx(1.0)
    assert board.scores["steps_free"]["fake-tuned"] == pytest.approx(1.0)


def test_local_pool_records_errors_and_crashes_and_goes_on(tmp_path, fakes):
    plan = plan_of({"tasks": [{"name": "iris-softmax", "epochs": 3}], "methods": ["sgd", "fake-raise", "fake-crash"]})
    executor = LocalExecutor(2, imports=[PLUGIN], log_dir=tmp_path / "logs")
    assert executor.threads >= 1
    result = run_bench(plan, tmp_path, executor=executor, progress=False)
    assert result.ran == 3 and len(result.failed) == 2
    with Store.open(tmp_path) as store:
        rows = {r["label"]: r for r in store.runs()}
    assert rows["sgd"]["status"] == "completed" and rows["sgd"]["epochs"] == 3
    assert rows["sgd"]["worker"]["threads"] == executor.threads and rows["sgd"]["worker"]["pid"] != os.getpid()
    assert rows["fake-raise"]["status"] == "failed"
    assert rows["fake-raise"]["error"] == "RuntimeError: this method always fails to build"
    assert "build_raise" in rows["fake-raise"]["traceback"]
    assert rows["fake-crash"]["status"] == "failed"
    assert "died without a result (exit code 3)" in rows["fake-crash"]["error"]
    # Failed runs are kept on a resume unless asked, then run again (and fail again).
    again = run_bench(plan, tmp_path, executor=InlineExecutor(imports=[PLUGIN]), progress=False)
    assert (again.ran, again.kept_failed) == (0, 2)
    again = run_bench(plan_of({"tasks": [{"name": "iris-softmax", "epochs": 3}], "methods": ["fake-raise"]}), tmp_path,
                      executor=InlineExecutor(), progress=False, retry_failed=True)  # fmt: skip
    assert again.ran == 1 and len(again.failed) == 1


def test_a_run_past_its_timeout_is_killed_and_recorded(tmp_path, fakes):
    plan = plan_of({"tasks": [{"name": "iris-softmax", "epochs": 3}], "methods": [{"name": "fake-sleep", "options": {"sleep": 60.0}}]})
    t0 = time.perf_counter()
    result = run_bench(plan, tmp_path, executor=LocalExecutor(1, timeout=1.0, imports=[PLUGIN]), progress=False)
    assert time.perf_counter() - t0 < 30
    assert "TimeoutError: the run took longer than 1 s" in result.failed[0][1]


def test_execute_run_never_raises_for_a_bad_run():
    out = execute_run(RunSpec("iris-softmax", "sgd", 0, 1, 16, {"momentum": -1.0}))
    assert out.status == "failed" and "momentum" in out.error and out.record is None


def test_runs_are_ordered_seed_major():
    specs = plan_of({"seeds": [1, 0], "tasks": ["iris-softmax", "digits-softmax"], "methods": ["sgd", "adam"]}).specs
    order = [(s.seed, s.task, s.label) for s in order_runs(specs)]
    assert order[:4] == [(0, "iris-softmax", "sgd"), (0, "iris-softmax", "adam"), (0, "digits-softmax", "sgd"),
                         (0, "digits-softmax", "adam")]  # fmt: skip
    assert {seed for seed, _, _ in order[4:]} == {1}


def test_bench_resumes_without_rerunning_and_writes_leaderboard_and_report(tmp_path):
    suite = tmp_path / "s.json"
    suite.write_text(json.dumps({"name": "s", "seeds": [0], "tasks": [{"name": "iris-softmax", "epochs": 4}],
                                 "methods": ["sgd", "sgd-step", "no-such-method"]}))  # fmt: skip
    first = bench(suite, tmp_path / "out", executor=InlineExecutor(), progress=False, report=False)
    assert first.result.ran == 2 and first.report is None
    second = bench(suite, tmp_path / "out", executor=InlineExecutor(), progress=False)
    assert (second.result.ran, second.result.reused) == (0, 2)
    assert second.report == tmp_path / "out" / "report.html" and second.report.exists()
    assert second.leaderboard.labels and set(second.leaderboard.labels) == {"sgd", "sgd-step"}
    with Store.open(tmp_path / "out") as store:
        assert [s["name"] for s in store.skips()] == ["no-such-method"]
        assert [i["to_run"] for i in store.invocations()] == [2, 0]


# ----------------------------------------------------------------------------------------------------
# kill -9 and resume, for real: a bench in a subprocess
# ----------------------------------------------------------------------------------------------------
def _cli(out: Path, suite: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrpilot", "bench", "--suite", str(suite), "--out", str(out), "--workers", str(workers),
            "--no-report", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # the schema is being created


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _kill_when(proc: subprocess.Popen, db: Path, *, stored_at_least: int, deadline_s: float = 300) -> list[int]:
    """Wait until ``stored_at_least`` runs are stored, then ``kill -9`` the driver; returns its workers."""
    t0 = time.time()
    while _stored(db) < stored_at_least:
        assert proc.poll() is None, f"the bench ended before it could be killed: {proc.communicate()}"
        assert time.time() - t0 < deadline_s, "the bench made no progress"
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return workers


def _check_complete(out: Path, plan_size: int, epochs: int) -> dict[str, dict]:
    with Store.open(out) as store:
        runs = {r["key"]: r for r in store.runs()}
        counts = store.counts()
        assert len(runs) == plan_size and all(r["status"] == "completed" for r in runs.values())
        assert counts["epochs"] == plan_size * epochs and counts["lrs"] == plan_size * epochs
        for key in runs:
            assert [e["epoch"] for e in store.epochs(key)] == list(range(1, epochs + 1))
        return {key: {"metrics": [e["val_metric"] for e in store.epochs(key)], "invocation": r["invocation"]}
                for key, r in runs.items()}  # fmt: skip


def test_kill_9_then_the_same_command_resumes(tmp_path, fakes):
    epochs = 10
    suite = tmp_path / "s.json"
    # SGD that sleeps 20 ms a step (about 1 s a run): with a reused worker, plain iris runs all end within
    # the kill's 50 ms polling window on a quiet machine, and there is nothing left to resume.
    sgd = {"name": "fake-sleep", "options": {"sleep": 0.02, "lr": 0.1}, "label": "sgd"}
    suite.write_text(json.dumps({"name": "s", "seeds": [0, 1, 2], "tasks": [{"name": "iris-softmax", "epochs": epochs}],
                                 "methods": [sgd]}))  # fmt: skip
    plugin = ("--import", PLUGIN)
    out, db = tmp_path / "out", tmp_path / "out" / "bench.sqlite"
    proc = subprocess.Popen(_cli(out, suite, 1, *plugin), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    workers = _kill_when(proc, db, stored_at_least=1)
    before = _stored(db)
    assert 1 <= before < 3
    t0 = time.time()
    while any(_alive(w) for w in workers):  # the orphaned worker notices and exits
        assert time.time() - t0 < 30, f"worker {workers} outlived its driver"
        time.sleep(0.1)

    done = subprocess.run(_cli(out, suite, 1, *plugin), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"3 runs planned, {before} already in the store, {3 - before} run now" in done.stdout
    assert "Leaderboard (s)" in done.stdout
    runs = _check_complete(out, 3, epochs)
    assert sorted(r["invocation"] for r in runs.values()) == [1] * before + [2] * (3 - before)  # nothing ran twice

    # Resumed results equal an uninterrupted bench's, run by run.
    reference = tmp_path / "ref"
    run_bench(plan_of(json.loads(suite.read_text())), reference, executor=InlineExecutor(), progress=False)
    assert {k: r["metrics"] for k, r in _check_complete(reference, 3, epochs).items()} == {k: r["metrics"] for k, r in runs.items()}


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path, fakes):
    """Kill the driver again and again, at random points (mid-run, mid-write), with two workers.

    Reused workers run these runs in well under a second each, so the plan has 24 of them and the kill
    comes within half a second of a stored run, while the next ones are running or being written."""
    import random

    epochs = 5
    suite = tmp_path / "s.json"
    # Every run sleeps 10 ms a step (about 0.4 s a run), so there is always a run to kill however fast the
    # machine: with reused workers, plain iris runs end before a kill can land on a quiet machine.
    slow = [{"name": "fake-sleep", "options": {"sleep": 0.01, "lr": lr}, "label": f"sleep@{lr}"} for lr in (0.1, 0.05, 0.02)]
    suite.write_text(json.dumps({"name": "s", "seeds": list(range(8)), "tasks": [{"name": "iris-softmax", "epochs": epochs}],
                                 "methods": slow}))  # fmt: skip
    plugin = ("--import", PLUGIN)
    out, db = tmp_path / "out", tmp_path / "out" / "bench.sqlite"
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        # Each round: wait for one more stored run, then kill at a random moment after it (mid-run,
        # or while the next run is being written).
        stored = _stored(db)
        proc = subprocess.Popen(_cli(out, suite, 2, *plugin), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while _stored(db) <= stored and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    done = subprocess.run(_cli(out, suite, 2, *plugin), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = _check_complete(out, 24, epochs)
    with Store.open(out) as store:
        interrupted = [i for i in store.invocations() if i["finished_at"] is None]
    assert kills >= 2 and len(interrupted) >= 2, (kills, interrupted)
    assert len({r["invocation"] for r in runs.values()}) >= 2  # the runs were stored by several invocations
    reference = tmp_path / "ref"
    run_bench(plan_of(json.loads(suite.read_text())), reference, executor=InlineExecutor(), progress=False)
    assert {k: r["metrics"] for k, r in _check_complete(reference, 24, epochs).items()} == {k: r["metrics"] for k, r in runs.items()}


def test_public_names_of_the_bench_package():
    import lrpilot.bench as pkg

    for name in pkg.__all__:
        assert callable(getattr(pkg, name)), name
    assert pkg.bench is bench and pkg.calibrate_targets.__module__ == "lrpilot.bench.calibrate"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_progress_lines_when_not_a_terminal_and_silence_when_asked(tmp_path, capsys):
    plan = plan_of({"seeds": [0, 1], "tasks": [{"name": "iris-softmax", "epochs": 2}], "methods": ["sgd"]})
    run_bench(plan, tmp_path / "a", executor=InlineExecutor(), progress=False)
    assert capsys.readouterr().err == ""
    run_bench(plan, tmp_path / "b", executor=InlineExecutor(), progress=None)  # stderr is captured: not a tty
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[1/2", "[2/2"]
    assert "iris-softmax sgd seed=0: completed, best accuracy" in lines[0]


def test_runs_get_one_thread_whatever_the_number_of_workers():
    """The thread count changes a run's result (float reduction order), so it must not follow --workers."""
    from lrpilot.bench.executors import DEFAULT_THREADS
    from lrpilot.bench.runner import make_executor

    assert DEFAULT_THREADS == 1
    assert LocalExecutor(1).threads == LocalExecutor(2).threads == LocalExecutor(8).threads == 1
    assert make_executor("local", workers=1, threads=3).threads == 3


# ----------------------------------------------------------------------------------------------------
# worker reuse: the results of a fresh process per run
# ----------------------------------------------------------------------------------------------------
def _records(out: Path) -> dict[tuple[str, int], dict]:
    from scripts.compare_stores import store_contents

    return {(r["row"]["label"], r["row"]["seed"]): r for r in store_contents(out).values()}


def test_a_reused_worker_gives_each_run_the_state_a_fresh_process_gives(tmp_path, fakes):
    """One worker runs a method that changes torch's global settings, the environment and the cwd, then
    two runs that record what they find: the same records (bit for bit) as with a fresh process per run."""
    plan = plan_of({"seeds": [0, 1], "tasks": [{"name": "iris-softmax", "epochs": 3}],
                    "methods": ["fake-probe", "fake-leak", "sgd"]})  # fmt: skip
    reused = run_bench(plan, tmp_path / "reused", executor=LocalExecutor(1, imports=[PLUGIN]), progress=False)
    fresh = run_bench(plan, tmp_path / "fresh", executor=LocalExecutor(1, imports=[PLUGIN], isolate=True), progress=False)
    assert (reused.ran, reused.failed, fresh.ran, fresh.failed) == (6, [], 6, [])
    assert fresh.executor == "local (1 workers x 1 threads, a fresh process per run)"
    with Store.open(tmp_path / "reused") as store:
        workers = {(r["label"], r["seed"]): r["worker"] for r in store.runs()}
    with Store.open(tmp_path / "fresh") as store:
        fresh_pids = {r["worker"]["pid"] for r in store.runs()}
    assert len({w["pid"] for w in workers.values()}) == 1 and len(fresh_pids) == 6  # one process against six
    assert sorted(w["runs_in_process"] for w in workers.values()) == [1, 2, 3, 4, 5, 6]
    # Seed-major order: fake-leak ran before the probe and sgd of seed 1 in the same process.
    assert workers[("fake-leak", 0)]["runs_in_process"] < workers[("fake-probe", 1)]["runs_in_process"]
    leaked = _records(tmp_path / "reused")[("fake-leak", 0)]["record"]["info"]["method"]["seen"]
    assert (leaked["dtype"], leaked["env"], leaked["cwd"], leaked["deterministic"]) == ("torch.float64", "1", "/", True)

    a, b = _records(tmp_path / "reused"), _records(tmp_path / "fresh")
    assert a == b  # every run, fake-leak's included: metrics, LRs, decisions, what the probe saw
    seen = a[("fake-probe", 1)]["record"]["info"]["method"]["seen"]
    assert seen["dtype"] == "torch.float32" and seen["env"] is None and seen["threads"] == 1
    assert not seen["deterministic"] and not seen["anomaly"] and not seen["warnings_as_errors"] and seen["cwd"] != "/"


def test_process_state_restores_what_a_run_changed():
    import warnings

    import numpy as np
    import torch

    from lrpilot.bench.executors import kept_process_state

    before = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
              os.getcwd(), list(warnings.filters), float(np.random.random()))  # fmt: skip
    state = np.random.get_state()
    with kept_process_state():
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(before[2] + 1)
        os.environ["LRPILOT_TEST_LEAK"] = "1"
        os.chdir("/")
        warnings.simplefilter("error")
        np.random.seed(5)
    np.random.set_state(state)
    assert "LRPILOT_TEST_LEAK" not in os.environ
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), os.getcwd(),
            list(warnings.filters)) == before[:5]  # fmt: skip


def test_after_a_timeout_or_a_crash_a_fresh_worker_takes_over(tmp_path, fakes):
    plan = plan_of({"seeds": [0], "tasks": [{"name": "iris-softmax", "epochs": 2}],
                    "methods": [{"name": "fake-sleep", "options": {"sleep": 60.0}}, "fake-crash", "sgd", "sgd-step"]})  # fmt: skip
    result = run_bench(plan, tmp_path, executor=LocalExecutor(1, timeout=10.0, imports=[PLUGIN]), progress=False)
    assert [(spec.method, error.split(":")[0]) for spec, error in result.failed] == [("fake-sleep", "TimeoutError"),
                                                                                   ("fake-crash", "WorkerCrashed")]  # fmt: skip
    with Store.open(tmp_path) as store:
        rows = {r["method"]: r for r in store.runs()}
    assert rows["sgd"]["status"] == rows["sgd-step"]["status"] == "completed"
    # Three processes: the one killed at the timeout, the one that crashed, and one that ran both SGDs.
    assert rows["sgd"]["worker"]["pid"] == rows["sgd-step"]["worker"]["pid"] != rows["fake-crash"]["worker"]["pid"]
    assert len({rows[m]["worker"]["pid"] for m in ("fake-sleep", "fake-crash", "sgd")}) == 3
    assert (rows["sgd"]["worker"]["runs_in_process"], rows["sgd-step"]["worker"]["runs_in_process"]) == (1, 2)


def test_make_executor_builds_each_executor_and_isolate_reaches_it():
    from lrpilot.bench.runner import EXECUTORS, make_executor

    assert EXECUTORS == ("local", "ray")
    assert make_executor("local", workers=2).isolate is False
    assert make_executor("local", workers=2, isolate=True).describe() == "local (2 workers x 1 threads, a fresh process per run)"
    with pytest.raises(ValueError, match="address and isolate are for an executor given by name"):
        bench("quick", "unused", executor=InlineExecutor(), isolate=True)


def test_the_executors_module_knows_no_other_executor_and_no_private_name_crosses_bench_modules():
    """The import circle executors <-> ray_executor is gone: ray_executor builds on executors, never the
    reverse, and the bench's modules import only each other's public names."""
    import ast

    bench_dir = REPO / "src" / "lrpilot" / "bench"

    def imports(path: Path) -> list[tuple[str, str]]:
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrpilot"):
                found += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, "") for alias in node.names if alias.name.startswith("lrpilot")]
        return found

    executors = {module for module, _ in imports(bench_dir / "executors.py")}
    assert not executors & {"lrpilot.bench.ray_executor", "lrpilot.bench.runner"}, executors
    private = [(path.name, module, name) for path in bench_dir.rglob("*.py") for module, name in imports(path)
               if module.startswith("lrpilot.bench") and name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert private == [], private
