"""AALR (Algorithm 1): scripted loss sequences with exact trajectories, section 4's epoch counts, a
line-by-line reference transcription, and the pilot inside the real loop (rollbacks, resume, Adam,
regression, the final restore)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lrpilot
from lrpilot.core.contract import TRAIN_EVAL_LOSS, EpochSignals
from lrpilot.core.data import TensorLoader
from lrpilot.core.registry import get_method
from lrpilot.loop.fit import Trainer
from lrpilot.pilots.aalr import AALR, BEST_TAG, INITIAL_TAG, REASONS
from lrpilot.pilots.cooldown import Cooldown
from tests.conftest import TinyTask

NAN, INF = math.nan, math.inf


# ----------------------------------------------------------------------------------------------------
# a loop-free driver: scripted J per epoch straight into the pilot
# ----------------------------------------------------------------------------------------------------
def _pilot(lr: float = 0.1, **options) -> AALR:
    param = nn.Parameter(torch.zeros(1))
    return AALR(torch.optim.SGD([param], lr=lr, momentum=0.9), **options)


class Drive:
    """Feeds ``script[t]`` as epoch t+1's outcome, as the loop would: a float is J (the training loss
    was finite; ``inf`` means J itself overflowed), ``NAN`` a non-finite training loss (``nonfinite``).
    Records what each epoch trained with and what each decision did."""

    def __init__(self, pilot: AALR, j0: float = 2.0) -> None:
        self.pilot = pilot
        self.lr = pilot.lr
        self.epoch = 0
        self.rows: list[dict] = []
        begin = pilot.on_train_begin(self._signals(0, j0, nonfinite=False))
        assert (begin.reason, begin.save) == ("aalr-start", INITIAL_TAG)

    def _signals(self, epoch: int, j: float, *, nonfinite: bool) -> EpochSignals:
        extra = {}
        if TRAIN_EVAL_LOSS in self.pilot.needs:
            extra[TRAIN_EVAL_LOSS] = NAN if nonfinite else j
        return EpochSignals(
            epoch=epoch, step=epoch, lr=self.lr, train_loss=NAN if nonfinite else j + 0.1,
            val_loss=NAN if nonfinite else j + 0.2, val_metric=NAN, nonfinite=nonfinite, extra=extra,
        )  # fmt: skip

    def run(self, script) -> Drive:
        for value in script:
            self.epoch += 1
            nonfinite = isinstance(value, float) and math.isnan(value)
            trained_with = self.lr
            d = self.pilot.on_epoch_end(self._signals(self.epoch, value, nonfinite=nonfinite))
            if d is not None and d.lr is not None:
                self.lr = d.lr
            self.rows.append(
                {
                    "epoch": self.epoch,
                    "lr": trained_with[0],
                    "reason": None if d is None else d.reason,
                    "save": None if d is None else d.save,
                    "restore": None if d is None else d.restore,
                    "reset": None if d is None else d.reset_optimizer,
                    "patience": self.pilot.patience,
                    "best": self.pilot.best_loss,
                }
            )
        return self

    def col(self, key: str) -> list:
        return [r[key] for r in self.rows]

    def events(self) -> list[tuple[int, str]]:
        """Algorithm 1's saves and restores (not the phase-1 snapshots kept for ``restore_best``)."""
        out = []
        for r in self.rows:
            if r["restore"] == INITIAL_TAG:
                out.append((r["epoch"], "restore-initial"))
            elif r["restore"] == BEST_TAG:
                out.append((r["epoch"], "restore"))
            if r["save"] == BEST_TAG and r["reason"] != "phase1-improved":
                out.append((r["epoch"], "save"))
        return out

    def snapshots(self) -> list[int]:
        return [r["epoch"] for r in self.rows if r["save"] == BEST_TAG and r["reason"] == "phase1-improved"]


# ----------------------------------------------------------------------------------------------------
# phase 1
# ----------------------------------------------------------------------------------------------------
def test_phase1_keeps_the_lr_for_patience_epochs_then_checkpoints_and_doubles():
    d = Drive(_pilot(patience=3)).run([1.5, 1.4, 1.4])  # an equal loss is not worse (line 6: L > L*)
    assert d.col("reason") == ["phase1-improved", "phase1-improved", "phase1-done"]
    assert d.col("lr") == [0.1, 0.1, 0.1]
    assert d.lr == (0.2,)
    assert d.events() == [(3, "save")]
    assert d.col("best") == [1.5, 1.4, 1.4]
    assert d.col("patience") == [3, 3, 1]  # phase 2 starts with patience 1
    assert d.pilot.phase == 2


