"""Tasks: offline data, shapes, splits, caching, missing data, and the accuracy the foundation promises."""

from __future__ import annotations

import pytest
import torch

from lrpilot.bench.tasks import get_task, list_tasks, run_task
from lrpilot.bench.tasks.sources import DataUnavailableError, load_fmnist, load_mnist1d
from tests.conftest import needs_fmnist

EXPECTED = {
    "iris-softmax", "digits-softmax", "breast-cancer-logistic", "diabetes-linear", "digits-mlp",
    "mnist1d-mlp", "mnist1d-cnn", "fmnist-mlp", "fmnist-lenet", "fmnist-resnet20",
}  # fmt: skip


def test_every_required_task_is_registered():
    assert EXPECTED <= {t.name for t in list_tasks()}


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mnist'; valid tasks: .*mnist1d-mlp"):
        get_task("mnist")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.startswith("fmnist")))
def test_offline_task_data_and_model_fit_together(name):
    task = get_task(name)
    data = task.load_data()
    assert len(data.x_train) > len(data.x_val) > 0
    out = task.model()(data.x_train[:5])
    loss = task.loss()(out, data.y_train[:5])
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert task.target is None or isinstance(task.target, float)


def test_split_is_fixed_and_standardised():
    a = get_task("iris-softmax").load_data()
    b = get_task("iris-softmax").load_data()
    assert torch.equal(a.x_train, b.x_train)
    assert torch.allclose(a.x_train.mean(0), torch.zeros(4), atol=1e-5)
    assert sorted(torch.bincount(a.y_val).tolist()) == [10, 10, 10]  # stratified 20 %


def test_mnist1d_is_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LRPILOT_CACHE", str(tmp_path))
    first = load_mnist1d(num_samples=200)
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    import mnist1d.data

    def boom(*_, **__):
        raise AssertionError("regenerated instead of using the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    second = load_mnist1d(num_samples=200)
    assert torch.equal(first.x_train, second.x_train)
    assert first.x_train.shape == (160, 40)


def test_missing_fmnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist(tmp_path)


@needs_fmnist
def test_fmnist_loads_with_its_test_set_as_validation():
    data = load_fmnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_val.shape == (10000, 1, 28, 28)
    assert abs(float(data.x_train.mean())) < 0.01 and abs(float(data.x_train.std()) - 1) < 0.01
    lo, hi = data.input_bounds
    assert float(data.x_train.min()) == pytest.approx(lo) and float(data.x_train.max()) == pytest.approx(hi)
    for name in ("fmnist-mlp", "fmnist-lenet", "fmnist-resnet20"):
        out = get_task(name).model()(data.x_train[:2])
        assert out.shape == (2, 10)


def test_digits_softmax_sgd_reaches_090_in_20_epochs():
    record = run_task("digits-softmax", "sgd", epochs=20, seed=0, progress=False)
    assert record["summary"]["best_val_metric"] >= 0.90


def test_mnist1d_mlp_cosine_reaches_070_in_30_epochs():
    record = run_task("mnist1d-mlp", "sgd-cosine", epochs=30, seed=0, progress=False)
    assert record["summary"]["best_val_metric"] >= 0.70


def test_regression_metric_is_in_target_units():
    record = run_task("diabetes-linear", "sgd", epochs=30, seed=0, progress=False, method_options={"lr": 0.01})
    # The diabetes target spans ~25..346; a linear model's MAE is around 40-50 in those units.
    assert 30 < record["summary"]["final_val_metric"] < 70
    assert record["metric"] == {"name": "mae", "higher_is_better": False}
