"""``torch.distributed`` helpers: every rank must see the same numbers and take the same decisions.

Every function here is the identity (or a plain local computation) when no process group is
initialised, so the loop, the pilots and the estimators call them unconditionally and single-process
code pays nothing. This module sits at the bottom of the package (it imports nothing from lrpilot), so
pilots and estimators may use it.

Conventions:
* scalars are reduced in float64 on the backend's device (CPU for gloo, the current CUDA device for
  NCCL);
* an estimate computed on one rank (mutual information on the probe subset) is computed on rank 0 and
  broadcast, so every rank holds the same value bit for bit;
* only rank 0 writes files (``is_main_process``).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_max",
    "all_reduce_mean_",
    "all_reduce_sum",
    "all_reduce_sum_",
    "any_true",
    "broadcast_object",
    "broadcast_tensors_",
    "free_port",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """A process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def _device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a short list of scalars (one collective for all of them)."""
    if not is_distributed():
        return [float(v) for v in values]
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum over ranks (NaN-safe: a NaN on any rank gives NaN)."""
    if not is_distributed():
        return [float(v) for v in values]
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    nan = torch.isnan(buf).to(torch.float64)
    dist.all_reduce(nan, op=dist.ReduceOp.MAX)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    buf[nan > 0] = float("nan")
    return buf.tolist()


def any_true(flag: bool) -> bool:
    """``True`` on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return bool(flag)
    return all_reduce_max([1.0 if flag else 0.0])[0] > 0


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum tensors over ranks in place, in one flat buffer per dtype (one collective each)."""
    _all_reduce_flat(tensors, mean=False)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks in place, in one flat buffer per dtype (one collective each)."""
    _all_reduce_flat(tensors, mean=True)


def _all_reduce_flat(tensors: Sequence[torch.Tensor], *, mean: bool) -> None:
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat.div_(world_size())
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small objects such as an estimate)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """A TCP port free on localhost now (for a single-machine process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Returns ``True`` if a group was initialised (or already was), ``False`` when the environment does
    not describe one.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def _worker(
    rank_: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: tuple[Any, ...],
    kwargs: dict[str, Any], out_dir: str,
) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank_), "WORLD_SIZE": str(world)}
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank_ % torch.cuda.device_count())  # one GPU per process
    dist.init_process_group(backend=backend, rank=rank_, world_size=world)
    try:
        value = fn(*args, **kwargs)
        # A file, not a pipe: a large result in a pipe nobody reads before join() would deadlock.
        with open(os.path.join(out_dir, f"rank{rank_}.pkl"), "wb") as f:
            pickle.dump(value, f)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any, backend: str = "gloo", **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` fresh processes forming one process group on this machine.

    Returns each rank's return value, in rank order (values must be picklable). ``fn`` must be
    importable (a module-level function). For several machines, use ``torchrun`` and
    :func:`init_from_env` instead.
    """
    import torch.multiprocessing as mp

    if not (isinstance(nproc, int) and nproc >= 1):
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    with tempfile.TemporaryDirectory(prefix="lrpilot-launch-") as out_dir:
        mp.start_processes(
            _worker, args=(nproc, free_port(), backend, fn, args, kwargs, out_dir), nprocs=nproc, join=True,
            start_method="spawn",
        )
        values = []
        for r in range(nproc):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                values.append(pickle.load(f))
    return values
