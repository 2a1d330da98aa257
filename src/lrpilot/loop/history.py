"""Telemetry of a run: per-epoch metrics, the LR of every group, every decision with its reason.

The JSON form (:meth:`History.to_record`) is a public contract, versioned by :data:`RECORD_FORMAT`;
``docs/run-record.md`` documents every field. Bump the version on any incompatible change and keep
:func:`load_record` reading older versions.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrpilot.loop.metrics import Metric

__all__ = ["RECORD_FORMAT", "DecisionRecord", "EpochRecord", "History", "jsonable", "load_record", "save_record"]

#: Version of the run-record JSON format (``format`` field).
RECORD_FORMAT = 1

#: At most this many per-step LR entries are kept (every k-th change beyond it, plus the last one).
MAX_STEP_LR_ENTRIES = 5000


@dataclass
class EpochRecord:
    """One epoch of the run's budget (rolled-back epochs included: they were trained and paid for).

    ``lr`` is the LR of each param group in force at the end of the epoch: after its last step (and the
    per-step schedule update that follows it), before the end-of-epoch decision, which appears in the
    decisions and in the next epoch's ``lr``. Where the method defines an effective LR (e.g.
    D-Adaptation's ``d * lr``) that is what is recorded. ``wall_s`` is cumulative wall time since the start of training; ``train_s`` the
    same without the time spent evaluating on the validation split (AlgoPerf's submission time: the
    method's own extra passes, e.g. AALR's loss over the training set, count as training).
    ``train_cpu_s`` is ``train_s`` measured in CPU seconds of the training thread (``time.thread_time``):
    other processes on a busy machine do not inflate it, so per-step costs compare honestly across
    runs that shared the CPU. It counts torch's intra-op worker threads only when there are none (one
    torch thread, the bench's default). ``None`` in records written before lrpilot recorded it.
    """

    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_metric: float
    lr: list[float]
    wall_s: float
    train_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    train_cpu_s: float | None = None


@dataclass
class DecisionRecord:
    """A decision of the method's pilot: the LR it set (after the decision), what it did and why."""

    epoch: int
    step: int
    lr: list[float]
    action: str
    reason: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """What :func:`lrpilot.fit` returns: everything that happened, epoch by epoch.

    Attributes:
        metric_name, higher_is_better: the validation metric and its direction.
        epochs: one :class:`EpochRecord` per epoch trained.
        decisions: every decision with its reason.
        step_lr: ``[step, [lr per group]]``: the LR after step ``step`` (``0``: before training), at
            every step where it changed, subsampled beyond :data:`MAX_STEP_LR_ENTRIES`; only for
            methods whose LR moves within an epoch.
        status: ``"completed"``, ``"stopped"`` (a pilot stopped it) or ``"diverged"``.
        final: metrics of the model in hand at the end, when a final decision (e.g. restoring the best
            checkpoint) changed it after the last epoch; else empty.
    """

    metric_name: str = "loss"
    higher_is_better: bool = False
    epochs: list[EpochRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    step_lr: list[list[Any]] = field(default_factory=list)
    status: str = "completed"
    status_reason: str = ""
    final: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _step_lr_stride: int = 1

    # -- recording -----------------------------------------------------------------------------------
    def record_step_lr(self, step: int, lrs: tuple[float, ...]) -> None:
        """Record the per-step LR when it changed; thin the series to stay under the cap."""
        if self.step_lr and self.step_lr[-1][1] == list(lrs):
            return
        if len(self.step_lr) >= MAX_STEP_LR_ENTRIES:
            self.step_lr = self.step_lr[::2]
            self._step_lr_stride *= 2
        if self._step_lr_stride > 1 and step % self._step_lr_stride:
            return
        self.step_lr.append([step, list(lrs)])

    # -- summaries -----------------------------------------------------------------------------------
    def _finite_metrics(self) -> list[float]:
        return [e.val_metric for e in self.epochs if math.isfinite(e.val_metric)]

    @property
    def best_val_metric(self) -> float:
        values = self._finite_metrics()
        if not values:
            return math.nan
        return max(values) if self.higher_is_better else min(values)

    @property
    def final_val_metric(self) -> float:
        if "val_metric" in self.final:
            return self.final["val_metric"]
        return self.epochs[-1].val_metric if self.epochs else math.nan

    @property
    def steps(self) -> int:
        return self.epochs[-1].step if self.epochs else 0

    @property
    def wall_s(self) -> float:
        return self.epochs[-1].wall_s if self.epochs else 0.0

    def lr_trajectory(self, group: int = 0) -> list[float]:
        """The LR of ``group`` at the end of every epoch."""
        return [e.lr[group] for e in self.epochs]

    def summary(self) -> dict[str, Any]:
        return {
            "best_val_metric": self.best_val_metric,
            "final_val_metric": self.final_val_metric,
            "steps": self.steps,
            "epochs": len(self.epochs),
            "wall_s": self.wall_s,
            "train_s": self.epochs[-1].train_s if self.epochs else 0.0,
            "train_cpu_s": self.epochs[-1].train_cpu_s if self.epochs else 0.0,
            "status": self.status,
            "status_reason": self.status_reason,
        }

    # -- serialisation -------------------------------------------------------------------------------
    def to_record(
        self,
        *,
        task: str | None,
        method: str,
        seed: int,
        config: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The run record: the versioned JSON document ``lrpilot train --out`` writes."""
        from lrpilot._version import __version__

        return jsonable(
            {
                "format": RECORD_FORMAT,
                "lrpilot_version": __version__,
                "task": task,
                "method": method,
                "seed": seed,
                "config": dict(config),
                "metric": {"name": self.metric_name, "higher_is_better": self.higher_is_better},
                "epochs": [asdict(e) for e in self.epochs],
                "decisions": [asdict(d) for d in self.decisions],
                "step_lr": self.step_lr,
                "summary": self.summary(),
                "final": self.final,
                "info": self.info,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "platform": platform.platform(),
                },
            }
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> History:
        hist = cls(
            metric_name=record["metric"]["name"],
            higher_is_better=record["metric"]["higher_is_better"],
            epochs=[EpochRecord(**_floats(e)) for e in record["epochs"]],
            decisions=[DecisionRecord(**d) for d in record["decisions"]],
            step_lr=record.get("step_lr", []),
            status=record["summary"].get("status", "completed"),
            status_reason=record["summary"].get("status_reason", ""),
            final=record.get("final", {}),
            info=record.get("info", {}),
        )
        return hist


def _floats(entry: Mapping[str, Any]) -> dict[str, Any]:
    """JSON ``null`` back to ``nan`` for the float fields."""
    out = dict(entry)
    for key in ("train_loss", "val_loss", "val_metric"):
        if out.get(key) is None:
            out[key] = math.nan
    return out


def jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become ``null`` (JSON has no NaN), tuples lists, tensors floats."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return repr(obj)


def save_record(record: Mapping[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    tmp.replace(path)  # atomic: a killed process never leaves half a record


def load_record(path: str | Path) -> dict[str, Any]:
    record = json.loads(Path(path).read_text())
    fmt = record.get("format")
    if fmt != RECORD_FORMAT:
        raise ValueError(f"{path}: run record format {fmt!r} is not supported (this lrpilot reads {RECORD_FORMAT})")
    return record


def metric_info(metric: Metric) -> dict[str, Any]:
    return {"name": metric.name, "higher_is_better": metric.higher_is_better}
