"""The import graph follows docs/DESIGN.md's layers: every starfast module imports only modules
of its own layer or below, and no two modules import each other (directly or in a circle)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "starfast"

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS = [
    ("core", ["starfast._C", "starfast.extension", "starfast.allocator", "starfast.workload", "starfast.names", "starfast.progress", "starfast.files", "starfast.checkpoint_import", "starfast.flat",
              "starfast.spec", "starfast.tracing", "starfast.spec_check", "starfast.ops", "starfast.lap", "starfast.models", "starfast.data", "starfast.recipes",
              "starfast.testing"]),
    ("algorithm support", ["starfast.training_common", "starfast.bank", "starfast.bn", "starfast.warm_start",
                           "starfast.calibration", "starfast.sites", "starfast.uncertainty"]),
    ("algorithms", ["starfast.matching", "starfast.sinkhorn", "starfast.activation_matching", "starfast.ste_matching", "starfast.repair", "starfast.merge_many", "starfast.matchers", "starfast.barrier", "starfast.training", "starfast.starlight", "starfast.theory"]),
    ("run directory", ["starfast.rundir"]),
    ("pipeline", ["starfast.environment", "starfast.pipeline", "starfast.in_memory", "starfast.evaluation", "starfast.bma", "starfast.fusion", "starfast.report",
                  "starfast.experiments", "starfast.smoke"]),
    ("cli", ["starfast.arguments", "starfast.train", "starfast.evaluate", "starfast.theory.cli", "starfast.theory.__main__",
             "starfast.experiments.__main__", "starfast.check"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = max(((len(prefix), level) for level, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: add it"
    return best[1]


def runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(path: Path, module: str):
    """Every starfast module named by an import statement run anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("starfast"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "starfast":  # from starfast import models, data
                yield from (f"starfast.{alias.name}" for alias in node.names)
            elif base.startswith("starfast"):
                yield base


def graph():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for module, path in modules.items():
        if module == "starfast":  # the package's API surface re-exports from every layer
            continue
        edges[module] = {name for name in imports_of(path, module) if name != module and name != "starfast"}
    return edges


def test_no_module_imports_from_a_higher_layer():
    edges = graph()
    # the walk sees function-level and relative imports too
    assert {"starfast.pipeline", "starfast.evaluate"} <= edges["starfast.train"]
    assert "starfast.data.dataset" in edges["starfast.data"]
    upward = []
    for module, imported in edges.items():
        for name in imported:
            if layer_of(name) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {name} ({LAYERS[layer_of(name)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycles():
    edges = graph()
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for name in sorted(edges.get(module, ())):
            target = name if name in edges else max((m for m in edges if name.startswith(m + ".")), key=len, default=name)
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target in edges and target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)
