"""The bench's leaderboard: AlgoPerf scoring (:mod:`lrpilot.bench.scoring`) applied to bench runs.

Per run, the time to the task's validation target is measured two ways: in **training seconds**
(``train_s`` of the first epoch whose validation metric reaches the target; evaluation excluded, as
AlgoPerf's submission time) and in **optimizer steps**. A method that searches before it trains (a
grid-tuned baseline, MI-decay's range test) reports the search in its run record
(``info.method.search``: ``total_steps``, ``total_train_s``, ...); that cost is added to its time, since
the run could not have started without it. Methods tagged ``tuned`` are scored a second time with the
search *not* charged ("search free": as if someone handed over the tuned LR), which shows what the
tuning itself costs. Per (method, task): the median over seeds (a failed run counts as never reaching
the target). Then AlgoPerf's rules: the 4x cut, performance ratios, profiles, benchmark score.

Columns of :class:`Leaderboard`:

* ``score``: benchmark score on training seconds, search charged (the headline number);
* ``score_steps``: the same on steps; ``score_free``, ``score_steps_free``: search free;
* per task: steps and seconds to target, median best and final validation metric (and its spread over
  seeds), and the overhead per step against the suite's reference method (plain SGD), in **CPU
  seconds** of the run's training thread (``train_cpu_s``, search excluded): each seed's
  ``train_cpu_s / steps`` over the reference's median on the same task; the cell shows the median over
  seeds, the leaderboard the geometric mean over tasks, each with the range of the per-seed ratios.
  Wall seconds would let a busy machine show a method that does more work per step as cheaper than
  SGD (a run that happened to share the CPU less); a thread's CPU seconds only count while it runs.
  Runs without CPU seconds (stores from before lrpilot recorded them) give no ratio.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lrpilot.bench.scoring import R_MAX, benchmark_scores, median_time, performance_profiles, time_to_target

__all__ = [
    "MEASURES",
    "Cell",
    "Leaderboard",
    "RunResult",
    "Target",
    "build_leaderboard",
    "latest_runs",
    "leaderboard_from_store",
    "load_targets",
    "results_from_store",
]

#: The four time measures scored: (name, what it is).
MEASURES = {
    "train_s": "training seconds to target, search charged",
    "steps": "optimizer steps to target, search charged",
    "train_s_free": "training seconds to target, tuned methods' search free",
    "steps_free": "optimizer steps to target, tuned methods' search free",
}


@dataclass(frozen=True)
class Target:
    """A task's validation target."""

    task: str
    value: float
    metric: str = ""
    higher_is_better: bool = True
    how: str = ""

    def describe(self) -> str:
        return f"{self.metric or 'metric'} {'>=' if self.higher_is_better else '<='} {self.value:.4g}"


def load_targets(path: str | Path | None = None) -> dict[str, Target]:
    """Targets from a ``targets.json`` (default: the one shipped with lrpilot, ``lrpilot calibrate``'s)."""
    if path is None:
        text = resources.files("lrpilot.bench").joinpath("data/targets.json").read_text()
    else:
        text = Path(path).read_text()
    data = json.loads(text)
    out = {}
    for task, entry in data.get("tasks", {}).items():
        if entry.get("target") is None:
            continue
        out[task] = Target(task, float(entry["target"]), entry.get("metric", ""), bool(entry.get("higher_is_better", True)),
                           entry.get("how", data.get("how", "")))  # fmt: skip
    return out


