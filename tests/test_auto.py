"""``auto``: the sweep's rule on scripted loss sequences, the schedule's closed form, and the method as a
whole (the sweep leaves the run untouched, decisions never read the scored split, bad options)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpilot
from lrpilot.core.data import TensorLoader
from lrpilot.pilots.auto import (
    WarmupCosine,
    centred,
    choose_lr,
    run_sweep,
    smoothed,
    sweep_lrs,
    warmup_cosine,
)
from lrpilot.pilots.auto.register import DEFAULTS as AUTO_DEFAULTS
from lrpilot.pilots.auto.register import OPTIMIZERS
from lrpilot.pilots.auto.sweep import valley_edge


# ----------------------------------------------------------------------------------------------------
# the sweep (pure)
# ----------------------------------------------------------------------------------------------------
def test_ramp_is_geometric_from_min_to_max():
    lrs = sweep_lrs(1e-3, 10.0, 5)
    assert lrs == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0], rel=1e-12)


def test_smoothing_is_the_bias_corrected_ema():
    # beta 0.5: avg 0.5 -> 0.5 / 0.5 = 1; avg 0.5*0.5 + 0.5*2 = 1.25 -> 1.25 / 0.75
    assert smoothed([1.0, 2.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75])
    assert smoothed([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # a constant stays constant


def test_choose_lr_takes_the_first_minimum_divided():
    lrs = [0.01, 0.1, 1.0, 10.0]
    assert choose_lr(lrs, [2.0, 1.0, 1.0, 5.0], divisor=4.0, window=0) == (0.025, 0.1)
    # window 1: centred means 1.5, 4/3, 7/3, 3: still LR 0.1; a causal mean would have said 1.0 (lag)
    assert choose_lr(lrs, [2.0, 1.0, 1.0, 5.0], divisor=4.0, window=1) == (0.025, 0.1)
    with pytest.raises(ValueError, match="one LR per loss"):
        choose_lr([0.1], [1.0, 2.0], divisor=3.0, window=0)


def test_the_valley_edge_is_the_last_point_of_the_valley_around_the_minimum():
    # start 3, minimum 1 at index 2: f = 0.25 -> threshold 1 + 0.25 * 2 = 1.5
    curve = [3.0, 2.0, 1.0, 1.2, 1.5, 1.6, 1.0, 4.0]
    assert valley_edge(curve, 0.25) == 4  # 1.5 is in, 1.6 leaves: the later 1.0 is another valley
    assert valley_edge(curve, 0.05) == 2  # threshold 1.1: the minimum is its own edge
    assert valley_edge(curve, 0.5) == 6  # threshold 2: up to the second 1.0, 4.0 leaves
    assert valley_edge([3.0, 1.0, 1.2], 0.25) is None  # the ramp never climbed out: no edge seen


def test_the_valley_also_ends_where_the_loss_rises_half_again_above_its_floor():
    # a batch-normalised net's ramp: start 3.7, floor 0.74, a bump to 1.16, bounded again, then the rise
    curve = [3.7, 0.74, 0.96, 1.16, 0.94, 1.09, 2.03, 2.9]
    # f = 0.2 alone: threshold 0.74 + 0.2 * 2.96 = 1.332: the bump is "inside", the edge runs to 1.09
    assert valley_edge(curve, 0.2) == 5
    # rise 0.5: threshold min(1.332, 0.74 * 1.5 = 1.11): the bump to 1.16 leaves the valley
    assert valley_edge(curve, 0.2, 0.5) == 2
    # where the start's bound is the tighter one, rise changes nothing (an MLP's ramp from ln 10)
    flat = [2.3, 1.7, 1.72, 1.75, 1.8, 2.6]
    assert valley_edge(flat, 0.2, 0.5) == valley_edge(flat, 0.2) == 4


def test_the_edge_is_capped_at_an_octave_above_the_minimum():
    lrs = [0.01 * 2 ** (i / 2) for i in range(10)]  # half octaves from 0.01
    losses = [2.3, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05, 3.0, 4.0, 5.0]  # minimum at index 1, edge at 6
    assert choose_lr(lrs, losses, divisor=2.0, window=0, pick="edge")[1] == pytest.approx(lrs[6])
    # cap 2: index 3 is exactly 2x the minimum (kept), index 4 is 2.83x (not)
    lr, point = choose_lr(lrs, losses, divisor=2.0, window=0, pick="edge", edge_cap=2.0)
    assert point == pytest.approx(lrs[3]) and lr == pytest.approx(lrs[3] / 2)
    # an edge already inside the cap is left alone
    assert choose_lr(lrs, losses, divisor=2.0, window=0, pick="edge", edge_cap=100.0)[1] == pytest.approx(lrs[6])


def test_edge_pick_takes_the_wall_of_a_flat_valley_not_its_wandering_floor():
    lrs = [0.01 * 2 ** i for i in range(8)]  # 0.01 .. 1.28
    # a flat floor whose minimum (0.999 at 0.04) is noise; the wall rises at 0.64
    losses = [2.3, 1.5, 0.999, 1.0, 1.001, 1.0, 2.4, 5.0]
    assert choose_lr(lrs, losses, divisor=2.0, window=0) == (0.02, 0.04)
    # f = 0.2: threshold 0.999 + 0.2 * 1.301 = 1.2592; the last floor point is 0.32
    assert choose_lr(lrs, losses, divisor=2.0, window=0, pick="edge") == (0.16, 0.32)
    # the ramp never left the valley: the minimum, as pick="minimum" would choose
    assert choose_lr(lrs[:6], losses[:6], divisor=2.0, window=0, pick="edge") == (0.02, 0.04)
    with pytest.raises(ValueError, match="pick"):
        choose_lr(lrs, losses, divisor=2.0, window=0, pick="median")


def test_sweep_records_the_edge_beside_the_minimum():
    lrs = [0.01 * 2 ** i for i in range(8)]
    losses = dict(zip(lrs, [2.3, 1.5, 0.999, 1.0, 1.001, 1.0, 2.4, 5.0]))
    step = lambda lr: losses[min(losses, key=lambda k: abs(k - lr))]
    result = run_sweep(step, min_lr=0.01, max_lr=1.28, steps=8, divisor=2.0, beta=0.0, window=0,
                       divergence_factor=100.0, pick="edge")
    assert result.lr_at_min == pytest.approx(0.04) and result.lr_at_edge == pytest.approx(0.32)
    assert result.lr == pytest.approx(0.16) and result.to_dict()["lr_at_edge"] == pytest.approx(0.32)
    plain = run_sweep(step, min_lr=0.01, max_lr=1.28, steps=8, divisor=2.0, beta=0.0, window=0,
                      divergence_factor=100.0)
    assert plain.lr_at_edge is None and plain.lr == pytest.approx(0.02)
    # an edge at the minimum itself (f small: the next point already leaves) is an edge seen, not None
    tight = run_sweep(step, min_lr=0.01, max_lr=1.28, steps=8, divisor=2.0, beta=0.0, window=0,
                      divergence_factor=100.0, pick="edge", edge_fraction=1e-4)
    assert tight.lr_at_edge == pytest.approx(0.04) == tight.lr_at_min and tight.lr == pytest.approx(0.02)


RECORDED_SWEEPS = json.loads((Path(__file__).parent / "fixtures" / "auto_sweeps.json").read_text())


@pytest.mark.parametrize(("sweep", "round_1", "round_2", "round_3", "round_4"), [
    # the two failed confirmations: a batch-normalised ResNet-20's ramp has no wall after its minimum
    ("fmnist-resnet20 seed 1", 0.0274, 1.4837, 0.0548, 0.0518),
    ("fmnist-resnet20 seed 3", 0.0274, 0.2936, 0.2771, 0.0518),
    # the wandering minimum the edge was made for, and the held-out task it cost
    ("mnist1d-mlp seed 101", 0.0616, 0.3493, 0.3493, 0.1164),
    ("fmnist-mlp seed 0", 0.0581, 0.1467, 0.1467, 0.1098),
])
def test_recorded_sweeps_give_each_rounds_pick(sweep, round_1, round_2, round_3, round_4):
    """Sweeps recorded by the bench (training losses to 6 decimals, docs/methods/auto.md rounds 1-4): each
    round's rule picks the LR it picked there, and ``auto``'s registered defaults (round 4) replay to round
    4's pick, within 2x round 1's."""
    rec = RECORDED_SWEEPS[sweep]
    lrs = sweep_lrs(rec["min_lr"], rec["max_lr"], rec["steps"])[: len(rec["losses"])]
    pick = functools.partial(choose_lr, lrs, rec["losses"], divisor=2.0, window=10)
    assert pick()[0] == pytest.approx(round_1, abs=1e-4)
    assert pick(pick="edge")[0] == pytest.approx(round_2, abs=1e-4)
    assert pick(pick="edge", edge_rise=0.5)[0] == pytest.approx(round_3, abs=1e-4)
    assert pick(pick="edge", edge_rise=0.5, edge_cap=2.0)[0] == pytest.approx(round_4, abs=1e-4)
    # replayed through the sweep with its default stopping rule, the ramp ends where the bench's ended
    d = {**AUTO_DEFAULTS, **OPTIMIZERS["sgd"]}  # the SGD sweep (the race's incumbent since round 7)
    default = run_sweep(_replay(rec["losses"]), min_lr=d["sweep_min_lr"], max_lr=d["sweep_max_lr"],
                        steps=d["sweep_steps"], divisor=d["divisor"], window=d["window"], pick=d["pick"],
                        edge_fraction=d["edge_fraction"], edge_rise=d["edge_rise"], edge_cap=d["edge_cap"])
    assert default.steps == len(rec["losses"])
    assert default.lr == pytest.approx(round_4, abs=1e-4) and default.lr <= 2 * round_1


def _replay(losses):
    """A ``step(lr)`` that returns the recorded losses in order, then a non-finite one (the ramp's end)."""
    it = iter(losses)
    return lambda lr: next(it, math.inf)


def test_ema_selection_is_the_causal_average_with_beta_0_98():
    losses = [abs(i - 20) + 1.0 for i in range(41)]
    lrs = [float(i) for i in range(41)]
    ema = smoothed(losses, 0.98)
    lagged = min(range(41), key=ema.__getitem__)
    assert lagged > 20
    assert choose_lr(lrs, losses, divisor=2.0, window=5, smoothing="ema") == (lagged / 2.0, float(lagged))
    assert choose_lr(lrs, losses, divisor=2.0, window=5) == (10.0, 20.0)


def test_centred_average_has_no_lag():
    assert centred([1.0, 2.0, 3.0, 10.0], 1) == pytest.approx([1.5, 2.0, 5.0, 6.5])
    ramp = [abs(i - 20) for i in range(41)]  # a V whose bottom is at 20
    assert min(range(41), key=centred(ramp, 5).__getitem__) == 20
    assert min(range(41), key=smoothed(ramp, 0.9).__getitem__) > 20  # the causal EMA's minimum lags


def _bowl(calls: list[float]):
    """A scripted network: the loss of a step at LR ``lr`` is ``(log10(lr) + 1)^2 + 1``, lowest at 0.1."""

    def step(lr: float) -> float:
        calls.append(lr)
        return (math.log10(lr) + 1.0) ** 2 + 1.0

    return step


def test_sweep_stops_once_diverging_and_chooses_the_minimum_over_divisor():
    calls: list[float] = []
    result = run_sweep(_bowl(calls), min_lr=1e-4, max_lr=10.0, steps=11, divisor=3.0, beta=0.0, window=0,
                       divergence_factor=4.0)
    ramp = sweep_lrs(1e-4, 10.0, 11)  # half decades: 1e-4, 3.16e-4, ..., 10
    # losses: 10, 7.25, 5, 3.25, 2, 1.25, 1 (lr 0.1), 1.25, 2, 3.25, 5: 5 > 4 * 1 stops at the last
    assert calls == pytest.approx(ramp)
    assert result.stopped == "diverging" and result.steps == 11
    assert result.lr_at_min == pytest.approx(0.1) and result.lr == pytest.approx(0.1 / 3)
    calls.clear()
    short = run_sweep(_bowl(calls), min_lr=1e-4, max_lr=10.0, steps=11, divisor=3.0, beta=0.0, window=0,
                      divergence_factor=2.0)
    assert short.stopped == "diverging" and short.steps == 9  # 2 > 2 * 1 is false, 3.25 > 2 is the stop
    assert short.lr_at_min == pytest.approx(0.1)


def test_a_nonfinite_step_ends_the_sweep_and_is_not_part_of_the_curve():
    def step(lr: float) -> float:
        return math.nan if lr > 0.05 else 2.0 - lr

    result = run_sweep(step, min_lr=1e-3, max_lr=1.0, steps=4, divisor=2.0, beta=0.0, window=0)
    assert result.stopped == "nonfinite" and result.lrs == pytest.approx([1e-3, 1e-2])
    assert result.lr == pytest.approx(1e-2 / 2)
    first = run_sweep(lambda lr: math.inf, min_lr=1e-3, max_lr=1.0, steps=4, divisor=2.0)
    assert first.stopped == "nonfinite" and first.steps == 0 and first.lr == pytest.approx(5e-4)


@pytest.mark.parametrize(("option", "value", "match"), [
    ("min_lr", 0.0, "min_lr"), ("max_lr", 1e-5, "max_lr"), ("steps", 1, "steps"), ("divisor", 0.5, "divisor"),
    ("beta", 1.0, "beta"), ("divergence_factor", 1.0, "divergence_factor"), ("window", -1, "window"),
    ("pick", "median", "pick"), ("edge_fraction", 0.0, "edge_fraction"), ("edge_fraction", 1.5, "edge_fraction"),
    ("edge_rise", 0.0, "edge_rise"), ("edge_cap", 0.5, "edge_cap"),
])
def test_bad_sweep_options_name_themselves(option, value, match):
    with pytest.raises(ValueError, match=match):
        run_sweep(lambda lr: 1.0, **{option: value})


# ----------------------------------------------------------------------------------------------------
# the schedule
# ----------------------------------------------------------------------------------------------------
def test_warmup_cosine_closed_form():
    f = warmup_cosine(10, 2)
    assert [f(t) for t in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    g = warmup_cosine(4)
    assert [g(t) for t in range(5)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                      (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(4, 4)


def test_warmup_cosine_pilot_sets_every_groups_lr_and_resumes():
    w = nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [w.weight], "lr": 0.2}, {"params": [w.bias], "lr": 0.4}], lr=0.1)
    pilot = WarmupCosine(opt, total_steps=4, warmup_steps=1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.4])  # (0 + 1) / 1
    pilot.on_step_end(None)
    pilot.on_step_end(None)  # t = 2: half-way down the cosine of 3 steps: (1 + cos(pi/3)) / 2 = 0.75
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.15, 0.3])
    again = WarmupCosine(torch.optim.SGD([{"params": [w.weight]}, {"params": [w.bias]}], lr=9.0), total_steps=4,
                         warmup_steps=1)
    again.load_state_dict(pilot.state_dict())
    again.on_step_end(None)
    pilot.on_step_end(None)
    assert [g["lr"] for g in again.optimizer.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


# ----------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------
def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(256, 10, generator=g), torch.randn(96, 10, generator=g)
    return x, x[:, :3].argmax(1), xv, xv[:, :3].argmax(1)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _fit(val_labels=None, **options):
    """A run of ``auto`` on a small task; the SGD step unless ``optimizer`` is given (its mechanics are what
    most tests here pin down; the race's tests below ask for it)."""
    options.setdefault("optimizer", "sgd")
    x, y, xv, yv = _data()
    model = _net()
    hist = lrpilot.fit(model, TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv if val_labels is None else val_labels, 96),
                       method="auto", epochs=4, seed=0, progress=False, **options)
    return model, hist


