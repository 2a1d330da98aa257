"""The LipschitzLR family's default forms on a conv net (issue 15, ``docs/robustness-study.md``).

Before the study's remedies, ``lipschitz`` stopped at chance on ``mnist1d-cnn`` in all three seeds (its
``1/L`` rose to 11,325 once ReLUs died, and each rollback backed off from that), and ``auto-adam`` stopped
at chance on seed 1 (its step size ran away as ``1/K_z``). With the defaults (the guard; section 9's
initial values and the step-size caps) both train. Each run is the task's whole budget (30 epochs, 7-17 s
on the 2-core shared CPU).
"""

from __future__ import annotations

import pytest

from lrpilot.bench.tasks import run_task


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,seed,floor",
    [
        ("lipschitz", 0, 0.88),  # measured 0.9185 (median of 3 seeds 0.912); the paper's form: 0.106
        ("auto-adam", 1, 0.93),  # measured 0.9555 (median 0.961); the paper's form: stopped at chance
    ],
)
def test_defaults_train_mnist1d_cnn_without_divergence_or_collapse(method: str, seed: int, floor: float) -> None:
    rec = run_task("mnist1d-cnn", method, seed=seed, progress=False)
    summary = rec["summary"]
    assert summary["status"] == "completed", summary
    assert not any(d.get("action") == "stop" for d in rec["decisions"])
    assert len(rec["epochs"]) == 30
    best, final = summary["best_val_metric"], summary["final_val_metric"]
    assert best > floor
    assert final > best - 0.05  # the criterion: no collapse late in the run
