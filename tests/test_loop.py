"""The training loop: decisions, checkpoints and rollbacks, non-finite losses, bad input, telemetry."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

import lrpilot
from lrpilot.core.contract import TRAIN_EVAL_LOSS, Decision, EpochSignals, MethodParts, Pilot
from lrpilot.core.data import TensorLoader
from lrpilot.loop.fit import Trainer
from lrpilot.loop.history import RECORD_FORMAT, load_record, save_record
from tests.conftest import TinyTask, blobs


class ScriptedPilot(Pilot):
    """Returns a scripted decision per epoch and remembers every signal it saw."""

    needs = frozenset({TRAIN_EVAL_LOSS})
    handles_nonfinite = True

    def __init__(self, optimizer, script, begin=None):
        super().__init__(optimizer)
        self.script = dict(script)
        self.begin = begin
        self.seen: list[EpochSignals] = []

    def on_train_begin(self, signals):
        self.seen.append(signals)
        return self.begin

    def on_epoch_end(self, signals):
        self.seen.append(signals)
        return self.script.get(signals.epoch)


def _trainer(task: TinyTask, pilot_factory, epochs=4, **kw) -> Trainer:
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Trainer(model, task.train, task.val, method=pilot_factory(opt), epochs=epochs, progress=False, **kw)


def test_decisions_are_applied_in_order_and_recorded(tiny):
    script = {
        1: Decision(reason="save-a", save="a"),
        2: Decision(reason="halve", lr=(0.05,)),
        3: Decision(reason="back-to-a", restore="a", lr=(0.025,)),
    }
    trainer = _trainer(tiny, lambda opt: ScriptedPilot(opt, script))
    hist = trainer.run()
    assert [(d.epoch, d.action, d.reason, d.lr) for d in hist.decisions] == [
        (1, "checkpoint", "save-a", [0.1]),
        (2, "set-lr", "halve", [0.05]),
        (3, "rollback", "back-to-a", [0.025]),
    ]
    # lr in an epoch record is the LR the epoch trained with.
    assert [e.lr for e in hist.epochs] == [[0.1], [0.1], [0.05], [0.025]]
    assert [e.epoch for e in hist.epochs] == [1, 2, 3, 4]  # the rolled-back epochs count in the budget


def test_a_rollback_in_the_last_epoch_makes_the_checkpoint_the_final_result(tiny):
    """The restored weights are the run's result: the record's final is their metric, not the bad epoch's."""
    script = {2: Decision(reason="save", save="c"), 4: Decision(reason="last-rollback", restore="c")}
    hist = _trainer(tiny, lambda opt: ScriptedPilot(opt, script)).run()
    assert hist.final["reason"] == "last-rollback"
    assert hist.final["val_metric"] == pytest.approx(hist.epochs[1].val_metric)  # epoch 2's weights
    assert hist.final_val_metric == hist.final["val_metric"]
    plain = _trainer(tiny, lambda opt: ScriptedPilot(opt, {2: Decision(reason="save", save="c")})).run()
    assert plain.final == {} and plain.final_val_metric == plain.epochs[-1].val_metric


def test_rollback_restores_weights_optimizer_and_rng_bit_for_bit(tiny):
    saved = {}

    class Probe(ScriptedPilot):
        def on_epoch_end(self, signals):
            decision = super().on_epoch_end(signals)
            if signals.epoch == 1:
                # What the loop will snapshot right after this decision is the state now.
                saved["params"] = [p.detach().clone() for p in trainer.model.parameters()]
                saved["momentum"] = [
                    self.optimizer.state[p]["momentum_buffer"].clone() for p in trainer.model.parameters()
                ]
                saved["rng"] = torch.get_rng_state().clone()
            return decision

    script = {1: Decision(reason="save", save="ckpt"), 3: Decision(reason="rollback", restore="ckpt", stop=True)}
    trainer = _trainer(tiny, lambda opt: Probe(opt, script))
    trainer.run()
    for p, q in zip(trainer.model.parameters(), saved["params"]):
        assert torch.equal(p, q)
    for p, buf in zip(trainer.model.parameters(), saved["momentum"]):
        assert torch.equal(trainer.optimizer.state[p]["momentum_buffer"], buf)
    assert torch.equal(torch.get_rng_state(), saved["rng"])
    assert trainer.history.status == "stopped"


