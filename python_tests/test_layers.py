"""The package's layers: every import inside exml_fast points down (or sideways within a layer), never up.

``_utils`` → ``ops``/``reference`` → ``models``/``data``/``training`` (+ ``checkpoint``, ``viz``) → ``synth`` →
``cl``/``compress`` → ``experiments``/``integrations`` → ``cli``. Function-local imports count too: an import
placed inside a function to dodge a cycle is still an upward dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "exml_fast"

#: Layer of each top-level unit of the package (a subpackage or a module); higher may import lower.
LAYERS = {
    "_utils": 0, "_ext": 0,
    "reference": 1, "ops": 1,
    "models": 3, "data": 3, "training": 3, "checkpoint": 3, "viz": 3,
    "synth": 4,
    "cl": 5, "compress": 5,
    "experiments": 6, "integrations": 6,
    "cli": 7, "__main__": 8,
}


def _unit(module: str) -> str | None:
    """The top-level unit of a dotted exml_fast module name ('exml_fast.cl.engine' -> 'cl'); None for the
    package itself (its __init__ re-exports the public API from every layer)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "exml_fast" and len(parts) > 1 else None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every exml_fast import in the file, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("exml_fast")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("exml_fast"):
                # `from exml_fast import cl` names a unit too
                if mod == "exml_fast":
                    out += [(node.lineno, f"exml_fast.{a.name}") for a in node.names]
                else:
                    out.append((node.lineno, mod))
    return out


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in FILES}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = _unit(_module_name(path))
    upward = []
    for line, mod in _imports(path):
        other = _unit(mod)
        if other is None or other == me or other not in LAYERS:
            continue
        if LAYERS[other] > LAYERS[me]:
            upward.append(f"line {line}: {mod} ({other}, layer {LAYERS[other]})")
    assert not upward, f"{path.relative_to(PACKAGE)} ({me}, layer {LAYERS[me]}) imports upward: {upward}"


def test_units_of_one_layer_do_not_import_each_other_both_ways():
    """Units of one layer (models, data, training, checkpoint, viz; ops and reference) may use each other in
    one direction only: the import graph between units has no cycle."""
    edges = {}
    for path in FILES:
        me = _unit(_module_name(path))
        for _, mod in _imports(path):
            other = _unit(mod)
            if other is not None and other != me and other in LAYERS:
                edges.setdefault(me, set()).add(other)
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a in edges.get(b, set()) and a < b)
    assert not cycles, cycles


def test_reference_twins_are_pure_pytorch():
    """exml_fast.reference is the oracle of the fused ops: it never calls them."""
    for path in sorted((PACKAGE / "reference").rglob("*.py")):
        assert not [m for _, m in _imports(path) if _unit(m) == "ops"], path


def test_nothing_imports_the_cli():
    for path in FILES:
        if _unit(_module_name(path)) in ("cli", "__main__"):
            continue
        assert not [m for _, m in _imports(path) if _unit(m) == "cli"], path