def test_phase1_worse_halves_restarts_from_the_initial_model_and_resets_the_best_loss():
    d = Drive(_pilot(patience=3), j0=2.0).run([1.5, 1.6, 1.9, 1.8, 1.7])
    assert d.col("reason") == ["phase1-improved", "phase1-worse", "phase1-improved", "phase1-improved", "phase1-done"]
    assert d.col("lr") == [0.1, 0.1, 0.05, 0.05, 0.05]
    assert d.col("restore")[1] == INITIAL_TAG and d.col("reset")[1] is True
    # L* went back to J(theta_0) = 2.0 on the restart, so 1.9 (worse than the discarded 1.5) improves.
    assert d.col("best") == [1.5, 2.0, 1.9, 1.8, 1.7]
    assert d.lr == (0.1,)  # 2 x 0.05


def test_phase1_snapshots_the_lowest_loss_for_the_end_of_the_budget():
    script = [1.5, 1.2, 1.3, 1.45, 1.1, 1.05]
    d = Drive(_pilot(patience=4), j0=2.0).run(script)
    # 1.3 is worse than 1.2: restart (L* back to 2.0); 1.45 improves the run but not the snapshot.
    assert d.col("reason") == ["phase1-improved", "phase1-improved", "phase1-worse", "phase1-improved",
                               "phase1-improved", "phase1-improved"]  # fmt: skip
    assert d.snapshots() == [1, 2, 5, 6]
    assert d.pilot.on_train_end() is None  # the model in hand is the snapshot
    d.run([1.07])  # worse than L* = 1.05: restart, the model in hand is theta_0 (J = 2.0)
    assert d.rows[-1]["reason"] == "phase1-worse"
    end = d.pilot.on_train_end()
    assert (end.reason, end.restore, end.info) == ("restore-best", BEST_TAG, {"loss": 2.0, "best_loss": 1.05})
    plain = Drive(_pilot(patience=4, restore_best=False), j0=2.0).run(script + [1.07])
    assert plain.snapshots() == [] and plain.pilot.on_train_end() is None
    assert plain.col("lr") == d.col("lr")  # the snapshots change nothing of the algorithm


def test_phase1_literal_reading_keeps_the_discarded_best_and_halves_every_epoch():
    d = Drive(_pilot(patience=3, phase1_reset_best=False), j0=2.0).run([1.5, 1.6, 1.9, 1.8, 1.7])
    assert d.col("reason") == ["phase1-improved"] + ["phase1-worse"] * 4
    assert d.col("lr") == [0.1, 0.1, 0.05, 0.025, 0.0125]
    assert d.col("best") == [1.5] * 5


@pytest.mark.parametrize("bad", [NAN, INF])
def test_phase1_nonfinite_loss_restarts_like_a_worse_one(bad):
    d = Drive(_pilot(patience=2)).run([bad, bad, 1.0, 0.9])
    assert d.col("reason") == ["phase1-nan", "phase1-nan", "phase1-improved", "phase1-done"]
    assert d.col("lr") == [0.1, 0.05, 0.025, 0.025]
    assert d.events() == [(1, "restore-initial"), (2, "restore-initial"), (4, "save")]


# ----------------------------------------------------------------------------------------------------
# phase 2, both trial lengths
# ----------------------------------------------------------------------------------------------------
# After phase 1 (patience 1: one epoch at 0.1), phase 2 starts at 0.2 with p = 1. The script below
# improves, then fails twice (halve, p = 2), then improves, then diverges (rollback, halve, p = 2 after
# the reset to 1), then fails a first trial and improves on the second.
PHASE2_SCRIPT_P = {
    # trial length p: trials of 1, 1, 1, 1 (fail, fail), 2 (improve), 1 (nan), 2 (fail), 2 (improve)
    "script": [1.0, 0.9, 0.95, 0.95, 0.8, 0.7, NAN, 0.8, 0.9, 0.8, 0.6],
    "lr": [0.1, 0.2, 0.4, 0.4, 0.2, 0.2, 0.4, 0.2, 0.2, 0.2, 0.2],
    "reason": ["phase1-done", "phase2-improved", "phase2-second-trial", "phase2-halve", None, "phase2-improved",
               "nan-rollback", None, "phase2-second-trial", None, "phase2-improved"],
    "patience": [1, 1, 1, 2, 2, 1, 2, 2, 2, 2, 1],
    "events": [(1, "save"), (2, "save"), (6, "save"), (7, "restore"), (11, "save")],
}
PHASE2_SCRIPT_P1 = {
    # trial length p+1: trials of 2 (improve), 2 (fail), 2 (fail), 3 (improve), nan after 1 epoch, 3 (fail)
    "script": [1.0, 5.0, 0.9, 5.0, 0.95, 5.0, 0.95, 5.0, 5.0, 0.7, NAN, 5.0, 5.0, 0.75],
    "lr": [0.1, 0.2, 0.2, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.4, 0.2, 0.2, 0.2],
    "reason": ["phase1-done", None, "phase2-improved", None, "phase2-second-trial", None, "phase2-halve", None, None,
               "phase2-improved", "nan-rollback", None, None, "phase2-second-trial"],
    "patience": [1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 2, 2, 2, 2],
    "events": [(1, "save"), (3, "save"), (10, "save"), (11, "restore")],
}


