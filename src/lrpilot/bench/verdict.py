"""The verdict: what a user reads first, at the end of ``lrpilot bench`` and at the top of the report.

Per scored task, three or four rows, each the best of its kind on that task:

* **lrpilot auto**: the method tagged ``auto``, lrpilot's own autopilot (docs/methods/auto.md), when the
  bench ran it;
* **untuned autopilot**: the methods tagged ``seed-method`` (the learning-rate autopilots lrpilot is
  about, at their defaults);
* **tuned baseline**: the methods tagged ``tuned`` (an LR grid search before training), with their time
  to target both with the search charged and with it free;
* **LR-free peer**: the methods tagged ``peer`` (D-Adaptation, Prodigy, Schedule-Free, DoG, ...).

Each row shows the median best validation metric over seeds with its range (min-max), how many seeds
reached the target, and the median time to target in training seconds and in optimizer steps. Below
the rows comes the overall benchmark score table (:meth:`Leaderboard.score_table`).

**Which method is "best" of its kind on a task.** As AlgoPerf ranks on a workload: by the median time
to the target in training seconds, a time above ``r_max`` (4) times the fastest of *all* methods on the
task counting as never reached (AlgoPerf's cut); the tuned baselines by their time with the search
charged, then with it free. Ties (most often: several methods that never reach the target) are broken
by the median best validation metric, then by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lrpilot.bench.leaderboard import Cell, Leaderboard

__all__ = ["ROLES", "Verdict", "VerdictRow", "best_text", "verdict_of"]

#: The verdict's rows per task: (role, registry tag, what it is).
ROLES = (
    ("auto", "auto", "lrpilot auto"),
    ("autopilot", "seed-method", "untuned autopilot"),
    ("tuned", "tuned", "tuned baseline"),
    ("peer", "peer", "LR-free peer"),
)


#: Roles shown only when the bench ran a method of them.
OPTIONAL_ROLES = frozenset({"auto"})


@dataclass(frozen=True)
class VerdictRow:
    """The best method of one kind on one task (medians over its seeds)."""

    role: str  # a ROLES name
    label: str
    best: float | None  # median best validation metric
    best_range: tuple[float, float] | None  # (min, max) over seeds
    seeds: int
    reached: int  # seeds whose run reached the target
    secs: float  # median training seconds to target, search charged (inf: not reached)
    steps: float  # the same in optimizer steps
    secs_free: float  # search free (equal to ``secs`` for a method that is not tuned)
    steps_free: float
    candidates: int  # methods of this kind on the task


@dataclass
class Verdict:
    """Per task, the best untuned autopilot, tuned baseline and LR-free peer; then the score table."""

    board: Leaderboard
    rows: dict[str, list[VerdictRow]] = field(default_factory=dict)  # task -> rows in ROLES order
    missing: dict[str, list[str]] = field(default_factory=dict)  # task -> roles with no method in this bench

    def row(self, task: str, role: str) -> VerdictRow | None:
        return next((r for r in self.rows.get(task, []) if r.role == role), None)

    def to_text(self) -> str:
        board = self.board
        seeds = ",".join(map(str, board.seeds))
        lines = [
            (f"Verdict{f' ({board.suite})' if board.suite else ''}: per task, the best of each kind; medians over seeds "
             f"{seeds} [min-max]; time to target: training seconds and optimizer steps, '-' = not reached in the median"),
            ("  best of its kind: fastest to the target (AlgoPerf's measure, a time above "
             f"{board.r_max:g}x the task's fastest counting as never), ties by best metric"),
        ]  # fmt: skip
        width = max([len(r.label) for rows in self.rows.values() for r in rows] + [6]) + 2
        names = {name: text for name, _, text in ROLES}
        for task in board.tasks:
            target = board.targets[task]
            lines += ["", f"{task}: target {target.describe()}"]
            head = (f"  {'':<18}{'method':<{width}}{'best [min-max]':<26}{'reached':>8}{'s to target':>13}{'steps':>8}"
                    f"  {'search free: s, steps':<22}")  # fmt: skip
            lines.append(head.rstrip())
            for r in self.rows.get(task, []):
                free = f"{_secs(r.secs_free)}, {_steps(r.steps_free)}" if r.role == "tuned" else ""
                lines.append(
                    f"  {names[r.role]:<18}{r.label:<{width}}{best_text(r.best, r.best_range):<26}{f'{r.reached}/{r.seeds}':>8}"
                    f"{_secs(r.secs):>13}{_steps(r.steps):>8}  {free}".rstrip()
                )
            for role in self.missing.get(task, []):
                lines.append(f"  {names[role]:<18}(none in this bench)")
        lines += ["", "Benchmark score (every scored task; * = tuned baselines' search free):", *board.score_table()]
        return "\n".join(lines)


def verdict_of(board: Leaderboard) -> Verdict:
    """The verdict of a leaderboard (module docstring)."""
    verdict = Verdict(board)
    for task in board.tasks:
        target = board.targets[task]
        cells = {lb: c for lb in board.labels if (c := board.cell(lb, task)) is not None}
        fastest = min((c.times["train_s"] for c in cells.values()), default=math.inf)
        fastest_free = min((c.times["train_s_free"] for c in cells.values()), default=math.inf)
        verdict.rows[task] = []
        for role, tag, _ in ROLES:
            kind = [c for lb, c in cells.items() if tag in board.tags.get(lb, frozenset())]
            if role == "autopilot":  # untuned: a seed method someone tuned is not one any more
                kind = [c for c in kind if c.label not in board.tuned]
            if not kind:
                if role not in OPTIONAL_ROLES:  # a bench without auto (e.g. a paper's suite) is not missing it
                    verdict.missing.setdefault(task, []).append(role)
                continue
            keys = {c.label: _rank_key(c, role == "tuned", target.higher_is_better, fastest, fastest_free, board.r_max)
                    for c in kind}  # fmt: skip
            top = min(sorted(kind, key=lambda c: c.label), key=lambda c: keys[c.label])
            verdict.rows[task].append(VerdictRow(
                role=role, label=top.label, best=top.best, best_range=top.best_range, seeds=len(top.seeds),
                reached=top.reached, secs=top.times["train_s"], steps=top.times["steps"],
                secs_free=top.times["train_s_free"], steps_free=top.times["steps_free"], candidates=len(kind),
            ))  # fmt: skip
    return verdict


def _rank_key(cell: Cell, tuned: bool, higher_is_better: bool, fastest: float, fastest_free: float,
              r_max: float) -> tuple[float, ...]:  # fmt: skip
    """Smaller is better: seconds to target after the cut (a tuned baseline's charged, then free), then
    the median best metric (negated where higher is better; none = last)."""
    charged = _cut(cell.times["train_s"], fastest, r_max)
    best = math.inf if cell.best is None else (-cell.best if higher_is_better else cell.best)
    if tuned:
        return (charged, _cut(cell.times["train_s_free"], fastest_free, r_max), best)
    return (charged, best)


def _cut(time: float, fastest: float, r_max: float) -> float:
    """AlgoPerf's cut: a time above ``r_max`` times the fastest counts as never reached."""
    return time if math.isfinite(time) and time <= r_max * fastest else math.inf


def best_text(best: float | None, spread: tuple[float, float] | None) -> str:
    """``0.9778 [0.9750-0.9806]``: a median best metric and its range over seeds."""
    if best is None or not math.isfinite(best):
        return "nan"
    lo, hi = ("", "") if spread is None else (f"{spread[0]:.4f}", f"{spread[1]:.4f}")
    return f"{best:.4f}" if lo == hi else f"{best:.4f} [{lo}-{hi}]"


def _secs(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.2f}"


def _steps(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.0f}"

