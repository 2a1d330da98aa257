"""Every optimizer with a multi-tensor (``torch._foreach_*``) path against its reference loop.

Each pair is built on identical copies of a small network (two param groups, a 1-D bias, a tensor whose
gradient is ``None``) and trained for a few steps on the same float32 batches on CPU. On CPU the
multi-tensor kernels are loops of the same single-tensor operations, so the weights and LRs agree
*exactly* (``torch.equal``); where a fast path reorders floating-point work the test says so and states
its tolerance.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lrpilot.baselines.lars import LARS
from lrpilot.pilots.hypergradient import RTHPO, SGDHD, SGDHDVal
from lrpilot.pilots.hyperreg.optimizer import HyperRegularization
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
        for key in ("foreach", "fused"):  # which kernel ran: the only values that may differ
            ga.pop(key, None), gb.pop(key, None)
        assert ga.keys() == gb.keys()
        for k in ga:
            va, vb = ga[k], gb[k]
            if isinstance(va, torch.Tensor):
                va, vb = va.tolist(), vb.tolist()
            if atol == 0.0 or not isinstance(va, float):
                both_nan = isinstance(va, float) and math.isnan(va) and math.isnan(vb)
                assert va == vb or both_nan, (k, va, vb)
            else:
                assert va == pytest.approx(vb, rel=1e-5, abs=atol), (k, va, vb)
    assert any(not torch.equal(a, b) for a, b in zip(ref_w, [p.detach() for p in _net().parameters()]))


@pytest.mark.parametrize("options", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.0, "exclude_1d": True, "trust_coefficient": 0.01},
])
def test_lars_foreach_equals_the_reference_loop(options: dict[str, Any]) -> None:
    assert_same(lambda net, fe: LARS(_groups(net), lr=0.5, foreach=fe, fold=False, **options))


@pytest.mark.parametrize("options", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.5},
    {"momentum": 0.0, "exclude_1d": True, "trust_coefficient": 0.5},
    {"momentum": 0.9, "exclude_1d": True, "weight_decay": 1e-2, "trust_coefficient": 0.5},
])
def test_lars_folded_default_is_the_reference_within_rounding(options: dict[str, Any]) -> None:
    """fold=True (the default) adds lr * ratio * g into the momentum in one kernel: the same update,
    rounded once more or less per step (float32 weights of size ~1 agree to 1e-6 after the run, where the
    steps are ~0.1: a ratio off by 1e-4 fails)."""
    # Whether the two paths also agree bit for bit depends on the CPU's kernels (they differ on one machine
    # and agree on another, where both multiply-adds round alike), so only the tolerance is asserted; it is
    # tight enough to catch a ratio or an LR off by 1e-4 and a dropped decay term (checked by mutation).
    assert_same(lambda net, fe: LARS(_groups(net), lr=0.5, foreach=None if fe else False, **options), atol=1e-6)


def _lipschitz_step(opt: torch.optim.Optimizer, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step(lipschitz=2.0 + t, grad_sq=0.5 + 0.1 * t, k_z=10.0 + t)


@pytest.mark.parametrize("make", [
    lambda net, fe: AdaMo(_groups(net), weight_decay=1e-3, bias_correction="moments", foreach=fe),
    lambda net, fe: AdaMo(_groups(net), foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), weight_decay=1e-3, bias_correction="moments", foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), eps_inside_sqrt=False, k1_init=1.0, k2_init=1e-6, foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), eps_inside_sqrt=False, bias_correction="moments", eps=1e-3, foreach=fe),
    lambda net, fe: LipschitzRMSprop(_groups(net), foreach=fe),
], ids=["adamo-wd-bc", "adamo", "auto-adam-wd-bc", "auto-adam-eps-outside", "auto-adam-eps-outside-bc",
        "lipschitz-rmsprop"])
def test_lipschitz_optimizers_foreach_equal_the_reference_loop(make: Callable[[nn.Module, bool], Any]) -> None:
    assert_same(make, _lipschitz_step)


def _reloading_step(opt: Any, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    """A Lipschitz step that reloads the optimizer's own state first at step 3 (what a rollback does):
    the state tensors are replaced, so nothing cached for the old ones may be used again."""
    if t == 3:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _lipschitz_step(opt, net, x, y, t)


@pytest.mark.parametrize("make", [
    lambda net, fe: AutoAdam(_groups(net), weight_decay=1e-3, bias_correction="moments", foreach=fe),
    lambda net, fe: LipschitzRMSprop(_groups(net), foreach=fe),
], ids=["auto-adam-wd-bc", "lipschitz-rmsprop"])
def test_a_state_reload_keeps_foreach_equal_to_the_reference(make: Callable[[nn.Module, bool], Any]) -> None:
    assert_same(make, _reloading_step)


def _falling_lipschitz_step(opt: Any, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    """A Lipschitz constant that falls 3x per step (dying activations): the step size would run away."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step(lipschitz=2.0 / 3**t, grad_sq=0.5, k_z=10.0 / 3**t)