def test_checkpoint_survives_training_after_a_restore(tiny):
    # Restoring twice from the same tag must give the same weights: the loop must not hand the
    # checkpoint's own tensors to the model (load_state_dict keeps references).
    script = {
        1: Decision(reason="save", save="c"),
        2: Decision(reason="r1", restore="c"),
        4: Decision(reason="r2", restore="c"),
    }
    trainer = _trainer(tiny, lambda opt: ScriptedPilot(opt, script), epochs=4)
    trainer.run()
    expected = trainer._checkpoints["c"]["model"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name])


def test_reset_optimizer_clears_state_but_keeps_lr(tiny):
    script = {2: Decision(reason="reset", reset_optimizer=True)}
    trainer = _trainer(tiny, lambda opt: ScriptedPilot(opt, script), epochs=2)
    trainer.run()
    assert len(trainer.optimizer.state) == 0
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1


def test_restoring_an_unsaved_tag_names_the_saved_ones(tiny):
    trainer = _trainer(tiny, lambda opt: ScriptedPilot(opt, {1: Decision(reason="x", restore="nope")}))
    with pytest.raises(KeyError, match="never saved"):
        trainer.run()


def test_pilot_receives_declared_signals(tiny):
    trainer = _trainer(tiny, lambda opt: ScriptedPilot(opt, {}), epochs=2)
    trainer.run()
    seen = trainer.pilot.seen
    assert [s.epoch for s in seen] == [0, 1, 2]
    assert math.isnan(seen[0].train_loss)
    expected = trainer.evaluate(trainer.train_loader)[0]
    assert seen[-1][TRAIN_EVAL_LOSS] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KeyError, match="add it to the pilot's `needs`"):
        seen[-1]["probe"]


def _diverging(task: TinyTask, method, epochs=3, **options):
    model = task.model()
    return lrpilot.fit(model, task.train, task.val, method=method, epochs=epochs, progress=False, **options)


def test_nonfinite_loss_stops_a_method_that_cannot_recover(tiny):
    hist = _diverging(tiny, "sgd", lr=1e6, momentum=0.0)
    assert hist.status == "diverged"
    assert hist.decisions[-1].reason == "nonfinite-loss" and hist.decisions[-1].action == "stop"
    assert math.isnan(hist.epochs[-1].train_loss) and math.isnan(hist.epochs[-1].val_metric)
    record = hist.to_record(task=None, method="sgd", seed=0, config={})
    json.dumps(record, allow_nan=False)  # NaN became null


def test_nonfinite_loss_is_a_signal_a_pilot_can_recover_from(tiny):
    class HalveOnNaN(Pilot):
        handles_nonfinite = True

        def on_train_begin(self, signals):
            return Decision(reason="initial", save="init")

        def on_epoch_end(self, signals):
            if signals.nonfinite:
                lr = tuple(v * 1e-6 for v in signals.lr)
                return Decision(reason="nan-rollback", restore="init", reset_optimizer=True, lr=lr)
            return None

    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    hist = lrpilot.fit(model, tiny.train, tiny.val, method=HalveOnNaN(opt), epochs=3, progress=False)
    assert hist.status == "completed"
    assert [d.reason for d in hist.decisions] == ["initial", "nan-rollback"]
    assert math.isfinite(hist.epochs[-1].val_loss)
    assert hist.epochs[-1].lr == [pytest.approx(1.0)]


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------
def test_targets_of_the_wrong_shape_are_named(tiny):
    x, y = blobs()
    bad = TensorLoader(x, y.reshape(-1, 1), 32)
    with pytest.raises(ValueError, match=r"loss_fn failed on model outputs of shape \(32, 3\) and targets of shape \(32, 1\)"):
        lrpilot.fit(tiny.model(), bad, tiny.val, epochs=1, progress=False)


def test_regression_shape_mismatch_is_caught_before_broadcasting():
    x = torch.randn(64, 3)
    y = torch.randn(64)
    loader = TensorLoader(x, y, 16)
    with pytest.raises(ValueError, match=r"outputs have shape \(16, 1\) but targets .* \(16,\)"):
        lrpilot.fit(nn.Linear(3, 1), loader, loader, loss_fn=nn.MSELoss(), epochs=1, progress=False)


def test_inputs_the_model_cannot_take_are_named(tiny):
    bad = TensorLoader(torch.randn(64, 7), torch.zeros(64, dtype=torch.long), 16)
    with pytest.raises(ValueError, match=r"model failed on the first batch of train_loader \(inputs of shape \(16, 7\)\)"):
        lrpilot.fit(tiny.model(), bad, tiny.val, epochs=1, progress=False)


