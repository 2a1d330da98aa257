"""`lrpilot reproduce lipschitz`: the paper's classical protocols, checked against its printed constants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpilot.bench.reproduce_lipschitz import (
    DIVERGED,
    accuracy_after,
    epochs_to_threshold,
    format_tables,
    load_design,
    sum_to_one,
)
from lrpilot.cli import main
from lrpilot.core.data import TensorLoader
from lrpilot.loop.fit import Trainer


def test_breast_cancer_reproduces_the_papers_printed_constant_and_speed() -> None:
    """Table 1: 1/L = 4280.23 with a column of ones and every feature summing to 1; E_1/L = 2 in the paper."""
    row = epochs_to_threshold("breast_cancer", scaling="sum-to-one", max_epochs=20)
    assert row.inv_lipschitz == pytest.approx(4280.23, rel=1e-5)
    assert row.epochs_lipschitz is not None and row.epochs_lipschitz <= 2
    assert row.epochs_fixed is None  # alpha = 0.1 needs tens of thousands of epochs (37,008 in the paper)


def test_digits_without_scaling_reproduces_the_papers_table_2_constant() -> None:
    """Table 2 prints 1/L = 0.635 for digits, which only the unscaled data on a 70% split gives."""
    assert accuracy_after("digits", scaling="raw", epochs=1).inv_lipschitz == pytest.approx(0.635, abs=2e-3)
    assert accuracy_after("digits", scaling="sum-to-one", epochs=1).inv_lipschitz > 100


def test_the_classical_pilot_computes_the_same_lr_as_the_protocol() -> None:
    """The `lipschitz` registry method on the paper's design matrix (full batch) picks the paper's 1/L."""
    x, y = load_design("breast_cancer", "sum-to-one")
    model = nn.Module()
    model.head = nn.Linear(x.shape[1], 1, bias=False)  # the design already holds the (scaled) column of ones
    model.forward = lambda inputs: model.head(inputs)  # type: ignore[method-assign]
    loader = TensorLoader(x.float(), y.float()[:, None], len(x), shuffle=False)
    history = Trainer(
        model, loader, loader, method="lipschitz", epochs=1, loss_fn=nn.BCEWithLogitsLoss(), progress=False
    ).run()
    assert history.epochs[0].lr[0] == pytest.approx(4280.23, rel=1e-4)


def test_a_diverging_run_is_reported_as_such() -> None:
    row = epochs_to_threshold("diabetes", scaling="raw", max_epochs=50)
    assert row.epochs_fixed == DIVERGED  # alpha = 0.1 on raw features is far beyond 2/beta
    assert "diverged" in format_tables([row], [])


def test_sum_to_one_scaling_uses_the_reference_statistics() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    assert torch.equal(sum_to_one(x), torch.tensor([[0.25, 1.0], [0.75, 0.0]], dtype=torch.float64))
    assert torch.equal(sum_to_one(x[:1], reference=x), torch.tensor([[0.25, 1.0]], dtype=torch.float64))
    design, _ = load_design("iris", "sum-to-one")
    assert torch.allclose(design.sum(0), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="scaling"):
        load_design("iris", "standard")
    with pytest.raises(ValueError, match="unknown data set"):
        load_design("housing", "raw")


def test_cli_prints_both_tables_beside_the_papers_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "reproduce",
            "lipschitz",
            "--datasets",
            "breast_cancer",
            "--scaling",
            "sum-to-one",
            "--max-epochs",
            "20",
            "--table2-epochs",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| breast_cancer | sum-to-one | 569 | 0.69 | 4280 [4280.23] | >20 [37008] |" in out
    assert "Table 2" in out and "[90.5]" in out