@pytest.mark.parametrize("make", [
    lambda net, fe: AutoAdam(_groups(net), k1_init=1.0, k2_init=1e-6, max_lr=0.01, max_lr_growth=0.01, foreach=fe),
    lambda net, fe: AutoAdam(_groups(net), weight_decay=1e-3, max_lr=2e-3, foreach=fe),
    lambda net, fe: LipschitzRMSprop(_groups(net), max_lr_growth=0.05, foreach=fe),
    lambda net, fe: AdaMo(_groups(net), initial_lr=0.1, steps_per_epoch=2, k1_start="continuous", foreach=fe),
], ids=["auto-adam-default-caps", "auto-adam-max-lr", "lipschitz-rmsprop-growth", "adamo-continuous"])
def test_the_caps_and_starts_keep_foreach_equal_to_the_reference(make: Callable[[nn.Module, bool], Any]) -> None:
    """The step-size caps (auto-adam's defaults) and AdaMo's continuous start, where they bind."""
    assert_same(make, _falling_lipschitz_step)
    _, groups = _train(make, False, _falling_lipschitz_step)
    assert groups[0]["lipschitz_lr"] > 0


def _reference_or_fused(cls: type, **options: Any) -> Callable[[nn.Module, bool], Any]:
    """The reference loop (``fe`` False) against the fused kernel (``fe`` True)."""
    return lambda net, fe: cls(_groups(net), **options, **({"fused": True} if fe else {"foreach": False}))


@pytest.mark.parametrize("make", [
    _reference_or_fused(AutoAdam, k1_init=1.0, k2_init=1e-6, max_lr=0.01, max_lr_growth=0.01),
    _reference_or_fused(AutoAdam, weight_decay=1e-3, bias_correction="moments"),
    _reference_or_fused(AutoAdam, eps_inside_sqrt=False, k1_init=1.0, k2_init=1e-6),
    _reference_or_fused(AutoAdam, bias_correction="all", k1_init=1.0, k2_init=1e-6, eps=1e-3),
    _reference_or_fused(LipschitzRMSprop),
    _reference_or_fused(LipschitzRMSprop, weight_decay=1e-3, bias_correction="moments", eps_inside_sqrt=False),
], ids=["auto-adam-defaults", "auto-adam-wd-bc", "auto-adam-eps-outside", "auto-adam-all-big-eps", "lipschitz-rmsprop",
        "lipschitz-rmsprop-wd-bc-eps-outside"])
def test_the_fused_kernel_is_within_a_few_ulps_of_the_reference(make: Callable[[nn.Module, bool], Any]) -> None:
    """fused=True (the registry's default since issue 19) is not bit-identical (the kernel's lerp and rounding
    order): after 6 steps the weights (of order 0.1-1) agree to 1e-6 (measured: at most 2.1e-7), the step
    sizes to 1e-5 relative."""
    assert_same(make, _lipschitz_step, atol=1e-6)


@pytest.mark.parametrize("method", ["auto-adam", "lipschitz-rmsprop"])
def test_the_registry_runs_the_fused_kernel_and_fused_false_the_reference(method: str) -> None:
    """The methods as users get them take the fused kernel; ``-o fused=False`` the multi-tensor path."""
    from lrpilot.core.registry import BuildContext, get_method, resolve_options

    info = get_method(method)
    assert info.defaults["fused"] is True
    for fused in (True, False):
        net = _net()
        ctx = BuildContext(model=net, epochs=2, steps_per_epoch=10)
        opt = info.build(ctx, **resolve_options(info, {"fused": fused})).optimizer
        while not isinstance(opt, (AutoAdam, LipschitzRMSprop)):  # the guard and cooldown wrap it
            opt = opt.optimizer if hasattr(opt, "optimizer") else opt.inner
        assert all(g["fused"] is fused for g in opt.param_groups)


def test_the_fused_kernel_leaves_the_gradients_alone_and_refuses_foreach_false() -> None:
    net = _net()
    opt = AutoAdam(_groups(net), fused=True, weight_decay=0.1)
    x, y = _batch(0)
    F.cross_entropy(net(x), y).backward()
    grads = {id(p): p.grad.clone() for p in net.parameters() if p.grad is not None}
    opt.step(lipschitz=2.0, grad_sq=0.5)
    assert all(torch.equal(grads[id(p)], p.grad) for p in net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="fused"):
        AutoAdam(_groups(net), fused=True, foreach=False)
    with pytest.raises(ValueError, match="fused"):
        LipschitzRMSprop(_groups(net), fused="yes")


