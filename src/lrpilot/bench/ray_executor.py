"""The bench on Ray: runs go to Ray workers, outcomes come back, the driver alone writes the store.

::

    from lrpilot.bench import bench
    from lrpilot.bench.ray_executor import RayExecutor

    bench("standard", "runs/std", executor=RayExecutor(address="auto"))   # join a running cluster
    bench("quick", "runs/demo", executor=RayExecutor(workers=2))          # a local Ray instance

:class:`RayExecutor` implements :class:`~lrpilot.bench.executors.Executor` like the local pool: each run
is one Ray task that calls :func:`~lrpilot.bench.executors.execute_run` on a worker and hands its
:class:`~lrpilot.bench.executors.Outcome` back. **Workers never touch the store**: the driver writes
every outcome the moment it arrives, in one transaction, so resuming, scoring and the report work as
with the local pool, and the SQLite file lives on the driver's disk only (never on a shared
filesystem, where SQLite's locks are unreliable).

What travels to a worker: the run's :class:`~lrpilot.bench.suites.RunSpec` (plain data), the names of the
modules to import first (``--import``), its thread count, and on a local instance the driver's own
import path entries. Code does not travel: every node needs the same lrpilot, Ray and Python (and
the plug-in modules and data, e.g. Fashion-MNIST) installed; a worker whose lrpilot version differs
from the driver's fails the run with an error saying so. What comes back: the outcome (the run record,
or the error and traceback) and the run's stdout and stderr, written to ``log_dir/<run key>.log``.

Ray is an optional extra (``pip install 'lrpilot[ray]'``), imported only when a :class:`RayExecutor` is
built.
"""

from __future__ import annotations

import contextlib
import math
import os
import site
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrpilot.bench.executors import (
    Executor,
    Outcome,
    available_cores,
    execute_run,
    output_to_fd,
    thread_env_vars,
)
from lrpilot.bench.suites import RunSpec

__all__ = ["RayExecutor", "import_ray"]

#: At most this many bytes of a run's output come back to the driver (the end of it).
LOG_LIMIT = 1 << 20
#: ``ray.wait`` never blocks longer than this, so the driver stays responsive (Ctrl-C, timeouts).
_POLL_S = 5.0
#: Whether this process's Ray connection is a local instance a :class:`RayExecutor` started (its workers
#: then run on this machine and get the driver's import path).
_local_instance = False


def import_ray() -> Any:
    """Import Ray, or raise an :class:`ImportError` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"the Ray executor needs Ray, an optional extra: pip install 'lrpilot[ray]' ({err})") from err
    return ray


# ----------------------------------------------------------------------------------------------------
# the worker side: the body of one Ray task
# ----------------------------------------------------------------------------------------------------
# A Ray worker process runs many tasks one after the other (unless ``isolate``); these count what it did
# before the current one, so that a run's ``process_cpu_s`` means what it means with the local pool:
# the CPU seconds the worker process spent on this run, its start-up included when this run paid it.
_runs_in_process = 0
_cpu_at_last_end = 0.0


def _run_task(spec: RunSpec, threads: int, imports: Sequence[str], log_limit: int) -> Iterator[Any]:
    """One run on a Ray worker, as a generator task: Ray streams each item to the driver as it is yielded.

    The first item says that the run has started (and where), which starts the driver's timeout clock;
    the second is ``(outcome, output)``: the run's :class:`Outcome` and the text it wrote to stdout and
    stderr. Like :func:`execute_run`, it never raises for an error of the run itself.
    """
    global _runs_in_process, _cpu_at_last_end
    yield {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
    cpu_before = time.process_time()
    with _captured_output(log_limit) as output:
        outcome = _execute(spec, threads, imports)
    _runs_in_process += 1
    outcome.worker.update(
        executor="ray", node=_node_id(), runs_in_process=_runs_in_process,
        process_cpu_s=round(outcome.worker.get("cpu_s", 0.0) + cpu_before - _cpu_at_last_end, 3),
    )  # fmt: skip
    _cpu_at_last_end = time.process_time()
    yield outcome, output.text


def _execute(spec: RunSpec, threads: int, imports: Sequence[str]) -> Outcome:
    from lrpilot._version import __version__

    if spec.lrpilot_version != __version__:
        # The run key hashes the driver's version: a record made by other code must not be stored under it.
        now = time.time()
        return Outcome(
            spec.key, "failed", started_at=now, finished_at=now,
            error=(f"VersionMismatch: this Ray worker ({socket.gethostname()}) imports lrpilot {__version__} "
                   f"from {Path(sys.modules['lrpilot'].__file__ or '?').parent}, the driver has {spec.lrpilot_version}: "
                   "install the same lrpilot on every node"),
            worker={"host": socket.gethostname(), "pid": os.getpid(), "threads": threads},
        )  # fmt: skip
    return execute_run(spec, threads=threads, imports=imports, executor="ray")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - only a label for the record
        return ""


class _Output:
    text = ""


@contextlib.contextmanager
def _captured_output(limit: int) -> Iterator[_Output]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C extensions' output too) to a
    temporary file while the run trains; ``.text`` holds the last ``limit`` bytes of it afterwards.

    A Ray worker runs one task at a time, so nothing else writes there meanwhile except Ray's own threads,
    whose rare messages then land in the run's log rather than in the worker's.
    """
    out = _Output()
    with tempfile.TemporaryFile() as f:
        try:
            with output_to_fd(f.fileno()):
                yield out
        finally:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            skipped = f"[... the first {size - limit} bytes of the output are left out]\n" if size > limit else ""
            out.text = skipped + f.read().decode(errors="replace")