def test_the_sweep_leaves_the_run_as_if_its_lr_had_been_given():
    """The sweep trains a copy with the RNG preserved: the run equals one given the sweep's LR."""
    model, hist = _fit(sweep_steps=40)
    chosen = hist.info["method"]["lr"]
    assert hist.info["method"]["sweep"]["steps"] >= 2 and hist.info["method"]["search"]["total_steps"] >= 2
    again_model, again = _fit(lr=chosen)
    assert "sweep" not in again.info["method"]
    assert [e.train_loss for e in hist.epochs] == [e.train_loss for e in again.epochs]
    for a, b in zip(model.parameters(), again_model.parameters()):
        assert torch.equal(a, b)


def test_the_sweep_ignores_weight_decay_which_only_the_run_applies():
    """The sweep ramps plain momentum SGD: its curve, hence the LR, is the same with any weight decay;
    the run then decays (its weights differ)."""
    plain_model, plain = _fit(sweep_steps=40)
    decayed_model, decayed = _fit(sweep_steps=40, weight_decay=0.05)
    assert decayed.info["method"]["sweep"]["losses"] == plain.info["method"]["sweep"]["losses"]
    assert decayed.info["method"]["lr"] == plain.info["method"]["lr"]
    assert not torch.equal(next(decayed_model.parameters()), next(plain_model.parameters()))


