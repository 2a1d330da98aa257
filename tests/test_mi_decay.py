"""MI-driven LR decay: Algorithm 1 on scripted ITY sequences, Algorithm 2 on scripted tables and trials,
the loop's PROBE signal, and both methods wired end to end on tiny tasks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lrpilot
from lrpilot.core.contract import PROBE, EpochSignals, Pilot, Probe
from lrpilot.core.data import TensorLoader
from lrpilot.estimators.mi import mi_continuous
from lrpilot.loop.fit import Trainer
from lrpilot.loop.probe import run_probe
from lrpilot.pilots.mi_decay import mi_decay_lr, run_range_test, sample_probe, saturation, select_bounds
from lrpilot.pilots.mi_decay import pilot as mi_decay
from tests.conftest import TinyTask, blobs

BOUNDS = {"lr_min": 0.001, "lr_max": 0.2, "lr_top": 0.05, "epsilon": 0.03}


def trajectory(ity, ixy=2.0, epochs=10, **kw):
    """The LR of epochs 1..len(ity) under Algorithm 1, ITY_e revealed after epoch e."""
    options = {**BOUNDS, "epochs": epochs, **kw}
    lrs, lr = [], math.nan
    for e in range(1, len(ity) + 1):
        lr, _ = mi_decay_lr(e, ity[:e], ixy, lr, **options)
        lrs.append(lr)
    return lrs


# ----------------------------------------------------------------------------------------------------
# Algorithm 1
# ----------------------------------------------------------------------------------------------------
def test_scripted_ity_gives_the_exact_lr_trajectory():
    ity = [0.5, 1.5, 1.8, 1.85, 1.9, 1.9, 1.95]
    tau = 1 - 0.03 / 10
    expected = [
        0.05,  # e=1: LR_top
        0.25 * 0.2,  # e=2: d_p = 1 - 1.5/2
        0.05,  # e=3: d_s = 0.3/1.8 >= epsilon: keep
        0.075 * tau * 0.2,  # e=4: d_s = 0.05/1.85 < epsilon; d_p = 1 - 1.85/2
        0.05 * tau * 0.2,  # e=5: d_s = 0.05/1.9
        0.05 * tau * 0.2,  # e=6: d_s = 0 (ITY flat), d_p unchanged
        0.025 * tau * 0.2,  # e=7
    ]
    assert trajectory(ity) == pytest.approx(expected, rel=1e-12)


def test_lr_never_increases_from_epoch_two_and_uses_the_best_ity_so_far():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ity = list(np.cumsum(rng.normal(0.2, 0.3, 12)))  # noisy, sometimes falling
        lrs = trajectory(ity, time_decay=str(rng.choice(["epsilon", "epoch", "none"])))
        assert all(b <= a + 1e-15 for a, b in zip(lrs[1:], lrs[2:])), lrs
        assert all(0.001 <= lr <= 0.2 for lr in lrs)
    # A fall in ITY does not raise the LR back: d_p uses max(ITY_0..e-1).
    assert trajectory([0.5, 1.8, 1.0, 0.9])[2:] == trajectory([0.5, 1.8, 1.8, 1.8])[2:]


def test_the_saturation_threshold_is_strict():
    # d_s = (1.0 - 0.97) / 1.0 = 0.03 exactly: not below epsilon, keep; just below: decay.
    ity = [0.1, 0.5, 0.97, 1.0]
    kept = trajectory(ity, epsilon=0.03)
    assert saturation(ity, 4) == pytest.approx(0.03)
    assert kept[3] == kept[2]
    decayed = trajectory(ity, epsilon=0.0300001)
    assert decayed[3] == pytest.approx(0.5 * (1 - 0.0300001 / 10) * 0.2)


def test_ity_above_the_ceiling_floors_the_lr_at_lr_min():
    """k-NN bias can put ITY above IXY: the ratio is clamped, d_p = 0 and the LR sits at LR_min."""
    lrs = trajectory([0.1, 2.3, 2.4, 2.4], ixy=2.0)
    assert lrs == [0.05, 0.001, 0.001, 0.001]
    _, info = mi_decay_lr(3, [0.1, 2.3, 2.4], 2.0, 0.001, epochs=10, **{**BOUNDS})
    assert info["ratio"] == 1.0 and info["d_p"] == 0.0


def test_start_from_mi_and_the_time_decay_variants():
    assert trajectory([0.5], start="mi") == [pytest.approx(0.25 * 0.2)]
    assert trajectory([0.001], start="mi") == [0.001]  # floored at LR_min
    ity = [0.5, 1.0, 1.0, 1.0]  # saturated from epoch 3
    assert trajectory(ity, time_decay="epoch", epochs=4)[2:] == pytest.approx([0.5 * 0.25 * 0.2, 0.001])
    assert trajectory(ity, time_decay="none")[2] == pytest.approx(0.5 * 0.2)


def test_saturation_keeps_the_sign_when_ity_is_not_positive():
    assert saturation([0.1, -0.05, -0.01], 3) > 0  # rising towards 0: not saturated
    assert saturation([0.1, 0.0, -0.01], 3) < 0
    assert saturation([0.3], 1) == 1.0


# ----------------------------------------------------------------------------------------------------
# Algorithm 2: the selection on a scripted table
# ----------------------------------------------------------------------------------------------------
def run_record(lr, acc, ity, ds, trial=0, status="completed"):
    """A trial record: epoch 0 then one record per trained epoch, with the d_s it was trained under."""
    records = [{"epoch": 0, "accuracy": 0.1, "ity": 0.3, "loss": 2.3, "d_s": None}]
    for e, (a, i, d) in enumerate(zip(acc, ity, ds), start=1):
        records.append({"epoch": e, "accuracy": a, "ity": i, "loss": 1.0 / e, "d_s": d})
    return {"lr": lr, "trial": trial, "status": status, "records": records}


TABLE = [  # lr, accuracy over 3 epochs, ITY, d_s (1.0 at epoch 1)
    (1e-4, [0.10, 0.11, 0.12], [0.3, 0.32, 0.33], [1.0, 0.06, 0.03]),
    (1e-3, [0.30, 0.45, 0.60], [0.9, 1.2, 1.4], [1.0, 0.25, 0.14]),
    (1e-2, [0.75, 0.82, 0.85], [1.7, 1.8, 1.9], [1.0, 0.05, 0.02]),
    (1e-1, [0.84, 0.87, 0.88], [1.9, 2.0, 2.05], [1.0, 0.01, 0.005]),
    (3e-1, [0.80, 0.83, 0.84], [1.8, 1.9, 1.95], [1.0, 0.02, 0.01]),
    (1.0, [0.50, 0.60, 0.70], [1.2, 1.4, 1.5], [1.0, 0.1, 0.08]),
    (3.0, [0.20, 0.30, 0.35], [0.6, 0.7, 0.8], [1.0, 0.2, 0.15]),
]


def scripted_runs():
    return [run_record(lr, a, i, d) for lr, a, i, d in TABLE]


def test_scripted_table_gives_the_exact_bounds():
    result = select_bounds(scripted_runs(), c1=10, c2=1)
    # MAXVAL = 0.88 (LR 0.1); Thresh = 0.088.
    # d1n (final - first epoch): 0.02, 0.30, 0.10, 0.04, 0.04, 0.20, 0.15 -> LR_min = 1e-3.
    # dnn: 0.76, 0.28, 0.03, 0, 0.04, 0.18, 0.53 -> last within Thresh of MAXVAL: 0.3 -> LR_max = 0.3.
    # min(d_s) per run: 0.03, 0.14, 0.02, 0.005, 0.01, 0.08, 0.15 -> median 0.03.
    assert (result.lr_min, result.lr_max, result.lr_top) == (1e-3, 0.3, 0.1)
    assert result.epsilon == pytest.approx(0.03)
    assert result.threshold == pytest.approx(0.088)
    assert [row["d1n"] for row in result.table] == pytest.approx([0.02, 0.30, 0.10, 0.04, 0.04, 0.20, 0.15])
    assert [row["dnn"] for row in result.table] == pytest.approx([0.76, 0.28, 0.03, 0.0, 0.04, 0.18, 0.53])
    # C2 scales epsilon; C1 = 4 widens the band (Thresh = 0.22): LR_max = 1.0 (dnn 0.18), LR_min = 1e-3.
    assert select_bounds(scripted_runs(), c2=0.01).epsilon == pytest.approx(0.0003)
    wide = select_bounds(scripted_runs(), c1=4)
    assert (wide.lr_min, wide.lr_max) == (1e-3, 1.0)


def test_lr_max_needs_every_later_lr_to_fall_short():
    """A single bad LR followed by a good one does not end the range."""
    runs = scripted_runs()
    runs[4] = run_record(0.3, [0.5, 0.55, 0.6], [1.0, 1.1, 1.2], [1.0, 0.1, 0.1])  # bad at 0.3
    runs[5] = run_record(1.0, [0.8, 0.84, 0.86], [1.9, 2.0, 2.0], [1.0, 0.02, 0.0])  # good again at 1
    assert select_bounds(runs).lr_max == 1.0


def test_selection_options():
    runs = scripted_runs()
    # Initial = pre-training (0.1 for every LR): d1n = final - 0.1; the first with d1n >= 0.088 is 1e-2
    # ... no: 1e-3 reaches 0.60 -> d1n 0.5; 1e-4 reaches 0.12 -> 0.02. LR_min = 1e-3 either way here.
    assert select_bounds(runs, initial="pre-training").lr_min == 1e-3
    ity = select_bounds(runs, attribute="ity")  # MAXVAL 2.05, Thresh 0.205; dnn <= 0.2 up to 0.3
    assert (ity.attribute, ity.lr_top, ity.lr_max) == ("ity", 0.1, 0.3)
    both = select_bounds(runs, attribute="accuracy+ity", c1=4)  # accuracy: LR_max 1.0 beats ity's 0.3
    assert (both.attribute, both.lr_max) == ("accuracy", 1.0)


def test_repeated_trials_are_averaged_and_crashes_left_out_of_the_table():
    runs = scripted_runs() + [run_record(lr, [x + 0.02 for x in a], i, d, trial=1) for lr, a, i, d in TABLE]
    runs.append({"lr": 10.0, "trial": 1, "status": "crashed", "records": []})
    result = select_bounds(runs)
    assert [row["lr"] for row in result.table] == [lr for lr, *_ in TABLE]
    assert result.table[3]["final_accuracy"] == pytest.approx(0.89) and result.table[3]["runs"] == 2
    assert result.to_dict()["crashed"] == [10.0]
    with pytest.raises(ValueError, match="every run crashed"):
        select_bounds([{"lr": 1.0, "trial": 0, "status": "crashed", "records": []}])


def test_a_crash_restarts_the_next_trial_from_the_crashed_lr():
    calls = []

    def trial(lr, t):
        calls.append((lr, t))
        crashed = lr >= 1.0 and t == 0  # the first trial's initial weights do not survive LR 1
        acc = [0.5, 0.6, 0.7] if lr < 3.0 else [0.1, 0.1, 0.1]
        return {**run_record(lr, acc, [1.0, 1.1, 1.2], [1.0, 0.1, 0.05]), "status": "crashed" if crashed else "completed"}

    lrs = [0.1, 1.0, 3.0]
    run_range_test(trial, lrs, trials=3)
    assert calls == [(0.1, 0), (1.0, 0), (1.0, 1), (3.0, 1), (0.1, 2), (1.0, 2), (3.0, 2)]
    calls.clear()
    run_range_test(trial, lrs, trials=2, on_crash="skip")
    assert calls == [(0.1, 0), (1.0, 0), (3.0, 0), (0.1, 1), (1.0, 1), (3.0, 1)]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"trials": 0}, r"rrt_trials"), ({"on_crash": "retry"}, r"on_crash"), ({"c1": 0}, r"c1"),
     ({"attribute": "loss"}, r"attribute")],
)
def test_range_test_options_are_checked(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_range_test(lambda lr, t: run_record(lr, [0.5] * 3, [1.0] * 3, [1.0, 0.1, 0.1]), [0.1], **kwargs)


# ----------------------------------------------------------------------------------------------------
# the loop's PROBE signal
# ----------------------------------------------------------------------------------------------------
class _ProbeRecorder(Pilot):
    needs = frozenset({PROBE})

    def __init__(self, optimizer, inputs, modules):
        super().__init__(optimizer)
        self.probe = Probe(inputs, modules=modules, batch_size=7)
        self.seen = []

    def on_train_begin(self, signals):
        self.seen.append(signals[PROBE])

    def on_epoch_end(self, signals):
        self.seen.append(signals[PROBE])


def _dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_probe_hands_module_outputs_in_eval_mode_and_leaves_no_hooks(tiny):
    model = _dropout_mlp()
    x = blobs(n=20, seed=5)[0]
    pilot = _ProbeRecorder(torch.optim.SGD(model.parameters(), lr=0.1), x, ("", "0", "2"))
    lrpilot.fit(model, tiny.train, tiny.val, method=pilot, epochs=2, progress=False)
    assert len(pilot.seen) == 3  # before training and after each epoch
    model.eval()
    # Close, not bit-equal: the loop may run the probe with another thread count than this test, and
    # BLAS then sums in another order. Dropout left on would zero half the units and double the rest.
    close = dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(pilot.seen[-1][""], model(x), **close)
        torch.testing.assert_close(pilot.seen[-1]["0"], model[0](x), **close)
        torch.testing.assert_close(pilot.seen[-1]["2"], torch.relu(model[0](x)), **close)  # dropout off in eval mode
    assert not torch.equal(pilot.seen[0][""], pilot.seen[-1][""])  # the model trained in between
    assert all(not m._forward_hooks for m in model.modules())


def test_probe_restores_train_mode_and_rejects_unknown_modules():
    model = _dropout_mlp().train()
    out = run_probe(model, Probe(torch.randn(5, 4), modules=("1",)))
    assert model.training and out["1"].shape == (5, 16) and set(out) == {"1"}
    with pytest.raises(ValueError, match=r"module\(s\) \['head'\].*valid names"):
        run_probe(model, Probe(torch.randn(5, 4), modules=("head",)))


def test_a_pilot_that_needs_the_probe_must_set_one(tiny):
    model = tiny.model()
    pilot = _ProbeRecorder(torch.optim.SGD(model.parameters(), lr=0.1), torch.zeros(2, 4), ("",))
    pilot.probe = None
    with pytest.raises(ValueError, match="needs signal 'probe' but sets no `probe`"):
        lrpilot.fit(model, tiny.train, tiny.val, method=pilot, epochs=1, progress=False)


# ----------------------------------------------------------------------------------------------------
# the pilot in the loop
# ----------------------------------------------------------------------------------------------------
def test_the_pilot_follows_scripted_ity_exactly(tiny, monkeypatch):
    """The loop + pilot apply Algorithm 1 epoch by epoch: scripted ITY in, the exact LR trajectory out."""
    ity = [0.5, 1.5, 1.8, 1.85, 1.9, 1.9, 1.95]
    script = iter(ity)
    monkeypatch.setattr(mi_decay, "estimate_mi", lambda *a, **k: next(script))
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=6, ixy=2.0, progress=False,
                       mi_samples=50, **BOUNDS)
    tau = 1 - 0.03 / 6
    expected = [0.05, 0.05, 0.05, 0.075 * tau * 0.2, 0.05 * tau * 0.2, 0.05 * tau * 0.2]
    assert hist.lr_trajectory() == pytest.approx(expected, rel=1e-12)
    reasons = [d.reason for d in hist.decisions]
    assert reasons == ["mi-start", "mi-performance", "mi-keep", "mi-saturated", "mi-saturated", "mi-saturated", "mi-final"]
    d3 = hist.decisions[3].info
    assert d3["ity"] == 1.85 and d3["ixy"] == 2.0 and d3["d_s"] == pytest.approx(0.05 / 1.85)
    assert d3["ratio_raw"] == pytest.approx(1.85 / 2.0)


def test_raw_ity_above_ixy_is_logged_unclamped(tiny, monkeypatch):
    script = iter([0.5, 2.3, 2.4])
    monkeypatch.setattr(mi_decay, "estimate_mi", lambda *a, **k: next(script))
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=2, ixy=2.0, progress=False,
                       mi_samples=50, **BOUNDS)
    info = hist.decisions[1].info
    assert info["ity"] == 2.3 and info["ratio_raw"] == pytest.approx(1.15) and info["ratio"] == 1.0
    assert hist.lr_trajectory() == [0.05, 0.001]


def test_the_subset_is_sampled_once_and_ity_uses_it(tiny):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=3, seed=0, progress=False,
                      method_options={**BOUNDS, "mi_samples": 60})
    pilot = trainer.pilot
    idx = pilot.data.indices
    assert len(idx) == 60 == len(set(idx)) and torch.equal(pilot.data.inputs, tiny.train.inputs[idx])
    trainer.run()
    assert pilot.data.indices == idx and len(pilot.ity[0]) == 4  # ITY_0..ITY_3
    # The MI info (the ceiling and its alternatives) lands in the method info of the run record.
    mi = trainer.parts.info["mi"]
    from lrpilot.estimators.mi import label_entropy

    assert mi["ceiling"] == "entropy" and mi["ixy"] == mi["h_y"] == label_entropy(tiny.train.targets[idx])
    assert mi["ixy_ksg"] > 0


def test_sample_probe_reads_every_kind_of_loader():
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20)
    a = sample_probe(TensorLoader(x, y, 4), 8, seed=1)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    b = sample_probe(dl, 8, seed=1)
    assert a.indices == b.indices and torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, y[a.indices])
    c = sample_probe([(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)], 8, seed=1)  # any iterable
    assert len(c.targets) == 8 and len(set(c.targets.tolist())) == 8
    assert len(sample_probe(TensorLoader(x, y, 4), 1000, seed=0).targets) == 20  # all of them


def test_layerwise_gives_one_group_per_layer_with_its_own_ity(tiny):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay-layerwise", epochs=3, seed=0,
                      progress=False, method_options={**BOUNDS, "mi_samples": 96})
    groups = trainer.optimizer.param_groups
    assert [g["layer"] for g in groups] == ["body.0", "head"]
    assert trainer.pilot.probe.modules == ("", "body.0", "head")
    hist = trainer.run()
    info = hist.decisions[1].info
    assert len(info["ity"]) == 2 and len(info["d_p"]) == 2 and len(hist.epochs[0].lr) == 2
    # Each group's LR is Algorithm 1 applied to its own ITY history.
    for g, ity in enumerate(trainer.pilot.ity):
        expected = trajectory(ity[:3], ixy=trainer.pilot.ixy, epochs=3)
        assert [e.lr[g] for e in hist.epochs] == pytest.approx(expected, rel=1e-12)


def test_layerwise_trajectory_is_the_dense_estimators_exactly(monkeypatch):
    """The default (pruned) Ross path gives the ITY, hence the LRs, of the dense matrix it replaced,
    on layers wider than its first pass (48 > 16 coordinates) and narrower (3)."""
    from lrpilot.estimators import mi
    from tests.conftest import MLP

    x, y = blobs(n=256, classes=4, dim=20, seed=0)
    xv, yv = blobs(n=64, classes=4, dim=20, seed=1)

    def run() -> Trainer:
        torch.manual_seed(0)
        trainer = Trainer(MLP((20, 48, 4)), TensorLoader(x, y, 32, shuffle=True, seed=0), TensorLoader(xv, yv, 64),
                          method="mi-decay-layerwise", epochs=4, seed=0, progress=False,
                          method_options={**BOUNDS, "mi_samples": 200})
        trainer.run()
        return trainer

    fast = run()
    with monkeypatch.context() as patch:
        patch.setattr(mi, "_ross_counts_pruned", lambda a, k_c, keep, groups: mi._ross_counts(
            mi.pairwise_chebyshev(a), np.zeros(0), k_c, keep, groups))  # n_c: unused by the counts
        dense = run()
    assert fast.pilot.ity == dense.pilot.ity and len(fast.pilot.ity[0]) == 5
    assert [e.lr for e in fast.history.epochs] == [e.lr for e in dense.history.epochs]
    assert [d.reason for d in fast.history.decisions] == [d.reason for d in dense.history.decisions]


def test_layerwise_refuses_user_param_groups(tiny):
    model = tiny.model()
    with pytest.raises(ValueError, match="one param group per layer"):
        Trainer(model, tiny.train, tiny.val, method="mi-decay-layerwise", epochs=1, progress=False,
                param_groups=[{"params": list(model.parameters())}], method_options=BOUNDS)


# ----------------------------------------------------------------------------------------------------
# the range test in the method
# ----------------------------------------------------------------------------------------------------
RRT = {"rrt_lrs": (0.003, 0.03, 0.3, 3.0, 1e4), "rrt_epochs": 2, "rrt_trials": 2, "mi_samples": 96}


def test_mi_decay_runs_the_range_test_first_and_reports_its_cost(tiny):
    # One decision split given to both runs below, so the searched and the given run train on the same data.
    split = TensorLoader(*next(iter(tiny.val)), 16, shuffle=False)
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=3, seed=0, progress=False,
                      method_options=RRT, hyper_loader=split)
    info = trainer.parts.info
    rt, search = info["range_test"], info["search"]
    runs = search["runs"]
    # LR 1e4 diverges: its run crashes, the next trial restarts from it (and crashes again), and it is
    # left out of D.
    assert [(r["lr"], r["trial"], r["status"]) for r in runs] == [
        (0.003, 0, "completed"), (0.03, 0, "completed"), (0.3, 0, "completed"), (3.0, 0, "completed"),
        (1e4, 0, "crashed"), (1e4, 1, "crashed")]
    assert rt["crashed"] == [1e4] and [row["lr"] for row in rt["table"]] == [0.003, 0.03, 0.3, 3.0]
    assert search["total_epochs"] == sum(r["epochs"] for r in runs) and search["total_steps"] == sum(
        r["steps"] for r in runs)
    assert search["total_train_s"] >= sum(r["train_s"] for r in runs)
    assert all(r["epochs"] == 2 for r in runs if r["status"] == "completed")
    bounds = {k: rt[k] for k in ("lr_min", "lr_max", "lr_top", "epsilon")}
    assert info["bounds"] == {**bounds, "source": "range-test"}
    assert trainer.pilot.bounds == bounds
    json.dumps(info, allow_nan=True)  # plain data for the run record
    # The trials left the run alone: training with the bounds given is the same run, step for step.
    searched = trainer.run()
    given = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=3, seed=0, progress=False,
                        mi_samples=96, hyper_loader=split, **bounds)
    assert [e.train_loss for e in searched.epochs] == [e.train_loss for e in given.epochs]
    assert searched.lr_trajectory() == given.lr_trajectory()


def test_the_python_api_history_carries_the_range_test_as_the_cli_record_does(tiny):
    hist = lrpilot.fit(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=1, seed=0, progress=False,
                       **{**RRT, "rrt_trials": 1})
    method = hist.info["method"]
    rt = method["range_test"]
    assert method["bounds"] == {**{k: rt[k] for k in ("lr_min", "lr_max", "lr_top", "epsilon")}, "source": "range-test"}
    assert [r["lr"] for r in method["search"]["runs"]] == list(RRT["rrt_lrs"][:5])
    record = hist.to_record(task="tiny", method="mi-decay", seed=0, config={})
    assert json.loads(json.dumps(record, allow_nan=True))["info"]["method"]["bounds"] == method["bounds"]


def _scripted_observations(monkeypatch, trainer, script):
    """Replace the pilot's subset observations by ``script`` (one dict per epoch, epoch 0 first)."""
    steps = iter(script)

    def observe(outputs):
        obs = dict(next(steps))
        return {"ity": [obs.pop("ity")], "mi_s": 0.0, **obs}

    monkeypatch.setattr(trainer.pilot, "_observe", observe)