@pytest.mark.parametrize(("trial_length", "case"), [("p", PHASE2_SCRIPT_P), ("p+1", PHASE2_SCRIPT_P1)])
def test_phase2_exact_trajectory(trial_length, case):
    d = Drive(_pilot(patience=1, trial_length=trial_length)).run(case["script"])
    assert d.col("lr") == pytest.approx(case["lr"])
    assert d.col("reason") == case["reason"]
    assert d.col("patience") == case["patience"]
    assert d.events() == case["events"]
    rollbacks = [r for r in d.rows if r["reason"] == "nan-rollback"]
    assert all(r["reset"] for r in rollbacks)  # the pseudocode resets the optimizer


def test_phase2_rollback_can_keep_the_checkpointed_optimizer_state():
    d = Drive(_pilot(patience=1, rollback_optimizer="checkpoint")).run([1.0, NAN])
    assert d.rows[-1]["reason"] == "nan-rollback" and d.rows[-1]["reset"] is False


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("trial", [1, 2])
def test_phase2_nonfinite_at_either_trial_rolls_back(bad, trial):
    script = [1.0] + [1.5] * (trial - 1) + [bad]
    d = Drive(_pilot(patience=1)).run(script)
    last = d.rows[-1]
    assert (last["reason"], last["restore"], last["reset"], last["patience"]) == ("nan-rollback", BEST_TAG, True, 2)
    assert d.lr == (0.1,)  # 0.2 halved
    assert last["best"] == 1.0  # L* is the checkpoint's


def test_phase2_mid_trial_epochs_ask_for_no_training_set_pass():
    pilot = _pilot(patience=1, trial_length="p+1")
    d = Drive(pilot).run([1.0])  # phase 2 at p = 1: trials of 2 epochs
    asked = []
    for value in [0.9, 0.8, 0.7, 0.6]:
        asked.append(TRAIN_EVAL_LOSS in pilot.needs)
        d.run([value])
    assert asked == [False, True, False, True]
    assert _pilot(objective="val").needs == frozenset()
    cheap = _pilot(objective="train-mean")
    assert cheap.needs == {TRAIN_EVAL_LOSS}  # J(theta_0) only
    Drive(cheap)
    assert cheap.needs == frozenset()


def test_every_reason_is_declared():
    d = Drive(_pilot(patience=1, trial_length="p+1")).run(PHASE2_SCRIPT_P1["script"])
    d2 = Drive(_pilot(patience=2)).run([1.5, 1.6, NAN])
    seen = {r for r in d.col("reason") + d2.col("reason") if r is not None}
    assert seen <= set(REASONS)


# ----------------------------------------------------------------------------------------------------
# section 4: epoch counts against an oracle LR rho (the loss improves only at lr <= rho)
# ----------------------------------------------------------------------------------------------------
def _oracle_run(rho, epochs: int, *, trial_length: str, j0: float = 2.0):
    """Phase 1 at eta_0 = 0.1 (patience 1), then phase 2 against ``rho(epoch)``: an epoch at LR <= rho
    multiplies the loss by 0.9, one above it leaves the loss where it is (no improvement)."""
    pilot = _pilot(patience=1, trial_length=trial_length)
    d = Drive(pilot, j0=j0)
    loss = 1.0
    d.run([loss])
    for _ in range(epochs):
        if d.lr[0] <= rho(d.epoch + 1) * (1 + 1e-12):
            loss *= 0.9
        d.run([loss])
    return d


@pytest.mark.parametrize(("trial_length", "cycle"), [("p+1", [0.2] * 4 + [0.1] * 3), ("p", [0.2] * 2 + [0.1] * 2)])
def test_section4_constant_oracle_cycle(trial_length, cycle):
    # "trains for p+1 = 2 epochs ... another 2 epochs, then reduce LR by half ... trains at this LR
    # for 3 epochs. Effective training for AALR is 3 epochs out of the 7 epochs it spent."
    d = _oracle_run(lambda t: 0.1, 3 * len(cycle), trial_length=trial_length)
    assert d.col("lr")[1:] == pytest.approx(cycle * 3)


