"""The `lipschitz` pilot (SGD with LR = 1/L) and the divergence handling of the Lipschitz family."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrpilot.bench.tasks.models import MLP, LinearModel
from lrpilot.core.contract import TRAIN_EVAL_LOSS, TRAIN_PASS, EpochSignals
from lrpilot.core.data import TensorLoader
from lrpilot.core.seeding import seed_everything
from lrpilot.estimators.lipschitz import (
    LossSpec,
    estimate_weight_bound,
    linear_regression_lipschitz,
    logistic_regression_lipschitz,
    max_weight_norm,
    softmax_regression_lipschitz,
)
from lrpilot.loop.fit import Trainer
from lrpilot.loop.history import History
from lrpilot.pilots.lipschitz import LipschitzGuard, LipschitzPilot
from tests.conftest import TinyTask, blobs

# The paper's form of `lipschitz`: none of the conv-net guard's options (docs/robustness-study.md).
PAPER = {"stall_factor": None, "shrink_factor": None, "max_growth": None, "cooldown": 0.0}  # the paper's form


class _HeadInputNorms:
    """An independent reference: the Frobenius norm of every training batch's head input."""

    def __init__(self, head: nn.Module) -> None:
        self.norms: list[float] = []
        self.rows: list[int] = []
        head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if module.training:
            self.norms.append(float(torch.linalg.norm(inputs[0].detach())))
            self.rows.append(len(inputs[0]))


def test_network_lr_is_one_over_l_from_the_previous_epochs_activations() -> None:
    task = TinyTask()
    model = task.model()
    reference = _HeadInputNorms(model.head)
    wd = 1e-3
    trainer = Trainer(
        model,
        task.train,
        task.val,
        method="lipschitz",
        epochs=3,
        seed=0,
        progress=False,
        method_options={"weight_decay": wd, "initial_lr": 0.05, **PAPER},
    )
    for epoch in (1, 2):
        seen = len(reference.norms)
        trainer.run(until_epoch=epoch)
        k_z = max(reference.norms[seen:])
        m = max(reference.rows[seen:])
        expected = 1 / (2 * k_z / (3 * m) + wd * max_weight_norm(model.parameters()))
        decision = trainer.history.decisions[-1]
        assert decision.reason == "lipschitz-epoch"
        assert decision.lr[0] == pytest.approx(expected, rel=1e-5)
        assert decision.info["k_z"] == pytest.approx(k_z, rel=1e-6)
    lrs = [e.lr[0] for e in trainer.run().epochs]
    assert lrs[0] == 0.05  # the fixed first-epoch LR
    assert lrs[1] == pytest.approx(
        trainer.history.decisions[1].lr[0]
    )  # epoch 2 runs at the LR decided after epoch 1


def test_first_epoch_probe_reads_the_initial_model_in_eval_mode_and_leaves_the_rng_alone() -> None:
    task = TinyTask()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    seed_everything(0)
    k_z = max(float(model[:3].eval()(x).detach().norm()) for x, _ in task.train)
    model.train()
    trainer = Trainer(model, task.train, task.val, method="lipschitz", epochs=1, seed=0, progress=False,
                      hyper_fraction=0)  # the closed form is over all the training data
    rng = torch.get_rng_state()
    trainer._begin()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    decision = trainer.history.decisions[0]
    assert decision.reason == "lipschitz-probe"
    assert decision.lr[0] == pytest.approx(1 / (2 * k_z / (3 * 32)), rel=1e-5)


