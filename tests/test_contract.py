"""Contract tests generated from the registry: every registered method must pass all of them.

A method added to the registry is covered here with no change to this file. Methods whose optional
dependency is missing are skipped with the install command in the reason.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from lrpilot.core.registry import build_method, get_method, list_methods, resolve_options
from lrpilot.loop.fit import Trainer
from tests.conftest import TinyTask

EPOCHS = 4
METHODS = [info.name for info in list_methods()]


def _trainer(name: str, *, model_seed: int | None = None, **extra) -> Trainer:
    info = get_method(name)
    if not info.available:
        pytest.skip(f"{name} needs `pip install 'lrpilot[{info.extra}]'`")
    task = TinyTask()
    options = {**info.test_options, **extra}
    return Trainer(task.model(model_seed), task.train, task.val, method=name, epochs=EPOCHS, seed=0,
                   progress=False, method_options=options)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("name", METHODS)
def test_lowers_the_loss(name: str) -> None:
    trainer = _trainer(name)
    initial = trainer.evaluate()[0]
    history = trainer.run()
    assert history.status == "completed", history.status_reason
    final_val_loss = history.epochs[-1].val_loss
    assert final_val_loss < initial, f"{name}: val loss {initial:.4f} -> {final_val_loss:.4f}"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "dtype must stay float32"


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_resume_continues_identically(name: str) -> None:
    straight = _trainer(name)
    straight.run()

    first = _trainer(name)
    first.run(until_epoch=2)
    state = first.state_dict()
    # A fresh trainer whose model starts elsewhere: everything must come from the state.
    resumed = _trainer(name, model_seed=123)
    resumed.load_state_dict(state)
    resumed.run()

    a, b = straight.history, resumed.history
    assert [e.lr for e in a.epochs] == [e.lr for e in b.epochs]
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs]
    assert [e.val_metric for e in a.epochs] == [e.val_metric for e in b.epochs]
    assert [(d.epoch, d.action, d.reason, d.lr) for d in a.decisions] == [
        (d.epoch, d.action, d.reason, d.lr) for d in b.decisions
    ]
    assert a.step_lr == b.step_lr
    for p, q in zip(_params(straight), _params(resumed)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_rejected_with_the_valid_ones(name: str) -> None:
    info = get_method(name)
    with pytest.raises(ValueError, match=r"unknown option 'not_an_option'.*valid options"):
        resolve_options(info, {"not_an_option": 1})


@pytest.mark.parametrize("name", METHODS)
def test_invalid_options_raise_a_clear_error(name: str) -> None:
    info = get_method(name)
    if "lr" in info.defaults:
        with pytest.raises(ValueError, match=r"lr .*positive finite"):
            resolve_options(info, {"lr": -1.0})
        with pytest.raises(ValueError, match=r"lr .*positive finite"):
            resolve_options(info, {"lr": math.nan})
    assert info.invalid_options, f"{name}: add at least one invalid_options example to its registry record"
    for bad, pattern in info.invalid_options:
        with pytest.raises(ValueError, match=pattern):
            _trainer(name, **bad)


@pytest.mark.parametrize("name", METHODS)
def test_record_is_complete(name: str) -> None:
    info = get_method(name)
    assert info.description and "\t" not in info.description and "\n" not in info.description
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), "method names are lowercase words joined by '-'"
    assert set(info.test_options) <= set(info.defaults)


def test_registry_rejects_duplicates() -> None:
    from lrpilot.core.registry import register

    with pytest.raises(ValueError, match="already registered"):
        register(get_method("sgd"))


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'; valid methods: .*sgd-cosine"):
        get_method("nope")


def test_build_method_rejects_a_bad_factory_result() -> None:
    from lrpilot.core.registry import _REGISTRY, BuildContext, MethodInfo

    info = MethodInfo("broken-test-method", "test", "returns nonsense", lambda ctx: "oops")
    _REGISTRY[info.name] = info
    try:
        with pytest.raises(TypeError, match="not MethodParts"):
            build_method(info.name, BuildContext(model=torch.nn.Linear(1, 1), epochs=1, steps_per_epoch=1))
    finally:
        del _REGISTRY[info.name]


def test_listing_follows_the_family_modules_whatever_the_import_order():
    from lrpilot.core.registry import _FAMILY_MODULES, _ORIGIN

    names = [info.name for info in list_methods()]
    assert names[0] == "sgd"  # baselines first, although `import lrpilot` imports some families earlier
    ranks = [_FAMILY_MODULES.index(_ORIGIN[n]) for n in names if _ORIGIN.get(n) in _FAMILY_MODULES]
    assert ranks == sorted(ranks)