GOOD = [{"ity": 0.3, "accuracy": 0.4, "loss": 1.0}, {"ity": 1.0, "accuracy": 0.8, "loss": 0.5},
        {"ity": 1.2, "accuracy": 0.9, "loss": 0.4}]


@pytest.mark.parametrize("last,crashes", [
    ({"ity": 0.5, "accuracy": 0.4, "loss": 0.9}, True),   # every attribute dropped dramatically
    ({"ity": 0.5, "accuracy": 0.4, "loss": 0.7}, False),  # the loss did not grow past best / crash_drop
    ({"ity": 0.7, "accuracy": 0.4, "loss": 0.9}, False),  # ITY kept more than crash_drop x its best
    ({"ity": 0.5, "accuracy": 0.5, "loss": 0.9}, False),  # accuracy kept more than crash_drop x its best
])
def test_a_trial_crashes_on_a_dramatic_drop_in_every_attribute(tiny, monkeypatch, last, crashes):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=4, seed=0, progress=False,
                      method_options={**BOUNDS, "ixy": 2.0, "mi_samples": 50, "stop_on_crash": True})
    _scripted_observations(monkeypatch, trainer, [*GOOD, last, GOOD[-1]])
    hist = trainer.run()
    if crashes:
        assert hist.status == "stopped" and hist.status_reason == "rrt-crash" and len(hist.epochs) == 3
        assert hist.decisions[-1].reason == "rrt-crash"
    else:
        assert hist.status == "completed" and len(hist.epochs) == 4


