"""The package's modules import each other without cycles.

Every module under src/vmcluster is parsed with ``ast`` (nothing is imported), and every
``import`` / ``from ... import`` of a vmcluster module becomes an edge of the module graph:

* module-level imports, imports inside functions and methods, and imports under
  ``if TYPE_CHECKING:`` all count. A function-level import is still a runtime import, only later;
  a TYPE_CHECKING import is a design dependency (the module cannot be understood or type-checked
  without the other) and turns into a runtime cycle the day someone moves it out of the guard.
  The failure message marks each edge's kind so the fix is easy to find.
* ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``.
* Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` and ``a``, so those are edges too,
  except the importer's own enclosing packages (they are already initialised before it runs).
* Dynamic imports (``importlib.import_module("...")``) are not seen.

A cycle is a strongly connected component of more than one module.
"""

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "vmcluster"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
# Being removed by a separate change (the Agent handed around as a service locator); the
# second test ignores cycles made only of these packages until then.
ALLOWED_FOR_NOW = ("vmcluster.agent", "vmcluster.api")


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    importer: str
    imported: str
    line: int
    kind: str  # "module level", "in function", "TYPE_CHECKING"


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> source file, for the package whose directory is ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert PACKAGE in modules, f"no package found at {root}"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in the module, with where it sits."""

    def walk(
        nodes: Iterable[ast.AST], kind: str
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, kind
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body, "TYPE_CHECKING")
                yield from walk(node.orelse, kind)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = "TYPE_CHECKING" if kind == "TYPE_CHECKING" else "in function"
                yield from walk(ast.iter_child_nodes(node), inner)
            else:
                yield from walk(ast.iter_child_nodes(node), kind)

    yield from walk(tree.body, "module level")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, modules: dict[str, Path]
) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            found = _resolve(alias.name, modules)
            if found is not None:
                yield found
        return
    if node.level:
        is_package = modules[importer].name == "__init__.py"
        base = importer.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    for alias in node.names:
        # pkg.name if that is a module, else (the longest prefix that is a module) pkg
        found = _resolve(source if alias.name == "*" else f"{source}.{alias.name}", modules)
        if found is not None:
            yield found


def _with_packages(target: str, importer: str) -> Iterator[str]:
    """``target`` and the enclosing packages whose ``__init__`` importing it runs."""
    parts = target.split(".")
    own = {".".join(importer.split(".")[:end]) for end in range(1, importer.count(".") + 2)}
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if candidate not in own or candidate == target:
            yield candidate


def import_graph(root: Path = SRC) -> list[Edge]:
    """The edges among the modules of the package at ``root``, one per (importer, imported)."""
    modules = _modules(root)
    edges: dict[tuple[str, str], Edge] = {}
    order = {"module level": 0, "in function": 1, "TYPE_CHECKING": 2}
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, kind in _imports(tree):
            for target in _targets(node, importer, modules):
                for imported in _with_packages(target, importer):
                    if imported == importer:
                        continue
                    edge = Edge(importer=importer, imported=imported, line=node.lineno, kind=kind)
                    known = edges.get((importer, imported))
                    # Keep the strongest edge: a module-level import over one in a function.
                    if known is None or order[kind] < order[known.kind]:
                        edges[(importer, imported)] = edge
    return list(edges.values())


def strongly_connected(edges: Iterable[Edge]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components sorted, each component's names sorted."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge.imported)
        graph.setdefault(edge.imported, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def cycles(edges: list[Edge]) -> list[list[str]]:
    return [c for c in strongly_connected(edges) if len(c) > 1]


def describe(components: list[list[str]], edges: list[Edge]) -> str:
    lines = []
    for component in components:
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        for edge in sorted(edges, key=lambda e: (e.importer, e.imported)):
            if edge.importer in members and edge.imported in members:
                lines.append(f"  {edge.importer} -> {edge.imported} "
                             f"(line {edge.line}, {edge.kind})")  # fmt: skip
    return "\n".join(lines)


def _allowed_for_now(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_FOR_NOW)


def test_no_import_cycles() -> None:
    edges = import_graph()
    found = cycles(edges)
    assert not found, f"{len(found)} import cycle(s) in {PACKAGE}:\n" + describe(found, edges)


def test_no_cycle_outside_agent_and_api() -> None:
    """The same, ignoring only cycles made purely of modules in vmcluster.agent and
    vmcluster.api (see ALLOWED_FOR_NOW); a cycle that also holds any other module fails."""
    edges = import_graph()
    found = [c for c in cycles(edges) if not all(_allowed_for_now(m) for m in c)]
    assert not found, f"{len(found)} import cycle(s) in {PACKAGE}:\n" + describe(found, edges)


def test_api_client_imports_neither_cli_nor_lab() -> None:
    """The REST client is a library: what it talks to is given to it, never looked up."""
    imported = {e.imported for e in import_graph() if e.importer == "vmcluster.api.client"}
    assert not {m for m in imported if m.startswith(("vmcluster.cli", "vmcluster.lab"))}


def _graph_of(source: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """Cycles of a made-up package (tests of the checker itself)."""
    root = tmp_path / PACKAGE
    for name, text in source.items():
        path = root.joinpath(*name.split(".")[1:]).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return cycles(import_graph(root))


def test_checker_sees_function_type_checking_and_relative_imports(tmp_path: Path) -> None:
    found = _graph_of(
        {
            "vmcluster.__init__": "",
            "vmcluster.a.__init__": "",
            "vmcluster.a.x": "def f():\n    from vmcluster.b import y\n",
            "vmcluster.b.__init__": "",
            "vmcluster.b.y": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ..a import x\n",
            "vmcluster.c": "import vmcluster.d\n",
            "vmcluster.d": "from vmcluster import c\n",
            "vmcluster.e": "import vmcluster.a.x\n",
        },
        tmp_path,
    )
    assert found == [["vmcluster.a.x", "vmcluster.b.y"], ["vmcluster.c", "vmcluster.d"]]


def test_checker_counts_a_package_init_that_imports_back(tmp_path: Path) -> None:
    found = _graph_of(
        {
            "vmcluster.__init__": "",
            "vmcluster.p.__init__": "from vmcluster.q import z\n",
            "vmcluster.p.m": "",
            "vmcluster.q": "from vmcluster.p.m import thing\n",
        },
        tmp_path,
    )
    assert found == [["vmcluster.p", "vmcluster.q"]]
