"""The safety net: its rule on scripted losses, rollback and halving on a scripted divergence (for a
constant LR, a schedule, and LRs that live inside the optimizer), transparency, resumption, bad options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lrpilot
from lrpilot.core.contract import TRAIN_EVAL_LOSS, Decision, EpochSignals, Pilot
from lrpilot.core.registry import get_method
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.safety_net import CHECKPOINT_TAG, SafetyNet
from tests.conftest import TinyTask

STEPS = 6  # TinyTask: optimizer steps per epoch


def _signals(epoch: int, train_loss: float, lr: float = 0.1, val_loss: float = 1.0) -> EpochSignals:
    nonfinite = not math.isfinite(train_loss)
    return EpochSignals(epoch=epoch, step=STEPS * epoch, lr=(lr,), train_loss=train_loss, val_loss=val_loss,
                        val_metric=0.5, nonfinite=nonfinite)


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


# ----------------------------------------------------------------------------------------------------
# the rule, on scripted losses
# ----------------------------------------------------------------------------------------------------
def test_rule_on_a_scripted_loss_sequence():
    opt = _opt(0.1)
    net = SafetyNet(opt, max_rollbacks=3)
    begin = net.on_train_begin(_signals(0, math.nan, val_loss=2.0))  # L0 = 2.0
    assert [(d.reason, d.save) for d in begin] == [("safety-net-checkpoint", CHECKPOINT_TAG)]
    assert net.threshold() == pytest.approx(min(2 * 2.0, 1.05 * 2.0))  # first epoch: back above L0 +5 %

    def step(epoch, loss):
        decisions = net.on_epoch_end(_signals(epoch, loss, lr=opt.param_groups[0]["lr"]))
        for d in decisions:  # what the loop does with the LR
            if d.lr is not None:
                opt.param_groups[0]["lr"] = d.lr[0]
        return [(d.reason, d.info.get("why"), d.lr) for d in decisions]

    assert step(1, 1.5) == [("safety-net-checkpoint", None, None)]  # good: reference 1.5
    assert net.threshold() == pytest.approx(2.1)  # min(2 * 1.5, 1.05 * 2.0): the L0 clause binds early on
    assert step(2, 2.2) == [("safety-net-rollback", "exploding", (0.05,))]
    assert step(3, 0.5) == [("safety-net-checkpoint", None, None)]
    assert net.threshold() == pytest.approx(1.0)  # now the doubling clause binds
    assert step(4, 0.7) == []  # worse than the checkpoint but not diverged: keep the best checkpoint
    assert net.threshold() == pytest.approx(1.0)  # still measured from the checkpoint's 0.5
    assert step(5, 1.01) == [("safety-net-rollback", "exploding", (0.025,))]
    assert step(6, 0.5) == [("safety-net-checkpoint", None, None)]  # as good as the checkpoint
    assert step(7, math.nan) == [("safety-net-rollback", "nonfinite", (0.0125,))]
    assert net.rollbacks == 3 and net.scale == 0.125 and not net.handles_nonfinite
    assert step(8, math.inf) == []  # out of rollbacks: stand aside (the loop stops the run)


def test_a_loss_near_zero_does_not_explode_by_doubling():
    net = SafetyNet(_opt())
    net.on_train_begin(_signals(0, math.nan, val_loss=2.0))
    net.on_epoch_end(_signals(1, 0.01))
    assert net.threshold() == pytest.approx(2 * 0.1 * 2.0)  # floor: 0.1 * L0
    assert net.diverged(0.05) is None and net.diverged(0.41) == "exploding" and net.diverged(math.nan) == "nonfinite"


def test_the_untrained_loss_is_the_larger_of_the_validation_and_training_losses(tiny):
    net = SafetyNet(_opt())
    assert TRAIN_EVAL_LOSS in net.needs  # asked for once, before training
    signals = EpochSignals(epoch=0, step=0, lr=(0.1,), train_loss=math.nan, val_loss=2.0, val_metric=0.5,
                           extra={TRAIN_EVAL_LOSS: 2.4})
    net.on_train_begin(signals)
    assert net.initial_loss == 2.4 and net.threshold() == pytest.approx(1.05 * 2.4)
    assert TRAIN_EVAL_LOSS not in net.needs
    # Through the loop: the loss over the training set is computed at the start only.
    trainer = _run("sgd", bad_steps=[], epochs=2, until=None, hyper_fraction=0.1)
    task = TinyTask()
    fresh = Trainer(task.model(), task.train, task.val, method="sgd", epochs=1, progress=False, safety_net=True)
    # The net decides from the decision split carved out of the training data, never from val.
    assert fresh.decision_split["source"] == "train" and fresh.hyper_loader is not None
    expected = max(fresh.evaluate(fresh.hyper_loader)[0], fresh.evaluate(fresh.train_loader)[0])
    assert trainer.pilot.initial_loss == expected != fresh.evaluate()[0]
    assert all(TRAIN_EVAL_LOSS not in e.extra for e in trainer.history.epochs)


def test_initial_factor_below_1_rolls_back_a_stalled_epoch():
    """The hypergradient family's 0.98: an epoch not 2 % below the untrained loss is stalled (rt-hpo on LeNet-5
    at chance: 2.2992 against 2.3031); one 2 % below is progress, one above the untrained loss explodes."""
    net = SafetyNet(_opt(), initial_factor=0.98)
    net.on_train_begin(_signals(0, math.nan, val_loss=2.3031))
    assert net.threshold() == pytest.approx(0.98 * 2.3031)
    assert net.diverged(2.2992) == "stalled"
    assert net.diverged(2.3100) == "exploding"
    assert net.diverged(0.98 * 2.3031 - 1e-6) is None
    decisions = net.on_epoch_end(_signals(1, 2.2992, val_loss=2.30))
    assert [d.reason for d in decisions] == ["safety-net-rollback"] and decisions[0].info["why"] == "stalled"
    assert net.scale == 0.5


def test_initial_factor_inf_turns_the_untrained_loss_clause_off():
    net = SafetyNet(_opt(), initial_factor=math.inf)
    net.on_train_begin(_signals(0, math.nan, val_loss=2.0))
    assert net.threshold() == 4.0


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"factor": 1.0}, r"factor must be in \(0.0, 1.0\), got 1.0"),
        ({"explode_factor": 1.0}, r"explode_factor"),
        ({"initial_factor": 0.0}, r"initial_factor"),
        ({"floor": -0.1}, r"floor"),
        ({"max_rollbacks": -1}, r"max_rollbacks"),
        ({"patience": 3}, r"unknown safety net option 'patience'; valid options: factor, explode_factor"),
    ],
)
def test_bad_options_name_the_option(options, pattern, tiny):
    with pytest.raises(ValueError, match=pattern):
        lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=1, safety_net=options, progress=False)


# ----------------------------------------------------------------------------------------------------
# scripted divergence through the loop
# ----------------------------------------------------------------------------------------------------
class ScriptedLoss(nn.Module):
    """Cross-entropy, made non-finite (or multiplied) on the training steps whose 0-based index is in
    ``bad_steps`` (training calls only: evaluation runs without gradients)."""

    def __init__(self, bad_steps, value=math.nan):
        super().__init__()
        self.bad_steps = set(bad_steps)
        self.value = value
        self.calls = 0

    def forward(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        if not torch.is_grad_enabled():
            return loss
        index, self.calls = self.calls, self.calls + 1
        if index in self.bad_steps:
            return loss * self.value if math.isfinite(self.value) else loss + self.value
        return loss


def _run(method, bad_steps, epochs=4, value=math.nan, safety_net=True, until=None, hyper_fraction=0.0, **options):
    # hyper_fraction=0 by default: runs with and without the net train on the same data.
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method=method, epochs=epochs, progress=False,
                      loss_fn=ScriptedLoss(bad_steps, value), metric="accuracy", method_options=options,
                      safety_net=safety_net, hyper_fraction=hyper_fraction)
    trainer.run(until)
    return trainer


def _weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_nonfinite_epoch_rolls_back_to_the_last_good_epoch_and_halves_a_constant_lr():
    saved = {}
    trainer = _run("sgd", bad_steps=[9], epochs=4, until=1, lr=0.1)  # step 9: inside epoch 2
    saved["end of epoch 1"] = _weights(trainer)
    hist = trainer.run(until_epoch=2)
    # The rollback restored the weights of the end of epoch 1 exactly.
    for p, q in zip(_weights(trainer), saved["end of epoch 1"]):
        assert torch.equal(p, q)
    hist = trainer.run()
    assert hist.status == "completed"
    assert [(d.epoch, d.reason) for d in hist.decisions] == [
        (0, "safety-net-checkpoint"), (1, "safety-net-checkpoint"), (2, "safety-net-rollback"),
        (3, "safety-net-checkpoint"), (4, "safety-net-checkpoint"),
    ]
    rollback = hist.decisions[2]
    assert rollback.lr == [0.05] and rollback.info["why"] == "nonfinite" and rollback.info["scale"] == 0.5
    assert [e.lr for e in hist.epochs] == [[0.1], [0.1], [0.05], [0.05]]  # the halving persists
    assert math.isnan(hist.epochs[1].train_loss) and all(math.isfinite(e.val_loss) for e in hist.epochs[2:])
    json.dumps(hist.to_record(task=None, method="sgd", seed=0, config={}), allow_nan=False)


def test_without_the_net_the_same_script_ends_the_run():
    hist = _run("sgd", bad_steps=[9], safety_net=None, lr=0.1).history
    assert hist.status == "diverged" and len(hist.epochs) == 2


def test_exploding_finite_loss_rolls_back_too():
    # Losses x1e3 for the whole of epoch 2: finite, but far above twice the reference.
    hist = _run("sgd", bad_steps=range(6, 12), value=1e3, lr=0.1).history
    assert [d.reason for d in hist.decisions][2] == "safety-net-rollback"
    assert hist.decisions[2].info["why"] == "exploding"
    assert hist.epochs[1].train_loss > hist.decisions[2].info["threshold"]


def test_halving_a_schedule_rescales_its_own_trajectory():
    # sgd-cosine over 24 steps; step 9 (epoch 2) is non-finite. After the rollback to the end of epoch 1
    # the schedule resumes where it was then (its state is rewound with the model), times 0.5.
    trainer = _run("sgd-cosine", bad_steps=[9], epochs=4, lr=0.1)
    hist = trainer.history
    lr = dict((step, v[0]) for step, v in hist.step_lr)

    def cosine(t):  # the schedule after t of its own steps
        return 0.05 * (1 + math.cos(math.pi * t / 24))

    assert lr[6] == pytest.approx(cosine(6))  # end of epoch 1, before the failure
    # Loop steps 10..24 (the failed epoch took 3 steps: 9 ran and failed, so 3 budget steps were lost).
    retried = [s for s in sorted(lr) if s > 9]
    assert retried, "steps after the rollback must be recorded"
    for s in retried:
        assert lr[s] == pytest.approx(0.5 * cosine(6 + (s - 9)), rel=1e-9, abs=1e-15)
    assert hist.decisions[2].lr == [pytest.approx(0.5 * cosine(6))]


def test_halving_reaches_lrs_that_live_inside_the_optimizer_dog():
    # DoG's eta = lr * rbar / sqrt(G): rbar and G come back with the rolled-back optimizer state, and the
    # lr multiplier is halved, so the first eta after the rollback is half what it would have been.
    trainer = _run("dog", bad_steps=[9], epochs=2, until=1)
    state_at_checkpoint = {k: trainer.optimizer.param_groups[0][k].clone() for k in ("rbar", "G")}
    avg_t = trainer.parts.extra_state["average"].averager.t
    trainer.run(until_epoch=2)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == 0.5
    assert torch.equal(group["rbar"], state_at_checkpoint["rbar"]) and torch.equal(group["G"], state_at_checkpoint["G"])
    assert trainer.parts.extra_state["average"].averager.t == avg_t  # the average rolled back with the model
    assert trainer.history.decisions[-1].lr == [pytest.approx(0.5 * float(state_at_checkpoint["rbar"]
                                                                         / torch.sqrt(state_at_checkpoint["G"])))]


def test_halving_reaches_d_adaptation_and_persists():
    trainer = _run("dadapt-adam", bad_steps=[9], epochs=4, schedule="none")
    hist = trainer.history
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.5]
    d = trainer.optimizer.param_groups[0]["d"]
    assert hist.epochs[-1].lr == [pytest.approx(0.5 * d)]


def test_schedulefree_rolls_back_consistently():
    with_net = _run("schedulefree-sgd", bad_steps=[9], epochs=4)
    assert with_net.history.status == "completed"
    assert with_net.optimizer.param_groups[0]["lr"] == 0.5
    assert all(math.isfinite(e.val_loss) for e in with_net.history.epochs[2:])


@pytest.mark.parametrize("method", ["sgd-cosine", "plateau", "dadapt-adam", "schedulefree-sgd", "dog"])
def test_the_net_is_transparent_while_nothing_diverges(method):
    if not get_method(method).available:
        pytest.skip("needs lrpilot[peers]")
    plain = _run(method, bad_steps=[], safety_net=None)
    netted = _run(method, bad_steps=[])
    assert [e.train_loss for e in netted.history.epochs] == [e.train_loss for e in plain.history.epochs]
    assert [e.lr for e in netted.history.epochs] == [e.lr for e in plain.history.epochs]
    assert netted.history.step_lr == plain.history.step_lr
    for p, q in zip(_weights(netted), _weights(plain)):
        assert torch.equal(p, q)
    assert {d.reason for d in netted.history.decisions} - {d.reason for d in plain.history.decisions} == {
        "safety-net-checkpoint"}


@pytest.mark.parametrize("method", ["sgd-cosine", "dog", "schedulefree-sgd"])
def test_resuming_after_a_rollback_continues_identically(method):
    if not get_method(method).available:
        pytest.skip("needs lrpilot[peers]")
    straight = _run(method, bad_steps=[9], epochs=4)
    first = _run(method, bad_steps=[9], epochs=4, until=3)
    state = first.state_dict()
    task = TinyTask()
    loss = ScriptedLoss([9])
    loss.calls = first.loss_fn.calls
    resumed = Trainer(task.model(seed=5), task.train, task.val, method=method, epochs=4, progress=False,
                      loss_fn=loss, metric="accuracy", safety_net=True, hyper_fraction=0.0)
    resumed.load_state_dict(state)
    resumed.run()
    assert [e.train_loss for e in resumed.history.epochs] == [e.train_loss for e in straight.history.epochs]
    assert [e.lr for e in resumed.history.epochs] == [e.lr for e in straight.history.epochs]
    for p, q in zip(_weights(resumed), _weights(straight)):
        assert torch.equal(p, q)


def test_the_net_stands_aside_after_max_rollbacks():
    hist = _run("sgd", bad_steps=range(6, 100), epochs=5, safety_net={"max_rollbacks": 2}, lr=0.1).history
    assert [d.reason for d in hist.decisions].count("safety-net-rollback") == 2
    assert hist.status == "diverged" and hist.decisions[-1].reason == "nonfinite-loss"


def test_a_method_that_rolls_back_by_itself_is_left_to_do_so():
    class RollsBackOnNaN(Pilot):
        handles_nonfinite = True

        def on_train_begin(self, signals):
            return Decision(reason="own-save", save="own")

        def on_epoch_end(self, signals):
            if signals.nonfinite:
                return Decision(reason="own-rollback", restore="own", lr=tuple(v / 10 for v in signals.lr))
            return None

    task = TinyTask()
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, task.train, task.val, method=RollsBackOnNaN(opt), epochs=3, progress=False,
                      loss_fn=ScriptedLoss([9]), metric="accuracy", safety_net=True)
    hist = trainer.run()
    assert [d.reason for d in hist.decisions] == [
        "own-save", "safety-net-checkpoint", "safety-net-checkpoint", "own-rollback", "safety-net-checkpoint",
        "safety-net-checkpoint",
    ]
    assert trainer.pilot.rollbacks == 0 and hist.epochs[-1].lr == [pytest.approx(0.01)]


def test_cli_flag_turns_the_net_on_and_reports_rollbacks(tmp_path, capsys):
    from lrpilot.cli import main

    out = tmp_path / "run.json"
    assert main(["train", "--task", "iris-softmax", "--method", "sgd", "--lr", "1e6", "-o", "momentum=0.0",
                 "--epochs", "6", "--safety-net", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    rollbacks = sum(d["reason"] == "safety-net-rollback" for d in record["decisions"])
    assert rollbacks > 0 and f"{rollbacks} rollbacks" in printed
    assert record["config"]["safety_net"] == {}


def test_a_state_saved_with_the_net_does_not_load_without_it():
    first = _run("sgd-cosine", bad_steps=[], epochs=2, until=1)
    state = first.state_dict()
    plain = _run("sgd-cosine", bad_steps=[], epochs=2, safety_net=None, until=0)
    with pytest.raises(ValueError, match="saved with pilot SafetyNet, this trainer has SchedulePilot.*same safety_net"):
        plain.load_state_dict(state)


def test_a_pilot_that_probes_activations_works_inside_the_net(tiny):
    """The wrappers (core.contract.PilotWrapper) hand on the inner pilot's probe: MI decay, which reads the
    network's outputs on its probe inputs every epoch, used to fail inside the net ("SafetyNet needs signal
    'probe' but sets no `probe`")."""
    options = {"lr_min": 0.01, "lr_max": 0.5, "lr_top": 0.2, "epsilon": 0.05, "mi_samples": 96}
    trainer = lrpilot.Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=3, progress=False,
                              safety_net=True, method_options=options)  # fmt: skip
    assert trainer.pilot.probe is trainer.pilot.inner.probe is not None
    netted = trainer.run()
    assert netted.status == "completed"
    mi = [d.reason for d in netted.decisions if not d.reason.startswith("safety-net")]
    assert mi[0] == "mi-start" and len(mi) == 4  # the start and one MI decision per epoch, each from a probe


@pytest.mark.parametrize("name", ["auto", "hd-train", "hd-val", "rt-hpo"])
def test_a_method_whose_default_form_has_a_net_refuses_a_second_one(tiny, name) -> None:
    """The net may sit inside a cooldown (the cooled hypergradient methods, auto's wsd schedule): a
    second one was once accepted there, wrapping the cooldown in another net."""
    options = dict(get_method(name).test_options)
    with pytest.raises(ValueError, match="already has a safety net"):
        Trainer(tiny.model(), tiny.train, tiny.val, method=name, epochs=2, progress=False, safety_net=True,
                method_options=options)
    Trainer(tiny.model(), tiny.train, tiny.val, method=name, epochs=2, progress=False, safety_net=True,
            method_options={**options, "rollback": False})  # the user's own net instead: accepted
