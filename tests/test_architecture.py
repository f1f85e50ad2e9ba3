"""Architecture rules, read from the source with `ast` (nothing is imported):

- the package's own modules import each other without cycles, counting every import: module
  level and inside functions, absolute (``orchestrator.x``) and relative (``.x``, ``..x``);
- each package imports only the packages its pipeline stage may (`LAYERS`, DESIGN.md's table);
- each upstream library is imported only by the package or module that wraps it;
- no private name of an upstream library is used: its internals change without notice.

``python tests/test_architecture.py`` prints the package graph, the module graph (module ->
imports), and any cycle or import against the layering.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "orchestrator"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
# upstream top-level package -> the only modules (or packages, with all they hold) that import it
OWNERS = {"mlflow": {"orchestrator.record", "orchestrator.serving"},
          "ray": {"orchestrator.sweep", "orchestrator.runtime"},
          "datasets": {"orchestrator.data.hfsets"}}
# The layering, by pipeline stage: package -> the packages of `orchestrator` it may import (its own
# modules aside). `hashing` is a leaf any of them may use. The top-level modules (`cli`, `demo`,
# `quickstart`, `serving`, `starter`, the package's `__init__`) may import everything below them.
LAYERS = {
    "hashing": set(),
    "config": set(),
    "runtime": set(),
    "data": {"config", "hashing"},
    "train": {"config", "data", "hashing"},
    "soups": {"train"},
    "record": {"hashing"},
    "sweep": {"config", "data", "train", "soups", "record", "runtime", "hashing"},
    "cook": {"config", "data", "train", "soups", "record", "runtime", "hashing"},
}
TOP = {"cli", "demo", "quickstart", "serving", "starter"}
GUARDED = ("ray", "mlflow", "torch", "open_clip")  # whose private names must not be used


@dataclass(frozen=True)
class Import:
    """One imported module, as written at `line` of `source` (a module of the package)."""
    source: str
    module: str
    line: int
    names: tuple[str, ...] = ()  # for ``from module import names``


# --- reading the package ----------------------------------------------------------------------

def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by __init__)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(name: str, path: Path, tree: ast.Module) -> list[Import]:
    """Every import statement anywhere in the file (functions included), made absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            found.append(Import(name, base, node.lineno, tuple(a.name for a in node.names)))
    return found


def _absolute(module: str | None, level: int, package: str) -> str:
    """``from ..x import y`` inside `package` -> the absolute module ``x`` names."""
    if not level:
        return module or ""
    parts = package.split(".")
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


# --- the module graph -------------------------------------------------------------------------

def own_targets(imp: Import, modules: set[str]) -> set[str]:
    """The package's modules an import loads: ``from . import a, b`` names modules a and b when
    they are modules, else the package it imports from."""
    if not (imp.module == PACKAGE or imp.module.startswith(PACKAGE + ".")):
        return set()
    subs = {f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules}
    rest = len(subs) < len(imp.names) or not imp.names
    return subs | ({_nearest(imp.module, modules)} if rest else set())


def _nearest(module: str, modules: set[str]) -> str:
    """`module`, or the closest package above it that exists (``import orchestrator.x.Name``)."""
    while module not in modules and "." in module:
        module = module.rpartition(".")[0]
    return module


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself excluded)."""
    files = module_files(root)
    graph = {}
    for name, path in files.items():
        targets = set()
        for imp in imports_of(name, path, parse(path)):
            targets |= own_targets(imp, set(files))
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (first module repeated at the end) per strongly connected component
    of more than one module: every module caught in a cycle shows up in one of them."""
    return [_shortest_cycle(graph, min(scc), scc) for scc in _components(graph) if len(scc) > 1]


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative: no recursion limit)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    found.append(_pop_component(stack, on_stack, node))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _pop_component(stack: list[str], on_stack: set[str], root: str) -> set[str]:
    component = set()
    while True:
        node = stack.pop()
        on_stack.discard(node)
        component.add(node)
        if node == root:
            return component


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """Breadth-first from `start` back to itself, inside one component."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & within):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    raise AssertionError(f"{start} is in no cycle")


# --- upstream rules ---------------------------------------------------------------------------

def all_imports(root: Path = ROOT) -> list[Import]:
    return [imp for name, path in module_files(root).items() for imp in imports_of(name, path, parse(path))]


def _within(module: str, owners: set[str]) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def boundary_violations(root: Path = ROOT) -> list[str]:
    """Imports of an upstream library by a module that does not own it."""
    return [f"{imp.source}:{imp.line} imports {imp.module}" for imp in all_imports(root)
            for top, owners in OWNERS.items()
            if imp.module.split(".")[0] == top and not _within(imp.source, owners)]


def stage(module: str) -> str:
    """The package (pipeline stage) a module belongs to: ``orchestrator.cook.build`` -> cook;
    a top-level module is its own name, the package's ``__init__`` is ``orchestrator``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Stage -> the other stages its modules import."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(stage(module), set()).update(stage(t) for t in targets)
    return {k: v - {k} for k, v in out.items()}


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports across stages that `LAYERS` does not allow (a stage missing from it and the top
    may import anything; a stage must not import the top)."""
    found = []
    for module, targets in sorted(graph.items()):
        src = stage(module)
        for t in sorted(targets):
            dst = stage(t)
            if dst == src or src in TOP or src == PACKAGE:
                continue
            if dst in TOP or dst == PACKAGE or dst not in LAYERS.get(src, set()):
                found.append(f"{module} imports {t}: {src} may import {', '.join(sorted(LAYERS.get(src, ()))) or 'nothing of the package'}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _guarded(module: str) -> bool:
    return module.split(".")[0] in GUARDED


def private_uses(root: Path = ROOT) -> list[str]:
    """Private modules or names of the guarded libraries, imported or reached as attributes."""
    found = []
    for name, path in module_files(root).items():
        tree = parse(path)
        imports = [i for i in imports_of(name, path, tree) if _guarded(i.module)]
        found += [f"{name}:{i.line} imports {i.module}" for i in imports
                  if any(_private(p) for p in i.module.split("."))]
        found += [f"{name}:{i.line} imports {i.module}.{n}" for i in imports for n in i.names if _private(n)]
        found += [f"{name}:{line} uses {chain}" for line, chain in _private_attributes(tree)]
    return found


def _upstream_bindings(tree: ast.Module) -> set[str]:
    """Names that an import of a guarded library binds in this file (any scope)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if _guarded(a.name)}
        elif isinstance(node, ast.ImportFrom) and not node.level and _guarded(node.module or ""):
            bound |= {a.asname or a.name for a in node.names}
    return bound


