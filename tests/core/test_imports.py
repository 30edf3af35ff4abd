"""Import hygiene of our packages: no import cycle among all imports (module-level, lazy in a function, under
``TYPE_CHECKING``), the layering rules of docs/ARCHITECTURE.md "Layers", no private name imported from another
module, and ``import wimfris_jax`` (the inference entry point) never loads torch. The graph is read from the source
with ``ast``, so a cycle is found even where import order or laziness hides it at run time."""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest
from helpers import ROOT
from limits import limit

PACKAGES = ("wimfris_jax", "data_pipeline", "port_weights", "configs")


def find_modules(root: str = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{dotted module name: file path} of every module of ``packages`` (a package by its ``__init__.py``)."""
    found = {}
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                if f.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, f), root)[:-3].split(os.sep)
                    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, f)
    return found


def _module_level(body: list[ast.stmt]):
    """Import statements run when the module is imported: not in functions nor under ``if TYPE_CHECKING:``."""
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.ClassDef):
            yield from _module_level(stmt.body)
        elif isinstance(stmt, ast.If):
            test = stmt.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name != "TYPE_CHECKING":
                yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _module_level(block)
        elif isinstance(stmt, (ast.With, ast.For, ast.While)):
            yield from _module_level(stmt.body)
            yield from _module_level(getattr(stmt, "orelse", []))


def _targets(node: ast.stmt, module: str, is_package: bool, known: dict[str, str]) -> list[tuple[str, str | None]]:
    """``(module imported, name taken from it or None)`` of one import statement, for modules in ``known``."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name in known]
    base = module
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in known:  # `from package import submodule`
            out.append((f"{base}.{alias.name}", None))
        elif base in known:
            out.append((base, alias.name))
    return out


def _every_import(tree: ast.Module):
    """Every import statement of a file: module-level, in functions (lazy) and under ``if TYPE_CHECKING:``."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph(known: dict[str, str], lazy: bool = True) -> dict[str, set[str]]:
    """{module: modules of ``known`` it imports}: every import statement, or (``lazy=False``) the module-level
    ones only, those that run when the module is imported."""
    graph = {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        nodes = _every_import(tree) if lazy else _module_level(tree.body)
        targets = {t for node in nodes for t, _ in _targets(node, module, is_package, known)}
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first: the parent packages are imported too
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        graph[module] = {t for t in targets | (parents & set(known)) if t != module and not module.startswith(t + ".")}
    return graph


# Layering (docs/ARCHITECTURE.md "Layers"): (importer prefix, forbidden import prefixes, why). Prefixes match a
# module and its submodules ("wimfris_jax.train" is the package and everything in it).
COMMANDS = (
    "wimfris_jax.cli", "wimfris_jax.demo", "wimfris_jax.evaluate", "wimfris_jax.predict", "wimfris_jax.load",
    "wimfris_jax.pretrained", "wimfris_jax.serve",
)  # fmt: skip
MODEL = (
    "wimfris_jax.model", "wimfris_jax.families", "wimfris_jax.backbones", "wimfris_jax.ssm",
    "wimfris_jax.layers", "wimfris_jax.attention", "wimfris_jax.losses", "wimfris_jax.normalization",
)  # fmt: skip
LAYERS = [
    *((m, ("data_pipeline",), "the model never imports the data pipeline") for m in MODEL),
    *((m, COMMANDS + ("wimfris_jax.train",), "the model never imports training or the commands") for m in MODEL),
    ("wimfris_jax.train", COMMANDS, "training never imports the commands"),
    ("wimfris_jax.checkpoints", COMMANDS + ("wimfris_jax.train",), "checkpoint reading sits below training"),
    ("port_weights", COMMANDS + ("wimfris_jax.train",), "converters never import training or the commands"),
    ("data_pipeline", ("wimfris_jax",), "the data pipeline imports only the core (errors, io, normalization)"),
    ("wimfris_jax.weights", (*MODEL, *COMMANDS, "wimfris_jax.train", "wimfris_jax.checkpoints", "port_weights",
                             "data_pipeline"), "sources by name are core: data reads vocabularies with them"),
]
DATA_MAY_IMPORT = (
    "wimfris_jax", "wimfris_jax.errors", "wimfris_jax.io", "wimfris_jax.normalization",  # the __init__ is lazy
    "wimfris_jax.weights", "wimfris_jax.weights.sources", "wimfris_jax.weights.download",  # named vocabularies
)  # fmt: skip


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported (rule)`` for every import that breaks :data:`LAYERS`."""
    found = []
    for importer, targets in sorted(graph.items()):
        for prefix, forbidden, why in LAYERS:
            if not _under(importer, (prefix,)):
                continue
            for t in sorted(targets):
                if _under(t, forbidden) and not (prefix == "data_pipeline" and t in DATA_MAY_IMPORT):
                    found.append(f"{importer} -> {t} ({why})")
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(_path_within(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path from the first module of ``component`` (strongly connected) back to it."""
    start = min(component)
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def private_imports(known: dict[str, str], root: str = ROOT) -> list[str]:
    """``file:line: from X import _name`` for every import (anywhere in a file) of a private name of our modules."""
    found = []
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _targets(node, module, is_package, known):
                dotted = target if name is None else f"{target}.{name}"
                private = [p for p in dotted.split(".") if p.startswith("_") and not p.endswith("__")]
                if private:
                    found.append(f"{os.path.relpath(path, root)}:{node.lineno}: imports {dotted}")
    return found


def test_the_graph_reader_sees_cycles_and_private_names(tmp_path):
    """The checks below can fail: a two-module cycle (one import relative, one in a class body) is found, a lazy
    import (in a function) is an edge of the full graph only, and a private name imported from a sibling module is
    reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import helper\n")
    (pkg / "b.py").write_text("class C:\n    from . import a\n\ndef helper():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from pkg.a import _hidden\n")
    known = find_modules(str(tmp_path), ("pkg",))
    assert set(known) == {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = import_graph(known, lazy=False)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert import_graph(known)["pkg.b"] == {"pkg.a", "pkg.c"}  # the lazy import counts in the full graph
    assert private_imports(known, str(tmp_path)) == [f"{os.path.join('pkg', 'c.py')}:1: imports pkg.a._hidden"]


def test_no_import_cycle_among_our_modules():
    known = find_modules()
    assert {"wimfris_jax", "wimfris_jax.cli", "data_pipeline.tokenizer", "port_weights.detris"} <= set(known)
    graph = import_graph(known)
    assert graph["wimfris_jax.cli"] >= {"wimfris_jax.config", "data_pipeline.sources"}
    assert "data_pipeline.wordpiece" in graph["data_pipeline.tokenizers"]  # lazy imports are edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (all imports, lazy ones too):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers():
    """The layering rules hold, and the check sees a breach (a model module importing the data pipeline)."""
    graph = import_graph(find_modules())
    assert layer_violations({"wimfris_jax.families.vipa.model": {"data_pipeline.tokenizers"}}) == [
        "wimfris_jax.families.vipa.model -> data_pipeline.tokenizers (the model never imports the data pipeline)"
    ]
    found = layer_violations(graph)
    assert not found, "layering broken:\n" + "\n".join(found)


def test_no_private_name_imported_across_modules():
    found = private_imports(find_modules())
    assert not found, "private names imported from another module:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "statement",
    ["import wimfris_jax", "import wimfris_jax.model, wimfris_jax.evaluate, wimfris_jax.predict, wimfris_jax.cli"],
)
def test_wimfris_jax_does_not_import_torch(statement):
    program = f"import sys\n{statement}\nloaded = sorted(m for m in ('torch', 'tensorflow') if m in sys.modules)\n"
    program += "assert not loaded, loaded\n"
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=limit(300))
    assert run.returncode == 0, run.stderr[-3000:]


TOKENIZER_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # as where torch is not installed
from data_pipeline.tokenizer import tokenize
assert tokenize("the dog", 5).tolist() == [[49406, 518, 1929, 49407, 0]]
from transformers.utils import import_utils, logging
assert not import_utils.is_torch_available()  # transformers did see no torch
logging.get_logger("transformers").warning("later warnings are still shown")
"""


@pytest.mark.skipif(importlib.util.find_spec("clip") is None, reason="no CLIP vocabulary (clip-anytorch)")
def test_tokenizer_without_torch_prints_no_transformers_notice():
    """transformers logs "PyTorch was not found. Models won't be available ..." when imported without torch; we
    use its tokenizer only, so the tokenizer drops that one message, and nothing else."""
    run = subprocess.run(
        [sys.executable, "-c", TOKENIZER_WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=limit(300)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PyTorch was not found" not in run.stderr
    assert "later warnings are still shown" in run.stderr