def test_later_trials_start_from_new_initial_weights(tiny):
    """Algorithm 2: "Initialize and save initial model" in every trial; trial 0 keeps the run's own."""
    model = tiny.model()
    trainer = Trainer(model, tiny.train, tiny.val, method="mi-decay", epochs=1, seed=0, progress=False,
                      method_options={"rrt_lrs": (0.003, 0.03), "rrt_epochs": 2, "rrt_trials": 3, "mi_samples": 96})
    probe = trainer.pilot.data
    runs = trainer.parts.info["search"]["runs"]
    expected = []
    for t in range(3):
        net = tiny.model()  # the run's initial weights
        if t > 0:  # torch's default initialisation from seed + t
            torch.manual_seed(0 + t)
            for module in net.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        with torch.no_grad():
            expected.append(float(nn.functional.cross_entropy(net.eval()(probe.inputs), probe.targets)))
    assert len({round(v, 6) for v in expected}) == 3
    for r in runs:  # the subset loss before training: the trial's initial weights
        assert r["records"][0]["loss"] == pytest.approx(expected[r["trial"]], rel=1e-6)


@pytest.mark.parametrize("ity_output", ["logits", "softmax"])
def test_ity_of_the_logits_or_of_the_softmax_outputs(tiny, ity_output):
    from lrpilot.estimators.mi import mi_continuous_discrete

    model = tiny.model()
    trainer = Trainer(model, tiny.train, tiny.val, method="mi-decay", epochs=1, seed=0, progress=False,
                      method_options={**BOUNDS, "ixy": 2.0, "mi_samples": 96, "ity_output": ity_output})
    probe = trainer.pilot.data
    with torch.no_grad():
        out = model.eval()(probe.inputs)
    model.train()
    t = torch.softmax(out, dim=1) if ity_output == "softmax" else out
    trainer._begin()  # ITY_0 of the initial model
    assert trainer.pilot.ity[0][0] == mi_continuous_discrete(t, probe.targets, k=3, seed=0)
    with pytest.raises(ValueError, match="ity_output"):
        Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=1, progress=False,
                method_options={**BOUNDS, "ity_output": "probs"})


