"""The cooldown (pilots/cooldown.py): the last share of the budget's steps shrink linearly to nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrpilot.core.contract import MethodParts, StepSignals
from lrpilot.core.registry import get_method
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.cooldown import Cooldown, cooldown_multiplier, with_cooldown
from lrpilot.pilots.safety_net import SafetyNet
from tests.conftest import TinyTask, needs_fmnist

#: The seed methods whose default form has the cooldown, and the families that do not (they decay already).
COOLED = ["aalr", "hd-train", "hd-val", "rt-hpo", "lipschitz", "adamo", "auto-adam", "lipschitz-rmsprop",
          "hyperreg-kl-1", "hyperreg-rkl-2", "hyperreg-chi2-2"]  # fmt: skip


def test_the_multiplier_is_the_closed_form() -> None:
    # T = 10 steps, fraction 0.2: C = 2 cooldown steps at 2/3 and 1/3; past the budget it stays at 1/3.
    assert [cooldown_multiplier(k, 10, 2) for k in range(1, 13)] == [1.0] * 8 + [2 / 3, 1 / 3, 1 / 3, 1 / 3]
    assert [cooldown_multiplier(k, 4, 4) for k in range(1, 5)] == [4 / 5, 3 / 5, 2 / 5, 1 / 5]
    assert all(cooldown_multiplier(k, 10, 0) == 1.0 for k in range(1, 12))
    pilot = Cooldown(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=7, fraction=0.2)
    assert pilot.cooldown_steps == 2  # ceil(0.2 * 7)


def _quadratic_run(make_opt, steps: int, cooled: bool, fraction: float = 0.4, reference: bool = False):
    """``steps`` steps on 0.5 * ||A w - b||^2 (full batch): with the cooldown's hooks, or (``reference``)
    with the LR itself multiplied by m_k before each step; returns the weights and the optimizer."""
    torch.manual_seed(0)
    a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = make_opt([w])
    base_lr = opt.param_groups[0]["lr"]
    if cooled:
        pilot = with_cooldown(MethodParts(opt), total_steps=steps, fraction=fraction).pilot
        pilot.attach(nn.Module())
    cool_steps = int(torch.tensor(fraction * steps).ceil())
    for k in range(1, steps + 1):
        if reference:
            opt.param_groups[0]["lr"] = base_lr * cooldown_multiplier(k, steps, cool_steps)
        opt.zero_grad()
        (0.5 * (a @ w - b).pow(2).sum()).backward()
        opt.step()
    return w.detach().clone(), opt


class _SGD(torch.optim.SGD):
    """Not torch's SGD by type: the cooldown takes its general path (copy and interpolate the weights)."""


class _Adam(torch.optim.Adam):
    """As :class:`_SGD`, for Adam."""


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=0.05),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: _SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: _Adam(p, lr=0.05),
], ids=["sgd-momentum", "sgd-nesterov-wd", "adam", "adamw", "weights-path-sgd", "weights-path-adam"])  # fmt: skip
def test_for_sgd_and_adam_it_is_the_lr_times_m(make_opt) -> None:
    """Their buffers hold gradients, not steps: scaling the step is scaling the LR (the slow reference). torch's
    own classes take the LR path (bit for bit the reference), the subclasses the weights path (to rounding)."""
    ours, opt = _quadratic_run(make_opt, 25, cooled=True)
    ref, _ = _quadratic_run(make_opt, 25, cooled=False, reference=True)
    plain, _ = _quadratic_run(make_opt, 25, cooled=False)
    if type(opt) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        assert torch.equal(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours, plain)  # the cooldown did something
    assert opt.param_groups[0]["lr"] in (0.02, 0.05)  # the LR put back after every cooled step