def test_decisions_never_read_the_scored_split():
    """Scrambled validation labels change the scores, never the LRs or the weights."""
    model, hist = _fit(sweep_steps=40)
    scrambled_model, scrambled = _fit(val_labels=torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(5)),
                                      sweep_steps=40)
    assert hist.info["decision_split"] == {"source": "none"}
    assert [e.lr for e in hist.epochs] == [e.lr for e in scrambled.epochs]
    assert [e.val_metric for e in hist.epochs] != [e.val_metric for e in scrambled.epochs]
    for a, b in zip(model.parameters(), scrambled_model.parameters()):
        assert torch.equal(a, b)


def test_the_safety_net_rolls_back_a_too_large_lr():
    _, hist = _fit(lr=50.0)
    reasons = [d.reason for d in hist.decisions]
    assert "safety-net-rollback" in reasons and hist.status == "completed"
    _, bare = _fit(lr=50.0, rollback=False)
    assert "safety-net-rollback" not in [d.reason for d in bare.decisions]


def test_cosine_anneals_to_zero_over_the_budget():
    """The per-step LR trajectory is lr * (1 + cos(pi t / T)) / 2 exactly, T = 4 epochs x 8 steps."""
    _, hist = _fit(lr=0.2, schedule="cosine")
    assert [step for step, _ in hist.step_lr] == list(range(33))
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * t / 32)) for t in range(33)]
    assert [lrs[0] for _, lrs in hist.step_lr] == pytest.approx(expected, abs=1e-15)
    assert [e.lr[0] for e in hist.epochs] == pytest.approx(expected[8::8], abs=1e-15)  # each epoch's last LR


