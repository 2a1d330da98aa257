"""The LR sweep ``auto`` starts from: an exponential LR ramp on training batches (Smith 2017, section 3.3).

The sweep trains a throw-away copy of the network for at most ``steps`` optimizer steps while the LR
grows geometrically from ``min_lr`` to ``max_lr``, and records the training loss of every step::

    lr_i   = min_lr * (max_lr / min_lr) ** (i / (steps - 1))                  i = 0 .. steps - 1
    e_i    = EMA_beta(loss_0 .. loss_i) / (1 - beta ** (i + 1))              (bias-corrected, causal)
    stop   when loss_i is not finite, or e_i > divergence_factor * min_{j <= i} e_j
    c_i    = mean(loss_{i-w} .. loss_{i+w})                                  (centred, w = window)
    lr     = lr_{argmin c} / divisor                                      (pick="minimum")
    lr     = lr_{edge} / divisor,  edge = the last i >= argmin c with       (pick="edge")
             c_j <= min c + min(f * (c_0 - min c), r * min c) for every j in argmin c .. i,
             and lr_i <= k * lr_{argmin c}

The LR at the smoothed loss's minimum is where the ramp starts to hurt: the largest LR the network
tolerates at the start of training. Dividing it by ``divisor`` lands inside the region where the loss
still falls fast (Smith's advice is "a factor of 3 or 4 less than the maximum"; measured on the
development tasks, 2 is ours: docs/methods/auto.md).
The sweep only reads the training loss of the steps it takes, so it needs no held-out data.

**Why an edge.** Where the valley of the curve is wide and flat (MNIST-1D's MLP), its minimum wanders by
half a decade from seed to seed and the LR with it; the valley's upper wall, where the ramp starts to
fail, is steep and moves little. ``pick="edge"`` places the LR from the wall: the last LR whose smoothed
loss is still within a fraction ``f`` (``edge_fraction``) of the way from the minimum back up to the
start, and (``edge_rise`` r) at most ``1 + r`` times the minimum; the edge's LR is at most ``edge_cap``
(k) times the minimum's: the edge refines the minimum's pick within an octave, it never replaces it
(rounds 2 to 4 of docs/methods/auto.md: a batch-normalised ResNet-20's ramp has no wall, and an uncapped
edge trained it at 10 times the minimum's LR).

**Why two smoothings.** The causal EMA only decides when to stop. The LR is chosen from a *centred*
average, because a causal average lags: on a ramp of 200 steps over five decades, the usual
``beta = 0.98`` (a 50-step memory) moves the minimum by about a decade towards larger LRs, and that is
the difference between LeNet-5 training and LeNet-5 stuck at chance on Fashion-MNIST
(docs/methods/auto.md, "Root causes").

Everything here is pure: :func:`run_sweep` takes a ``step(lr) -> loss`` callable (the training loop's
side), so the rule is tested on scripted loss sequences (``tests/test_auto.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lrpilot.core.checks import require_in, require_int, require_positive, require_range

__all__ = ["PICKS", "SweepResult", "centred", "choose_lr", "run_sweep", "smoothed", "sweep_lrs", "valley_edge"]


@dataclass
class SweepResult:
    """What the sweep measured and chose.

    Attributes:
        lr: the chosen LR, ``lr_at_min / divisor`` (``pick="minimum"``) or ``lr_at_edge / divisor``.
        lr_at_min: the ramp's LR at the smoothed loss's minimum.
        lr_at_edge: with ``pick="edge"``, the ramp's LR at the valley's upper edge (``None`` when the
            ramp never left the valley, and the minimum was used).
        lrs, losses: the LR and the raw training loss of every step taken.
        stopped: why the ramp ended: ``"end"`` (all steps), ``"diverging"`` or ``"nonfinite"``.
    """

    lr: float
    lr_at_min: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped: str = "end"
    lr_at_edge: float | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "lr_at_min": self.lr_at_min, "lr_at_edge": self.lr_at_edge, "steps": self.steps,
                "stopped": self.stopped,
                "lrs": list(self.lrs), "losses": list(self.losses)}


def sweep_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """The ramp: ``steps`` LRs from ``min_lr`` to ``max_lr``, evenly spaced in log scale."""
    if steps == 1:
        return [min_lr]
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smoothed(losses: Sequence[float], beta: float) -> list[float]:
    """The bias-corrected exponential moving average of ``losses`` (Adam's correction: the first value is
    the first loss, not ``(1 - beta)`` times it)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (i + 1)))
    return out


