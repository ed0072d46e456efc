"""The package's imports follow the layering of docs/DESIGN.md and the team brief, with no cycle:

    errors, _checks, _layout, reference -> kernels -> backends -> functional -> nn -> models, convert
    -> train -> studies -> cli

A module may import its own layer or lower ones, never a higher one; and no set of modules imports
itself round (issue 15, item 17: train/engine <-> train/distributed was one). Every ``import`` counts,
also those inside functions (a lazy import is still an arrow). Read from the source with ``ast``,
nothing is imported."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "groupnorm"

# (module or package prefix, layer); the longest matching prefix wins
LAYERS = [
    ("groupnorm.errors", 0), ("groupnorm._checks", 0), ("groupnorm._layout", 0), ("groupnorm.reference", 0),
    ("groupnorm.kernels", 1),
    ("groupnorm", 2), ("groupnorm.backends", 2),  # the package root re-exports the backend registry
    ("groupnorm.functional", 3),
    ("groupnorm.nn", 4),
    ("groupnorm.models", 5), ("groupnorm.convert", 5),
    ("groupnorm.train", 6),
    ("groupnorm.studies", 7),
    ("groupnorm.cli", 8), ("groupnorm.__main__", 8),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_module(name: str, known: dict) -> bool:
    return name in known


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The package modules that ``name`` (at ``path``) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if is_module(sub, known) else target)
    return {m for m in out if m == "groupnorm" or m.startswith("groupnorm.")}


def layer(name: str) -> int:
    matches = [(len(prefix), rank) for prefix, rank in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer: add it to LAYERS in {__file__} (and to the design's list)"
    return max(matches)[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) - {name} for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in graph().items() if a != "groupnorm" for b in targets if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # The package root's own lazy imports (groupnorm.__getattr__) are not arrows of the graph.
    edges = {a: targets for a, targets in graph().items() if a != "groupnorm"}
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("importer, imported", [("groupnorm.train.engine", "groupnorm.train.distributed"),
                                                ("groupnorm.train.launch", "groupnorm.train.engine"),
                                                ("groupnorm.nn.batch_norm", "groupnorm.functional")])
def test_the_graph_sees_relative_and_lazy_imports(importer, imported):
    assert imported in graph()[importer]
