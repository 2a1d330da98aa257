"""AdaMo, Lipschitz-RMSprop and Auto-Adam against direct transcriptions of the paper's algorithms.

Each reference below is the pseudocode read line by line (numpy, one array per parameter), fed the same
scripted gradients and Lipschitz constants as the optimizer.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrpilot.bench.tasks.models import MLP
from lrpilot.estimators.lipschitz import cross_entropy_lipschitz, grad_sq_estimate, max_weight_norm
from lrpilot.pilots.lipschitz import AdaMo, AutoAdam, LastLayerLipschitz, LipschitzRMSprop

STEPS = 12


def _script(seed: int = 0, steps: int = STEPS, shape: tuple[int, ...] = (3, 2)):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=shape) for _ in range(steps)]
    lips = [float(x) for x in rng.uniform(0.2, 3.0, size=steps)]
    sqs = [float(x) for x in rng.uniform(0.01, 2.0, size=steps)]
    kzs = [float(x) for x in rng.uniform(5.0, 50.0, size=steps)]
    w0 = rng.normal(size=shape)
    return w0, grads, lips, sqs, kzs


def _run(opt_factory, w0, grads, **signals_per_step):
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_factory([w])
    lrs = []
    for t, g in enumerate(grads):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step(**{k: v[t] for k, v in signals_per_step.items()})
        lrs.append(opt.param_groups[0]["lipschitz_lr"])
    return w.detach().numpy(), lrs


# ----------------------------------------------------------------------------------------------------
# transcriptions
# ----------------------------------------------------------------------------------------------------
def adamo_reference(w, grads, lips, beta=0.9, wd=0.0, initial=None, spe=None, update="step"):
    """Algorithm 1; with `initial`, section 7.3.1 ("on the first epoch the algorithm sets K to x and uses
    this value as the learning rate"); with update="epoch", the authors' per-epoch K (their lr_schedule)."""
    w = w.copy()
    K, V = (0.0 if initial is None else initial), np.zeros_like(w)
    epoch_max, lrs = 0.0, []
    for t, (g, L) in enumerate(zip(grads, lips)):
        g = g + wd * w  # "Compute grad_W L" of the loss with its L2 term
        V = beta * V + (1 - beta) * g  # line 4
        first_epoch = initial is not None and t < spe
        if update == "step":
            if not first_epoch:
                K = beta * K + (1 - beta) * L  # line 6
        else:
            if t > 0 and t % spe == 0:
                K = beta * K + (1 - beta) * epoch_max
                epoch_max = 0.0
            epoch_max = max(epoch_max, L)
        lr = initial if first_epoch else 1 / K
        w = w - lr * V  # line 8
        lrs.append(lr)
    return w, lrs


def auto_adam_reference(
    w, grads, lips, sqs, b1=0.9, b2=0.999, eps=1e-8, k1=0.0, k2=0.0, wd=0.0, eps_inside=True
):
    """Algorithm 3, lines 1-10."""
    w = w.copy()
    K1, K2, S, V = k1, k2, np.zeros_like(w), np.zeros_like(w)  # line 1
    lrs = []
    for g, L, M in zip(grads, lips, sqs):
        g = g + wd * w
        V = b1 * V + (1 - b1) * g  # line 4
        S = b2 * S + (1 - b2) * g**2  # line 5
        K1 = b1 * K1 + (1 - b1) * L  # line 7
        K2 = b2 * K2 + (1 - b2) * M  # line 8
        lr = (math.sqrt(K2) + eps) / K1
        denom = np.sqrt(S + eps) if eps_inside else np.sqrt(S) + eps
        w = w - lr * V / denom  # line 10
        lrs.append(lr)
    return w, lrs


def rmsprop_kz_reference(w, grads, sqs, kzs, rho=0.9, eps=1e-8):
    """Section 6.2 as the authors' code has it: LR = (sqrt(K2) + eps) / K_z on top of RMSprop."""
    w = w.copy()
    K2, S, lrs = 0.0, np.zeros_like(w), []
    for g, M, kz in zip(grads, sqs, kzs):
        S = rho * S + (1 - rho) * g**2
        K2 = rho * K2 + (1 - rho) * M
        lr = (math.sqrt(K2) + eps) / kz
        w = w - lr * g / np.sqrt(S + eps)
        lrs.append(lr)
    return w, lrs


# ----------------------------------------------------------------------------------------------------
# the optimizers against them
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamo_is_algorithm_1(wd: float) -> None:
    w0, grads, lips, _, _ = _script(1)
    w, lrs = _run(lambda p: AdaMo(p, beta=0.9, weight_decay=wd), w0, grads, lipschitz=lips)
    w_ref, lrs_ref = adamo_reference(w0, grads, lips, wd=wd)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12)
    np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-12)