@pytest.mark.parametrize("kind", ["cross_entropy", "binary_cross_entropy", "least_squares"])
def test_classical_mode_fixes_the_lr_at_the_papers_closed_form(kind: str) -> None:
    x, labels = blobs(n=90, classes=3, dim=4)
    x = x.abs() + 0.1
    if kind == "cross_entropy":
        y, out, loss = labels, 3, nn.CrossEntropyLoss()
    elif kind == "binary_cross_entropy":
        y, out, loss = (labels == 0).float()[:, None], 1, nn.BCEWithLogitsLoss()
    else:
        y, out, loss = x.sum(1, keepdim=True), 1, nn.MSELoss()
    full = TensorLoader(x, y, len(x), shuffle=False)  # full batch: m = the data size
    trainer = Trainer(
        LinearModel(4, out),
        full,
        full,
        method="lipschitz",
        epochs=3,
        seed=0,
        progress=False,
        loss_fn=loss,
        method_options={},
        hyper_fraction=0,  # the paper's constant is over all the training data
    )
    history = trainer.run()
    design = torch.cat([torch.ones(len(x), 1), x], dim=1).double()  # the paper's column of ones for the bias
    if kind == "cross_entropy":
        lipschitz = softmax_regression_lipschitz(design, 3)
    elif kind == "binary_cross_entropy":
        lipschitz = logistic_regression_lipschitz(design)
    else:  # torch's MSELoss is 2x the paper's 1/(2m) loss
        lipschitz = 2 * abs(linear_regression_lipschitz(design, y, estimate_weight_bound(design)))
    assert history.decisions[0].reason == "lipschitz-classical"
    assert [e.lr[0] for e in history.epochs] == [pytest.approx(1 / lipschitz, rel=1e-5)] * 3
    assert trainer.pilot.mode == "classical"


@pytest.mark.parametrize("kind", ["cross_entropy", "least_squares"])
def test_classical_mode_adds_lambda_k_for_weight_decay(kind: str) -> None:
    """Section 5.3: an L2 term adds lambda*K, K the paper's data estimate (a+b)/2 of the weight bound."""
    x = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.5, 1.5], [2.0, 2.0]])
    if kind == "cross_entropy":
        y, out, loss = torch.tensor([0, 1, 2, 0]), 3, nn.CrossEntropyLoss()
    else:
        y, out, loss = torch.tensor([[1.0], [2.0], [0.0], [1.0]]), 1, nn.MSELoss()
    full = TensorLoader(x, y, 4, shuffle=False)
    # The design matrix with the column of ones: column sums 4, 6.5, 6 -> a = 16.5/4 = 4.125; column
    # maxima 1, 3, 2 -> b = 2; K = (a + b)/2 = 3.0625.
    design = torch.cat([torch.ones(4, 1), x], dim=1).double()
    k = 3.0625
    if kind == "cross_entropy":
        loss_part = 2 / 3 * float(design.norm()) / 4  # (k-1)/(km) K_z, K_z = ||[1, X]||
    else:  # torch's MSELoss is 2x the paper's; the paper's sign, absolute value taken
        gram = float(torch.linalg.matrix_norm(design.T @ design))
        cross = float(torch.linalg.matrix_norm(y.double().T @ design))
        loss_part = 2 * abs(k * gram - cross) / 4
    lrs = {}
    for wd in (0.0, 0.1, 10.0):
        trainer = Trainer(
            LinearModel(2, out), full, full, method="lipschitz", epochs=1, seed=0, progress=False,
            loss_fn=loss, method_options={"weight_decay": wd},
        )
        decision = trainer.run().decisions[0]
        assert decision.reason == "lipschitz-classical"
        assert decision.info["weight_bound"] == pytest.approx(k, rel=1e-12)
        assert decision.info["lipschitz"] == pytest.approx(loss_part + wd * k, rel=1e-9)
        assert decision.info["loss_lipschitz"] == pytest.approx(loss_part, rel=1e-9)
        lrs[wd] = decision.lr[0]
        assert lrs[wd] == pytest.approx(1 / (loss_part + wd * k), rel=1e-9)
    assert lrs[0.0] > lrs[0.1] > lrs[10.0]


