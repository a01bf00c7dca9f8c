"""The package layout holds: the API and the workers meet only in `contract`, and no module
imports itself back through others. Every import counts, also those inside functions and under
`TYPE_CHECKING`: they run (or type-check) all the same, and a cycle hidden in a function is
still a cycle a reader has to untangle.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "contract", "workers", "db", "infra", "migrations")
# Which top-level packages each package may import (besides itself).
ALLOWED = {
    "contract": set(),
    "db": {"contract"},
    "api": {"contract", "db"},
    "workers": {"contract", "db"},
    "migrations": {"db", "contract"},
    "infra": {"contract", "db", "workers", "api"},
}
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The project modules a module's imports name, wherever they stand in it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from a import b` names module a.b when there is one, else a's attribute b.
                target = f"{base}.{alias.name}"
                yield from _known(target if target in known else base, known)


def _known(name: str, known: set[str]) -> Iterator[str]:
    while name and name not in known:
        name = name.rpartition(".")[0]
    if name:
        yield name


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(files)
    graph: Graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = imported(tree, name, path.name == "__init__.py", known)
        graph[name] = {t for t in targets if t != name}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
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
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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


def forbidden_edges(graph: Graph) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        top = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{module} imports {target}")
    return bad


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_packages_import_only_what_the_layout_allows() -> None:
    assert forbidden_edges(import_graph()) == []


def test_the_checks_see_what_they_must(tmp_path: Path) -> None:
    """An API module importing a worker module inside a function, and a cycle through a
    `TYPE_CHECKING` import, are both caught."""
    for pkg in ("api", "workers"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "api" / "a.py").write_text("def f():\n    import workers.w\n")
    (tmp_path / "workers" / "w.py").write_text("from workers import v\n")
    (tmp_path / "workers" / "v.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workers.w import X\n"
    )
    graph = import_graph(tmp_path, ("api", "workers"))
    assert forbidden_edges(graph) == ["api.a imports workers.w"]
    assert cycles(graph) == [["workers.v", "workers.w"]]