def test_adamo_first_epoch_remedy_and_per_epoch_update() -> None:
    w0, grads, lips, _, _ = _script(2)
    for update in ("step", "epoch"):
        w, lrs = _run(
            lambda p, u=update: AdaMo(p, initial_lr=0.1, steps_per_epoch=4, update=u),
            w0,
            grads,
            lipschitz=lips,
        )
        w_ref, lrs_ref = adamo_reference(w0, grads, lips, initial=0.1, spe=4, update=update)
        np.testing.assert_allclose(w, w_ref, rtol=1e-12)
        np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-12)
        assert lrs[:4] == [0.1] * 4
    # per epoch, the LR is constant within an epoch and is 1/(0.9 x + 0.1 max L of the first epoch) after it
    assert lrs[4:8] == [lrs[4]] * 4
    assert lrs[4] == pytest.approx(1 / (0.9 * 0.1 + 0.1 * max(lips[:4])))


def test_adamo_bias_correction_of_both_averages_changes_nothing() -> None:
    """Section 6.4: V and K carry the same bias (1 - beta^t), so dividing both by it cancels."""
    w0, grads, lips, _, _ = _script(3)
    plain, _ = _run(lambda p: AdaMo(p), w0, grads, lipschitz=lips)
    corrected, _ = _run(lambda p: AdaMo(p, bias_correction="all"), w0, grads, lipschitz=lips)
    np.testing.assert_allclose(corrected, plain, rtol=1e-12)
    moments, _ = _run(lambda p: AdaMo(p, bias_correction="moments"), w0, grads, lipschitz=lips)
    assert not np.allclose(moments, plain)  # correcting V alone does change the steps


@pytest.mark.parametrize(
    "kwargs,ref",
    [
        ({}, {}),
        ({"eps_inside_sqrt": False}, {"eps_inside": False}),
        ({"k1_init": 1.0, "k2_init": 1e-6}, {"k1": 1.0, "k2": 1e-6}),
        ({"weight_decay": 0.1, "beta1": 0.8, "beta2": 0.99}, {"wd": 0.1, "b1": 0.8, "b2": 0.99}),
    ],
)
def test_auto_adam_is_algorithm_3(kwargs: dict, ref: dict) -> None:
    w0, grads, lips, sqs, _ = _script(4)
    w, lrs = _run(lambda p: AutoAdam(p, **kwargs), w0, grads, lipschitz=lips, grad_sq=sqs)
    w_ref, lrs_ref = auto_adam_reference(w0, grads, lips, sqs, **ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-10)
    np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-12)


def test_auto_adam_section_9_remedy_starts_near_adams_default_lr() -> None:
    w0, grads, lips, sqs, _ = _script(5)
    _, lrs = _run(
        lambda p: AutoAdam(p, k1_init=1.0, k2_init=1e-6, update="epoch", steps_per_epoch=4),
        w0,
        grads,
        lipschitz=lips,
        grad_sq=sqs,
    )
    assert lrs[:4] == [pytest.approx(1e-3 + 1e-8)] * 4


def _step_sizes(opt_factory, lips: list[float], sqs: list[float]) -> tuple[list[float], torch.Tensor]:
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = opt_factory([w])
    lrs = []
    for lip, sq in zip(lips, sqs):
        w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
        opt.step(lipschitz=lip, grad_sq=sq)
        lrs.append(opt.effective_lrs()[0])
    return lrs, w.detach().clone()