def test_the_methods_state_evolves_as_without_it() -> None:
    """A constant gradient: Adam's moments are the same with and without the cooldown; only the weights,
    which moved by m_k times each step, differ."""
    def run(cooled: bool):
        w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = torch.optim.Adam([w], lr=0.1)
        if cooled:
            with_cooldown(MethodParts(opt), total_steps=5, fraction=0.4).pilot.attach(nn.Module())
        for _ in range(5):
            w.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
            opt.step()
        return w.detach(), opt.state[w]

    w_cool, state_cool = run(True)
    w_plain, state_plain = run(False)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(state_cool[key], state_plain[key])
    # Adam's step is lr * sign(g) here (bias-corrected moments of a constant): 3 full steps, then 2/3 and 1/3.
    torch.testing.assert_close(w_plain, -0.5 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(w_cool, -0.4 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("method", COOLED)
def test_the_default_forms_cool_down_and_cooldown_0_is_the_papers(method: str, tiny) -> None:
    info = get_method(method)
    assert info.defaults["cooldown"] == 0.2
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method=method, epochs=5, progress=False)
    assert isinstance(trainer.pilot, Cooldown) and trainer.pilot.total_steps == 5 * len(tiny.train)
    paper = Trainer(tiny.model(), tiny.train, tiny.val, method=method, epochs=5, progress=False,
                    method_options={"cooldown": 0.0})  # fmt: skip
    assert not isinstance(paper.pilot, Cooldown)
    with pytest.raises(ValueError, match=rf"option cooldown of method '{method}' must be in \[0.0, 1.0\], got 1.5"):
        Trainer(tiny.model(), tiny.train, tiny.val, method=method, epochs=5, progress=False,
                method_options={"cooldown": 1.5})  # fmt: skip


def test_the_methods_that_decay_already_have_none() -> None:
    for name in ("mi-decay", "mi-decay-layerwise", "sgd-cosine", "adagrad-diag", "wngrad"):
        assert get_method(name).defaults.get("cooldown", 0.0) == 0.0, name
    # auto's `cooldown` is its "wsd" schedule's; its cosine runs without one (tests/test_auto.py: the
    # cosine trajectory is exact, the wsd one is the cooldown's)


def test_a_classical_lipschitz_model_keeps_the_papers_fixed_lr(tiny) -> None:
    trainer = Trainer(nn.Linear(4, 3), tiny.train, tiny.val, method="lipschitz", epochs=2, progress=False)
    assert not isinstance(trainer.pilot, Cooldown)  # convex, full 1/L: gradient descent converges as it is


def test_in_the_loop_the_telemetry_falls_to_1_over_c_plus_1(tiny) -> None:
    """hd-train's learned LR is untouched (param_groups), its reported LR is times m_k, steps by m_k."""
    epochs, n = 5, len(tiny.train)
    total = epochs * n
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="hd-train", epochs=epochs, progress=False)
    history = trainer.run()
    steps, lrs = zip(*[(s, lr[0]) for s, lr in history.step_lr])
    cool = trainer.pilot.cooldown_steps
    learned = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.pilot.steps_done == total
    assert lrs[-1] == pytest.approx(learned * 1 / (cool + 1), rel=1e-12)  # the next step's m, past the budget
    before = [lr for s, lr in zip(steps, lrs) if s < total - cool]
    assert all(lr > 0.05 for lr in before)  # no cooldown before the last C steps


def _fit_weights(method: str, tiny: TinyTask, **options):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method=method, epochs=4, progress=False, seed=0,
                      method_options=options)  # fmt: skip
    trainer.run()
    return trainer


def test_a_resume_inside_the_cooldown_continues_identically(tiny) -> None:
    whole = _fit_weights("hd-train", tiny, cooldown=0.5)
    first = Trainer(tiny.model(), tiny.train, tiny.val, method="hd-train", epochs=4, progress=False, seed=0,
                    method_options={"cooldown": 0.5})  # fmt: skip
    first.run(until_epoch=3)  # the cooldown began in epoch 3
    assert first.pilot.multiplier() < 1.0
    state = copy.deepcopy(first.state_dict())
    second = Trainer(tiny.model(seed=99), tiny.train, tiny.val, method="hd-train", epochs=4, progress=False, seed=0,
                     method_options={"cooldown": 0.5})  # fmt: skip
    second.load_state_dict(state)
    second.run()
    for a, b in zip(second.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    other = Cooldown(second.optimizer, total_steps=7, fraction=0.5)
    with pytest.raises(ValueError, match="resume with the same budget"):
        other.load_state_dict(second.pilot.state_dict())


def test_a_rollback_does_not_rewind_the_cooldowns_clock(tiny) -> None:
    """The safety net rolls a diverged epoch back; the budget's steps still count, so the run ends cooled."""
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="hd-train", epochs=4, progress=False, seed=0,
                      method_options={"lr": 30.0, "beta": 0.0})  # fmt: skip
    history = trainer.run()
    assert isinstance(trainer.pilot.inner, SafetyNet)
    assert "safety-net-rollback" in [d.reason for d in history.decisions]
    assert trainer.pilot.steps_done == 4 * len(tiny.train)
    assert trainer.pilot.multiplier() == 1 / (trainer.pilot.cooldown_steps + 1)