def test_given_values_override_the_range_test(tiny):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=2, seed=0, progress=False,
                      method_options={**RRT, "epsilon": 0.5})
    assert trainer.pilot.bounds["epsilon"] == 0.5 and trainer.parts.info["bounds"]["source"] == "range-test+given"
    assert trainer.parts.info["range_test"]["epsilon"] != 0.5


def test_regression_uses_ksg_and_ity_in_the_range_test():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=rng)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [0.0]]) + 0.3 * torch.randn(300, 1, generator=rng)
    loader = TensorLoader(x, y, 30)
    torch.manual_seed(0)
    trainer = Trainer(nn.Linear(5, 1), loader, loader, method="mi-decay", epochs=3, loss_fn=nn.MSELoss(),
                      progress=False, method_options={"rrt_lrs": (0.001, 0.01, 0.1), "rrt_epochs": 2},
                      hyper_fraction=0)  # every point trains; the trials are compared on `loader`
    info = trainer.parts.info
    probe = trainer.pilot.data
    assert len(probe.inputs) == 300  # every point: fewer than mi_samples
    # The ceiling is KSG (algorithm 1, k = 3) of the raw inputs against the targets on the subset, exactly;
    # the truth is 0.5 ln(1 + 5.25/0.09) = 2.04 nats, which KSG underestimates in 5 dimensions (0.797).
    expected = mi_continuous(probe.inputs, probe.targets, k=3, seed=0)
    assert info["mi"]["ceiling"] == "ksg" and info["mi"]["h_y"] is None and info["mi"]["ixy"] == expected
    assert info["mi"]["ixy"] == pytest.approx(0.7967, abs=1e-4)
    assert info["range_test"]["attribute"] == "ity"
    assert {k: info["range_test"][k] for k in ("lr_min", "lr_max", "lr_top")} == {
        "lr_min": 0.001, "lr_max": 0.1, "lr_top": 0.1}
    hist = trainer.run()
    assert hist.epochs[-1].val_loss < hist.info["initial"]["val_loss"]
    with pytest.raises(ValueError, match="ceiling .*regression"):
        Trainer(nn.Linear(5, 1), loader, loader, method="mi-decay", epochs=1, loss_fn=nn.MSELoss(),
                progress=False, method_options={**BOUNDS, "ceiling": "entropy"})


