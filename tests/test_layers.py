"""The package's layers: no import circle among stn's modules, lazy (function-level) imports included.

A circle means two modules each need the other, so neither can be read, tested or moved alone (recovery and
visualize were one; tracking drew pictures through panels, recovery, visualize and cards). The graph is read
from the source with `ast`, so it sees imports that only run inside a function.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stn"


def module_name(path: Path, package: Path) -> str:
    """src/stn/engine/plan.py -> "engine.plan"; a package's __init__.py is the package ("engine")."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """stn module -> the stn modules it imports anywhere in its source (`from stn.x.y import`, `import stn.x`,
    `from stn.x import y` where y is a module), dotted below stn ("engine.plan"; flat modules are one word)."""
    paths = [path for path in package.rglob("*.py") if path.name != "__main__.py"]
    modules = {module_name(path, package) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "stn":
                    continue
                below = ".".join(parts[1:])
                if below:
                    found.add(below)
                found.update(f"{below}.{alias.name}".lstrip(".") for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "stn" and len(parts) > 1:
                        found.add(".".join(parts[1:]))
        name = module_name(path, package)
        graph[name] = {other for other in found if other in modules and other != name}
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


# Which parts of stn a part may import: the flat core (the paper's models, data, training, records) only
# itself; the launchers the core; each wing the core, the launchers and itself, never another wing; the CLI all.
MAY_IMPORT = {
    "core": {"core"},
    "launch": {"core", "launch"},
    **{wing: {"core", "launch", wing} for wing in ("engine", "bench", "convergence", "tables")},
    "cli": {"core", "launch", "engine", "bench", "convergence", "tables", "cli"},
}


def part_of(module: str) -> str:
    """"engine.plan" and the package "engine" -> "engine"; a flat module ("train") -> "core"."""
    first = module.split(".")[0]
    return first if first in MAY_IMPORT else "core"


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Every import a part may not make, as "importer -> imported"."""
    return sorted(f"{module} -> {other}" for module, others in graph.items() for other in others
                  if part_of(other) not in MAY_IMPORT[part_of(module)])


