"""Print the project's internal import graph: files, import circles, longest files and functions.

Run from the repository root: `python scripts/import_graph.py [--edges]`. Reads source with `ast` only (nothing is
imported), so it works in any environment and measures the tree as it is on disk.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("featcache", "adapters", "study", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {
        _module_name(p.relative_to(root)): p
        for pkg in PACKAGES
        if (root / pkg).is_dir()
        for p in sorted((root / pkg).rglob("*.py"))
    }


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Internal modules `mod` imports at run time, at any depth in the file (lazy imports count: they are still
    edges; ``if TYPE_CHECKING:`` imports do not)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = mod.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            target = _resolve(n, modules)
            if target and target != mod and not mod.startswith(target + "."):
                out.add(target)
    return out


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` blocks import for annotations only: not an import edge at run time."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (n.end_lineno - n.lineno + 1, n.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno
    ]


def main(argv: list[str]) -> int:
    root = Path.cwd()
    modules = _modules(root)
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    pkg_edges = sorted({(a.split(".")[0], b.split(".")[0]) for a, ts in graph.items() for b in ts
                        if a.split(".")[0] != b.split(".")[0]})
    lines = {m: len(p.read_text().splitlines()) for m, p in modules.items()}
    funcs = sorted(((n, f"{_rel(modules[m], root)}:{name}") for m in modules for n, name in _functions(modules[m])),
                   reverse=True)
    cycles = _cycles(graph)
    print(f"modules: {len(modules)}  lines: {sum(lines.values())}  internal imports: {sum(map(len, graph.values()))}")
    print("package edges: " + ", ".join(f"{a} -> {b}" for a, b in pkg_edges))
    print(f"import circles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print("longest files:")
    for m in sorted(lines, key=lines.get, reverse=True)[:8]:
        print(f"  {lines[m]:5d}  {_rel(modules[m], root)}")
    print("longest functions:")
    for n, name in funcs[:8]:
        print(f"  {n:5d}  {name}")
    if "--edges" in argv:
        for m in sorted(graph):
            print(f"{m}: {' '.join(sorted(graph[m]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
