"""The package's structure: the method apart from the experiments, no import cycle, and the
functional API light enough to import into any JAX project."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_ONLY = ("configs", "launch", "benchmarks", "experiments", "tests")


def _modules(package: str) -> dict[str, Path]:
    """Every module of a top-level package of the checkout: dotted name -> file."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that importing `name` runs first: its module-level imports, and the
    packages above them that `name` is not inside."""
    targets = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets.add(node.module)
            targets |= {f"{node.module}.{a.name}" for a in node.names}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            above = ".".join(parts[:i])
            if above in known and above != name and not name.startswith(above + "."):
                edges.add(above)
    return edges


def _graph(*packages: str) -> dict[str, set[str]]:
    modules = {n: p for package in packages for n, p in _modules(package).items()}
    return {n: _imports(n, p, set(modules)) for n, p in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph`, or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package_and_the_experiments():
    graph = _graph("smsd_jax", "experiments")
    assert len(graph) > 50 and "smsd_jax.site" in graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_installed_package_never_imports_the_checkout():
    for path in _modules("smsd_jax").values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in CHECKOUT_ONLY]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}: not installed with it"


def test_every_module_imports():
    for name in [*_modules("smsd_jax"), *_modules("experiments")]:
        importlib.import_module(name)


@pytest.mark.slow
def test_ops_and_models_load_jax_flax_optax_and_numpy_only():
    # In a fresh interpreter: what `import smsd_jax.ops, smsd_jax.models` loads beyond what
    # jax, flax.linen, optax and numpy load themselves is smsd_jax and nothing else.
    code = ("import sys; import jax, flax.linen, optax, numpy; before = set(sys.modules); "
            "import smsd_jax.ops, smsd_jax.models; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['smsd_jax']"
