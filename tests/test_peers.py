"""Peers: the missing-extra error, the effective LR against each optimizer's own state, Schedule-Free's
modes, checkpoints and BatchNorm refresh, DoG's averaged model, and training MNIST-1D with the defaults."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

import lrpilot
from lrpilot.baselines.peers import WeightAverage, dadapt_sgd_lr
from lrpilot.core.registry import MissingExtraError, get_method, list_methods
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer
from tests.conftest import TinyTask

PEERS = {
    "dadapt-sgd": "dadaptation",
    "dadapt-adam": "dadaptation",
    "prodigy": "prodigyopt",
    "schedulefree-sgd": "schedulefree",
    "schedulefree-adamw": "schedulefree",
    "dog": "dog",
    "ldog": "dog",
}


def _skip_unless(name: str) -> None:
    if not get_method(name).available:
        pytest.skip(f"{name} needs `pip install 'lrpilot[peers]'`")


def _trainer(name: str, epochs: int = 4, model: nn.Module | None = None, task: TinyTask | None = None, **options) -> Trainer:
    _skip_unless(name)
    task = task or TinyTask()
    return Trainer(model if model is not None else task.model(), task.train, task.val, method=name, epochs=epochs,
                   progress=False, method_options=options)


class BNNet(nn.Sequential):
    """A small MLP with batch normalisation, for the BatchNorm-specific paths."""

    def __init__(self) -> None:
        seed_everything(0)
        super().__init__(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


# ----------------------------------------------------------------------------------------------------
# registry records and the optional dependency
# ----------------------------------------------------------------------------------------------------
def test_every_peer_is_registered_with_its_package_and_the_peers_extra():
    peers = {info.name: info for info in list_methods(tags=["peer"])}
    assert set(peers) == set(PEERS)
    for name, module in PEERS.items():
        info = peers[name]
        assert info.extra == "peers" and info.requires == (module,)
        assert info.lr_granularity == "step" and info.kind == "step-pilot"


def test_a_missing_package_names_the_extra_to_install(monkeypatch, tiny):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "schedulefree" else real(name, *a, **k))
    assert not get_method("schedulefree-sgd").available
    assert "schedulefree-sgd" not in [m.name for m in list_methods(available_only=True)]
    assert "dog" in [m.name for m in list_methods(available_only=True)]
    with pytest.raises(MissingExtraError, match=r"'schedulefree-sgd' needs schedulefree.*pip install 'lrpilot\[peers\]'"):
        lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="schedulefree-sgd", epochs=1, progress=False)


def test_the_cli_reports_a_missing_extra_in_one_line(monkeypatch, capsys):
    from lrpilot.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "dog" else real(name, *a, **k))
    assert main(["train", "--task", "iris-softmax", "--method", "dog", "--epochs", "1", "-q"]) == 2
    assert "pip install 'lrpilot[peers]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# the effective LR in the run record is the optimizer's own value, at every epoch
# ----------------------------------------------------------------------------------------------------
def _group(opt):
    return opt.param_groups[0]


INTERNAL = {
    # D-Adaptation SGD's next step: dlr = d * lr / ||g_0||
    "dadapt-sgd": lambda opt: _group(opt)["d"] * _group(opt)["lr"] / _group(opt)["g0_norm"],
    # D-Adapt Adam and Prodigy: dlr = d * lr (bias correction off by default)
    "dadapt-adam": lambda opt: _group(opt)["d"] * _group(opt)["lr"],
    "prodigy": lambda opt: _group(opt)["d"] * _group(opt)["lr"],
    # DoG: the eta its last step used
    "dog": lambda opt: float(_group(opt)["eta"][0]),
    # L-DoG: its per-tensor etas, averaged with the tensors' sizes as weights
    "ldog": lambda opt: sum(float(e) * p.numel() for e, p in zip(_group(opt)["eta"], _group(opt)["params"]))
    / sum(p.numel() for p in _group(opt)["params"]),
}


@pytest.mark.parametrize("name", sorted(INTERNAL))
def test_recorded_lr_is_the_optimizers_internal_value_every_epoch(name):
    trainer = _trainer(name, epochs=4)
    internal = []
    for epoch in range(1, 5):
        trainer.run(until_epoch=epoch)
        internal.append(INTERNAL[name](trainer.optimizer))
    recorded = [e.lr[0] for e in trainer.history.epochs]
    assert recorded == pytest.approx(internal, rel=1e-6)
    assert len(set(recorded)) == 4, "the effective LR moves (d grows / the schedule decays / eta adapts)"


@pytest.mark.parametrize("name", ["schedulefree-sgd", "schedulefree-adamw"])
def test_schedulefree_recorded_lr_is_the_scheduled_lr_of_the_next_step(name):
    # Warm-up over half the run, so the LR moves every step; the optimizer logs `scheduled_lr` *during*
    # a step, so the LR in force at the end of epoch e is what the first step of epoch e + 1 logs.
    trainer = _trainer(name, epochs=4, warmup_fraction=0.5)
    logged = {}
    step = trainer.optimizer.step

    def logging_step(*args, **kwargs):
        out = step(*args, **kwargs)
        logged[trainer.step + 1] = trainer.optimizer.param_groups[0]["scheduled_lr"]
        return out

    trainer.optimizer.step = logging_step
    hist = trainer.run()
    for e in hist.epochs[:-1]:
        assert e.lr[0] == pytest.approx(logged[e.step + 1], rel=1e-12)
    base = get_method(name).defaults["lr"]
    assert [e.lr[0] for e in hist.epochs] == pytest.approx([base * min(1.0, (6 * k + 1) / 12) for k in (1, 2, 3, 4)])
    assert hist.step_lr[0] == [0, [pytest.approx(base / 12)]]  # 24 steps, 12 of warm-up


def test_dadapt_sgd_lr_is_the_step_applied_to_the_gradient():
    # Without momentum D-Adapt SGD moves the weights by exactly -(d * lr / ||g_0||) * g: the recorded LR
    # is the step size, not the lr multiplier 1.0.
    trainer = _trainer("dadapt-sgd", epochs=2, momentum=0.0, schedule="none")
    trainer.run(until_epoch=1)
    recorded = trainer.history.epochs[-1].lr[0]
    x, y = next(iter(trainer.train_loader))
    trainer.optimizer.zero_grad()
    trainer.loss_fn(trainer.model(x), y).backward()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    grads = [p.grad.detach().clone() for p in trainer.model.parameters()]
    trainer.optimizer.step()
    for p, p0, g in zip(trainer.model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - recorded * g, rtol=1e-5, atol=1e-7)
    assert recorded != 1.0


def test_lr_before_the_first_step_is_undefined_where_it_depends_on_the_first_gradient(tiny):
    _skip_unless("dadapt-sgd")
    from dadaptation import DAdaptSGD

    assert math.isnan(dadapt_sgd_lr(DAdaptSGD(tiny.model().parameters(), lr=1.0))[0])
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="dog", epochs=1, progress=False)
    assert math.isnan(hist.step_lr[0][1][0]) and math.isfinite(hist.step_lr[1][1][0])
    record = hist.to_record(task=None, method="dog", seed=0, config={})
    assert record["step_lr"][0] == [0, [None]]  # JSON null


# ----------------------------------------------------------------------------------------------------
# Schedule-Free: eval-mode checkpoints, train-mode resumption, BatchNorm refresh
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["schedulefree-sgd", "schedulefree-adamw"])
def test_schedulefree_is_saved_in_eval_mode_and_resumed_in_train_mode(name):
    straight = _trainer(name)
    straight.run()

    first = _trainer(name)
    first.run(until_epoch=2)
    state = first.state_dict()
    assert all(g["train_mode"] is False for g in state["optimizer"]["param_groups"])  # the README's advice
    # The weights saved are x, the point evaluated: evaluating them again gives the recorded metric.
    probe = _trainer(name, model=TinyTask().model(seed=7))
    probe.load_state_dict(state)
    assert probe.evaluate() == (first.history.epochs[-1].val_loss, first.history.epochs[-1].val_metric)

    resumed = _trainer(name, model=TinyTask().model(seed=123))
    resumed.load_state_dict(state)
    resumed.run()  # switches to train mode after loading, before its first step
    assert [e.train_loss for e in resumed.history.epochs] == [e.train_loss for e in straight.history.epochs]
    assert [e.val_metric for e in resumed.history.epochs] == [e.val_metric for e in straight.history.epochs]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_the_failure_schedulefree_users_report_and_why_the_loop_avoids_it():
    # A plain loop that calls .train() *before* loading an eval-mode checkpoint steps in eval mode: the
    # optimizer refuses. The loop calls train_mode() before every epoch, i.e. after any load.
    from schedulefree import SGDScheduleFree

    trainer = _trainer("schedulefree-sgd", epochs=2)
    trainer.run(until_epoch=1)
    saved = copy.deepcopy(trainer.optimizer.state_dict())
    model = TinyTask().model()
    opt = SGDScheduleFree(model.parameters(), lr=1.0)
    opt.train()
    opt.load_state_dict(saved)
    x, y = next(iter(TinyTask().train))
    nn.CrossEntropyLoss()(model(x), y).backward()
    with pytest.raises(Exception, match="not in train mode"):
        opt.step()


def test_schedulefree_refreshes_batchnorm_statistics_at_the_evaluated_point():
    task = TinyTask()
    plain = _trainer("schedulefree-sgd", epochs=1, model=BNNet(), task=task, bn_refresh_batches=0)
    plain.run()
    refreshed = _trainer("schedulefree-sgd", epochs=1, model=BNNet(), task=task, bn_refresh_batches=3)
    refreshed.run()
    params = dict(plain.model.named_parameters())
    for name, p in refreshed.model.named_parameters():
        assert torch.equal(p, params[name]), "the refresh must not touch the weights"
    bn_plain, bn_refreshed = plain.model[1], refreshed.model[1]
    assert not torch.equal(bn_plain.running_mean, bn_refreshed.running_mean)

    # By hand: the README's recipe on the un-refreshed model (x weights loaded, eval mode).
    manual = copy.deepcopy(plain.model).train()
    with torch.no_grad():
        for i, (x, _) in enumerate(plain.train_loader):
            if i == 3:
                break
            manual(x)
    torch.testing.assert_close(manual[1].running_mean, bn_refreshed.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(manual[1].running_var, bn_refreshed.running_var, rtol=0, atol=0)
    assert refreshed.history.epochs[-1].val_loss != plain.history.epochs[-1].val_loss


def test_train_mode_is_restored_before_every_training_epoch():
    trainer = _trainer("schedulefree-sgd", epochs=3)
    modes = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        modes.append(trainer.optimizer.param_groups[0]["train_mode"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.run()
    assert modes == [True] * 18
    assert trainer.optimizer.param_groups[0]["train_mode"] is False  # left evaluated: the model holds x


# ----------------------------------------------------------------------------------------------------
# DoG: the averaged model is the one evaluated
# ----------------------------------------------------------------------------------------------------
def test_dog_evaluates_the_polynomial_decay_average_of_its_iterates():
    gamma = 8.0
    trainer = _trainer("dog", epochs=2, gamma=gamma)
    iterates = []
    update = trainer.pilot.average.update

    def recording_update():
        iterates.append([p.detach().clone() for p in trainer.model.parameters()])
        update()

    trainer.pilot.average.update = recording_update
    hist = trainer.run()

    # Slow reference: xbar_1 = x_1, xbar_t = (1 - w_t) xbar_{t-1} + w_t x_t, w_t = (1 + gamma) / (t + gamma).
    avg = [x.clone() for x in iterates[0]]
    for t, xs in enumerate(iterates[1:], start=2):
        w = (1 + gamma) / (t + gamma)
        avg = [(1 - w) * a + w * x for a, x in zip(avg, xs)]
    for p, a in zip(trainer.model.parameters(), avg):  # after training the model holds the average
        torch.testing.assert_close(p.detach(), a, rtol=1e-5, atol=1e-6)
    reference = copy.deepcopy(trainer.model)
    with torch.no_grad():
        val_x, val_y = next(iter(trainer.val_loader))
        assert hist.epochs[-1].val_loss == pytest.approx(float(trainer.loss_fn(reference(val_x), val_y)), rel=1e-6)
    trainer.parts.train_mode()  # the raw iterate comes back for training
    for p, x in zip(trainer.model.parameters(), iterates[-1]):
        assert torch.equal(p, x)


def test_dog_without_averaging_evaluates_the_last_iterate():
    averaged = _trainer("dog", epochs=2)
    averaged.run()
    raw = _trainer("dog", epochs=2, average=False)
    raw.run()
    assert [e.train_loss for e in averaged.history.epochs] == [e.train_loss for e in raw.history.epochs]
    assert [e.val_loss for e in averaged.history.epochs] != [e.val_loss for e in raw.history.epochs]
    assert raw.parts.eval_context is None and raw.parts.extra_state == {}


def test_weight_average_state_round_trip_keeps_the_raw_iterate():
    model = nn.Linear(3, 2)
    avg = WeightAverage(model, gamma=8.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update()
    raw = model.weight.detach().clone()
    with avg.eval_context():
        pass
    state = copy.deepcopy(avg.state_dict())
    other_model = nn.Linear(3, 2)
    other = WeightAverage(other_model, gamma=8.0)
    other.load_state_dict(state)
    other.train()
    assert torch.equal(other_model.weight, raw)
    with pytest.raises(RuntimeError, match="call train"):
        avg.update()  # still in eval mode


def test_dog_reps_rel_follows_the_readme_for_batchnorm_models(tiny):
    plain = _trainer("dog", epochs=1)
    bn = _trainer("dog", epochs=1, model=BNNet())
    assert plain.optimizer.param_groups[0]["reps_rel"] == 1e-6
    assert bn.optimizer.param_groups[0]["reps_rel"] == 1e-4
    assert _trainer("dog", epochs=1, reps_rel=1e-3).optimizer.param_groups[0]["reps_rel"] == 1e-3


# ----------------------------------------------------------------------------------------------------
# training MNIST-1D with the authors' defaults
# ----------------------------------------------------------------------------------------------------
# Validation accuracy after 10 epochs of mnist1d-mlp (batch 100), seed 0; measured values in
# docs/methods/peers.md. sgd-cosine (lr 0.1) reaches 0.66 on the same budget.
QUICK = {"prodigy": 0.60, "schedulefree-sgd": 0.55, "schedulefree-adamw": 0.50, "dog": 0.55, "ldog": 0.55,
         "dadapt-sgd": 0.60}
DADAPT_FAILS = pytest.mark.xfail(
    strict=True, reason="with its defaults D-Adapt Adam's d overshoots on this MLP and the network dies "
    "(reproduced in a plain PyTorch loop; docs/methods/peers.md)")


def _mnist1d(name: str, epochs: int) -> dict:
    _skip_unless(name)
    from lrpilot.bench.tasks import run_task

    return run_task("mnist1d-mlp", name, epochs=epochs, progress=False)


@pytest.mark.parametrize("name", sorted(QUICK) + [pytest.param("dadapt-adam", marks=DADAPT_FAILS)])
def test_peer_trains_mnist1d_with_its_defaults(name):
    record = _mnist1d(name, epochs=10)
    assert record["summary"]["status"] == "completed"
    assert record["summary"]["best_val_metric"] >= QUICK.get(name, 0.5)


FULL = {"prodigy": 0.72, "schedulefree-sgd": 0.69, "schedulefree-adamw": 0.62, "dog": 0.75, "ldog": 0.75}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_peer_reaches_its_measured_accuracy_on_the_full_mnist1d_budget(name):
    record = _mnist1d(name, epochs=30)
    assert record["summary"]["best_val_metric"] >= FULL[name]



@pytest.mark.parametrize("name", ["dog", "ldog"])
def test_dog_state_stays_on_the_parameters_device_after_loading(name):
    # The package moves rbar, G and eta to the CPU in load_state_dict (a GPU run would then mix devices
    # after a resume or rollback); ours keeps them with the parameters. On a CPU-only machine this checks
    # the state round trip and the devices; the GPU path itself is untested here.
    trainer = _trainer(name, epochs=1)
    trainer.run()
    state = copy.deepcopy(trainer.optimizer.state_dict())
    trainer.optimizer.load_state_dict(state)
    group = trainer.optimizer.param_groups[0]
    device = group["params"][0].device
    assert group["rbar"].device == device and group["G"].device == device
    assert all(e.device == device for e in group["eta"])
    assert type(trainer.optimizer).__name__ == ("LDoG" if name == "ldog" else "DoG")
