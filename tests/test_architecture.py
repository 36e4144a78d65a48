"""The package's dependencies point one way: every import, module- or function-level, is checked.

Each top-level unit of ``sketchfisher`` has a rank; a module may import its own unit or a unit of a
lower rank, never a sibling of the same rank or anything above it. The chain (also in the README and
``docs/design.md``)::

    errors, progress, phases ← layout, metric, kernels ← capture ← compress, fisher ← collect ← store
      ← interference ← pipeline, planner, evaluation, tasks, plots ← demo ← sketchfisher ← cli ← __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sketchfisher"
RANK = {
    "_version": 0, "errors": 0, "progress": 0, "phases": 0,
    "layout": 1, "metric": 1, "kernels": 1,
    "capture": 2,
    "compress": 3, "fisher": 3,
    "collect": 4,
    "store": 5,
    "interference": 6,
    "pipeline": 7, "planner": 7, "evaluation": 7, "tasks": 7, "plots": 7, "report": 7,
    "demo": 8,
    "__init__": 9,
    "cli": 10,
    "__main__": 11,
}


def unit_of(parts: tuple[str, ...]) -> str:
    """The top-level unit of a module path inside the package (``("compress", "sketch")`` → compress)."""
    if not parts or parts == ("__init__",):
        return "__init__"
    return parts[0]


def module_parts(path: Path) -> tuple[str, ...]:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imported_units(path: Path) -> list[tuple[int, str]]:
    """(line, unit) of every import of a sketchfisher module in ``path``, at any depth."""
    parts = module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                if name[0] == "sketchfisher":
                    found.append((node.lineno, unit_of(tuple(name[1:]))))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = (node.module or "").split(".")
                if name[0] != "sketchfisher":
                    continue
                target = tuple(name[1:])
            else:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + tuple((node.module or "").split(".")) if node.module else base
            if not target:  # "from .. import X" / "from sketchfisher import X": X may be a unit or a facade name
                targets = [unit_of((alias.name,)) if alias.name in RANK else "__init__" for alias in node.names]
            else:
                targets = [unit_of(target)]
            found += [(node.lineno, t) for t in targets]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = unit_of(module_parts(path))
        assert own in RANK, f"{path}: unit {own!r} has no rank; add it to RANK (and to the chain in the docs)"
        for line, unit in imported_units(path):
            assert unit in RANK, f"{path}:{line} imports unknown unit {unit!r}"
            if unit != own and RANK[unit] >= RANK[own]:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} (rank {RANK[own]}) imports "
                           f"{unit} (rank {RANK[unit]})")
    return out


def test_imports_point_down_the_chain():
    bad = violations()
    assert not bad, "imports that run up or across the chain:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from ..compress import Sketch", "compress"),
    ("from .. import kernels", "kernels"),
    ("from .. import analyze", "__init__"),
    ("import sketchfisher as sf", "__init__"),
    ("from sketchfisher.store import StoreReader", "store"),
])
def test_the_walker_sees_every_import_form(tmp_path, monkeypatch, source, expected):
    """The walker is not vacuous: each import form resolves to the unit it names (here from fisher/x.py)."""
    pkg = tmp_path / "sketchfisher"
    (pkg / "fisher").mkdir(parents=True)
    f = pkg / "fisher" / "x.py"
    f.write_text(f"def g():\n    {source}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert [u for _, u in imported_units(f)] == [expected]
