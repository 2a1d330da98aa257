"""The layering of docs/ARCHITECTURE.md, checked: imports only point up the list of layers.

    (foundation) registry, distributed, pilots/base, _version
    estimators -> pilots -> baselines -> loop -> integrations -> bench -> cli

A module may import from its own layer and from the layers before it. The two leaf utilities of the loop
(``loop/data.py``: ``TensorLoader``, batch checks; ``loop/seeding.py``: RNG capture) import nothing from
lrpilot and may be used from any layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lrpilot"
LAYERS = ["estimators", "pilots", "baselines", "loop", "integrations", "bench", "cli"]
FOUNDATION = {"lrpilot", "lrpilot.registry", "lrpilot.distributed", "lrpilot.pilots.base", "lrpilot._version"}
LEAVES = {"lrpilot.loop.data", "lrpilot.loop.seeding"}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    if module in FOUNDATION or module in LEAVES:
        return -1
    name = module.split(".")[1] if module.count(".") >= 1 else ""
    return LAYERS.index(name) if name in LAYERS else -1


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, mod) for line, mod in found if mod == "lrpilot" or mod.startswith("lrpilot.")]


MODULES = sorted(p for p in SRC.rglob("*.py") if _module(p) not in {"lrpilot", "lrpilot.__main__"})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_up_the_layers(path: Path) -> None:
    module = _module(path)
    own = _layer(module)
    if module in LEAVES:
        assert not _imports(path), f"{module} is a leaf utility: it must not import lrpilot"
        return
    wrong = [f"line {line}: {mod}" for line, mod in _imports(path) if _layer(mod) > own]
    assert not wrong, f"{module} (layer {LAYERS[own] if own >= 0 else 'foundation'}) imports a later layer: {wrong}"
