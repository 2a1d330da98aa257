"""Where bench runs execute. An executor takes run specs and yields their outcomes as they finish.

The contract that keeps the store consistent: **workers never touch the store**. A worker runs
:func:`execute_run` (train, catch any error) and hands back an :class:`Outcome`, plain data holding the
run record; the driver alone writes it (:meth:`lrpilot.bench.store.Store.put`). An executor for a
cluster implements :class:`Executor` the same way: submit ``execute_run`` remotely, yield each outcome
as it arrives (:mod:`lrpilot.bench.ray_executor`).

* :class:`LocalExecutor` (the default): one fresh ``spawn``-ed process per run, at most ``workers`` at a
  time, each with a fixed thread count (:data:`DEFAULT_THREADS`). A run that raises, crashes
  its process (segfault, OOM kill) or passes its timeout is a failed outcome; the others go on. A worker
  exits by itself when the driver dies (``kill -9``), so nothing is left running.
* :class:`InlineExecutor`: runs in the calling process, one after the other (debugging, tests, and
  plug-in methods registered at run time without a module to import).
* :class:`lrpilot.bench.ray_executor.RayExecutor`: Ray tasks, on a local Ray instance or a cluster (the
  optional extra ``lrpilot[ray]``).

:func:`make_executor` builds one by name (``lrpilot bench --executor local|ray``).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.bench.suites import RunSpec

__all__ = ["EXECUTORS", "Executor", "InlineExecutor", "LocalExecutor", "Outcome", "available_cores", "execute_run", "make_executor"]

#: Torch threads per run unless told otherwise, for every executor: a fixed count, because the count
#: changes the order of float reductions and hence the run's result (``docs/bench.md``), so a run must
#: not inherit it from the number of workers or the size of the machine.
DEFAULT_THREADS = 1

# Environment variables that size the thread pools of torch's backends; set for every worker.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class Outcome:
    """What a worker hands back for one run.

    Attributes:
        key: the run's key.
        status: ``"ok"`` (``record`` holds the run record) or ``"failed"`` (``error``, ``traceback``).
        started_at, finished_at: Unix times, measured by the worker (after its process started).
        worker: where it ran (host, pid, threads, executor) and its CPU seconds (``cpu_s``: the run's;
            ``process_cpu_s``: the worker process's, start-up included).
    """

    key: str
    status: str
    record: dict[str, Any] | None = None
    error: str = ""
    traceback: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def execute_run(spec: RunSpec, *, threads: int | None = None, imports: Sequence[str] = (), executor: str = "") -> Outcome:
    """Train one run and return its outcome; never raises for an error of the run itself.

    Args:
        spec: the run.
        threads: torch's intra-op thread count for this run (``None``: leave it).
        imports: modules to import first (plug-ins that register methods or tasks).
        executor: the executor's name, recorded with the worker.
    """
    started, cpu0 = time.time(), time.process_time()
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads, "executor": executor}

    def finish() -> dict[str, Any]:
        # CPU seconds hardly depend on the machine's load, unlike wall seconds: `cpu_s` is the run's own,
        # `process_cpu_s` the whole process's (in a fresh worker: interpreter start-up and imports included).
        cpu = time.process_time()
        return {**worker, "cpu_s": round(cpu - cpu0, 3), "process_cpu_s": round(cpu, 3)}

    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        for module in imports:
            importlib.import_module(module)
        from lrpilot.bench.tasks import run_task

        record = run_task(
            spec.task,
            spec.method,
            epochs=spec.epochs,
            seed=spec.seed,
            device=spec.device,
            batch_size=spec.batch_size,
            train_subset=spec.train_subset,
            data_dir=spec.data_dir,
            progress=False,
            method_options=dict(spec.method_options),
        )
        return Outcome(spec.key, "ok", record=record, started_at=started, finished_at=time.time(), worker=finish())
    except Exception as err:  # noqa: BLE001 - a failing run is recorded, never stops the bench
        return Outcome(
            spec.key, "failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
            started_at=started, finished_at=time.time(), worker=finish(),
        )  # fmt: skip


class Executor(abc.ABC):
    """Runs specs and yields ``(spec, outcome)`` as each run finishes, in any order.

    Closing the generator early (an interrupted bench) must stop the runs still in flight.
    """

    name: str = "executor"

    @abc.abstractmethod
    def run(self, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, Outcome]]: ...

    def describe(self) -> str:
        return self.name


class InlineExecutor(Executor):
    """Runs every spec in this process, one after the other."""

    name = "inline"

    def __init__(self, *, threads: int | None = None, imports: Sequence[str] = ()) -> None:
        self.threads = threads
        self.imports = tuple(imports)

    def run(self, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, Outcome]]:
        for spec in specs:
            yield spec, execute_run(spec, threads=self.threads, imports=self.imports, executor=self.name)


class LocalExecutor(Executor):
    """A pool of ``workers`` processes on this machine, a fresh ``spawn``-ed one for every run.

    A fresh process per run isolates runs completely (global RNGs, thread settings, registry, memory,
    CUDA context) and lets a crash or a timeout take down one run only; the price is the interpreter's
    start-up and ``import torch`` for every run (about 1.5 CPU-seconds).

    Args:
        workers: runs at a time (default: the cores available).
        threads: torch threads per run (default 1, whatever ``workers`` is: the thread count changes the
            order of torch's float reductions and so a run's result, which must not depend on how many
            runs share the machine; give more threads to trade that for speed on big models).
        timeout: seconds after which a run is killed and recorded as failed (default: none).
        imports: modules every worker imports before its run (plug-ins registering methods or tasks).
        log_dir: if given, each run's stdout and stderr go to ``log_dir/<key>.log`` instead of the terminal.
        start_method: ``"spawn"`` (default: a clean interpreter; the only one safe with threads and CUDA).
    """

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads: int | None = None,
        timeout: float | None = None,
        imports: Sequence[str] = (),
        log_dir: str | Path | None = None,
        start_method: str = "spawn",
    ) -> None:
        cores = available_cores()
        self.workers = cores if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.threads = DEFAULT_THREADS if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self.imports = tuple(imports)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._ctx = multiprocessing.get_context(start_method)

    def describe(self) -> str:
        return f"local ({self.workers} workers x {self.threads} threads)"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, Outcome]]:
        pending = list(reversed(specs))
        running: dict[Any, tuple[RunSpec, Any, float]] = {}  # receiving end -> (spec, process, start time)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    spec = pending.pop()
                    receive, send = self._ctx.Pipe(duplex=False)
                    log = None if self.log_dir is None else str(self.log_dir / f"{spec.key}.log")
                    proc = self._ctx.Process(
                        target=_worker_main, args=(spec, send, self.threads, self.imports, log),
                        name=f"lrpilot-run-{spec.key[:8]}", daemon=True,
                    )  # fmt: skip
                    with _thread_env(self.threads):
                        proc.start()
                    send.close()  # only the child holds the sending end: its exit makes `receive` readable
                    running[receive] = (spec, proc, time.time())
                ready = multiprocessing.connection.wait(list(running), timeout=self._wait_timeout(running))
                for receive in ready:
                    spec, proc, started = running.pop(receive)
                    yield spec, self._collect(spec, receive, proc, started)
                if self.timeout is not None:
                    now = time.time()
                    for receive, (spec, proc, started) in list(running.items()):
                        if now - started > self.timeout:
                            running.pop(receive)
                            _stop(proc)
                            receive.close()
                            yield spec, _failed(spec, f"TimeoutError: the run took longer than {self.timeout:g} s and was killed",
                                                started, proc)
        finally:
            for receive, (_, proc, _) in running.items():  # interrupted: stop what is still running
                _stop(proc)
                receive.close()

    def _wait_timeout(self, running: dict[Any, tuple[RunSpec, Any, float]]) -> float | None:
        if self.timeout is None:
            return None
        first_deadline = min(started for _, _, started in running.values()) + self.timeout
        return max(0.0, first_deadline - time.time()) + 0.05

    def _collect(self, spec: RunSpec, receive: Any, proc: Any, started: float) -> Outcome:
        try:
            outcome = receive.recv()
        except (EOFError, OSError):  # the process ended without sending: it crashed or was killed
            proc.join(10)
            code = proc.exitcode
            why = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            outcome = _failed(spec, f"WorkerCrashed: the worker process died without a result ({why})", started, proc)
        finally:
            receive.close()
        proc.join(30)
        if proc.is_alive():
            _stop(proc)
        return outcome


#: The executors :func:`make_executor` (``lrpilot bench --executor``) knows.
EXECUTORS = ("local", "ray")


def make_executor(
    kind: str = "local",
    *,
    workers: int | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    imports: Sequence[str] = (),
    log_dir: str | Path | None = None,
    address: str | None = None,
) -> Executor:
    """The executor ``kind`` (one of :data:`EXECUTORS`) with the bench's common settings.

    Args:
        kind: ``"local"`` (:class:`LocalExecutor`) or ``"ray"`` (:class:`~lrpilot.bench.ray_executor.RayExecutor`).
        workers: runs at a time (local: default the cores available; Ray: the local instance's CPUs, or a
            cap on a cluster's runs in flight).
        threads: torch threads per run (Ray: the CPUs each run asks); default :data:`DEFAULT_THREADS`.
        timeout: seconds after which a run is killed and recorded as failed.
        imports: modules every worker imports before its run.
        log_dir: where each run's stdout and stderr go (``<key>.log``).
        address: Ray only: the cluster to join (``"auto"``, ``"ray://host:10001"``); ``None``: a local instance.
    """
    if kind == "local":
        if address is not None:
            raise ValueError(f"address={address!r} is for the Ray executor (--executor ray), not the local pool")
        return LocalExecutor(workers, threads=threads, timeout=timeout, imports=imports, log_dir=log_dir)
    if kind == "ray":
        from lrpilot.bench.ray_executor import RayExecutor

        return RayExecutor(workers, address=address, cpus_per_run=threads or DEFAULT_THREADS, timeout=timeout,
                           imports=imports, log_dir=log_dir)  # fmt: skip
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def _failed(spec: RunSpec, error: str, started: float, proc: Any) -> Outcome:
    return Outcome(spec.key, "failed", error=error, started_at=started, finished_at=time.time(),
                   worker={"host": socket.gethostname(), "pid": proc.pid, "executor": "local"})  # fmt: skip


def _stop(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(10)


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Set the thread-count variables while a worker starts (a spawned child copies the environment):
    BLAS/OpenMP pools read them once, at import, before the worker could set them itself."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_with_parent() -> None:
    """Exit this worker as soon as the driver process is gone (e.g. ``kill -9``): its result could no
    longer be stored, and an orphan would hold a core for nothing."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="lrpilot-parent-watch", daemon=True).start()


def _worker_main(spec: RunSpec, send: Any, threads: int, imports: Sequence[str], log: str | None) -> None:
    _exit_with_parent()
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    outcome = execute_run(spec, threads=threads, imports=imports, executor="local")
    try:
        send.send(outcome)
    finally:
        send.close()