def test_empty_dataset_is_named(tiny):
    empty = TensorLoader(torch.empty(0, 4), torch.empty(0, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="no batches: the training set is empty"):
        lrpilot.fit(tiny.model(), empty, tiny.val, epochs=1, progress=False)
    with pytest.raises(ValueError, match="validation set is empty"):
        lrpilot.fit(tiny.model(), tiny.train, empty, epochs=1, progress=False)


def test_nan_target_is_named():
    x = torch.randn(64, 3)
    y = torch.randn(64, 1)
    y[40] = math.nan
    loader = TensorLoader(x, y, 16, shuffle=False)
    with pytest.raises(ValueError, match=r"batch 2\).*targets contain NaN"):
        lrpilot.fit(nn.Linear(3, 1), loader, TensorLoader(x[:16], y[:16], 16), loss_fn=nn.MSELoss(), epochs=1,
                    progress=False)


def test_loader_that_does_not_yield_pairs_is_named(tiny):
    class Singles:
        def __iter__(self):
            yield torch.randn(4, 4)

        def __len__(self):
            return 1

    with pytest.raises(TypeError, match=r"must yield \(inputs, targets\) pairs of tensors; got a Tensor"):
        lrpilot.fit(tiny.model(), Singles(), tiny.val, epochs=1, progress=False)


def test_options_for_an_object_method_are_rejected(tiny):
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="only apply to registry method names"):
        lrpilot.fit(model, tiny.train, tiny.val, method=opt, lr=0.2, progress=False)


def test_optimizer_over_another_model_is_rejected(tiny):
    opt = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        lrpilot.fit(tiny.model(), tiny.train, tiny.val, method=opt, progress=False)


@pytest.mark.parametrize("epochs", [0, -1, 2.5])
def test_bad_budget(tiny, epochs):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        lrpilot.fit(tiny.model(), tiny.train, tiny.val, epochs=epochs, progress=False)


# ----------------------------------------------------------------------------------------------------
# telemetry and determinism
# ----------------------------------------------------------------------------------------------------
def test_same_seed_same_run_and_other_seed_other_run(tiny):
    def run(seed):
        task = TinyTask(seed=seed)
        return lrpilot.fit(task.model(), task.train, task.val, method="sgd-cosine", epochs=3, seed=seed, progress=False)

    a, b, c = run(0), run(0), run(1)
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    assert [e.train_loss for e in a.epochs] != [e.train_loss for e in c.epochs]


def test_step_lr_is_recorded_for_per_step_schedules(tiny):
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd-cosine", epochs=2, lr=0.1, progress=False)
    steps = [s for s, _ in hist.step_lr]
    assert steps == list(range(0, 13))  # 6 steps per epoch, plus the initial LR at step 0
    assert hist.step_lr[0][1] == [0.1]
    assert hist.step_lr[-1][1][0] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=1, progress=False).step_lr == []


def test_timings_are_cumulative_and_training_excludes_evaluation(tiny):
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=3, progress=False)
    walls = [e.wall_s for e in hist.epochs]
    assert walls == sorted(walls) and walls[0] > 0
    assert all(e.train_s < e.wall_s for e in hist.epochs)


def test_cpu_seconds_count_the_thread_working_not_the_clock(tiny):
    """``train_cpu_s`` spans what ``train_s`` spans, in CPU seconds of the training thread: a pilot that
    sleeps 0.3 s at each epoch's end adds 0.3 s of training seconds per epoch and no CPU seconds,
    as a process that took the CPU away would; work the pilot does itself counts."""

    class Sleeper(ScriptedPilot):
        def on_epoch_end(self, signals):
            import time

            time.sleep(0.3)
            return super().on_epoch_end(signals)

    hist = _trainer(tiny, lambda opt: Sleeper(opt, {}), epochs=2).run()
    for e in hist.epochs:
        assert e.train_cpu_s is not None and 0 < e.train_cpu_s <= e.train_s
        assert e.train_s - e.train_cpu_s >= 0.3 * e.epoch - 0.01  # the sleeps: wall, not CPU
    assert hist.summary()["train_cpu_s"] == hist.epochs[-1].train_cpu_s
    record = hist.to_record(task="tiny", method="sgd", seed=0, config={})
    assert record["epochs"][1]["train_cpu_s"] == hist.epochs[1].train_cpu_s
    # A record from before the field existed still reads (format 1): the field is simply unknown.
    for e in record["epochs"]:
        del e["train_cpu_s"]
    assert lrpilot.History.from_record(record).epochs[0].train_cpu_s is None


