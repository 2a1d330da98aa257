"""Bench suites: which tasks, methods and seeds a bench runs, as data files resolved at run time.

A suite is a JSON file (the shipped ones live in ``bench/suites/``; ``lrpilot list suites``). Methods
are named by registry **tag**, **family** or **name**, and resolved against the registry when the bench
starts, so a suite can name methods that another branch, an optional package or a plug-in module
provides: a name that is not registered, whose package is missing, or that rejects the suite's options
is *skipped* with a warning, and the skip is recorded in the results store. The same holds for tasks
(unknown name, data not on this machine).

Format (``"format": 1``)::

    {
      "name": "quick", "description": "...",
      "seeds": [0],                 # default seeds of every block
      "reference": "sgd",           # the label overheads per step are measured against
      "tasks": ["digits-mlp", {"name": "mnist1d-mlp", "epochs": 30, "batch_size": 100}],
      "methods": [
        {"tag": "seed-method"},                      # every registered method with that tag
        {"family": "hyperreg", "exclude": ["wngrad"]},
        "sgd",                                       # one method, its defaults
        {"name": "sgd", "options": {"lr": 0.01}, "label": "sgd@0.01"},
        {"name": "rt-hpo", "grid": {"lr": [0.001, 0.01, 0.1]}}    # one entry per grid point
      ],
      "claims": [{"claim": "...", "source": "paper, section", "check": "what to look at"}]
    }

or ``"blocks": [{"tasks": [...], "methods": [...], "seeds": [...]}, ...]`` in place of ``tasks`` and
``methods`` when different tasks get different methods (a paper's tables). A method's *label* (what
the leaderboard shows) is its name, followed by its options in brackets when it has some
(``sgd[lr=0.01]``), unless the entry gives one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "Plan",
    "RunSpec",
    "Skip",
    "Suite",
    "list_suites",
    "load_suite",
    "run_key",
    "task_problem",
]

log = logging.getLogger("lrpilot.bench")

SUITE_FORMAT = 1
_SUITE_KEYS = {"format", "name", "description", "seeds", "reference", "tasks", "methods", "blocks", "claims", "notes"}
_BLOCK_KEYS = {"tasks", "methods", "seeds", "name"}
_TASK_KEYS = {"name", "epochs", "batch_size", "train_subset"}
_METHOD_KEYS = {"name", "tag", "family", "options", "grid", "label", "exclude"}


# ----------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace (tuples as lists): equal values give equal strings."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj


def run_key(task: str, method: str, config: Mapping[str, Any], seed: int, version: str) -> str:
    """The store's key of a run: a hash of what determines its result (and the lrpilot version)."""
    payload = canonical_json({"task": task, "method": method, "config": config, "seed": seed, "lrpilot": version})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RunSpec:
    """One run of a bench: everything a worker needs, as plain data (picklable, JSON-able).

    ``method_options`` are the options as the suite gives them (handed to the method as they are);
    ``resolved_options`` every option of the method with the defaults filled in, which is what the key
    hashes, so two suites asking for the same run in different words share one key. ``data_dir`` is
    where the data lies on the machine that runs it, not part of the key.
    """

    task: str
    method: str
    seed: int
    epochs: int
    batch_size: int
    method_options: Mapping[str, Any] = field(default_factory=dict)
    resolved_options: Mapping[str, Any] | None = None
    label: str = ""
    train_subset: int | None = None
    device: str = "cpu"
    tags: tuple[str, ...] = ()
    data_dir: str | None = None
    lrpilot_version: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.method)
        if not self.lrpilot_version:
            from lrpilot._version import __version__

            object.__setattr__(self, "lrpilot_version", __version__)

    def config(self) -> dict[str, Any]:
        """The run record's ``config``."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "device": self.device,
            "train_subset": self.train_subset,
            "method_options": json.loads(canonical_json(self.options)),
        }

    @property
    def options(self) -> Mapping[str, Any]:
        """Every option of the method, defaults resolved (the given ones when not resolved)."""
        return self.method_options if self.resolved_options is None else self.resolved_options

    @property
    def key(self) -> str:
        return run_key(self.task, self.method, self.config(), self.seed, self.lrpilot_version)

    def describe(self) -> str:
        return f"{self.task} {self.label} seed={self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "method": self.method, "seed": self.seed, "epochs": self.epochs,
            "batch_size": self.batch_size, "method_options": _plain(self.method_options),
            "resolved_options": None if self.resolved_options is None else _plain(self.resolved_options),
            "label": self.label, "train_subset": self.train_subset, "device": self.device,
            "tags": list(self.tags), "data_dir": self.data_dir, "lrpilot_version": self.lrpilot_version,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**{**data, "tags": tuple(data.get("tags", ()))})


# ----------------------------------------------------------------------------------------------------
# suites
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skip:
    """Something a suite names that this install cannot run, and why."""

    kind: str  # "task", "method", "tag", "family"
    name: str
    reason: str


@dataclass(frozen=True)
class _Variant:
    method: str
    options: Mapping[str, Any]
    label: str


@dataclass
class Plan:
    """A suite resolved against this install: the runs to do and what was skipped."""

    suite: Suite
    specs: list[RunSpec]
    skipped: list[Skip]

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(s.label for s in self.specs))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(s.task for s in self.specs))

    @property
    def seeds(self) -> list[int]:
        return sorted({s.seed for s in self.specs})


@dataclass(frozen=True)
class Suite:
    """A parsed suite file (see the module docstring for the format)."""

    name: str
    description: str
    blocks: tuple[Mapping[str, Any], ...]
    seeds: tuple[int, ...] = (0,)
    reference: str = "sgd"
    claims: tuple[Any, ...] = ()
    notes: str = ""
    source: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "") -> Suite:
        where = source or "suite"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a suite is a JSON object")
        _no_unknown(data, _SUITE_KEYS, where)
        if data.get("format", SUITE_FORMAT) != SUITE_FORMAT:
            raise ValueError(f"{where}: suite format {data.get('format')!r} is not supported (this lrpilot reads {SUITE_FORMAT})")
        if "blocks" in data and ("tasks" in data or "methods" in data):
            raise ValueError(f"{where}: give either 'blocks' or 'tasks' and 'methods', not both")
        blocks = data.get("blocks") or [{"tasks": data.get("tasks", []), "methods": data.get("methods", [])}]
        seeds = _seeds(data.get("seeds", [0]), where)
        for i, block in enumerate(blocks):
            _no_unknown(block, _BLOCK_KEYS, f"{where} block {i}")
            if not block.get("tasks") or not block.get("methods"):
                raise ValueError(f"{where} block {i}: needs a non-empty 'tasks' and 'methods'")
            for t in block["tasks"]:
                if isinstance(t, Mapping):
                    _no_unknown(t, _TASK_KEYS, f"{where} task {t.get('name')!r}")
                elif not isinstance(t, str):
                    raise ValueError(f"{where}: a task is a name or an object with 'name', got {t!r}")
            for m in block["methods"]:
                if isinstance(m, Mapping):
                    _no_unknown(m, _METHOD_KEYS, f"{where} method entry {dict(m)!r}")
                    if sum(k in m for k in ("name", "tag", "family")) != 1:
                        raise ValueError(f"{where}: a method entry names exactly one of name, tag, family: {dict(m)!r}")
                    if "label" in m and "name" not in m:
                        raise ValueError(f"{where}: 'label' only applies to an entry with a 'name': {dict(m)!r}")
                elif not isinstance(m, str):
                    raise ValueError(f"{where}: a method is a name or an object, got {m!r}")
            if "seeds" in block:
                _seeds(block["seeds"], f"{where} block {i}")
        return cls(
            name=str(data.get("name") or Path(source).stem or "suite"),
            description=str(data.get("description", "")),
            blocks=tuple(blocks),
            seeds=seeds,
            reference=str(data.get("reference", "sgd")),
            claims=tuple(data.get("claims", ())),
            notes=str(data.get("notes", "")),
            source=source,
        )

    # -- resolution ----------------------------------------------------------------------------------
    def resolve(
        self,
        *,
        methods: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        device: str = "cpu",
        data_dir: str | None = None,
    ) -> Plan:
        """The runs of this suite on this install.

        Args:
            methods: keep only these labels or method names (each must be in the suite).
            tasks: keep only these tasks (each must be in the suite).
            seeds: replace the suite's seeds.
            device: where the runs train (part of each run's key).
            data_dir: where Fashion-MNIST lies, if not in the default place.
        """
        from lrpilot.bench.tasks import get_task
        from lrpilot.core.registry import get_method, resolve_options

        skipped: dict[tuple[str, str], Skip] = {}

        def skip(kind: str, name: str, reason: str) -> None:
            if (kind, name) not in skipped:
                skipped[(kind, name)] = Skip(kind, name, reason)

        all_tasks = [_task_entry(t)["name"] for b in self.blocks for t in b["tasks"]]
        if tasks is not None:
            _check_subset("task", tasks, all_tasks, self.name)
        variants_per_block = [list(self._variants(block, skip)) for block in self.blocks]
        if methods is not None:
            known = {v.label for vs in variants_per_block for v in vs} | {v.method for vs in variants_per_block for v in vs}
            _check_subset("method", methods, sorted(known), self.name)

        specs: dict[str, RunSpec] = {}
        labels: dict[str, str] = {}  # label -> canonical (method, options), to catch clashes
        for block, variants in zip(self.blocks, variants_per_block):
            block_seeds = list(seeds) if seeds is not None else list(_seeds(block.get("seeds", self.seeds), self.name))
            for raw_task in block["tasks"]:
                entry = _task_entry(raw_task)
                name = entry["name"]
                if tasks is not None and name not in tasks:
                    continue
                problem = task_problem(name, data_dir)
                if problem is not None:
                    skip("task", name, problem)
                    continue
                info = get_task(name)
                for v in variants:
                    if methods is not None and v.label not in methods and v.method not in methods:
                        continue
                    try:
                        method_info = get_method(v.method)
                    except ValueError:
                        skip("method", v.method, "not registered on this install (a method from another branch, "
                             "or a plug-in module not imported: see --import)")  # fmt: skip
                        continue
                    if not method_info.available:
                        missing = [m for m in method_info.requires if not _importable(m)]
                        how = f"pip install 'lrpilot[{method_info.extra}]'" if method_info.extra else "pip install " + " ".join(missing)
                        skip("method", v.method, f"needs {', '.join(missing)}, not installed: {how}")
                        continue
                    try:
                        resolved = resolve_options(method_info, v.options)
                    except ValueError as err:
                        skip("method", v.label, f"bad options in the suite: {err}")
                        continue
                    identity = canonical_json([v.method, resolved])
                    if labels.setdefault(v.label, identity) != identity:
                        raise ValueError(f"suite {self.name!r}: label {v.label!r} names two different runs; give each a distinct label")
                    for seed in block_seeds:
                        spec = RunSpec(
                            task=name, method=v.method, label=v.label, seed=int(seed),
                            epochs=int(entry.get("epochs", info.epochs)),
                            batch_size=int(entry.get("batch_size", info.batch_size)),
                            train_subset=entry.get("train_subset"), method_options=dict(v.options),
                            resolved_options=resolved, device=device,
                            tags=tuple(sorted(method_info.tags)), data_dir=data_dir,
                        )  # fmt: skip
                        specs.setdefault(spec.key, spec)
        plan = Plan(self, list(specs.values()), list(skipped.values()))
        for s in plan.skipped:
            log.warning("skipping %s %s: %s", s.kind, s.name, s.reason)
        return plan

    def _variants(self, block: Mapping[str, Any], skip: Any) -> Iterable[_Variant]:
        from lrpilot.core.registry import list_methods

        seen: set[tuple[str, str]] = set()
        for raw in block["methods"]:
            entry: Mapping[str, Any] = {"name": raw} if isinstance(raw, str) else raw
            if "name" in entry:
                names = [str(entry["name"])]
            else:
                kind = "tag" if "tag" in entry else "family"
                value = entry[kind]
                found = list_methods(tags=[value]) if kind == "tag" else [m for m in list_methods() if m.family == value]
                names = [m.name for m in found if m.name not in set(entry.get("exclude", ()))]
                if not names:
                    skip(kind, str(value), f"no registered method has {kind} {value!r} on this install")
            options = dict(entry.get("options", {}))
            grid = entry.get("grid", {})
            if not isinstance(grid, Mapping) or any(not isinstance(v, list) or not v for v in grid.values()):
                raise ValueError(f"suite {self.name!r}: 'grid' maps option names to non-empty lists, got {grid!r}")
            for point in itertools.product(*grid.values()) if grid else [()]:
                grid_options = dict(zip(grid, point))
                point_options = {**options, **grid_options}
                for name in names:
                    if "label" in entry:
                        label = str(entry["label"]) + _label("", grid_options)
                    else:
                        label = _label(name, point_options)
                    ident = (label, canonical_json([name, point_options]))
                    if ident not in seen:
                        seen.add(ident)
                        yield _Variant(name, point_options, label)


def _label(name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return name
    return f"{name}[{','.join(f'{k}={_fmt(v)}' for k, v in options.items())}]"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    return str(value)


def _task_entry(raw: Any) -> dict[str, Any]:
    return {"name": raw} if isinstance(raw, str) else dict(raw)


def _seeds(seeds: Any, where: str) -> tuple[int, ...]:
    if not isinstance(seeds, (list, tuple)) or not seeds or any(
        not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds
    ):
        raise ValueError(f"{where}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    return tuple(seeds)


def _no_unknown(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(sorted(allowed))}")


def _check_subset(kind: str, wanted: Sequence[str], available: Sequence[str], suite: str) -> None:
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ValueError(
            f"{kind}{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not in suite {suite!r}; "
            f"its {kind}s on this install: {', '.join(dict.fromkeys(available))}"
        )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def task_problem(name: str, data_dir: str | None = None) -> str | None:
    """Why task ``name`` cannot run here (unknown, or its data is missing), or ``None`` if it can."""
    from lrpilot.bench.tasks import get_task, task_names

    try:
        info = get_task(name)
    except ValueError:
        return f"not registered on this install; valid tasks: {', '.join(task_names())}"
    if "fmnist" in info.tags:
        from lrpilot.bench.tasks.sources import FMNIST_FILES, fmnist_dir

        root = fmnist_dir(data_dir)
        missing = [n for n in FMNIST_FILES.values() if not (root / n).exists() and not (root / f"{n}.gz").exists()]
        if missing:
            return (f"Fashion-MNIST is not in {root} (missing {', '.join(missing)}): "
                    "`apt-get install dataset-fashion-mnist`, or point LRPILOT_FMNIST_DIR / --data-dir at it")
    return None


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------
def _shipped() -> dict[str, Any]:
    folder = resources.files("lrpilot.bench").joinpath("suites")
    return {p.name[: -len(".json")]: p for p in folder.iterdir() if p.name.endswith(".json")}


def list_suites() -> list[Suite]:
    """The suites shipped with lrpilot, by name."""
    return [load_suite(name) for name in sorted(_shipped())]


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name (``quick``, ``standard``, ...), or a suite file by path."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"suite file {path} does not exist")
        source = str(path)
        raw = path.read_text()
    else:
        shipped = _shipped()
        if text not in shipped:
            raise ValueError(f"unknown suite {text!r}; shipped suites: {', '.join(sorted(shipped))} (or give a .json path)")
        source = f"lrpilot/bench/suites/{text}.json"
        raw = shipped[text].read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON: {err}") from None
    return Suite.from_json(data, source)
