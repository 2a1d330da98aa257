"""The results store: one SQLite database per bench output folder (``DIR/bench.sqlite``).

Only the driver process writes it (workers return run records; see :mod:`lrpilot.bench.executors`).
Every run is written in **one transaction** (its ``runs`` row and all its child rows, replacing any
earlier attempt of the same key), in WAL mode with ``synchronous=FULL``, so a driver killed at any
moment (``kill -9``) leaves either the whole run or none of it, and the same command resumes with the
runs still missing: no finished run is repeated, no row is lost or duplicated.

Schema (version :data:`SCHEMA_VERSION`; ``docs/bench.md`` documents every column):

* ``runs``: one row per run key (hash of task, method, config, seed, lrpilot version): what ran,
  status, error, summary, search cost, timings, versions, worker, the full run record (JSON).
* ``epochs``: per-epoch metrics and timings, ``(run_key, epoch)`` unique.
* ``lrs``: the LR of every param group at the end of every epoch, ``(run_key, epoch, grp)``.
* ``step_lrs``: per-step LR of methods whose LR moves within epochs, ``(run_key, step, grp)``.
* ``decisions``: every decision of the method's pilot with its reason, ``(run_key, seq)``.
* ``skips``: what a suite named that this install could not run, and why.
* ``invocations``: every ``lrpilot bench`` that wrote here (suite, arguments, timings), and
  ``plans``: the run keys each one planned (a report shows the latest plan by default).
* ``meta``: schema version, creating lrpilot version.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lrpilot.bench.suites import RunSpec, Skip, canonical_json

__all__ = ["DB_NAME", "FINISHED", "SCHEMA_VERSION", "Store"]

SCHEMA_VERSION = 1
DB_NAME = "bench.sqlite"
#: Statuses of runs that finished (a resumed bench does not run them again). ``failed`` (an error, a
#: crashed or timed-out worker) is run again only with ``retry_failed``.
FINISHED = ("completed", "stopped", "diverged")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    suite TEXT NOT NULL,
    argv TEXT NOT NULL,
    planned INTEGER NOT NULL,
    to_run INTEGER NOT NULL,
    executor TEXT NOT NULL,
    suite_info TEXT NOT NULL DEFAULT '{}',
    lrpilot_version TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    method TEXT NOT NULL,
    label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    tags TEXT NOT NULL,
    config TEXT NOT NULL,
    lrpilot_version TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    traceback TEXT NOT NULL DEFAULT '',
    metric TEXT,
    higher_is_better INTEGER,
    best_val_metric REAL,
    final_val_metric REAL,
    epochs INTEGER,
    steps INTEGER,
    wall_s REAL,
    train_s REAL,
    train_cpu_s REAL,
    search_epochs REAL,
    search_steps REAL,
    search_train_s REAL,
    started_at REAL,
    finished_at REAL,
    run_s REAL,
    worker TEXT NOT NULL DEFAULT '{}',
    versions TEXT NOT NULL DEFAULT '{}',
    record TEXT,
    suite TEXT NOT NULL DEFAULT '',
    invocation INTEGER REFERENCES invocations(id)
);
CREATE INDEX IF NOT EXISTS runs_by_task ON runs(task, label, seed);
CREATE TABLE IF NOT EXISTS epochs (
    run_key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    train_loss REAL,
    val_loss REAL,
    val_metric REAL,
    wall_s REAL NOT NULL,
    train_s REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_key, epoch)
);
CREATE TABLE IF NOT EXISTS lrs (
    run_key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    lr REAL,
    PRIMARY KEY (run_key, epoch, grp)
);
CREATE TABLE IF NOT EXISTS step_lrs (
    run_key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    lr REAL,
    PRIMARY KEY (run_key, step, grp)
);
CREATE TABLE IF NOT EXISTS decisions (
    run_key TEXT NOT NULL REFERENCES runs(key) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    lr TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_key, seq)
);
CREATE TABLE IF NOT EXISTS plans (
    invocation INTEGER NOT NULL REFERENCES invocations(id),
    key TEXT NOT NULL,
    PRIMARY KEY (invocation, key)
);
CREATE TABLE IF NOT EXISTS skips (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    suite TEXT NOT NULL,
    invocation INTEGER REFERENCES invocations(id),
    PRIMARY KEY (kind, name, suite)
);
"""

