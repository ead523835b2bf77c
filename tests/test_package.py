"""The package's shape: imports flow one way (no cycle, counting imports inside functions too),
every module is small enough to read in one sitting, and nothing points outside the repository."""

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in sorted((ROOT / "minimal").glob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The ``minimal`` modules a file imports, at any depth (``from .x import``, ``from . import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names if n.split(".")[0] in MODULES)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minimal"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names if a.name in MODULES])
    return found - {path.stem}


def test_import_graph_has_no_cycle():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle among minimal's modules: {err.args[1]}")
    assert set(order) == set(MODULES)


def test_modules_are_short():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in lengths.items() if n > 450}
    assert not too_long, f"modules over 450 lines: {too_long}"
    assert sum(lengths.values()) <= 4000, f"minimal/ has {sum(lengths.values())} lines (at most 4,000): {lengths}"


def test_nothing_points_outside_the_repository():
    tracked = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".ipynb", ".toml", ".txt"}
               and not any(part.startswith(".") or part in {"results", "__pycache__"} for part in p.relative_to(ROOT).parts)]
    pattern = re.compile(r"DESIGN\.md|\.\./shared")
    offenders = [str(p.relative_to(ROOT)) for p in tracked if pattern.search(p.read_text(errors="ignore"))]
    assert not offenders, f"files that refer to files outside the repository: {offenders}"
