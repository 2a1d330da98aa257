"""Scratch tensors reused across calls, for elementwise kernels that run at every optimizer step.

A rule that needs temporaries asks :func:`empty` or :func:`empty_like` for them. Outside :func:`reuse` that is
``torch.empty_like``. Inside ``with reuse(pool):`` the n-th request of a given shape, dtype and device
gets the same tensor as the n-th request of the previous ``with`` block on that pool: the caller keeps the
pool between steps, so a step allocates nothing once warm.

Why: on a CPU, glibc's ``malloc`` serves tensors of more than a few hundred kB with ``mmap`` and gives
them back to the system when freed, so every fresh temporary of a large model pays a page fault per 4 kB
before its first arithmetic (``benchmarks/hyperreg_speed.py``, 784-500-10 MLP: the KL and Hellinger
exact rules' optimizer step took 1.6x and 2.1x longer with fresh temporaries). CUDA's caching allocator already recycles blocks, so callers use a pool
on CPU tensors only. The tensors returned inside a block are valid until the pool's next block starts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["Pool", "empty", "empty_like", "reuse"]

Pool = dict  # (shape, dtype, device) -> list of tensors, owned by the caller

_active = threading.local()


@contextlib.contextmanager
def reuse(pool: Pool) -> Iterator[None]:
    """Serve :func:`empty_like` from ``pool`` for the duration of the block (not re-entrant)."""
    previous = getattr(_active, "state", None)
    _active.state = (pool, {})
    try:
        yield
    finally:
        _active.state = previous


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor: recycled from the active pool, if any."""
    state = getattr(_active, "state", None)
    if state is None:
        return torch.empty(shape, dtype=dtype, device=device)
    pool, taken = state
    key = (tuple(shape), dtype, torch.device(device))
    buffers = pool.setdefault(key, [])
    i = taken.get(key, 0)
    if i == len(buffers):
        buffers.append(torch.empty(shape, dtype=dtype, device=device))
    taken[key] = i + 1
    return buffers[i]


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`empty` with ``t``'s shape, dtype and device."""
    return empty(tuple(t.shape), dtype=t.dtype, device=t.device)
