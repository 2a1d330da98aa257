"""Score AlgoPerf's own logs with :mod:`lrpilot.bench.scoring` (``lrpilot score-algoperf PATH``).

This is how lrpilot proves its scoring code: it recomputes the published AlgoPerf v0.5 self-tuning
leaderboard (Schedule-Free AdamW 0.8542, the baseline 0.8194, ...) from the public logs, to 4 decimals
(``tests/test_algoperf.py``).

Inputs:

* a log folder laid out as AlgoPerf writes it,
  ``<submission>/study_<k>/<workload>_<framework>/trial_<n>/eval_measurements.csv`` (any number of
  folders above ``<submission>``; ``<framework>`` is ``jax`` or ``pytorch``, AlgoPerf's
  ``WORKLOAD_NAME_PATTERN``). A file elsewhere, e.g. a stray ``study_<k>/trial_<n>/`` folder with no
  workload folder (the public v0.5 external-tuning tree has some), is skipped with a warning naming it;
* a compact CSV (optionally gzipped) with the columns ``submission, study, workload, trial, time,
  value`` and optionally ``index`` (the evaluation's position in its trial's log; without it, the
  row's position among its trial's rows); :func:`write_compact` derives one from a log folder, and the
  tests ship one.

The workloads' targets, metric names and held-out variants default to AlgoPerf v0.5's
(``bench/data/algoperf_v05.json``, copied from mlcommons/submissions_algorithms, Apache-2.0).

Rules, in this order (AlgoPerf v0.5's scoring code; applying them in this order reproduces the table):

1. Per submission, workload, study and trial: the first evaluation whose validation metric reaches the
   target. A study's time is one trial's time (``score``, i.e. ``accumulated_submission_time``) at its
   first hit; which trial is the *trial rule*:

   * ``eval-index`` (default; the v0.5 scoring code, ``get_best_trial_index`` in
     ``scoring/performance_profile.py``): the trial whose first hit has the smallest *evaluation
     index* (position in its log), ties to the first trial in trial-number order; its time is taken
     even where another trial reached the target in less time with more evaluations;
   * ``fastest`` (the rules document's wording): the smallest time over the study's trials.

   No trial reaching the target = ``inf``. The self-tuning ruleset has one trial per study, where both
   rules agree. A workload's time is the median over the submission's studies.
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
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lrpilot.bench.scoring import R_MAX, benchmark_scores, cut_slow, median_time, reaches

__all__ = [
    "TRIAL_RULES",
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
#: Optional column of a compact CSV: the evaluation's position in its trial's log.
INDEX_COLUMN = "index"

#: How a study's trial is chosen (module docstring, rule 1): name -> what it does.
TRIAL_RULES = {
    "eval-index": "the trial whose first target hit has the smallest evaluation index (AlgoPerf v0.5's scoring code)",
    "fastest": "the trial whose first target hit has the smallest time (AlgoPerf's rules document)",
}

# AlgoPerf's WORKLOAD_NAME_PATTERN: a workload folder is the workload's name and its framework.
_WORKLOAD_DIR = re.compile(r"(.+)_(jax|pytorch)")

log = logging.getLogger(__name__)


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
    index: int | None = None  # position in the trial's log (None: its position among the trial's rows)


@dataclass
class AlgoPerfResult:
    """Scores of a set of submissions.

    Attributes:
        scores: ``submission -> benchmark score``.
        times: ``submission -> workload -> time`` after every rule (what the score is computed from).
        study_times: ``submission -> workload -> [time per study]`` (rule 1, before the median).
        workloads: the definitions used.
        trial_rule: how each study's trial was chosen (:data:`TRIAL_RULES`).
    """

    scores: dict[str, float]
    times: dict[str, dict[str, float]]
    study_times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    workloads: Workloads | None = None
    trial_rule: str = "eval-index"

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
    stray: list[Path] = []
    for file in files:
        trial_dir = file.parent
        workload_dir, study_dir = trial_dir.parent, trial_dir.parent.parent
        named = _WORKLOAD_DIR.fullmatch(workload_dir.name)
        if named is None:  # no <workload>_<framework> folder above the trial: not where AlgoPerf writes
            stray.append(file)
            continue
        workload = named.group(1)  # drop the framework: wmt_jax -> wmt
        if workload not in workloads.targets:
            raise ValueError(f"{file}: workload {workload!r} has no target in the workload definitions")
        metric = workloads.targets[workload][0]
        with file.open(newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                time = row.get("score") or row["accumulated_submission_time"]
                rows.append(
                    Evaluation(study_dir.parent.name, study_dir.name, workload, trial_dir.name, float(time),
                               _number(row.get(f"validation/{metric}")), i)
                )  # fmt: skip
    if stray:
        log.warning(
            "skipped %d eval_measurements.csv outside <submission>/study_<k>/<workload>_<framework>/trial_<n>/ "
            "(no workload folder above the trial): %s", len(stray), ", ".join(str(f.relative_to(path)) for f in stray),
        )  # fmt: skip
    if not rows:
        raise FileNotFoundError(f"{path}: every eval_measurements.csv below it is outside the expected layout (warned above)")
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
        has_index = INDEX_COLUMN in (reader.fieldnames or ())
        for row in reader:
            index = int(row[INDEX_COLUMN]) if has_index and row[INDEX_COLUMN] != "" else None
            yield Evaluation(row["submission"], row["study"], row["workload"], row["trial"], float(row["time"]),
                             _number(row["value"]), index)


def thin_for_scoring(evaluations: Iterable[Evaluation], workloads: Workloads | None = None) -> list[Evaluation]:
    """The evaluations scoring depends on, and their neighbours: per trial, the first one reaching the
    target with the one before and the one after it; for a trial that never reaches it, its last one
    (so the study still counts, as ``inf``). Scores computed from the result equal the full logs'."""
    workloads = workloads or Workloads.v05()
    trials: dict[tuple[str, str, str, str], list[Evaluation]] = defaultdict(list)
    for e in _indexed(evaluations):  # each row keeps its position in the full log
        trials[(e.submission, e.study, e.workload, e.trial)].append(e)
    kept: list[Evaluation] = []
    for (_, _, workload, _), rows in trials.items():
        target, hib = workloads.targets[workload][1], workloads.higher_is_better(workload)
        hit = next((i for i, e in enumerate(rows) if reaches(e.value, target, higher_is_better=hib)), None)
        kept += rows[-1:] if hit is None else rows[max(hit - 1, 0) : hit + 2]
    return kept


