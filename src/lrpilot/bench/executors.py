"""Where bench runs execute. An executor takes run specs and yields their outcomes as they finish.

The contract that keeps the store consistent: **workers never touch the store**. A worker runs
:func:`execute_run` (train, catch any error) and hands back an :class:`Outcome`, plain data holding the
run record; the driver alone writes it (:meth:`lrpilot.bench.store.Store.put`). An executor for a
cluster implements :class:`Executor` the same way: submit ``execute_run`` remotely, yield each outcome
as it arrives (:mod:`lrpilot.bench.ray_executor`).

* :class:`LocalExecutor` (the default): ``workers`` ``spawn``-ed worker processes on this machine, each
  running one run after another with a fixed thread count (:data:`DEFAULT_THREADS`); ``isolate=True``
  gives every run a fresh process instead. A run that raises, crashes its process (segfault, OOM kill)
  or passes its timeout is a failed outcome; the others go on. A worker exits by itself when the driver
  dies (``kill -9``), so nothing is left running.
* :class:`InlineExecutor`: runs in the calling process, one after the other (debugging, tests, and
  plug-in methods registered at run time without a module to import).
* :class:`lrpilot.bench.ray_executor.RayExecutor`: Ray tasks, on a local Ray instance or a cluster (the
  optional extra ``lrpilot[ray]``).

:func:`lrpilot.bench.runner.make_executor` builds one by name (``lrpilot bench --executor local|ray``). This
module knows no other executor: the Ray executor builds on it, never the other way round.

A worker process that runs many runs must give each the process a fresh one would: :class:`ProcessState`
is what a run could change and the next one inherit (global RNGs, torch's global flags and default
dtype, the environment, warning filters); :func:`execute_run` captures it before each run and restores
it after.
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
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpilot.bench.suites import RunSpec

__all__ = [
    "DEFAULT_THREADS", "THREAD_VARS", "Executor", "InlineExecutor", "LocalExecutor", "Outcome", "ProcessState",
    "available_cores", "execute_run", "output_to_fd", "thread_env_vars",
]  # fmt: skip

#: Torch threads per run unless told otherwise, for every executor: a fixed count, because the count
#: changes the order of float reductions and hence the run's result (``docs/bench.md``), so a run must
#: not inherit it from the number of workers or the size of the machine.
DEFAULT_THREADS = 1

#: Environment variables that size the thread pools of torch's backends (OpenMP, MKL, OpenBLAS, ...).
#: Every executor sets them to the run's thread count in its workers' environment: the pools read them
#: once, when the worker imports torch, before it could set anything itself.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def thread_env_vars(threads: int) -> dict[str, str]:
    """The :data:`THREAD_VARS` set to ``threads``: the environment a worker with that thread count starts in."""
    return {k: str(threads) for k in THREAD_VARS}


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


@dataclass
class ProcessState:
    """What a run could change in its process and the next run in the same process would inherit.

    A fresh process per run gives every run the same starting point for free. A worker that runs many
    runs gets it from this: :func:`execute_run` captures the state before a run and restores it after
    (:func:`kept_process_state`), so every run of a worker starts from the state its first run started
    from, and a run's result does not depend on what ran before it in the same process. Undoing after
    the run rather than resetting before it keeps what the executor itself sets between runs (Ray sets
    a task's environment, e.g. ``CUDA_VISIBLE_DEVICES``) and, run inline, the caller's own settings.

    Covered: Python's, NumPy's and torch's global RNGs (and CUDA's once initialised; each run seeds them
    anyway, and torch's default generator starts from a fixed seed in a fresh process), torch's thread
    count, default dtype and device, grad and anomaly modes, deterministic-algorithms flags, cuDNN,
    TF32 and oneDNN flags, float32 matmul precision, the environment, the working directory (and, in
    :func:`kept_process_state`, warning filters). Caches of read-only data (datasets, the registry,
    the targets file) are left alone: they change no result.
    """

    rng: dict[str, Any]
    threads: int
    flags: dict[str, Any]
    environ: dict[str, str]
    cwd: str

    @classmethod
    def capture(cls) -> ProcessState:
        """The state of this process now."""
        import torch

        from lrpilot.core.seeding import capture_rng

        return cls(capture_rng(), torch.get_num_threads(), _torch_flags(), dict(os.environ), os.getcwd())

    def restore(self) -> None:
        """Put this process back into the captured state (settings that did not change are not touched)."""
        import torch

        from lrpilot.core.seeding import restore_rng

        now = _torch_flags()
        for name, value in self.flags.items():
            if now[name] != value:
                _SET_FLAG[name](value)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        restore_rng(self.rng)


def _torch_flags() -> dict[str, Any]:
    import torch

    b = torch.backends
    return {
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device(),
        "grad_enabled": torch.is_grad_enabled(),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "deterministic": (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn": (b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32),
        "matmul_tf32": b.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": b.mkldnn.enabled,
    }


def _set_cudnn(value: tuple[bool, bool, bool, bool]) -> None:
    import torch

    c = torch.backends.cudnn
    c.enabled, c.benchmark, c.deterministic, c.allow_tf32 = value


def _torch() -> Any:
    import torch

    return torch


_SET_FLAG: dict[str, Any] = {
    "default_dtype": lambda v: _torch().set_default_dtype(v),
    "default_device": lambda v: _torch().set_default_device(v),
    "grad_enabled": lambda v: _torch().set_grad_enabled(v),
    "anomaly": lambda v: _torch().autograd.set_detect_anomaly(v[0], check_nan=v[1]),
    "deterministic": lambda v: _torch().use_deterministic_algorithms(v[0], warn_only=v[1]),
    "cudnn": _set_cudnn,
    "matmul_tf32": lambda v: setattr(_torch().backends.cuda.matmul, "allow_tf32", v),
    "matmul_precision": lambda v: _torch().set_float32_matmul_precision(v),
    "mkldnn": lambda v: setattr(_torch().backends.mkldnn, "enabled", v),
}

@contextlib.contextmanager
def kept_process_state() -> Iterator[None]:
    """Undo, on leaving, every change the body made to the :class:`ProcessState` and the warning filters."""
    state = ProcessState.capture()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        state.restore()


def execute_run(spec: RunSpec, *, threads: int | None = None, imports: Sequence[str] = (), executor: str = "") -> Outcome:
    """Train one run and return its outcome; never raises for an error of the run itself.

    Args:
        spec: the run.
        threads: torch's intra-op thread count for this run (``None``: leave it).
        imports: modules to import first (plug-ins that register methods or tasks).
        executor: the executor's name, recorded with the worker.

    The run's changes to the process (:class:`ProcessState`) are undone when it ends, so that a worker
    process can run many runs with the results a fresh process per run gives.
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

        with kept_process_state():
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
    """``workers`` worker processes on this machine, each running one run after another.

    Workers are ``spawn``-ed (a clean interpreter: the only start method safe with threads and CUDA)
    when the first runs are handed out and reused until the bench ends, so the interpreter's start-up
    and ``import torch`` (about 1.5 CPU seconds, and some 4 with the data and the methods' modules) are
    paid once per worker rather than once per run. Results do not depend on it: every run seeds every
    random source and sets its thread count itself, and what a run changes in its process is undone when
    it ends (:class:`ProcessState`), so a worker's runs give the records a fresh process per run gives
    (``scripts/compare_stores.py`` checks two stores run by run). A run that crashes its worker or passes
    its timeout takes that worker down only; a fresh one takes its place.

    Args:
        workers: runs at a time (default: the cores available).
        threads: torch threads per run (default 1, whatever ``workers`` is: the thread count changes the
            order of torch's float reductions and so a run's result, which must not depend on how many
            runs share the machine; give more threads to trade that for speed on big models).
        timeout: seconds after its start (its worker's start-up excluded) after which a run is killed, with
            its worker, and recorded as failed (default: none).
        imports: modules every worker imports before its run (plug-ins registering methods or tasks).
        log_dir: if given, each run's stdout and stderr go to ``log_dir/<key>.log`` instead of the terminal.
        isolate: a fresh process for every run (the pool before worker reuse): complete isolation (memory,
            CUDA context, module state of plug-ins) at the price of the start-up per run.
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
        isolate: bool = False,
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
        self.isolate = bool(isolate)
        self._ctx = multiprocessing.get_context(start_method)

    def describe(self) -> str:
        mode = ", a fresh process per run" if self.isolate else ""
        return f"local ({self.workers} workers x {self.threads} threads{mode})"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[tuple[RunSpec, Outcome]]:
        pending = list(reversed(specs))
        idle: list[_Worker] = []
        busy: dict[Any, _Worker] = {}  # the worker's connection -> the worker
        if self.log_dir is not None and specs:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            while pending or busy:
                while pending and len(busy) < self.workers:
                    worker = idle.pop() if idle else self._start_worker()
                    spec = pending.pop()
                    log = None if self.log_dir is None else str(self.log_dir / f"{spec.key}.log")
                    try:
                        worker.conn.send((spec, log))
                    except OSError:  # the idle worker died meanwhile (killed from outside): take another
                        worker.stop()
                        pending.append(spec)
                        continue
                    worker.spec, worker.started, worker.running = spec, time.time(), False
                    busy[worker.conn] = worker
                ready = multiprocessing.connection.wait(list(busy), timeout=self._wait_timeout(busy))
                for conn in ready:
                    worker = busy[conn]
                    outcome = self._receive(worker)
                    if outcome is None:  # the worker said it started the run: its timeout clock starts now
                        continue
                    del busy[conn]
                    if worker.alive and not self.isolate:
                        idle.append(worker)
                    else:
                        worker.stop()
                    assert worker.spec is not None
                    yield worker.spec, outcome
                if self.timeout is not None:
                    now = time.time()
                    for conn, worker in list(busy.items()):
                        if worker.running and now - worker.started > self.timeout:
                            busy.pop(conn)
                            worker.stop()
                            yield worker.spec, _failed(worker.spec, f"TimeoutError: the run took longer than {self.timeout:g} s "
                                                                    "and was killed", worker.started, worker.proc)  # fmt: skip
        finally:
            for worker in busy.values():  # interrupted: stop what is still running
                worker.stop()
            for worker in idle:  # done: let the idle workers exit by themselves, then make sure
                worker.close()
            for worker in idle:
                worker.stop(grace_s=5)

    def _start_worker(self) -> _Worker:
        conn, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.threads, self.imports, 1 if self.isolate else None),
            name="lrpilot-worker", daemon=True,
        )  # fmt: skip
        with _thread_env(self.threads):
            proc.start()
        child.close()  # only the worker holds its end: its exit makes `conn` readable (EOF)
        return _Worker(proc, conn)

    def _wait_timeout(self, busy: dict[Any, _Worker]) -> float | None:
        starts = [w.started for w in busy.values() if w.running]
        if self.timeout is None or not starts:
            return None
        return max(0.0, min(starts) + self.timeout - time.time()) + 0.05

    def _receive(self, worker: _Worker) -> Outcome | None:
        """The worker's next message: ``None`` when it only said it started its run, else the outcome."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the process ended without sending: it crashed or was killed
            worker.alive = False
            worker.proc.join(10)
            code = worker.proc.exitcode
            why = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            assert worker.spec is not None
            return _failed(worker.spec, f"WorkerCrashed: the worker process died without a result ({why})", worker.started,
                           worker.proc)  # fmt: skip
        if isinstance(message, str) and message == _STARTED:
            worker.started, worker.running = time.time(), True
            return None
        return message


@dataclass
class _Worker:
    """The driver's handle on one worker process of :class:`LocalExecutor`."""

    proc: Any
    conn: Any
    spec: RunSpec | None = None  # the run it is running (or ran last)
    started: float = 0.0  # when the run was handed out, then when the worker started it
    running: bool = False  # the worker said it started the run (the timeout counts from then)
    alive: bool = True

    def close(self) -> None:
        """Tell the worker to exit once idle (closing our end: it reads EOF)."""
        with contextlib.suppress(OSError):
            self.conn.close()

    def stop(self, grace_s: float = 0.0) -> None:
        """End the worker: wait ``grace_s`` for it to exit by itself, then kill it."""
        self.close()
        self.alive = False
        if grace_s:
            self.proc.join(grace_s)
        _stop(self.proc)


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
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(thread_env_vars(threads))
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


@contextlib.contextmanager
def output_to_fd(fd: int) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C extensions' output too) to the
    open file descriptor ``fd`` while the body runs, then back to where they went before."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for saved_fd in saved:
            os.close(saved_fd)


@contextlib.contextmanager
def _output_to(log: str | None) -> Iterator[None]:
    """:func:`output_to_fd` into the file ``log`` (truncated), or nothing when ``log`` is ``None``."""
    if log is None:
        yield
        return
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with output_to_fd(fd):
            yield
    finally:
        os.close(fd)


#: What a worker sends when it starts a run: the run's timeout counts from then, so that a worker's
#: start-up (seconds on a busy machine) is not charged to its first run.
_STARTED = "started"


def _worker_main(conn: Any, threads: int, imports: Sequence[str], max_runs: int | None) -> None:
    """A worker's life: take ``(spec, log)`` from the driver, run it, send the outcome back; exit on
    EOF (the driver is done or gone) or after ``max_runs`` runs."""
    _exit_with_parent()
    runs, cpu_at_last_end = 0, 0.0
    while max_runs is None or runs < max_runs:
        try:
            spec, log = conn.recv()
            conn.send(_STARTED)
        except (EOFError, OSError):
            return
        with _output_to(log):
            outcome = execute_run(spec, threads=threads, imports=imports, executor="local")
        runs += 1
        # `process_cpu_s`: what this process spent since its previous run ended (its start-up included
        # for its first run), so that the runs' figures add up to the process's CPU time.
        now = time.process_time()
        outcome.worker.update(runs_in_process=runs, process_cpu_s=round(now - cpu_at_last_end, 3))
        cpu_at_last_end = now
        try:
            conn.send(outcome)
        except OSError:
            return