def _lr_of_each_step(hist, steps: int) -> list[float]:
    """The first group's LR of steps 1..steps from ``step_lr``'s run-length entries (the LR after step s)."""
    entries = {step: lrs[0] for step, lrs in hist.step_lr}
    lrs, current = [], None
    for k in range(1, steps + 1):
        current = entries.get(k - 1, current)
        lrs.append(current)
    return lrs


def test_wsd_holds_the_lr_then_cools_the_last_fifth_down_linearly():
    """schedule="wsd": T = 32 steps, C = ceil(0.2 T) = 7; step k (1-based) runs at lr * m_k with
    m_k = 1 for k <= 25 and (T - k + 1) / (C + 1) after; the weights are plain SGD's with that LR."""
    _, hist = _fit(lr=0.2)  # the default schedule (round 5)
    assert AUTO_DEFAULTS["schedule"] == "wsd" and AUTO_DEFAULTS["cooldown"] == 0.2
    m = [1.0 if k <= 25 else (32 - k + 1) / 8 for k in range(1, 33)]
    assert _lr_of_each_step(hist, 32) == pytest.approx([0.2 * v for v in m], abs=1e-15)

    model, _ = _fit(lr=0.2, schedule="wsd", rollback=False)  # the reference: SGD driven by m_k by hand
    ref = _by_hand(lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=5e-4), 0.2, m)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # the LR path of the cooldown: exact


