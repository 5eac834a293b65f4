"""Imports inside ``ldm`` go one way: no module imports (at the top or inside a function) one that imports it back,
directly or through others."""
from __future__ import annotations

import ast
from typing import Dict, List, Set

from tests.conftest import REPO


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    """``{module: ldm modules it imports}`` from every import statement, function-local ones included."""
    files = {_module_name(p): p for p in (REPO / "ldm").rglob("*.py")}
    graph: Dict[str, Set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # `from tests..x import y` (the package imports itself relatively) is `from ldm.x import y` here
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                # `from ldm.x import y` may name the module ldm.x.y or an object of ldm.x
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                           for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_imports_inside_ldm_are_relative():
    """The package must load under another name beside a host's own ``ldm`` (ComfyUI's ``comfy/ldm``): inside it,
    no import names ``ldm`` absolutely."""
    absolute = [f"{p.relative_to(REPO)}:{node.lineno}" for p in (REPO / "ldm").rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ldm")
                or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ldm" for a in node.names))]
    assert absolute == []


def test_no_import_cycle_inside_ldm():
    graph = import_graph()
    assert "ldm.checkpoints.keys" in graph and graph["ldm.models.autoencoder"]
    assert find_cycle(graph) == []


# Checkpoint handling, bottom to top; a module may import from its own layer or below, never above.
CHECKPOINT_LAYERS = [
    ["ldm.util", "ldm.latent_spaces"],
    ["ldm.checkpoints.files"],                                    # files -> tensors
    ["ldm.checkpoints.tensors"],                                  # what the tensors are
    ["ldm.checkpoints.diffusers", "ldm.checkpoints.keys"],        # key layouts; any format into our keys, key checks
    ["ldm.checkpoints.autoencoder_weights"],                      # which weights of a file an autoencoder takes
    ["ldm.models.autoencoder", "ldm.models.diffusion.ddpm"],      # models
    ["ldm.loading"],                                              # config + checkpoint -> model
]


def test_checkpoint_code_imports_downwards_only():
    graph = import_graph()
    layer = {module: i for i, modules in enumerate(CHECKPOINT_LAYERS) for module in modules}
    assert set(layer) <= set(graph)
    upward = [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]})" for a in layer for b in graph[a]
              if b in layer and layer[b] > layer[a]]
    assert upward == []
