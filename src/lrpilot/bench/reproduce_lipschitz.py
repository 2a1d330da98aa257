"""``lrpilot reproduce lipschitz``: the classical-model protocols of Yedida & Saha, Tables 1 and 2.

* **Table 1** (section 7.1, convergence): full-batch gradient descent on the whole data set from the
  same random initial weights with :math:`\\alpha = 0.1` and :math:`\\alpha = 1/L`; the number of epochs
  until the loss falls below a threshold :math:`T_L` (:math:`E_{0.1}`, :math:`E_{1/L}`).
* **Table 2** (section 7.2, performance): accuracy on a held-out 30% after :math:`N_E` epochs with each LR.

The models are the paper's: linear regression with the loss :math:`\\frac1{2m}\\lVert Xw-y\\rVert^2`, logistic
regression, softmax regression; the design matrix has a column of ones for the bias, as in the authors'
code. ``scaling="sum-to-one"`` is the preprocessing the paper states ("we scale each feature to sum to 1");
``"raw"`` is none, which is what the 1/L printed for iris and digits imply (the printed breast-cancer
value matches the scaled data instead: see ``docs/methods/lipschitz.md``). Each row also reports the
textbook step :math:`1/\\beta` (:func:`~lrpilot.estimators.lipschitz.smoothness`), which the paper does not
use. The constants come from :mod:`lrpilot.estimators.lipschitz`, the same functions the ``lipschitz``
pilot uses in its classical mode.

The data sets are scikit-learn's bundled ones (offline): iris, digits, breast cancer and diabetes (in place
of the paper's housing sets, which are not bundled). Everything runs in float64 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lrpilot.estimators.lipschitz import LOSS_KINDS, classical_lipschitz, smoothness

__all__ = [
    "DATASETS",
    "DIVERGED",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "AccuracyRow",
    "ConvergenceRow",
    "accuracy_after",
    "epochs_to_threshold",
    "format_tables",
    "load_design",
    "reproduce",
    "sum_to_one",
]

#: data set -> the model's loss (softmax, logistic or linear regression).
DATASETS: dict[str, str] = {
    "iris": "cross_entropy",
    "digits": "cross_entropy",
    "breast_cancer": "binary_cross_entropy",
    "diabetes": "least_squares",
}

#: The paper's Table 1 rows for the data sets we have (T_L, 1/L, E_0.1, E_1/L).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "iris": {"threshold": 0.2, "inv_l": 1.902, "epochs_fixed": 413, "epochs_lipschitz": 49},
    "breast_cancer": {"threshold": 0.69, "inv_l": 4280.23, "epochs_fixed": 37008, "epochs_lipschitz": 2},
}
#: The paper's Table 2 rows (N_E, 1/L, A_0.1, A_1/L in %).
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "iris": {"epochs": 200, "inv_l": 1.936, "acc_fixed": 93.33, "acc_lipschitz": 97.78},
    "digits": {"epochs": 200, "inv_l": 0.635, "acc_fixed": 91.3, "acc_lipschitz": 94.63},
    "breast_cancer": {"epochs": 1000, "inv_l": 4280.22, "acc_fixed": 43.23, "acc_lipschitz": 90.5},
}

#: T_L where the paper gives none: digits 0.5 nats (a fair softmax fit); diabetes halfway from the
#: loss at w = 0 to the least-squares optimum (computed, see :func:`_threshold`).
OUR_THRESHOLDS: dict[str, float | None] = {"digits": 0.5, "diabetes": None}

FIXED_LR = 0.1  # the paper's "random guess"
DIVERGED = -1  # epochs-to-threshold of a run whose loss became non-finite
SCALINGS = ("sum-to-one", "raw")


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def _arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    if name == "diabetes":  # the raw features: the bundled default is already centred, so no column sums to 1
        x, y = datasets.load_diabetes(return_X_y=True, scaled=False)
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def sum_to_one(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's feature scaling: divide every column by its sum (over ``reference``, default ``x``).

    A column summing to zero is left as it is.
    """
    sums = (x if reference is None else reference).sum(0)
    sums = torch.where(sums == 0, torch.ones_like(sums), sums)
    return x / sums