def _by_hand(make, lr: float, multipliers: list[float]) -> nn.Module:
    """``_fit``'s network and batches trained by a plain loop: torch optimizer ``make(params)``, step k at
    ``lr * multipliers[k - 1]``."""
    x, y, _, _ = _data()
    ref = _net()
    opt = make(ref.parameters())
    torch.manual_seed(0)
    loader = TensorLoader(x, y, 32, seed=0)
    k = 0
    for epoch in range(4):
        loader.set_epoch(epoch)  # as the loop does
        for xb, yb in loader:
            k += 1
            opt.param_groups[0]["lr"] = lr * multipliers[k - 1]
            opt.zero_grad()
            nn.functional.cross_entropy(ref(xb), yb).backward()
            opt.step()
    return ref


def test_adamw_is_torchs_adamw_on_the_same_schedule():
    """optimizer="adamw": the run is torch's AdamW (beta_1 = momentum, beta_2 = 0.999, decoupled decay
    0.05 by default) at lr * m_k, bit for bit; its sweep ramps Adam over 1e-6..1 without decay."""
    model, hist = _fit(lr=0.002, optimizer="adamw", rollback=False)
    m = [1.0 if k <= 25 else (32 - k + 1) / 8 for k in range(1, 33)]
    assert _lr_of_each_step(hist, 32) == pytest.approx([0.002 * v for v in m], abs=1e-15)
    ref = _by_hand(lambda ps: torch.optim.AdamW(ps, lr=0.002, betas=(0.9, 0.999), weight_decay=0.05), 0.002, m)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)

    _, swept = _fit(optimizer="adamw", sweep_steps=40)
    sweep = swept.info["method"]["sweep"]
    assert sweep["lrs"][0] == pytest.approx(1e-6) and sweep_lrs(1e-6, 1.0, 40)[: len(sweep["lrs"])] == pytest.approx(sweep["lrs"])
    assert 1e-6 <= swept.info["method"]["lr"] <= 1.0
    _, decayed = _fit(optimizer="adamw", sweep_steps=40, weight_decay=0.5)
    assert decayed.info["method"]["sweep"]["losses"] == sweep["losses"]  # the sweep ramps without decay
    with pytest.raises(ValueError, match="adamw"):
        _fit(lr=0.002, optimizer="adamw", schedule="schedule-free")


def test_wsd_and_constant_warm_up_then_hold():
    _, hist = _fit(lr=0.2, schedule="wsd", warmup_fraction=0.25, cooldown=0.25)  # W = 8, C = 8 of T = 32
    lrs = _lr_of_each_step(hist, 32)
    expected = [0.2 * (t + 1) / 8 for t in range(8)] + [0.2] * 16 + [0.2 * (32 - k + 1) / 9 for k in range(25, 33)]
    assert lrs == pytest.approx(expected, abs=1e-15)
    _, constant = _fit(lr=0.2, schedule="constant", warmup_fraction=0.25)
    assert _lr_of_each_step(constant, 32) == pytest.approx(expected[:24] + [0.2] * 8, abs=1e-15)
    with pytest.raises(ValueError, match="cooldown"):
        _fit(lr=0.2, schedule="wsd", cooldown=1.5)


# ----------------------------------------------------------------------------------------------------
# the iterate average (option average=True)
# ----------------------------------------------------------------------------------------------------
def test_polynomial_average_closed_form_and_swap():
    from lrpilot.pilots.auto.average import PolynomialAverage

    model = nn.BatchNorm1d(2)  # a weight, a bias and running statistics: every float entry is averaged
    avg = PolynomialAverage(model, gamma=2.0)
    with torch.no_grad():
        model.weight.fill_(4.0)
    avg.update()  # t = 1: w = 3/3 = 1, the average is the weights
    assert torch.equal(avg.average["weight"], torch.full((2,), 4.0))
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.running_mean.fill_(2.0)
    avg.update()  # t = 2: w = 3/4
    assert avg.average["weight"] == pytest.approx(torch.full((2,), 0.25 * 4 + 0.75 * 1))
    assert avg.average["running_mean"] == pytest.approx(torch.full((2,), 0.75 * 2))
    assert "num_batches_tracked" not in avg.average  # an integer: not averaged
    with avg.eval_context():
        assert model.weight.detach() == pytest.approx(torch.full((2,), 1.75))
        with pytest.raises(RuntimeError, match="train"):
            avg.update()
    saved = avg.state_dict()
    avg.train()
    assert torch.equal(model.weight.detach(), torch.full((2,), 1.0))  # the training weights are back
    other = PolynomialAverage(nn.BatchNorm1d(2), gamma=2.0)
    other.load_state_dict(saved)
    assert other.t == 2 and torch.equal(other.average["weight"], avg.average["weight"])
    assert torch.equal(other.raw_state_dict()["weight"], torch.full((2,), 1.0))


