"""FGSM and PGD (closed forms, radii, bounds, strength), and the loop's two generic hooks they plug
into: ``train_transform`` and ``extra_eval``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lrpilot
from lrpilot.bench.tasks import run_task
from lrpilot.cli import main
from lrpilot.core.contract import TRAIN_EVAL_LOSS, Pilot
from lrpilot.core.data import TensorLoader
from lrpilot.loop.adversarial import (
    AdversarialConfig,
    AdversarialEval,
    FGSMTransform,
    adversarial_hooks,
    fgsm,
    pgd,
)
from lrpilot.loop.fit import Trainer
from lrpilot.loop.metrics import get_metric
from tests.conftest import TinyTask, blobs, needs_fmnist

CE = nn.CrossEntropyLoss()


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A small MLP trained to ~100 % clean accuracy on the blobs."""
    task = TinyTask()
    model = task.model()
    lrpilot.fit(model, task.train, task.val, method="sgd", epochs=15, lr=0.05, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    """``digits-mlp`` trained for 8 epochs (~97 % validation accuracy) and its validation split."""
    from lrpilot.bench.tasks import get_task, make_loaders
    from lrpilot.core.seeding import seed_everything

    info = get_task("digits-mlp")
    data = info.load_data()
    seed_everything(0)
    model = info.model()
    train, val = make_loaders(data, 32, seed=0)
    lrpilot.fit(model, train, val, method="sgd", epochs=8, lr=0.05, progress=False)
    return model.eval(), data.x_val, data.y_val


# ----------------------------------------------------------------------------------------------------
# the attacks
# ----------------------------------------------------------------------------------------------------
def test_fgsm_is_the_signed_input_gradient_step_in_closed_form():
    # Softmax regression: d/dx mean CE = W^T (softmax(Wx + b) - onehot(y)) / N, row by row.
    model = _linear()
    x, y = blobs(n=30)
    eps = 0.3
    p = F.softmax(model(x), dim=1).detach()
    grad = (p - F.one_hot(y, 3).float()) @ model.weight.detach() / len(y)
    expected = x + eps * grad.sign()
    assert torch.equal(fgsm(model, CE, x, y, eps), expected)
    assert model.weight.grad is None  # parameters' gradients untouched


def test_fgsm_stays_within_epsilon_and_bounds_and_raises_a_convex_loss():
    model = _linear()
    x, y = blobs(n=60)
    lo, hi = -1.5, 2.0
    x = x.clamp(lo, hi)
    eps = 0.25
    x_adv = fgsm(model, CE, x, y, eps, bounds=(lo, hi))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= lo and x_adv.max() <= hi
    # CE of a linear model is convex in x: a first-order ascent step cannot lower it.
    with torch.no_grad():
        per_clean = F.cross_entropy(model(x), y, reduction="none")
        per_adv = F.cross_entropy(model(fgsm(model, CE, x, y, eps)), y, reduction="none")
    assert bool((per_adv >= per_clean - 1e-6).all()) and per_adv.mean() > per_clean.mean()


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_the_ball_and_bounds_and_is_at_least_as_strong_as_fgsm(digits, random_start):
    model, x, y = digits
    eps = 0.3  # standardised units; the paper's ratio step = eps / 4, 10 steps
    bounds = (float(x.min()), float(x.max()))
    gen = torch.Generator().manual_seed(0)
    x_pgd = pgd(model, CE, x, y, eps, eps / 4, 10, bounds=bounds, random_start=random_start, generator=gen)
    x_fgsm = fgsm(model, CE, x, y, eps, bounds=bounds)
    assert (x_pgd - x).abs().max() <= eps + 1e-6
    assert x_pgd.min() >= bounds[0] and x_pgd.max() <= bounds[1]
    with torch.no_grad():
        clean_acc = (model(x).argmax(1) == y).float().mean()
        fgsm_acc = (model(x_fgsm).argmax(1) == y).float().mean()
        pgd_acc = (model(x_pgd).argmax(1) == y).float().mean()
        fgsm_loss, pgd_loss = CE(model(x_fgsm), y), CE(model(x_pgd), y)
    assert clean_acc > 0.95
    assert fgsm_acc < clean_acc - 0.2  # the attack does something at this radius
    assert pgd_acc < fgsm_acc - 0.02 and pgd_loss > fgsm_loss


def test_epsilon_zero_gives_the_clean_accuracy(trained):
    task = TinyTask()
    metric = get_metric("accuracy")
    evaluator = AdversarialEval(CE, metric, epsilon=0.0, step=0.1, steps=5, random_start=True)
    result = evaluator(trained, task.val)
    with torch.no_grad():
        x, y = next(iter(task.val))
        clean_acc = metric.batch_sum(trained(x), y) / len(y)
        clean_loss = float(CE(trained(x), y))
    assert result["adv_val_metric"] == clean_acc
    assert result["adv_val_loss"] == pytest.approx(clean_loss, rel=1e-6)
    assert torch.equal(fgsm(trained, CE, x, y, 0.0), x)


def test_fgsm_evaluation_beside_pgd_exact_on_a_linear_model():
    """The paper's Table 3 metric: accuracy under white-box FGSM, by hand on a 1-d two-class linear model.

    Logits [x, -x]: the loss gradient in x is -2 p_1 for class 0 and +2 p_0 for class 1, so FGSM moves
    class-0 points down and class-1 points up by epsilon, then clips to the bounds.
    """
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.tensor([[0.3], [-0.6], [1.0], [2.0]])
    y = torch.tensor([0, 1, 0, 1])
    loader = TensorLoader(x, y, 2, shuffle=False)
    evaluator = AdversarialEval(CE, get_metric("accuracy"), epsilon=0.5, step=0.125, steps=4,
                                bounds=(-1.0, 2.2), random_start=False)
    result = evaluator(model, loader)
    moved = [-0.2, -0.1, 0.5, 2.2]  # 0.3-0.5, -0.6+0.5, 1.0-0.5, 2.0+0.5 clipped to 2.2
    losses = [math.log1p(math.exp(-2 * v)) if label == 0 else math.log1p(math.exp(2 * v))
              for v, label in zip(moved, y.tolist())]
    assert result["fgsm_val_metric"] == 0.5  # predictions 1, 1, 0, 0 against 0, 1, 0, 1
    assert result["fgsm_val_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert set(result) == {"adv_val_loss", "adv_val_metric", "fgsm_val_loss", "fgsm_val_metric"}
    # The gradient's sign never changes along the way: PGD's four steps of 0.125 reach the same points.
    assert result["adv_val_metric"] == 0.5
    assert result["adv_val_loss"] == pytest.approx(result["fgsm_val_loss"], rel=1e-6)
    off = AdversarialEval(CE, get_metric("accuracy"), epsilon=0.5, step=0.1, steps=2, fgsm_eval=False)
    assert set(off(model, loader)) == {"adv_val_loss", "adv_val_metric"}
    assert AdversarialConfig.from_options({"fgsm_eval": False}).fgsm_eval is False
    with pytest.raises(ValueError, match="fgsm_eval must be True or False"):
        AdversarialConfig(fgsm_eval=1)


def test_adversarial_eval_is_deterministic_and_leaves_the_run_alone(trained):
    task = TinyTask()
    evaluator = AdversarialEval(CE, get_metric("accuracy"), epsilon=1.0, step=0.25, steps=3, samples=50)
    rng = torch.get_rng_state().clone()
    params = [p.detach().clone() for p in trained.parameters()]
    grads = [p.grad.clone() for p in trained.parameters()]  # left over from training
    first, second = evaluator(trained, task.val), evaluator(trained, task.val)
    assert first == second
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(trained.parameters(), grads))
    # only the first 50 samples are attacked: accuracy is a multiple of 1/50
    assert round(first["adv_val_metric"] * 50, 6) == int(round(first["adv_val_metric"] * 50))


def test_epsilon_is_given_in_raw_data_units():
    # Standardised pixels: one raw unit (the [0, 1] range) spans 1/std model-input units.
    mean, std = 0.3, 0.35
    raw = torch.rand(20, 4, generator=torch.Generator().manual_seed(0))
    x = (raw - mean) / std
    bounds = ((0 - mean) / std, (1 - mean) / std)
    transform, evaluator = adversarial_hooks(AdversarialConfig(), loss_fn=CE, metric=get_metric("accuracy"),
                                             input_scale=1 / std, input_bounds=bounds)  # fmt: skip
    x_adv, _ = transform(_linear(), x, torch.zeros(20, dtype=torch.long))
    raw_adv = x_adv * std + mean
    assert (raw_adv - raw).abs().max() <= 8 / 255 + 1e-6
    assert raw_adv.min() >= -1e-6 and raw_adv.max() <= 1 + 1e-6
    assert ((raw_adv - raw).abs() > 7.9 / 255).float().mean() > 0.5  # most pixels move by the full epsilon
    assert evaluator.epsilon == pytest.approx(8 / 255 / std) and evaluator.step == pytest.approx(2 / 255 / std)
    assert (evaluator.steps, evaluator.random_start) == (10, True)


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        AdversarialConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="pgd_steps must be an integer >= 1"):
        AdversarialConfig(pgd_steps=0)
    with pytest.raises(ValueError, match=r"unknown adversarial option\(s\) 'eps'; valid: .*epsilon"):
        AdversarialConfig.from_options({"eps": 0.1})
    assert AdversarialConfig.from_options(None) is None and AdversarialConfig.from_options(False) is None
    assert AdversarialConfig.from_options(True) == AdversarialConfig()
    assert AdversarialConfig.from_options({"eval_samples": 5}).eval_samples == 5


