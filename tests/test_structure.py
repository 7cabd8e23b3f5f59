"""The package's layers, read from its imports (lazy ones included): who may reach whom.

- Loading a model (`veclip_jax.load`, api.py), HF interop (hf/) and evaluation (eval/) never reach
  the trainer (train/); loading and HF interop never reach evaluation either.
- Towers (models/) know nothing of objectives; the input pipeline (data/) neither: it learns the
  batch keys from its caller and the batch schema (veclip_jax/batch.py).
- The schema and the config defaults import no jax (the data workers and the CLI's early config
  check rely on it).
- No library module imports the top-level configs/ package, and no module is over ~500 lines
  without saying why in its docstring.
"""

from __future__ import annotations

import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "veclip_jax")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


@functools.cache
def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out[_module_name(path)] = path
    return out


def _targets(module: str, node: ast.AST) -> list[str]:
    """The modules of ours an import statement of `module` names (the longest prefix that is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            base = module.split(".")
            base = base if _modules()[module].endswith("__init__.py") else base[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from P import a`: the module P.a, else a name of P (P's own imports then count)
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in _modules() else prefix for a in node.names]
    else:
        return []
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in _modules():
                out.append(".".join(parts[:i]))
                break
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@functools.cache
def _top_level_imports(module: str) -> frozenset[str]:
    """What importing `module` runs: its module-level imports (not those in functions or TYPE_CHECKING)."""
    tree = ast.parse(open(_modules()[module]).read())
    found = {t for node in tree.body if not _is_type_checking(node) for t in _targets(module, node)}
    return frozenset(found) - {module}


def _parents(modules: set[str]) -> set[str]:
    """The packages above `modules`: importing a.b.c runs a/__init__ and a/b/__init__ first."""
    out = set()
    for name in modules:
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in _modules():
                out.add(parent)
    return out


@functools.cache
def _imports(module: str) -> frozenset[str]:
    """The modules of ours that `module` imports anywhere in its body, lazy imports included."""
    tree = ast.parse(open(_modules()[module]).read())
    skip = {id(n) for node in ast.walk(tree) if _is_type_checking(node) for n in ast.walk(node)}
    found = {t for node in ast.walk(tree) if id(node) not in skip for t in _targets(module, node)}
    found |= {m for p in _parents(found | {module}) for m in _top_level_imports(p)}
    found.discard(module)
    return frozenset(found)


def _reach(start: str) -> dict[str, list[str]]:
    """Every module of ours `start` reaches, with one import chain to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in _imports(m):
            if n not in chains:
                chains[n] = chains[m] + [n]
                todo.append(n)
    return chains


def _starting(prefix: str) -> list[str]:
    return sorted(m for m in _modules() if m == prefix or m.startswith(prefix + "."))


def _violations(starts: list[str], forbidden: str) -> list[str]:
    bad = []
    for s in starts:
        for target, chain in _reach(s).items():
            if target == forbidden or target.startswith(forbidden + "."):
                bad.append(" -> ".join(chain))
                break
    return bad


_LOADING = ["veclip_jax.api", *_starting("veclip_jax.hf"), *_starting("veclip_jax.run")]
LAYERS = [
    ([*_LOADING, *_starting("veclip_jax.eval")], "veclip_jax.train"),
    (_LOADING, "veclip_jax.eval"),
    (_starting("veclip_jax.models"), "veclip_jax.objectives"),
    (_starting("veclip_jax.data"), "veclip_jax.objectives"),
    (_starting("veclip_jax.data"), "veclip_jax.models"),
]  # fmt: skip


@pytest.mark.parametrize("starts, forbidden", LAYERS, ids=lambda x: x if isinstance(x, str) else None)
def test_a_layer_never_reaches_the_ones_above_it(starts, forbidden):
    assert starts, "no module to check: the layout changed without this test"
    assert _violations(starts, forbidden) == []


def test_the_checker_sees_lazy_imports_and_chains():
    # Breaking the rules on purpose, in data: the chain is reported through a lazy import.
    assert "veclip_jax.objectives" in _reach("veclip_jax.train.loop")
    assert _violations(["veclip_jax.train.loop"], "veclip_jax.eval")  # the loop evaluates


def test_the_schema_and_the_defaults_import_no_jax():
    for module in ("veclip_jax.batch", "veclip_jax.defaults"):
        for m in _reach(module):
            nodes = list(ast.walk(ast.parse(open(_modules()[m]).read())))
            roots = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
            roots |= {(n.module or "").split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom)}
            assert not roots & {"jax", "flax", "optax"}, (module, m)


def test_no_library_module_imports_the_configs_package():
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "configs" for a in node.names), m
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] != "configs", m


def test_long_modules_say_why_in_their_docstring():
    for m, path in _modules().items():
        lines = open(path).read().count("\n")
        if lines > 520:
            doc = ast.get_docstring(ast.parse(open(path).read())) or ""
            assert "lines" in doc.lower(), f"{m}: {lines} lines and no reason in its docstring"
