"""benchmarks/overhead.py end to end on a tiny task: every requested method gets a ratio per round,
sgd's is 1, the epoch-level pilots are timed through the loop, and the JSON carries it all."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark_on_a_tiny_task(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.json"
    _load().main(["--tasks", "iris-softmax", "--methods", "hd-train,onecycle,lipschitz", "--rounds", "2",
                  "--steps", "3", "--warmup", "1", "--variant", "hd-train[flat=False, beta=0.01]", "--json", str(out)])
    (res,) = json.loads(out.read_text())
    step = {r["method"]: r for r in res["step"]}
    epoch = {r["method"]: r for r in res["epoch"]}
    assert set(step) == {"sgd", "hd-train", "onecycle", "hd-train[flat=False, beta=0.01]"}
    assert set(epoch) == {"sgd", "lipschitz"}
    for rows in (step, epoch):
        assert rows["sgd"]["ratio_median"] == 1.0
        for r in rows.values():
            assert r["error"] is None and r["rounds"] == 2 and r["seconds"] > 0
    assert step["hd-train"]["host_reads_per_step"] == 1.0 and step["onecycle"]["host_reads_per_step"] == 0.0
    assert epoch["lipschitz"]["host_reads_per_step"] is None  # counted in the step-level table only
    text = capsys.readouterr().out
    assert "### iris-softmax: step-level" in text and "| hd-train | step-pilot |" in text


def test_variants_parse_as_the_cli_options_and_bad_ones_say_how() -> None:
    parse = _load().parse_variant
    assert parse("hd-train[flat=False, beta=0.01, lr_rule=additive]") == (
        "hd-train", {"flat": False, "beta": 0.01, "lr_rule": "additive"})
    assert parse("sgd[]") == ("sgd", {})
    for bad in ("hd-train", "hd-train[flat]"):
        with pytest.raises(SystemExit, match="METHOD\\[key=value|key=value"):
            parse(bad)
    with pytest.raises(SystemExit, match="not a registered step-level method"):
        _load().main(["--tasks", "iris-softmax", "--methods", "sgd", "--rounds", "1", "--steps", "1",
                      "--variant", "lipschitz[lr=0.1]"])


def test_flat_state_prototype_step_is_its_docstring_rule() -> None:
    """benchmarks/flat_state_prototype.py's step, in closed form: u <- 0.9 u + g; lr <- lr exp(beta cos(g, u_prev))."""
    import math

    import torch

    spec = importlib.util.spec_from_file_location("flat_state_prototype", ROOT / "benchmarks" / "flat_state_prototype.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    g_w, g_b = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])
    w.grad, b.grad = g_w.clone(), g_b.clone()
    opt = module.FlatHypergradientPrototype([w, b], lr=0.5, beta=0.1)
    opt.step()  # u was 0: no cosine, the LR stays; u = g
    assert opt.lr == 0.5 and torch.equal(w.detach(), torch.tensor([[0.5, 2.0]])) and torch.equal(b.detach(), torch.tensor([3.0]))
    w.grad = torch.tensor([[0.0, 1.0]])  # orthogonal to u: cos 0, the LR stays
    opt.step()  # u = 0.9 [1, 0, 0] + [0, 1, 0]
    assert opt.lr == 0.5
    assert torch.allclose(w.detach(), torch.tensor([[0.5 - 0.5 * 0.9, 2.0 - 0.5]]))
    w.grad = torch.tensor([[0.9, 1.0]])  # parallel to u: cos 1
    opt.step()
    assert math.isclose(opt.lr, 0.5 * math.exp(0.1), rel_tol=1e-6)
    b.grad = torch.tensor([float("nan")])  # a non-finite gradient: the step is skipped
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w.detach(), before)
