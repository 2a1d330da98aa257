"""Count the places where code reads a tensor's value back to Python: the host-device syncs of a GPU,
counted on any device.

On a GPU every such read (``float(t)``, ``t.item()``, ``bool(t)``, a Python ``if`` on a tensor, a boolean
mask index, ``nonzero``, ``tolist``) waits for the device to finish the queued work, so a step-level method
that reads one value per step stalls the device once per step (issue 19). CUDA can count the syncs itself
(``torch.cuda.set_sync_debug_mode``, which ``benchmarks/overhead.py --device cuda`` uses), but only on a
GPU. This module counts the *reads* at the dispatcher instead, which works on the CPU too, so the test
suite can hold every step-level method to its count on a machine without a GPU:

* ``aten._local_scalar_dense`` -- what ``item()``, ``float()``, ``int()``, ``bool()`` and a Python ``if``
  on a tensor dispatch to;
* ``aten.nonzero``, ``aten.masked_select``, ``aten._unique2``, and ``aten.index.Tensor`` with a boolean
  index -- ops whose output size depends on the values (the device must finish to know it);
* ``Tensor.tolist`` and ``Tensor.numpy`` (they read memory directly on the CPU and never dispatch).

A count is an upper bound on what CUDA would report for the same code: a read of a tensor that lives on
the host even when the model is on a GPU syncs nothing there. torch's own optimizers keep their step
counts so (``state["step"]``, a CPU tensor unless ``capturable`` or ``fused``); pass such tensors as
``host_resident`` (:func:`host_resident_state` finds torch's) and their reads are not counted. Reads of
Python floats never reach the dispatcher and are not counted either.

Example:
    >>> import torch
    >>> t = torch.ones(3)
    >>> with count_host_reads() as reads:
    ...     total = t.sum()          # stays on the device: not a read
    ...     value = float(total)     # a read
    ...     finite = bool(torch.isfinite(t).all())  # a read
    >>> reads.count, reads.by_kind()
    (2, {'_local_scalar_dense': 2})
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads", "count_host_reads", "host_resident_state"]

# Ops whose result the host must wait for: a scalar read, or an output whose size depends on the values.
_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default: "_local_scalar_dense",
    torch.ops.aten.nonzero.default: "nonzero",
    torch.ops.aten.masked_select.default: "masked_select",
    torch.ops.aten._unique2.default: "unique",
}
_READ_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}


class HostReads:
    """What :func:`count_host_reads` counted: ``count`` in all, and ``events``, one op name per read."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(self.events))


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, reads: HostReads, host_resident: set[int]) -> None:
        super().__init__()
        self.reads = reads
        self.host_resident = host_resident  # data pointers of tensors that stay on the host on any device

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = _READ_OPS.get(func)
        if name is not None and args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.host_resident:
            name = None
        if name is None and func is torch.ops.aten.index.Tensor:  # t[mask]: the mask's count is a read
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name = "boolean index"
        if name is not None:
            self.reads.events.append(name)
        return func(*args, **(kwargs or {}))


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = _READ_METHODS.get(func)
        if name is not None:
            self.reads.events.append(name)
        return func(*args, **(kwargs or {}))


def host_resident_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The step counts a torch optimizer keeps on the host whatever the device of its parameters (its
    ``state["step"]`` tensors when neither ``capturable`` nor ``fused``): reading them syncs nothing."""
    if type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
        return []
    on_device = any(g.get("capturable") or g.get("fused") for g in optimizer.param_groups)
    return [] if on_device else [s["step"] for s in optimizer.state.values()
                                 if isinstance(s.get("step"), torch.Tensor) and s["step"].dim() == 0]


@contextmanager
def count_host_reads(host_resident: Iterable[torch.Tensor] = ()) -> Iterator[HostReads]:
    """Count the tensor-to-host reads made inside the ``with`` block (any device; see the module doc);
    reads of the ``host_resident`` tensors are not counted."""
    reads = HostReads()
    with _FunctionCounter(reads), _DispatchCounter(reads, {t.data_ptr() for t in host_resident}):
        yield reads
