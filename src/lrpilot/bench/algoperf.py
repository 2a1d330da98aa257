"""Score AlgoPerf's own logs with :mod:`lrpilot.bench.scoring` (``lrpilot score-algoperf PATH``).

This is how lrpilot proves its scoring code: it recomputes the published AlgoPerf v0.5 self-tuning
leaderboard (Schedule-Free AdamW 0.8542, the baseline 0.8194, ...) from the public logs, to 4 decimals
(``tests/test_algoperf.py``).

Inputs:

* a log folder laid out as AlgoPerf writes it,
  ``<submission>/study_<k>/<workload>_<framework>/trial_<n>/eval_measurements.csv`` (any number of
  folders above ``<submission>``), or
* a compact CSV (optionally gzipped) with the columns ``submission, study, workload, trial, time,
  value`` (:func:`write_compact` derives it from a log folder; the tests ship one).

The workloads' targets, metric names and held-out variants default to AlgoPerf v0.5's
(``bench/data/algoperf_v05.json``, copied from mlcommons/submissions_algorithms, Apache-2.0).

Rules, in this order (AlgoPerf v0.5's scoring code; applying them in this order reproduces the table):

1. Per submission, workload and study: the time (``score``, i.e. ``accumulated_submission_time``) of
   the first evaluation whose validation metric reaches the target; never reached = ``inf``. With
   several trials in a study (the external-tuning ruleset) the study's time is the fastest trial's.
   A workload's time is the median over the submission's studies.
2. A held-out variant's time becomes ``inf`` where its base workload's time is.
3. Every time above 4x the fastest submission's on that workload (base or variant) becomes ``inf``.
4. A base workload's time becomes ``inf`` where its held-out variant's time is.
5. Benchmark score over the base workloads (:func:`lrpilot.bench.scoring.benchmark_scores`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lrpilot.bench.scoring import R_MAX, benchmark_scores, cut_slow, median_time, time_to_target

__all__ = [
    "AlgoPerfResult",
    "Evaluation",
    "Workloads",
    "read_evaluations",
    "score_algoperf",
    "score_evaluations",
    "thin_for_scoring",
    "write_compact",
]

#: Metrics where lower is better (AlgoPerf's ``loss``, ``wer``, ``error_rate``, ...); every other
#: target metric (accuracy, ssim, mean_average_precision, bleu) must reach the target from below.
LOWER_IS_BETTER = frozenset({"loss", "wer", "error_rate", "ctc_loss", "l1_loss", "mse"})

COMPACT_COLUMNS = ("submission", "study", "workload", "trial", "time", "value")


@dataclass(frozen=True)
class Workloads:
    """AlgoPerf's workload definitions: targets, base workloads and held-out variants."""

    targets: Mapping[str, tuple[str, float]]  # workload -> (target metric name, validation target value)
    base: tuple[str, ...]
    held_out: tuple[str, ...]

    @classmethod
    def v05(cls) -> Workloads:
        """AlgoPerf v0.5's, shipped with lrpilot."""
        text = resources.files("lrpilot.bench").joinpath("data/algoperf_v05.json").read_text()
        return cls.from_json(json.loads(text))

    @classmethod
    def from_files(cls, targets: str | Path, held_out: str | Path | None = None) -> Workloads:
        """From AlgoPerf's ``workload_targets_*.json`` (and optionally a held-out workloads list)."""
        data = json.loads(Path(targets).read_text())
        if held_out is not None:
            data["held_out_workloads"] = json.loads(Path(held_out).read_text())
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workloads:
        try:
            targets = {
                name: (str(w["target_metric_name"]), float(w["validation_target_value"]))
                for name, w in data["workloads"].items()
            }
            base, held_out = tuple(data["base_workloads"]), tuple(data["held_out_workloads"])
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"workload definitions need 'workloads' (each with target_metric_name and "
                f"validation_target_value), 'base_workloads' and 'held_out_workloads'; missing {err}"
            ) from None
        unknown = [w for w in (*base, *held_out) if w not in targets]
        if unknown:
            raise ValueError(f"workloads without a target: {', '.join(unknown)}")
        return cls(targets, base, held_out)

    def base_of(self, variant: str) -> str:
        """The base workload a held-out variant belongs to: the longest base name it extends."""
        candidates = [b for b in self.base if variant.startswith(b + "_")]
        if not candidates:
            raise ValueError(f"held-out workload {variant!r} extends none of the base workloads {list(self.base)}")
        return max(candidates, key=len)

    def higher_is_better(self, workload: str) -> bool:
        return self.targets[workload][0] not in LOWER_IS_BETTER