def _private_attributes(tree: ast.Module) -> list[tuple[int, str]]:
    """``X._name`` (anywhere in an attribute chain) where X is bound by a guarded import."""
    bound, found = _upstream_bindings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _chain(node)
            if chain and chain[0] in bound:
                found.append((node.lineno, ".".join(chain)))
    return found


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


# --- the tests --------------------------------------------------------------------------------

def test_the_walk_sees_every_kind_of_import(tmp_path):
    """Relative, lazy and ``from . import`` forms all land in the graph (a made-up package)."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "a.py": "def f():\n    from . import b, helper\n",
                      "b.py": "from .sub import c\n", "sub/__init__.py": "",
                      "sub/c.py": "import orchestrator.a\nfrom .. import b\n"}.items():
        (pkg / rel).write_text(text)
    graph = module_graph(pkg)
    assert graph["orchestrator.a"] == {"orchestrator.b", "orchestrator"}  # helper is a name of the package
    assert graph["orchestrator.b"] == {"orchestrator.sub.c"}
    assert graph["orchestrator.sub.c"] == {"orchestrator.a", "orchestrator.b"}
    assert cycles(graph) == [["orchestrator.a", "orchestrator.b", "orchestrator.sub.c", "orchestrator.a"]]


def test_no_import_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_stage_imports_only_the_stages_below_it():
    """The layering table holds, and every package of the package is in it (a new package has
    to say what it may import)."""
    graph = module_graph()
    stages = {stage(m) for m in graph} - TOP - {PACKAGE}
    assert stages == set(LAYERS), f"packages missing from LAYERS or gone: {stages ^ set(LAYERS)}"
    found = layering_violations(graph)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_the_layout_page_names_every_package_and_module():
    """docs/layout.md, the newcomer's map, names every package and module (in backticks)."""
    page = (ROOT.parent / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`([\w/]+)`", page))
    missing = []
    for module, path in module_files().items():
        parts = module.split(".")[1:]
        if not parts:
            continue
        name = parts[-1] if path.name != "__init__.py" else f"{parts[-1]}/"
        if name not in named and name.rstrip("/") not in named:
            missing.append(module)
    assert not missing, f"docs/layout.md does not name: {', '.join(missing)}"


def test_upstream_libraries_only_through_their_owner():
    found = boundary_violations()
    owners = "; ".join(f"{lib} only in {', '.join(sorted(mods))}" for lib, mods in OWNERS.items())
    assert not found, f"{owners}:\n" + "\n".join(found)


def test_no_private_upstream_names():
    found = private_uses()
    assert not found, f"private names of {', '.join(GUARDED)}:\n" + "\n".join(found)


def print_graph(root: Path = ROOT) -> None:
    """The package graph (stage -> the stages it imports), the module graph (one
    ``module -> imports`` line each), then cycles and layering violations, if any."""
    graph = module_graph(root)
    print("packages (stage -> stages it imports):")
    for name, targets in sorted(package_graph(graph).items()):
        print(f"  {name} -> {', '.join(sorted(targets)) or '(nothing)'}")
    print("modules:")
    for name in sorted(graph):
        print(f"  {name} -> {', '.join(sorted(graph[name])) or '(nothing)'}")
    for cycle in cycles(graph):
        print("cycle:", " -> ".join(cycle))
    for line in layering_violations(graph):
        print("against the layering:", line)


if __name__ == "__main__":
    print_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