def centred(losses: Sequence[float], window: int) -> list[float]:
    """``c_i``, the mean of ``losses[i - window : i + window + 1]`` (fewer terms at the ends): no lag."""
    n = len(losses)
    return [sum(losses[max(0, i - window) : i + window + 1]) / (min(n, i + window + 1) - max(0, i - window))
            for i in range(n)]


#: ``smoothing="ema"``: the causal average LR finders usually choose from (fast.ai's ``lr_find``), kept
#: selectable for the ablation that shows its lag.
EMA_SELECTION_BETA = 0.98
SMOOTHINGS = ("centred", "ema")


#: ``pick="minimum"``: the LR at the curve's minimum; ``pick="edge"``: the LR where the curve leaves its
#: valley on the way up (the largest LR the valley holds).
PICKS = ("minimum", "edge")


def valley_edge(curve: Sequence[float], fraction: float, rise: float | None = None) -> int | None:
    """The index where ``curve`` leaves its valley towards larger LRs: the last index of the run of
    values ``<= min + min(fraction * (curve[0] - min), rise * min)`` that contains the (first) minimum,
    or ``None`` when that run reaches the end of the curve (the ramp never climbed out: no edge was seen).

    The valley's floor is flat and noisy on some networks (MNIST-1D's MLP: its minimum wanders between
    0.12 and 0.37 from seed to seed), its upper wall is where training starts to fail and is steep, so
    it moves little: an LR placed from the wall is steadier than one placed from the floor.

    ``rise`` bounds the valley by its own floor too: a loss ``1 + rise`` times the minimum is out of it,
    however far the start was above. Without it a batch-normalised ResNet-20, whose ramp starts at a loss
    of 3.7 and whose loss stays bounded at large LRs (the normalisation rescales the step), counted a
    bump to 1.16 over a floor of 0.74 as inside the valley and ran on to an edge at LR 3.0."""
    best = min(range(len(curve)), key=curve.__getitem__)
    above = fraction * (curve[0] - curve[best])
    if rise is not None:
        above = min(above, rise * curve[best])
    threshold = curve[best] + above
    edge = best
    while edge + 1 < len(curve) and curve[edge + 1] <= threshold:
        edge += 1
    return None if edge == len(curve) - 1 else edge


def choose_lr(lrs: Sequence[float], losses: Sequence[float], *, divisor: float, window: int,
              smoothing: str = "centred", pick: str = "minimum",
              edge_fraction: float = 0.2, edge_rise: float | None = None,
              edge_cap: float | None = None) -> tuple[float, float]:
    """``(lr_at_point / divisor, lr_at_point)`` for a finished ramp (``lrs[i]`` produced ``losses[i]``),
    on the centred average (default) or the causal EMA with ``beta = 0.98``. The point is the curve's
    first minimum (``pick="minimum"``) or its valley's upper edge (``pick="edge"``, see
    :func:`valley_edge`, at most ``edge_cap`` times the minimum's LR; the minimum when the ramp never
    left the valley)."""
    low, edge = _minimum_and_edge(lrs, losses, window=window, smoothing=smoothing, pick=pick,
                                  edge_fraction=edge_fraction, edge_rise=edge_rise, edge_cap=edge_cap)
    point = low if edge is None else edge
    return lrs[point] / divisor, lrs[point]


