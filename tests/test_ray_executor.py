"""The bench on Ray (``RayExecutor``): same records as the local pool, failures recorded, interrupt and resume.

Every test that needs Ray shares one local Ray instance (2 CPUs, no dashboard, usage statistics off),
started once for the module and shut down at its end, where the test checks that no Ray process is left.
Skipped when Ray is not installed (it is the optional extra ``lrpilot[ray]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scripts.compare_stores import store_contents as _contents  # everything stored per run, timings aside

from lrpilot.bench.executors import Executor, LocalExecutor
from lrpilot.bench.runner import make_executor, run_bench
from lrpilot.bench.store import Store
from lrpilot.bench.suites import RunSpec
from tests.test_bench import PLUGIN, _alive, fakes, plan_of  # noqa: F401 - fakes is a fixture


def _process_tree(pid: int) -> set[int]:
    """``pid``'s descendants (Linux /proc), the processes a local Ray instance consists of."""
    out, todo = set(), [pid]
    while todo:
        path = Path(f"/proc/{todo[0]}/task/{todo[0]}/children")
        todo.pop(0)
        kids = [int(p) for p in path.read_text().split()] if path.exists() else []
        out.update(kids)
        todo.extend(kids)
    return out


def _wait_until(condition: Any, what: str, deadline_s: float = 60) -> None:
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < deadline_s, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module; every Ray process is gone after it."""
    ray = pytest.importorskip("ray")
    from lrpilot.bench.ray_executor import RayExecutor

    owner = RayExecutor(2)
    before = _process_tree(os.getpid())
    owner.connect()
    started = _process_tree(os.getpid()) - before
    assert started, "ray.init started no process"
    yield ray
    owner.close()
    assert not ray.is_initialized()
    _wait_until(lambda: not any(_alive(p) for p in started), f"Ray processes outlived the shutdown: {started}", 60)


# ----------------------------------------------------------------------------------------------------
# the same records as the local pool
# ----------------------------------------------------------------------------------------------------
def test_ray_gives_the_local_pools_records(tmp_path, ray_instance):
    """2 tasks x 2 methods x 2 seeds: the same seeds, per-epoch metrics, LR trajectories (per epoch and per
    step) and decisions on Ray as with the local pool; AALR makes rollbacks and LR changes, hd-train moves
    its LR every step."""
    from lrpilot.bench.ray_executor import RayExecutor

    plan = plan_of({"seeds": [0, 1], "tasks": [{"name": "iris-softmax", "epochs": 4}, {"name": "digits-softmax", "epochs": 3}],
                    "methods": ["aalr", "hd-train"]})  # fmt: skip
    assert len(plan.specs) == 8
    on_ray = run_bench(plan, tmp_path / "ray", executor=RayExecutor(2, log_dir=tmp_path / "ray" / "logs"), progress=False)
    local = run_bench(plan, tmp_path / "local", executor=LocalExecutor(2), progress=False)
    assert (on_ray.ran, on_ray.failed, local.ran, local.failed) == (8, [], 8, [])
    assert on_ray.executor == "ray (local instance, 2 runs at a time x 1 CPU per run)"

    ray_runs, local_runs = _contents(tmp_path / "ray"), _contents(tmp_path / "local")
    assert set(ray_runs) == set(local_runs) == {s.key for s in plan.specs}
    for key, run in ray_runs.items():
        assert run == local_runs[key], f"{run['row']['label']} {run['row']['task']} seed {run['row']['seed']} differs"
    # The comparison compares something: metrics, LR moves within epochs, and pilot decisions.
    assert all(len(r["epochs"]) == r["row"]["epochs"] and r["row"]["status"] == "completed" for r in ray_runs.values())
    assert any(r["step_lrs"] for r in ray_runs.values() if r["row"]["method"] == "hd-train")
    assert any(len(r["decisions"]) > 1 for r in ray_runs.values() if r["row"]["method"] == "aalr")
    assert {r["row"]["seed"] for r in ray_runs.values()} == {0, 1}

    with Store.open(tmp_path / "ray") as store:
        workers = [r["worker"] for r in store.runs()]
    assert {w["executor"] for w in workers} == {"ray"} and {w["threads"] for w in workers} == {1}
    assert all(w["pid"] != os.getpid() and w["node"] for w in workers)
    # A worker process runs one run after another; its first run pays its start-up (process_cpu_s > cpu_s).
    assert max(w["runs_in_process"] for w in workers) > 1
    firsts = [w for w in workers if w["runs_in_process"] == 1]
    assert firsts and all(w["process_cpu_s"] > w["cpu_s"] for w in firsts)
    assert sorted(p.stem for p in (tmp_path / "ray" / "logs").iterdir()) == sorted(ray_runs)


# ----------------------------------------------------------------------------------------------------
# failures
# ----------------------------------------------------------------------------------------------------
def test_failures_are_recorded_and_the_other_runs_go_on(tmp_path, ray_instance, fakes):
    from lrpilot.bench.ray_executor import RayExecutor

    plan = plan_of({"tasks": [{"name": "iris-softmax", "epochs": 3}], "methods": ["sgd", "fake-raise", "fake-crash", "fake-print"]})
    executor = RayExecutor(2, imports=[PLUGIN], log_dir=tmp_path / "logs")
    result = run_bench(plan, tmp_path, executor=executor, progress=False)
    assert result.ran == 4 and sorted(s.label for s, _ in result.failed) == ["fake-crash", "fake-raise"]
    with Store.open(tmp_path) as store:
        rows = {r["label"]: r for r in store.runs()}
    assert rows["sgd"]["status"] == rows["fake-print"]["status"] == "completed"
    assert rows["sgd"]["epochs"] == 3
    assert rows["fake-raise"]["status"] == "failed"
    assert rows["fake-raise"]["error"] == "RuntimeError: this method always fails to build"
    assert "build_raise" in rows["fake-raise"]["traceback"]
    assert rows["fake-crash"]["status"] == "failed"
    assert rows["fake-crash"]["error"].startswith("WorkerCrashed: the Ray worker process died without a result")
    # The run's output comes back to the driver's logs/, C-level writes included.
    log = (tmp_path / "logs" / f"{rows['fake-print']['key']}.log").read_text()
    assert all(f"fake-print: {where}" in log for where in ("stdout", "stderr", "fd 1"))
    assert "no output came back" in (tmp_path / "logs" / f"{rows['fake-crash']['key']}.log").read_text()
    # Kept on a resume, run again when asked (and fail again), as with the local pool.
    again = run_bench(plan, tmp_path, executor=RayExecutor(2, imports=[PLUGIN]), progress=False)
    assert (again.ran, again.kept_failed) == (0, 2)


def test_a_run_past_its_timeout_is_cancelled_and_its_worker_killed(tmp_path, ray_instance, fakes):
    from lrpilot.bench.ray_executor import RayExecutor

    plan = plan_of({"tasks": [{"name": "iris-softmax", "epochs": 3}],
                    "methods": [{"name": "fake-sleep", "options": {"sleep": 60.0}}]})  # fmt: skip
    t0 = time.perf_counter()
    result = run_bench(plan, tmp_path, executor=RayExecutor(2, timeout=2.0, imports=[PLUGIN]), progress=False)
    # Killed before its 60 s sleep could end. The bound is the sleep, not a guess at Ray's start-up: on a
    # loaded 2-core machine (a bench beside the tests) starting and cancelling took 43 s.
    assert time.perf_counter() - t0 < 55
    assert "TimeoutError: the run took longer than 2 s and was killed" in result.failed[0][1]
    with Store.open(tmp_path) as store:
        (row,) = store.runs()
    assert row["status"] == "failed" and row["worker"]["executor"] == "ray"
    _wait_until(lambda: not _alive(row["worker"]["pid"]), "the timed-out run's worker still runs", 30)


def test_a_worker_whose_lrpilot_differs_fails_the_run_instead_of_storing_it(ray_instance):
    """The run key hashes the driver's lrpilot version: a worker with another one must not fill it."""
    from lrpilot.bench.ray_executor import RayExecutor

    spec = RunSpec("iris-softmax", "sgd", 0, 2, 16, lrpilot_version="0.0.0-elsewhere")
    ((_, outcome),) = list(RayExecutor(2).run([spec]))
    assert outcome.status == "failed" and outcome.record is None
    assert outcome.error.startswith("VersionMismatch: this Ray worker") and "0.0.0-elsewhere" in outcome.error


