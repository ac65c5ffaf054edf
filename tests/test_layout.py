"""The package's shape, checked from the source: the engine's method modules and the model I/O
never import the tiny world, and the model I/O modules import each other without a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "em_core"
FRONT_ENDS = {"cli.py", "__main__.py"}  # the command line may run the tiny world's demo and evaluation


def _module(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` imports, at its top or inside a function, as absolute dotted names."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    source = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import tiny_world`
    return found


def _engine_modules():
    top = [p for p in ENGINE.glob("*.py") if p.name not in FRONT_ENDS]
    return top + sorted((ENGINE / "model_io").glob("*.py"))


def test_the_engine_and_the_model_io_never_import_the_tiny_world():
    modules = _engine_modules()
    assert len(modules) > 20 and any(p.name == "em_loop.py" for p in modules)
    offenders = {_module(p): sorted(m for m in imports_of(p) if m.startswith("em_core.tiny_world"))
                 for p in modules}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_check_sees_relative_and_lazy_imports():
    source = "def f():\n    from ..tiny_world.scenes import render\n    from .. import tiny_world\n"
    found = imports_of(ENGINE / "model_io" / "model.py", source)
    assert {"em_core.tiny_world.scenes", "em_core.tiny_world"} <= found
    assert "em_core.tiny_world.scenes" in imports_of(ENGINE / "masks.py", "from .tiny_world.scenes import x")


def test_the_model_io_modules_import_each_other_without_a_cycle():
    pkg = ENGINE / "model_io"
    names = {_module(p): p for p in pkg.glob("*.py") if p.name != "__init__.py"}
    graph = {m: {d for d in imports_of(p) if d in names} for m, p in names.items()}
    assert graph["em_core.model_io.model"] >= {"em_core.model_io.single_file", "em_core.model_io.bundle"}
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for d in graph[m]:
            visit(d)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_each_shared_constant_has_one_home():
    """The nodes' category and value types live in nodes/constants.py, the node type names in
    nodes/__init__.py's table, the [vN] pattern in em_core/concepts.py."""
    root = ENGINE.parent
    nodes = {p.name: p.read_text(encoding="utf-8") for p in (root / "nodes").glob("*.py")}
    for literal in ('"concept_em"', '"CONCEPT_EM_STATE"', '"CONCEPT_EM_MODEL"'):
        assert [n for n, text in nodes.items() if literal in text] == ["constants.py"], literal
    type_names = [n for n, text in nodes.items() if '"ConceptEM_' in text]
    assert type_names == ["__init__.py"]
    python = [p for p in root.glob("**/*.py") if not {"research", "tests", ".git"} & set(p.parts)]
    pattern = r"\[v(\d+)\]"
    assert [p.name for p in python if pattern in p.read_text(encoding="utf-8")] == ["concepts.py"]
