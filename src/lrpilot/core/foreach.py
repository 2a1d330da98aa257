"""Multi-tensor (``torch._foreach_*``) helpers the step-level optimizers share.

On CPU a multi-tensor kernel is a loop of the single-tensor operation, so its cost on a small network
is dispatch, not arithmetic. One such cost is avoidable without changing a bit: a multi-tensor op with
a Python number wraps the number into a new tensor for every tensor of the list (``_foreach_mul_`` on
6 tensors: 11 us against 4.6 us with a 0-d tensor operand, torch 2.13, one thread). A 0-d tensor of the
list's own dtype holds the very value the kernel would compute with (it casts the number to that dtype
for float32 and float64), so the results are equal bit for bit, signed zeros, infinities and NaNs
included (``tests/test_foreach.py``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ScalarOperands"]

_EXACT_DTYPES = (torch.float32, torch.float64)
_MAX_CACHED = 16  # constants (betas, momentum): a handful; a per-step value must not grow the cache


class ScalarOperands:
    """Cached 0-d tensors standing in for Python numbers as the scalar of a multi-tensor op.

    One module-level instance per optimizer module is enough: the key is the value and the dtype.
    Only where the substitution is exact and faster: CPU tensors of one dtype, float32 or float64 (a
    float32 0-d tensor times a float64 tensor would promote the rounded value; half precision computes
    with a float, not with the rounded half value), and nonzero finite numbers (``0.0 == -0.0`` and
    ``nan != nan`` would confuse the cache). Elsewhere the number itself is returned.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def __call__(self, value: float, tensors: list[torch.Tensor]) -> float | torch.Tensor:
        if not tensors:
            return value
        first = tensors[0]
        dtype = first.dtype
        if (
            first.device.type != "cpu"
            or dtype not in _EXACT_DTYPES
            or value == 0.0
            or not math.isfinite(value)
            or any(t.dtype is not dtype for t in tensors)
        ):
            return value
        key = (value, dtype)
        operand = self._cache.get(key)
        if operand is None:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor whatever mode we are in
                operand = self._cache[key] = torch.tensor(value, dtype=dtype)
        return operand