def test_auto_adam_growth_cap_limits_each_step_to_one_percent_more() -> None:
    """The study's runaway: L_t falls (dying activations), K1 follows in ~10 steps, K2 does not, and the step
    size sqrt(K2)/K1 rises as 1/L. With K1 = 1, K2 = 1e-6 and M_t = 1e-6 the first step size is exactly
    1e-3; L_t = 0.01 afterwards makes the uncapped size rise 11 % per step, the capped one 1 %."""
    lips, sqs = [1.0] + [0.01] * 5, [1e-6] * 6
    paper, w_paper = _step_sizes(lambda p: AutoAdam(p, eps=0.0, k1_init=1.0, k2_init=1e-6), lips, sqs)
    k1, expected_paper = 1.0, []
    for lip in lips:
        k1 = 0.9 * k1 + 0.1 * lip
        expected_paper.append(1e-3 / k1)
    assert paper == pytest.approx(expected_paper, rel=1e-9)
    capped, w_capped = _step_sizes(
        lambda p: AutoAdam(p, eps=0.0, k1_init=1.0, k2_init=1e-6, max_lr_growth=0.01), lips, sqs
    )
    assert capped == pytest.approx([1e-3 * 1.01**t for t in range(6)], rel=1e-9)
    assert not torch.equal(w_paper, w_capped)  # the cap is the step size the update uses
    # both caps, with the lr multiplier 0.5 scaling the sizes and the absolute cap (0.5 * 1.025e-3):
    # 1 % growth per step until the absolute cap binds at the fourth step
    both, _ = _step_sizes(
        lambda p: AutoAdam(p, lr=0.5, eps=0.0, k1_init=1.0, k2_init=1e-6, max_lr=1.025e-3, max_lr_growth=0.01),
        lips, sqs,
    )  # fmt: skip
    assert both == pytest.approx([5e-4, 5.05e-4, 5.1005e-4, 5.125e-4, 5.125e-4, 5.125e-4], rel=1e-9)


def test_auto_adam_max_lr_caps_the_step_size_times_the_multiplier() -> None:
    lips, sqs = [1.0, 0.01, 0.01], [1.0, 1.0, 1.0]  # sqrt(K2)/K1 ~ 0.03 .. 0.04: far above Adam's scale
    lrs, _ = _step_sizes(lambda p: AutoAdam(p, lr=0.5, eps=0.0, k1_init=1.0, k2_init=1e-6, max_lr=0.01), lips, sqs)
    assert lrs == [0.005, 0.005, 0.005]  # lr * max_lr, exactly
    paper, _ = _step_sizes(lambda p: AutoAdam(p, lr=0.5, eps=0.0, k1_init=1.0, k2_init=1e-6), lips, sqs)
    assert min(paper) > 0.015


def test_auto_adam_caps_survive_a_state_dict_round_trip() -> None:
    lips, sqs = [1.0] + [0.01] * 7, [1e-6] * 8

    def make(p):
        return AutoAdam(p, eps=0.0, k1_init=1.0, k2_init=1e-6, max_lr=0.05, max_lr_growth=0.01)

    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = make([w])
    for lip, sq in zip(lips[:4], sqs[:4]):
        w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
        opt.step(lipschitz=lip, grad_sq=sq)
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    w2 = nn.Parameter(saved_w.clone())
    opt2 = AutoAdam([w2])  # the paper's defaults: the saved groups bring the caps back
    opt2.load_state_dict(saved)
    assert (opt2.param_groups[0]["max_lr"], opt2.param_groups[0]["max_lr_growth"]) == (0.05, 0.01)
    for lip, sq in zip(lips[4:], sqs[4:]):
        for param, o in ((w, opt), (w2, opt2)):
            param.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
            o.step(lipschitz=lip, grad_sq=sq)
        assert opt2.effective_lrs() == opt.effective_lrs()
    assert opt.effective_lrs()[0] == pytest.approx(1e-3 * 1.01**7, rel=1e-9)
    assert torch.equal(w, w2)