@pytest.mark.parametrize("trial_length", ["p+1", "p"])
def test_section4_lr_increase_costs_two_epochs_per_doubling(trial_length):
    # "For an increase in rho_t by a factor gamma, AALR will require 2 log2 gamma epochs" (prose).
    d = _oracle_run(lambda t: 1e9, 10, trial_length=trial_length)
    per_doubling = 2 if trial_length == "p+1" else 1
    expected = [0.2 * 2 ** (k // per_doubling) for k in range(10)]
    assert d.col("lr")[1:] == pytest.approx(expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("trial_length", ["p+1", "p"])
def test_section4_halving_cycles_after_rho_drops(n, trial_length):
    # Phase 2 starts at 2 * eta_0 = 0.2; rho = 0.2 / 2**n makes n LR levels fail. Each failed level costs
    # two trials, 2(p+1) epochs with p = 1, 2, 4, ... (prose), so 2^(n+1) + 2n - 2 epochs in all (the
    # paper's closed form, 2n + 2^(n+1) - 1, is one too many); the pseudocode's is 2(2^n - 1).
    rho = 0.2 / 2**n
    budget = 2 ** (n + 2) + 4 * n + 4
    d = _oracle_run(lambda t: rho, budget, trial_length=trial_length)
    lrs = d.col("lr")[1:]
    failed = 2 ** (n + 1) + 2 * n - 2 if trial_length == "p+1" else 2 * (2**n - 1)
    assert all(lr > rho for lr in lrs[:failed]) and lrs[failed] == pytest.approx(rho)
    # Patience at the good level is 2^n; its first trial improves, after p (+1) epochs.
    p = 2**n
    first_trial = p + 1 if trial_length == "p+1" else p
    assert lrs[failed : failed + first_trial] == pytest.approx([rho] * first_trial)
    improved = d.rows[1 + failed + first_trial - 1]
    assert improved["reason"] == "phase2-improved" and improved["patience"] == 1
    # The halvings: one per failed level, each after two trials of the same length.
    halves = [r for r in d.rows[1 : 1 + failed] if r["reason"] == "phase2-halve"]
    assert [r["patience"] for r in halves] == [2 ** (k + 1) for k in range(n)]


# ----------------------------------------------------------------------------------------------------
# a line-by-line transcription of Algorithm 1 as the reference
# ----------------------------------------------------------------------------------------------------
class _BudgetSpent(Exception):
    pass


def reference_aalr(script, *, j0, eta0=0.1, patience=10, extra_epoch=False, reset_best=True):
    """Algorithm 1 with its own control flow ("train for p epochs", nested ifs). ``script[t]`` is epoch
    t+1's outcome as in :class:`Drive`: a non-finite *training* loss (NaN) ends a trial at once.
    Returns the LR each epoch trained with, and (epoch, event) for every save and restore."""
    lrs, events = [], []
    t = 0

    def finite(v):
        return math.isfinite(v)

    def train(n, eta):
        nonlocal t
        value = None
        for _ in range(n):
            if t >= len(script):
                raise _BudgetSpent
            lrs.append(eta)
            value = script[t]
            t += 1
            if math.isnan(value):
                return value
        return value

    try:
        eta, best = eta0, j0  # line 1
        p, i = patience, 0  # line 3
        while i < p:  # lines 4-12
            L = train(1, eta)
            i += 1
            if L > best or not finite(L):
                eta /= 2
                events.append((t, "restore-initial"))
                i = 0
                if reset_best:
                    best = j0
            else:
                best = L
        events.append((t, "save"))  # line 13
        eta, p = 2 * eta, 1  # line 15
        while True:  # line 16 (the budget ends it)
            L = train(p + extra_epoch, eta)  # lines 17-18
            if not finite(L):  # lines 19-23
                eta /= 2
                events.append((t, "restore"))
                p *= 2
                continue
            if L < best:  # lines 24-26
                best = L
                events.append((t, "save"))
                eta, p = 2 * eta, 1
            else:
                L = train(p + extra_epoch, eta)  # lines 28-29
                if L < best:  # lines 30-32
                    best = L
                    events.append((t, "save"))
                    eta, p = 2 * eta, 1
                else:  # lines 33-38
                    eta, p = eta / 2, 2 * p
                    if not finite(L):
                        events.append((t, "restore"))
    except _BudgetSpent:
        pass
    return lrs, events


_values = st.one_of(
    st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, NAN, INF]),
    st.floats(min_value=0.05, max_value=3.0, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(
    script=st.lists(_values, min_size=1, max_size=40),
    patience=st.integers(1, 4),
    trial_length=st.sampled_from(["p", "p+1"]),
    reset_best=st.booleans(),
)
def test_matches_the_reference_transcription(script, patience, trial_length, reset_best):
    pilot = _pilot(patience=patience, trial_length=trial_length, phase1_reset_best=reset_best)
    d = Drive(pilot, j0=2.0).run(script)
    lrs, events = reference_aalr(
        script, j0=2.0, patience=patience, extra_epoch=trial_length == "p+1", reset_best=reset_best
    )
    assert d.col("lr") == lrs
    assert d.events() == events


def test_state_dict_round_trip_mid_trial_continues_identically():
    script = PHASE2_SCRIPT_P1["script"]
    straight = Drive(_pilot(patience=1, trial_length="p+1")).run(script)
    for cut in range(1, len(script)):
        first = Drive(_pilot(patience=1, trial_length="p+1")).run(script[:cut])
        fresh = _pilot(patience=1, trial_length="p+1", lr=0.7)
        fresh.load_state_dict(first.pilot.state_dict())
        first.pilot = fresh
        first.run(script[cut:])
        assert first.rows == straight.rows


def test_bad_state_and_bad_options_raise_clear_errors():
    pilot = _pilot()
    with pytest.raises(ValueError, match="format 99"):
        pilot.load_state_dict({**pilot.state_dict(), "format": 99})
    with pytest.raises(ValueError, match="unknown keys"):
        pilot.load_state_dict({**pilot.state_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"patience of method 'aalr' must be an integer >= 1"):
        _pilot(patience=0)
    with pytest.raises(ValueError, match=r"trial_length of method 'aalr' must be one of \['p', 'p\+1'\]"):
        _pilot(trial_length="prose")
    with pytest.raises(ValueError, match=r"restore_best of method 'aalr' must be True or False"):
        _pilot(restore_best="yes")
    with pytest.raises(ValueError, match="finite loss of the initial model"):
        Drive(_pilot(), j0=NAN)
    with pytest.raises(RuntimeError, match="before on_train_begin"):
        _pilot().on_epoch_end(EpochSignals(1, 1, (0.1,), 1.0, 1.0, 0.5))


# ----------------------------------------------------------------------------------------------------
# inside the real loop
# ----------------------------------------------------------------------------------------------------
class ScriptedJ(AALR):
    """AALR whose J is scripted per epoch (the training itself is real): a way to force each branch."""

    def __init__(self, optimizer, script, **options):
        super().__init__(optimizer, **options)
        self.script = dict(script)

    def _loss(self, signals):
        real = super()._loss(signals)
        return real if real is None else self.script.get(signals.epoch, real)  # only where J was measured


def _trainer(pilot_factory, *, epochs: int, lr: float = 0.1, adam: bool = False, dropout: bool = False) -> Trainer:
    task = TinyTask()
    model = task.model()
    if dropout:  # a model that draws from the global RNG every step
        model = nn.Sequential(model.body, nn.Dropout(0.2), model.head)
    opt = torch.optim.Adam(model.parameters(), lr=lr) if adam else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trainer(model, task.train, task.val, method=pilot_factory(opt), epochs=epochs, progress=False)


def _snapshot(trainer: Trainer) -> dict:
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "optim": {k: v["momentum_buffer"].clone() for k, v in enumerate(trainer.optimizer.state.values())},
        "rng": torch.get_rng_state().clone(),
    }


@pytest.mark.parametrize("rollback_optimizer", ["reset", "checkpoint"])
def test_rollback_restores_weights_optimizer_and_rng_bit_for_bit(rollback_optimizer):
    # patience 1: epoch 1 ends phase 1 (checkpoint); epoch 2 fails its trial, J = inf at epoch 3 (the
    # second trial) forces a nan-rollback to epoch 1's checkpoint.
    script = {1: 0.03, 2: 50.0, 3: INF}
    trainer = _trainer(lambda opt: ScriptedJ(opt, script, patience=1, rollback_optimizer=rollback_optimizer),
                       epochs=5, dropout=True)  # fmt: skip
    trainer.run(until_epoch=1)
    saved = _snapshot(trainer)
    trainer.run(until_epoch=2)
    moved = _snapshot(trainer)
    assert not torch.equal(moved["rng"], saved["rng"]) and not torch.equal(moved["params"][0], saved["params"][0])
    trainer.run(until_epoch=3)
    assert trainer.history.decisions[-1].reason == "nan-rollback"
    after = _snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(after["params"], saved["params"]))
    assert torch.equal(after["rng"], saved["rng"])
    if rollback_optimizer == "checkpoint":
        assert after["optim"].keys() == saved["optim"].keys()
        assert all(torch.equal(after["optim"][k], saved["optim"][k]) for k in saved["optim"])
    else:
        assert len(trainer.optimizer.state) == 0
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1  # 0.2 halved
    trainer.run()
    assert trainer.history.status == "completed"
    assert [e.epoch for e in trainer.history.epochs] == [1, 2, 3, 4, 5]  # rolled-back epochs count


def test_real_divergence_is_rolled_back_and_the_run_recovers():
    # lr 1e6: phase 1's first epochs end in a NaN loss (the loop stops them early), then in huge finite
    # losses, each restarting from the initial model at half the LR, until an LR near 0.5 survives.
    trainer = _trainer(lambda opt: AALR(opt, patience=2), epochs=30, lr=1e6)
    initial = trainer.evaluate()[0]
    hist = trainer.run()
    reasons = [d.reason for d in hist.decisions]
    assert hist.status == "completed"
    assert reasons[1] == "phase1-nan" and "phase1-done" in reasons
    assert math.isnan(hist.epochs[0].train_loss)
    done = reasons.index("phase1-done")
    halvings = reasons[:done].count("phase1-nan") + reasons[:done].count("phase1-worse")
    assert hist.decisions[done].lr == [pytest.approx(2 * 1e6 / 2**halvings)]
    final = hist.final.get("val_loss", hist.epochs[-1].val_loss)
    assert math.isfinite(final) and final < initial


def test_phase1_restart_reloads_the_initial_model():
    trainer = _trainer(lambda opt: ScriptedJ(opt, {2: INF}, patience=3), epochs=3)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run(until_epoch=2)
    assert trainer.history.decisions[-1].reason == "phase1-nan"
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial))
    assert len(trainer.optimizer.state) == 0 and trainer.optimizer.param_groups[0]["lr"] == 0.05


