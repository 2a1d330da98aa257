"""The one-step hypergradient optimizers' state on one flat buffer (issue 19; docs/performance.md).

On a small network the hypergradient step costs Python and kernel dispatch, not arithmetic: the per-tensor
form (``optimizers.py``, ``flat=False``) issues about twenty multi-tensor kernels and three dot products per
tensor every step. Kept on one buffer of shape ``(rows, n)``, with ``n`` the number of weights, the same step
is a handful of kernels whatever the number of tensors:

========  ==================================================================================
row       holds
========  ==================================================================================
``GRAD``  the step's gradient ``g`` (``.grad`` copied in, plus ``weight_decay * w``); scratch
``ACC``   the decayed sum of past directions ``a`` (the one-step tangent: state ``"direction"``)
``VAL``   the validation gradient (``objective="val"`` on a network of small tensors only); scratch
``MOM``   the momentum buffer (state ``"momentum_buffer"``)
========  ==================================================================================

Param group ``k`` owns the columns ``segments[k]``. The validation gradient (``hd-val``) gets a row only where the
network's tensors are small (:data:`VAL_ROW_MAX_MEAN_NUMEL`): there a step is dispatch bound and the copy into
the row, which lets one Gram matrix give every sum, is the cheaper way; on large tensors the step is memory
bound and two dot products per tensor read the validation gradient where it lies, without writing it again
(measured, docs/performance.md: ``mnist1d-mlp``, 2.5k weights per tensor, 1.98x SGD with the row against 2.10x
without; ``fmnist-mlp``, 89k, 2.17x against 2.09x). The cosine's three sums are one ``B @ B.T`` over the
group's first rows, and every tensor of ``self.state`` that a step changes is a view into ``B``: torch's
``state_dict``, the safety net's snapshots and any code that reads ``optimizer.state[p]`` see the usual
per-parameter tensors. Replaced state (``load_state_dict``, a step of the per-tensor path that had to create a
buffer) is noticed by identity and copied back in (:meth:`FlatState.current`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GRAD, ACC = 0, 1
#: The largest mean number of weights per tensor for which the validation gradient is copied into a row.
VAL_ROW_MAX_MEAN_NUMEL = 16384
#: the state entries that live in the buffer, and their rows (the momentum buffer's is the last row)
STATE_KEYS = ("direction", "momentum_buffer")


class FlatState:
    """The buffer, its per-group column segments and the per-tensor views into each row."""

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], state: Any, lent: dict[int, int | None], *,
                 validation: bool) -> None:
        """Lay out ``groups``' parameters and adopt their existing state (a copy of each tensor's
        ``"direction"`` and ``"momentum_buffer"``; zeros where there is none, or where the per-tensor path
        kept a borrowed ``.grad`` as the direction, which it would itself have replaced by zeros)."""
        first = groups[0][0]
        n = sum(p.numel() for ps in groups for p in ps)
        self.val_row = 2 if validation and n <= VAL_ROW_MAX_MEAN_NUMEL * sum(map(len, groups)) else None
        self.mom_row = 3 if self.val_row is not None else 2
        self.rows = self.mom_row + 1
        self.buffer = torch.zeros(self.rows, n, dtype=first.dtype, device=first.device)
        self.params: list[list[torch.Tensor]] = [list(ps) for ps in groups]
        self.all_params = [p for ps in self.params for p in ps]
        self.segments: list[tuple[int, int]] = []
        #: views[row][k]: the views of group k's tensors into that row
        self.views: list[list[list[torch.Tensor]]] = [[] for _ in range(self.rows)]
        start = 0
        for ps in self.params:
            end = start + sum(p.numel() for p in ps)
            self.segments.append((start, end))
            for row in range(self.rows):
                self.views[row].append(_views(self.buffer[row], ps, start))
            start = end
        # per group: its segment of every row, and of the first 2 and 3 rows (the Gram matrix's blocks),
        # made once: a slice is a tensor made in Python, ~1-2 us each, on a step of ~30 us
        self.rows_of = [[self.buffer[row, s:e] for row in range(self.rows)] for s, e in self.segments]
        self.blocks = [{r: self.buffer[:r, s:e] for r in range(2, self.mom_row + 1)} for s, e in self.segments]
        self.grad_views = [v for vs in self.views[GRAD] for v in vs]
        self.val_views = [v for vs in self.views[self.val_row] for v in vs] if self.val_row is not None else []
        self._state = state
        self._ids = tuple(id(p) for p in self.all_params)
        # (the parameter's state dict, its direction view, its momentum view): what current() checks
        self._entries: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = []
        for k, ps in enumerate(self.params):
            for i, p in enumerate(ps):
                entry = state[p]
                views = (self.views[ACC][k][i], self.views[self.mom_row][k][i])
                for key, view in zip(STATE_KEYS, views):
                    old = entry.get(key)
                    borrowed = key == "direction" and lent.get(id(p)) is not None
                    if old is not None and not borrowed:
                        view.copy_(old)
                    entry[key] = view
                lent[id(p)] = None  # the direction is ours now
                self._entries.append((entry, *views))

    def current(self, groups: Sequence[Sequence[torch.Tensor]], state: Any) -> bool:
        """Whether this layout still describes the optimizer: the same parameters (``groups``: each param
        group's laid-out parameters) in the same groups, on its device and dtype, and every state tensor
        the step changes still a view into the buffer."""
        if state is not self._state:
            return False
        if tuple(id(p) for ps in groups for p in ps) != self._ids:
            return False
        if len(groups) != len(self.params) or any(len(ps) != len(mine) for ps, mine in zip(groups, self.params)):
            return False
        first = self.all_params[0]
        if first.device != self.buffer.device or first.dtype != self.buffer.dtype:
            return False
        return all(e.get("direction") is a and e.get("momentum_buffer") is m for e, a, m in self._entries)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view into the buffer (``state_dict`` hands out copies of those)."""
        return tensor._base is self.buffer

    def gram(self, k: int, rows: int) -> torch.Tensor:
        """The ``rows x rows`` Gram matrix of group ``k``'s segment of the first ``rows`` rows: every dot
        product the cosine needs in one kernel."""
        block = self.blocks[k][rows]
        return block @ block.T

    def row(self, row: int, k: int) -> torch.Tensor:
        """Group ``k``'s segment of ``row``, as one 1-D tensor."""
        return self.rows_of[k][row]


def _views(row: torch.Tensor, params: Sequence[torch.Tensor], start: int) -> list[torch.Tensor]:
    views = []
    for p in params:
        views.append(row[start:start + p.numel()].view_as(p))
        start += p.numel()
    return views


def eligible_dtype(dtype: torch.dtype) -> bool:
    """The flat layout's dtypes: single and double precision (half precision keeps the per-tensor path,
    whose norms reduce in float32)."""
    return dtype in (torch.float32, torch.float64)