def test_average_evaluates_the_averaged_weights_and_trains_the_raw_ones():
    _, hist = _fit(lr=0.2, average=True, schedule="cosine")
    _, plain = _fit(lr=0.2, schedule="cosine")
    assert [e.train_loss for e in hist.epochs] == [e.train_loss for e in plain.epochs]  # training untouched
    assert [e.val_loss for e in hist.epochs] != [e.val_loss for e in plain.epochs]  # evaluation is not
    with pytest.raises(ValueError, match="schedule"):
        _fit(lr=0.2, average=True, schedule="constant")


@pytest.mark.parametrize("options", [{}, {"schedule": "cosine", "average": True}])
def test_trainer_state_dict_resumes_identically(options):
    x, y, xv, yv = _data()

    def trainer(model_seed: int = 1) -> lrpilot.Trainer:
        torch.manual_seed(model_seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        return lrpilot.Trainer(model, TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96), method="auto",
                               epochs=4, seed=0, progress=False, method_options={"sweep_steps": 30, **options})

    straight = trainer()
    straight.run()
    first = trainer()
    first.run(until_epoch=2)
    resumed = trainer(model_seed=7)
    resumed.load_state_dict(first.state_dict())
    resumed.run()
    a, b = straight.history, resumed.history
    assert [e.val_metric for e in a.epochs] == [e.val_metric for e in b.epochs]
    assert [e.train_loss for e in a.epochs] == [e.train_loss for e in b.epochs] and a.step_lr == b.step_lr
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_a_second_safety_net_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"already has a safety net.*drop safety_net=True.*rollback=False"):
        _fit(lr=0.2, safety_net=True)
    _, hist = _fit(lr=0.2, rollback=False, safety_net={"factor": 0.25})  # the user's net instead of auto's
    assert hist.status == "completed"


# --- round 7: the race between SGD and AdamW ------------------------------------------------------------


def test_mcnemar_z_closed_form_and_bad_shapes():
    from lrpilot.pilots.auto.race import mcnemar_z, race_winner

    sgd = torch.tensor([1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    adamw = torch.tensor([0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # right alone on 3, wrong alone on 1
    z, b, c = mcnemar_z(sgd, adamw)
    assert (b, c) == (3, 1) and z == pytest.approx(2 / math.sqrt(4))
    assert mcnemar_z(adamw, sgd)[0] == pytest.approx(-1.0)
    assert mcnemar_z(sgd, sgd) == (0.0, 0, 0)  # no disagreement: no evidence either way
    assert race_winner(sgd, adamw, 0.99)[0] and not race_winner(sgd, adamw, 1.0)[0]  # strictly above z_min
    with pytest.raises(ValueError, match="one length"):
        mcnemar_z(sgd, adamw[:-1])


def _race(**options):
    return _fit(optimizer="race", sweep_steps=40, **options)


def test_a_race_sgd_wins_trains_exactly_as_optimizer_sgd():
    """The race trains copies with the RNG preserved: when SGD wins (here: it must win by z > 1e9) the run
    is bit for bit the default SGD run, and the race is charged as search (two sweeps, three races)."""
    model, hist = _race(race_z=1e9)
    race = hist.info["method"]["race"]
    assert race["winner"] == "sgd" and race["held_out"] == round(0.1 * 256)
    assert race["sgd"]["steps"] == race["adamw"]["steps"] == race["schedulefree-adamw"]["steps"] == math.ceil(0.15 * 32)
    sweeps = race["sweeps"]["sgd"]["steps"] + race["sweeps"]["adamw"]["steps"]  # (none for Schedule-Free AdamW)
    assert hist.info["method"]["search"]["total_steps"] == sweeps + 3 * race["sgd"]["steps"]
    plain_model, plain = _fit(sweep_steps=40)
    assert hist.info["method"]["lr"] == plain.info["method"]["lr"] == race["sgd"]["lr"]
    assert [e.train_loss for e in hist.epochs] == [e.train_loss for e in plain.epochs]
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_a_race_adamw_wins_trains_adamw_at_its_own_sweeps_lr(monkeypatch):
    """The winner's step, LR (the Adam sweep's pick over race_adamw_divisor) and decay (AdamW's 0.05)."""
    import lrpilot.pilots.auto.register as auto_register

    monkeypatch.setattr(auto_register, "race_pick", lambda correct, z_min: ("adamw", {"adamw": {"z": 9.0, "b": 5, "c": 0}}))
    model, hist = _race(race_adamw_divisor=3.0)
    race = hist.info["method"]["race"]
    assert race["winner"] == "adamw" and hist.info["method"]["lr"] == race["adamw"]["lr"]
    sweep = race["sweeps"]["adamw"]
    assert sweep["lrs"][0] == pytest.approx(1e-6) and race["adamw"]["lr"] == pytest.approx(sweep["lr"])
    assert sweep["lr"] == pytest.approx((sweep["lr_at_edge"] or sweep["lr_at_min"]) / 3.0)
    again_model, _ = _fit(optimizer="adamw", lr=race["adamw"]["lr"])  # the same run, its LR given
    for a, b in zip(model.parameters(), again_model.parameters()):
        assert torch.equal(a, b)


def test_the_race_never_reads_the_scored_split():
    _, hist = _race()
    _, scrambled = _race(val_labels=torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(5)))
    def strip(race: dict) -> dict:
        return {k: v for k, v in race.items() if k != "sweeps"}

    assert strip(hist.info["method"]["race"]) == strip(scrambled.info["method"]["race"])
    assert hist.info["decision_split"] == {"source": "none"}  # the run itself trains on all the training data


def test_the_race_trains_on_the_rest_and_scores_on_the_held_out_tenth(monkeypatch):
    """The racers train on every sample but a seeded tenth of the training set and never on that tenth,
    which they are scored on."""
    import lrpilot.pilots.auto.register as auto_register
    from lrpilot.core.data import carve

    x, y, _, _ = _data()
    _, held = carve(TensorLoader(x, y, 32, seed=0), 0.1, 0 + 15_485_863)
    held_rows = {tuple(r.tolist()) for r in held.inputs}
    trained: set = set()
    epochs = auto_register._epochs

    def recorded(loader):
        for xb, yb in epochs(loader):
            trained.update(tuple(r.tolist()) for r in xb)
            yield xb, yb

    monkeypatch.setattr(auto_register, "_epochs", recorded)
    _, hist = _race()
    assert len(held_rows) == 26 and trained.isdisjoint(held_rows)
    assert len(trained) == 5 * 32  # each racer's ceil(0.15 * 32) = 5 steps of 32, all in the same order
    race = hist.info["method"]["race"]
    accuracies = {race[n]["held_out_accuracy"] for n in ("sgd", "adamw", "schedulefree-adamw")}
    assert all(round(a * 26) == pytest.approx(a * 26, abs=1e-4) for a in accuracies)  # counts of 26 samples
    assert race["adamw_only"] - race["sgd_only"] == round(26 * (race["adamw"]["held_out_accuracy"] - race["sgd"]["held_out_accuracy"]))


def test_auto_races_by_default_and_an_lr_given_is_sgds():
    x, y, xv, yv = _data()
    hist = lrpilot.fit(_net(), TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96), epochs=2, seed=0,
                       progress=False, sweep_steps=20)  # method="auto", its defaults
    assert hist.info["method"]["race"]["winner"] == hist.info["method"]["optimizer"]
    given = lrpilot.fit(_net(), TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96), epochs=2, seed=0,
                        progress=False, lr=0.05)
    assert "race" not in given.info["method"] and given.info["method"]["optimizer"] == "sgd"
    assert given.info["method"]["lr"] == 0.05


def test_the_race_falls_back_to_sgd_and_says_so_where_it_cannot_run(caplog):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x.sum(1, keepdim=True)
    with caplog.at_level("INFO", logger="lrpilot"):
        hist = lrpilot.fit(nn.Linear(3, 1), TensorLoader(x, y, 16), TensorLoader(x, y, 64), method="auto",
                           loss_fn=nn.MSELoss(), epochs=2, progress=False, optimizer="race", sweep_steps=20)
    assert "regression task trains with SGD" in caplog.text
    assert hist.info["method"]["race"]["winner"] == "sgd" and "skipped" in hist.info["method"]["race"]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, x[:, :3].argmax(1)))

        def __len__(self):
            return 64

    loader = torch.utils.data.DataLoader(Stream(), batch_size=16)
    caplog.clear()
    with caplog.at_level("INFO", logger="lrpilot"):
        hist = lrpilot.fit(nn.Linear(3, 3), loader, loader, method="auto", epochs=1, progress=False,
                           optimizer="race", sweep_steps=20)
    assert "not a DataLoader over a Stream" in caplog.text and hist.info["method"]["race"]["winner"] == "sgd"