def test_dynamic_needs_skip_passes_and_change_nothing():
    class EveryEpoch(AALR):
        needs = frozenset({TRAIN_EVAL_LOSS})  # the naive pilot: a training-set pass after every epoch

    def run(cls):
        trainer = _trainer(lambda opt: cls(opt, patience=1, trial_length="p+1"), epochs=8)
        passes = []
        evaluate = trainer.evaluate

        def counting(loader=None, **kw):
            passes.append(loader is trainer.train_loader)
            return evaluate(loader, **kw)

        trainer.evaluate = counting
        hist = trainer.run()
        return hist, sum(passes), trainer

    lazy, lazy_passes, t1 = run(AALR)
    eager, eager_passes, t2 = run(EveryEpoch)
    assert [e.lr for e in lazy.epochs] == [e.lr for e in eager.epochs]
    assert [e.train_loss for e in lazy.epochs] == [e.train_loss for e in eager.epochs]
    assert [(d.reason, d.lr) for d in lazy.decisions] == [(d.reason, d.lr) for d in eager.decisions]
    assert all(torch.equal(p, q) for p, q in zip(t1.model.parameters(), t2.model.parameters()))
    # 8 epochs: J(theta_0), epoch 1 (phase 1), then trials of 2 epochs at p = 1 (or longer): <= 1 + 1 + 4.
    assert eager_passes == 9 and lazy_passes < eager_passes
    compared = [e.epoch for e in lazy.epochs if TRAIN_EVAL_LOSS in e.extra]
    assert compared[:3] == [1, 3, 5] and lazy_passes == 1 + len(compared)


