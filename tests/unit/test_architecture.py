"""The layout's rules, read statically from the source (ast, nothing imported): dependencies run
one way (vprkit <- trainable_vpr <- scripts), no two modules import each other, directly or in a
loop, no file uses a script as a library (outside tests nothing imports one; a test may run a
script's entry points, main and parse_args; its own tests under tests/unit/scripts and tests/e2e
also test its pieces), and no source file outside tests/ and bench/ is over MAX_LINES lines."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

MAX_LINES = 450
PACKAGES = ("vprkit", "trainable_vpr")
SCRIPTS = {p.stem for p in REPO.glob("*.py")} - {"hubconf"}  # the entry points at the repository root
SCRIPT_TESTS = (REPO / "tests" / "unit" / "scripts", REPO / "tests" / "e2e")
ENTRY_POINTS = {"main", "parse_args", "build_parser"}


def tracked_python_files() -> list[Path]:
    skip = {".venv", ".git", "shared", "demo_data", ".cache", "cache"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (function-level imports too):
    `from a.b import c` names a.b, or a.b.c where that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the packages -> the package modules it imports."""
    paths = {module_name(p): p for p in tracked_python_files() if p.relative_to(REPO).parts[0] in PACKAGES}
    known = set(paths)
    return {name: imported_modules(path, known) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_loop_and_only_loops():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_import_each_other_directly_or_in_a_loop():
    graph = import_graph()
    assert cycles(graph) == []
    # the former circle: load_table dispatches, importing both; neither imports it
    assert {"vprkit.tables.places", "vprkit.tables.benchmarks"} <= graph["vprkit.tables.load"]
    assert "vprkit.tables.load" not in graph["vprkit.tables.places"] | graph["vprkit.tables.benchmarks"]


def test_dependencies_run_one_way():
    graph = import_graph()
    upward = {name: sorted(t for t in targets if t.startswith("trainable_vpr"))
              for name, targets in graph.items() if name.startswith("vprkit")}
    assert {name: t for name, t in upward.items() if t} == {}


def script_library_uses(path: Path) -> set[str]:
    """What a test uses of a script beyond running it: `from script import x`, or `script.x` for an
    x that is not an entry point."""
    uses = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
            uses.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in SCRIPTS
              and node.attr not in ENTRY_POINTS):
            uses.add(f"{node.value.id}.{node.attr}")
    return uses


def test_no_file_imports_a_script():
    importers, library_uses = {}, {}
    for path in tracked_python_files():
        where = str(path.relative_to(REPO))
        if path.relative_to(REPO).parts[0] != "tests":
            scripts = imported_modules(path, SCRIPTS) - {module_name(path)}
            if scripts:
                importers[where] = sorted(scripts)
        elif not any(path.is_relative_to(folder) for folder in SCRIPT_TESTS):
            uses = script_library_uses(path)
            if uses:
                library_uses[where] = sorted(uses)
    assert importers == {}
    assert library_uses == {}


def test_the_check_sees_a_script_import(tmp_path):
    path = tmp_path / "user.py"
    path.write_text("def f():\n    import train_vpr\n    from eval_trained import main\n    train_vpr.train()\n"
                    "    train_vpr.main([])\n")
    assert imported_modules(path, SCRIPTS) == {"train_vpr", "eval_trained"}
    assert script_library_uses(path) == {"eval_trained.main", "train_vpr.train"}


def test_no_source_file_is_over_the_line_limit():
    long = {}
    for path in tracked_python_files():
        if path.relative_to(REPO).parts[0] in ("tests", "bench"):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long[str(path.relative_to(REPO))] = lines
    assert long == {}
