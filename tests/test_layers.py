"""Imports run one way: vocabulary at the bottom, the stages as siblings, the pipeline, then the front.

Every ``import`` in elastic_fx/ counts, including those made inside functions (only
``if TYPE_CHECKING:`` blocks are skipped: they never run). Three rules:

1. no import cycle between files;
2. a module imports only from its own layer or the layers below (LAYERS, bottom first);
3. the stages (kernels, passes, scoring, search, exporters) never import a sibling of
   their own layer, and no cycle runs between parts (a sub-package or top-level module).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "elastic_fx"

#: Parts by layer, bottom first. A part is a sub-package or a top-level module.
LAYERS: List[Set[str]] = [
    {"version", "errors", "_io", "_precision", "_scorefile", "structures", "keep", "budget", "scores", "data",
     "distributed", "tracing"},
    {"kernels"},
    {"passes"},
    {"scoring", "search", "exporters"},
    {"pipeline"},
    {"elastic", "interop", "evaluate", "report", "demo", "models", "cli", "__init__"},
]
#: Layers whose parts are independent siblings.
SIBLING_LAYERS = (1, 2, 3)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> Set[str]:
    """Every elastic_fx module ``path`` imports (absolute names), function bodies included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "elastic_fx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "elastic_fx":
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import baselines`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # keep only names that are modules (drop `from .x import function`)
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"part {part!r} is in no layer: add it to LAYERS in {__file__}")


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of nodes, or [] (iterative DFS)."""
    colour: Dict[str, int] = {}
    for root in sorted(graph):
        if colour.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            if colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not colour.get(nxt):
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return []


GRAPH = _graph()


def test_every_part_has_a_layer():
    for module in GRAPH:
        _layer(_part(module))


def test_no_import_cycle_between_files():
    cycle = _cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_parts():
    parts: Dict[str, Set[str]] = {}
    for module, deps in GRAPH.items():
        mine = _part(module)
        parts.setdefault(mine, set()).update(_part(d) for d in deps if _part(d) != mine)
    cycle = _cycle(parts)
    assert not cycle, "import cycle between parts: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    mine = _part(module)
    for dep in sorted(GRAPH[module]):
        theirs = _part(dep)
        if theirs == mine:
            continue
        assert _layer(theirs) <= _layer(mine), f"{module} (layer {_layer(mine)}) imports {dep} (layer {_layer(theirs)})"
        if _layer(theirs) == _layer(mine) and _layer(mine) in SIBLING_LAYERS:
            raise AssertionError(f"{module} imports its sibling stage {dep}: move what they share one layer down")


def test_the_checker_sees_function_level_imports():
    """The rules cover imports inside functions (cli.py imports the pipeline only in cmd_prune)."""
    cli = (PACKAGE / "cli.py").read_text()
    assert "\n    from .pipeline import" in cli and "\nfrom .pipeline import" not in cli
    assert "elastic_fx.pipeline" in _imports(PACKAGE / "cli.py")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