@pytest.mark.parametrize("ceiling", ["ksg", "ross", "entropy"])
def test_each_ceiling_is_the_estimator_its_name_says(tiny, ceiling):
    """"ksg" is the paper's literal IXY: KSG between the raw inputs and one-hot labels; "ross" is Ross's
    estimator against the labels (what "ksg" computed before issue 16); "entropy" is H(Y)."""
    from lrpilot.estimators.mi import label_entropy, mi_continuous_discrete

    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=1, seed=0, progress=False,
                      method_options={**BOUNDS, "ceiling": ceiling, "mi_samples": 96})
    trainer.run()
    mi = trainer.parts.info["mi"]
    x, labels = trainer.pilot.data.inputs, trainer.pilot.data.targets
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    assert mi["ixy_ksg"] == mi_continuous(x, onehot, k=3, seed=0)
    assert mi["ixy_ross"] == mi_continuous_discrete(x, labels, k=3, seed=0)
    assert mi["h_y"] == label_entropy(labels)
    # With jittered one-hot Y every k-th joint neighbour lies in the same class here (the classes are
    # 1/std(Y) apart in the max-norm), so KSG's n_y + 1 is the class size and n_x + 1 Ross's m_i: the
    # two estimators agree to rounding, as on MNIST-1D and Fashion-MNIST (docs/methods/mi-decay.md).
    assert mi["ixy_ksg"] == pytest.approx(mi["ixy_ross"], rel=1e-12) and mi["ixy_ksg"] != mi["h_y"]
    used = {"ksg": "ixy_ksg", "ross": "ixy_ross", "entropy": "h_y"}[ceiling]
    assert mi["ceiling"] == ceiling and trainer.pilot.ixy == mi["ixy"] == mi[used]