def test_classical_smoothness_adds_lambda_per_group() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.5, 1.5], [2.0, 2.0]])
    y = torch.tensor([0, 1, 2, 0])
    full = TensorLoader(x, y, 4, shuffle=False)
    model = LinearModel(2, 3)
    opt = torch.optim.SGD(
        [{"params": [model.head.weight], "weight_decay": 0.5}, {"params": [model.head.bias], "weight_decay": 0.0}],
        lr=1.0,
    )
    pilot = LipschitzPilot(opt, loss=LossSpec.from_loss(nn.CrossEntropyLoss(), 3), constant="smoothness")
    pilot.attach(model)
    train_pass = {TRAIN_PASS: lambda fn: [fn(xb, yb) for xb, yb in full]}  # the loop's pass over the data
    decision = pilot.on_train_begin(EpochSignals(epoch=0, step=0, lr=(1.0, 1.0), train_loss=math.nan, val_loss=1.0,
                                                 val_metric=math.nan, extra=train_pass))
    design = torch.cat([torch.ones(4, 1), x], dim=1).double()
    beta = 0.5 * float(design.norm()) ** 2 / 4  # softmax: ||A||^2 / (2m)
    assert decision.lr == pytest.approx((1 / (beta + 0.5), 1 / beta), rel=1e-9)
    assert decision.info["lipschitz"] == pytest.approx(beta + 0.5, rel=1e-9)


def test_network_telemetry_is_the_whole_constant_over_all_trained_parameters() -> None:
    """info["lipschitz"] includes lambda*max||w||, max||w|| over every parameter the optimizer trains."""
    task = TinyTask()
    for wd in (0.0, 0.1):
        model = task.model()
        trainer = Trainer(
            model, task.train, task.val, method="lipschitz", epochs=1, seed=0, progress=False,
            method_options={"weight_decay": wd, **PAPER},
        )
        trainer.run()
        info = trainer.history.decisions[-1].info
        w_max = max_weight_norm(model.parameters())
        assert info["max_w"] == pytest.approx(w_max, rel=1e-6)
        assert info["lipschitz"] == pytest.approx(info["loss_lipschitz"] + wd * w_max, rel=1e-9)
        assert trainer.history.decisions[-1].lr[0] == pytest.approx(1 / info["lipschitz"], rel=1e-9)


def test_auto_mode_is_network_with_a_hidden_layer() -> None:
    task = TinyTask()
    trainer = Trainer(
        task.model(), task.train, task.val, method="lipschitz", epochs=1, seed=0, progress=False
    )
    assert trainer.pilot.inner.mode == "network"  # inside the default form's cooldown (pilots/cooldown.py)


def test_a_loss_without_a_closed_form_is_refused() -> None:
    task = TinyTask()
    x, y = blobs()
    loader = TensorLoader(x, y[:, None].float(), 32)
    with pytest.raises(ValueError, match=r"lipschitz.*L1Loss"):
        Trainer(
            MLP((4, 8, 1)), loader, loader, method="lipschitz", epochs=1, loss_fn=nn.L1Loss(), progress=False
        )
    del task


def test_the_hook_is_removed_when_training_ends() -> None:
    task = TinyTask()
    model = task.model()
    for name in ("lipschitz", "adamo"):
        Trainer(model, task.train, task.val, method=name, epochs=1, seed=0, progress=False).run()
        assert not model.head._forward_hooks


# ----------------------------------------------------------------------------------------------------
# divergence (the paper's first-epoch warning, section 8)
# ----------------------------------------------------------------------------------------------------
def _signals(epoch: int, lr: float, nonfinite: bool) -> EpochSignals:
    nan = math.nan
    return EpochSignals(
        epoch=epoch,
        step=epoch * 6,
        lr=(lr,),
        train_loss=nan if nonfinite else 1.0,
        val_loss=nan if nonfinite else 1.0,
        val_metric=nan if nonfinite else 0.5,
        nonfinite=nonfinite,
    )


