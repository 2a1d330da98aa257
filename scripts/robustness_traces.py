"""Why the seed methods fail on conv nets with their defaults (issue 15): traces, plots, remedy prototypes.

    python scripts/robustness_traces.py trace   --family rt-hpo [--task mnist1d-cnn] [--seed 0] [--labels a,b]
    python scripts/robustness_traces.py plot    --family rt-hpo [--seed 0]
    python scripts/robustness_traces.py measure --family rt-hpo [--tasks mnist1d-cnn,mnist1d-mlp] [--seeds 0,1,2]
    python scripts/robustness_traces.py table   [--family rt-hpo]
    python scripts/robustness_traces.py all     # every family: traces, plots, measurements, table

Each *family* (:data:`FAMILIES`) lists its default form (the registry name a user gets with no options)
and the remedy forms, prototyped here as subclasses of the shipped classes and registered under
``proto-...`` names for this process only (``src/lrpilot/pilots`` is not edited):

* :class:`MultiplicativeHD` (hd-train, hd-val, rt-hpo): normalised multiplicative LR step, decayed or
  accumulated tangent, optional tangent-norm clip;
* :class:`GuardedLipschitzPilot` (lipschitz): stall/shrink detection, back-off from the last good LR,
  per-epoch growth cap; :class:`CurvatureLipschitzPilot`: ``min(1/L, 1/lambda_max)`` (measured, rejected);
* :class:`GrowthCappedAutoAdam` (auto-adam): per-step growth cap and absolute cap on the step size;
* :class:`ContinuousAdaMo` (adamo): the average ``K`` starts at ``1/initial_lr``.

``docs/robustness-study.md`` reads the results and writes out the recommended code changes.

``trace`` trains the listed forms once (one seed) and records per optimizer step: the LR in force, the
mini-batch training loss, what the family tracks (hypergradient and tangent norm, Lipschitz averages, ...)
and, every ``--sharp-every`` steps, the largest Hessian eigenvalue of the training loss on a fixed training
batch (power iteration with Hessian-vector products, 20 iterations, its own RNG): plain SGD is stable only
while ``lr < 2 / lambda_max``, the dotted line of the plots. Traces go to
``runs/robustness/trace-<family>-<form>-<task>-s<seed>.json``; ``plot`` draws
``docs/figures/robustness/<family>.png`` from the traces that exist.

``measure`` runs ``lrpilot.bench.tasks.run_task`` for the forms, ``--seeds`` on ``--tasks`` (the task's
default budget), and appends one JSON line per run to ``runs/robustness/measure.jsonl`` (runs already there
are skipped, so a killed command resumes). ``table`` prints, per family, task and form: median best,
median final, and the seeds that diverged, stopped, never left chance or ended more than 5 points below
their own best, beside ``sgd-cosine-tuned``'s stored median best (``src/lrpilot/bench/data/targets.json``).

The runs of ``docs/robustness-study.md``: ``trace`` for every family at seed 0 on ``mnist1d-cnn``
(auto-adam at ``--seed 1``, its failing seed), ``measure --tasks mnist1d-cnn,mnist1d-mlp`` for hd-train and
hd-val, ``--tasks mnist1d-cnn`` for rt-hpo, ``--tasks mnist1d-cnn,mnist1d-mlp,digits-mlp`` for the others.
Everything is seeded; set ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lrpilot.bench.tasks import get_task, make_loaders, run_task
from lrpilot.core.contract import MethodParts
from lrpilot.core.registry import BuildContext, MethodInfo, get_method, register
from lrpilot.core.seeding import seed_everything
from lrpilot.loop.fit import Trainer
from lrpilot.pilots import hypergradient as hg
from lrpilot.pilots import lipschitz as lip

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "robustness"
FIGURES = ROOT / "docs" / "figures" / "robustness"
TARGETS = ROOT / "src" / "lrpilot" / "bench" / "data" / "targets.json"


# ====================================================================================================
# Remedy prototypes
# ====================================================================================================
# --- hypergradient family (hd-train, hd-val, rt-hpo) ---------------------------------------------------
@contextlib.contextmanager
def _cosine_contraction() -> Iterator[None]:
    """Make the hypergradient contraction ``_dot(G, z)`` return the cosine <G, z> / (|G| |z|).

    ``hypergradient._dot`` is called for exactly one thing: the contraction of the objective's gradient
    with the tangent (one-step and full horizon). Swapping it for the step turns ``delta`` into a number
    in [-1, 1] with the same sign, without copying the step's code.
    """
    original = hg._dot

    def cosine(a, b, *, ref):  # type: ignore[no-untyped-def]
        dot = original(a, b, ref=ref)
        na = original(a, a, ref=ref).clamp_min(0).sqrt()
        nb = original(b, b, ref=ref).clamp_min(0).sqrt()
        den = na * nb
        return torch.where(den > 0, dot / den.clamp_min(1e-30), torch.zeros_like(dot))

    hg._dot = cosine
    try:
        yield
    finally:
        hg._dot = original


class MultiplicativeHD(hg.HypergradientSGD):
    """Prototype: the normalised multiplicative hypergradient step, optionally with a decaying tangent.

    ``eta_t = eta_{t-1} * exp(beta_m * cos(G_t, -z_t))`` (Baydin et al. 2018's multiplicative rule, in its
    exponential form, which stays positive for any beta_m), so one step moves the LR by at most a factor
    ``exp(+-beta_m)`` whatever the gradients' scale; ``tangent_decay`` gamma multiplies the RT-HPO tangent
    by gamma before each step: ``z_{t+1} = A_t (gamma z_t) + B_t`` (horizon about 1/(1-gamma) steps).
    """

    def __init__(self, params: Any, lr: float, beta: float, *, beta_m: float = 0.02, tangent_decay: float = 1.0,
                 tangent_clip: bool = False, **options: Any) -> None:
        super().__init__(params, lr, beta, **options)
        self.beta_m, self.tangent_decay, self.tangent_clip = float(beta_m), float(tangent_decay), bool(tangent_clip)

    def _clip_tangent(self) -> None:
        """``tangent_clip``: keep ``||z|| <= ||d_t|| / (1 - gamma)``, the most a decayed sum of update directions
        can reach without curvature amplifying it (negative-curvature directions, or ``lr * lambda`` past the
        edge, make ``A_t`` expanding; the cosine only needs z's direction)."""
        pairs = [(st["tangent"], st.get("tangent_momentum"), st.get("momentum_buffer"), p.grad)
                 for p, st in self.state.items() if isinstance(p, torch.Tensor) and "tangent" in st]
        if not pairs:
            return
        z = _norm([t for t, *_ in pairs])
        d = _norm([(m if m is not None else g) for _, _, m, g in pairs if (m if m is not None else g) is not None])
        bound = d / max(1.0 - self.tangent_decay, 1e-12)
        if math.isfinite(z) and z > bound > 0:
            with torch.no_grad():
                for t, y, *_ in pairs:
                    t.mul_(bound / z)
                    if y is not None:
                        y.mul_(bound / z)

    def step(self, closure: Any = None, *, val_closure: Any = None, **kw: Any) -> Any:  # type: ignore[override]
        if self.horizon == "full" and self.tangent_decay != 1.0:
            with torch.no_grad():
                for p, st in self.state.items():
                    if isinstance(p, torch.Tensor) and "tangent" in st:
                        st["tangent"].mul_(self.tangent_decay)
                        if "tangent_momentum" in st:
                            st["tangent_momentum"].mul_(self.tangent_decay)
        with _cosine_contraction():
            loss = super().step(closure, val_closure=val_closure, **kw)
        if self.horizon == "full" and self.tangent_clip:
            self._clip_tangent()
        return loss

    def _keep_directions(self, params: list[torch.Tensor], directions: list[torch.Tensor], *, owned: bool) -> None:
        """One-step horizon with ``tangent_decay`` < 1: keep ``a_t = gamma a_{t-1} + d_t`` (the tangent of the
        last ~1/(1-gamma) steps with the curvature term left out, A = I) instead of ``d_t`` alone."""
        if self.tangent_decay == 1.0:
            return super()._keep_directions(params, directions, owned=owned)
        for p, d in zip(params, directions):
            state = self.state[p]
            acc = state.get("direction")
            if acc is None or self._lent.get(p) is not None or acc is d:
                acc = torch.zeros_like(d)
            else:
                acc.mul_(self.tangent_decay)
            acc.add_(d)
            state["direction"] = acc
            self._lent[p] = None

    def _update_lr(self, group: dict[str, Any], delta: float) -> float:
        old = group["lr"]
        if not math.isfinite(delta):
            group["hypergrad"] = math.nan
            group["lr_skipped"] += 1
            return old
        group["hypergrad"] = -delta
        new = old * math.exp(self.beta_m * delta)
        if not group["min_lr"] <= new <= group["max_lr"]:
            group["lr_clamped"] += 1
            new = min(max(new, group["min_lr"]), group["max_lr"])
        group["lr"] = new
        return new if self.lr_update == "before-step" else old


def _hd_builder(objective: str, horizon: str) -> Callable[..., MethodParts]:
    def build(ctx: BuildContext, **options: Any) -> MethodParts:
        opt = MultiplicativeHD(ctx.params(), objective=objective, horizon=horizon, **options)
        return hg._parts(opt)

    return build


# --- lipschitz (epoch pilot): a curvature estimate beside the paper's constant ------------------------
def top_hessian_eigenvalue(model: torch.nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor, *,
                           iters: int = 20, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the mini-batch loss Hessian (power iteration, Pearlmutter HVPs).

    Works for any differentiable network (conv, batch norm in its current mode); ``.grad`` is untouched
    and the global RNG is not drawn from.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        lam = 0.0
        for i in range(iters):
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            if not torch.isfinite(norm) or norm == 0:
                return math.nan
            v = [t / norm for t in v]
            hv = torch.autograd.grad(grads, params, v, retain_graph=i < iters - 1)
            lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
            v = [t.detach() for t in hv]
    return lam


class CurvatureLipschitzPilot(lip.LipschitzPilot):
    """Prototype: the LR is ``min(1/L_paper, 1/lambda_hat)``, lambda_hat the measured top Hessian eigenvalue.

    ``1/L`` bounds how far the *head's* gradient can move; it says nothing about the curvature of the
    conv layers below it. ``lambda_hat`` is the largest top eigenvalue of the mini-batch Hessian over
    ``curv_batches`` training batches (power iteration), measured before the first epoch (the probe) and
    after every epoch; ``1/lambda_hat`` is the descent lemma's step, half the edge of stability 2/lambda.
    """

    def __init__(self, optimizer: Any, *, loss_fn: Any, curv_batches: int = 2, curv_iters: int = 20,
                 **options: Any) -> None:
        super().__init__(optimizer, **options)
        self.loss_fn, self.curv_batches, self.curv_iters = loss_fn, int(curv_batches), int(curv_iters)
        self.curvature: list[float] = []

    def _lambda_hat(self) -> float:
        assert self.model is not None
        device = next(self.model.parameters()).device
        values = []
        for i, batch in enumerate(self.train_loader):
            if i >= self.curv_batches:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            values.append(top_hessian_eigenvalue(self.model, self.loss_fn, x, y, iters=self.curv_iters, seed=i))
        return max((abs(v) for v in values if math.isfinite(v)), default=math.nan)

    def _network_lrs(self, stats: Any) -> tuple[tuple[float, ...] | None, dict[str, Any]]:
        lrs, info = super()._network_lrs(stats)
        if lrs is None:
            return lrs, info
        rng = lip.capture_rng()  # the loader's shuffling draws from the global RNG: leave it as it was
        try:
            lam = self._lambda_hat()
        finally:
            lip.restore_rng(rng)
        self.curvature.append(lam)
        info = {**info, "lambda_hat": lam, "paper_lr": lrs[0]}
        if math.isfinite(lam) and lam > 0:
            lrs = tuple(min(lr, self.scale / lam) for lr in lrs)
        return lrs, info


class GuardedLipschitzPilot(lip.LipschitzPilot):
    """Prototype: the paper's 1/L, with three safeguards against the 1/K_z feedback loop.

    1. ``max_growth``: the LR of epoch e is at most ``max_growth`` times the LR of the last good epoch
       (1.0: never rises). 1/L grows as K_z shrinks, and K_z shrinks when ReLUs die, i.e. exactly after
       an LR that was too large: without a cap the pilot answers a too-large LR with a larger one.
    2. ``stall``: an epoch whose mean training loss is above ``stall`` times the validation loss at
       initialisation (a classifier stuck at ln k), or whose K_z fell below 1/10 of the previous
       epoch's, counts as collapsed (the shipped pilot only catches K_z == 0 exactly).
    3. A rollback backs off from the LR of the last *good* epoch, not from the failed epoch's LR (which,
       after a collapse, is the huge 1/L of a dead network).
    """

    def __init__(self, optimizer: Any, *, max_growth: float = 1.0, stall: float = 0.98, **options: Any) -> None:
        super().__init__(optimizer, **options)
        self.max_growth, self.stall = float(max_growth), float(stall)
        self.good_lr: tuple[float, ...] | None = None
        self.prev_k_z = math.nan

    def on_train_begin(self, signals: Any) -> Any:
        decision = super().on_train_begin(signals)
        self.good_lr = decision.lr
        return decision

    def on_epoch_end(self, signals: Any) -> Any:
        assert self.monitor is not None
        stats = self.monitor.epoch()
        k_z = stats.k_z if stats is not None else math.nan
        stalled = (math.isfinite(signals.train_loss) and math.isfinite(self.initial_loss)
                   and signals.train_loss > self.stall * self.initial_loss)
        shrunk = math.isfinite(self.prev_k_z) and k_z < self.prev_k_z / 10
        if not signals.nonfinite and (stalled or shrunk):
            self.monitor.reset()
            return self._diverged(signals, reason="lipschitz-collapsed-rollback",
                                  info={"train_loss": signals.train_loss, "k_z": k_z})
        decision = super().on_epoch_end(signals)
        if decision is not None and decision.reason == "lipschitz-epoch" and decision.lr is not None:
            assert self.good_lr is not None
            # the epoch just ended was good: its LR (signals.lr) is the new reference
            self.good_lr = tuple(signals.lr)
            capped = tuple(min(a, self.max_growth * g) for a, g in zip(decision.lr, self.good_lr))
            decision = decision.with_lr(capped)
            self.prev_k_z = k_z
        return decision

    def _diverged(self, signals: Any, reason: str = "lipschitz-diverged-rollback", info: Any = None) -> Any:
        if self.good_lr is not None:  # back off from the last good LR, not from the failed epoch's
            signals = type(signals)(**{**signals.__dict__, "lr": tuple(min(a, b) for a, b in
                                                                      zip(signals.lr, self.good_lr))})
        decision = super()._diverged(signals, reason, info)
        if decision is not None and decision.lr is not None:
            self.good_lr = decision.lr
        return decision


def build_guarded_lipschitz(ctx: BuildContext, **o: Any) -> MethodParts:
    spec = lip._loss_spec(ctx, "lipschitz")
    opt = torch.optim.SGD(ctx.params(), lr=1e-3, momentum=o.pop("momentum"), weight_decay=o.pop("weight_decay"))
    pilot = GuardedLipschitzPilot(opt, loss=spec, train_loader=ctx.train_loader, **o)
    return MethodParts(opt, pilot, info={"loss": spec.kind})


def build_curvature_lipschitz(ctx: BuildContext, **o: Any) -> MethodParts:
    spec = lip._loss_spec(ctx, "lipschitz")
    opt = torch.optim.SGD(ctx.params(), lr=1e-3, momentum=o.pop("momentum"), weight_decay=o.pop("weight_decay"))
    pilot = CurvatureLipschitzPilot(opt, loss=spec, train_loader=ctx.train_loader, loss_fn=ctx.loss_fn, **o)
    return MethodParts(opt, pilot, info={"loss": spec.kind})


_LIP_DEFAULTS = {k: v for k, v in get_method("lipschitz").defaults.items()}


class GrowthCappedAutoAdam(lip.AutoAdam):
    """Prototype: Auto-Adam whose step size may grow by at most a factor ``1 + max_growth`` per step.

    ``alpha_t = min((sqrt(K2)+eps)/K1, (1 + max_growth) alpha_{t-1})``; falls are not limited. It breaks the
    feedback loop dead ReLUs -> smaller K_z -> smaller K1 (beta1 = 0.9 follows in ~10 steps) while K2
    (beta2 = 0.999) still remembers the old, larger M -> larger step -> more dead ReLUs.
    """

    def __init__(self, params: Any, source: Any = None, *, max_growth: float = 0.01, max_alpha: float = math.inf,
                 **options: Any) -> None:
        super().__init__(params, source, **options)
        for g in self.param_groups:
            g["max_growth"], g["max_alpha"] = float(max_growth), float(max_alpha)

    def _step_size(self, group: dict[str, Any], k1: float, k2: float) -> float:
        alpha = super()._step_size(group, k1, k2)
        prev = group["lipschitz_lr"]
        if prev > 0:
            alpha = min(alpha, prev * (1 + group["max_growth"]))
        return min(alpha, group["lr"] * group["max_alpha"])


class ContinuousAdaMo(lip.AdaMo):
    """Prototype: AdaMo whose average K starts at 1/initial_lr, so the LR is continuous when the first
    epoch's fixed LR x ends (the shipped class starts K at x, so the LR jumps from x to 1/x: 0.1 -> 10)."""

    def __init__(self, params: Any, source: Any = None, **options: Any) -> None:
        super().__init__(params, source, **options)
        for g in self.param_groups:
            if g["initial_lr"] is not None:
                g["k1"] = g["k1_init"] = 1.0 / g["initial_lr"]


def _register_prototypes() -> None:
    hd = dict(get_method("hd-train").defaults)
    common = {"lr_granularity": "step", "kind": "step-pilot"}
    protos = [
        # hypergradient family: normalised multiplicative step (beta_m), RT-HPO with a decaying tangent
        MethodInfo("proto-hd-train-mult", "proto", "hd-train, multiplicative normalised step",
                   _hd_builder("train", "one-step"), {**hd, "beta_m": 0.02, "tangent_decay": 1.0}, **common),
        MethodInfo("proto-hd-val-mult", "proto", "hd-val, multiplicative normalised step",
                   _hd_builder("val", "one-step"), {**hd, "beta_m": 0.02, "tangent_decay": 1.0}, **common),
        MethodInfo("proto-rt-hpo-mult", "proto", "rt-hpo, multiplicative normalised step, decaying tangent",
                   _hd_builder("val", "full"), {**hd, "beta_m": 0.02, "tangent_decay": 0.99, "tangent_clip": False},
                   **common),
        MethodInfo("proto-auto-adam-capped", "proto", "auto-adam, section 9 initial values, LR growth <= 1%/step",
                   lip._adaptive_builder("auto-adam", GrowthCappedAutoAdam),
                   {**get_method("auto-adam").defaults, "k1_init": 1.0, "k2_init": 1e-6, "max_growth": 0.01,
                    "max_alpha": math.inf},
                   lr_granularity="step", kind="step-pilot", handles_nonfinite=True),
        MethodInfo("proto-adamo-continuous", "proto", "adamo, K starts at 1/initial_lr",
                   lip._adaptive_builder("adamo", ContinuousAdaMo), dict(get_method("adamo").defaults),
                   lr_granularity="step", kind="step-pilot", handles_nonfinite=True),
        MethodInfo("proto-lipschitz-guarded", "proto", "lipschitz, LR never above the last good one, stall "
                   "detection, rollback from the last good LR", build_guarded_lipschitz,
                   {**_LIP_DEFAULTS, "max_growth": 1.0, "stall": 0.98},
                   lr_granularity="epoch", kind="epoch-pilot", handles_nonfinite=True),
        MethodInfo("proto-lipschitz-curv", "proto", "lipschitz, LR = min(1/L, 1/lambda_max)",
                   build_curvature_lipschitz, {**_LIP_DEFAULTS, "curv_batches": 2, "curv_iters": 20},
                   lr_granularity="epoch", kind="epoch-pilot", handles_nonfinite=True),
    ]
    for info in protos:
        register(info, replace=True)


_register_prototypes()

#: family -> (default method, [(label, method, options)]) ; the first entry is the default form
FAMILIES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "rt-hpo": [("default", "rt-hpo", {}),
               ("mult+decay", "proto-rt-hpo-mult", {}),
               ("mult+decay+mom", "proto-rt-hpo-mult", {"lr": 0.01, "momentum": 0.9}),
               ("mult+decay+mom-lr0.1", "proto-rt-hpo-mult", {"lr": 0.1, "momentum": 0.9}),
               ("mult+decay+clip+mom-lr0.1", "proto-rt-hpo-mult", {"lr": 0.1, "momentum": 0.9, "tangent_clip": True})],
    "hd-train": [("default", "hd-train", {}),
                 ("mult+horizon", "proto-hd-train-mult", {"tangent_decay": 0.99}),
                 ("mult+horizon+mom", "proto-hd-train-mult", {"tangent_decay": 0.99, "lr": 0.01, "momentum": 0.9}),
                 ("mult+horizon+mom-lr0.1", "proto-hd-train-mult", {"tangent_decay": 0.99, "lr": 0.1, "momentum": 0.9})],
    "hd-val": [("default", "hd-val", {}),
               ("mult+horizon", "proto-hd-val-mult", {"tangent_decay": 0.99}),
               ("mult+horizon+mom", "proto-hd-val-mult", {"tangent_decay": 0.99, "lr": 0.01, "momentum": 0.9}),
                 ("mult+horizon+mom-lr0.1", "proto-hd-val-mult", {"tangent_decay": 0.99, "lr": 0.1, "momentum": 0.9})],
    "lipschitz": [("default", "lipschitz", {}), ("curvature-capped", "proto-lipschitz-curv", {}),
                  ("guarded", "proto-lipschitz-guarded", {}),
                  ("guarded-growth-1.25", "proto-lipschitz-guarded", {"max_growth": 1.25})],
    "auto-adam": [("default", "auto-adam", {}),
                  ("section-9 init", "auto-adam", {"k1_init": 1.0, "k2_init": 1e-6}),
                  ("section-9 init+growth cap", "proto-auto-adam-capped", {}),
                  ("section-9 init+growth cap+max-0.01", "proto-auto-adam-capped", {"max_alpha": 0.01}),
                  ("max-0.01 only", "proto-auto-adam-capped",
                   {"k1_init": 0.0, "k2_init": 0.0, "max_growth": 1e9, "max_alpha": 0.01})],
    "adamo": [("default", "adamo", {}), ("continuous K", "proto-adamo-continuous", {})],
    "aalr": [("default", "aalr", {})],
    "hyperreg": [("default", "hyperreg-kl-1", {}), ("lr 1.0", "hyperreg-kl-1", {"lr": 1.0})],
}


# ====================================================================================================
# Tracing
# ====================================================================================================
def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors)) if tensors else 0.0