def _minimum_and_edge(lrs: Sequence[float], losses: Sequence[float], *, window: int, smoothing: str, pick: str,
                      edge_fraction: float, edge_rise: float | None,
                      edge_cap: float | None) -> tuple[int, int | None]:
    """The index of the smoothed curve's first minimum, and of its (capped) valley edge: ``None`` for
    ``pick="minimum"`` or when the ramp never left the valley."""
    if not losses or len(lrs) != len(losses):
        raise ValueError("choose_lr needs one LR per loss and at least one loss")
    require_in("pick", pick, PICKS, method="auto")
    curve = centred(losses, window) if smoothing == "centred" else smoothed(losses, EMA_SELECTION_BETA)
    low = min(range(len(curve)), key=curve.__getitem__)  # the first minimum
    edge = valley_edge(curve, edge_fraction, edge_rise) if pick == "edge" else None
    if edge is not None and edge_cap is not None:  # at most edge_cap times the minimum's LR
        while edge > low and lrs[edge] > edge_cap * lrs[low]:
            edge -= 1
    return low, edge


def run_sweep(
    step: Callable[[float], float],
    *,
    min_lr: float = 1e-4,
    max_lr: float = 10.0,
    steps: int = 200,
    divisor: float = 2.0,
    beta: float = 0.9,
    window: int = 10,
    divergence_factor: float = 4.0,
    smoothing: str = "centred",
    pick: str = "minimum",
    edge_fraction: float = 0.2,
    edge_rise: float | None = None,
    edge_cap: float | None = None,
) -> SweepResult:
    """Ramp the LR through ``step(lr) -> training loss`` and choose the LR (see the module docstring).

    ``step`` takes one optimizer step at ``lr`` and returns that step's loss (before the update); the
    ramp stops early once the loss is not finite or the smoothed loss passed ``divergence_factor`` times
    its minimum. A non-finite loss is not part of the curve the LR is chosen from.
    """
    require_positive("min_lr", min_lr, method="auto")
    require_range("max_lr", max_lr, min_lr, math.inf, open_low=True, open_high=True, method="auto")
    require_int("steps", steps, minimum=2, method="auto")
    require_range("divisor", divisor, 1.0, math.inf, open_high=True, method="auto")
    require_range("beta", beta, 0.0, 1.0, open_high=True, method="auto")
    require_int("window", window, method="auto")
    require_in("smoothing", smoothing, SMOOTHINGS, method="auto")
    require_in("pick", pick, PICKS, method="auto")
    require_range("edge_fraction", edge_fraction, 0.0, 1.0, open_low=True, method="auto")
    if edge_rise is not None:
        require_positive("edge_rise", edge_rise, method="auto")
    if edge_cap is not None:
        require_range("edge_cap", edge_cap, 1.0, math.inf, open_high=True, method="auto")
    require_range("divergence_factor", divergence_factor, 1.0, math.inf, open_low=True, open_high=True,
                  method="auto")
    lrs, losses, stopped = [], [], "end"
    avg, best = 0.0, math.inf
    for i, lr in enumerate(sweep_lrs(min_lr, max_lr, steps)):
        loss = float(step(lr))
        if not math.isfinite(loss):
            stopped = "nonfinite"
            break
        lrs.append(lr)
        losses.append(loss)
        avg = beta * avg + (1.0 - beta) * loss
        current = avg / (1.0 - beta ** (i + 1))
        best = min(best, current)
        if current > divergence_factor * best:
            stopped = "diverging"
            break
    if not losses:  # the very first step was not finite: the smallest LR is all we know to be safe
        return SweepResult(min_lr / divisor, min_lr, [], [], stopped)
    low, edge = _minimum_and_edge(lrs, losses, window=window, smoothing=smoothing, pick=pick,
                                  edge_fraction=edge_fraction, edge_rise=edge_rise, edge_cap=edge_cap)
    point = low if edge is None else edge
    return SweepResult(lrs[point] / divisor, lrs[low], lrs, losses, stopped,
                       lr_at_edge=None if edge is None else lrs[edge])
