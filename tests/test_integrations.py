"""lrpilot.attach (a loop of your own) and the Lightning callback against lrpilot.fit.

The reference is always ``lrpilot.fit`` on the same model initialisation, data order and seed: the
integrations carry out decisions with the loop's own code (``loop/decisions.py``) and compute the
signals with the loop's arithmetic, so the LR trajectories, the decisions (reason, LR after it, epoch,
step) and the final weights must be *equal*, not close. One method of each family: AALR (with a forced
rollback: phase 1 at LR 2.0 restarts from the initial model), MI decay (bounds given, so no range
test), hd-train (hypergradient), lipschitz, hyper-regularization (KL, algorithm 1), a peer (DoG).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import lrpilot
from lrpilot.core.data import TensorLoader
from lrpilot.pilots.cooldown import Cooldown

ROOT = Path(__file__).resolve().parents[1]

#: One method per family, with options that make the run short and, for AALR, force a rollback.
METHODS = {
    # The paper's J: LR 2 is worse, a rollback. No cooldown: the tests below compare it with the AALR class
    # itself (the registry's cooldown in a loop of your own: tests/test_cooldown.py).
    "aalr": {"patience": 1, "lr": 2.0, "objective": "train-eval", "cooldown": 0.0},
    "mi-decay": {"lr_min": 0.01, "lr_max": 0.5, "lr_top": 0.2, "epsilon": 0.05, "mi_samples": 96},
    "hd-train": {"lr": 0.05},
    "lipschitz": {},
    "hyperreg-kl-1": {},
    "dog": {},
    "auto": {"sweep_steps": 30},
}
#: The decisions lrpilot.fit takes on this task (checked so that a change of task cannot hollow the test).
EXPECTED_REASONS = {
    "aalr": ["aalr-start", "phase1-worse", "phase1-done", "phase2-second-trial", "phase2-halve", "restore-best"],
    "mi-decay": ["mi-start", "mi-performance", "mi-keep", "mi-saturated", "mi-final"],
    "lipschitz": ["lipschitz-probe"] + ["lipschitz-epoch"] * 4,
}
EPOCHS = 4


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    xv = torch.randn(96, 10, generator=g)
    return x, x[:, :3].argmax(1), xv, xv[:, :3].argmax(1)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _skip_unavailable(method: str) -> None:
    info = lrpilot.get_method(method)
    if not info.available:
        pytest.skip(f"{method} needs the extra {info.extra!r}")


def _trace(history: lrpilot.History) -> dict:
    return {
        "decisions": [(d.reason, d.action, d.lr, d.epoch, d.step) for d in history.decisions],
        "epoch_lr": [r.lr for r in history.epochs],
        "step_lr": history.step_lr,
        "val_metric": [r.val_metric for r in history.epochs],
        "train_loss": [r.train_loss for r in history.epochs],
    }


# ====================================================================================================
# your own loop
# ====================================================================================================
def _own_loop(method: str, epochs: int = EPOCHS, **kwargs) -> tuple[nn.Module, lrpilot.AttachedPilot]:
    x, y, xv, yv = _data()
    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False)
    model = _net()
    pilot = lrpilot.attach(method, model, train_loader=train, val_loader=val, epochs=epochs, seed=0,
                           **{**METHODS.get(method, {}), **kwargs})
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for xb, yb in train:
            pilot.optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            pilot.optimizer.step()
            pilot.step(loss, batch_size=len(yb))
        pilot.end_epoch()
        if pilot.should_stop:
            break
    return model, pilot


def _fit(method: str, train, val, epochs: int = EPOCHS) -> tuple[nn.Module, lrpilot.History]:
    model = _net()
    history = lrpilot.fit(model, train, val, method=method, epochs=epochs, seed=0, progress=False, **METHODS[method])
    return model, history


@pytest.mark.parametrize("method", list(METHODS))
def test_own_loop_takes_the_decisions_of_fit(method: str) -> None:
    _skip_unavailable(method)
    x, y, xv, yv = _data()
    ref_model, ref = _fit(method, TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False))
    model, pilot = _own_loop(method)
    assert _trace(pilot.history) == _trace(ref)
    if method in EXPECTED_REASONS:
        assert [d.reason for d in ref.decisions] == EXPECTED_REASONS[method]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_readme_example_runs_as_printed(capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own training loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 22  # "a 20-line example" plus imports
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out.splitlines()
    pilot = namespace["pilot"]
    assert len(printed) == pilot.epoch == 8
    reasons = [d.reason for d in pilot.history.decisions]
    # The registry's AALR cools its last 20 % of steps down (pilots/cooldown.py): the last epoch is the best.
    assert reasons[:3] == ["aalr-start", "phase1-improved", "phase1-done"] and reasons[-1] == "keep-last"
    assert printed[-1].split()[2] == "keep-last"
    assert all(0.0 <= float(line.split()[1]) <= 1.0 for line in printed)


@pytest.mark.parametrize("cooldown", [0.0, 0.2])
def test_own_loop_drives_your_optimizer_as_fit_drives_a_pilot_object(cooldown: float) -> None:
    """attach(method, model, optimizer): AALR sets the LR of the user's optimizer, exactly as
    fit(method=AALR(optimizer)) does; with the registry's cooldown (pilots/cooldown.py) it cools the user's
    optimizer, exactly as fit(method="aalr") does."""
    x, y, xv, yv = _data()
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    train_ref, val_ref = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False)
    if cooldown:
        ref = lrpilot.fit(model, train_ref, val_ref, seed=0, method="aalr", lr=2.0, patience=1,
                          objective="train-eval", epochs=EPOCHS, progress=False)  # fmt: skip
    else:
        ref = lrpilot.fit(model, train_ref, val_ref, seed=0, method=lrpilot.AALR(opt, patience=1, epochs=EPOCHS),
                          epochs=EPOCHS, progress=False)  # fmt: skip
    model2 = _net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=2.0, momentum=0.9)
    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False)
    pilot = lrpilot.attach("aalr", model2, opt2, train_loader=train, val_loader=val, epochs=EPOCHS, seed=0,
                           patience=1, objective="train-eval", cooldown=cooldown)  # the class's default J
    assert pilot.optimizer is opt2 and (pilot.pilot.optimizer is opt2)
    assert isinstance(pilot.pilot, Cooldown) == bool(cooldown)
    for epoch in range(EPOCHS):
        train.set_epoch(epoch)
        for xb, yb in train:
            opt2.zero_grad()
            loss = nn.functional.cross_entropy(model2(xb), yb)
            loss.backward()
            opt2.step()
            pilot.step(loss, batch_size=len(yb))
        pilot.end_epoch()
    for a, b in zip(model2.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert _trace(pilot.history)["decisions"] == _trace(ref)["decisions"]
    assert "rollback" in [d.action for d in pilot.history.decisions]
    # The history reports the LR in force: the optimizer's times the cooldown's factor for the next step.
    factor = pilot.pilot.multiplier() if cooldown else 1.0
    assert opt2.param_groups[0]["lr"] * factor == ref.decisions[-1].lr[0]


def test_own_loop_resumes_from_its_state_dict_identically() -> None:
    x, y, xv, yv = _data()
    _, whole = _own_loop("aalr", epochs=6)

    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False)
    model = _net()
    pilot = lrpilot.attach("aalr", model, train_loader=train, val_loader=val, epochs=6, seed=0, **METHODS["aalr"])

    def train_epochs(pilot, model, first, last):
        for epoch in range(first, last):
            train.set_epoch(epoch)
            for xb, yb in train:
                pilot.optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                pilot.optimizer.step()
                pilot.step(loss, batch_size=len(yb))
            pilot.end_epoch()

    train_epochs(pilot, model, 0, 3)
    saved = {"model": model.state_dict(), "optimizer": pilot.optimizer.state_dict(), "pilot": pilot.state_dict()}
    saved = torch.load(_roundtrip(saved), weights_only=False)

    model2 = _net()
    pilot2 = lrpilot.attach("aalr", model2, train_loader=train, val_loader=val, epochs=6, seed=0, start=False,
                            **METHODS["aalr"])
    model2.load_state_dict(saved["model"])
    pilot2.optimizer.load_state_dict(saved["optimizer"])
    pilot2.load_state_dict(saved["pilot"])
    train_epochs(pilot2, model2, 3, 6)
    assert _trace(pilot2.history) == _trace(whole.history)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_attach_says_what_to_pass_when_a_signal_is_missing() -> None:
    x, y, xv, yv = _data()
    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96, shuffle=False)
    with pytest.raises(ValueError, match=r"train_loader"):
        lrpilot.attach("aalr", _net(), epochs=3, steps_per_epoch=8, objective="train-eval")  # J over the training set
    with pytest.raises(ValueError, match=r"steps per epoch: pass train_loader= or steps_per_epoch="):
        lrpilot.attach("sgd-cosine", _net(), epochs=3)
    with pytest.raises(ValueError, match=r"val_loader"):
        lrpilot.attach("hd-val", _net(), train_loader=train, epochs=3)
    with pytest.raises(ValueError, match=r"val_loader"):
        lrpilot.attach("mi-decay", _net(), train_loader=train, epochs=3, mi_samples=96)  # the range test
    net = _net()
    with pytest.raises(ValueError, match=r"'hd-train' is its own optimizer and cannot drive yours"):
        lrpilot.attach("hd-train", net, torch.optim.SGD(net.parameters(), lr=0.1), train_loader=train, epochs=3)
    with pytest.raises(ValueError, match=r"'sgd-cosine' builds its schedule on its own optimizer"):
        lrpilot.attach("sgd-cosine", net, torch.optim.SGD(net.parameters(), lr=0.1), train_loader=train, epochs=3)
    # AALR on the validation loss needs no training data at all.
    pilot = lrpilot.attach("aalr", _net(), val_loader=val, epochs=3, steps_per_epoch=8, objective="val")
    assert [d.reason for d in pilot.history.decisions] == ["aalr-start"]


def test_own_loop_gives_hd_val_its_validation_batches() -> None:
    x, y, xv, yv = _data()
    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 32, shuffle=False)
    model = _net()
    pilot = lrpilot.attach("hd-val", model, train_loader=train, val_loader=val, epochs=1, lr=0.05, beta=0.01)
    lrs = []
    for xb, yb in train:
        pilot.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        pilot.optimizer.step(**pilot.step_kwargs())
        pilot.step(loss)
        lrs.append(pilot.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1  # the hypergradient moved the LR every step
    with pytest.raises(ValueError, match="val_closure"):
        pilot.optimizer.step()


def test_own_loop_runs_rt_hpo_with_your_closure() -> None:
    """rt-hpo takes second derivatives: the closure gives it the loss with its graph (backward=False)."""
    x, y, xv, yv = _data()
    train, val = TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 32, shuffle=False)
    model = _net()
    pilot = lrpilot.attach("rt-hpo", model, train_loader=train, val_loader=val, epochs=1, lr=0.05, beta=0.01)
    assert pilot.parts.needs_closure
    lrs = []
    for xb, yb in train:

        def closure(*, backward: bool = True, xb=xb, yb=yb) -> torch.Tensor:
            if not backward:
                return nn.functional.cross_entropy(model(xb), yb)
            pilot.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        loss = pilot.optimizer.step(closure, **pilot.step_kwargs())
        pilot.step(loss)
        lrs.append(pilot.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1 and all(lr >= 0 for lr in lrs)
    pilot.end_epoch()
    assert pilot.should_stop and pilot.history.epochs[0].val_metric > 0


def test_own_loop_nonfinite_loss_without_rollback_stops_the_run() -> None:
    x, y, _, _ = _data()
    train = TensorLoader(x, y, 32, seed=0)
    pilot = lrpilot.attach("sgd", _net(), train_loader=train, epochs=3, lr=0.1)
    pilot.step(1.0)
    pilot.step(float("nan"))
    pilot.step(0.5)  # ignored: the epoch is over for the pilot
    pilot.end_epoch(0.5)
    assert pilot.should_stop and pilot.history.status == "diverged"
    assert pilot.history.decisions[-1].reason == "nonfinite-loss"
    assert pilot.step_count == 1


# ====================================================================================================
# Lightning
# ====================================================================================================
try:
    import lightning as L
except ImportError:  # the optional extra: the Lightning tests skip, the rest run
    L = None
needs_lightning = pytest.mark.skipif(L is None, reason="needs pip install 'lrpilot[lightning]'")

if L is not None:
    from lrpilot.integrations.lightning import LRPilot

    class Module(L.LightningModule):
        def __init__(self, optimizer: str | None = None) -> None:
            super().__init__()
            self.net = _net()
            self.optimizer = optimizer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            if self.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=2.0, momentum=0.9)
            return None  # LRPilot builds the method's optimizer


def _loaders() -> tuple[DataLoader, DataLoader]:
    """A shuffled training loader whose order is a function of (seed, epoch), for fit and Lightning alike."""
    x, y, xv, yv = _data()
    ds = TensorDataset(x, y)
    train = DataLoader(ds, batch_size=32, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))
    return train, DataLoader(TensorDataset(xv, yv), batch_size=96)


def _trainer(callbacks, **kwargs) -> L.Trainer:
    options = {"max_epochs": EPOCHS, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return L.Trainer(callbacks=callbacks, **{**options, **kwargs})


@pytest.fixture
def quiet_lightning():
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@needs_lightning
@pytest.mark.parametrize("method", list(METHODS))
def test_lightning_takes_the_decisions_of_fit(method: str, quiet_lightning) -> None:
    _skip_unavailable(method)
    ref_model, ref = _fit(method, *_loaders())
    module, callback = Module(), LRPilot(method, seed=0, **METHODS[method])
    _trainer([callback]).fit(module, *_loaders())
    assert _trace(callback.history) == _trace(ref)
    for a, b in zip(module.net.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@needs_lightning
def test_lightning_handles_a_nonfinite_loss_as_the_loop_does(quiet_lightning) -> None:
    """LR 1e6: every epoch goes non-finite at once. The loop stops the epoch there; the callback drops the
    gradients of the rest of the epoch. Same steps counted, same rollbacks, same weights."""
    options = {"patience": 1, "lr": 1e6}
    model = _net()
    ref = lrpilot.fit(model, *_loaders(), method="aalr", epochs=EPOCHS, seed=0, progress=False, **options)
    module, callback = Module(), LRPilot("aalr", seed=0, **options)
    _trainer([callback]).fit(module, *_loaders())
    assert _trace(callback.history) == _trace(ref)
    assert [d.reason for d in ref.decisions] == ["aalr-start"] + ["phase1-nan"] * EPOCHS
    assert [r.step for r in ref.epochs] == [4, 8, 12, 17]  # the non-finite step is not counted
    for a, b in zip(module.net.parameters(), model.parameters()):
        assert torch.equal(a, b) and bool(torch.isfinite(a).all())


@needs_lightning
def test_lightning_logs_every_lr_and_decision_with_its_reason(tmp_path, quiet_lightning) -> None:
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    callback = LRPilot("aalr", seed=0, **METHODS["aalr"])
    _trainer([callback], logger=logger, log_every_n_steps=1).fit(Module(), *_loaders())
    text = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    assert "lrpilot/lr" in header
    for d in callback.history.decisions:
        assert f"lrpilot/decision/{d.action}/{d.reason}" in header
    assert "lrpilot/decision/rollback/phase1-worse" in header
    lr_col = header.index("lrpilot/lr")
    logged = [float(row.split(",")[lr_col]) for row in text[1:] if row.split(",")[lr_col]]
    assert len(logged) == 4 * 8  # one per step (8 steps per epoch)
    assert set(logged) == {lr for r in callback.history.epochs for lr in r.lr}


@needs_lightning
def test_lightning_drives_the_modules_own_optimizer(quiet_lightning) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9)
    ref = lrpilot.fit(model, *_loaders(), method=lrpilot.AALR(opt, patience=1, epochs=EPOCHS), epochs=EPOCHS,
                      seed=0, progress=False)
    module = Module(optimizer="sgd")
    callback = LRPilot("aalr", seed=0, use_module_optimizer=True, patience=1, objective="train-eval", cooldown=0.0)
    trainer = _trainer([callback])
    trainer.fit(module, *_loaders())
    assert _trace(callback.history)["decisions"] == _trace(ref)["decisions"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == ref.decisions[-1].lr[0]


@needs_lightning
def test_lightning_resumes_from_a_checkpoint_identically(tmp_path, quiet_lightning) -> None:
    epochs = 6
    whole = LRPilot("aalr", seed=0, **METHODS["aalr"])
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, filename="{epoch}"
    )
    module = Module()
    _trainer([whole, ckpt], max_epochs=epochs, enable_checkpointing=True).fit(module, *_loaders())

    resumed = LRPilot("aalr", seed=0, **METHODS["aalr"])
    module2 = Module()
    _trainer([resumed], max_epochs=epochs).fit(
        module2, *_loaders(), ckpt_path=str(tmp_path / "epoch=2.ckpt"), weights_only=False
    )  # the pilot's state holds NumPy RNG states and Python objects: not "weights only"
    assert _trace(resumed.history) == _trace(whole.history)
    assert [d.reason for d in whole.history.decisions if d.epoch > 3]  # decisions after the resume point
    for a, b in zip(module.parameters(), module2.parameters()):
        assert torch.equal(a, b)


@needs_lightning
def test_lightning_methods_that_need_a_closure_fail_at_start_saying_what_to_do(quiet_lightning) -> None:
    for method, what in (("rt-hpo", "closure"), ("hd-val", "val_closure")):
        with pytest.raises(ValueError, match=rf"{what}.*lrpilot.attach"):
            _trainer([LRPilot(method)]).fit(Module(), *_loaders())
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'patience' for method 'sgd'; valid options: lr"):
        LRPilot("sgd", patience=3)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=1"):
        _trainer([LRPilot("aalr")], accumulate_grad_batches=2).fit(Module(), *_loaders())
    with pytest.raises(ValueError, match=r"max_epochs"):
        _trainer([LRPilot("aalr")], max_epochs=-1, max_steps=5).fit(Module(), *_loaders())


def test_lightning_module_without_the_extra_names_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)  # "not installed"
    path = ROOT / "src" / "lrpilot" / "integrations" / "lightning.py"
    spec = importlib.util.spec_from_file_location("lrpilot_lightning_without_extra", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match=r"pip install 'lrpilot\[lightning\]'"):
        module.LRPilot("aalr")


DDP_SCRIPT = r'''
import json, logging, os, sys, warnings
warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ["LRPILOT_TESTS"])
import test_integrations as t
from lrpilot.integrations.lightning import LRPilot
method = sys.argv[1]
# Global batch 64: LR 8 makes phase 1 worse (a rollback), as LR 2 does at batch 32.
options = {**t.METHODS[method], **({"lr": 8.0} if method == "aalr" else {})}
callback = LRPilot(method, seed=0, **options)
trainer = t._trainer([callback], strategy="ddp", devices=2, accelerator="cpu")
x, y, xv, yv = t._data()
# A plain shuffled loader: Lightning gives each rank its half (a DistributedSampler), 4 steps an epoch.
train = t.DataLoader(t.TensorDataset(x, y), batch_size=32, shuffle=True)
trainer.fit(t.Module(), train, t.DataLoader(t.TensorDataset(xv, yv), batch_size=48))
out = {"rank": trainer.global_rank, "trace": t._trace(callback.history), "steps": trainer.num_training_batches,
       "weights": [p.detach().flatten().tolist() for p in trainer.lightning_module.parameters()]}
with open(os.path.join(sys.argv[2], f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(out, f)
# Tear gloo down before the interpreter does: left to exit, its threads can abort the process
# ("terminate called without an active exception", SIGABRT) after a run that finished.
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@needs_lightning
@pytest.mark.parametrize("method", ["aalr", "mi-decay", "auto"])
def test_lightning_ddp_every_rank_takes_the_same_decisions(method: str, tmp_path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LRPILOT_TESTS": str(ROOT / "tests"), "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, str(script), method, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # each rank trained on its own half
    assert ranks[0]["trace"] == ranks[1]["trace"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    reasons = [d[0] for d in ranks[0]["trace"]["decisions"]]
    first = {"aalr": "aalr-start", "mi-decay": "mi-start", "auto": "safety-net-checkpoint"}[method]
    assert reasons[0] == first and len(reasons) > 2
    if method == "aalr":
        assert "phase1-worse" in reasons  # a rollback, taken on both ranks