# ----------------------------------------------------------------------------------------------------
# the loop's hooks
# ----------------------------------------------------------------------------------------------------
class _FlipLabels:
    """A transform whose effect is unmistakable: it trains on labels shifted by one class."""

    def __init__(self) -> None:
        self.calls = 0
        self.modes: set[bool] = set()

    def __call__(self, model, x, y):
        self.calls += 1
        self.modes.add(model.training)
        return x, (y + 1) % 3


class _JPilot(Pilot):
    needs = frozenset({TRAIN_EVAL_LOSS})


def test_train_transform_changes_every_training_batch_and_the_objective_not_the_validation():
    task = TinyTask()
    flip = _FlipLabels()
    model = task.model()
    pilot = _JPilot(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    trainer = Trainer(model, task.train, task.val, method=pilot, epochs=6, progress=False, train_transform=flip)
    hist = trainer.run()
    n_train_batches, n_epochs = len(task.train), 6
    # every training step, plus the training-set pass of J before training and after every epoch
    assert flip.calls == n_epochs * n_train_batches + (n_epochs + 1) * n_train_batches
    assert flip.modes == {True, False}  # training mode in steps, evaluation mode for J
    assert hist.epochs[-1].val_metric < 0.1  # it learnt the shifted labels; validation is not shifted
    shifted = trainer.evaluate(task.train, transform=True)[0]
    assert hist.epochs[-1].extra[TRAIN_EVAL_LOSS] == pytest.approx(shifted, rel=1e-6)
    assert shifted < trainer.evaluate(task.train)[0]


def test_extra_eval_is_recorded_before_training_every_epoch_and_after_a_final_restore(tmp_path):
    calls = []

    def probe(model, loader):
        calls.append(model.training)
        return {"probe": float(sum(p.detach().sum() for p in model.parameters()))}

    task = TinyTask()
    model = task.model()
    pilot = lrpilot.AALR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), patience=1)
    trainer = Trainer(model, task.train, task.val, method=pilot, epochs=4, progress=False, extra_eval=probe)
    hist = trainer.run()
    assert calls and not any(calls)  # always in evaluation mode
    assert "probe" in hist.info["initial"]
    assert all("probe" in e.extra for e in hist.epochs)
    if hist.final:
        assert hist.final["probe"] == pytest.approx(float(sum(p.detach().sum() for p in trainer.model.parameters())))
    assert len(calls) == 1 + 4 + bool(hist.final)
    # eval time is not training time
    assert all(e.train_s < e.wall_s for e in hist.epochs)