def test_run_record_round_trip(tmp_path, tiny):
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd-step", epochs=4, progress=False)
    record = hist.to_record(task="tiny", method="sgd-step", seed=0, config={"epochs": 4})
    path = tmp_path / "run.json"
    save_record(record, path)
    loaded = load_record(path)
    assert loaded["format"] == RECORD_FORMAT
    for key in ("task", "method", "seed", "config", "epochs", "decisions", "summary"):
        assert key in loaded
    assert set(loaded["epochs"][0]) >= {"epoch", "step", "train_loss", "val_loss", "val_metric", "lr", "wall_s"}
    assert set(loaded["decisions"][0]) >= {"epoch", "step", "lr", "action", "reason"}
    assert loaded["decisions"][0]["reason"] == "step-decay" and loaded["decisions"][0]["epoch"] == 2
    assert set(loaded["summary"]) >= {"best_val_metric", "final_val_metric", "steps", "wall_s"}
    again = lrpilot.History.from_record(loaded)
    assert again.best_val_metric == hist.best_val_metric
    loaded["format"] = 99
    path.write_text(json.dumps(loaded))
    with pytest.raises(ValueError, match="format 99 is not supported"):
        load_record(path)


def test_tensor_loader_order_is_a_function_of_seed_and_epoch():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    loader = TensorLoader(x, y, 4, seed=3)

    def order(epoch):
        loader.set_epoch(epoch)
        return torch.cat([b for _, b in loader]).tolist()

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(1)) == list(range(10))
    shards = [TensorLoader(x, y, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    parts = [torch.cat([b for _, b in s]).tolist() for s in shards]
    assert len(parts[0]) == len(parts[1]) == 5 and sorted(parts[0] + parts[1]) == list(range(10))


def test_trial_trains_a_copy_from_the_initial_weights_and_leaves_the_run_alone(tiny):
    seen = {}

    def build(ctx, lr):
        before = [p.detach().clone() for p in ctx.model.parameters()]
        rng = torch.get_rng_state().clone()
        trial = ctx.trial("sgd", epochs=2, lr=0.5)
        seen["trial_epochs"] = len(trial.history.epochs)
        seen["model_untouched"] = all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
        seen["rng_untouched"] = torch.equal(rng, torch.get_rng_state())
        seen["trial_moved"] = not all(torch.equal(a, b) for a, b in zip(before, trial.model.parameters()))
        return MethodParts(torch.optim.SGD(ctx.params(), lr=lr))

    from lrpilot.core.registry import _REGISTRY, MethodInfo

    info = MethodInfo("trial-test-method", "test", "runs a trial first", build, {"lr": 0.1})
    _REGISTRY[info.name] = info
    try:
        with_trial = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method=info.name, epochs=2, progress=False)
    finally:
        del _REGISTRY[info.name]
    plain = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=2, momentum=0.0, progress=False)
    assert seen == {"trial_epochs": 2, "model_untouched": True, "rng_untouched": True, "trial_moved": True}
    assert [e.train_loss for e in with_trial.epochs] == [e.train_loss for e in plain.epochs]


def test_closure_methods_get_a_closure_that_can_skip_backward(tiny):
    calls = []

    class NeedsGraph(torch.optim.SGD):
        def step(self, closure):
            loss = closure(backward=False)
            calls.append(loss.requires_grad)
            return closure()  # the usual closure: zero_grad, backward

    model = tiny.model()
    parts = MethodParts(NeedsGraph(model.parameters(), lr=0.1), needs_closure=True)
    hist = lrpilot.fit(model, tiny.train, tiny.val, method=parts, epochs=1, progress=False)
    assert calls == [True] * 6 and hist.status == "completed"


def test_val_closure_hands_out_training_sized_validation_batches_that_resume(tiny):
    seen: list[list[float]] = []

    class TakesVal(torch.optim.SGD):
        def step(self, closure=None, *, val_closure):
            loss = val_closure()
            seen.append(loss.item())
            return super().step()

    def run(until=None, state=None):
        model = tiny.model()
        parts = MethodParts(TakesVal(model.parameters(), lr=0.05), step_kwargs=frozenset({"val_closure"}))
        trainer = Trainer(model, tiny.train, tiny.val, method=parts, epochs=4, progress=False)
        if state is not None:
            trainer.load_state_dict(state)
        trainer.run(until_epoch=until)
        return trainer

    run()
    full = list(seen)
    assert len(full) == 24
    seen.clear()
    first = run(until=2)
    run(state=first.state_dict())
    assert seen == full  # the same validation batches, in the same order, across the resume

    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="sgd", epochs=1, progress=False)
    sizes = [b[0].shape[0] for b in itertools.islice(trainer._val_batches(0), 4)]
    assert sizes == [32, 32, 32, 32]  # the training batch size, not the validation loader's 96
