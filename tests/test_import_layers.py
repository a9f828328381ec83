"""Imports flow one way between the top-level folders: jobs -> actors -> pipeline -> schemas.

- schemas/  the contracts (manifest, result rows, work rows, tasks, config): imports nothing of ours above;
- pipeline/ the CPU side (read, fetch, decode media, segment, prompt, assemble, write) and the Stage
  declaration every stage uses;
- actors/   the GPU side: the engine and the GPU stages, built on the CPU side's loaders;
- jobs/     entry points, the graph that joins both sides, the run record and the report.

Every import of a project module counts, also one inside a function. Run this file to print the
picture of the imports between folders:  python tests/test_import_layers.py
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["schemas", "pipeline", "actors", "jobs"]  # bottom to top: a folder imports only those before it


def project_imports() -> dict[str, set[str]]:
    """{module path: project modules it imports}, for every module of the four folders."""
    return {str(path.relative_to(REPO)): {n for n in all_imports(path, names=True) if n.split(".")[0] in LAYERS}
            for folder in LAYERS for path in sorted((REPO / folder).rglob("*.py"))}


def folder_edges() -> dict[tuple[str, str], list[str]]:
    """{(from folder, to folder): ["module -> imported", ...]} for imports that cross folders."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, imported in project_imports().items():
        src = module.split("/")[0]
        for name in sorted(imported):
            dst = name.split(".")[0]
            if dst != src:
                edges[(src, dst)].append(f"{module} -> {name}")
    return dict(edges)


def upward(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    return [line for (src, dst), lines in edges.items() if LAYERS.index(dst) > LAYERS.index(src) for line in lines]


def test_imports_only_flow_down():
    bad = upward(folder_edges())
    assert not bad, "imports that run back up (" + " -> ".join(reversed(LAYERS)) + "):\n" + "\n".join(bad)


def test_no_two_folders_import_each_other():
    edges = folder_edges()
    both = sorted({tuple(sorted(pair)) for pair in edges if pair[::-1] in edges})
    assert not both, f"folders importing each other: {both}"


# pipeline/'s sub-packages, each with one rule: the project packages it may import (besides schemas/ and
# itself), and the outside packages it must not
PIPELINE_RULES = {
    "pipeline/core": ({"pipeline.core"}, {"transformers"}),
    "pipeline/io": ({"pipeline.core", "pipeline.io"}, {"ray", "torch", "transformers"}),
    "pipeline/media": ({"pipeline.core", "pipeline.media"}, {"ray", "transformers"}),
    "pipeline/model": ({"pipeline.core", "pipeline.io", "pipeline.media", "pipeline.model"}, {"ray"}),
    "pipeline/stages": ({"pipeline"}, set()),
}
PIPELINE_TOP_MODULES = 8  # modules at pipeline/'s top (besides __init__.py): the rest live in sub-packages


def module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def all_imports(path: Path, names: bool = False) -> set[str]:
    """Every module `path` imports (project or not), also inside functions; with `names`, also each
    `module.name` a `from module import name` takes (a name may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if names:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def rule_breaks() -> list[str]:
    bad = []
    for folder, (allowed, forbidden) in PIPELINE_RULES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in sorted(all_imports(path)):
                ours = name.split(".")[0] in LAYERS
                if ours and name.startswith("pipeline") and not any(name == a or name.startswith(a + ".")
                                                                     for a in allowed):
                    bad.append(f"{path.relative_to(REPO)} -> {name} (may import {sorted(allowed)})")
                if not ours and any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(REPO)} -> {name} (must not import {sorted(forbidden)})")
    return bad


def module_cycles(imports: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Cycles in the graph of module imports (every import counts, also inside functions): the strongly
    connected components of more than one module."""
    if imports is None:
        found = project_imports()
        modules = {module_name(m) for m in found}
        imports = {module_name(m): {n for n in names if n in modules and n != module_name(m)}
                   for m, names in found.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in imports.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(imports):
        if v not in index:
            visit(v)
    return cycles


def test_pipeline_sub_packages_keep_their_rules():
    bad = rule_breaks()
    assert not bad, "imports against pipeline/'s sub-package rules:\n" + "\n".join(bad)


def test_pipeline_keeps_few_modules_at_its_top():
    top = [p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= PIPELINE_TOP_MODULES, top


def test_no_import_cycle_between_modules():
    cycles = module_cycles()
    assert not cycles, "modules importing each other (directly or round a loop): " + str(cycles)


def test_the_cycle_check_sees_a_cycle():
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_check_sees_an_upward_import():
    """The check itself can fail: an import from schemas/ of pipeline/ is flagged."""
    edges = {("schemas", "pipeline"): ["schemas/config.py -> pipeline.model.prompts"]}
    assert upward(edges) == ["schemas/config.py -> pipeline.model.prompts"]


if __name__ == "__main__":
    edges = folder_edges()
    for src in reversed(LAYERS):
        for dst in reversed(LAYERS):
            if (src, dst) in edges:
                print(f"{src:9s} -> {dst:9s} {len(edges[(src, dst)]):3d} imports")
    bad = upward(edges)
    print("\n".join(["upward:"] + bad) if bad else "no import runs upward")
    sys.exit(1 if bad else 0)