def load_design(
    name: str, scaling: str, rows: np.ndarray | None = None, fit_rows: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The design matrix ``[1, X]`` (float64) and targets of ``name``, scaled with the statistics of ``fit_rows``."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    x, y = _arrays(name)
    design = torch.as_tensor(np.c_[np.ones(len(x)), x], dtype=torch.float64)
    reference = design if fit_rows is None else design[torch.as_tensor(fit_rows)]
    if scaling == "sum-to-one":
        design = sum_to_one(design, reference)
    if rows is not None:
        design, y = design[torch.as_tensor(rows)], y[rows]
    return design, torch.as_tensor(y)


# ----------------------------------------------------------------------------------------------------
# the models, trained by full-batch gradient descent
# ----------------------------------------------------------------------------------------------------
class _Model:
    """Loss and gradient of a classical model in the paper's form (mean over the rows)."""

    def __init__(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {list(LOSS_KINDS)}")
        self.kind, self.x, self.m = kind, x, len(x)
        if kind == "cross_entropy":
            self.classes = int(y.max()) + 1
            self.y = torch.nn.functional.one_hot(y.long(), self.classes).to(x.dtype)
            self.outputs = self.classes
        else:
            self.classes = 2 if kind == "binary_cross_entropy" else 0
            self.y = y.to(x.dtype).reshape(-1, 1)
            self.outputs = 1

    def init(self, seed: int) -> torch.Tensor:
        # Standard normal weights, as the authors' np.random.randn.
        return torch.randn(
            self.x.shape[1], self.outputs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )

    def loss_and_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        z = self.x @ w
        if self.kind == "cross_entropy":
            logp = torch.log_softmax(z, dim=1)
            loss = -(self.y * logp).sum() / self.m
            residual = logp.exp() - self.y
        elif self.kind == "binary_cross_entropy":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, self.y)
            residual = torch.sigmoid(z) - self.y
        else:
            residual = z - self.y
            loss = residual.square().sum() / (2 * self.m)
        return float(loss), self.x.T @ residual / self.m

    def accuracy(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        z = x @ w
        pred = z.argmax(1) if self.kind == "cross_entropy" else (z[:, 0] > 0).long()
        return float((pred == y.long()).double().mean())

    def lipschitz(self) -> float:
        """The paper's constant (absolute value for least squares, as the authors' code takes ``abs(1/L)``)."""
        return abs(classical_lipschitz(self.x, self.y, self.kind, num_classes=max(self.classes, 2)))

    def smoothness(self) -> float:
        return smoothness(self.kind, float(torch.linalg.matrix_norm(self.x, ord=2)), self.m)


def _descend(
    model: _Model, lr: float, w: torch.Tensor, *, epochs: int, threshold: float | None = None
) -> tuple[torch.Tensor, int | None, float]:
    """Gradient descent: returns the weights, the first epoch whose loss is below ``threshold`` (``None``:
    not reached, :data:`DIVERGED`: the loss became non-finite) and the last loss. Epoch ``e`` is the loss
    after ``e`` updates, as in the paper's loop."""
    loss, grad = model.loss_and_grad(w)
    for epoch in range(1, epochs + 1):
        w = w - lr * grad
        loss, grad = model.loss_and_grad(w)
        if threshold is not None and loss < threshold:
            return w, epoch, loss
        if not math.isfinite(loss):
            return w, DIVERGED, loss
    return w, None, loss


def _threshold(name: str, model: _Model) -> float:
    paper = PAPER_TABLE1.get(name)
    if paper is not None:
        return paper["threshold"]
    if OUR_THRESHOLDS.get(name) is not None:
        return float(OUR_THRESHOLDS[name])  # type: ignore[arg-type]
    # Least squares: halfway from the loss at w = 0 to the optimum.
    w_opt = torch.linalg.lstsq(model.x, model.y).solution
    best = model.loss_and_grad(w_opt)[0]
    start = model.loss_and_grad(torch.zeros_like(w_opt))[0]
    return (start + best) / 2


@dataclass
class ConvergenceRow:
    """One Table 1 row: epochs to reach ``threshold`` with each LR (``None``: not within ``max_epochs``,
    :data:`DIVERGED`: the loss became non-finite)."""

    dataset: str
    scaling: str
    kind: str
    m: int
    threshold: float
    inv_lipschitz: float
    inv_smoothness: float
    epochs_fixed: int | None
    epochs_lipschitz: int | None
    epochs_smoothness: int | None
    max_epochs: int
    paper: dict[str, float] = field(default_factory=dict)


@dataclass
class AccuracyRow:
    """One Table 2 row: held-out accuracy (%) after ``epochs`` with each LR."""

    dataset: str
    scaling: str
    epochs: int
    m: int
    inv_lipschitz: float
    inv_smoothness: float
    acc_fixed: float
    acc_lipschitz: float
    acc_smoothness: float
    paper: dict[str, float] = field(default_factory=dict)


def epochs_to_threshold(
    name: str, *, scaling: str = "sum-to-one", max_epochs: int = 100_000, seed: int = 0
) -> ConvergenceRow:
    """Table 1's protocol on the whole data set."""
    x, y = load_design(name, scaling)
    model = _Model(DATASETS[name], x, y)
    threshold = _threshold(name, model)
    w0 = model.init(seed)
    lip, beta = model.lipschitz(), model.smoothness()
    found = [
        _descend(model, lr, w0, epochs=max_epochs, threshold=threshold)[1]
        for lr in (FIXED_LR, 1 / lip, 1 / beta)
    ]
    return ConvergenceRow(name, scaling, model.kind, model.m, threshold, 1 / lip, 1 / beta, *found, max_epochs,
                          paper=dict(PAPER_TABLE1.get(name, {})))  # fmt: skip


def accuracy_after(
    name: str,
    *,
    scaling: str = "sum-to-one",
    epochs: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> AccuracyRow:
    """Table 2's protocol: train on a stratified 70% for ``epochs`` (the paper's N_E), accuracy on the rest."""
    from sklearn.model_selection import train_test_split

    if DATASETS[name] == "least_squares":
        raise ValueError("Table 2 reports classification accuracy; diabetes is a regression set")
    paper = PAPER_TABLE2.get(name, {})
    epochs = int(paper.get("epochs", 200)) if epochs is None else epochs
    _, labels = _arrays(name)
    train_rows, test_rows = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    x, y = load_design(name, scaling, rows=train_rows, fit_rows=train_rows)
    x_test, y_test = load_design(name, scaling, rows=test_rows, fit_rows=train_rows)
    model = _Model(DATASETS[name], x, y)
    w0 = model.init(seed)
    lip, beta = model.lipschitz(), model.smoothness()
    accs = [
        100 * model.accuracy(_descend(model, lr, w0, epochs=epochs)[0], x_test, y_test)
        for lr in (FIXED_LR, 1 / lip, 1 / beta)
    ]
    return AccuracyRow(name, scaling, epochs, model.m, 1 / lip, 1 / beta, *accs, paper=dict(paper))


def reproduce(
    datasets: Sequence[str] = tuple(DATASETS),
    *,
    scalings: Iterable[str] = SCALINGS,
    max_epochs: int = 100_000,
    table2_epochs: int | None = None,
    seed: int = 0,
) -> tuple[list[ConvergenceRow], list[AccuracyRow]]:
    """Both tables for ``datasets`` under each of ``scalings``."""
    table1, table2 = [], []
    for scaling in scalings:
        for name in datasets:
            table1.append(epochs_to_threshold(name, scaling=scaling, max_epochs=max_epochs, seed=seed))
            if DATASETS[name] != "least_squares":
                table2.append(accuracy_after(name, scaling=scaling, epochs=table2_epochs, seed=seed))
    return table1, table2


# ----------------------------------------------------------------------------------------------------
# presentation
# ----------------------------------------------------------------------------------------------------
def _num(value: Any, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return fmt.format(value)


def _epochs(value: int | None, cap: int) -> str:
    if value == DIVERGED:
        return "diverged"
    return f">{cap}" if value is None else str(value)


def _paper(ours: str, paper: Mapping[str, Any] | None, key: str) -> str:
    """Our value, with the paper's in brackets where the paper has the row."""
    return f"{ours} [{paper[key]}]" if paper else ours


def format_tables(table1: Sequence[ConvergenceRow], table2: Sequence[AccuracyRow]) -> str:
    """Markdown tables with the paper's values beside ours."""
    lines = [
        (
            "Table 1: epochs until the training loss < T_L, full-batch GD from the same random weights "
            "(paper's values in brackets)"
        ),
        "",
        "| data set | scaling | m | T_L | 1/L | E_0.1 | E_1/L | 1/beta | E_1/beta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table1:
        lines.append(
            f"| {r.dataset} | {r.scaling} | {r.m} | {_num(r.threshold)} | {_paper(_num(r.inv_lipschitz), r.paper, 'inv_l')}"
            f" | {_paper(_epochs(r.epochs_fixed, r.max_epochs), r.paper, 'epochs_fixed')}"
            f" | {_paper(_epochs(r.epochs_lipschitz, r.max_epochs), r.paper, 'epochs_lipschitz')}"
            f" | {_num(r.inv_smoothness)} | {_epochs(r.epochs_smoothness, r.max_epochs)} |"
        )
    lines += [
        "",
        "Table 2: held-out accuracy (%) after N_E epochs, 70/30 stratified split (paper's values in brackets)",
        "",
        "| data set | scaling | N_E | m | 1/L | A_0.1 | A_1/L | 1/beta | A_1/beta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table2:
        lines.append(
            f"| {r.dataset} | {r.scaling} | {r.epochs} | {r.m} | {_paper(_num(r.inv_lipschitz), r.paper, 'inv_l')}"
            f" | {_paper(f'{r.acc_fixed:.2f}', r.paper, 'acc_fixed')}"
            f" | {_paper(f'{r.acc_lipschitz:.2f}', r.paper, 'acc_lipschitz')}"
            f" | {_num(r.inv_smoothness)} | {r.acc_smoothness:.2f} |"
        )
    return "\n".join(lines)
