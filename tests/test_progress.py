"""Long searches report progress: one INFO line per trial off a terminal (a bar on one), and the CLI
shows those lines when it is not on a terminal."""

from __future__ import annotations

import logging
import re

import pytest

from lrpilot.cli import main
from lrpilot.core.progress import Progress
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.mi_decay import run_range_test
from tests.conftest import TinyTask
from tests.test_mi_decay import run_record


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lrpilot" and r.levelno == logging.INFO]


def test_range_test_logs_one_line_per_trial_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    def trial(lr: float, t: int) -> dict:
        crashed = lr >= 1.0 and t == 0
        return {**run_record(lr, [0.5, 0.6, 0.7], [1.0, 1.1, 1.2], [1.0, 0.1, 0.05]),
                "status": "crashed" if crashed else "completed"}

    with caplog.at_level(logging.INFO, logger="lrpilot"):
        run_range_test(trial, [0.1, 1.0, 3.0], trials=2)
    lines = _lines(caplog)
    expected = [  # the crash at lr 1 ends trial 0; trial 1 restarts from lr 1
        r"mi-decay range test \[1/6\] trial 0 lr 0.1: completed, \d+\.\d s",
        r"mi-decay range test \[2/6\] trial 0 lr 1: crashed, \d+\.\d s",
        r"mi-decay range test \[3/6\] trial 1 lr 1: completed, \d+\.\d s",
        r"mi-decay range test \[4/6\] trial 1 lr 3: completed, \d+\.\d s",
    ]
    assert len(lines) == len(expected)
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), line


def test_grid_search_logs_one_line_per_lr_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    task = TinyTask()
    with caplog.at_level(logging.INFO, logger="lrpilot"):
        trainer = Trainer(task.model(), task.train, task.val, method="sgd-cosine-tuned", epochs=1, progress=False,
                          method_options={"grid": (0.01, 0.1)})
    runs = trainer.parts.info["search"]["runs"]
    lines = [line for line in _lines(caplog) if "search" in line]
    assert len(lines) == 2
    for i, (line, run) in enumerate(zip(lines, runs), start=1):
        metric = f"{run['best_val_metric']:.4g}"
        assert re.fullmatch(
            rf"sgd-cosine-tuned search \[{i}/2\] lr {run['lr']:g} -> best_val_metric {metric} \(completed\), \d+\.\d s",
            line,
        ), line


def test_a_bar_replaces_the_lines_on_a_terminal(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lrpilot"), Progress(2, "demo", enabled=True) as progress:
        assert progress.bar is not None
        progress.update("one")
        progress.update("two")
    assert progress.bar is None  # closed on exit
    assert _lines(caplog) == []
    assert "demo" in capsys.readouterr().err


def test_the_cli_shows_info_lines_when_not_on_a_terminal() -> None:
    logger = logging.getLogger("lrpilot")
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        assert main(["list", "tasks"]) == 0  # pytest's stderr is not a terminal
        assert logger.getEffectiveLevel() == logging.INFO
    finally:
        logger.setLevel(before)


def test_log_every_thins_the_lines_and_logs_the_last_item(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lrpilot"), Progress(50, "sweep", unit="step", log_every=20) as progress:
        for i in range(45):  # stops early, as a sweep whose loss blew up
            progress.update(f"item {i + 1}")
    assert [re.sub(r", \d+\.\d s$", "", line) for line in _lines(caplog)] == [
        "sweep [20/50] item 20", "sweep [40/50] item 40", "sweep [45/50] item 45"]
    with pytest.raises(ValueError, match="log_every"):
        Progress(3, "bad", log_every=0)


def test_auto_sweeps_and_race_log_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    task = TinyTask()
    with caplog.at_level(logging.INFO, logger="lrpilot"):
        trainer = Trainer(task.model(), task.train, task.val, method="auto", epochs=1, progress=False,
                          method_options={"sweep_steps": 60})  # the default: two sweeps, then the race of three
    lines = [line for line in _lines(caplog) if line.startswith("auto LR sweep")]
    race = trainer.parts.info["race"]
    sweeps = [race["sweeps"][name]["steps"] for name in ("sgd", "adamw")]
    assert len(lines) == sum(steps // 20 + (steps % 20 > 0) for steps in sweeps)
    assert re.fullmatch(rf"auto LR sweep \[{sweeps[1]}/60\] lr \S+ loss \S+, \d+\.\d s", lines[-1]), lines[-1]
    raced = [line for line in _lines(caplog) if line.startswith("auto race")]
    total = 3 * race["sgd"]["steps"]
    assert raced and re.fullmatch(rf"auto race \(sgd, adamw, schedulefree-adamw\) \[{total}/{total}\] schedulefree-adamw "
                                  rf"loss \S+, \d+\.\d s", raced[-1])