@dataclass(frozen=True)
class RunResult:
    """What scoring needs of one run.

    Attributes:
        task, label, seed: which run (``label`` is the method as the suite names it).
        status: ``completed``, ``stopped``, ``diverged`` or ``failed`` (no record).
        evals: ``(step, train_s, val_metric)`` per epoch, cumulative, in order.
        best, final: best and final validation metric (``None`` if none).
        steps, train_s: totals of the run itself (search excluded).
        search_steps, search_train_s: what the method spent searching before the run (0 if nothing).
        tuned: the method carries the ``tuned`` tag (also scored with its search free).
        higher_is_better: the metric's direction (``None`` for a failed run).
        train_cpu_s: CPU seconds of the run's training thread over the same spans as ``train_s``
            (``None``: not recorded).
        tags: the method's registry tags (the verdict picks its rows by them).
    """

    task: str
    label: str
    seed: int
    status: str
    evals: tuple[tuple[int, float, float | None], ...] = ()
    best: float | None = None
    final: float | None = None
    steps: int = 0
    train_s: float = 0.0
    search_steps: float = 0.0
    search_train_s: float = 0.0
    tuned: bool = False
    higher_is_better: bool | None = None
    train_cpu_s: float | None = None
    tags: frozenset[str] = frozenset()

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, label: str | None = None, tags: Iterable[str] = ()) -> RunResult:
        """From a run record (``docs/run-record.md``)."""
        s = record["summary"]
        search = ((record.get("info") or {}).get("method") or {}).get("search") or {}
        return cls(
            task=record["task"], label=label or record["method"], seed=int(record["seed"]), status=s.get("status", "completed"),
            evals=tuple((int(e["step"]), float(e["train_s"]), e.get("val_metric")) for e in record["epochs"]),
            best=s.get("best_val_metric"), final=s.get("final_val_metric"), steps=int(s.get("steps", 0)),
            train_s=float(s.get("train_s", 0.0)), search_steps=float(search.get("total_steps") or 0.0),
            search_train_s=float(search.get("total_train_s") or 0.0), tuned="tuned" in set(tags),
            higher_is_better=bool(record["metric"]["higher_is_better"]), train_cpu_s=s.get("train_cpu_s"),
            tags=frozenset(tags),
        )  # fmt: skip

    @classmethod
    def failed(cls, task: str, label: str, seed: int, *, tuned: bool = False, tags: Iterable[str] = ()) -> RunResult:
        return cls(task, label, seed, "failed", tuned=tuned, tags=frozenset(tags))

    def time_to(self, target: Target) -> tuple[float, float]:
        """``(steps, train_s)`` of the run itself to ``target`` (search excluded); ``inf`` if never."""
        if not self.evals:
            return math.inf, math.inf
        hib = target.higher_is_better if self.higher_is_better is None else self.higher_is_better
        values = [v for _, _, v in self.evals]
        steps = time_to_target(values, [s for s, _, _ in self.evals], target.value, higher_is_better=hib)
        secs = time_to_target(values, [t for _, t, _ in self.evals], target.value, higher_is_better=hib)
        return steps, secs

    @property
    def s_per_step(self) -> float | None:
        return self.train_s / self.steps if self.steps and self.train_s > 0 else None

    @property
    def cpu_per_step(self) -> float | None:
        """CPU seconds per optimizer step of the run itself (``None``: not recorded, or no step)."""
        cpu = self.train_cpu_s
        return cpu / self.steps if self.steps and cpu is not None and math.isfinite(cpu) and cpu > 0 else None


@dataclass
class Cell:
    """One method on one task, medians over its seeds (``inf``: the target was not reached)."""

    label: str
    task: str
    seeds: list[int]
    reached: int
    failed: int
    times: dict[str, float]  # measure -> median time (see MEASURES)
    best: float | None
    final: float | None
    s_per_step: float | None
    search_steps: float = 0.0
    search_train_s: float = 0.0
    overhead: float | None = None  # median over seeds of CPU s per step / the reference's (None: no ratio)
    overhead_range: tuple[float, float] | None = None  # min and max of the per-seed ratios
    best_range: tuple[float, float] | None = None  # min and max over seeds of the best metric
    cpu_per_step: float | None = None  # median over seeds


