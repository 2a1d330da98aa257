"""The bench report: ``DIR/report.html`` with PNG figures in ``DIR/figures/`` (``lrpilot report DIR``).

Everything is read from the results store, so a report can be made while a bench runs (it shows the
runs stored so far) or long after. Contents: the verdict (per task, the best untuned autopilot, tuned
baseline and LR-free peer: :mod:`lrpilot.bench.verdict`), the leaderboard (benchmark scores, per-task time to target,
best and final metric, overhead per step against plain SGD), performance profiles, validation curves
per task, LR trajectories per task and method on a log axis with the pilot's decisions marked, the
targets and how they were set, what was skipped and why, failed runs with their errors, and where and
how long everything ran.

Plots use matplotlib's Agg backend (no display needed); ``pip install 'lrpilot[report]'``.
"""

from __future__ import annotations

import html
import math
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrpilot.bench.leaderboard import (
    MEASURES,
    Leaderboard,
    Target,
    latest_runs,
    leaderboard_from_store,
    load_targets,
    overhead_text,
)
from lrpilot.bench.store import Store
from lrpilot.bench.verdict import ROLES, best_text, verdict_of

__all__ = ["REPORT_NAME", "write_report"]

REPORT_NAME = "report.html"
FIGURES = "figures"

# Markers of decision actions on the LR plots.
_ACTION_MARKERS = {
    "rollback": ("x", "rollback"),
    "stop": ("s", "stop"),
    "reset-optimizer": ("D", "reset optimizer"),
    "checkpoint": ("^", "checkpoint"),
    "set-lr": ("o", "set LR"),
    "keep": (".", "keep"),
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError("the bench report needs matplotlib: pip install 'lrpilot[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A fixed colour and line style per method, the same in every figure."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors
    dashes = ["-", "--", ":", "-."]
    return {label: {"color": colours[i % 10], "linestyle": dashes[(i // 10) % 4]} for i, label in enumerate(labels)}


# ----------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------
def _fig_scores(board: Leaderboard, path: Path) -> None:
    plt = _pyplot()
    labels = board.labels
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.4))
    h = 0.2
    for i, (measure, name) in enumerate([("train_s", "seconds"), ("steps", "steps"), ("train_s_free", "seconds, search free"),
                                         ("steps_free", "steps, search free")]):  # fmt: skip
        ax.barh(y + (i - 1.5) * h, [board.scores[measure][lb] for lb in labels], height=h, label=name)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"benchmark score (area under the performance profile, r_max = {board.r_max:g})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fig_profiles(board: Leaderboard, styles: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, measure in zip(axes, ("train_s", "steps")):
        tau, rho = board.profiles[measure]
        for label in board.labels:
            ax.step(tau, rho[label], where="post", label=label, **styles[label])
        ax.set_title(f"performance profile: {MEASURES[measure]}", fontsize=10)
        ax.set_xlabel("tau (time / fastest time on the task)")
        ax.set_xlim(1, board.r_max)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"fraction of the {len(board.tasks)} tasks within tau")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fig_curves(task: str, runs: Mapping[str, list[list[dict[str, Any]]]], target: Target | None,
                styles: Mapping[str, Mapping[str, Any]], metric: str, path: Path) -> None:  # fmt: skip
    """Validation metric per epoch and against training seconds: median over seeds per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for label, seeds in runs.items():
        n = min(len(epochs) for epochs in seeds)
        if n == 0:
            continue
        values = np.array([[_nan(e["val_metric"]) for e in epochs[:n]] for epochs in seeds])
        secs = np.array([[e["train_s"] for e in epochs[:n]] for epochs in seeds])
        with warnings.catch_warnings():  # an epoch where every seed is NaN (diverged) stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(values, axis=0) if np.isfinite(values).any() else values[0]
        axes[0].plot(np.arange(1, n + 1), med, label=label, **styles[label])
        axes[1].plot(np.median(secs, axis=0), med, label=label, **styles[label])
    for ax in axes:
        if target is not None:
            ax.axhline(target.value, color="black", linewidth=1, linestyle=":", label="_target")
        ax.grid(alpha=0.3)
    if target is not None:
        axes[0].annotate(f"target {target.value:.4g}", (0.01, target.value), xycoords=("axes fraction", "data"),
                         fontsize=8, va="bottom")  # fmt: skip
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training seconds (evaluation excluded; search before training not shown)")
    axes[0].set_ylabel(f"validation {metric} (median over seeds)")
    axes[0].set_title(task, fontsize=10)
    _clip_to_interesting(axes[0], runs, target)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _clip_to_interesting(ax: Any, runs: Mapping[str, list[list[dict[str, Any]]]], target: Target | None) -> None:
    """Zoom the y axis on the upper part of the curves (early epochs and diverged runs flatten it)."""
    finals = [_nan(e[-1]["val_metric"]) for seeds in runs.values() for e in seeds if e]
    finals = [v for v in finals if math.isfinite(v)]
    if not finals or target is None or not target.higher_is_better:
        return
    low = min(float(np.percentile(finals, 25)), target.value)
    high = max(max(finals), target.value)
    span = max(high - low, 0.05 * abs(high) + 1e-6)
    # Room below for the climb towards the target (a fifth of the scale for an accuracy), a little above.
    ax.set_ylim(max(low - max(3 * span, 0.2 * abs(high)), 0.0), high + 0.15 * span)


def _fig_lrs(task: str, runs: Mapping[str, dict[str, Any]], styles: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """One small panel per method: LR of every param group against steps (log axis), decisions marked."""
    plt = _pyplot()
    labels = list(runs)
    ncols = min(4, max(1, len(labels)))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.5 * nrows + 0.6), squeeze=False)
    used_markers: dict[str, Any] = {}
    for ax, label in zip(axes.flat, labels):
        run = runs[label]
        steps, lrs = run["steps"], run["lrs"]  # lrs: [n points][groups]
        if steps:
            arr = np.array([[_nan(v) for v in row] for row in lrs], dtype=float)
            for g in range(arr.shape[1]):
                ys = np.where(arr[:, g] > 0, arr[:, g], np.nan)
                ax.step(steps, ys, where="post", color=styles[label]["color"], linewidth=1.4 if g == 0 else 0.7,
                        alpha=1.0 if g == 0 else 0.6)  # fmt: skip
            if np.isfinite(arr).any() and (arr > 0).any():
                ax.set_yscale("log")
        for d in run["decisions"]:
            marker, name = _ACTION_MARKERS.get(d["action"], ("*", d["action"]))
            lr0 = d["lr"][0] if d["lr"] else None
            if lr0 is None or not (isinstance(lr0, (int, float)) and lr0 > 0):
                continue
            h = ax.plot([d["step"]], [lr0], marker=marker, color="black", markersize=5, linestyle="none", markerfacecolor="none")[0]
            used_markers.setdefault(name, h)
        ax.set_title(f"{label} (seed {run['seed']})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.supxlabel("optimizer step", fontsize=9)
    fig.supylabel("learning rate (log)", fontsize=9)
    title = f"{task}: LR per param group (group 0 thick), decisions marked"
    if used_markers:
        fig.legend(list(used_markers.values()), list(used_markers), loc="upper right", fontsize=7, ncol=len(used_markers))
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.muted { color: #777; font-size: 0.9em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: float | None, fmt: str) -> str:
    return "&ndash;" if v is None or not math.isfinite(v) else format(v, fmt)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    th = "".join(f"<th class='l'>{_e(h)}</th>" if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(
    out: str | Path,
    *,
    targets: Mapping[str, Target] | None = None,
    reference: str | None = None,
    everything: bool = False,
) -> Path:
    """Write ``out/report.html`` and its figures from the store in ``out``; returns the HTML's path.

    Args:
        out: a bench output folder (holding ``bench.sqlite``).
        targets: validation targets (default: the ones shipped with lrpilot).
        reference: the label overheads are measured against (default: the last bench's suite's).
        everything: report every run in the store, not only the latest bench's plan.
    """
    out = Path(out)
    if not (out / "bench.sqlite").exists():
        raise FileNotFoundError(f"{out}: no bench.sqlite here; run `lrpilot bench --out {out}` first")
    targets = load_targets() if targets is None else dict(targets)
    figs = out / FIGURES
    figs.mkdir(parents=True, exist_ok=True)
    for old in figs.glob("*.png"):  # figures of a previous report whose tasks may be gone
        old.unlink()
    with Store.open(out) as store:
        invocations = store.invocations()
        info = invocations[-1]["suite_info"] if invocations else {}
        reference = reference or info.get("reference") or "sgd"
        keys = None if everything else store.plan_keys()
        board = leaderboard_from_store(store, targets, reference=reference, suite=info.get("name", ""), keys=keys)
        skips = [s for s in store.skips() if everything or s["suite"] == info.get("name")]
        counts = store.counts()
        latest = {(r["task"], r["label"], r["seed"]): r for r in latest_runs(store, keys)}
        per_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for row in sorted(latest.values(), key=lambda r: r["seed"]):
            if row["status"] != "failed":
                per_task[row["task"]][row["label"]].append(row)
        curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
        lr_runs: dict[str, dict[str, dict[str, Any]]] = {}
        metric_of: dict[str, str] = {}
        for task, by_label in per_task.items():
            curves[task] = {lb: [store.epochs(r["key"]) for r in rows_] for lb, rows_ in _ordered(by_label, board.labels)}
            lr_runs[task] = {}
            for label, rows_ in _ordered(by_label, board.labels):
                first = rows_[0]
                metric_of[task] = first["metric"] or "metric"
                lr_runs[task][label] = _lr_series(store, first)

    styles = _styles(board.labels)
    images: dict[str, str] = {}
    if board.labels:
        _fig_scores(board, figs / "scores.png")
        images["scores"] = f"{FIGURES}/scores.png"
        if board.tasks:
            _fig_profiles(board, styles, figs / "profiles.png")
            images["profiles"] = f"{FIGURES}/profiles.png"
    for task in curves:
        name = f"curves-{_slug(task)}.png"
        _fig_curves(task, curves[task], targets.get(task), styles, metric_of.get(task, "metric"), figs / name)
        images[f"curves:{task}"] = f"{FIGURES}/{name}"
        name = f"lr-{_slug(task)}.png"
        _fig_lrs(task, lr_runs[task], styles, figs / name)
        images[f"lr:{task}"] = f"{FIGURES}/{name}"

    page = _page(out, board, info, targets, latest, skips, counts, invocations, images, everything)
    path = out / REPORT_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def _ordered(by_label: Mapping[str, Any], order: Sequence[str]) -> list[tuple[str, Any]]:
    rank = {lb: i for i, lb in enumerate(order)}
    return sorted(by_label.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _lr_series(store: Store, row: Mapping[str, Any]) -> dict[str, Any]:
    """The LR trajectory of one run against optimizer steps, from step 0 to the run's last step: per step
    where recorded, else at each epoch's end.

    A per-step series holds only the steps where the LR changed (a warm-up then a constant LR, as
    Schedule-Free's, ends after the warm-up), so it is carried to the run's last step: every panel's x
    axis then spans the run's optimizer steps, not the last change's.
    """
    per_step = store.step_lrs(row["key"])
    if per_step:
        steps = sorted(per_step)
        lrs = [per_step[s] for s in steps]
        epochs = store.epochs(row["key"])
        last = epochs[-1]["step"] if epochs else (row.get("steps") or 0)
        if last > steps[-1]:
            steps.append(last)
            lrs.append(lrs[-1])
    else:
        # An epoch's recorded LR is the one in force during it: draw it from the epoch's first step.
        epochs = store.epochs(row["key"])
        by_epoch = store.epoch_lrs(row["key"])
        steps, lrs, start = [], [], 0
        for e in epochs:
            if e["epoch"] in by_epoch:
                steps.append(start)
                lrs.append(by_epoch[e["epoch"]])
            start = e["step"]
        if steps:
            steps.append(start)
            lrs.append(lrs[-1])
        width = max((len(x) for x in lrs), default=1)
        lrs = [x + [None] * (width - len(x)) for x in lrs]
    return {"steps": steps, "lrs": lrs, "decisions": store.decisions(row["key"]), "seed": row["seed"]}


def _page(out: Path, board: Leaderboard, info: Mapping[str, Any], targets: Mapping[str, Target],
          latest: Mapping[Any, dict[str, Any]], skips: list[dict[str, Any]], counts: Mapping[str, int],
          invocations: list[dict[str, Any]], images: Mapping[str, str], everything: bool) -> str:  # fmt: skip
    from lrpilot._version import __version__

    suite = info.get("name", "")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrpilot bench: {_e(suite or out.name)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>lrpilot bench{': ' + _e(suite) if suite else ''}</h1>"]  # fmt: skip
    if info.get("description"):
        parts.append(f"<p>{_e(info['description'])}</p>")
    n_ok = sum(r["status"] != "failed" for r in latest.values())
    parts.append(
        f"<p class='muted'>{len(latest)} runs ({n_ok} finished, {len(latest) - n_ok} failed) of {len(board.labels)} methods on "
        f"{len(board.tasks) + len(board.unscored)} tasks, seeds {', '.join(map(str, board.seeds))} "
        f"({'every run in the store' if everything else 'the latest bench&#39;s plan'}); store "
        f"<code>{_e(out / 'bench.sqlite')}</code>; report made {time.strftime('%Y-%m-%d %H:%M:%S')} by lrpilot {_e(__version__)}.</p>"
    )

    parts += _verdict_html(board)

    # Leaderboard.
    parts.append("<h2>Leaderboard</h2>")
    parts.append(
        "<p>AlgoPerf benchmark score (area under the performance profile with r_max = "
        f"{board.r_max:g}; 1 = fastest to the validation target on every task, 0 = never within {board.r_max:g}x of the fastest). "
        "<b>score</b>: training seconds to the target (evaluation excluded), a method's search before training charged; "
        "<b>steps</b>: the same in optimizer steps; <b>free</b>: tuned baselines' grid search not charged. "
        "Per task: medians over seeds. Overhead: CPU seconds of the run's training thread per step over the reference "
        f"method's (<code>{_e(board.reference or 'none')}</code>), geometric mean over tasks, [min-max] of the per-seed "
        "ratios; CPU seconds, unlike wall seconds, do not shrink for a run that happened to share the machine less "
        "(none where a run recorded no CPU seconds). Seconds to target come from runs that shared the machine with "
        "each other; steps do not depend on the load.</p>"
    )
    head = ["#", "method", "score", "steps", "score free", "steps free", "reached", "overhead/step"]
    rows = []
    for i, label in enumerate(board.labels, 1):
        reached = sum(1 for t in board.tasks if (c := board.cell(label, t)) is not None and math.isfinite(c.times["train_s"]))
        tuned = " <span class='muted'>(tuned)</span>" if label in board.tuned else ""
        rows.append([str(i), f"{_e(label)}{tuned}", *(f"{board.scores[m][label]:.3f}" for m in MEASURES),
                     f"{reached}/{len(board.tasks)}", _e(overhead_text(board.overhead.get(label), board.overhead_range.get(label)))])  # fmt: skip
    parts.append(_table(head, rows, left=2))
    for key, alt in (("scores", "benchmark scores"), ("profiles", "performance profiles")):
        if key in images:
            parts.append(f"<img src='{images[key]}' alt='{alt}'>")

    # Per task.
    parts.append("<h2>Per task</h2>")
    for task in board.tasks + list(board.unscored):
        target = targets.get(task)
        parts.append(f"<h3 id='{_slug(task)}'>{_e(task)}</h3>")
        parts.append("<p>" + (f"Target: validation {_e(target.describe())}." if target else
                              f"No target ({_e(board.unscored.get(task, ''))}): not scored.") + "</p>")  # fmt: skip
        head = ["method", "steps to target", "seconds to target", "steps free", "seconds free", "search steps",
                "search s", "best", "final", "seeds", "failed", "overhead/step"]  # fmt: skip
        rows = []
        for label in board.labels:
            c = board.cell(label, task)
            if c is None:
                continue
            rows.append([_e(label), _num(c.times["steps"], ".0f"), _num(c.times["train_s"], ".2f"), _num(c.times["steps_free"], ".0f"),
                         _num(c.times["train_s_free"], ".2f"), _num(c.search_steps or None, ".0f"), _num(c.search_train_s or None, ".1f"),
                         _num(c.best, ".4f"), _num(c.final, ".4f"), str(len(c.seeds)), str(c.failed or ""),
                         _e(overhead_text(c.overhead, c.overhead_range))])  # fmt: skip
        parts.append(_table(head, rows))
        for key, alt in ((f"curves:{task}", f"validation curves on {task}"), (f"lr:{task}", f"LR trajectories on {task}")):
            if key in images:
                parts.append(f"<img src='{_e(images[key])}' alt='{_e(alt)}'>")

    # Claims (paper suites).
    if info.get("claims"):
        parts.append("<h2>Claims this suite replays</h2><ul>")
        for claim in info["claims"]:
            if isinstance(claim, Mapping):
                text = f"{_e(claim.get('claim', ''))} <span class='muted'>({_e(claim.get('source', ''))})</span>"
                if claim.get("check"):
                    text += f"<br><i>Check:</i> {_e(claim['check'])}"
            else:
                text = _e(claim)
            parts.append(f"<li>{text}</li>")
        parts.append("</ul>")

    # Targets.
    parts.append("<h2>Targets</h2>")
    rows = [[_e(t), _e(x.metric), ">=" if x.higher_is_better else "<=", f"{x.value:.4f}"] for t, x in targets.items()
            if t in board.tasks or t in board.unscored]  # fmt: skip
    parts.append(_table(["task", "metric", "", "target"], rows, left=3))
    hows = sorted({x.how for x in targets.values() if x.how})
    parts += [f"<p class='muted'>{_e(h)}</p>" for h in hows]

    # Skipped and failed.
    if skips:
        parts.append("<h2>Skipped</h2><p>Named by the suite but not runnable on this install:</p>")
        parts.append(_table(["suite", "kind", "name", "why"], [[_e(s["suite"]), _e(s["kind"]), _e(s["name"]), _e(s["reason"])] for s in skips], left=4))
    failed = [r for r in latest.values() if r["status"] == "failed"]
    if failed:
        parts.append(f"<h2>Failed runs ({len(failed)})</h2>")
        for r in failed:
            tb = f"<details><summary>traceback</summary><pre>{_e(r.get('traceback') or _traceback(out, r['key']))}</pre></details>"
            parts.append(f"<p><b>{_e(r['task'])} {_e(r['label'])} seed {r['seed']}</b>: <code>{_e(r['error'])}</code></p>{tb}")

    # Where and how long.
    parts.append("<h2>Runs</h2>")
    per_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in latest.values():
        if r.get("run_s"):
            cpu = r["worker"].get("process_cpu_s") or r["worker"].get("cpu_s") or math.nan
            per_label[r["label"]].append((r["run_s"], cpu))
    rows = [[_e(lb), str(len(v)), f"{np.median([w for w, _ in v]):.1f}", f"{sum(w for w, _ in v):.1f}",
             f"{np.median([c for _, c in v]):.1f}", f"{sum(c for _, c in v):.1f}"]
            for lb, v in sorted(per_label.items(), key=lambda kv: -sum(w for w, _ in kv[1]))]  # fmt: skip
    parts.append("<p>Seconds per run: wall seconds in the worker (training, evaluation, search, data loading) and "
                 "CPU seconds of the worker process (its start-up and imports included for a fresh process; CPU "
                 "seconds hardly depend on the machine's load, wall seconds do):</p>")  # fmt: skip
    parts.append(_table(["method", "runs", "median wall s", "total wall s", "median CPU s", "total CPU s"], rows))
    inv_rows = []
    for inv in invocations:
        took = "" if inv["finished_at"] is None else f"{inv['finished_at'] - inv['started_at']:.1f}"
        inv_rows.append([str(inv["id"]), _e(inv["suite"]), _e(" ".join(inv["argv"])), str(inv["planned"]), str(inv["to_run"]),
                         _e(inv["executor"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(inv["started_at"])),
                         took or "interrupted"])  # fmt: skip
    parts.append("<p>Bench invocations that wrote this store:</p>")
    parts.append(_table(["#", "suite", "command", "planned", "to run", "executor", "started", "wall s"], inv_rows, left=3))
    versions = {}
    for r in latest.values():
        if r["versions"]:
            versions = r["versions"]
    parts.append(f"<p class='muted'>Rows: {_e(', '.join(f'{k} {v}' for k, v in counts.items()))}. Versions: "
                 f"{_e(', '.join(f'{k} {v}' for k, v in versions.items()))}. Export: <code>lrpilot export {_e(out)}</code>.</p>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict_html(board: Leaderboard) -> list[str]:
    """The verdict (``lrpilot.bench.verdict``): per task, the best of each kind, before everything else."""
    if not board.tasks:
        return []
    verdict = verdict_of(board)
    names = {name: text for name, _, text in ROLES}
    parts = [
        "<h2>Verdict</h2>",
        ("<p>Per task, the best <b>untuned autopilot</b> (methods tagged <code>seed-method</code>), <b>tuned baseline</b> "
         "(tagged <code>tuned</code>: an LR grid search, its time shown with the search charged and free) and "
         "<b>LR-free peer</b> (tagged <code>peer</code>). Best of its kind: fastest to the target, as AlgoPerf ranks "
         f"(training seconds, a time above {board.r_max:g}x the task's fastest counting as never), ties by the best "
         "validation metric. Medians over seeds, [min-max] over seeds; &ndash; = target not reached in the median. "
         "The benchmark score table follows.</p>"),
    ]  # fmt: skip
    head = ["task", "", "method", "best [min-max]", "reached", "s to target", "steps to target", "s, search free",
            "steps, search free"]  # fmt: skip
    rows = []
    for task in board.tasks:
        for i, r in enumerate(verdict.rows.get(task, [])):
            tuned = r.role == "tuned"
            rows.append([_e(task) if i == 0 else "", _e(names[r.role]), _e(r.label), _e(best_text(r.best, r.best_range)),
                         f"{r.reached}/{r.seeds}", _num(r.secs, ".2f"), _num(r.steps, ".0f"),
                         _num(r.secs_free, ".2f") if tuned else "", _num(r.steps_free, ".0f") if tuned else ""])  # fmt: skip
        for role in verdict.missing.get(task, []):
            rows.append(["", _e(names[role]), "<span class='muted'>none in this bench</span>", "", "", "", "", "", ""])
    parts.append(_table(head, rows, left=3))
    return parts


def _traceback(out: Path, key: str) -> str:
    log = out / "logs" / f"{key}.log"
    return log.read_text()[-4000:] if log.exists() else "(none)"
