"""The package's layers: no import circle among stn's modules, lazy (function-level) imports included.

A circle means two modules each need the other, so neither can be read, tested or moved alone (recovery and
visualize were one; tracking drew pictures through panels, recovery, visualize and cards). The graph is read
from the source with `ast`, so it sees imports that only run inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stn"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """stn module -> the stn modules it imports anywhere in its source (`from stn.x import`, `import stn.x`,
    `from stn import x`)."""
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] == "stn" and len(parts) > 1:
                    found.add(parts[1])
                elif node.module == "stn":
                    found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "stn" and len(parts) > 1:
                        found.add(parts[1])
        graph[path.stem] = {name for name in found if name in modules and name != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_ladder(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from stn.b import g\n")  # lazy: still an edge
    (tmp_path / "b.py").write_text("import stn.c\n")
    (tmp_path / "c.py").write_text("from stn import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_stn_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["train"] >= {"runs", "tracking", "recovery"}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