def write_compact(evaluations: Iterable[Evaluation], path: str | Path) -> Path:
    """Write evaluations as a compact CSV (gzipped if ``path`` ends in ``.gz``, byte-reproducible).

    Values are written with ``repr`` so they read back bit for bit; the ``index`` column keeps each
    evaluation's position in its log, which the ``eval-index`` trial rule needs once rows are thinned.
    """
    path = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow((*COMPACT_COLUMNS, INDEX_COLUMN))
    for e in _indexed(evaluations):
        writer.writerow([e.submission, e.study, e.workload, e.trial, repr(e.time), "" if e.value is None else repr(e.value),
                         e.index])  # fmt: skip
    data = buf.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def _indexed(evaluations: Iterable[Evaluation]) -> list[Evaluation]:
    """The evaluations with ``index`` filled in where missing: the position among its trial's rows."""
    seen: dict[tuple[str, str, str, str], int] = defaultdict(int)
    out = []
    for e in evaluations:
        key = (e.submission, e.study, e.workload, e.trial)
        if e.index is None:
            e = Evaluation(e.submission, e.study, e.workload, e.trial, e.time, e.value, seen[key])
        seen[key] += 1
        out.append(e)
    return out


def _trial_order(trial: str) -> tuple[Any, ...]:
    """Trial-number order (trial_2 before trial_10): how ties between trials are broken."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", trial))


def score_evaluations(
    evaluations: Iterable[Evaluation],
    workloads: Workloads | None = None,
    *,
    r_max: float = R_MAX,
    trial_rule: str = "eval-index",
) -> AlgoPerfResult:
    """Apply rules 1-5 (module docstring) to a list of evaluations.

    Args:
        evaluations: every evaluation (each trial's in log order).
        workloads: the workload definitions (default: AlgoPerf v0.5's).
        r_max: the performance-profile cut-off (AlgoPerf: 4).
        trial_rule: which trial of a study counts, a key of :data:`TRIAL_RULES`.
    """
    if trial_rule not in TRIAL_RULES:
        raise ValueError(f"trial_rule must be one of {', '.join(TRIAL_RULES)}, got {trial_rule!r}")
    workloads = workloads or Workloads.v05()
    # Rule 1: the first evaluation reaching the target, per trial: (evaluation index, time) of it.
    per_trial: dict[tuple[str, str, str, str], list[Evaluation]] = defaultdict(list)
    for e in _indexed(evaluations):
        per_trial[(e.submission, e.workload, e.study, e.trial)].append(e)
    hits: dict[tuple[str, str, str], list[tuple[int, tuple[Any, ...], float]]] = defaultdict(list)
    for (sub, workload, st, trial), rows in per_trial.items():
        if workload not in workloads.targets:
            raise ValueError(f"workload {workload!r} of submission {sub!r} has no target")
        target, hib = workloads.targets[workload][1], workloads.higher_is_better(workload)
        hits.setdefault((sub, workload, st), [])
        first = next((e for e in rows if reaches(e.value, target, higher_is_better=hib)), None)
        if first is not None:
            hits[(sub, workload, st)].append((int(first.index or 0), _trial_order(trial), first.time))
    study: dict[tuple[str, str, str], float] = {}
    for key, trial_hits in hits.items():
        if not trial_hits:
            study[key] = math.inf
        elif trial_rule == "eval-index":
            study[key] = min(trial_hits, key=lambda h: (h[0], h[1]))[2]
        else:
            study[key] = min(h[2] for h in trial_hits)

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
    return AlgoPerfResult(scores, times, study_times, workloads, trial_rule)


def score_algoperf(
    path: str | Path, workloads: Workloads | None = None, *, r_max: float = R_MAX, trial_rule: str = "eval-index"
) -> AlgoPerfResult:
    """Score the AlgoPerf logs (folder or compact CSV) at ``path``; see the module docstring."""
    workloads = workloads or Workloads.v05()
    return score_evaluations(read_evaluations(path, workloads), workloads, r_max=r_max, trial_rule=trial_rule)
