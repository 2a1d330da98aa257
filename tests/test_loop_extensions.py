"""The generic loop mechanisms the peers and the safety net use: decision sequences, the train-mode
hook, and extra training state carried by checkpoints, rollbacks and ``Trainer.state_dict``."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lrpilot
from lrpilot.core.contract import Decision, MethodParts, Pilot, StepSignals
from lrpilot.loop.fit import Trainer
from tests.conftest import TinyTask


class Sequenced(Pilot):
    def on_train_begin(self, signals):
        return [Decision(reason="save-first", save="a"), Decision(reason="then-lr", lr=(0.05,))]

    def on_epoch_end(self, signals):
        if signals.epoch == 2:
            return (Decision(reason="back", restore="a"), Decision(reason="lower", lr=(0.01,)))
        return None


def test_a_sequence_of_decisions_is_applied_and_recorded_in_order(tiny):
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = lrpilot.fit(model, tiny.train, tiny.val, method=Sequenced(opt), epochs=3, progress=False)
    assert [(d.epoch, d.reason, d.action, d.lr) for d in hist.decisions] == [
        (0, "save-first", "checkpoint", [0.1]), (0, "then-lr", "set-lr", [0.05]),
        (2, "back", "rollback", [0.1]),  # the checkpoint was saved before the LR changed
        (2, "lower", "set-lr", [0.01]),
    ]
    assert [e.lr for e in hist.epochs] == [[0.05], [0.05], [0.01]]


def test_a_hook_answering_something_else_is_a_clear_error(tiny):
    class Bad(Pilot):
        def on_epoch_end(self, signals):
            return ["not a decision"]

    model = tiny.model()
    with pytest.raises(TypeError, match="returned str; expected Decision, a sequence of them, or None"):
        lrpilot.fit(model, tiny.train, tiny.val, method=Bad(torch.optim.SGD(model.parameters(), lr=0.1)),
                    epochs=1, progress=False)


class Counter:
    """Extra training state: counts optimizer steps (a stand-in for an iterate average)."""

    def __init__(self):
        self.steps = 0

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class CountingPilot(Pilot):
    def __init__(self, optimizer, counter, rollback_at=None):
        super().__init__(optimizer)
        self.counter = counter
        self.rollback_at = rollback_at

    def on_train_begin(self, signals):
        return Decision(reason="save", save="start")

    def on_step_end(self, signals: StepSignals):
        self.counter.steps += 1

    def on_epoch_end(self, signals):
        if signals.epoch == self.rollback_at:
            return Decision(reason="back", restore="start")
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_train_mode_is_called_before_every_training_epoch_after_evaluation(tiny):
    log = []
    model = tiny.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @contextlib.contextmanager
    def eval_context():
        log.append("eval")
        yield

    step = opt.step

    def logging_step(*args, **kwargs):
        if log[-1] != "step":
            log.append("step")
        return step(*args, **kwargs)

    opt.step = logging_step
    parts = MethodParts(opt, eval_context=eval_context, train_mode=lambda: log.append("train"))
    lrpilot.fit(model, tiny.train, tiny.val, method=parts, epochs=2, progress=False)
    assert log == ["eval", "train", "step", "eval", "train", "step", "eval"]


def test_extra_state_rolls_back_with_the_model(tiny):
    counter = Counter()
    task = TinyTask()
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = MethodParts(opt, CountingPilot(opt, counter, rollback_at=2), extra_state={"counter": counter})
    lrpilot.fit(model, task.train, task.val, method=parts, epochs=3, progress=False)
    assert counter.steps == 6  # two epochs rolled back to 0, then one more epoch of 6 steps


def test_extra_state_is_part_of_the_trainer_state(tiny):
    def trainer():
        task = TinyTask()
        model = task.model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        counter = Counter()
        parts = MethodParts(opt, CountingPilot(opt, counter), extra_state={"counter": counter})
        return Trainer(model, task.train, task.val, method=parts, epochs=3, progress=False), counter

    first, counter = trainer()
    first.run(until_epoch=2)
    state = first.state_dict()
    assert state["extra_state"] == {"counter": {"steps": 12}}
    resumed, counter2 = trainer()
    resumed.load_state_dict(state)
    assert counter2.steps == 12
    resumed.run()
    assert counter2.steps == 18
    bad = dict(state, extra_state={"other": {}})
    with pytest.raises(ValueError, match=r"saved extra state \['other'\] does not match this method's \['counter'\]"):
        trainer()[0].load_state_dict(bad)