def test_bad_race_options_name_themselves():
    for options, match in (({"race_fraction": 0.0}, "race_fraction"), ({"race_z": -1.0}, "race_z"),
                           ({"race_adamw_divisor": 0.5}, "race_adamw_divisor"), ({"race_budget": 1.5}, "race_budget"),
                           ({"race_candidates": "sgd"}, "race_candidates"),
                           ({"race_candidates": "sgd+sgd"}, "race_candidates"),
                           ({"race_candidates": ("sgd", "lion")}, "race_candidates"),
                           ({"race_candidates": 3}, "race_candidates")):
        with pytest.raises(ValueError, match=match):
            _race(**options)


# --- round 8: Schedule-Free AdamW in the race ---------------------------------------------------------------

SF3 = "sgd+adamw+schedulefree-adamw"


def test_race_pick_takes_the_most_accurate_challenger_that_beats_the_incumbent():
    from lrpilot.pilots.auto.race import race_pick

    sgd = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    adamw = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)  # b=3, c=0: z = sqrt(3)
    sf = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # b=5, c=1: z = 4/sqrt(6), more right
    winner, tests = race_pick({"sgd": sgd, "adamw": adamw, "schedulefree-adamw": sf}, 1.0)
    assert tests == {"adamw": {"z": pytest.approx(math.sqrt(3)), "b": 3, "c": 0},
                     "schedulefree-adamw": {"z": pytest.approx(4 / math.sqrt(6)), "b": 5, "c": 1}}
    assert winner == "schedulefree-adamw"  # both pass z > 1; it is right on 8 against AdamW's 7
    assert race_pick({"sgd": sgd, "adamw": adamw, "schedulefree-adamw": sf}, 1.7)[0] == "adamw"  # 1.63 < 1.7 < 1.73
    assert race_pick({"sgd": sgd, "adamw": adamw, "schedulefree-adamw": sf}, 2.0)[0] == "sgd"  # neither passes
    assert race_pick({"sgd": sgd, "a": adamw, "b": adamw.clone()}, 1.0)[0] == "a"  # a tie: the first listed
    with pytest.raises(ValueError, match="challenger"):
        race_pick({"sgd": sgd}, 1.0)


