"""Decisions never see the split results are scored on, and no side pass moves the training order.

A method that decides from validation signals (hd-val's and rt-hpo's hypergradient batches, the
Lipschitz family's divergence test, a range test's trials, the safety net, plateau) gets a decision
split of its own: ``hyper_loader``, or a seeded fraction carved out of the training data. The run
record says which (``info.decision_split``). Side passes (the ``train_eval_loss`` pass, the
``TRAIN_PASS`` signal, a search's trials) leave every random source alone, a ``DataLoader``'s own
generator included.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import lrpilot
from lrpilot.core.contract import TRAIN_EVAL_LOSS, TRAIN_PASS, EpochSignals, Pilot
from lrpilot.core.data import TensorLoader
from lrpilot.loop.fit import DEFAULT_HYPER_FRACTION, Trainer
from tests.conftest import TinyTask


def _rows(loader) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for x, _ in loader for row in x}


def test_a_method_that_decides_from_validation_gets_a_split_carved_from_the_training_data():
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False)
    n = task.train.num_samples
    k = round(DEFAULT_HYPER_FRACTION * n)
    assert trainer.decision_split == {"source": "train", "fraction": DEFAULT_HYPER_FRACTION, "samples": k}
    held, kept, scored = _rows(trainer.hyper_loader), _rows(trainer.train_loader), _rows(task.val)
    assert len(held) == k and len(kept) == n - k
    assert held.isdisjoint(kept) and held | kept == _rows(task.train)  # carved out of the training data
    assert held.isdisjoint(scored)  # never the scored split
    history = trainer.run()
    assert history.info["decision_split"] == trainer.decision_split  # in the run record
    # Same seed, same split: the carve is reproducible.
    again = Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False)
    assert _rows(again.hyper_loader) == held


def test_hypergradient_batches_come_from_the_decision_split():
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False)
    held = _rows(trainer.hyper_loader)
    batches = trainer._val_batches(0)
    for _ in range(2 * len(trainer.hyper_loader)):
        x, _ = next(batches)
        assert {tuple(r.tolist()) for r in x} <= held


class _Recorder(Pilot):
    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.seen: list[float] = []

    def on_train_begin(self, signals: EpochSignals):
        self.seen.append(signals.val_loss)

    def on_epoch_end(self, signals: EpochSignals):
        self.seen.append(signals.val_loss)


def test_the_pilot_sees_the_decision_split_and_the_record_the_scored_split():
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method="sgd", safety_net=True, epochs=2, progress=False)
    seen: list[float] = []
    inner = trainer.pilot.on_epoch_end
    trainer.pilot.on_epoch_end = lambda s: (seen.append(s.val_loss), inner(s))[1]
    history = trainer.run()
    # The pilot's val_loss is the decision split's; the record keeps the scored one.
    assert seen[-1] == pytest.approx(trainer.evaluate(trainer.hyper_loader)[0])
    assert seen[-1] != history.epochs[-1].val_loss
    assert history.epochs[-1].val_loss == pytest.approx(trainer.evaluate()[0])


def test_a_registry_method_without_a_split_sees_no_validation_signal_and_a_user_pilot_sees_val():
    task = TinyTask()
    aalr = Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False)
    assert aalr.decision_split == {"source": "none"} and aalr.hyper_loader is None  # J over the training set
    assert aalr.train_loader.num_samples == task.train.num_samples  # trains on all of it
    model = task.model()
    pilot = _Recorder(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = Trainer(model, task.train, task.val, method=pilot, epochs=1, progress=False)
    trainer.run()
    assert trainer.decision_split == {"source": "val"}  # said in the record
    assert pilot.seen[0] == pytest.approx(trainer.history.info["initial"]["val_loss"])


def test_a_given_hyper_loader_is_used_and_hyper_fraction_zero_decides_from_val():
    task = TinyTask()
    split = TensorLoader(*next(iter(task.val)), 8, shuffle=False)
    given = Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False, hyper_loader=split)
    assert given.decision_split == {"source": "given"} and given.train_loader.num_samples == task.train.num_samples
    val = Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False, hyper_fraction=0)
    assert val.decision_split == {"source": "val"} and val.hyper_loader is None
    with pytest.raises(ValueError, match="hyper_fraction must be in"):
        Trainer(task.model(), task.train, task.val, method="hd-val", epochs=1, progress=False, hyper_fraction=1.0)


def test_a_dataloader_is_carved_and_an_iterable_one_asks_for_a_hyper_loader():
    task = TinyTask()
    x, y = task.train.inputs, task.train.targets
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    trainer = Trainer(task.model(), loader, task.val, method="hd-val", epochs=1, progress=False)
    assert trainer.decision_split["source"] == "train"
    assert len(trainer.train_loader.dataset) + len(trainer.hyper_loader.dataset) == len(x)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    with pytest.raises(ValueError, match="pass hyper_loader="):
        Trainer(task.model(), DataLoader(Stream(), batch_size=16), task.val, method="hd-val", epochs=1, progress=False)


# ----------------------------------------------------------------------------------------------------
# side passes leave the training order alone, with a user's shuffling DataLoader
# ----------------------------------------------------------------------------------------------------
class _Asks(Pilot):
    """Does nothing but ask for the side passes every epoch (and run the training pass it is handed)."""

    def __init__(self, optimizer, ask: bool):
        super().__init__(optimizer)
        self.ask = ask

    @property
    def needs(self):  # type: ignore[override]
        return frozenset({TRAIN_EVAL_LOSS, TRAIN_PASS}) if self.ask else frozenset()

    def on_epoch_end(self, signals: EpochSignals):
        if self.ask:
            assert math.isfinite(signals[TRAIN_EVAL_LOSS])
            signals[TRAIN_PASS](lambda x, y: None)


@pytest.mark.parametrize("own_generator", [False, True])
def test_side_passes_do_not_change_the_training_order_of_a_shuffling_dataloader(own_generator):
    task = TinyTask()
    data = TensorDataset(task.train.inputs, task.train.targets)

    def losses(ask: bool) -> list[float]:
        gen = torch.Generator().manual_seed(11) if own_generator else None
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=gen)
        model = task.model()
        pilot = _Asks(torch.optim.SGD(model.parameters(), lr=0.1), ask)
        history = lrpilot.fit(model, loader, task.val, method=pilot, epochs=4, progress=False)
        return [e.train_loss for e in history.epochs]

    assert losses(True) == losses(False)


@pytest.mark.parametrize("own_generator", [False, True])
def test_a_range_test_leaves_the_training_order_of_a_shuffling_dataloader_alone(own_generator):
    """Training after mi-decay's range test is step for step the training with the bounds it found given."""
    task = TinyTask()
    data = TensorDataset(task.train.inputs, task.train.targets)
    split = TensorLoader(*next(iter(task.val)), 16, shuffle=False)  # the same decision split for both runs

    def loader():
        gen = torch.Generator().manual_seed(5) if own_generator else None
        return DataLoader(data, batch_size=16, shuffle=True, generator=gen)

    rrt = {"rrt_lrs": (0.003, 0.03, 0.3), "rrt_epochs": 2, "rrt_trials": 2, "mi_samples": 64}
    searched = Trainer(task.model(), loader(), task.val, method="mi-decay", epochs=3, seed=0, progress=False,
                       method_options=rrt, hyper_loader=split)
    bounds = {k: searched.pilot.bounds[k] for k in ("lr_min", "lr_max", "lr_top", "epsilon")}
    found = searched.run()
    given = lrpilot.fit(task.model(), loader(), task.val, method="mi-decay", epochs=3, seed=0, progress=False,
                        mi_samples=64, hyper_loader=split, **bounds)
    assert [e.train_loss for e in found.epochs] == [e.train_loss for e in given.epochs]