def test_scripted_divergences_roll_back_and_back_off() -> None:
    model = MLP((4, 8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pilot = LipschitzPilot(
        opt, loss=LossSpec("cross_entropy", 3), mode="network", initial_lr=2.0, backoff=0.1, max_rollbacks=2
    )
    pilot.attach(model)
    first = pilot.on_epoch_end(_signals(1, 2.0, True))
    assert (first.reason, first.restore, first.lr) == (
        "lipschitz-diverged-rollback",
        "lipschitz-last-good",
        (pytest.approx(0.2),),
    )
    assert pilot.rollback.scale == 1.0  # a first-epoch divergence blames the initialisation, not 1/L
    model(torch.randn(5, 4))  # a finite epoch
    ok = pilot.on_epoch_end(_signals(2, 0.2, False))
    assert ok.save == "lipschitz-last-good" and ok.reason == "lipschitz-epoch"
    later = pilot.on_epoch_end(_signals(3, ok.lr[0], True))
    assert ok.lr[0] > 0.2  # 1/L rose: the rollback backs off from the last good LR, 0.2
    assert later.lr[0] == pytest.approx(0.1 * 0.2)
    assert pilot.rollback.scale == pytest.approx(0.1)  # later 1/L are scaled down too
    assert pilot.on_epoch_end(_signals(4, later.lr[0], True)) is None  # max_rollbacks reached: the loop stops


def test_a_rollback_backs_off_from_the_last_good_lr_not_the_failed_one() -> None:
    """The study's root cause 3: after a collapse 1/L is huge (K_z ~ 0), the next epoch diverges at it, and
    a tenth of it diverges again. The rollback must back off from the LR of the last good epoch."""
    model = MLP((4, 8, 3))
    pilot = LipschitzPilot(
        torch.optim.SGD(model.parameters(), lr=0.1), loss=LossSpec("cross_entropy", 3), mode="network",
        initial_lr=0.5, backoff=0.1, max_rollbacks=3,
    )  # fmt: skip
    pilot.attach(model)
    begin = pilot.on_train_begin(_signals(0, 0.1, False))
    assert begin.lr == (0.5,)
    with torch.no_grad():
        model.body[0].bias.zero_()
    model(1e-6 * torch.randn(5, 4))  # epoch 1 at 0.5, good, with almost no activation: K_z ~ 0
    huge = pilot.on_epoch_end(_signals(1, 0.5, False))
    assert huge.reason == "lipschitz-epoch" and huge.lr[0] > 1e3  # the 1/L of a nearly dead network
    # epoch 2 ran at the huge LR and diverged: back off from 0.5 (the last good LR), not from huge.lr
    first = pilot.on_epoch_end(_signals(2, huge.lr[0], True))
    assert (first.reason, first.restore, first.lr) == ("lipschitz-diverged-rollback", "lipschitz-last-good", (0.05,))
    state = pilot.state_dict()
    assert state["good_lr"] == [0.5]
    again = pilot.on_epoch_end(_signals(3, 0.05, True))  # 0.05 diverged too: min(0.05, 0.5) * 0.1
    assert again.lr == (pytest.approx(0.005, rel=1e-12),)
    # the good LR survives a state_dict round trip into a fresh pilot
    fresh = LipschitzPilot(torch.optim.SGD(model.parameters(), lr=0.1), loss=LossSpec("cross_entropy", 3),
                           mode="network", initial_lr=0.5)
    fresh.attach(model)
    fresh.load_state_dict(state)
    assert fresh.good_lr == (0.5,) and fresh.on_epoch_end(_signals(2, huge.lr[0], True)).lr == (0.05,)


def _guarded(**options) -> tuple[nn.Module, LipschitzPilot]:
    """A network-mode pilot at a fixed first LR of 0.5, begun with an untrained-model loss of 2.0."""
    model = MLP((4, 8, 3))
    pilot = LipschitzPilot(torch.optim.SGD(model.parameters(), lr=0.1), loss=LossSpec("cross_entropy", 3),
                           mode="network", initial_lr=0.5, backoff=0.1, **options)
    pilot.attach(model)
    begin = pilot.on_train_begin(EpochSignals(epoch=0, step=0, lr=(0.1,), train_loss=math.nan, val_loss=2.0,
                                              val_metric=math.nan, extra={TRAIN_EVAL_LOSS: 2.0}))
    assert begin.lr == (0.5,) and pilot.initial_loss == 2.0
    return model, pilot


def _epoch(epoch: int, lr: float, train_loss: float) -> EpochSignals:
    return EpochSignals(epoch=epoch, step=6 * epoch, lr=(lr,), train_loss=train_loss, val_loss=train_loss,
                        val_metric=0.5)


def _dying(model: nn.Module, scale: float) -> None:
    """A training forward pass whose penultimate activations are ``scale`` times smaller (dying ReLUs)."""
    with torch.no_grad():
        model.body[0].bias.zero_()
    model(scale * torch.ones(5, 4))


def test_a_stalled_epoch_is_rolled_back() -> None:
    """stall_factor: a mean training loss above 0.98 x the untrained model's (1.99 > 1.96) is a dead network."""
    model, pilot = _guarded(stall_factor=0.98)
    _dying(model, 1.0)
    stalled = pilot.on_epoch_end(_epoch(1, 0.5, 1.99))
    assert (stalled.reason, stalled.restore, stalled.lr) == ("lipschitz-stalled-rollback", "lipschitz-last-good",
                                                             (pytest.approx(0.05, rel=1e-12),))
    assert stalled.info["initial_loss"] == 2.0
    _dying(model, 1.0)
    assert pilot.on_epoch_end(_epoch(2, 0.05, 1.95)).reason == "lipschitz-epoch"  # 1.95 < 1.96: trains
    model, paper = _guarded(stall_factor=None)
    _dying(model, 1.0)
    assert paper.on_epoch_end(_epoch(1, 0.5, 1.99)).reason == "lipschitz-epoch"  # the paper: no such test


def test_a_shrunk_k_z_counts_as_collapsed() -> None:
    """shrink_factor: K_z below 0.1 x the last good epoch's. The paper's test (K_z == 0) misses it, and its
    1/L is huge."""
    for shrink, expected in ((0.1, "lipschitz-collapsed-rollback"), (None, "lipschitz-epoch")):
        model, pilot = _guarded(shrink_factor=shrink)
        _dying(model, 1.0)
        good = pilot.on_epoch_end(_epoch(1, 0.5, 1.0))
        assert good.reason == "lipschitz-epoch" and pilot.good_k_z > 0
        _dying(model, 0.05)  # K_z falls 20x
        decision = pilot.on_epoch_end(_epoch(2, good.lr[0], 1.0))
        assert decision.reason == expected
        if shrink is not None:  # back off from the last good LR (epoch 2's, which was good.lr)
            assert decision.lr == (pytest.approx(0.1 * min(good.lr[0], 0.5), rel=1e-12),)
            assert decision.info["k_z"] < 0.1 * decision.info["good_k_z"]
        else:
            assert decision.lr[0] > 10 * good.lr[0]  # the paper's 1/L rewards the dying network


def test_max_growth_caps_the_next_lr_at_a_multiple_of_the_last_good_one() -> None:
    model, pilot = _guarded(max_growth=1.25)
    _dying(model, 1e-3)  # tiny activations: 1/L is huge
    capped = pilot.on_epoch_end(_epoch(1, 0.5, 1.0))
    assert capped.lr == (0.625,) and capped.info["uncapped_lr"] > 100  # 1.25 x 0.5
    _dying(model, 1e-3)
    assert pilot.on_epoch_end(_epoch(2, 0.625, 1.0)).lr == (pytest.approx(0.78125, rel=1e-12),)
    state = pilot.state_dict()
    assert state["good_lr"] == [0.625] and state["good_k_z"] == pilot.good_k_z
    model, paper = _guarded(max_growth=None)
    _dying(model, 1e-3)
    assert paper.on_epoch_end(_epoch(1, 0.5, 1.0)).lr[0] > 100


def test_the_registry_default_is_guarded_and_the_paper_form_is_selectable() -> None:
    from lrpilot.core.registry import get_method

    defaults = get_method("lipschitz").defaults
    assert (defaults["stall_factor"], defaults["shrink_factor"], defaults["max_growth"]) == (0.98, 0.1, 1.25)
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method="lipschitz", epochs=1, seed=0, progress=False,
                      method_options=PAPER)  # fmt: skip
    pilot = trainer.pilot
    assert (pilot.stall_factor, pilot.shrink_factor, pilot.max_growth) == (None, None, None)
    assert get_method("lipschitz").defaults["cooldown"] == 0.2 and PAPER["cooldown"] == 0.0


def _exploding_regression():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = TensorLoader(x, x.sum(1, keepdim=True) * 10, 16, seed=0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), loader


def _train_exploding(method: str, options: dict) -> tuple[Trainer, History]:
    """Three epochs of ``method`` on the exploding regression: the trainer and its history."""
    model, loader = _exploding_regression()
    trainer = Trainer(model, loader, loader, method=method, epochs=3, seed=0, progress=False, loss_fn=nn.MSELoss(),
                      method_options=options)  # fmt: skip
    return trainer, trainer.run()


def test_a_diverging_first_epoch_is_retried_with_a_smaller_lr() -> None:
    """A non-finite loss: a tanh regression network at an absurd first LR."""
    trainer, history = _train_exploding("lipschitz", {"initial_lr": 1e8, "backoff": 1e-9})
    reasons = [d.reason for d in history.decisions]
    assert reasons[:3] == ["lipschitz-initial-fixed", "lipschitz-diverged-rollback", "lipschitz-epoch"]
    assert history.decisions[1].lr[0] == pytest.approx(0.1)
    assert history.decisions[1].info["first_epoch"] and trainer.pilot.inner.rollback.scale == 1.0  # in the cooldown
    assert history.status == "completed"
    assert math.isnan(history.epochs[0].train_loss)
    assert history.epochs[-1].train_loss < history.epochs[1].train_loss
    assert len(history.epochs) == 3  # the failed epoch is paid for


def test_an_exploded_epoch_is_rolled_back() -> None:
    """Weights beyond float range make max||w|| infinite while the loss is still finite: L is undefined, and
    the loss is far above its value at initialisation."""
    task = TinyTask()
    for explode_factor, reason in (
        (None, "lipschitz-undefined-rollback"),
        (10.0, "lipschitz-exploded-rollback"),
    ):
        history = Trainer(
            task.model(),
            task.train,
            task.val,
            method="lipschitz",
            epochs=3,
            seed=0,
            progress=False,
            # the paper's form: with stall_factor the 3e34 loss is a stall before it is anything else
            method_options={"initial_lr": 1e4, "backoff": 1e-4, "explode_factor": explode_factor, **PAPER},
        ).run()
        reasons = [d.reason for d in history.decisions]
        # the epoch's loss was finite (3e34): only the constant (or the explosion test) tells
        assert math.isfinite(history.epochs[0].train_loss)
        assert reasons == ["lipschitz-initial-fixed", reason, "lipschitz-epoch", "lipschitz-epoch"]
        assert history.status == "completed" and history.epochs[-1].val_metric > 0.9


def test_a_collapsed_network_is_rolled_back() -> None:
    """Dead ReLUs: every penultimate activation of the epoch is zero, L = 0 and 1/L undefined."""
    model = MLP((4, 8, 3))
    with torch.no_grad():
        model.body[0].bias.fill_(-100.0)
    pilot = LipschitzPilot(
        torch.optim.SGD(model.parameters(), lr=0.1), loss=LossSpec("cross_entropy", 3), mode="network"
    )
    pilot.attach(model)
    model(torch.randn(5, 4))
    decision = pilot.on_epoch_end(_signals(1, 0.1, False))
    assert decision.reason == "lipschitz-collapsed-rollback" and decision.restore == "lipschitz-last-good"
    pilot.rollback.max_rollbacks = 1
    model(torch.randn(5, 4))
    assert pilot.on_epoch_end(_signals(2, 0.01, False)).stop  # out of rollbacks: stop, with the reason


def test_the_step_level_guard_lowers_the_multiplier_after_a_rollback() -> None:
    model = MLP((4, 8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = LipschitzGuard(opt, backoff=0.5, max_rollbacks=1)
    assert guard.on_train_begin(_signals(0, 1.0, False)).save == "lipschitz-last-good"
    decision = guard.on_epoch_end(_signals(1, 1.0, True))
    assert decision.restore == "lipschitz-last-good" and decision.lr == (0.5,)
    assert guard.on_epoch_end(_signals(2, 0.5, True)) is None


def test_an_epoch_worse_than_the_initial_model_counts_as_exploded() -> None:
    """Finite losses, but the validation loss is above explode_factor x its value at initialisation."""
    guard = LipschitzGuard(torch.optim.SGD(MLP((4, 8, 3)).parameters(), lr=1.0))  # explode_factor 10
    start = EpochSignals(epoch=0, step=0, lr=(1.0,), train_loss=math.nan, val_loss=2.0, val_metric=0.3)
    guard.on_train_begin(start)
    fine = EpochSignals(epoch=1, step=6, lr=(1.0,), train_loss=1.5, val_loss=19.9, val_metric=0.5)
    assert guard.on_epoch_end(fine).reason == "lipschitz-checkpoint"
    worse = EpochSignals(epoch=2, step=12, lr=(1.0,), train_loss=1.5, val_loss=20.1, val_metric=0.2)
    assert guard.on_epoch_end(worse).reason == "lipschitz-exploded-rollback"
    guard.explode_factor = None
    assert guard.on_epoch_end(worse).reason == "lipschitz-checkpoint"


def test_adamo_recovers_from_a_diverging_multiplier() -> None:
    trainer, history = _train_exploding("adamo", {"lr": 1e30, "backoff": 1e-30})
    reasons = [d.reason for d in history.decisions]
    assert reasons == [
        "lipschitz-checkpoint",
        "lipschitz-diverged-rollback",
        "lipschitz-checkpoint",
        "lipschitz-checkpoint",
    ]
    assert history.status == "completed"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        1.0
    )  # the step-size multiplier, backed off
    assert history.epochs[-1].lr[0] > 0  # telemetry records the LR applied, 1/K


def test_no_rollbacks_means_no_checkpoints() -> None:
    task = TinyTask()
    for name in ("lipschitz", "adamo"):
        trainer = Trainer(
            task.model(),
            task.train,
            task.val,
            method=name,
            epochs=2,
            seed=0,
            progress=False,
            method_options={"max_rollbacks": 0},
        )
        history = trainer.run()
        assert not trainer._checkpoints and "lipschitz-checkpoint" not in [
            d.reason for d in history.decisions
        ]


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"mode": "deep"}, "mode"),
        ({"constant": "beta"}, "constant"),
        ({"weight_bound": "max"}, "weight_bound"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
    ],
)
def test_bad_pilot_options_name_the_option(options: dict, pattern: str) -> None:
    task = TinyTask()
    with pytest.raises(ValueError, match=pattern):
        Trainer(
            task.model(),
            task.train,
            task.val,
            method="lipschitz",
            epochs=1,
            progress=False,
            method_options=options,
        )
