"""The package's structure, read from its imports: the layer order in `allspark_jax/__init__.py`'s
docstring holds for every import (lazy ones inside functions too), no two modules import each other
through any chain, the longest chain of imports stays short, and no module is long."""
from __future__ import annotations

import ast
import functools
import os
import re

import pytest

import allspark_jax

PACKAGE_DIR = os.path.dirname(allspark_jax.__file__)
MAX_CHAIN = 10  # modules on the longest import chain inside the package
MAX_LINES = 600  # lines of any one module


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The package's modules that one import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]


def _is_face(tree: ast.Module, path: str) -> bool:
    """A package's __init__ that defines nothing: a docstring, imports that hand names on, __all__."""
    if not path.endswith("__init__.py"):
        return False
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        return False
    return True


@functools.lru_cache(maxsize=None)
def _direct() -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """(module -> the package's modules its file imports, lazy imports too; the faces)."""
    out, faces = {}, set()
    for module, path in modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        if _is_face(tree, path):
            faces.add(module)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(node, module, is_package):
                    while name and name not in modules():
                        name = name.rpartition(".")[0]
                    if name and name != module and name.startswith("allspark_jax"):
                        deps.add(name)
        deps.discard("allspark_jax")  # the package's docstring (the layer table), not a layer
        out[module] = frozenset(deps)
    return out, frozenset(faces)


@functools.lru_cache(maxsize=None)
def graph() -> dict[str, frozenset[str]]:
    """Module -> the package's modules it imports. An import of a package's face (an __init__ that
    only hands its modules' names on) counts as importing the modules it hands on; faces are no
    nodes of their own. An import of a submodule counts as one of the submodule."""
    direct, faces = _direct()

    def through(deps, seen=()):
        out = set()
        for d in deps:
            if d in faces and d not in seen:
                out |= through(direct[d], seen + (d,))
            elif d not in faces:
                out.add(d)
        return out

    return {m: frozenset(through(deps) - {m}) for m, deps in direct.items() if m not in faces}


@functools.lru_cache(maxsize=None)
def layers() -> list[tuple[int, str]]:
    """(layer, module prefix) rows of the table in the package's docstring: ` <n>. a, b.c, ...`,
    then two spaces or more and what the layer holds."""
    rows = []
    for line in allspark_jax.__doc__.splitlines():
        m = re.match(r"^\s+(\d+)\.\s+([a-z_.]+(?:,\s*[a-z_.]+)*)(?:\s{2,}.*)?$", line)
        if m:
            rows += [(int(m.group(1)), p.strip()) for p in m.group(2).split(",")]
    return rows


def layer_of(module: str) -> int:
    """The layer of the table's longest prefix of `module` (`allspark_jax.` left out)."""
    name = module.removeprefix("allspark_jax").lstrip(".")
    best = None
    for layer, prefix in layers():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[1]):
                best = (layer, prefix)
    if best is None:
        raise AssertionError(f"{module} has no row in allspark_jax/__init__.py's layer table")
    return best[0]


def test_the_layer_table_is_read():
    assert len(layers()) >= 10
    assert layer_of("allspark_jax.errors") == min(layer for layer, _ in layers())


def test_every_module_has_a_layer():
    for module in modules():
        if module != "allspark_jax":
            layer_of(module)


def upward_imports(g) -> list[str]:
    return [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in g.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]


def test_every_import_points_down_or_sideways():
    upward = upward_imports(graph())
    assert not upward, "imports that run up:\n" + "\n".join(upward)


def _circle(g) -> list[str] | None:
    """One import circle of graph `g`, as the list of modules around it, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle():
    circle = _circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def longest_chain() -> list[str]:
    @functools.lru_cache(maxsize=None)
    def from_(m):
        return max(([m] + from_(d) for d in graph()[m]), key=len, default=[m])
    return max((from_(m) for m in graph()), key=len)


def test_the_longest_import_chain_is_short():
    chain = longest_chain()
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules: " + " -> ".join(chain)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_long_module(module):
    with open(modules()[module], encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f"{modules()[module]}: {lines} lines (at most {MAX_LINES})"


def test_the_checks_catch_what_they_check():
    """The graph holds lazy imports (inside functions) and sees through package faces; the checks
    fail on a circle and on an upward import."""
    assert "allspark_jax.train" in graph()["allspark_jax.commands.main"]  # a lazy import, inside a function
    assert "allspark_jax.config" not in graph()  # a face: its importers import its modules
    assert "allspark_jax.config.validation" in graph()["allspark_jax.commands.evaluate"]
    circle = {"allspark_jax.errors": frozenset({"allspark_jax.method"}),
              "allspark_jax.method": frozenset({"allspark_jax.errors"})}
    assert _circle(circle) is not None
    assert upward_imports({"allspark_jax.errors": frozenset({"allspark_jax.train"})})