def test_adamo_continuous_start_keeps_the_lr_continuous_after_the_fixed_epoch() -> None:
    """With initial_lr = x the paper starts K at x, so the LR jumps from x to ~1/x after the first epoch;
    k1_start="continuous" starts K at 1/x."""
    lips = [1.0] * 4

    def lrs(k1_start: str) -> list[float]:
        w = nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = AdaMo([w], initial_lr=0.1, steps_per_epoch=2, k1_start=k1_start)
        out = []
        for lip in lips:
            w.grad = torch.ones(2, dtype=torch.float64)
            opt.step(lipschitz=lip)
            out.append(opt.effective_lrs()[0])
        return out

    assert lrs("paper") == pytest.approx([0.1, 0.1, 1 / (0.9 * 0.1 + 0.1), 1 / (0.81 * 0.1 + 0.19)], rel=1e-12)
    assert lrs("continuous") == pytest.approx([0.1, 0.1, 1 / (0.9 * 10 + 0.1), 1 / (0.81 * 10 + 0.19)], rel=1e-12)


def test_auto_adam_bias_correction_all_only_moves_epsilon() -> None:
    w0, grads, lips, sqs, _ = _script(6)
    plain, _ = _run(lambda p: AutoAdam(p, eps=0.0), w0, grads, lipschitz=lips, grad_sq=sqs)
    corrected, _ = _run(
        lambda p: AutoAdam(p, eps=0.0, bias_correction="all"), w0, grads, lipschitz=lips, grad_sq=sqs
    )
    np.testing.assert_allclose(corrected, plain, rtol=1e-10)


def test_rmsprop_with_the_lipschitz_denominator_is_auto_adam_without_momentum() -> None:
    w0, grads, lips, sqs, _ = _script(7)
    a, lrs_a = _run(
        lambda p: LipschitzRMSprop(p, rho=0.9, denominator="lipschitz"),
        w0,
        grads,
        lipschitz=lips,
        grad_sq=sqs,
    )
    b, lrs_b = _run(lambda p: AutoAdam(p, beta1=0.0, beta2=0.9), w0, grads, lipschitz=lips, grad_sq=sqs)
    np.testing.assert_array_equal(a, b)
    assert lrs_a == lrs_b


def test_rmsprop_divides_by_kz_like_the_authors_code() -> None:
    w0, grads, lips, sqs, kzs = _script(8)
    w, lrs = _run(lambda p: LipschitzRMSprop(p), w0, grads, lipschitz=lips, grad_sq=sqs, k_z=kzs)
    w_ref, lrs_ref = rmsprop_kz_reference(w0, grads, sqs, kzs)
    np.testing.assert_allclose(w, w_ref, rtol=1e-10)
    np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-12)
    with pytest.raises(ValueError, match="k_z"):
        _run(lambda p: LipschitzRMSprop(p), w0, grads[:1], lipschitz=lips[:1])


# ----------------------------------------------------------------------------------------------------
# the constant of a real batch, state, errors
# ----------------------------------------------------------------------------------------------------
def _net_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    net = MLP((5, 8, 4))
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    return net, x, y


def test_the_source_feeds_each_batchs_paper_constant_plus_the_l2_term() -> None:
    net, x, y = _net_and_batch()
    source = LastLayerLipschitz.for_model(net, nn.CrossEntropyLoss())
    wd, beta = 0.01, 0.9
    opt = AdaMo(net.parameters(), source, beta=beta, weight_decay=wd)
    w_max = max_weight_norm(net.parameters())
    k_z = float(net.body(x).detach().norm())
    q = float(net.body(x).detach().square().norm())
    nn.CrossEntropyLoss()(net(x), y).backward()
    opt.step()
    expected = cross_entropy_lipschitz(k_z, 16, 4) + wd * w_max
    assert opt.param_groups[0]["k1"] == pytest.approx((1 - beta) * expected, rel=1e-6)

    net2, _, _ = _net_and_batch()
    source2 = LastLayerLipschitz.for_model(net2, nn.CrossEntropyLoss())
    adam = AutoAdam(net2.parameters(), source2, weight_decay=wd)
    nn.CrossEntropyLoss()(net2(x), y).backward()
    adam.step()
    a = cross_entropy_lipschitz(k_z, 16, 4)
    m_t = grad_sq_estimate(a, k_z, q, wd * w_max, "remedy")
    assert adam.param_groups[0]["k2"] == pytest.approx(0.001 * m_t, rel=1e-5)


