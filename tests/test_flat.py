"""The hypergradient optimizers' flat layout (``pilots/hypergradient/flat.py``, the one-step default):
the rule in closed form, agreement with the per-tensor path (bit for bit the reference loop's) to float
rounding, the state it hands out, resume, fallbacks, non-finite gradients and bad options."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrpilot.pilots.hypergradient.optimizers import RTHPO, SGDHD, SGDHDVal


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(t: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(t)
    return (torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g),
            torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g))


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, *, val: bool = False,
           drop_grad: int | None = None) -> list[float]:
    """``steps`` steps; the LR of the first group after each. ``drop_grad``: the step whose last tensor
    gets no gradient (as a frozen layer would)."""
    lrs = []
    for t in steps:
        x, y, xv, yv = _batch(t)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        if t == drop_grad:
            list(net.parameters())[-1].grad = None
        if val:
            opt.step(val_closure=lambda xv=xv, yv=yv: F.cross_entropy(net(xv), yv))
        else:
            opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _groups(net: nn.Module, groups: int) -> Any:
    if groups == 1:
        return net.parameters()
    return [{"params": list(net[0].parameters())},
            {"params": [*net[2].parameters(), *net[4].parameters()], "lr": 0.05}]


# ------------------------------------------------------------------------------------------------------
# the rule in closed form
# ------------------------------------------------------------------------------------------------------
def test_two_steps_in_closed_form() -> None:
    """w = (w1, w2) with scripted gradients: step 1 keeps the LR (a = 0) and sets m = a = g1; step 2 moves
    the LR by exp(beta cos(g2, a)), then m = mu m + g2, a = gamma a + m, w -= lr m."""
    w1, w2 = nn.Parameter(torch.zeros(2, dtype=torch.float64)), nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SGDHD([w1, w2], lr=0.1, beta=0.5, momentum=0.9, tangent_decay=0.8, weight_decay=0.0)
    g1 = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0], dtype=torch.float64)
    g2 = torch.tensor([0.5, -1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    for g in (g1, g2):
        w1.grad, w2.grad = g[:2].clone(), g[2:].clone()
        opt.step()
        if g is g1:
            assert opt.param_groups[0]["lr"] == 0.1 and opt._flat is not None
            assert torch.equal(torch.cat([w1, w2]).detach(), -0.1 * g1)
    cos = float(g2 @ g1 / (g2.norm() * g1.norm()))
    lr = 0.1 * math.exp(0.5 * cos)
    m = 0.9 * g1 + g2
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
    assert opt.param_groups[0]["hypergrad"] == pytest.approx(-cos, rel=1e-15)
    assert torch.allclose(torch.cat([w1, w2]).detach(), -0.1 * g1 - lr * m, rtol=0, atol=1e-15)
    state = opt.state[w1]
    assert torch.allclose(torch.cat([state["momentum_buffer"], opt.state[w2]["momentum_buffer"]]), m, atol=1e-15)
    assert torch.allclose(torch.cat([state["direction"], opt.state[w2]["direction"]]), 0.8 * g1 + m, atol=1e-15)


# ------------------------------------------------------------------------------------------------------
# against the per-tensor path (whose default is bit for bit the reference loop: tests/test_foreach.py)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("options", [
    {},
    {"weight_decay": 1e-3, "nesterov": True},
    {"lr_update": "after-step", "min_lr": 0.095, "max_lr": 0.1},  # the LR wanders 0.091-0.103: both clamps
])
@pytest.mark.parametrize("make", [SGDHD, SGDHDVal], ids=["hd-train", "hd-val"])
def test_flat_agrees_with_the_per_tensor_path(make: type, options: dict[str, Any], groups: int) -> None:
    """60 steps, LR high enough that the LR, the momentum and the tangent all move: every LR to 1e-6
    relative, weights and state to 1e-5; the same counters. Only the cosine's sums differ in order."""
    runs = []
    for flat in (False, None):
        net = _net()
        opt = make(_groups(net, groups), flat=flat, **{"lr": 0.1, **options})
        lrs = _train(net, opt, range(60), val=make is SGDHDVal)
        assert (opt._flat is not None) == (flat is None)
        runs.append((lrs, opt, net))
    (ref_lrs, ref_opt, ref_net), (lrs, opt, net) = runs
    assert lrs == pytest.approx(ref_lrs, rel=1e-6) and lrs[-1] != lrs[0]
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for gr, ref in zip(opt.param_groups, ref_opt.param_groups):
        assert gr["lr"] == pytest.approx(ref["lr"], rel=1e-6)
        assert (gr["lr_clamped"], gr["lr_skipped"]) == (ref["lr_clamped"], ref["lr_skipped"])
    if "max_lr" in options:
        assert opt.param_groups[0]["lr_clamped"] > 0  # the clamp was exercised
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert sorted(opt.state[p]) == sorted(ref_opt.state[q])
        for key in ("momentum_buffer", "direction"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_hd_val_without_a_validation_row_agrees_too(monkeypatch: pytest.MonkeyPatch, groups: int) -> None:
    """On large tensors hd-val's validation gradient gets no row (flat.VAL_ROW_MAX_MEAN_NUMEL): its sums are
    dot products tensor by tensor. Forced here on the small net: the same agreement, and the layout has no
    validation row."""
    from lrpilot.pilots.hypergradient import flat as flat_module

    runs = []
    for flat, limit in ((False, flat_module.VAL_ROW_MAX_MEAN_NUMEL), (None, 0), (None, flat_module.VAL_ROW_MAX_MEAN_NUMEL)):
        monkeypatch.setattr(flat_module, "VAL_ROW_MAX_MEAN_NUMEL", limit)
        net = _net()
        opt = SGDHDVal(_groups(net, groups), lr=0.1, flat=flat, weight_decay=1e-3)
        runs.append((_train(net, opt, range(40), val=True), net, opt))
    (ref_lrs, ref_net, _), (lrs, net, opt), (row_lrs, _, row_opt) = runs
    assert opt._flat.val_row is None and opt._flat.rows == 3 and row_opt._flat.val_row == 2
    assert lrs == pytest.approx(ref_lrs, rel=1e-6) and row_lrs == pytest.approx(ref_lrs, rel=1e-6)
    assert lrs[-1] != lrs[0]
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_default_takes_the_flat_layout_and_reads_the_host_once() -> None:
    from lrpilot.core.host_reads import count_host_reads

    net = _net()
    opt = SGDHD(net.parameters(), lr=0.1)
    _train(net, opt, range(2))
    with count_host_reads() as reads:
        _train(net, opt, range(2, 5))
    assert opt._flat is not None and reads.count == 3
    # the state torch's API shows is the usual per-parameter tensors, and they are the flat buffer's
    for p in net.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape and opt._flat.owns(opt.state[p]["direction"])


# ------------------------------------------------------------------------------------------------------
# state: checkpoints, resume, adoption
# ------------------------------------------------------------------------------------------------------
def test_state_dict_hands_out_copies_and_resume_continues_bit_for_bit() -> None:
    net = _net()
    opt = SGDHD(net.parameters(), lr=0.1)
    _train(net, opt, range(10))
    saved = copy.deepcopy(opt.state_dict())
    saved_weights = copy.deepcopy(net.state_dict())
    live = opt.state_dict()
    for entry in (v for k, v in live["state"].items() if k != "hypergradient"):
        for t in entry.values():
            assert isinstance(t, torch.Tensor) and t._base is None  # copies: a checkpoint is not the buffer
    before = live["state"][0]["momentum_buffer"].clone()
    lrs = _train(net, opt, range(10, 20))
    assert torch.equal(live["state"][0]["momentum_buffer"], before)  # training does not write into it

    again = _net()
    again.load_state_dict(saved_weights)
    resumed = SGDHD(again.parameters(), lr=0.1)
    resumed.load_state_dict(saved)
    assert _train(again, resumed, range(10, 20)) == lrs
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_a_per_tensor_checkpoint_continues_on_the_flat_layout() -> None:
    """Adoption: state saved by the per-tensor path is copied into the buffer; the run continues as the
    per-tensor one would, to float rounding."""
    net = _net()
    ref = SGDHD(net.parameters(), lr=0.1, flat=False)
    _train(net, ref, range(10))
    saved, weights = copy.deepcopy(ref.state_dict()), copy.deepcopy(net.state_dict())
    ref_lrs = _train(net, ref, range(10, 30))
    other = _net()
    other.load_state_dict(weights)
    opt = SGDHD(other.parameters(), lr=0.1)
    opt.load_state_dict(saved)
    assert _train(other, opt, range(10, 30)) == pytest.approx(ref_lrs, rel=1e-6) and opt._flat is not None
    for a, b in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_step_without_every_gradient_takes_the_per_tensor_path_then_flat_resumes() -> None:
    runs = []
    for flat in (False, None):
        net = _net()
        opt = SGDHD(net.parameters(), lr=0.1, flat=flat)
        runs.append((_train(net, opt, range(30), drop_grad=12), net, opt))
    (ref_lrs, ref_net, _), (lrs, net, opt) = runs
    assert lrs == pytest.approx(ref_lrs, rel=1e-6)
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert opt._flat is not None and all(opt._flat.owns(opt.state[p]["direction"]) for p in net.parameters())


def test_a_frozen_layer_is_left_out_of_the_layout_and_alone() -> None:
    """requires_grad=False parameters in the optimizer (a frozen layer): the flat path still runs, on the
    others, as the per-tensor path does; the frozen ones neither move nor get state. Unfreezing lays out
    again."""
    runs = []
    for flat in (False, None):
        net = _net()
        net[0].requires_grad_(False)
        frozen = [p.detach().clone() for p in net[0].parameters()]
        opt = SGDHD(net.parameters(), lr=0.1, flat=flat)
        lrs = _train(net, opt, range(20))
        assert all(torch.equal(a, b) for a, b in zip(frozen, net[0].parameters()))
        assert all(not opt.state[p] for p in net[0].parameters())
        runs.append((lrs, net, opt))
    (ref_lrs, ref_net, _), (lrs, net, opt) = runs
    assert opt._flat is not None and len(opt._flat.all_params) == 4
    assert lrs == pytest.approx(ref_lrs, rel=1e-6)
    for a, b in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    net[0].requires_grad_(True)
    _train(net, opt, range(20, 22))
    assert len(opt._flat.all_params) == 6 and opt._flat.owns(opt.state[net[0].weight]["direction"])


def test_a_new_param_group_is_laid_out_afresh() -> None:
    net = _net()
    opt = SGDHD(net[0].parameters(), lr=0.1)
    _train(net, opt, range(3))
    first = opt._flat
    momentum = opt.state[net[0].weight]["momentum_buffer"].clone()
    opt.add_param_group({"params": [*net[2].parameters(), *net[4].parameters()]})
    x, y, _, _ = _batch(3)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    g = net[0].weight.grad.clone()
    opt.step()
    assert opt._flat is not first and len(opt._flat.segments) == 2
    torch.testing.assert_close(opt.state[net[0].weight]["momentum_buffer"], 0.9 * momentum + g)  # carried over
    torch.testing.assert_close(opt.state[net[4].bias]["momentum_buffer"], net[4].bias.grad)  # started at zero


# ------------------------------------------------------------------------------------------------------
# non-finite gradients and bad options
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_gradient_moves_nothing(bad: float) -> None:
    net = _net()
    opt = SGDHD(net.parameters(), lr=0.1)
    _train(net, opt, range(5))
    weights = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in opt.state[net[2].weight].items()}
    lr = opt.param_groups[0]["lr"]
    x, y, _, _ = _batch(5)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    net[2].weight.grad[0, 0] = bad
    out = opt.step(lambda: torch.tensor(1.0))
    assert math.isnan(float(out)) and opt.steps_skipped == 1
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["lr_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    assert all(torch.equal(v, opt.state[net[2].weight][k]) for k, v in state.items())
    _train(net, opt, range(6, 8))  # and it goes on
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_half_precision_keeps_the_per_tensor_path() -> None:
    net = _net().to(torch.bfloat16)
    opt = SGDHD(net.parameters(), lr=0.1)
    x, y, _, _ = _batch(0)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x.to(torch.bfloat16)), y).backward()
        opt.step()
    assert opt._flat is None


