"""Every optimizer with a multi-tensor (``torch._foreach_*``) path against its reference loop.

Each pair is built on identical copies of a small network (two param groups, a 1-D bias, a tensor whose
gradient is ``None``) and trained for a few steps on the same float32 batches on CPU. On CPU the
multi-tensor kernels are loops of the same single-tensor operations, so the weights and LRs agree
*exactly* (``torch.equal``); where a fast path reorders floating-point work the test says so and states
its tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lrpilot.baselines.lars import LARS
from lrpilot.pilots.lipschitz.optimizers import AdaMo, AutoAdam, LipschitzRMSprop

F = nn.functional
STEPS = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    net.unused = nn.Parameter(torch.ones(2))  # never gets a gradient
    return net


def _batch(t: int, *, val: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * t + 7 * val)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _groups(net: nn.Module) -> list[dict[str, Any]]:
    return [{"params": [net[0].weight, net[0].bias, net.unused]}, {"params": [net[2].weight, net[2].bias]}]


def _train(make: Callable[[nn.Module, bool], torch.optim.Optimizer], foreach: bool,
           step: Callable[..., Any] | None = None) -> tuple[list[torch.Tensor], list[Any]]:
    net = _net()
    opt = make(net, foreach)
    for t in range(STEPS):
        x, y = _batch(t)
        if step is None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        else:
            step(opt, net, x, y, t)
    lrs = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    return [p.detach().clone() for p in net.parameters()], lrs


def assert_same(make: Callable[[nn.Module, bool], torch.optim.Optimizer], step: Callable[..., Any] | None = None,
                *, atol: float = 0.0) -> None:
    ref_w, ref_groups = _train(make, False, step)
    fast_w, fast_groups = _train(make, True, step)
    for a, b in zip(ref_w, fast_w):
        if atol == 0.0:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for ga, gb in zip(ref_groups, fast_groups):
        ga.pop("foreach", None), gb.pop("foreach", None)
        assert ga.keys() == gb.keys()
        for k in ga:
            va, vb = ga[k], gb[k]
            if isinstance(va, torch.Tensor):
                va, vb = va.tolist(), vb.tolist()
            if atol == 0.0 or not isinstance(va, float):
                assert va == vb or (va != va and vb != vb), (k, va, vb)
            else:
                assert va == pytest.approx(vb, rel=1e-5, abs=atol), (k, va, vb)
    assert any(not torch.equal(a, b) for a, b in zip(ref_w, [p.detach() for p in _net().parameters()]))


@pytest.mark.parametrize("options", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.0, "exclude_1d": True, "trust_coefficient": 0.01},
])
def test_lars_foreach_equals_the_reference_loop(options: dict[str, Any]) -> None:
    assert_same(lambda net, fe: LARS(_groups(net), lr=0.5, foreach=fe, **options))


def _lipschitz_step(opt: torch.optim.Optimizer, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step(lipschitz=2.0 + t, grad_sq=0.5 + 0.1 * t, k_z=10.0 + t)


@pytest.mark.parametrize("make", [
    lambda net, fe: AdaMo(_groups(net), weight_decay=1e-3, bias_correction="moments", foreach=fe),
    lambda net, fe: AdaMo(_groups(net), foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), weight_decay=1e-3, bias_correction="moments", foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), eps_inside_sqrt=False, k1_init=1.0, k2_init=1e-6, foreach=fe),
    lambda net, fe: LipschitzRMSprop(_groups(net), foreach=fe),
], ids=["adamo-wd-bc", "adamo", "auto-adam-wd-bc", "auto-adam-eps-outside", "lipschitz-rmsprop"])
def test_lipschitz_optimizers_foreach_equal_the_reference_loop(make: Callable[[nn.Module, bool], Any]) -> None:
    assert_same(make, _lipschitz_step)