# Columns of `runs` added to schema version 1 after its first release, added in place to older stores.
_ADDED_RUN_COLUMNS = (("train_cpu_s", "REAL"),)

# Columns of `runs` exported to CSV and returned by Store.runs() (the record itself is left out).
RUN_COLUMNS = (
    "key", "task", "method", "label", "seed", "tags", "config", "lrpilot_version", "status", "status_reason",
    "error", "traceback", "metric", "higher_is_better", "best_val_metric", "final_val_metric", "epochs", "steps", "wall_s",
    "train_s", "train_cpu_s", "search_epochs", "search_steps", "search_train_s", "started_at", "finished_at", "run_s", "worker",
    "versions", "suite", "invocation",
)  # fmt: skip


def _real(value: Any) -> float | None:
    """A float for SQLite: ``None`` for missing or non-finite values (SQLite has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Store:
    """A bench's SQLite database.

    Example:
        >>> import tempfile
        >>> with Store.open(tempfile.mkdtemp()) as store:
        ...     store.finished_keys()
        set()
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write goes through _transaction().
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed run survives a crash of the machine too
        self._db.execute("PRAGMA foreign_keys=ON")
        # executescript commits any open transaction first, so the schema gets its own.
        self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self._add_columns()
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                from lrpilot._version import __version__

                db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("created_with", __version__), ("created_at", str(time.time()))],
                )
            elif int(row["value"]) != SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path}: results store schema version {row['value']} is not {SCHEMA_VERSION} "
                    "(written by another lrpilot version); use a new output folder"
                )

    def _add_columns(self) -> None:
        """Add the columns schema version 1 gained since it was first written (``NULL`` for older runs):
        a store made by an earlier lrpilot keeps working, its runs simply lack what was not measured."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(runs)")}
        missing = [(col, kind) for col, kind in _ADDED_RUN_COLUMNS if col not in have]
        if missing:
            with self._transaction() as db:
                for col, kind in missing:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {col} {kind}")

    @classmethod
    def open(cls, folder: str | Path) -> Store:
        """The store of bench output folder ``folder`` (created if needed)."""
        return cls(Path(folder) / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front: a reader (a report made while the bench runs)
        # never sees half a run, and two writers fail fast instead of deadlocking.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    # -- invocations and skips ---------------------------------------------------------------------
    def begin_invocation(
        self,
        suite: str,
        argv: Sequence[str],
        plan: Sequence[str],
        to_run: int,
        executor: str,
        suite_info: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a bench invocation and the keys of its plan; returns its id."""
        from lrpilot._version import __version__

        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO invocations(suite, argv, planned, to_run, executor, suite_info, lrpilot_version, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (suite, json.dumps(list(argv)), len(plan), to_run, executor, json.dumps(dict(suite_info or {})), __version__,
                 time.time()),
            )  # fmt: skip
            invocation = int(cur.lastrowid)
            db.executemany("INSERT OR IGNORE INTO plans(invocation, key) VALUES (?, ?)", [(invocation, k) for k in plan])
            return invocation

    def plan_keys(self, invocation: int | None = None) -> set[str] | None:
        """The run keys an invocation planned (default: the latest); ``None`` if there was none."""
        if invocation is None:
            row = self._db.execute("SELECT MAX(id) FROM invocations").fetchone()
            invocation = row[0]
            if invocation is None:
                return None
        return {r[0] for r in self._db.execute("SELECT key FROM plans WHERE invocation=?", (invocation,))}

    def end_invocation(self, invocation: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE invocations SET finished_at=? WHERE id=?", (time.time(), invocation))

    def record_skips(self, skips: Iterable[Skip], suite: str, invocation: int | None = None) -> None:
        """Record what ``suite`` could not run this time (replacing the suite's earlier skips)."""
        with self._transaction() as db:
            db.execute("DELETE FROM skips WHERE suite=?", (suite,))
            db.executemany(
                "INSERT OR REPLACE INTO skips(kind, name, reason, suite, invocation) VALUES (?, ?, ?, ?, ?)",
                [(s.kind, s.name, s.reason, suite, invocation) for s in skips],
            )

    # -- runs ----------------------------------------------------------------------------------------
    def finished_keys(self, *, include_failed: bool = False) -> set[str]:
        """Keys of the runs a resumed bench must not run again."""
        statuses = FINISHED + (("failed",) if include_failed else ())
        marks = ",".join("?" * len(statuses))
        return {r[0] for r in self._db.execute(f"SELECT key FROM runs WHERE status IN ({marks})", statuses)}

    def put(self, spec: RunSpec, outcome: Any, *, suite: str = "", invocation: int | None = None) -> None:
        """Write one run (its outcome from a worker) in one transaction, replacing an earlier attempt."""
        record: Mapping[str, Any] | None = outcome.record
        status = outcome.status
        summary: Mapping[str, Any] = {}
        search: Mapping[str, Any] = {}
        if record is not None:
            summary = record.get("summary", {})
            status = summary.get("status", "completed")
            search = ((record.get("info") or {}).get("method") or {}).get("search") or {}
        started, finished = outcome.started_at, outcome.finished_at
        row = {
            "key": spec.key, "task": spec.task, "method": spec.method, "label": spec.label, "seed": spec.seed,
            "tags": json.dumps(sorted(spec.tags)), "config": canonical_json(spec.config()),
            "lrpilot_version": spec.lrpilot_version, "status": status,
            "status_reason": str(summary.get("status_reason", "")), "error": outcome.error,
            "traceback": outcome.traceback,
            "metric": (record or {}).get("metric", {}).get("name"),
            "higher_is_better": None if record is None else int(bool(record["metric"]["higher_is_better"])),
            "best_val_metric": _real(summary.get("best_val_metric")),
            "final_val_metric": _real(summary.get("final_val_metric")),
            "epochs": summary.get("epochs"), "steps": summary.get("steps"),
            "wall_s": _real(summary.get("wall_s")), "train_s": _real(summary.get("train_s")),
            "train_cpu_s": _real(summary.get("train_cpu_s")),
            "search_epochs": _real(search.get("total_epochs")), "search_steps": _real(search.get("total_steps")),
            "search_train_s": _real(search.get("total_train_s")),
            "started_at": started, "finished_at": finished,
            "run_s": None if not (started and finished) else finished - started,
            "worker": json.dumps(outcome.worker, sort_keys=True),
            "versions": json.dumps((record or {}).get("versions", {}), sort_keys=True),
            "record": None if record is None else json.dumps(record, allow_nan=False),
            "suite": suite, "invocation": invocation,
        }  # fmt: skip
        with self._transaction() as db:
            for table in ("epochs", "lrs", "step_lrs", "decisions"):
                db.execute(f"DELETE FROM {table} WHERE run_key=?", (spec.key,))
            cols = ",".join(row)
            db.execute(f"INSERT OR REPLACE INTO runs({cols}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))
            if record is not None:
                self._put_children(db, spec.key, record)

    @staticmethod
    def _put_children(db: sqlite3.Connection, key: str, record: Mapping[str, Any]) -> None:
        epochs = record.get("epochs", [])
        db.executemany(
            "INSERT INTO epochs(run_key, epoch, step, train_loss, val_loss, val_metric, wall_s, train_s, extra) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(key, e["epoch"], e["step"], _real(e.get("train_loss")), _real(e.get("val_loss")), _real(e.get("val_metric")),
              e["wall_s"], e["train_s"], json.dumps(e.get("extra") or {}, sort_keys=True)) for e in epochs],
        )  # fmt: skip
        db.executemany(
            "INSERT INTO lrs(run_key, epoch, grp, lr) VALUES (?, ?, ?, ?)",
            [(key, e["epoch"], g, _real(lr)) for e in epochs for g, lr in enumerate(e.get("lr") or [])],
        )
        db.executemany(
            "INSERT OR REPLACE INTO step_lrs(run_key, step, grp, lr) VALUES (?, ?, ?, ?)",
            [(key, int(step), g, _real(lr)) for step, lrs in record.get("step_lr", []) for g, lr in enumerate(lrs)],
        )
        db.executemany(
            "INSERT INTO decisions(run_key, seq, epoch, step, action, reason, lr, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(key, i, d["epoch"], d["step"], d["action"], d["reason"], json.dumps(d.get("lr") or []),
              json.dumps(d.get("info") or {}, sort_keys=True, allow_nan=False)) for i, d in enumerate(record.get("decisions", []))],
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------------------
    def runs(self, *, status: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every run row (without the record), oldest first; ``tags``, ``config``, ``worker`` and
        ``versions`` decoded."""
        sql = f"SELECT {','.join(RUN_COLUMNS)} FROM runs"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += f" WHERE status IN ({','.join('?' * len(status))})"
            args = tuple(status)
        out = []
        for r in self._db.execute(sql + " ORDER BY finished_at, key", args):
            row = dict(r)
            for col in ("tags", "config", "worker", "versions"):
                row[col] = json.loads(row[col]) if row[col] else {}
            out.append(row)
        return out

    def record(self, key: str) -> dict[str, Any] | None:
        """The full run record of ``key`` (``None`` for a failed run)."""
        row = self._db.execute("SELECT record FROM runs WHERE key=?", (key,)).fetchone()
        return None if row is None or row["record"] is None else json.loads(row["record"])

    def epochs(self, key: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM epochs WHERE run_key=? ORDER BY epoch", (key,))
        return [dict(r) for r in rows]

    def epoch_lrs(self, key: str) -> dict[int, list[float | None]]:
        """``epoch -> [lr per group]``."""
        out: dict[int, list[float | None]] = {}
        for r in self._db.execute("SELECT epoch, grp, lr FROM lrs WHERE run_key=? ORDER BY epoch, grp", (key,)):
            out.setdefault(r["epoch"], []).append(r["lr"])
        return out

    def step_lrs(self, key: str) -> dict[int, list[float | None]]:
        """``step -> [lr per group]`` (empty for methods whose LR moves once an epoch at most)."""
        out: dict[int, list[float | None]] = {}
        for r in self._db.execute("SELECT step, grp, lr FROM step_lrs WHERE run_key=? ORDER BY step, grp", (key,)):
            out.setdefault(r["step"], []).append(r["lr"])
        return out

    def decisions(self, key: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM decisions WHERE run_key=? ORDER BY seq", (key,))
        return [{**dict(r), "lr": json.loads(r["lr"]), "info": json.loads(r["info"])} for r in rows]

    def skips(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM skips ORDER BY suite, kind, name")]

    def invocations(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM invocations ORDER BY id")
        return [{**dict(r), "argv": json.loads(r["argv"]), "suite_info": json.loads(r["suite_info"])} for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per table (a check that nothing was lost or duplicated)."""
        tables = ("runs", "epochs", "lrs", "step_lrs", "decisions", "skips", "invocations", "plans")
        return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}

    # -- export --------------------------------------------------------------------------------------
    def export_csv(self, folder: str | Path) -> list[Path]:
        """One CSV per table in ``folder`` (the run records themselves stay in the database)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        queries = {
            "runs": f"SELECT {','.join(RUN_COLUMNS)} FROM runs ORDER BY task, label, seed",
            "epochs": "SELECT * FROM epochs ORDER BY run_key, epoch",
            "lrs": "SELECT * FROM lrs ORDER BY run_key, epoch, grp",
            "step_lrs": "SELECT * FROM step_lrs ORDER BY run_key, step, grp",
            "decisions": "SELECT * FROM decisions ORDER BY run_key, seq",
            "skips": "SELECT * FROM skips ORDER BY suite, kind, name",
            "invocations": "SELECT * FROM invocations ORDER BY id",
            "plans": "SELECT * FROM plans ORDER BY invocation, key",
        }
        paths = []
        for table, sql in queries.items():
            cur = self._db.execute(sql)
            path = folder / f"{table}.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow([c[0] for c in cur.description])
                writer.writerows(cur)
            paths.append(path)
        return paths