def test_bad_budgets_are_refused() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="cooldown option total_steps must be an integer >= 1, got 0"):
        Cooldown(opt, total_steps=0)
    with pytest.raises(ValueError, match="fraction"):
        Cooldown(opt, total_steps=10, fraction=-0.1)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="same optimizer"):
        Cooldown(opt, SafetyNet(other), total_steps=10)
    assert with_cooldown(MethodParts(opt), total_steps=10, fraction=0.0).pilot is None  # off: unchanged


def test_steps_counted_by_the_hooks_match_the_loops(tiny) -> None:
    pilot = Cooldown(torch.optim.SGD(tiny.model().parameters(), lr=0.1), total_steps=3, fraction=1.0)
    pilot.attach(nn.Module())
    pilot.attach(nn.Module())  # attaching again must not hook twice
    for k in range(1, 4):
        pilot.optimizer.step()
        assert pilot.steps_done == k
        pilot.on_step_end(StepSignals(epoch=0, step=k, loss=0.0))
        assert pilot.steps_done == k


def test_an_epoch_cut_short_still_spends_its_share_of_the_budget() -> None:
    """A non-finite loss ends an epoch early; the clock is the budget's position, not the steps taken."""
    from lrpilot.core.contract import EpochSignals

    pilot = Cooldown(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=10, fraction=0.5,
                     steps_per_epoch=5)  # fmt: skip
    pilot.attach(nn.Module())
    for _ in range(2):  # epoch 1 stops after 2 of its 5 steps
        pilot.optimizer.step()
    assert pilot.steps_done == 2
    pilot.on_epoch_end(EpochSignals(epoch=1, step=2, lr=(1.0,), train_loss=float("nan"), val_loss=1.0,
                                    val_metric=0.0, nonfinite=True))  # fmt: skip
    assert pilot.steps_done == 5 and pilot.multiplier() == 5 / 6  # epoch 2's first step is the budget's 6th
    with pytest.raises(ValueError, match="cooldown option steps_per_epoch must be an integer >= 1, got 0"):
        Cooldown(pilot.optimizer, total_steps=10, steps_per_epoch=0)


def test_in_the_loop_a_diverged_first_epoch_does_not_shift_the_cooldown(tiny) -> None:
    """lipschitz at an absurd first LR: epoch 1 diverges and is rolled back (cut short); the run still
    ends with the budget's last multiplier."""
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="lipschitz", epochs=4, progress=False, seed=0,
                      method_options={"initial_lr": 1e8, "backoff": 1e-9})  # fmt: skip
    history = trainer.run()
    assert history.epochs[0].train_loss != history.epochs[0].train_loss  # nan: the epoch was cut short
    assert history.epochs[-1].step < 4 * len(tiny.train)  # fewer steps taken than budgeted
    assert trainer.pilot.steps_done == 4 * len(tiny.train)
    assert trainer.pilot.multiplier() == 1 / (trainer.pilot.cooldown_steps + 1)


@pytest.mark.slow
@needs_fmnist
def test_the_resnet20_last_epoch_failure_is_what_the_cooldown_fixes() -> None:
    """The robustness suite's case (docs/robustness.md): hd-train, ResNet-20 on 5,000 Fashion-MNIST samples for
    3 epochs, seed 2, one thread as the bench runs it. Measured: without the cooldown 0.5605, 0.7039, 0.3002
    by epoch (the last iterate at LR ~0.094 and batch norm's lagging statistics); with it 0.5605, 0.7039,
    0.8087. How far the last epoch falls depends on the CPU's kernels (0.3002 there, 0.635 on an AVX2 AMD
    machine, both from the same first two epochs), so the failure asserted is the bench's: a final more than
    5 points below the run's best. About 80 s a run on one CPU thread."""
    from lrpilot.bench.tasks import run_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {c: run_task("fmnist-resnet20", "hd-train", epochs=3, seed=2, train_subset=5000, progress=False,
                            method_options={"cooldown": c})["summary"] for c in (0.0, 0.2)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    paper, cooled = runs[0.0], runs[0.2]
    assert paper["best_val_metric"] - paper["final_val_metric"] > 0.05, paper  # the failure (the bench's DROP)
    assert cooled["final_val_metric"] == cooled["best_val_metric"] > paper["best_val_metric"], cooled