@dataclass(frozen=True)
class Evaluation:
    """One row of an ``eval_measurements.csv``: what scoring needs of it."""

    submission: str
    study: str
    workload: str
    trial: str
    time: float
    value: float | None  # the workload's target metric on the validation split (None: not logged)


@dataclass
class AlgoPerfResult:
    """Scores of a set of submissions.

    Attributes:
        scores: ``submission -> benchmark score``.
        times: ``submission -> workload -> time`` after every rule (what the score is computed from).
        study_times: ``submission -> workload -> [time per study]`` (rule 1, before the median).
        workloads: the definitions used.
    """

    scores: dict[str, float]
    times: dict[str, dict[str, float]]
    study_times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    workloads: Workloads | None = None

    def ranking(self) -> list[tuple[str, float]]:
        """``(submission, score)``, best first (ties by name)."""
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_text(self) -> str:
        lines = [f"{'submission':<28} {'benchmark score':>15}"]
        lines += [f"{sub:<28} {score:>15.4f}" for sub, score in self.ranking()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------
def read_evaluations(path: str | Path, workloads: Workloads | None = None) -> list[Evaluation]:
    """Every evaluation of an AlgoPerf log folder or of a compact CSV, in file order."""
    workloads = workloads or Workloads.v05()
    path = Path(path)
    if path.is_file():
        return list(_read_compact(path))
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such AlgoPerf log folder or compact CSV")
    files = sorted(path.rglob("eval_measurements.csv"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no eval_measurements.csv below it (expected "
            "<submission>/study_<k>/<workload>_<framework>/trial_<n>/eval_measurements.csv)"
        )
    rows: list[Evaluation] = []
    for file in files:
        trial_dir = file.parent
        workload_dir, study_dir = trial_dir.parent, trial_dir.parent.parent
        submission = study_dir.parent.name
        workload = workload_dir.name.rsplit("_", 1)[0]  # drop the framework: wmt_jax -> wmt
        if workload not in workloads.targets:
            raise ValueError(f"{file}: workload {workload!r} has no target in the workload definitions")
        metric = workloads.targets[workload][0]
        with file.open(newline="") as f:
            for row in csv.DictReader(f):
                time = row.get("score") or row["accumulated_submission_time"]
                rows.append(
                    Evaluation(submission, study_dir.name, workload, trial_dir.name, float(time),
                               _number(row.get(f"validation/{metric}")))
                )  # fmt: skip
    return rows


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _read_compact(path: Path) -> Iterator[Evaluation]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COMPACT_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: a compact AlgoPerf CSV needs the columns {', '.join(COMPACT_COLUMNS)}; "
                             f"missing {', '.join(sorted(missing))}")
        for row in reader:
            yield Evaluation(row["submission"], row["study"], row["workload"], row["trial"], float(row["time"]),
                             _number(row["value"]))


def thin_for_scoring(evaluations: Iterable[Evaluation], workloads: Workloads | None = None) -> list[Evaluation]:
    """The evaluations scoring depends on, and their neighbours: per trial, the first one reaching the
    target with the one before and the one after it; for a trial that never reaches it, its last one
    (so the study still counts, as ``inf``). Scores computed from the result equal the full logs'."""
    workloads = workloads or Workloads.v05()
    trials: dict[tuple[str, str, str, str], list[Evaluation]] = defaultdict(list)
    for e in evaluations:
        trials[(e.submission, e.study, e.workload, e.trial)].append(e)
    kept: list[Evaluation] = []
    for (_, _, workload, _), rows in trials.items():
        target, hib = workloads.targets[workload][1], workloads.higher_is_better(workload)
        hit = next((i for i, e in enumerate(rows) if time_to_target([e.value], [e.time], target, higher_is_better=hib) < math.inf), None)
        kept += rows[-1:] if hit is None else rows[max(hit - 1, 0) : hit + 2]
    return kept


def write_compact(evaluations: Iterable[Evaluation], path: str | Path) -> Path:
    """Write evaluations as a compact CSV (gzipped if ``path`` ends in ``.gz``, byte-reproducible).

    Values are written with ``repr`` so they read back bit for bit.
    """
    path = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COMPACT_COLUMNS)
    for e in evaluations:
        writer.writerow([e.submission, e.study, e.workload, e.trial, repr(e.time), "" if e.value is None else repr(e.value)])
    data = buf.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def score_evaluations(
    evaluations: Iterable[Evaluation], workloads: Workloads | None = None, *, r_max: float = R_MAX
) -> AlgoPerfResult:
    """Apply rules 1-5 (module docstring) to a list of evaluations."""
    workloads = workloads or Workloads.v05()
    # Rule 1: the first evaluation reaching the target, per trial (in file order).
    per_trial: dict[tuple[str, str, str, str], tuple[list[float | None], list[float]]] = defaultdict(lambda: ([], []))
    for e in evaluations:
        values, times = per_trial[(e.submission, e.workload, e.study, e.trial)]
        values.append(e.value)
        times.append(e.time)
    study: dict[tuple[str, str, str], float] = {}
    for (sub, workload, st, _trial), (values, times) in per_trial.items():
        if workload not in workloads.targets:
            raise ValueError(f"workload {workload!r} of submission {sub!r} has no target")
        target = workloads.targets[workload][1]
        t = time_to_target(values, times, target, higher_is_better=workloads.higher_is_better(workload))
        study[(sub, workload, st)] = min(t, study.get((sub, workload, st), math.inf))  # best trial of a study

    submissions = sorted({sub for sub, _, _ in study})
    all_workloads = [*workloads.base, *workloads.held_out]
    study_times: dict[str, dict[str, list[float]]] = {sub: {w: [] for w in all_workloads} for sub in submissions}
    for (sub, workload, st), t in sorted(study.items()):
        if workload in study_times[sub]:
            study_times[sub][workload].append(t)
    times = {sub: {w: median_time(ts) for w, ts in row.items()} for sub, row in study_times.items()}

    # Rule 2: a variant counts only where its base workload was reached.
    for row in times.values():
        for variant in workloads.held_out:
            if math.isinf(row[workloads.base_of(variant)]):
                row[variant] = math.inf
    # Rule 3: the r_max cut on every workload, base and variant alike.
    times = cut_slow(times, r_max, all_workloads)
    # Rule 4: a base workload counts only where its held-out variant was reached.
    for row in times.values():
        for variant in workloads.held_out:
            if math.isinf(row[variant]):
                row[workloads.base_of(variant)] = math.inf
    # Rule 5: the profile over the base workloads.
    scores = benchmark_scores(times, r_max=r_max, tasks=workloads.base)
    return AlgoPerfResult(scores, times, study_times, workloads)


def score_algoperf(path: str | Path, workloads: Workloads | None = None, *, r_max: float = R_MAX) -> AlgoPerfResult:
    """Score the AlgoPerf logs (folder or compact CSV) at ``path``; see the module docstring."""
    workloads = workloads or Workloads.v05()
    return score_evaluations(read_evaluations(path, workloads), workloads, r_max=r_max)
