"""The package's modules import each other without a circle, read from the source with ast.

An edge A -> B is any `import iqa.B` / `from iqa.B import ...` / `from iqa.X import B` (B a module of
X) anywhere in A: at module level and inside functions alike. A function-level import is still a
dependency of A on B; deferring it only hides a circle until both ends are imported at once, so it
counts. Not edges: the parent packages an import passes through (`iqa.heads.report` for
`iqa.heads.report.build`). Python runs a package's __init__ first, but ours hold docstrings and the
root's `load_model`, which imports on call; counting them would join every module to the root.
Modules are the files under folders with an __init__.py (tests/ and benchmarks/ are not the package).
"""

import ast
from pathlib import Path

PACKAGE = "iqa"
ROOT = Path(__file__).resolve().parent.parent


def package_modules(root: Path = ROOT, name: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package: its folder and the sub-folders with an __init__.py."""
    modules = {name: root / "__init__.py"}
    for path in sorted(root.iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py":
            modules[f"{name}.{path.stem}"] = path
        elif path.is_dir() and (path / "__init__.py").is_file():
            modules |= package_modules(path, f"{name}.{path.name}")
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 folders
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import Y`: the module X.Y where Y is one, else X itself
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name in modules and name != module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of two or more modules (Tarjan), as a path back to its start."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [circle_in(graph, set(group)) for group in groups]


def circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected group (breadth first, so short)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_package_has_no_import_cycles():
    modules = package_modules()
    assert {"iqa", "iqa.cli", "iqa.data.distortion_types", "iqa.extract.cleandift", "iqa.heads.report.build"} <= set(modules)
    found = cycles(import_graph(modules))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_level_and_relative_imports_are_edges(tmp_path):
    """The walker itself: a circle closed only by an import inside a function is still found."""
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "low").mkdir()
    (tmp_path / "low" / "__init__.py").write_text("")
    (tmp_path / "low" / "names.py").write_text("def f():\n    from iqa.app import NAME\n    return NAME\n")
    (tmp_path / "app.py").write_text("from .low import names\nNAME = 'x'\n")
    (tmp_path / "loose").mkdir()  # no __init__.py: not part of the package
    (tmp_path / "loose" / "script.py").write_text("import iqa.app\n")
    modules = package_modules(tmp_path)
    assert set(modules) == {"iqa", "iqa.low", "iqa.low.names", "iqa.app"}
    graph = import_graph(modules)
    assert graph["iqa.app"] == {"iqa.low.names"} and graph["iqa.low.names"] == {"iqa.app"}
    assert cycles(graph) == [["iqa.app", "iqa.low.names", "iqa.app"]]
    (tmp_path / "low" / "names.py").write_text("NAME = 'x'\n")
    assert cycles(import_graph(package_modules(tmp_path))) == []