# ----------------------------------------------------------------------------------------------------
# interrupt and resume
# ----------------------------------------------------------------------------------------------------
class _InterruptAfter(Executor):
    """Passes ``n`` outcomes of ``inner`` on, then raises KeyboardInterrupt (Ctrl-C in the driver)."""

    def __init__(self, inner: Executor, n: int) -> None:
        self.inner, self.n = inner, n
        self.name = inner.name

    def run(self, specs):
        with contextlib.closing(self.inner.run(specs)) as runs:
            for i, item in enumerate(runs, 1):
                yield item
                if i == self.n:
                    raise KeyboardInterrupt


def test_an_interrupted_ray_bench_cancels_its_tasks_and_resumes_without_repeating(tmp_path, ray_instance, fakes):
    from lrpilot.bench.ray_executor import RayExecutor

    ray = ray_instance
    # Slow steps (0.1 s x 4 per epoch) keep runs in flight when the bench is interrupted.
    plan = plan_of({"seeds": [0, 1, 2, 3], "tasks": [{"name": "iris-softmax", "epochs": 2, "batch_size": 32}],
                    "methods": [{"name": "fake-sleep", "options": {"sleep": 0.1}}]})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_bench(plan, tmp_path, executor=_InterruptAfter(RayExecutor(2, imports=[PLUGIN]), 1), progress=False)
    with Store.open(tmp_path) as store:
        first = {r["key"]: r for r in store.runs()}
        (invocation,) = store.invocations()
    assert len(first) == 1 and invocation["finished_at"] is None
    # The runs in flight were cancelled: both CPUs are free again, nothing else reaches the store.
    _wait_until(lambda: ray.available_resources().get("CPU", 0) == 2, "cancelled runs still hold CPUs", 30)
    resumed = run_bench(plan, tmp_path, executor=RayExecutor(2, imports=[PLUGIN]), progress=False)
    assert (resumed.planned, resumed.reused, resumed.ran, resumed.failed) == (4, 1, 3, [])
    with Store.open(tmp_path) as store:
        runs = store.runs()
        counts = store.counts()
    assert sorted(r["key"] for r in runs) == sorted(s.key for s in plan.specs)  # every run exactly once
    assert counts["epochs"] == 4 * 2
    assert all(r["invocation"] == (1 if r["key"] in first else 2) for r in runs)  # nothing ran twice
    (kept,) = first.values()
    assert next(r for r in runs if r["key"] == kept["key"])["finished_at"] == kept["finished_at"]