def test_resume_mid_trial_through_the_trainer_continues_identically():
    def make():
        return _trainer(lambda opt: AALR(opt, patience=1, trial_length="p+1"), epochs=7)

    straight = make()
    straight.run()
    first = make()
    first.run(until_epoch=2)  # the first phase-2 trial is half done
    assert first.pilot.trial_epochs == 1
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    resumed.run()
    a, b = straight.history, resumed.history
    assert [e.lr for e in a.epochs] == [e.lr for e in b.epochs]
    assert [(d.epoch, d.reason, d.lr) for d in a.decisions] == [(d.epoch, d.reason, d.lr) for d in b.decisions]
    assert a.final == b.final
    assert all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), resumed.model.parameters()))


def test_restore_best_at_the_end_records_the_last_and_the_best_model():
    # Phase 1 done at epoch 1 (checkpoint); later trials scripted not to improve: the model moves on.
    script = {1: 0.03, 2: 50.0, 3: 50.0, 4: 50.0}
    trainer = _trainer(lambda opt: ScriptedJ(opt, script, patience=1), epochs=4)
    trainer.run(until_epoch=1)
    saved = [p.detach().clone() for p in trainer.model.parameters()]
    hist = trainer.run()
    assert [d.reason for d in hist.decisions][-3:] == ["phase2-second-trial", "phase2-halve", "restore-best"]
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), saved))
    assert hist.final["reason"] == "restore-best"
    assert hist.final["val_metric"] == hist.epochs[0].val_metric  # the checkpoint is epoch 1's model
    assert hist.final_val_metric == hist.final["val_metric"]  # ... and the summary's final is it
    assert math.isfinite(hist.epochs[-1].val_metric)  # the last model's metrics stay in the epochs

    kept = _trainer(lambda opt: ScriptedJ(opt, script, patience=1, restore_best=False), epochs=4).run()
    assert kept.final == {} and [d.reason for d in kept.decisions][-1] == "phase2-halve"