def test_the_cycle_finder_finds_a_circle_and_accepts_a_ladder(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from stn.b import g\n")  # lazy: still an edge
    (tmp_path / "b.py").write_text("import stn.c\n")
    (tmp_path / "c.py").write_text("from stn import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_the_layer_check_finds_an_upward_and_a_sideways_import(tmp_path: Path) -> None:
    for part in ("engine", "tables"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "__init__.py").write_text("")
    (tmp_path / "train.py").write_text("def f():\n    from stn.engine.plan import run\n")  # core -> wing
    (tmp_path / "engine" / "plan.py").write_text("from stn import train\nfrom stn.tables import reproduce\n")
    (tmp_path / "tables" / "reproduce.py").write_text("import stn.train\n")
    graph = import_graph(tmp_path)
    assert graph["engine.plan"] == {"train", "tables", "tables.reproduce"}
    assert layer_breaches(graph) == ["engine.plan -> tables", "engine.plan -> tables.reproduce",
                                     "train -> engine.plan"]
    (tmp_path / "train.py").write_text("import torch\n")
    (tmp_path / "engine" / "plan.py").write_text("from stn import train\n")
    assert layer_breaches(import_graph(tmp_path)) == []


def test_stn_imports_only_downward() -> None:
    graph = import_graph()
    assert set(map(part_of, graph)) == set(MAY_IMPORT), "a part of stn the layer rule does not know"
    assert layer_breaches(graph) == []


def test_stn_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["train"] >= {"runs", "tracking", "recovery"}
    assert graph["cli.main"] >= {"cli.common", "tables.dashboard", "launch.sweep"}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def top_level_names(package: Path = PACKAGE, *, with_imports: bool = False) -> dict[str, set[str]]:
    """stn module -> the names its top level defines (functions, classes, assignments; for classes also
    "Class.member" for their methods and fields), and with_imports the names it imports too."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names: set[str] = set()
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and with_imports:
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                for member in node.body if isinstance(node, ast.ClassDef) else []:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{member.name}")
                    elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                        names.add(f"{node.name}.{member.target.id}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        found[".".join(["stn", *filter(None, [module_name(path, package)])])] = names
    return found


def fake_engine(tmp_path: Path, modules: dict[str, str]) -> None:
    """A made-up stn package under tmp_path with an `engine` subpackage holding `modules` (name -> source)."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    for name, source in modules.items():
        (tmp_path / "engine" / f"{name}.py").write_text(source)


def borrowed_imports(roots: list[Path], package: Path = PACKAGE) -> list[str]:
    """Every `from stn.x import name` (in the files under `roots`) where stn.x does not define `name` itself but
    only imports it: a re-export, which hides where the name lives (and kept the old homes of moved code alive)."""
    defined = top_level_names(package)
    borrowed = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in defined:
                    borrowed += [f"{path}:{node.lineno}: {node.module}.{alias.name}" for alias in node.names
                                 if alias.name not in defined[node.module]
                                 and f"{node.module}.{alias.name}" not in defined]  # a submodule
    return borrowed


def test_the_borrowed_import_check_finds_a_re_export(tmp_path: Path) -> None:
    fake_engine(tmp_path, {"options": "class EngineError(Exception):\n    pass\n",
                           "batched": "from stn.engine.options import EngineError\nK = 1\n"})
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.py").write_text("from stn.engine.batched import K, EngineError\nfrom stn.engine import options\n")
    assert borrowed_imports([user], tmp_path) == [f"{user / 'a.py'}:1: stn.engine.batched.EngineError"]


def test_every_stn_import_names_the_module_that_defines_it() -> None:
    root = PACKAGE.parents[1]
    assert borrowed_imports([root / "src", root / "tests", root / "experiments", root / "tools"]) == []


# Dotted names in text that are not stn's modules: OmegaConf resolvers registered under "stn." (conf/logger).
NOT_MODULES = {"stn.wandb_mode", "stn.wandb_tags"}
HISTORY = ("experiments/refactor/README.md",)  # records of the old layout, kept as written
DOTTED = re.compile(r"\bstn(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def dangling_references(files: list[Path], package: Path = PACKAGE) -> list[str]:
    """Every `stn.module.name` written in `files` (docstrings, comments, READMEs) whose module or name does not
    exist: text that sends a reader to where code used to be."""
    bound = top_level_names(package, with_imports=True)
    modules = sorted(bound, key=len, reverse=True)
    dangling = []
    for path in files:
        for match in DOTTED.finditer(path.read_text()):
            reference = match.group(0)
            if reference in NOT_MODULES or reference in bound:
                continue
            module = next((m for m in modules if reference.startswith(m + ".")), None)
            rest = reference[len(module) + 1:].split(".") if module else []
            if module is None or not (rest[0] in bound[module] or ".".join(rest[:2]) in bound[module]
                                      or f"{module}.{rest[0]}" in bound or rest[0].startswith("__")):
                dangling.append(f"{path}: {reference}")
    return dangling


def test_the_reference_check_finds_a_name_that_moved(tmp_path: Path) -> None:
    fake_engine(tmp_path, {"options": "import os\nclass EngineOptions:\n    mode: str = 'vmap'\n",
                           "batched": "from stn.engine.options import EngineOptions\n"})
    doc = tmp_path / "notes.md"
    doc.write_text("`stn.engine.options.EngineOptions.mode`, `stn.engine.options.os`, `stn.engine.batched`;\n"
                   "`stn.engine.options.conv_path_for` and `stn.plan.run_table` moved or never were.\n")
    assert dangling_references([doc], tmp_path) == [f"{doc}: stn.engine.options.conv_path_for",
                                                     f"{doc}: stn.plan.run_table"]


def test_every_stn_name_in_the_docs_and_docstrings_exists() -> None:
    root = PACKAGE.parents[1]
    files = [root / "README.md", *sorted((root / "src").rglob("*.py")), *sorted((root / "conf").rglob("*.yaml"))]
    files += [path for path in sorted((root / "experiments").rglob("*")) if path.suffix in (".md", ".py", ".sh")
              and "loan-" not in str(path) and not str(path).endswith(HISTORY)]
    files += [path for path in sorted((root / "tests").glob("*.py")) if path.name != "test_layers.py"]
    assert dangling_references(files) == []
