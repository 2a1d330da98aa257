"""MI-driven LR decay (Vasudevan, Entropy 22(5) 560, 2020): Algorithm 1 and its LR range test (Algorithm 2).

Layout, from pure to wired:

* :func:`mi_decay_lr` -- Algorithm 1's LR rule for one epoch, a pure function of the ITY history.
* :func:`select_bounds` -- Algorithm 2's summary table ``D`` and its bounds, a pure function of the
  trial records; :func:`run_range_test` -- Algorithm 2's trial loop (crash, restart) over a ``trial``
  callable.
* :class:`MIDecayPilot` -- the epoch-level pilot: it samples the fixed MI subset once, receives the
  network's outputs (or every layer's) on it from the loop's ``PROBE`` signal, estimates ITY after
  every epoch and applies the rule per param group.
* ``mi-decay`` / ``mi-decay-layerwise`` registry entries, at the bottom. Their factory runs the range
  test first (through ``BuildContext.trial``) unless the bounds are given.

The MI estimators themselves live in :mod:`lrpilot.estimators.mi`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lrpilot.core import distributed as dist
from lrpilot.core.checks import require_in
from lrpilot.core.contract import PROBE, Decision, EpochSignals, Pilot, Probe, current_lrs
from lrpilot.estimators.mi import label_entropy, mi_continuous, mi_continuous_discrete, mi_ratio

__all__ = ["MIDecayPilot", "MIProbeData", "estimate_ceiling", "estimate_mi", "mi_decay_lr", "layer_groups", "sample_probe", "saturation"]

STARTS = ("top", "mi")
TIME_DECAYS = ("epsilon", "epoch", "none")
CEILINGS = ("auto", "entropy", "ksg", "ross")
ITY_OUTPUTS = ("logits", "softmax")
BACKENDS = ("auto", "numpy", "torch")

# Floor of ITY in the denominator of d_s (an ITY <= 0 carries no information; keep the sign of the change).
_TINY = 1e-12


# ====================================================================================================
# Algorithm 1: the LR rule
# ====================================================================================================
def saturation(ity: Sequence[float], e: int) -> float:
    """Algorithm 1's saturation metric for epoch ``e`` (>= 2): ``d_s = (ITY_{e-1} - ITY_{e-2}) / ITY_{e-1}``.

    The denominator is floored at 1e-12 (a raw k-NN ITY can be <= 0): the sign of the change is kept.
    """
    if e < 2:
        return 1.0
    last, before = float(ity[e - 1]), float(ity[e - 2])
    return (last - before) / max(last, _TINY)


def mi_decay_lr(
    e: int,
    ity: Sequence[float],
    ixy: float,
    lr: float,
    *,
    lr_min: float,
    lr_max: float,
    lr_top: float,
    epsilon: float,
    epochs: int,
    start: str = "top",
    time_decay: str = "epsilon",
) -> tuple[float, dict[str, Any]]:
    r"""The LR of epoch ``e`` (1-based) under Algorithm 1, and the quantities that decided it.

    With ``r(x) = clip(x / IXY, 0, 1)`` (:func:`~lrpilot.estimators.mi.mi_ratio`):

    .. math::
        LR_1 &= LR_{top} \quad\text{or (start="mi")}\quad \max(r(ITY_0)\, LR_{max}, LR_{min}) \\
        d_p &= 1 - r(\max ITY_{0:e-1}), \qquad d_s = (ITY_{e-1} - ITY_{e-2}) / ITY_{e-1} \\
        LR_2 &= \max(d_p\, LR_{max}, LR_{min}) \\
        LR_e &= \max(d_p\, \tau_e\, LR_{max}, LR_{min}) \quad\text{if } d_s < \epsilon
                \text{, else } LR_{e-1} \quad (e > 2)

    with the time-decay factor ``tau_e = 1 - epsilon / E`` as printed in the paper (``time_decay=
    "epsilon"``), ``1 - e / E`` (``"epoch"``, the reading in which it is a time decay) or ``1``
    (``"none"``, which the paper says well-fitting models may use).

    Args:
        e: the epoch about to be trained, 1-based.
        ity: raw ITY estimates ``ITY_0 .. ITY_{e-1}`` (``ITY_0``: before training); at least ``e`` values.
        ixy: the ceiling IXY.
        lr: the LR in force (kept when the rule does not fire).
        lr_min, lr_max, lr_top, epsilon: Algorithm 2's output.
        epochs: the budget ``E``.
        start, time_decay: the variants above.

    Returns:
        ``(lr_e, info)`` with ``info = {"rule", "d_p", "d_s", "ratio", "tau"}``; ``rule`` is ``"start"``,
        ``"performance"`` (e = 2), ``"saturated"`` (e > 2, d_s < epsilon) or ``"keep"``.

    Example:
        >>> lr, info = mi_decay_lr(2, [0.1, 1.5], 2.0, 0.05, lr_min=1e-3, lr_max=0.2, lr_top=0.05,
        ...                        epsilon=0.01, epochs=10)
        >>> round(lr, 4), info["rule"]  # d_p = 1 - 1.5/2 = 0.25
        (0.05, 'performance')
    """
    if e < 1 or len(ity) < e:
        raise ValueError(f"epoch {e} needs ITY_0..ITY_{e - 1}, got {len(ity)} values")
    require_in("start", start, STARTS, method="mi-decay")
    require_in("time_decay", time_decay, TIME_DECAYS, method="mi-decay")
    if e == 1:
        ratio = mi_ratio(ity[0], ixy)
        new = lr_top if start == "top" else max(ratio * lr_max, lr_min)
        return new, {"rule": "start", "d_p": 1.0 - ratio, "d_s": 1.0, "ratio": ratio, "tau": 1.0}
    ratio = mi_ratio(max(ity[:e]), ixy)
    d_p = 1.0 - ratio
    d_s = saturation(ity, e)
    if e == 2:
        info = {"d_p": d_p, "d_s": d_s, "ratio": ratio, "tau": 1.0}
        return max(d_p * lr_max, lr_min), {"rule": "performance", **info}
    tau = max(0.0, {"epsilon": 1.0 - epsilon / epochs, "epoch": 1.0 - e / epochs, "none": 1.0}[time_decay])
    info = {"d_p": d_p, "d_s": d_s, "ratio": ratio, "tau": tau}
    if d_s < epsilon:
        return max(d_p * tau * lr_max, lr_min), {"rule": "saturated", **info}
    return lr, {"rule": "keep", **info}


# ====================================================================================================
# the MI subset
# ====================================================================================================
@dataclass
class MIProbeData:
    """The fixed subset the MI is estimated on: inputs, targets, and the sampled training indices."""

    inputs: torch.Tensor
    targets: torch.Tensor
    indices: list[int] | None


def sample_probe(loader: Any, n: int, seed: int) -> MIProbeData:
    """``n`` training samples drawn once, without replacement, by a generator seeded with ``seed``.

    Works on an in-memory :class:`~lrpilot.core.data.TensorLoader` (``inputs``/``targets``), a
    ``DataLoader`` over a map-style dataset, or (reservoir sampling over one pass) any iterable of
    ``(inputs, targets)`` batches. Fewer samples than ``n`` means all of them.
    """
    rng = np.random.default_rng(seed)
    inputs, targets = getattr(loader, "inputs", None), getattr(loader, "targets", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        idx = np.sort(rng.choice(len(inputs), size=min(n, len(inputs)), replace=False))
        index = torch.as_tensor(idx, device=inputs.device)
        return MIProbeData(inputs[index], targets[index.to(targets.device)], idx.tolist())
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        idx = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items])
        return MIProbeData(x, y, idx.tolist())
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    seen = 0
    for batch in loader:  # reservoir sampling (algorithm R) over one pass
        for x, y in zip(batch[0], batch[1]):
            if len(xs) < n:
                xs.append(x)
                ys.append(y)
            else:
                j = int(rng.integers(0, seen + 1))
                if j < n:
                    xs[j], ys[j] = x, y
            seen += 1
    if not xs:
        raise ValueError("the training loader yielded no samples for the MI subset")
    return MIProbeData(torch.stack(xs), torch.stack(ys), None)


# ====================================================================================================
# the pilot
# ====================================================================================================
class MIDecayPilot(Pilot):
    r"""Algorithm 1 of Vasudevan (2020): SGD whose LR follows the MI between the network and the labels.

    Before training it estimates the ceiling IXY on a fixed random subset of the training data (1000
    samples), then after every epoch the MI ``ITY`` between the network's output (``layerwise``: each
    layer's output) on that subset and the subset's targets, and sets the LR of the next epoch with
    :func:`mi_decay_lr`: ``LR_top`` first, then ``max(d_p LR_max, LR_min)``, then a further decay
    whenever ITY's relative gain ``d_s`` falls below ``epsilon``.

    ITY is Ross's k-NN estimate for classification (:func:`~lrpilot.estimators.mi.mi_continuous_discrete`)
    and KSG for regression (:func:`~lrpilot.estimators.mi.mi_continuous`), on the outputs the loop hands
    over in the ``PROBE`` signal (evaluation mode, forward hooks), with one fixed jitter seed so epoch-to-
    epoch changes are the network's, not the estimator's.

    Args:
        optimizer: the SGD optimizer (one param group per layer when ``modules`` has several entries).
        probe: the MI subset (:func:`sample_probe`).
        modules: per param group, the module whose output is that group's T (``""``: the model output).
        lr_min, lr_max, lr_top, epsilon: the range test's output.
        epochs: the budget E.
        task_kind: ``classification``, ``binary`` or ``regression``.
        ixy: the ceiling; ``None`` to estimate it before training, per ``ceiling``.
        ceiling: ``"entropy"`` (H(Y) of the subset labels), ``"ksg"`` (the paper's literal IXY: KSG
            algorithm 1 between the raw inputs and the targets, class labels as one-hot vectors, on the
            subset), ``"ross"`` (classification only: Ross's k-NN estimate of I(X; Y) against the labels)
            or ``"auto"`` (entropy for classification, ksg for regression).
        start, time_decay: see :func:`mi_decay_lr`.
        k, mi_seed, mi_backend, device: the estimator's neighbours, jitter seed, backend and device.
        loss_fn: to report the loss on the subset.
        stop_on_crash, crash_drop: range-test trials stop when the subset's activations turn non-finite,
            or when every attribute drops dramatically: the subset loss above its best / ``crash_drop``,
            ITY and (classification) the subset accuracy below ``crash_drop`` x their best so far.
        info: a dict shared with ``MethodParts.info``; the pilot adds the ``mi`` entry (IXY and friends).
        ity_output: classification: ITY of the model's ``"logits"`` (default) or of its ``"softmax"``
            probabilities (sigmoid for a binary task), as the paper's softmax-ended networks output.

    Note:
        Deviations from the paper, each measured or explained in ``docs/methods/mi-decay.md``: for
        classification the ceiling defaults to H(Y) of the subset labels, not the KSG estimate of
        I(X; Y), which on raw pixels falls far below H(Y) and below the ITY the network reaches, and
        pins the LR to LR_min from then on (``ceiling="ksg"`` restores it); ITY of a discrete Y uses Ross's k-NN
        estimator (the KSG construction for discrete labels); the ITY/IXY ratio is clamped to [0, 1].

    Example:
        >>> import torch, lrpilot
        >>> from lrpilot.core.data import TensorLoader
        >>> x, y = torch.randn(256, 5), torch.randint(0, 3, (256,))
        >>> loader = TensorLoader(x, y, 32)
        >>> hist = lrpilot.fit(torch.nn.Linear(5, 3), loader, loader, method="mi-decay", epochs=3,
        ...                    lr_min=1e-3, lr_max=0.1, lr_top=0.05, epsilon=0.01, progress=False)
        >>> [d.reason for d in hist.decisions][:2]
        ['mi-start', 'mi-performance']

    References:
        Vasudevan, "Mutual Information Based Learning Rate Decay for Stochastic Gradient Descent Training
        of Deep Neural Networks", Entropy 22(5) 560 (2020), Algorithm 1.
    """

    needs = frozenset({PROBE})

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        probe: MIProbeData,
        *,
        modules: Sequence[str] = ("",),
        lr_min: float,
        lr_max: float,
        lr_top: float,
        epsilon: float,
        epochs: int,
        task_kind: str = "classification",
        ixy: float | None = None,
        ceiling: str = "auto",
        start: str = "top",
        time_decay: str = "epsilon",
        k: int = 3,
        mi_seed: int = 0,
        mi_backend: str = "numpy",
        device: Any = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        stop_on_crash: bool = False,
        crash_drop: float = 0.5,
        info: dict[str, Any] | None = None,
        ity_output: str = "logits",
    ) -> None:
        super().__init__(optimizer)
        require_in("ity_output", ity_output, ITY_OUTPUTS, method="mi-decay")
        if len(modules) != len(optimizer.param_groups):
            raise ValueError(f"{len(modules)} probe modules for {len(optimizer.param_groups)} param groups")
        self.modules = tuple(modules)
        self.data = probe
        self.probe = Probe(probe.inputs, modules=tuple(dict.fromkeys(("", *self.modules))))
        self.bounds = {"lr_min": lr_min, "lr_max": lr_max, "lr_top": lr_top, "epsilon": epsilon}
        self.epochs = epochs
        self.kind = task_kind
        self.classification = task_kind in ("classification", "binary")
        self.binary = task_kind == "binary"
        self.ceiling = ("entropy" if self.classification else "ksg") if ceiling == "auto" else ceiling
        if self.ceiling in ("entropy", "ross") and not self.classification:
            raise ValueError(f"option ceiling={self.ceiling!r} of method 'mi-decay' needs class labels; use "
                             "'ksg' for regression")
        self.start = start
        self.time_decay = time_decay
        self.k = k
        self.mi_seed = mi_seed
        self.mi_backend = mi_backend
        self.device = device
        self.loss_fn = loss_fn
        self.stop_on_crash = stop_on_crash
        self.crash_drop = crash_drop
        # The paper's networks end in a softmax: "softmax" measures ITY on the probabilities (sigmoid for
        # a binary task), "logits" on the raw output. Only the model output "" is transformed.
        self.ity_output = ity_output if self.classification else "logits"
        self.info = info if info is not None else {}  # shared with MethodParts.info: lands in the run record
        self.labels = _labels(probe.targets, self.binary) if self.classification else None
        # State (what state_dict saves):
        self.ixy: float | None = ixy
        self.mi: dict[str, Any] = {}
        self.ity: list[list[float]] = [[] for _ in self.modules]
        self.records: list[dict[str, Any]] = []
        self._pending = {"d_p": 1.0, "d_s": 1.0}

    # -- MI ------------------------------------------------------------------------------------------
    def _estimate(self, t: torch.Tensor) -> float:
        """ITY of ``t`` on the subset: computed on rank 0 and broadcast, so every rank decides alike."""
        value = None
        if dist.is_main_process():
            target = self.labels if self.classification else self.data.targets
            value = estimate_mi(t, target, classification=self.classification, k=self.k, mi_seed=self.mi_seed,
                                mi_backend=self.mi_backend, device=self.device)
        return dist.broadcast_object(value)

    def _observe(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """ITY of every group, and the loss/accuracy on the subset, from the probe's outputs."""
        t0 = time.perf_counter()
        cache: dict[str, float] = {}
        for name in self.modules:
            if name not in cache:
                t = outputs[name]
                if name == "" and self.ity_output == "softmax":
                    t = torch.sigmoid(t) if self.binary else torch.softmax(t.reshape(len(t), -1), dim=1)
                cache[name] = self._estimate(t)
        out = outputs[""]
        obs: dict[str, Any] = {"ity": [cache[name] for name in self.modules], "mi_s": time.perf_counter() - t0}
        targets = self.data.targets.to(out.device)
        if self.loss_fn is not None:
            obs["loss"] = float(self.loss_fn(out, targets))
        if self.classification:
            pred = (out.reshape(-1) > 0).long() if self.binary else out.argmax(dim=1)
            obs["accuracy"] = float((pred.cpu() == torch.as_tensor(self.labels)).double().mean())
        return obs

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_begin(self, signals: EpochSignals) -> Decision | None:  # type: ignore[override]
        if self.ixy is None:
            mi = None
            if dist.is_main_process():  # one rank estimates, every rank holds the same value
                mi = estimate_ceiling(self.data, kind=self.kind, ceiling=self.ceiling, k=self.k,
                                      mi_seed=self.mi_seed, mi_backend=self.mi_backend, device=self.device)
            self.mi = dist.broadcast_object(mi)
            self.ixy = self.mi["ixy"]
        self.info.setdefault("mi", self.mi or {"ixy": self.ixy, "ceiling": "given"})
        obs = self._observe(signals[PROBE])
        for hist, value in zip(self.ity, obs["ity"]):
            hist.append(value)
        lrs, infos = self._rule(1)
        self._pending = {"d_p": infos[0]["d_p"], "d_s": infos[0]["d_s"]}
        self.records.append({"epoch": 0, **obs, "lr": None, "d_p": None, "d_s": None})
        return Decision(reason="mi-start", lr=lrs, info=self._info(obs, infos))

    def on_epoch_end(self, signals: EpochSignals) -> Decision | None:
        e = signals.epoch
        if signals.nonfinite:
            self.records.append({"epoch": e, "lr": list(signals.lr), "nonfinite": True, **self._pending})
            return None  # the loop stops the run as diverged
        outputs = signals[PROBE]
        if not all(bool(torch.isfinite(v).all()) for v in outputs.values()):
            # Finite weights and loss, but activations overflowed on the subset: the network has diverged
            # and ITY is undefined. A range-test trial has crashed; a training run stops, saying why.
            self.records.append({"epoch": e, "lr": list(signals.lr), "nonfinite": True, **self._pending})
            reason = "rrt-crash" if self.stop_on_crash else "mi-nonfinite-activations"
            return Decision(reason=reason, stop=True, info={"nonfinite_modules": [
                name for name, v in outputs.items() if not bool(torch.isfinite(v).all())]})
        obs = self._observe(outputs)
        for hist, value in zip(self.ity, obs["ity"]):
            hist.append(value)
        record = {"epoch": e, **obs, "train_loss": signals.train_loss, "lr": list(signals.lr), **self._pending}
        self.records.append(record)
        if self.stop_on_crash and self._crashed():
            return Decision(reason="rrt-crash", stop=True, info={"ity": obs["ity"], "accuracy": obs.get("accuracy")})
        if e >= self.epochs:  # budget spent: log the last ITY, nothing to decide
            return Decision(reason="mi-final", info=self._info(obs, None))
        lrs, infos = self._rule(e + 1)
        self._pending = {"d_p": infos[0]["d_p"], "d_s": infos[0]["d_s"]}
        changed = any(i["rule"] != "keep" for i in infos)
        reasons = {i["rule"] for i in infos if i["rule"] != "keep"}
        reason = f"mi-{reasons.pop()}" if len(reasons) == 1 else ("mi-decay" if changed else "mi-keep")
        return Decision(reason=reason, lr=lrs if changed else None, info=self._info(obs, infos))

    def _rule(self, e: int) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
        assert self.ixy is not None
        lrs, infos = [], []
        for hist, lr in zip(self.ity, current_lrs(self.optimizer)):
            new, info = mi_decay_lr(e, hist, self.ixy, lr, epochs=self.epochs, start=self.start,
                                    time_decay=self.time_decay, **self.bounds)
            lrs.append(new)
            infos.append(info)
        return tuple(lrs), infos

    def _info(self, obs: Mapping[str, Any], infos: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Raw ITY and IXY (unclamped) beside the clamped ratio and the rule's quantities."""
        assert self.ixy is not None
        info: dict[str, Any] = {
            "ity": obs["ity"],
            "ixy": self.ixy,
            "ratio_raw": [v / self.ixy if self.ixy else math.inf for v in obs["ity"]],
            "mi_s": obs["mi_s"],
        }
        for key in ("accuracy", "loss"):
            if key in obs:
                info[f"subset_{key}"] = obs[key]
        if infos is not None:
            for key in ("rule", "d_p", "d_s", "ratio", "tau"):
                info[key] = [i[key] for i in infos]
        if len(self.modules) == 1:  # network-level: scalars read better
            info = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in info.items()}
        return info

    def _crashed(self) -> bool:
        """A sudden, dramatic drop in *every* attribute: the subset loss grew above its best /
        ``crash_drop``, and ITY (and, for classification, the subset accuracy) fell below ``crash_drop`` x
        its best, over the earlier trained epochs."""
        trained = [r for r in self.records if r["epoch"] >= 1 and not r.get("nonfinite")]
        if len(trained) < 2:
            return False
        last, earlier = trained[-1], trained[:-1]
        if "loss" in last:
            best_loss = min(r["loss"] for r in earlier)
            if not last["loss"] > best_loss / self.crash_drop:
                return False
        getters: list[Callable[[Mapping[str, Any]], float]] = [lambda r: r["ity"][0]]
        if self.classification:
            getters.append(lambda r: r["accuracy"])
        for get in getters:
            best = max(get(r) for r in earlier)
            if not (best > 0 and get(last) < self.crash_drop * best):
                return False
        return True

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ixy": self.ixy,
            "mi": dict(self.mi),
            "bounds": dict(self.bounds),
            "ity": [list(h) for h in self.ity],
            "records": [dict(r) for r in self.records],
            "pending": dict(self._pending),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ixy = state["ixy"]
        self.mi = dict(state["mi"])
        self.bounds = dict(state["bounds"])
        self.ity = [list(h) for h in state["ity"]]
        self.records = [dict(r) for r in state["records"]]
        self._pending = dict(state["pending"])
        if self.mi:
            self.info["mi"] = dict(self.mi)


def _labels(targets: torch.Tensor, binary: bool) -> np.ndarray:
    y = targets.detach().cpu()
    if binary:
        y = y.reshape(-1)
    return y.numpy()


def estimate_mi(t: Any, target: Any, *, classification: bool, k: int = 3, mi_seed: int = 0,
                mi_backend: str = "numpy", device: Any = None) -> float:
    """I(T; Y) on the subset: Ross's estimator against labels, KSG against continuous targets."""
    kw = {"k": k, "seed": mi_seed, "backend": mi_backend, "device": device}
    if classification:
        return mi_continuous_discrete(t, target, **kw)
    return mi_continuous(t, target, **kw)


def one_hot(labels: Any) -> np.ndarray:
    """Class labels as one-hot rows (columns in sorted label order): Y as a softmax network's targets."""
    y = np.asarray(labels).reshape(-1)
    classes, index = np.unique(y, return_inverse=True)
    out = np.zeros((len(y), len(classes)))
    out[np.arange(len(y)), index] = 1.0
    return out


def estimate_ceiling(probe: MIProbeData, *, kind: str, ceiling: str = "auto", k: int = 3, mi_seed: int = 0,
                     mi_backend: str = "numpy", device: Any = None) -> dict[str, Any]:
    """IXY on the subset, and the one used as the ceiling.

    * ``ixy_ksg``: the paper's literal IXY, the KSG estimator (algorithm 1, max-norm, jitter) between the
      raw inputs and Y, class labels as one-hot vectors (the targets of the paper's softmax networks);
      for regression, the targets as they are.
    * ``ixy_ross`` (classification): Ross's k-NN estimator of I(X; Y) against the labels, the estimator
      of a continuous X and a discrete Y (what ``"ksg"`` computed before issue 16).
    * ``h_y`` (classification): the plug-in H(Y) of the subset labels, an exact DPI ceiling.

    Returns ``{"ixy", "ixy_ksg", "ixy_ross", "h_y", "ceiling", "samples", "ixy_s"}`` (``ixy_s``: seconds).
    """
    classification = kind in ("classification", "binary")
    if ceiling == "auto":
        ceiling = "entropy" if classification else "ksg"
    if ceiling in ("entropy", "ross") and not classification:
        raise ValueError(f"ceiling {ceiling!r} needs class labels; use 'ksg' for regression")
    t0 = time.perf_counter()
    kw = {"k": k, "seed": mi_seed, "backend": mi_backend, "device": device}
    if classification:
        labels = _labels(probe.targets, kind == "binary")
        ksg = mi_continuous(probe.inputs, one_hot(labels), **kw)
        ross = mi_continuous_discrete(probe.inputs, labels, **kw)
        h_y: float | None = label_entropy(labels)
    else:
        ksg = mi_continuous(probe.inputs, probe.targets, **kw)
        ross = h_y = None
    ixy = {"entropy": h_y, "ksg": ksg, "ross": ross}[ceiling]
    return {"ixy": ixy, "ixy_ksg": ksg, "ixy_ross": ross, "h_y": h_y, "ceiling": ceiling,
            "samples": len(probe.inputs), "ixy_s": time.perf_counter() - t0}


def layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules that own trainable parameters directly, in definition order: the layers of layer-wise MI."""
    layers = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            layers.append((name, params))
    return layers