# ----------------------------------------------------------------------------------------------------
# building it: names, options, errors (no Ray started)
# ----------------------------------------------------------------------------------------------------
def test_make_executor_and_the_cli_options(tmp_path):
    pytest.importorskip("ray")
    from lrpilot.bench.ray_executor import RayExecutor

    ex = make_executor("ray", workers=3, timeout=5, imports=["x"], log_dir=tmp_path, address="auto")
    assert isinstance(ex, RayExecutor) and (ex.address, ex.workers, ex.timeout, ex.imports) == ("auto", 3, 5, ("x",))
    assert ex.describe() == "ray (auto, 3 runs at a time x 1 CPU per run)"
    assert make_executor("ray", address="ray://head:10001").workers is None  # a cluster: no cap unless asked
    assert RayExecutor().workers >= 1 and RayExecutor(cpus_per_run=2).threads == 2
    with pytest.raises(ValueError, match="for the Ray executor"):
        make_executor("local", address="auto")
    with pytest.raises(ValueError, match="unknown executor 'dask'; choose one of local, ray"):
        make_executor("dask")
    for bad, match in [({"workers": 0}, "workers must be >= 1"), ({"timeout": 0}, "timeout must be > 0"),
                       ({"cpus_per_run": 0}, "cpus_per_run must be > 0"), ({"retries": -1}, "retries must be >= 0"),
                       ({"gpus_per_run": -1}, "gpus_per_run must be >= 0"), ({"address": " "}, "address must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            RayExecutor(**bad)
    with pytest.raises(ValueError, match="use --device cuda"):
        next(RayExecutor().run([RunSpec("iris-softmax", "sgd", 0, 1, 16, device="cuda:1")]))


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from lrpilot.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lrpilot\[ray\]'"):
        make_executor("ray")
    suite = tmp_path / "s.json"
    suite.write_text(json.dumps({"name": "s", "tasks": ["iris-softmax"], "methods": ["sgd"]}))
    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "out"), "--executor", "ray"]) == 2
    assert "pip install 'lrpilot[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started or written
    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "out"), "--address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# kill -9 of a Ray bench's driver, for real (a subprocess), then the same command