def _val_step(opt: torch.optim.Optimizer, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    xv, yv = _batch(t, val=True)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step(val_closure=lambda: F.cross_entropy(net(xv), yv))


def _rthpo_step(opt: torch.optim.Optimizer, net: nn.Module, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
    xv, yv = _batch(t, val=True)
    opt.step(lambda: F.cross_entropy(net(x), y), val_closure=lambda: F.cross_entropy(net(xv), yv))


@pytest.mark.parametrize(("make", "step"), [
    (lambda net, fe: SGDHD(_groups(net), lr=0.05, beta=0.01, foreach=fe), None),
    (lambda net, fe: SGDHD(_groups(net), lr=0.05, beta=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3,
                           foreach=fe), None),
    (lambda net, fe: SGDHDVal(_groups(net), lr=0.05, beta=0.01, momentum=0.5, foreach=fe), _val_step),
    (lambda net, fe: RTHPO(_groups(net), lr=0.05, beta=0.01, foreach=fe), _rthpo_step),
    (lambda net, fe: RTHPO(_groups(net), lr=0.05, beta=0.01, momentum=0.9, weight_decay=1e-3, foreach=fe),
     _rthpo_step),
    # the robustness study's options beside the defaults above (multiplicative, decay 0.99, clip, momentum
    # 0.9): a fast decay with the raw gradients accumulated, a decay per group, a clip that bites
    (lambda net, fe: SGDHD(_groups(net), lr=0.05, beta=0.05, momentum=0.0, tangent_decay=0.5, foreach=fe), None),
    (lambda net, fe: SGDHDVal([{**g, "tangent_decay": d} for g, d in zip(_groups(net), (0.9, 1.0))], lr=0.05,
                              weight_decay=1e-3, foreach=fe), _val_step),
    (lambda net, fe: RTHPO([{**g, "tangent_decay": d} for g, d in zip(_groups(net), (0.5, 0.9))], lr=0.05,
                           beta=0.05, nesterov=True, foreach=fe), _rthpo_step),
    # the paper-literal form: additive step, vanilla SGD, undecayed and unclipped tangent
    (lambda net, fe: SGDHD(_groups(net), lr=0.05, beta=0.01, momentum=0.0, lr_rule="additive", tangent_decay=1.0,
                           foreach=fe), None),
    (lambda net, fe: RTHPO(_groups(net), lr=0.05, beta=0.01, momentum=0.0, lr_rule="additive", tangent_decay=1.0,
                           tangent_clip=False, foreach=fe), _rthpo_step),
], ids=["hd-train", "hd-train-nesterov-wd", "hd-val-momentum", "rt-hpo", "rt-hpo-momentum-wd",
        "hd-train-decay-0.5", "hd-val-decay-per-group-wd", "rt-hpo-decay-per-group-nesterov",
        "hd-train-paper", "rt-hpo-paper"])
def test_hypergradient_foreach_equals_the_reference_loop(make: Callable[..., Any], step: Any) -> None:
    assert_same(make, step)


# ------------------------------------------------------------------------------------------------------
# never apply a non-finite gradient
# ------------------------------------------------------------------------------------------------------
def _poison(net: nn.Module) -> None:
    net[2].weight.grad[0, 0] = float("nan")


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad_step", [0, 3])
@pytest.mark.parametrize("cls", ["hd-train", "hd-val", "rt-hpo"])
def test_a_nonfinite_gradient_is_never_applied(cls: str, bad_step: int, foreach: bool) -> None:
    """At step ``bad_step`` one entry of one group's gradient is nan (the loss is finite): no weight of
    any group, momentum buffer or LR moves, ``lr_skipped`` counts the skip in every group, and the next
    finite step goes on as usual."""
    net = _net()
    kw = {"lr": 0.05, "beta": 0.01, "momentum": 0.9, "foreach": foreach}
    opt = {"hd-train": SGDHD, "hd-val": SGDHDVal, "rt-hpo": RTHPO}[cls](_groups(net), **kw)
    for t in range(bad_step + 2):
        x, y = _batch(t)
        xv, yv = _batch(t, val=True)
        def val(xv: torch.Tensor = xv, yv: torch.Tensor = yv) -> torch.Tensor:
            return F.cross_entropy(net(xv), yv)
        before = [p.detach().clone() for p in net.parameters()]
        bufs = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.parameters()
                if "momentum_buffer" in opt.state[p]}
        lrs = [g["lr"] for g in opt.param_groups]
        skipped = [g["lr_skipped"] for g in opt.param_groups]
        if cls == "rt-hpo":
            def closure(*, backward: bool = True, x: torch.Tensor = x, y: torch.Tensor = y,
                        t: int = t) -> torch.Tensor:
                out = F.cross_entropy(net(x), y)
                if t == bad_step:  # a finite loss (+ 0) whose gradient is nan in one entry (0 * 1/sqrt(0))
                    out = out + (net[2].weight[0, 0] * 0).sqrt() * 0
                return out
            opt.step(closure, val_closure=val)
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if t == bad_step:
                _poison(net)
            opt.step(val_closure=val) if cls == "hd-val" else opt.step()
        if t == bad_step:
            assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
            for p in net.parameters():
                if id(p) in bufs:
                    assert torch.equal(bufs[id(p)], opt.state[p]["momentum_buffer"])
            assert [g["lr"] for g in opt.param_groups] == lrs
            assert [g["lr_skipped"] for g in opt.param_groups] == [s + 1 for s in skipped]
        else:
            assert all(torch.isfinite(p).all() for p in net.parameters())
            assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("options", [
    {"divergence": "kl", "algorithm": 1},
    {"divergence": "chi2", "algorithm": 2, "weight_decay": 1e-3, "warmup_steps": 2},
    {"divergence": "rkl", "algorithm": 3, "wd_in_beta": False, "weight_decay": 1e-3},
    {"divergence": "hellinger", "algorithm": 1, "scope": "tensor"},
    {"divergence": "kl", "algorithm": 2, "scope": "global", "growth_clip": None},
], ids=["kl-1", "chi2-2-wd-warmup", "rkl-3-wd", "hellinger-1-tensor", "kl-2-global"])
def test_hyperreg_foreach_equals_the_reference_loop(options: dict[str, Any]) -> None:
    assert_same(lambda net, fe: HyperRegularization(_groups(net), lr=0.1, foreach=fe, **options))


# ------------------------------------------------------------------------------------------------------
# the registry's default form, over many steps: the fast path against the reference loop (the code the
# published benchmark results came from), weights, param groups and every state tensor bit for bit
# ------------------------------------------------------------------------------------------------------
def _state_tensors(opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, torch.Tensor):
                out.append((f"{i}.{key}", value))
    return out


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("cls", ["hd-train", "hd-val", "rt-hpo"])
def test_the_default_form_is_bit_identical_to_the_reference_over_many_steps(cls: str, groups: int) -> None:
    """The registry's defaults (multiplicative rule, momentum 0.9, tangent_decay 0.99, rt-hpo's clip):
    40 steps of a 3-layer MLP, the per-tensor multi-tensor path (``foreach=None``, ``flat=False``) against
    the reference loop (``foreach=False``), with a LR high enough that the LR, the momentum and the tangent all
    move. (The flat layout, the one-step default, agrees to float rounding: tests/test_flat.py.)"""
    from lrpilot.core.registry import get_method

    defaults = get_method(cls).defaults
    kw = {k: v for k, v in defaults.items() if k not in ("rollback", "cooldown", "objective")}
    kw["flat"] = False
    make = {"hd-train": SGDHD, "hd-val": SGDHDVal, "rt-hpo": RTHPO}[cls]
    results = []
    for foreach in (False, None):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
        params: Any = net.parameters() if groups == 1 else [
            {"params": list(net[0].parameters())},
            {"params": [*net[2].parameters(), *net[4].parameters()], "lr": 0.05},
        ]
        opt = make(params, foreach=foreach, **kw)
        for t in range(40):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
            xv, yv = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
            def val(xv: torch.Tensor = xv, yv: torch.Tensor = yv, net: nn.Module = net) -> torch.Tensor:
                return F.cross_entropy(net(xv), yv)
            if cls == "rt-hpo":
                opt.step(lambda x=x, y=y, net=net: F.cross_entropy(net(x), y), val_closure=val)
            else:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step(val_closure=val) if cls == "hd-val" else opt.step()
        results.append(([p.detach().clone() for p in net.parameters()],
                        [{k: v for k, v in gr.items() if k not in ("params", "foreach")} for gr in opt.param_groups],
                        [(k, v.clone()) for k, v in _state_tensors(opt)]))
    (ref_w, ref_g, ref_s), (fast_w, fast_g, fast_s) = results
    assert all(torch.equal(a, b) for a, b in zip(ref_w, fast_w))
    assert ref_g == fast_g  # every LR, hypergradient and counter, exactly
    assert [k for k, _ in ref_s] == [k for k, _ in fast_s] and ref_s
    for (k, a), (_, b) in zip(ref_s, fast_s):
        assert torch.equal(a, b), k
    assert all(g["lr_skipped"] == 0 for g in ref_g)
    assert ref_g[0]["lr"] != defaults["lr"]  # the LR moved


def test_the_fused_reductions_equal_the_reference_ones() -> None:
    """``_dot_rows`` (one stack, a row sum) equals ``_dot`` row by row, and the cosine finished on the
    host from the device's sums and square roots equals ``_cosine`` on the device, bit for bit, over
    tensors of many sizes and scales, zeros, infinities and nan included."""
    from lrpilot.pilots.hypergradient import optimizers as o

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = 1 + trial % 9
        shapes = [(1 + (trial * 7 + i) % 13, 1 + i % 3) if i % 2 else (1 + (trial + i) % 17,) for i in range(n)]
        scale = 10.0 ** ((trial % 21) - 10)
        a = [torch.randn(s, generator=gen) * scale for s in shapes]
        b = [torch.randn(s, generator=gen) * 10.0 ** ((trial % 7) - 3) for s in shapes]
        if trial % 50 == 1:
            b = [torch.zeros(s) for s in shapes]
        if trial % 50 == 2:
            a[0].view(-1)[0] = math.inf
        if trial % 50 == 3:
            b[-1].view(-1)[0] = math.nan
        ref = a[0]
        fa, fb = o._flats(a), o._flats(b)
        rows = o._dot_rows([(fa, fb), (fa, fa), (fb, fb)])
        for got, want in zip(rows.unbind(0), (o._dot(a, b, ref=ref), o._dot(a, a, ref=ref), o._dot(b, b, ref=ref))):
            assert torch.equal(got, want) or (got.isnan() and want.isnan())
        want_cos = o._cosine(o._dot(a, b, ref=ref), a, b, ref=ref).item()
        got = o._cosine_sums(fa, fb, a if trial % 2 else None).tolist()
        half = len(got) // 2
        got_cos = o._host_cosine(got[0], got[half + 1], got[half + 2], torch.float32)
        assert got_cos == want_cos or (math.isnan(got_cos) and math.isnan(want_cos)), (trial, got_cos, want_cos)
        if half == 4:  # the finiteness flag rode along: finite exactly when _finite_flag's is
            assert math.isfinite(got[3]) == math.isfinite(o._finite_flag(a).item())

# the cached 0-d scalar operands (core/foreach.py)
# ------------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.9, 0.999, 1 - 0.999, 1e-8, 1 / 3, -2.5, 1e-40, 3e38])
def test_a_cached_0d_operand_multiplies_and_adds_exactly_as_the_python_number(dtype: torch.dtype,
                                                                                value: float) -> None:
    """Bit for bit (compared as integers, so NaN payloads and signed zeros count), on values spanning
    every exponent plus zeros, subnormals, infinities and NaN."""
    from lrpilot.core.foreach import ScalarOperands

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g, dtype=torch.float64).mul(10.0 ** torch.randint(-40, 39, (n,), generator=g))
          .to(dtype) for n in (1, 7, 16, 100, 1000)]
    xs.append(torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3.4e38], dtype=dtype))
    operand = ScalarOperands()(value, xs)
    assert isinstance(operand, torch.Tensor) and operand.dtype == dtype and operand.ndim == 0
    for op in (torch._foreach_mul, torch._foreach_add, torch._foreach_div):
        for a, b in zip(op(xs, value), op(xs, operand)):
            assert torch.equal(_bits(a), _bits(b)), (op, value)


def test_the_0d_operand_is_only_used_where_it_is_exact() -> None:
    from lrpilot.core.foreach import ScalarOperands

    scalar = ScalarOperands()
    f32, f64 = torch.ones(3), torch.ones(3, dtype=torch.float64)
    assert scalar(0.9, [f32, f64]) == 0.9  # mixed dtypes: a float32 0-d would promote its rounded value
    assert scalar(0.9, [f32.half()]) == 0.9  # half computes with the float, not the rounded half
    for special in (0.0, -0.0, float("inf"), float("nan")):  # 0.0 == -0.0 and nan != nan in a dict key
        assert not isinstance(scalar(special, [f32]), torch.Tensor)
    assert scalar(0.9, [f32]) is scalar(0.9, [f32])  # cached
    assert scalar(0.9, [f64]).dtype == torch.float64
