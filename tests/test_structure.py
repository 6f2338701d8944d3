"""The package's shape, checked from its source: import layering (no cycles, nothing imports upwards), no use of
another module's private names, no configs or benchmarks imported by the library, PyTorch only in the
converter, and the schedule's defaults stated once. Nothing is imported or run."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "dreamvideo_jax")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every import statement, at any depth (lazy imports count)."""
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _internal_deps(module: str) -> set[str]:
    deps = set()
    for mod, names in _imports(MODULES[module]):
        for name in names:  # `from dreamvideo_jax.x import y` where y is a module
            if f"{mod}.{name}" in MODULES:
                deps.add(f"{mod}.{name}")
        if mod in MODULES:
            deps.add(mod)
    deps.discard(module)
    return {d for d in deps if not module.startswith(d + ".") and d != "dreamvideo_jax"}


def test_no_import_cycles():
    graph = {m: _internal_deps(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_downwards_only():
    lower = ("dreamvideo_jax.sampling", "dreamvideo_jax.convert", "dreamvideo_jax.evaluation",
             "dreamvideo_jax.checkpoints", "dreamvideo_jax.models", "dreamvideo_jax.diffusion",
             "dreamvideo_jax.data", "dreamvideo_jax.parallel", "dreamvideo_jax.system")
    bad = []
    for m, path in MODULES.items():
        for mod, _ in _imports(path):
            if mod.split(".")[0] in ("configs", "benchmarks", "tests"):
                bad.append(f"{m} imports {mod}")
            if m.startswith(lower) and mod.startswith("dreamvideo_jax.training"):
                bad.append(f"{m} imports {mod}")
            if mod.split(".")[0] in ("torch", "diffusers") and not m.startswith("dreamvideo_jax.convert"):
                bad.append(f"{m} imports {mod}")
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for m, path in MODULES.items():
        src = open(path).read()
        for mod, names in _imports(path):
            if mod.startswith("dreamvideo_jax"):
                bad += [f"{m}: from {mod} import {n}" for n in names if n.startswith("_")]
        aliases = {a.asname or a.name.split(".")[-1]
                   for node in ast.walk(ast.parse(src)) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for a in node.names if (getattr(node, "module", "") or a.name).startswith("dreamvideo_jax")}
        for alias in aliases:
            bad += [f"{m}: {alias}.{x}" for x in re.findall(rf"\b{re.escape(alias)}\._([a-z]\w*)", src)]
    assert not bad, bad


def test_schedule_defaults_are_stated_in_one_library_module():
    holders = sorted(m for m, path in MODULES.items() if re.search(r"0\.00085|\b0\.012\b", open(path).read()))
    assert holders == ["dreamvideo_jax.diffusion.schedules"], holders
