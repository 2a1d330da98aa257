"""``benchmarks/overhead.py`` with two more methods, in this process only: ``auto-adam-fused`` and
``lipschitz-rmsprop-fused``, the registered ``auto-adam`` and ``lipschitz-rmsprop`` with their defaults
switched to ``fused=True`` (torch's fused Adam kernel; opt-in, not bit-identical) after building.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/overhead_fused.py --tasks mnist1d-mlp,fmnist-mlp \
        --methods 'sgd,auto-adam,auto-adam-fused,lipschitz-rmsprop,lipschitz-rmsprop-fused' --rounds 5

The option is not in the registry records: a new resolved option would change the store key of every
stored run of these methods.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead

from lrpilot.core.registry import get_method, register


def _fused(build: Any) -> Any:
    def fused_build(ctx: Any, *args: Any, **options: Any) -> Any:
        parts = build(ctx, *args, **options)
        for group in parts.optimizer.param_groups:
            group["fused"] = True  # read by AutoAdam._update at every step
        return parts

    return fused_build


for _base in ("auto-adam", "lipschitz-rmsprop"):
    _info = get_method(_base)
    register(dataclasses.replace(_info, name=f"{_base}-fused", build=_fused(_info.build)))

if __name__ == "__main__":
    overhead.main()