def _peer(method: str, **options):
    x, y, xv, yv = _data()
    model = _net()
    hist = lrpilot.fit(model, TensorLoader(x, y, 32, seed=0), TensorLoader(xv, yv, 96), method=method, epochs=4,
                       seed=0, progress=False, **options)
    return model, hist


def test_schedule_free_adamw_is_the_peer_at_its_own_defaults():
    """``optimizer="schedulefree-adamw"`` needs no sweep; without the safety net the run is the
    ``schedulefree-adamw`` peer's, bit for bit, and with it (nothing to roll back here) too."""
    pytest.importorskip("schedulefree")
    peer_model, peer = _peer("schedulefree-adamw")
    for rollback in (False, True):
        model, hist = _fit(optimizer="schedulefree-adamw", rollback=rollback)
        assert "sweep" not in hist.info["method"] and hist.info["method"]["lr"] == 0.0025
        assert [e.val_metric for e in hist.epochs] == [e.val_metric for e in peer.epochs]
        for a, b in zip(model.parameters(), peer_model.parameters()):
            assert torch.equal(a, b)


def test_a_race_schedule_free_adamw_wins_trains_the_peer_and_charges_three_races(monkeypatch):
    pytest.importorskip("schedulefree")
    import lrpilot.pilots.auto.register as auto_register

    monkeypatch.setattr(auto_register, "race_pick", lambda correct, z_min: ("schedulefree-adamw", {}))
    model, hist = _race(race_candidates=SF3)
    race = hist.info["method"]["race"]
    assert race["winner"] == hist.info["method"]["optimizer"] == "schedulefree-adamw"
    assert set(race["sweeps"]) == {"sgd", "adamw"}  # Schedule-Free AdamW has no sweep
    assert race["schedulefree-adamw"]["lr"] == hist.info["method"]["lr"] == 0.0025
    steps = math.ceil(0.15 * 32)
    sweeps = race["sweeps"]["sgd"]["steps"] + race["sweeps"]["adamw"]["steps"]
    assert hist.info["method"]["search"]["total_steps"] == sweeps + 3 * steps
    peer_model, _ = _peer("schedulefree-adamw")
    for a, b in zip(model.parameters(), peer_model.parameters()):
        assert torch.equal(a, b)


def test_the_schedule_free_racer_is_scored_at_its_averaged_point():
    """Schedule-Free trains at y and is evaluated at x, its average: the racer's held-out score is x's."""
    pytest.importorskip("schedulefree")
    from lrpilot.core.registry import BuildContext
    from lrpilot.pilots.auto.register import _CopyTrainer, _epochs, _resolved

    x, y, _, _ = _data()
    loader = TensorLoader(x, y, 32, seed=0)
    ctx = BuildContext(model=_net(), epochs=1, steps_per_epoch=8, train_loader=loader)
    o = _resolved({**AUTO_DEFAULTS, "optimizer": "schedulefree-adamw"})
    racer = _CopyTrainer(ctx, o, _epochs(loader), lr=0.05, weight_decay=0.0, steps=8, loader=loader)
    for _ in range(8):
        racer.step(0.05)
    held = TensorLoader(x, y, 256, shuffle=False)
    scored = racer.correct(held)  # leaves the optimizer in eval mode, the weights at x (the racer is done)
    assert not racer.opt.param_groups[0]["train_mode"]
    with torch.no_grad():
        at_x = racer.model(x).argmax(1) == y
        racer.opt.train()
        at_y = racer.model(x).argmax(1) == y
    assert torch.equal(scored, at_x) and not torch.equal(scored, at_y)


def test_without_the_schedulefree_package_the_race_goes_on_without_it_and_says_so(monkeypatch, caplog):
    """Schedule-Free AdamW is an optional package (lrpilot[peers]): without it the three-step race is round
    7's two-step race, bit for bit, with a line in the log and the record."""
    import lrpilot.pilots.auto.register as auto_register

    monkeypatch.setattr(auto_register, "_schedulefree_available", lambda: False)
    with caplog.at_level("INFO", logger="lrpilot"):
        model, hist = _race(race_candidates=SF3)
    race = hist.info["method"]["race"]
    assert "not installed" in caplog.text and "lrpilot[peers]" in race["dropped"]
    assert "schedulefree-adamw" not in race and set(race["tests"]) == {"adamw"}
    two_model, two = _race(race_candidates="sgd+adamw")
    assert {k: v for k, v in race.items() if k != "dropped"} == two.info["method"]["race"]
    for a, b in zip(model.parameters(), two_model.parameters()):
        assert torch.equal(a, b)