def test_max_w_runs_over_every_group_as_in_the_pilot() -> None:
    """A group's L2 term uses max||w|| over all the optimizer's parameters, not only its own group's."""
    net, x, y = _net_and_batch()
    with torch.no_grad():
        net.head.weight.mul_(100.0)  # the largest tensor lives in the group without weight decay
    source = LastLayerLipschitz.for_model(net, nn.CrossEntropyLoss())
    wd, beta = 0.01, 0.9
    head = list(net.head.parameters())
    body = [p for p in net.parameters() if all(p is not h for h in head)]
    opt = AdaMo([{"params": body, "weight_decay": wd}, {"params": head, "weight_decay": 0.0}], source, beta=beta)
    w_max = max_weight_norm(net.parameters())
    assert w_max > max_weight_norm(body)
    k_z = float(net.body(x).detach().norm())
    nn.CrossEntropyLoss()(net(x), y).backward()
    opt.step()
    loss_part = cross_entropy_lipschitz(k_z, 16, 4)
    assert opt.param_groups[0]["k1"] == pytest.approx((1 - beta) * (loss_part + wd * w_max), rel=1e-6)
    assert opt.param_groups[1]["k1"] == pytest.approx((1 - beta) * loss_part, rel=1e-6)


def test_a_step_without_a_signal_says_what_to_pass() -> None:
    w = nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"LastLayerLipschitz.for_model.*step\(lipschitz=...\)"):
        AdaMo([w]).step()


def test_state_dict_round_trip_continues_identically() -> None:
    net, x, y = _net_and_batch(1)
    opt = AutoAdam(
        net.parameters(),
        LastLayerLipschitz.for_model(net, nn.CrossEntropyLoss()),
        update="epoch",
        initial_lr=1e-3,
        steps_per_epoch=3,
    )

    def steps(model, optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()

    steps(net, opt, 4)
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    steps(net, opt, 4)
    net2 = MLP((5, 8, 4))
    net2.load_state_dict(saved_model)
    opt2 = AutoAdam(
        net2.parameters(),
        LastLayerLipschitz.for_model(net2, nn.CrossEntropyLoss()),
        update="epoch",
        initial_lr=1e-3,
        steps_per_epoch=3,
    )
    opt2.load_state_dict(saved_opt)
    steps(net2, opt2, 4)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["k1"] == opt2.param_groups[0]["k1"]


@pytest.mark.parametrize(
    "factory,pattern",
    [
        (lambda p: AdaMo(p, beta=1.0), "beta"),
        (lambda p: AdaMo(p, update="epoch"), "initial_lr"),
        (lambda p: AdaMo(p, initial_lr=0.1), "steps_per_epoch"),
        (lambda p: AdaMo(p, bias_correction=True), "bias_correction"),
        (lambda p: AutoAdam(p, grad_sq_estimate="third"), "grad_sq_estimate"),
        (lambda p: AutoAdam(p, k2_init=-1.0), "k2_init"),
        (lambda p: AutoAdam(p, lr=0.0), "lr"),
        (lambda p: AutoAdam(p, max_lr=0.0), "max_lr"),
        (lambda p: AutoAdam(p, max_lr_growth=-0.1), "max_lr_growth"),
        (lambda p: AdaMo(p, k1_start="one"), "k1_start"),
        (lambda p: LipschitzRMSprop(p, rho=0.0), "rho"),
        (lambda p: LipschitzRMSprop(p, denominator="K1"), "denominator"),
    ],
)
def test_bad_options_name_the_option(factory, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        factory([nn.Parameter(torch.ones(1))])