@pytest.mark.parametrize(("last_j", "budget_known", "reason"), [
    (0.01, True, "keep-last"), (60.0, True, "restore-best"), (0.01, False, "restore-best"),
])  # fmt: skip
def test_a_budget_ending_mid_trial_keeps_the_model_in_hand_only_if_its_j_is_lower(last_j, budget_known, reason):
    # p+1: epoch 1 ends phase 1, trials 2-3 and 4-5 fail (halve, p = 2), epochs 6-8 would be the next
    # trial: the budget of 7 ends in its middle. Knowing the budget, AALR measures J after epoch 7.
    script = {1: 0.03, 3: 50.0, 5: 50.0, 7: last_j}
    epochs = 7 if budget_known else None
    trainer = _trainer(lambda opt: ScriptedJ(opt, script, patience=1, trial_length="p+1", epochs=epochs), epochs=7)
    hist = trainer.run()
    assert [d.reason for d in hist.decisions][-2:] == ["phase2-halve", reason]
    assert (TRAIN_EVAL_LOSS in hist.epochs[-1].extra) == budget_known
    if reason == "keep-last":
        assert hist.final == {} and hist.decisions[-1].info == {"loss": 0.01, "best_loss": 0.03}
    else:
        assert hist.final["reason"] == "restore-best" and hist.final["val_metric"] == hist.epochs[0].val_metric


def test_a_budget_ending_in_phase1_returns_its_lowest_loss_model():
    # patience 4, budget 5: J 0.5, 0.4 (snapshots), 0.6 (worse: restart from theta_0), 0.7, 0.65.
    script = {1: 0.5, 2: 0.4, 3: 0.6, 4: 0.7, 5: 0.65}
    trainer = _trainer(lambda opt: ScriptedJ(opt, script, patience=4), epochs=5)
    trainer.run(until_epoch=2)
    saved = [p.detach().clone() for p in trainer.model.parameters()]
    hist = trainer.run()
    assert [d.reason for d in hist.decisions] == ["aalr-start", "phase1-improved", "phase1-improved", "phase1-worse",
                                                  "phase1-improved", "phase1-improved", "restore-best"]  # fmt: skip
    assert [d.action for d in hist.decisions][1:3] == ["checkpoint", "checkpoint"]
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), saved))
    assert hist.final["val_metric"] == hist.epochs[1].val_metric
    faithful = _trainer(lambda opt: ScriptedJ(opt, script, patience=4, restore_best=False), epochs=5).run()
    assert faithful.final == {} and {d.action for d in faithful.decisions[1:]} == {"keep", "rollback"}
    assert faithful.lr_trajectory() == hist.lr_trajectory()


def test_no_restore_when_the_last_trial_saved_the_model():
    script = {1: 0.03, 2: 0.02, 3: 0.01}
    hist = _trainer(lambda opt: ScriptedJ(opt, script, patience=1), epochs=3).run()
    assert [d.reason for d in hist.decisions] == ["aalr-start", "phase1-done", "phase2-improved", "phase2-improved"]
    assert hist.final == {}


def test_works_with_adam_and_resets_its_state_on_a_restart():
    trainer = _trainer(lambda opt: ScriptedJ(opt, {2: INF}, patience=2), epochs=6, lr=0.01, adam=True)
    trainer.run(until_epoch=1)
    assert trainer.optimizer.state  # Adam's moments exist after an epoch
    trainer.run(until_epoch=2)
    assert trainer.history.decisions[-1].reason == "phase1-nan" and len(trainer.optimizer.state) == 0
    hist = trainer.run()
    assert hist.status == "completed"
    assert hist.lr_trajectory()[:5] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.01])
    assert hist.epochs[-1].val_loss < trainer.history.info["initial"]["val_loss"]