# ----------------------------------------------------------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_kill_9_of_a_ray_bench_stops_its_runs_and_the_same_command_resumes(tmp_path):
    """The driver started its own local Ray instance; killed, it takes the instance's raylet, GCS and
    workers with it (Ray's agents exit by themselves a minute or two later, holding no run); the same
    command then runs only what the store lacks, and the results equal an uninterrupted local bench's."""
    pytest.importorskip("ray")
    import subprocess

    from tests.test_bench import _check_complete, _env, _stored

    epochs = 10
    suite = tmp_path / "s.json"
    suite.write_text(json.dumps({"name": "s", "seeds": [0, 1, 2], "tasks": [{"name": "iris-softmax", "epochs": epochs}],
                                 "methods": ["sgd"]}))  # fmt: skip
    out, db = tmp_path / "out", tmp_path / "out" / "bench.sqlite"
    cli = [sys.executable, "-m", "lrpilot", "bench", "--suite", str(suite), "--out", str(out), "--executor", "ray",
           "--workers", "1", "--no-report"]  # fmt: skip
    env = {**_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cli, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while _stored(db) < 1:
        assert proc.poll() is None, f"the bench ended before it could be killed: {proc.communicate()}"
        assert time.time() - t0 < 300, "the bench made no progress"
        time.sleep(0.05)
    ray_procs = {p: _cmdline(p) for p in _process_tree(proc.pid)}
    proc.kill()
    proc.wait()
    before = _stored(db)
    assert 1 <= before < 3
    agents = {p for p, cmd in ray_procs.items() if "Agent" in cmd}
    assert any("raylet" in cmd for cmd in ray_procs.values()), ray_procs
    _wait_until(lambda: not any(_alive(p) for p in set(ray_procs) - agents),
                f"Ray processes outlived their driver: {ray_procs}", 60)  # fmt: skip

    done = subprocess.run(cli, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"3 runs planned, {before} already in the store, {3 - before} run now" in done.stdout
    runs = _check_complete(out, 3, epochs)
    assert sorted(r["invocation"] for r in runs.values()) == [1] * before + [2] * (3 - before)  # nothing ran twice
    reference = tmp_path / "ref"
    run_bench(plan_of(json.loads(suite.read_text())), reference, executor=LocalExecutor(1), progress=False)
    assert {k: r["metrics"] for k, r in _check_complete(reference, 3, epochs).items()} == {k: r["metrics"] for k, r in runs.items()}