def test_range_test_python_call_and_cli(tmp_path):
    from lrpilot.bench.range_test import range_test
    from lrpilot.cli import main

    task = TinyTask()
    report = range_test(task.model(), task.train, task.val, options={**RRT, "rrt_trials": 1}, hyper_fraction=0)
    assert set(report) == {"range_test", "search", "mi"}
    rt = report["range_test"]
    # LR 1e4 crashes (its activations overflow); the other four complete and make D.
    assert [(r["lr"], r["status"], r["reason"]) for r in report["search"]["runs"]] == [
        (0.003, "completed", ""), (0.03, "completed", ""), (0.3, "completed", ""), (3.0, "completed", ""),
        (1e4, "crashed", "rrt-crash")]
    final = [row["final_accuracy"] for row in rt["table"]]
    growth = [row["final_accuracy"] - row["initial_accuracy"] for row in rt["table"]]
    assert [row["lr"] for row in rt["table"]] == [0.003, 0.03, 0.3, 3.0]
    assert final == pytest.approx([31 / 96, 94 / 96, 95 / 96, 65 / 96], abs=1e-12)  # 96 subset points
    # Algorithm 2 by hand: Thresh = MAXVAL/C1; LR_min the first LR that grew by Thresh; LR_max the last
    # within Thresh of MAXVAL; LR_top the best; epsilon = C2 x the median of the runs' min(d_s).
    assert rt["threshold"] == pytest.approx(95 / 96 / 10)
    assert growth[0] >= rt["threshold"] and 95 / 96 - final[3] >= rt["threshold"]
    assert (rt["lr_min"], rt["lr_max"], rt["lr_top"]) == (0.003, 0.3, 0.3)
    assert rt["c2"] == 0.01  # the default: the paper's C2 << 1 for a two-trial, three-epoch range test
    assert rt["epsilon"] == pytest.approx(0.01 * float(np.median([row["min_d_s"] for row in rt["table"]])), rel=1e-12)
    with pytest.raises(ValueError, match="do not give lr_max"):
        range_test(task.model(), task.train, options={"lr_max": 0.1})
    out = tmp_path / "rrt.json"
    code = main(["range-test", "--task", "iris-softmax", "-o", "rrt_lrs=(0.01,0.1,1.0)", "-o", "rrt_trials=1",
                 "-o", "rrt_epochs=2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert code == 0 and saved["task"] == "iris-softmax" and saved["range_test"]["lr_max"] in (0.01, 0.1, 1.0)
    assert saved["search"]["total_epochs"] == 6


def test_state_dict_of_the_pilot_continues_identically(tiny):
    opts = {**BOUNDS, "mi_samples": 96}
    straight = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay-layerwise", epochs=4, progress=False,
                       method_options=opts)
    straight.run()
    first = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay-layerwise", epochs=4, progress=False,
                    method_options=opts)
    first.run(until_epoch=2)
    resumed = Trainer(tiny.model(7), tiny.train, tiny.val, method="mi-decay-layerwise", epochs=4, progress=False,
                      method_options=opts)
    resumed.load_state_dict(first.state_dict())
    resumed.run()
    assert resumed.pilot.ity == straight.pilot.ity
    assert [d.info for d in resumed.history.decisions][-1]["ity"] == [d.info for d in straight.history.decisions][-1]["ity"]