@dataclass
class Leaderboard:
    """Scores and per-task figures of every method; :meth:`to_text` prints it."""

    labels: list[str]
    tasks: list[str]
    targets: dict[str, Target]
    cells: dict[tuple[str, str], Cell]
    scores: dict[str, dict[str, float]]
    profiles: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]
    overhead: dict[str, float | None]
    tuned: set[str] = field(default_factory=set)
    reference: str | None = None
    seeds: list[int] = field(default_factory=list)
    unscored: dict[str, str] = field(default_factory=dict)  # task -> why it is not in the score
    suite: str = ""
    r_max: float = R_MAX
    # label -> mean over scored tasks of its rank by median best metric (1 = best): orders equal scores,
    # e.g. the many methods at 0 when a one-seed bench reaches few targets.
    best_rank: dict[str, float] = field(default_factory=dict)
    # label -> (min, max) of its per-seed overhead ratios over every task
    overhead_range: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    tags: dict[str, frozenset[str]] = field(default_factory=dict)  # label -> registry tags

    def cell(self, label: str, task: str) -> Cell | None:
        return self.cells.get((label, task))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (``inf`` written as ``null``)."""

        def num(v: Any) -> Any:
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

        return {
            "suite": self.suite, "r_max": self.r_max, "seeds": self.seeds, "reference": self.reference,
            "tasks": self.tasks, "unscored": self.unscored, "tuned": sorted(self.tuned),
            "targets": {t: {"value": x.value, "metric": x.metric, "higher_is_better": x.higher_is_better} for t, x in self.targets.items()},
            "ranking": [
                {"label": label, **{f"score_{m}": self.scores[m].get(label) for m in MEASURES}, "overhead": num(self.overhead.get(label)),
                 "overhead_range": self.overhead_range.get(label), "best_rank": num(self.best_rank.get(label)),
                "tasks": {task: {**{k: num(v) for k, v in c.times.items()}, "best": num(c.best), "final": num(c.final),
                                  "seeds": c.seeds, "reached": c.reached, "failed": c.failed, "overhead": num(c.overhead),
                                  "overhead_range": c.overhead_range, "best_range": c.best_range}
                           for task in self.tasks + list(self.unscored) if (c := self.cell(label, task)) is not None}}
                for label in self.labels
            ],
        }  # fmt: skip

    # -- text ----------------------------------------------------------------------------------------
    def to_text(self, *, per_task: bool = True, scores: bool = True) -> str:
        """The leaderboard as text: the score table (``scores``) and per-task tables (``per_task``)."""
        seeds = ",".join(map(str, self.seeds))
        lines = [
            f"Leaderboard{f' ({self.suite})' if self.suite else ''}: {len(self.tasks)} scored task(s), seeds {seeds}; "
            f"AlgoPerf benchmark score, r_max = {self.r_max:g} (1 = fastest to the target on every task)",
            "  score: training seconds to target (evaluation excluded), search before training charged; "
            "steps: the same in optimizer steps;",
            "  score*, steps*: the same with tuned baselines' search not charged; overhead: CPU seconds per step / the "
            f"reference's ({self.reference or 'none'}), geometric mean over tasks [min-max over tasks and seeds];",
            "  rank(best): mean over tasks of the rank by best validation metric, which orders equal scores",
        ]
        for task, why in self.unscored.items():
            lines.append(f"  not scored: {task} ({why})")
        width = self._width()
        if scores:
            lines += ["", *self.score_table()]
        if per_task:
            for task in self.tasks + list(self.unscored):
                target = self.targets.get(task)
                title = f"{task}: target {target.describe()}" if target else f"{task}: no target"
                lines += ["", f"{title}; medians over seeds ('-': target not reached)"]
                sub = f"  {'method':<{width}}{'steps':>8}{'train s':>9}{'best':>8}{'final':>8}{'failed':>7}  overhead (CPU)"
                lines += [sub]
                for label in self.labels:
                    c = self.cell(label, task)
                    if c is None:
                        continue
                    lines.append(
                        f"  {label:<{width}}{_steps(c.times['steps']):>8}{_secs(c.times['train_s']):>9}{_metric(c.best):>8}"
                        f"{_metric(c.final):>8}{f'{c.failed}/{len(c.seeds)}' if c.failed else '':>7}  "
                        f"{overhead_text(c.overhead, c.overhead_range):<20}".rstrip()
                    )
        return "\n".join(lines)

    def _width(self) -> int:
        return max([len(lb) + (len(" (tuned)") if lb in self.tuned else 0) for lb in self.labels] + [6]) + 2

    def score_table(self) -> list[str]:
        """The benchmark score table's lines: one row per method, best first."""
        width = self._width()
        head = (f"{'#':>3}  {'method':<{width}}{'score':>7}{'steps':>7}{'score*':>8}{'steps*':>8}{'reached':>9}"
                f"{'rank(best)':>11}  {'overhead (CPU)':<20}")  # fmt: skip
        lines = [head.rstrip(), "-" * len(head)]
        n_cells = len(self.tasks)
        for i, label in enumerate(self.labels, 1):
            reached = sum(1 for t in self.tasks if (c := self.cell(label, t)) is not None and math.isfinite(c.times["train_s"]))
            tag = " (tuned)" if label in self.tuned else ""
            lines.append(
                f"{i:>3}  {label + tag:<{width}}{self.scores['train_s'].get(label, 0.0):>7.3f}"
                f"{self.scores['steps'].get(label, 0.0):>7.3f}{self.scores['train_s_free'].get(label, 0.0):>8.3f}"
                f"{self.scores['steps_free'].get(label, 0.0):>8.3f}{f'{reached}/{n_cells}':>9}"
                f"{_rank(self.best_rank.get(label)):>11}  {overhead_text(self.overhead.get(label), self.overhead_range.get(label))}"
                .rstrip()
            )
        return lines


