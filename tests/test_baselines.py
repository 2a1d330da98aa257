"""The baseline schedules' exact LR trajectories, and LARS against a direct transcription of the paper."""

from __future__ import annotations

import math

import pytest
import torch

import lrpilot
from lrpilot.baselines.lars import LARS
from lrpilot.baselines.schedules import PlateauPilot
from lrpilot.core.contract import EpochSignals
from tests.conftest import TinyTask


def _lrs(method: str, epochs: int, **options) -> list[float]:
    task = TinyTask()
    hist = lrpilot.fit(task.model(), task.train, task.val, method=method, epochs=epochs, progress=False, **options)
    return [e.lr[0] for e in hist.epochs]


def test_step_decay_at_half_and_three_quarters():
    assert _lrs("sgd-step", 8, lr=0.1) == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_exponential_decay_reaches_final_factor():
    lrs = _lrs("sgd-exp", 5, lr=0.1, final_factor=0.01)
    gamma = 0.01 ** (1 / 5)
    assert lrs == pytest.approx([0.1 * gamma**k for k in range(5)])


def test_constant_sgd_keeps_its_lr():
    assert _lrs("sgd", 3, lr=0.05) == [0.05, 0.05, 0.05]


def test_onecycle_starts_low_peaks_and_ends_near_zero():
    task = TinyTask()
    hist = lrpilot.fit(task.model(), task.train, task.val, method="onecycle", epochs=10, lr=0.1, progress=False)
    lrs = [lr[0] for _, lr in hist.step_lr]
    assert lrs[0] == pytest.approx(0.1 / 25)
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.1)
    assert peak == pytest.approx(0.3 * 60, abs=1)
    # step_lr[t] is the LR after step t, i.e. the one step t + 1 uses: the last step (60) used step_lr[59].
    assert lrs[59] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_sgdr_restarts_after_t0_then_doubles():
    task = TinyTask()  # 6 steps per epoch
    hist = lrpilot.fit(task.model(), task.train, task.val, method="sgdr", epochs=7, lr=0.1, t0_epochs=1, progress=False)
    lr = {step: v[0] for step, v in hist.step_lr}
    assert lr[0] == lr[6] == lr[18] == pytest.approx(0.1)  # restarts at 6 steps, then 6 + 12
    assert lr[3] == pytest.approx(0.05)  # half way down the first cosine


def test_plateau_reduces_after_patience_bad_epochs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    pilot = PlateauPilot(opt, factor=0.1, patience=2)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, math.nan, 0.5]
    lrs, reasons = [], []
    for epoch, loss in enumerate(losses, start=1):
        d = pilot.on_epoch_end(EpochSignals(epoch, epoch, (opt.param_groups[0]["lr"],), 0.0, loss, 0.0))
        lrs.append(opt.param_groups[0]["lr"])
        reasons.append(d.reason if d else None)
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
    assert reasons[4] == "plateau-reduce"


def _lars_reference(w, g, v, lr, m, beta, eta):
    """Algorithm 1 of You et al. 2017, one tensor, written out with Python floats."""
    w_norm = math.sqrt(sum(x * x for x in w))
    g_norm = math.sqrt(sum(x * x for x in g))
    local = eta * w_norm / (g_norm + beta * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
    v = [m * vi + lr * local * (gi + beta * wi) for vi, gi, wi in zip(v, g, w)]
    return [wi - vi for wi, vi in zip(w, v)], v


def test_lars_matches_the_paper_step_by_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    opt = LARS([w], lr=2.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.01)
    ref_w, ref_v = w.detach().tolist(), [0.0] * 7
    for _ in range(20):
        g = torch.randn(7, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        ref_w, ref_v = _lars_reference(ref_w, g.tolist(), ref_v, 2.0, 0.9, 5e-4, 0.01)
        assert w.detach().tolist() == pytest.approx(ref_w, rel=1e-10, abs=1e-12)


def test_lars_exclude_1d_is_plain_sgd_momentum_on_biases():
    b = torch.nn.Parameter(torch.ones(3))
    opt = LARS([b], lr=0.5, momentum=0.0, exclude_1d=True)
    b.grad = torch.full((3,), 2.0)
    opt.step()
    assert b.detach().tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_lars_zero_weights_fall_back_to_trust_one():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.ones(4, 4)
    opt.step()
    assert torch.allclose(w, torch.full((4, 4), -0.1))
