"""The layout's import rule, read from the source: imports only go down the layers, never in a circle.

Layers, lowest first: ``studio.core`` ← ``models`` ← ``solvers`` ← ``studio.training`` ← ``studio.workflows``
← ``studio.eval`` ← ``studio.app`` ← ``studio.cli``. A module may import its own layer and the layers below
it. Project imports sit at module level; a function-local one needs a ``# lazy: <reason>`` comment (e.g. the
CLI importing the Gradio app only for ``studio app``), so no local import can hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["studio.core", "models", "solvers", "studio.training", "studio.workflows", "studio.eval",
          "studio.app", "studio.cli"]
PROJECT = ("studio", "solvers", "models")


def layer_of(module: str) -> int | None:
    best = None
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = i
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    files = []
    for top in ("studio", "solvers", "models"):
        files += sorted((ROOT / top).rglob("*.py"))
    return files


def imports_of(path: Path):
    """(imported module, line number, is module level, source line) for every project import."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    top_level = {id(n) for n in tree.body}
    top_level |= {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                yield name, node.lineno, id(node) in top_level, lines[node.lineno - 1]


def existing_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_every_project_module_has_a_layer() -> None:
    missing = [module_name(f) for f in project_files() if layer_of(module_name(f)) is None
               and module_name(f) not in ("studio",)]
    assert not missing, f"modules outside the layout's layers: {missing}"


def test_imports_only_go_down() -> None:
    upward = []
    for f in project_files():
        mine = layer_of(module_name(f))
        for name, line, _, _ in imports_of(f):
            theirs = layer_of(name)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{f.relative_to(ROOT)}:{line} imports {name} ({LAYERS[theirs]} is above "
                              f"{LAYERS[mine]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_local_project_imports_say_why() -> None:
    hidden = [f"{f.relative_to(ROOT)}:{line}: {text.strip()}"
              for f in project_files() for _, line, top, text in imports_of(f)
              if not top and "# lazy:" not in text]
    assert not hidden, "function-local project imports without a '# lazy: <reason>' comment:\n" + "\n".join(
        sorted(set(hidden)))


def test_no_import_cycles() -> None:
    files = project_files()
    known = {module_name(f) for f in files}
    graph = {module_name(f): set() for f in files}
    for f in files:
        for name, _, top, _ in imports_of(f):
            target = existing_module(name, known)
            if top and target and target != module_name(f):
                graph[module_name(f)].add(target)
    # a package importing its own submodules (re-exports) is not a cycle unless they import it back
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)



MAX_FUNCTION_LINES = 80
CODE_OUTSIDE_TESTS = ("studio", "solvers", "models", "docs", "app.py")


def long_functions(path: Path):
    """``path:line name (n lines)`` for each function longer than the limit, from ``def`` to its last line."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_is_longer_than_80_lines() -> None:
    """Long functions get split into named steps (docstrings count: they belong to the function)."""
    files = []
    for top in CODE_OUTSIDE_TESTS:
        path = ROOT / top
        files += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    too_long = [entry for f in files for entry in long_functions(f)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