def overhead_text(ratio: float | None, spread: tuple[float, float] | None) -> str:
    """``1.05x [0.98-1.10]``: a ratio and the range it comes from; ``""`` where there is no ratio."""
    if ratio is None or not math.isfinite(ratio):
        return ""
    lo, hi = ("", "") if spread is None else (f"{spread[0]:.2f}", f"{spread[1]:.2f}")
    return f"{ratio:.2f}x" if lo == hi else f"{ratio:.2f}x [{lo}-{hi}]"


def _rank(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _steps(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.0f}"


def _secs(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.2f}"


def _metric(v: float | None) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _range(values: Sequence[float | None]) -> tuple[float, float] | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return (min(finite), max(finite)) if finite else None


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def build_leaderboard(
    results: Iterable[RunResult],
    targets: Mapping[str, Target],
    *,
    reference: str | None = "sgd",
    r_max: float = R_MAX,
    suite: str = "",
) -> Leaderboard:
    """Score runs the AlgoPerf way (module docstring).

    Args:
        results: every run (failed ones included: they count as never reaching the target).
        targets: ``task -> Target``; a task without one is shown but not scored.
        reference: the label overheads are measured against (``None``: no overhead column).
        r_max: the performance-profile cut-off (AlgoPerf: 4).
        suite: shown in the title.
    """
    by_cell: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in results:
        by_cell[(r.label, r.task)].append(r)
    labels = list(dict.fromkeys(label for label, _ in by_cell))
    all_tasks = list(dict.fromkeys(task for _, task in by_cell))
    tasks = [t for t in all_tasks if t in targets]
    unscored = {t: "no validation target: run `lrpilot calibrate`" for t in all_tasks if t not in targets}
    tuned = {label for (label, _), runs in by_cell.items() if any(r.tuned for r in runs)}

    cells: dict[tuple[str, str], Cell] = {}
    for (label, task), runs in by_cell.items():
        runs = sorted(runs, key=lambda r: r.seed)
        per: dict[str, list[float]] = {m: [] for m in MEASURES}
        reached = 0
        for r in runs:
            steps, secs = r.time_to(targets[task]) if task in targets else (math.inf, math.inf)
            reached += math.isfinite(secs)
            per["steps"].append(steps + r.search_steps)
            per["train_s"].append(secs + r.search_train_s)
            per["steps_free"].append(steps + (0.0 if r.tuned else r.search_steps))
            per["train_s_free"].append(secs + (0.0 if r.tuned else r.search_train_s))
        cells[(label, task)] = Cell(
            label=label, task=task, seeds=[r.seed for r in runs], reached=reached,
            failed=sum(r.status == "failed" for r in runs), times={m: median_time(v) for m, v in per.items()},
            best=_median([r.best for r in runs]), final=_median([r.final for r in runs]),
            best_range=_range([r.best for r in runs]), cpu_per_step=_median([r.cpu_per_step for r in runs]),
            s_per_step=_median([r.s_per_step for r in runs]),
            search_steps=_median([r.search_steps for r in runs]) or 0.0,
            search_train_s=_median([r.search_train_s for r in runs]) or 0.0,
        )  # fmt: skip

    overhead: dict[str, float | None] = {}
    overhead_range: dict[str, tuple[float, float] | None] = {}
    ref = reference if reference is not None and any(label == reference for label, _ in cells) else None
    for label in labels:
        per_task, per_seed = [], []
        for task in all_tasks:
            c, r = cells.get((label, task)), cells.get((ref, task)) if ref else None
            if c is None or r is None or not r.cpu_per_step:
                continue
            seeds = [run.cpu_per_step / r.cpu_per_step for run in by_cell[(label, task)] if run.cpu_per_step]
            if seeds:
                c.overhead, c.overhead_range = float(np.median(seeds)), (min(seeds), max(seeds))
                per_task.append(c.overhead)
                per_seed += seeds
        overhead[label] = float(np.exp(np.mean(np.log(per_task)))) if per_task else None
        overhead_range[label] = (min(per_seed), max(per_seed)) if per_seed else None

    scores: dict[str, dict[str, float]] = {}
    profiles = {}
    for m in MEASURES:
        table = {label: {task: cells[(label, task)].times[m] for task in tasks if (label, task) in cells} for label in labels}
        scores[m] = benchmark_scores(table, r_max=r_max, tasks=tasks)
        profiles[m] = performance_profiles(table, r_max=r_max, tasks=tasks)

    best_rank = _mean_best_rank(cells, labels, tasks, targets)
    order = sorted(labels, key=lambda lb: (-scores["train_s"][lb], -scores["steps"][lb], best_rank.get(lb, math.inf), lb))
    seeds = sorted({s for c in cells.values() for s in c.seeds})
    tags: dict[str, frozenset[str]] = {}
    for (label, _), runs in by_cell.items():
        tags[label] = tags.get(label, frozenset()).union(*(r.tags for r in runs))
    return Leaderboard(order, tasks, dict(targets), cells, scores, profiles, overhead, tuned, ref, seeds, unscored, suite,
                       r_max, best_rank, overhead_range, tags)  # fmt: skip


def _mean_best_rank(
    cells: Mapping[tuple[str, str], Cell], labels: Sequence[str], tasks: Sequence[str], targets: Mapping[str, Target]
) -> dict[str, float]:
    """label -> mean over the scored tasks of its rank by median best metric (ties share the lower rank;
    a method without a finite best on a task ranks last there)."""
    ranks: dict[str, list[float]] = defaultdict(list)
    for task in tasks:
        sign = 1.0 if targets[task].higher_is_better else -1.0
        keyed = {lb: -sign * c.best if (c := cells.get((lb, task))) and c.best is not None else math.inf
                 for lb in labels if (lb, task) in cells}  # fmt: skip
        for lb, key in keyed.items():
            ranks[lb].append(1.0 + sum(other < key for other in keyed.values()))
    return {lb: float(np.mean(r)) for lb, r in ranks.items()}


def latest_runs(store: Any, keys: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The store's run rows (only ``keys`` if given); where one (task, label, seed) was run under
    several configurations (e.g. two budgets written to one folder), the most recent."""
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in store.runs():  # oldest first
        if keys is None or row["key"] in keys:
            latest[(row["task"], row["label"], row["seed"])] = row
    return list(latest.values())


def results_from_store(store: Any, keys: Collection[str] | None = None) -> list[RunResult]:
    """The runs of a :class:`~lrpilot.bench.store.Store` (only ``keys`` if given) as :class:`RunResult`."""
    out = []
    for row in latest_runs(store, keys):
        tuned = "tuned" in set(row["tags"])
        if row["status"] == "failed":
            out.append(RunResult.failed(row["task"], row["label"], row["seed"], tuned=tuned, tags=row["tags"]))
            continue
        evals = tuple((e["step"], e["train_s"], e["val_metric"]) for e in store.epochs(row["key"]))
        out.append(RunResult(
            task=row["task"], label=row["label"], seed=row["seed"], status=row["status"], evals=evals,
            best=row["best_val_metric"], final=row["final_val_metric"], steps=row["steps"] or 0,
            train_s=row["train_s"] or 0.0, search_steps=row["search_steps"] or 0.0,
            search_train_s=row["search_train_s"] or 0.0, tuned=tuned, higher_is_better=bool(row["higher_is_better"]),
            train_cpu_s=row.get("train_cpu_s"), tags=frozenset(row["tags"]),
        ))  # fmt: skip
    return out


def leaderboard_from_store(
    store: Any,
    targets: Mapping[str, Target] | None = None,
    *,
    reference: str | None = "sgd",
    suite: str = "",
    keys: Collection[str] | None = None,
) -> Leaderboard:
    """The leaderboard of the runs in ``store`` (only ``keys`` if given; targets default to the shipped ones)."""
    targets = load_targets() if targets is None else targets
    return build_leaderboard(results_from_store(store, keys), targets, reference=reference, suite=suite)
