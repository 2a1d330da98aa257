"""benchmarks/overhead.py end to end on a tiny task: every requested method gets a ratio per round,
sgd's is 1, the epoch-level pilots are timed through the loop, and the JSON carries it all."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
                  "--steps", "3", "--warmup", "1", "--json", str(out)])
    (res,) = json.loads(out.read_text())
    step = {r["method"]: r for r in res["step"]}
    epoch = {r["method"]: r for r in res["epoch"]}
    assert set(step) == {"sgd", "hd-train", "onecycle"} and set(epoch) == {"sgd", "lipschitz"}
    for rows in (step, epoch):
        assert rows["sgd"]["ratio_median"] == 1.0
        for r in rows.values():
            assert r["error"] is None and r["rounds"] == 2 and r["seconds"] > 0
    assert step["hd-train"]["host_reads_per_step"] == 1.0 and step["onecycle"]["host_reads_per_step"] == 0.0
    assert epoch["lipschitz"]["host_reads_per_step"] is None  # counted in the step-level table only
    text = capsys.readouterr().out
    assert "### iris-softmax: step-level" in text and "| hd-train | step-pilot |" in text