# ----------------------------------------------------------------------------------------------------
# the driver side
# ----------------------------------------------------------------------------------------------------
@dataclass
class _InFlight:
    spec: RunSpec
    submitted: float
    started: float | None = None  # driver time at which the worker said it started (None: still queued)
    where: dict[str, Any] | None = None


class RayExecutor(Executor):
    """Runs bench runs as Ray tasks: on a local Ray instance (default) or on a cluster (``address``).

    Every run is one task asking ``cpus_per_run`` CPUs (and one GPU for a ``cuda`` run), with torch's
    thread count and the BLAS/OpenMP thread variables set to those CPUs, so runs never oversubscribe a
    node. Outcomes are yielded as tasks finish (``ray.wait``). A run that raises, whose worker dies
    (segfault, OOM kill, lost node) or that passes ``timeout`` is a failed outcome; the others go on.
    Closing the generator (an interrupted bench) cancels the tasks still queued or running; if the
    driver is killed, Ray itself ends its tasks (a local instance goes with its driver; on a cluster the
    driver's job dies and its workers are killed), so nothing runs on for a store that cannot take it.

    Worker processes are reused from run to run, as the local pool's are, which saves each run the
    interpreter's start-up and ``import torch`` (``isolate=True`` gives every run a fresh process).
    Results do not depend on it: every run seeds every random source itself, and
    :func:`~lrpilot.bench.executors.execute_run` undoes what a run changed in its process
    (:class:`~lrpilot.bench.executors.ProcessState`).

    Args:
        workers: runs at a time. On a local instance, which gets ``workers x cpus_per_run`` CPUs, the
            default is the cores available over ``cpus_per_run``; on a cluster it caps the runs in
            flight (default: no cap, the cluster's CPUs decide).
        address: ``None`` (default): start a local Ray instance for this bench (never joining one that
            happens to run on this machine); ``"auto"``: join the cluster this machine belongs to (``ray
            start``); ``"ray://host:10001"``: join through Ray Client; any address ``ray.init`` takes.
        cpus_per_run: CPUs of each task, and its thread count (its floor, at least 1). Default 1.
        gpus_per_run: GPUs of each task (default: 1 for a ``cuda`` run, 0 otherwise; fractions share one).
        timeout: seconds after its start on a worker (queueing excluded) after which a run is cancelled,
            its worker killed, and the run recorded as failed (default: none).
        imports: modules every worker imports before its run (plug-ins registering methods or tasks).
        log_dir: if given, each run's stdout and stderr are written to ``log_dir/<key>.log`` on the driver.
        retries: times Ray retries a run whose worker or node died (default 0: recorded as failed, like
            the local pool; ``lrpilot bench --retry-failed`` runs it again later). A run that raises is
            never retried.
        isolate: a fresh worker process for every run (``max_calls=1``).
        runtime_env: Ray's ``runtime_env`` for the job (``pip``, ``py_modules``, ``env_vars``, ...), used
            when this executor starts or joins Ray.

    Example:
        >>> from lrpilot.bench import bench                                       # doctest: +SKIP
        >>> bench("quick", "runs/demo", executor=RayExecutor(workers=2))          # doctest: +SKIP
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        cpus_per_run: float = 1,
        gpus_per_run: float | None = None,
        timeout: float | None = None,
        imports: Sequence[str] = (),
        log_dir: str | Path | None = None,
        retries: int = 0,
        isolate: bool = False,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        import_ray()  # fail now, with the install hint, not when the bench starts running
        if not cpus_per_run > 0:
            raise ValueError(f"cpus_per_run must be > 0, got {cpus_per_run!r}")
        if gpus_per_run is not None and not gpus_per_run >= 0:
            raise ValueError(f"gpus_per_run must be >= 0, got {gpus_per_run!r}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        if address is not None and not str(address).strip():
            raise ValueError("address must be None (a local Ray instance), 'auto', or a Ray address such as ray://host:10001")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.threads = max(1, int(cpus_per_run))
        if address is None:
            self.workers: int | None = int(workers) if workers is not None else max(1, int(available_cores() // cpus_per_run))
        else:
            self.workers = None if workers is None else int(workers)
        self.timeout = timeout
        self.imports = tuple(imports)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.retries = int(retries)
        self.isolate = isolate
        self.runtime_env = dict(runtime_env or {})
        self._owns_connection = False

    def describe(self) -> str:
        where = "local instance" if self.address is None else self.address
        cap = "" if self.workers is None else f"{self.workers} runs at a time x "
        return f"ray ({where}, {cap}{self.cpus_per_run:g} CPU per run)"

    # -- the connection ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Start the local Ray instance or join the cluster; a no-op if this process is connected already
        (the connection is then someone else's, used as it is and left open)."""
        global _local_instance
        ray = import_ray()
        if ray.is_initialized():
            return
        # Never phone home: Ray's usage statistics are off unless the user turned them on themselves.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        common = {"log_to_driver": False, "runtime_env": self.runtime_env or None}
        if self.address is None:
            # address="local": a fresh instance even when a `ray start` cluster runs on this machine.
            assert self.workers is not None
            ray.init(address="local", num_cpus=math.ceil(self.workers * self.cpus_per_run), include_dashboard=False, **common)
        else:
            ray.init(address=self.address, **common)
        self._owns_connection = True
        _local_instance = self.address is None

    def close(self) -> None:
        """Shut the local instance down (or leave the cluster) if :meth:`connect` started it."""
        global _local_instance
        if self._owns_connection:
            import_ray().shutdown()
            self._owns_connection = _local_instance = False

    def __enter__(self) -> RayExecutor:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running -------------------------------------------------------------------------------------
    def run(self, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, Outcome]]:
        for spec in specs:
            if spec.device.startswith("cuda:") and spec.device != "cuda:0":
                raise ValueError(f"{spec.describe()}: device {spec.device!r} on Ray: each run gets the GPU Ray assigns "
                                 "it, visible as cuda:0; use --device cuda")  # fmt: skip
        if not specs:
            return
        ray = import_ray()
        connected_here = not ray.is_initialized()
        self.connect()
        task = ray.remote(_run_task)
        env = thread_env_vars(self.threads)
        if _local_instance:
            # A local instance's workers run on this machine: give them the driver's import path (a source
            # checkout, the tests' root), as the local pool's spawned processes get it.
            env["PYTHONPATH"] = os.pathsep.join(_local_import_path())
        pending = list(reversed(specs))
        running: dict[Any, _InFlight] = {}  # ObjectRefGenerator -> its run
        try:
            while pending or running:
                while pending and (self.workers is None or len(running) < self.workers):
                    spec = pending.pop()
                    gpus = self.gpus_per_run if self.gpus_per_run is not None else float(spec.device.startswith("cuda"))
                    gen = task.options(
                        name=f"lrpilot-run-{spec.key[:8]}", num_cpus=self.cpus_per_run, num_gpus=gpus,
                        max_retries=self.retries, retry_exceptions=False, runtime_env={"env_vars": env},
                        **({"max_calls": 1} if self.isolate else {}),  # else Ray's default: reuse (CPU tasks)
                    ).remote(spec, self.threads, self.imports, LOG_LIMIT)  # fmt: skip
                    running[gen] = _InFlight(spec, time.time())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=self._wait_timeout(running))
                for gen in ready:
                    flight = running[gen]
                    outcome = self._advance(ray, gen, flight)
                    if outcome is not None:
                        del running[gen]
                        yield flight.spec, outcome
                for gen, flight in list(running.items()):
                    if self.timeout is not None and flight.started is not None and time.time() - flight.started > self.timeout:
                        del running[gen]
                        ray.cancel(gen, force=True)  # kills the worker process: the run cannot go on anywhere
                        outcome = self._failed(flight, f"TimeoutError: the run took longer than {self.timeout:g} s and was killed")
                        yield flight.spec, outcome
        finally:
            for gen in running:  # interrupted: stop what is queued or running
                with contextlib.suppress(Exception):
                    ray.cancel(gen, force=True)
            if connected_here:
                self.close()

    def _wait_timeout(self, running: dict[Any, _InFlight]) -> float:
        if self.timeout is None:
            return _POLL_S
        starts = [f.started for f in running.values() if f.started is not None]
        if not starts:
            return _POLL_S
        return min(_POLL_S, max(0.0, min(starts) + self.timeout - time.time()) + 0.05)

    def _advance(self, ray: Any, gen: Any, flight: _InFlight) -> Outcome | None:
        """Take the next item of a ready task: ``None`` when it only said it started, else its outcome."""
        try:
            item = ray.get(next(gen))
        except StopIteration:
            return self._failed(flight, "WorkerCrashed: the Ray task ended without a result")
        except ray.exceptions.RayError as err:
            return self._failed(flight, _describe_ray_error(err), traceback=str(err))
        if flight.started is None and isinstance(item, dict):
            flight.started, flight.where = time.time(), item
            return None
        outcome, output = item
        self._write_log(flight.spec, output)
        return outcome

    def _failed(self, flight: _InFlight, error: str, traceback: str = "") -> Outcome:
        where = flight.where or {}
        started = where.get("started_at") or flight.submitted
        outcome = Outcome(
            flight.spec.key, "failed", error=error, traceback=traceback, started_at=started, finished_at=time.time(),
            worker={"host": where.get("host", ""), "pid": where.get("pid"), "threads": self.threads, "executor": "ray"},
        )  # fmt: skip
        self._write_log(flight.spec, f"(no output came back: {error}; Ray's own logs of the worker are on its node, "
                                     "under /tmp/ray/session_latest/logs)\n")  # fmt: skip
        return outcome

    def _write_log(self, spec: RunSpec, text: str) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / f"{spec.key}.log").write_text(text)


def _describe_ray_error(err: Exception) -> str:
    """One line for a task that ended without an outcome: a dead worker or node, lost objects."""
    ray = import_ray()
    first = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, ray.exceptions.WorkerCrashedError):
        return f"WorkerCrashed: the Ray worker process died without a result ({first})"
    if isinstance(err, ray.exceptions.OutOfMemoryError):
        return f"WorkerCrashed: Ray's memory monitor killed the worker ({first})"
    if isinstance(err, ray.exceptions.TaskCancelledError):
        return "Cancelled: the Ray task was cancelled"
    return f"{type(err).__name__}: {first}"


def _local_import_path() -> list[str]:
    """The driver's import path entries a worker on this machine would not have by itself: source
    checkouts, the tests' root, plug-in folders. The interpreter's own directories are left out: a worker
    has them already, and a site directory named in ``PYTHONPATH`` would have its ``.pth`` files skipped."""
    roots = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    sites = set(site.getsitepackages()) | {site.getusersitepackages()}
    out: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if path in sites or any(path == r or path.startswith(r + os.sep) for r in roots):
            continue
        if path.endswith(("site-packages", "dist-packages")) or path in out:
            continue
        out.append(path)
    return out
