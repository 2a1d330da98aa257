"""The layering of docs/ARCHITECTURE.md, checked on every module, with no exceptions:

    core -> estimators -> pilots -> baselines -> loop -> integrations -> bench -> cli

A module imports from its own layer and the layers before it, never from a later one; no two modules
import each other (directly or through others); no module imports a private name (``_x``) from
another module. ``lrpilot/__init__.py`` (the package face) and ``_version.py`` sit outside the layers:
only the face may import from every layer, and nothing imports the face but the CLI's entry point.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lrpilot"
LAYERS = ["_version", "core", "estimators", "pilots", "baselines", "loop", "integrations", "bench", "cli"]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    name = module.split(".")[1] if module.count(".") >= 1 else ""
    if name not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its folder to LAYERS and to docs/ARCHITECTURE.md")
    return LAYERS.index(name)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every absolute lrpilot import, function-level ones included."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
    return [(line, mod, names) for line, mod, names in found if mod == "lrpilot" or mod.startswith("lrpilot.")]


MODULES = sorted(p for p in SRC.rglob("*.py") if _module(p) not in {"lrpilot", "lrpilot.__main__"})


def _target(module: str, names: list[str]) -> list[str]:
    """The modules an import statement reaches: ``from lrpilot.core import distributed`` reaches the
    submodule ``lrpilot.core.distributed``, not only the package."""
    subs = [f"{module}.{n}" for n in names if (SRC.parent / f"{module}.{n}".replace(".", "/")).with_suffix(".py").exists()]
    return subs or [module]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_layers(path: Path) -> None:
    module = _module(path)
    own = _layer(module)
    wrong = []
    for line, mod, names in _imports(path):
        if mod == "lrpilot":
            wrong.append(f"line {line}: the package face 'lrpilot' (import from the module that defines it)")
        elif _layer(mod) > own:
            wrong.append(f"line {line}: {mod}")
    assert not wrong, f"{module} (layer {LAYERS[own]}) imports a later layer: {wrong}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_crosses_a_module(path: Path) -> None:
    private = [
        f"line {line}: {name} from {mod}"
        for line, mod, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, f"{_module(path)} imports private names: {private}"


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        module = _module(path)
        graph[module] = {t for _, mod, names in _imports(path) for t in _target(mod, names) if t != module}

    def package_parents(mod: str) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = mod.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts))}

    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1 and nxt not in package_parents(node):
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def test_every_family_is_listed_once_and_registers_from_its_register_module() -> None:
    from lrpilot.core.families import FAMILIES, register_module
    from lrpilot.core.registry import list_methods

    packages = {p.parent for p in SRC.rglob("register.py")}
    listed = {SRC.parent / package.replace(".", "/") for package in FAMILIES}
    assert packages == listed, "every package with a register.py is in lrpilot.core.families.FAMILIES, and only those"
    from lrpilot.core import registry

    origins = {registry._ORIGIN[info.name] for info in list_methods()}
    assert origins == {register_module(p) for p in FAMILIES}


def test_the_estimators_package_exports_what_its_docstring_promises() -> None:
    import re

    import lrpilot.estimators as estimators

    promised = set(re.findall(r":(?:func|class):`(\w+)`", estimators.__doc__ or ""))
    assert promised and promised <= set(estimators.__all__)
    from lrpilot.estimators import hvp, mi_continuous_discrete  # the import that used to fail
    from lrpilot.estimators.curvature import hvp as hvp_home
    from lrpilot.estimators.mi import mi_continuous_discrete as mi_home

    assert hvp is hvp_home and mi_continuous_discrete is mi_home
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        estimators.nope  # noqa: B018
