"""The race between two steps (round 7 of docs/methods/auto.md): which of momentum SGD and AdamW trains
this network, decided on a split carved out of the training data before the run.

Round 6 measured that the step that wins differs by task (AdamW +1.6 points on LeNet-5, SGD 7 points ahead
on the MNIST-1D MLP) and that the training loss cannot say which; a short run of each, cooled at its own
end, ranked them as the full budget did where the gap was large (the round-7 probe). Each candidate trains a
copy of the untrained network for a share of the budget on the training data less a held-out fraction,
with the run's schedule compressed to those steps (the LR held, then the linear cooldown), and the two are
compared sample by sample on the held-out fraction::

    b = #{held-out samples the challenger classifies right and the incumbent wrong}
    c = #{... the incumbent right and the challenger wrong}
    z = (b - c) / sqrt(b + c)                 (0 when b + c = 0)
    winner = challenger if z > z_min else incumbent

``z`` is McNemar's statistic (McNemar 1947) in its signed, square-root form: the paired test of two
classifiers on the same samples, whose null distribution is close to a standard normal. The incumbent is
round 5's step (SGD): a short race gives the challenger only a noisy lead where the full budget reverses
it (MNIST-1D's MLP: 0.1 to 1.4 points after a fifth of the budget, where SGD wins the full run by 4 to 7),
so the challenger has to win clearly, not just win.

With more than one challenger (round 8: Schedule-Free AdamW beside AdamW), each is tested against the
incumbent alone, and of those that pass, the one most accurate on the held-out samples wins
(:func:`race_pick`); two challengers are never tested against each other, so the incumbent is only
replaced by a step that beats it clearly.

Pure: :func:`mcnemar_z`, :func:`race_winner` and :func:`race_pick` take per-sample correctness (``tests/test_auto.py``); the
training side is in ``register.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["mcnemar_z", "race_pick", "race_winner"]


def mcnemar_z(incumbent: torch.Tensor, challenger: torch.Tensor) -> tuple[float, int, int]:
    """``(z, b, c)`` for two boolean vectors of per-sample correctness on the same samples (module docstring)."""
    if incumbent.shape != challenger.shape or incumbent.dim() != 1:
        raise ValueError(f"per-sample correctness must be two vectors of one length, got {tuple(incumbent.shape)} "
                         f"and {tuple(challenger.shape)}")
    inc, cha = incumbent.bool(), challenger.bool()
    b = int((cha & ~inc).sum())
    c = int((inc & ~cha).sum())
    z = 0.0 if b + c == 0 else (b - c) / math.sqrt(b + c)
    return z, b, c


def race_winner(incumbent: torch.Tensor, challenger: torch.Tensor, z_min: float) -> tuple[bool, float, int, int]:
    """``(challenger_wins, z, b, c)``: the challenger wins only when ``z > z_min``."""
    z, b, c = mcnemar_z(incumbent, challenger)
    return z > z_min, z, b, c


def race_pick(correct: Mapping[str, torch.Tensor], z_min: float) -> tuple[str, dict[str, dict[str, Any]]]:
    """``(winner, tests)`` for candidates scored on the same samples, in order, the first the incumbent:
    ``tests[name] = {"z", "b", "c"}`` for each challenger against the incumbent; the winner is the most
    accurate challenger with ``z > z_min`` (ties: the first listed), else the incumbent."""
    if len(correct) < 2:
        raise ValueError(f"a race needs an incumbent and at least one challenger, got {list(correct)}")
    incumbent, *challengers = correct
    tests: dict[str, dict[str, Any]] = {}
    winner, best = incumbent, -1
    for name in challengers:
        wins, z, b, c = race_winner(correct[incumbent], correct[name], z_min)
        tests[name] = {"z": z, "b": b, "c": c}
        hits = int(correct[name].sum())
        if wins and hits > best:
            winner, best = name, hits
    return winner, tests
