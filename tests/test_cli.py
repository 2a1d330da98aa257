"""The command line: listings generated from the registries, the run record contract, clear errors."""

from __future__ import annotations

import json

import pytest

from lrpilot.bench.tasks import list_tasks
from lrpilot.cli import main
from lrpilot.core.registry import list_methods


def test_list_methods_is_name_tab_description(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{m.name}\t{m.description}" for m in list_methods()]


def test_list_tasks_is_name_tab_description(capsys):
    assert main(["list", "tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{t.name}\t{t.description}" for t in list_tasks()]


def test_train_writes_the_run_record(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(["train", "--task", "iris-softmax", "--method", "sgd-step", "--epochs", "6", "--seed", "1",
                 "--lr", "0.05", "-o", "milestones=(0.5,)", "--out", str(out), "-q"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["format"] == 1
    assert (record["task"], record["method"], record["seed"]) == ("iris-softmax", "sgd-step", 1)
    assert record["config"]["method_options"]["lr"] == 0.05
    assert record["config"]["method_options"]["milestones"] == [0.5]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert [e["lr"][0] for e in record["epochs"]] == pytest.approx([0.05] * 3 + [0.005] * 3)
    assert record["decisions"][0]["reason"] == "step-decay"
    assert record["summary"]["steps"] == 6 * 8
    assert "iris-softmax sgd-step seed=1: best accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope", "--method", "sgd"], "invalid choice: 'nope'"),
        (["train", "--task", "iris-softmax", "--method", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_unknown_names_list_the_valid_ones(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert message in err and ("sgd-cosine" in err or "mnist1d-mlp" in err)


def test_bad_option_is_one_clear_line(capsys):
    code = main(["train", "--task", "iris-softmax", "--method", "sgd", "-o", "momentum=-1", "--epochs", "1", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lrpilot: error:") and "momentum" in err and "Traceback" not in err


def test_unknown_option_lists_valid_ones(capsys):
    code = main(["train", "--task", "iris-softmax", "--method", "adam", "-o", "momentum=0.9", "-q"])
    assert code == 2
    assert "valid options: lr, beta1, beta2, eps, weight_decay" in capsys.readouterr().err


def test_cuda_without_a_gpu_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["train", "--task", "iris-softmax", "--method", "sgd", "--device", "cuda"])


def test_train_threads_sets_torchs_thread_count_and_rejects_zero(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored afterwards; --threads sets it for --nproc children
    before = torch.get_num_threads()
    try:
        assert main(["train", "--task", "iris-softmax", "--method", "sgd", "--epochs", "1", "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--task", "iris-softmax", "--method", "sgd", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