def test_on_epoch_end_after_a_nonfinite_epoch_does_nothing(tiny):
    trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=2, progress=False,
                      method_options={**BOUNDS, "mi_samples": 50})
    trainer.run(until_epoch=1)
    signals = EpochSignals(epoch=2, step=12, lr=(0.05,), train_loss=math.nan, val_loss=math.nan,
                           val_metric=math.nan, nonfinite=True, extra={PROBE: math.nan})
    assert trainer.pilot.on_epoch_end(signals) is None
    assert trainer.pilot.records[-1]["nonfinite"] is True


def test_non_finite_activations_stop_the_run_or_crash_the_trial(tiny):
    for stop_on_crash, reason in ((False, "mi-nonfinite-activations"), (True, "rrt-crash")):
        trainer = Trainer(tiny.model(), tiny.train, tiny.val, method="mi-decay", epochs=3, progress=False,
                          method_options={**BOUNDS, "mi_samples": 50, "stop_on_crash": stop_on_crash})
        trainer.run(until_epoch=1)
        outputs = {"": torch.full((50, 3), math.inf)}
        signals = EpochSignals(epoch=2, step=12, lr=(0.05,), train_loss=1.0, val_loss=1.0, val_metric=0.5,
                               extra={PROBE: outputs})
        decision = trainer.pilot.on_epoch_end(signals)
        assert decision.stop and decision.reason == reason and decision.info["nonfinite_modules"] == [""]