def _family_row(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What the optimizer tracks, after its step."""
    g0 = opt.param_groups[0]
    row: dict[str, Any] = {}
    if isinstance(opt, hg.HypergradientSGD):
        row["hypergrad"] = g0.get("hypergrad")
        tangents = [st["tangent"] for p, st in opt.state.items() if isinstance(p, torch.Tensor) and "tangent" in st]
        dirs = [st["direction"] for p, st in opt.state.items() if isinstance(p, torch.Tensor) and "direction" in st]
        row["z_norm"] = _norm(tangents) if tangents else _norm(dirs)
    elif isinstance(opt, lip._LipschitzOptimizer):
        row.update(k1=g0["k1"], k2=g0["k2"], lipschitz_lr=g0["lipschitz_lr"], mult=g0["lr"])
    row["grad_norm"] = _norm([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])
    return row


def trace(family: str, method: str, options: dict[str, Any], task: str, seed: int, sharp_every: int,
          epochs: int | None) -> dict[str, Any]:
    info = get_task(task)
    data = info.load_data()
    seed_everything(seed)
    model = info.model()
    train_loader, val_loader = make_loaders(data, info.batch_size, seed=seed)
    losses: list[float] = []
    base_loss = info.loss()

    class Recording(type(base_loss)):  # type: ignore[misc]
        """The task's loss, recording every training-mode value (a subclass: the Lipschitz pilots read its type)."""

        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = super().forward(out, y)
            if model.training and torch.is_grad_enabled():
                losses.append(float(value.detach()))
            return value

    loss_fn = Recording()

    trainer = Trainer(model, train_loader, val_loader, method=method, epochs=epochs or info.epochs, loss_fn=loss_fn,
                      metric=info.build_metric(data), seed=seed, progress=False, task_kind=info.kind,
                      method_options=options)
    fixed = (data.x_train[:info.batch_size], data.y_train[:info.batch_size])
    rows: list[dict[str, Any]] = []
    state = {"step": 0, "seen": 0}

    def post_hook(opt: torch.optim.Optimizer, *_: Any) -> None:
        state["step"] += 1
        step = state["step"]
        new = losses[state["seen"]:]
        state["seen"] = len(losses)
        lrs = trainer.parts.lrs()
        row = {"step": step, "lr": lrs[0], "loss": new[0] if new else math.nan, **_family_row(opt)}
        if sharp_every and (step == 1 or step % sharp_every == 0):
            was = model.training
            lam = top_hessian_eigenvalue(model, base_loss, *fixed, seed=step)
            model.train(was)
            row["lambda_max"] = lam
        rows.append(row)

    trainer.optimizer.register_step_post_hook(post_hook)
    t0 = time.perf_counter()
    hist = trainer.run()
    pilot_info = [
        {"reason": d.reason, "action": d.action, "epoch": d.epoch, "step": d.step, "lr": d.lr, "info": d.info}
        for d in hist.decisions
    ]
    return {
        "family": family, "method": method, "options": options, "task": task, "seed": seed,
        "wall_s": time.perf_counter() - t0, "steps": rows,
        "epochs": [{"epoch": e.epoch, "step": e.step, "val_metric": e.val_metric, "train_loss": e.train_loss,
                    "lr": e.lr} for e in hist.epochs],
        "decisions": pilot_info, "summary": hist.summary(),
    }


def _trace_path(family: str, label: str, task: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
    return RUNS / f"trace-{family}-{slug}-{task}-s{seed}.json"


def cmd_trace(family: str, task: str, seed: int, sharp_every: int, epochs: int | None,
              labels: list[str] | None = None) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    for label, method, options in FAMILIES[family]:
        if labels and label not in labels:
            continue
        out = trace(family, method, options, task, seed, sharp_every, epochs)
        out["label"] = label
        _trace_path(family, label, task, seed).write_text(json.dumps(out, default=_json_default))
        s = out["summary"]
        print(f"{family} {label:24s} {task} s{seed}: best {_f(s['best_val_metric']):.4f} final "
              f"{_f(s['final_val_metric']):.4f} status {s['status']} ({out['wall_s']:.0f} s)")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


# ====================================================================================================
# Plot
# ====================================================================================================
def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def cmd_plot(family: str, task: str, seed: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = []
    for label, _, _ in FAMILIES[family]:
        path = _trace_path(family, label, task, seed)
        if path.exists():
            traces.append(json.loads(path.read_text()))
    if not traces:
        raise SystemExit(f"no traces for {family}: run `trace --family {family}` first")
    extra = {"rt-hpo": "z_norm", "hd-train": "hypergrad", "hd-val": "hypergrad", "auto-adam": "k1",
             "adamo": "k1", "lipschitz": "k_z"}.get(family)
    panels = 3 + (extra is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.0), dpi=80)
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    for tr, c in zip(traces, colours):
        steps = [r["step"] for r in tr["steps"]]
        lab = f"{tr['label']} ({tr['method']})"
        axes[0].semilogy(steps, [max(_f(r["lr"]), 1e-6) for r in tr["steps"]], color=c, lw=1, label=lab)
        sharp = [(r["step"], 2.0 / _f(r["lambda_max"])) for r in tr["steps"]
                 if "lambda_max" in r and _f(r["lambda_max"]) > 0]
        if sharp:
            axes[0].semilogy(*zip(*sharp), color=c, ls=":", lw=1.2, label=f"2/lambda_max ({tr['label']})")
        axes[1].semilogy(steps, [min(max(_f(r["loss"]), 1e-4), 1e4) for r in tr["steps"]], color=c, lw=0.5)
        ep = tr["epochs"]
        axes[2].plot([e["step"] for e in ep], [_f(e["val_metric"]) for e in ep], color=c, marker=".", lw=1)
        if extra == "k_z":  # an epoch-level pilot: K_z from its decisions
            pts = [(d["step"], _f(d["info"]["k_z"])) for d in tr["decisions"] if "k_z" in d.get("info", {})]
            if pts:
                axes[3].semilogy(*zip(*pts), color=c, marker=".", lw=1)
        elif extra is not None:
            vals = [abs(_f(r.get(extra))) for r in tr["steps"]]
            axes[3].semilogy(steps, [max(v, 1e-12) if math.isfinite(v) else math.nan for v in vals], color=c, lw=0.5)
    axes[0].set_title("LR in force (0 drawn at 1e-6; dotted: 2/lambda_max)", fontsize=8)
    axes[1].set_title("mini-batch training loss", fontsize=8)
    axes[2].set_title("validation accuracy (per epoch)", fontsize=8)
    if extra is not None:
        axes[3].set_title(f"|{extra}|", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=5, loc="best", framealpha=0.5)
    fig.suptitle(f"{family} on {task}, seed {seed}", fontsize=9)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"{family}.png"
    fig.savefig(out)
    plt.close(fig)
    print(out)
    return out


# ====================================================================================================
# Measurements
# ====================================================================================================
MEASURE = RUNS / "measure.jsonl"


def _done() -> set[tuple[Any, ...]]:
    if not MEASURE.exists():
        return set()
    rows = [json.loads(line) for line in MEASURE.read_text().splitlines() if line.strip()]
    return {(r["family"], r["label"], r["task"], r["seed"]) for r in rows}


def cmd_measure(family: str, tasks: list[str], seeds: list[int], labels: list[str] | None) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    done = _done()
    for label, method, options in FAMILIES[family]:
        if labels and label not in labels:
            continue
        for task in tasks:
            for seed in seeds:
                if (family, label, task, seed) in done:
                    continue
                t0 = time.perf_counter()
                rec = run_task(task, method, seed=seed, method_options=options, progress=False)
                s = rec["summary"]
                row = {"family": family, "label": label, "method": method, "options": options, "task": task,
                       "seed": seed, "best": s["best_val_metric"], "final": s["final_val_metric"],
                       "status": s["status"], "status_reason": s["status_reason"],
                       "stopped": any(d.get("action") == "stop" for d in rec["decisions"]),
                       "final_lr": rec["epochs"][-1]["lr"] if rec["epochs"] else None,
                       "epochs": len(rec["epochs"]), "wall_s": time.perf_counter() - t0}
                with MEASURE.open("a") as f:
                    f.write(json.dumps(row, default=_json_default) + "\n")
                print(f"{family} {label:24s} {task} s{seed}: best {_f(row['best']):.4f} final {_f(row['final']):.4f} "
                      f"{row['status']} ({row['wall_s']:.0f} s)")


def _failure(row: dict[str, Any]) -> str | None:
    """Why a run counts as failed (the issue's criterion, plus a run that never left chance), or None."""
    best, final = _f(row["best"]), _f(row["final"])
    if row["status"] != "completed" or row["stopped"]:
        return str(row["status"])
    if not math.isfinite(final):
        return "nonfinite"
    if best - final > 0.05:
        return "drop"
    if best < 0.15:  # every task here has 10 classes: 0.1 is chance
        return "chance"
    return None


def cmd_table(family: str | None = None) -> str:
    """The measurements as a markdown table (one family, or all), forms in FAMILIES order; printed."""
    rows = [json.loads(line) for line in MEASURE.read_text().splitlines() if line.strip()]
    targets = json.loads(TARGETS.read_text())["tasks"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if family is None or r["family"] == family:
            groups.setdefault((r["family"], r["task"], r["label"]), []).append(r)
    order = {(fam, label): i for fam, forms in FAMILIES.items() for i, (label, _, _) in enumerate(forms)}
    lines = ["| family | task | form | seeds | median best | median final | failures | vs sgd-cosine-tuned |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for (fam, task, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                        order.get((kv[0][0], kv[0][2]), 99))):
        rs.sort(key=lambda r: r["seed"])
        best = statistics.median(_f(r["best"]) for r in rs)
        final = statistics.median(_f(r["final"]) if math.isfinite(_f(r["final"])) else 0.0 for r in rs)
        fails = [f"s{r['seed']} {_failure(r)}" for r in rs if _failure(r)]
        ref = targets.get(task, {}).get("methods", {}).get("sgd-cosine-tuned", {}).get("median_best")
        gap = "" if ref is None else f"{100 * (best - ref):+.1f} pts"
        lines.append(f"| {fam} | {task} | {label} | {len(rs)} | {best:.4f} | {final:.4f} | "
                     f"{len(fails)}{': ' + ', '.join(fails) if fails else ''} | {gap} |")
    text = "\n".join(lines)
    print(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["trace", "plot", "measure", "table", "all"])
    ap.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--task", default="mnist1d-cnn")
    ap.add_argument("--tasks", default="mnist1d-cnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--labels", default=None, help="comma-separated forms to trace or measure (default: all)")
    ap.add_argument("--sharp-every", type=int, default=80, help="steps between two lambda_max estimates (0: off)")
    ap.add_argument("--epochs", type=int, default=None, help="trace budget (default: the task's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    families = list(FAMILIES) if a.family is None else [a.family]
    if a.command in ("trace", "all"):
        for fam in families:
            cmd_trace(fam, a.task, a.seed, a.sharp_every, a.epochs, a.labels.split(",") if a.labels else None)
    if a.command in ("plot", "all"):
        for fam in families:
            cmd_plot(fam, a.task, a.seed)
    if a.command in ("measure", "all"):
        for fam in families:
            cmd_measure(fam, a.tasks.split(","), [int(s) for s in a.seeds.split(",")],
                        a.labels.split(",") if a.labels else None)
    if a.command in ("table", "all"):
        cmd_table(a.family)


if __name__ == "__main__":
    main()