def test_extra_eval_is_nan_on_a_nonfinite_epoch():
    task = TinyTask()
    hist = lrpilot.fit(task.model(), task.train, task.val, method="sgd", lr=1e6, momentum=0.0, epochs=3,
                       progress=False, extra_eval=lambda m, loader: {"probe": 1.0})  # fmt: skip
    assert hist.status == "diverged"
    assert math.isnan(hist.epochs[-1].extra["probe"])


def test_resume_with_hooks_continues_identically():
    task = TinyTask()

    def make():
        model = task.model()
        transform, evaluator = adversarial_hooks(AdversarialConfig(epsilon=0.3, step=0.1, pgd_steps=2),
                                                 loss_fn=CE, metric=get_metric("accuracy"))  # fmt: skip
        return Trainer(model, task.train, task.val, method="aalr", epochs=4, progress=False,
                       method_options={"patience": 1}, train_transform=transform, extra_eval=evaluator)  # fmt: skip

    straight = make()
    straight.run()
    first = make()
    first.run(until_epoch=2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed.run()
    assert [e.extra for e in straight.history.epochs] == [e.extra for e in resumed.history.epochs]
    assert straight.history.final == resumed.history.final


# ----------------------------------------------------------------------------------------------------
# run_task and the CLI
# ----------------------------------------------------------------------------------------------------
def test_run_task_trains_adversarially_and_records_the_pgd_accuracy():
    clean = run_task("digits-mlp", "sgd", epochs=2, progress=False)
    adv = run_task("digits-mlp", "sgd", epochs=2, progress=False, adversarial={"epsilon": 0.5, "step": 0.2})
    assert clean["config"]["adversarial"] is None
    assert adv["config"]["adversarial"]["epsilon"] == 0.5 and adv["config"]["adversarial"]["pgd_steps"] == 10
    assert "adv_val_metric" in adv["info"]["initial"]
    for e in adv["epochs"]:
        assert 0 <= e["extra"]["adv_val_metric"] < e["val_metric"]
    # FGSM training changes what is learnt: the training losses differ from clean training
    assert [e["train_loss"] for e in adv["epochs"]] != [e["train_loss"] for e in clean["epochs"]]
    with pytest.raises(ValueError, match="unknown adversarial option"):
        run_task("digits-mlp", "sgd", epochs=1, progress=False, adversarial={"radius": 1})


@needs_fmnist
def test_fmnist_lenet_adversarial_run_scales_epsilon_to_pixels(tmp_path):
    out = tmp_path / "run.json"
    code = main(["train", "--task", "fmnist-lenet", "--method", "aalr", "--epochs", "1", "--train-subset", "512",
                 "-o", "patience=1", "-o", "objective=train-eval", "--adversarial", "--adv-option", "eval_samples=64",
                 "--adv-option", "pgd_steps=2",
                 "-q", "--out", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["adversarial"]["epsilon"] == pytest.approx(8 / 255)
    extra = record["epochs"][0]["extra"]
    assert 0 <= extra["adv_val_metric"] <= 1 and math.isfinite(extra["adv_val_loss"])
    assert "train_eval_loss" in extra


def test_cli_adversarial_flag_prints_the_adversarial_accuracy(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(["train", "--task", "digits-mlp", "--method", "sgd", "--epochs", "1", "--adversarial",
                 "--adv-option", "epsilon=0.5", "--adv-option", "eval_samples=100", "-q", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "adversarial (PGD) accuracy: best" in capsys.readouterr().out
    assert json.loads(out.read_text())["config"]["adversarial"]["eval_samples"] == 100
    assert main(["train", "--task", "digits-mlp", "--method", "sgd", "--epochs", "1", "--adv-option", "bogus=1", "-q"]) == 2


def test_fgsm_transform_is_what_fgsm_computes():
    model = _linear()
    x, y = blobs(n=16)
    out_x, out_y = FGSMTransform(CE, 0.2, (-2.0, 2.0))(model, x, y)
    assert torch.equal(out_x, fgsm(model, CE, x, y, 0.2, bounds=(-2.0, 2.0))) and torch.equal(out_y, y)