@pytest.mark.parametrize("options", [{"lr_rule": "additive"}, {"momentum": 0.0}, {"tangent_decay": 1.0},
                                     {"foreach": False}])
def test_flat_true_where_the_form_is_not_flat_says_which_form_is(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"flat=True is the one-step horizon's default form only"):
        SGDHD(_net().parameters(), lr=0.1, flat=True, **options)
    with pytest.raises(ValueError, match=r"flat=True"):
        RTHPO(_net().parameters(), lr=0.1, flat=True)
    with pytest.raises(ValueError, match=r"flat"):
        SGDHD(_net().parameters(), lr=0.1, flat="yes")


def test_channels_last_weights_keep_their_layout_and_agree() -> None:
    """The buffer's views are contiguous; a channels-last conv weight is updated through them elementwise
    and keeps its own memory format."""
    finals = []
    for flat in (False, None):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        net = net.to(memory_format=torch.channels_last)
        opt = SGDHD(net.parameters(), lr=0.1, flat=flat)
        for t in range(20):
            g = torch.Generator().manual_seed(t)
            x = torch.randn(16, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
            opt.zero_grad()
            F.cross_entropy(net(x), torch.randint(0, 4, (16,), generator=g)).backward()
            opt.step()
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert (opt._flat is not None) == (flat is None)
        finals.append((net, opt.param_groups[0]["lr"]))
    (ref, ref_lr), (net, lr) = finals
    assert lr == pytest.approx(ref_lr, rel=1e-6) and lr != 0.1
    for a, b in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
