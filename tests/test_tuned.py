"""Grid-tuned baselines: the grid, the chosen LR and the search cost in the record; the main run is the
chosen grid run; diverged LRs are never chosen; the cheap protocol; bad grids."""

from __future__ import annotations

import json

import pytest

import lrpilot
from lrpilot.baselines.register import ADAM_COSINE_OPTIONS, SGD_COSINE_OPTIONS
from lrpilot.baselines.tuned import DEFAULT_GRIDS
from lrpilot.bench.tasks import run_task
from lrpilot.core.registry import get_method
from lrpilot.loop.fit import Trainer
from tests.conftest import TinyTask

SEARCH_KEYS = {"base", "criterion", "search_epochs", "grid", "chosen", "at_edge", "runs", "total_epochs",
               "total_steps", "total_train_s", "total_wall_s"}
RUN_KEYS = {"lr", "best_val_metric", "final_val_metric", "epochs", "steps", "train_s", "wall_s", "status"}


def _tuned(name="sgd-cosine-tuned", epochs=3, **options):
    task = TinyTask()
    trainer = Trainer(task.model(), task.train, task.val, method=name, epochs=epochs, progress=False,
                      method_options=options)
    trainer.run()
    return trainer


def test_search_record_shows_grid_choice_and_cost():
    trainer = _tuned(grid=(0.003, 0.03, 0.3), epochs=3)
    search = trainer.parts.info["search"]
    assert set(search) == SEARCH_KEYS
    assert search["grid"] == [0.003, 0.03, 0.3] and [r["lr"] for r in search["runs"]] == search["grid"]
    assert all(set(r) == RUN_KEYS for r in search["runs"])
    best = max(search["runs"], key=lambda r: r["best_val_metric"])
    assert search["chosen"]["lr"] == best["lr"] and search["chosen"]["best_val_metric"] == best["best_val_metric"]
    # Full-budget protocol: every grid run is the run's budget, and the totals add them up.
    assert all(r["epochs"] == 3 and r["steps"] == 18 for r in search["runs"])
    assert search["total_epochs"] == 9 and search["total_steps"] == 54
    assert search["total_train_s"] == pytest.approx(sum(r["train_s"] for r in search["runs"]))
    assert 0 < search["total_train_s"] <= search["total_wall_s"]
    assert trainer.optimizer.param_groups[0]["initial_lr"] == search["chosen"]["lr"]


def test_main_run_repeats_the_chosen_grid_run_from_the_same_initial_weights():
    trainer = _tuned(grid=(0.01, 0.1), epochs=3)
    chosen = trainer.parts.info["search"]["chosen"]
    task = TinyTask()
    alone = lrpilot.fit(task.model(), task.train, task.val, method="sgd-cosine", epochs=3, lr=chosen["lr"],
                        progress=False)
    assert [e.val_metric for e in trainer.history.epochs] == [e.val_metric for e in alone.epochs]
    assert trainer.history.best_val_metric == chosen["best_val_metric"]


def test_record_carries_the_search_under_info_method(tmp_path):
    record = run_task("iris-softmax", "adam-cosine-tuned", epochs=2,
                      method_options={"grid": (1e-3, 1e-2, 1e-1)}, progress=False)
    search = record["info"]["method"]["search"]
    assert search["base"] == "adam-cosine" and search["grid"] == [1e-3, 1e-2, 1e-1]
    assert record["config"]["method_options"]["grid"] == [1e-3, 1e-2, 1e-1]  # JSON: a list
    json.dumps(record, allow_nan=False)


def test_a_diverged_lr_is_never_chosen_and_all_diverged_is_an_error():
    trainer = _tuned(grid=(0.05, 1e6), epochs=2, momentum=0.0)
    runs = trainer.parts.info["search"]["runs"]
    assert runs[1]["status"] == "diverged" and trainer.parts.info["search"]["chosen"]["lr"] == 0.05
    with pytest.raises(ValueError, match=r"every LR of the grid \[1000000.0, 10000000.0\] diverged.*option grid"):
        _tuned(grid=(1e6, 1e7), epochs=1, momentum=0.0)


def test_cheap_protocol_and_final_criterion():
    trainer = _tuned(grid=(0.01, 0.1), epochs=4, search_epochs=1, criterion="final")
    search = trainer.parts.info["search"]
    assert search["search_epochs"] == 1 and search["criterion"] == "final_val_metric"
    assert [r["epochs"] for r in search["runs"]] == [1, 1] and search["total_steps"] == 12
    best = max(search["runs"], key=lambda r: r["final_val_metric"])
    assert search["chosen"]["lr"] == best["lr"]
    assert len(trainer.history.epochs) == 4  # the main run keeps the budget


def test_edge_choice_is_flagged(caplog):
    search = _tuned(grid=(1e-4, 1e-3), epochs=1).parts.info["search"]  # either LR is an edge of this grid
    assert search["at_edge"] is True and "at the edge of the grid" in caplog.text
    search = _tuned(grid=(0.003, 0.03, 0.3), epochs=2).parts.info["search"]
    assert search["at_edge"] == (search["chosen"]["lr"] != 0.03)


@pytest.mark.parametrize(
    "grid, pattern",
    [((), r"grid .* non-empty list of positive LRs"), ((0.1, 0.1), r"lists an LR twice"), ("0.1", r"grid")],
)
def test_bad_grid_is_named(grid, pattern):
    with pytest.raises(ValueError, match=pattern):
        _tuned(grid=grid, epochs=1)


def test_options_mirror_the_base_methods():
    for name, base, extra in (("sgd-cosine-tuned", "sgd-cosine", SGD_COSINE_OPTIONS),
                              ("adam-cosine-tuned", "adam-cosine", ADAM_COSINE_OPTIONS)):
        base_defaults = dict(get_method(base).defaults)
        assert base_defaults.pop("lr") and base_defaults == extra
        tuned = get_method(name)
        assert tuned.defaults["grid"] == DEFAULT_GRIDS[base] and "lr" not in tuned.defaults
        assert "tuned" in tuned.tags


def test_adam_cosine_anneals_to_zero(tiny):
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="adam-cosine", epochs=2, lr=0.01, progress=False)
    assert hist.step_lr[0][1] == [0.01] and hist.step_lr[-1][1][0] == pytest.approx(0.0, abs=1e-12)
    assert hist.step_lr[6][1][0] == pytest.approx(0.005)
