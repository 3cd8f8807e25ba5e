"""The import graph of hetero's three packages, read from the source (module-level and function-level
imports alike), the layer each module belongs to, and the cycles and upward imports in it.

Layers, from the bottom up (issue 22): ``devices`` (numpy and a runtime: never torch, hetero or
export), hetero's learning core, ``export``, and the application layer (CLI, demo, evaluate, verify,
search orchestration, latency measurement), the only one that wires everything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("devices", "hetero", "export")
LAYERS = ("devices", "core", "export", "app")
APP = ("hetero.app", "hetero.__main__")
FRONT = "hetero"  # the package itself: its Python API names load from hetero.app on first use (``_API``)


def modules() -> dict[str, Path]:
    """Dotted name -> source file, for every module of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def layer(mod: str) -> str:
    if mod.split(".")[0] == "devices":
        return "devices"
    if mod.split(".")[0] == "export":
        return "export"
    if mod == FRONT:
        return "app"
    return "app" if any(mod == a or mod.startswith(a + ".") for a in APP) else "core"


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports, anywhere in its source."""
    graph: dict[str, set[str]] = {}
    for mod, f in known.items():
        is_pkg = f.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from pkg import mod` depends on pkg.mod (and runs pkg/__init__ first, as any import
                # of pkg.x does); `from pkg import name` of a non-module depends on pkg itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for name in names:
                while name and name not in known:  # `from pkg import function`: the module is pkg
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        if mod == FRONT:  # the lazily loaded API: `_API = {name: module under hetero.app}`
            deps |= {f"hetero.app.{m}" for m in _api_table(f)}
        graph[mod] = deps
    return graph


def _api_table(f: Path) -> set[str]:
    for node in ast.parse(f.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_API" for t in node.targets):
            return {v.value for v in node.value.values if isinstance(v, ast.Constant)}
    return set()


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((a, b) for a, deps in graph.items() for b in deps if rank[layer(b)] > rank[layer(a)])


def local_imports(known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module, imported) for imports of the three packages made inside a function: each is a place
    where a layer or a cycle is dodged, or a cost deferred; issue 22 keeps them for heavy optional
    libraries only."""
    out = []
    for mod, f in known.items():
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                out += [(mod, n) for n in names if n.split(".")[0] in PACKAGES]
    return sorted(set(out))


def third_party(known: dict[str, Path], mod: str) -> set[str]:
    """Top-level names of what ``mod`` imports from outside the three packages, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(known[mod].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - set(PACKAGES)