def test_registry_builds_sgd_or_adam_with_their_default_lr():
    info = get_method("aalr")
    assert "seed-method" in info.tags and info.lr_granularity == "epoch" and info.handles_nonfinite
    task = TinyTask()
    sgd = Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False)
    # The default form cools its last 20 % of steps down around the paper's pilot; cooldown=0 is the paper's.
    assert isinstance(sgd.optimizer, torch.optim.SGD) and isinstance(sgd.pilot, Cooldown)
    assert isinstance(sgd.pilot.inner, AALR) and sgd.pilot.fraction == 0.2
    paper = Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False,
                    method_options={"cooldown": 0.0})  # fmt: skip
    assert isinstance(paper.pilot, AALR)
    assert sgd.optimizer.param_groups[0]["lr"] == 0.1 and sgd.optimizer.param_groups[0]["momentum"] == 0.9
    adam = Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False,
                   method_options={"optimizer": "adam"})  # fmt: skip
    assert isinstance(adam.optimizer, torch.optim.Adam) and adam.optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"option patience of method 'aalr'"):
        Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False,
                method_options={"patience": 2.5})  # fmt: skip
    with pytest.raises(ValueError, match=r"option momentum of method 'aalr' must be in \[0, 1\)"):
        Trainer(task.model(), task.train, task.val, method="aalr", epochs=1, progress=False,
                method_options={"momentum": 1.0})  # fmt: skip


def test_regression_task_with_every_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    # The validation targets are shifted (x 1.1), so objective "val" walks its own way.
    train, val = TensorLoader(x[:192], y[:192], 32, seed=0), TensorLoader(x[192:], 1.1 * y[192:], 64, shuffle=False)
    # The exact walk of Algorithm 1 (patience 2, trial length p): one improving phase-1 epoch at 0.01,
    # then doubling after every improving trial and halving after two failed ones. train-mean's running
    # mean of a decreasing loss is larger than the end-of-epoch loss, so it accepts larger LRs.
    walks = {
        "train-eval": ([0.01, 0.01, 0.02, 0.02, 0.01, 0.01, 0.02, 0.04, 0.04, 0.08],
                       ["aalr-start", "phase1-improved", "phase1-done", "phase2-second-trial", "phase2-halve",
                        "phase2-improved", "phase2-improved", "phase2-second-trial", "phase2-improved",
                        "phase2-second-trial", "restore-best"]),
        "train-mean": ([0.01, 0.01, 0.02, 0.04, 0.04, 0.08, 0.16, 0.32, 0.32, 0.16],
                       ["aalr-start", "phase1-improved", "phase1-done", "phase2-improved", "phase2-second-trial",
                        "phase2-improved", "phase2-improved", "phase2-improved", "phase2-second-trial",
                        "phase2-halve", "restore-best"]),
    }
    walks["val"] = ([0.01, 0.01, 0.02, 0.02, 0.01, 0.01, 0.02, 0.04, 0.08, 0.08],
                    ["aalr-start", "phase1-improved", "phase1-done", "phase2-second-trial", "phase2-halve",
                     "phase2-improved", "phase2-improved", "phase2-improved", "phase2-second-trial",
                     "phase2-improved"])
    for objective in ("train-eval", "train-mean", "val"):
        torch.manual_seed(0)
        # "val" decides from a decision split; given here as the shifted set, so its walk is its own.
        split = {"hyper_loader": val} if objective == "val" else {}
        hist = lrpilot.fit(nn.Linear(5, 1), train, val, method="aalr", loss_fn=nn.MSELoss(), epochs=10,
                           progress=False, patience=2, objective=objective, lr=0.01, cooldown=0.0, **split)  # fmt: skip
        assert hist.status == "completed"
        assert hist.metric_name == "loss"
        lrs, reasons = walks[objective]
        assert hist.lr_trajectory() == pytest.approx(lrs, rel=1e-12), objective
        assert [d.reason for d in hist.decisions] == reasons, objective
        in_hand = hist.final.get("val_loss", hist.epochs[-1].val_loss)
        assert in_hand < 0.1 * hist.info["initial"]["val_loss"], objective
        assert set(reasons) <= set(REASONS)


@pytest.mark.slow
@pytest.mark.parametrize(("lr", "floor"), [(None, 0.72), (10.0, 0.60)])
def test_mnist1d_mlp_reaches_an_accuracy_and_recovers_from_a_diverging_lr(lr, floor):
    # docs/methods/aalr.md: 30 epochs, seed 0, J = train-mean (the default): best 0.782, final 0.760 at the
    # default LR (0.734 with the old train-eval J); 0.669 from lr 10 with train-eval (SGD at
    # lr 10 stays at chance, 0.106).
    from lrpilot.bench.tasks import run_task

    options = {} if lr is None else {"lr": lr}
    record = run_task("mnist1d-mlp", "aalr", epochs=30, seed=0, progress=False, method_options=options)
    assert record["summary"]["status"] == "completed"
    assert record["summary"]["best_val_metric"] >= floor and record["summary"]["final_val_metric"] >= floor
    reasons = [d["reason"] for d in record["decisions"]]
    assert "phase1-done" in reasons
    if lr is not None:
        assert reasons[1:4] == ["phase1-worse"] * 3  # 10 -> 5 -> 2.5 -> 1.25: each diverges at once
