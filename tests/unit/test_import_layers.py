"""The package's layers: every import points down, and no modules import each other in a ring.

Read from the source (ast), so a lazy import inside a function counts as much as one at the
top: it is still a dependency of the module that makes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "aiockpt"

# Lowest first. A module may import its own layer and any layer below it, never above.
LAYERS: list[tuple[str, ...]] = [
    (
        "aiockpt._version",
        "aiockpt.errors",
        "aiockpt._util",
        "aiockpt.metrics",
        "aiockpt.config",
        "aiockpt.stateful",
    ),
    ("aiockpt._format",),
    ("aiockpt.storage",),
    ("aiockpt.distributed",),
    ("aiockpt._engine",),
    ("aiockpt.checkpointer", "aiockpt.paths"),
    ("aiockpt.training",),
    ("aiockpt.tools",),
    ("aiockpt.cli",),
    # Framework integrations: on top, importing anything public; nothing imports them.
    ("aiockpt.integrations",),
]
# The facade re-exports the public names of every layer; nothing imports it from inside.
FACADES = {"aiockpt", "aiockpt.__main__"}
# Integrations are written against the public API, as a user's code is: the facade is
# what they may import (nothing in the package imports them, so no ring can form).
PUBLIC_API_USERS = ("aiockpt.integrations",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(path: Path) -> set[str]:
    """Full names of the aiockpt modules (or packages) that ``path`` imports."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "aiockpt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join([*anchor, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "aiockpt":
                target = node.module
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` imports the module x
                candidate = f"{target}.{alias.name}"
                if _exists(candidate):
                    found.add(candidate)
    found.discard(name)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    root = PACKAGE_ROOT / relative
    return root.with_suffix(".py").exists() or (root / "__init__.py").exists()


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


MODULES = {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    homeless = [m for m in MODULES if m not in FACADES and layer_of(m) is None]
    assert not homeless, f"modules outside every layer (add them to LAYERS): {homeless}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - FACADES))
def test_imports_point_down(module: str) -> None:
    own = layer_of(module)
    assert own is not None
    upward = []
    for target in sorted(package_imports(MODULES[module])):
        if target in FACADES and not module.startswith(PUBLIC_API_USERS):
            upward.append(f"{target} (the facade)")
            continue
        theirs = layer_of(target)
        if theirs is not None and theirs > own:
            upward.append(f"{target} (layer {LAYERS[theirs][0]})")
    assert not upward, f"{module} (layer {LAYERS[own][0]}) imports upward: {upward}"


def test_no_import_cycles() -> None:
    graph = {
        m: {t for t in package_imports(p) if t in MODULES and t not in FACADES}
        for m, p in MODULES.items()
        if m not in FACADES
    }
    # A package's __init__ importing its own modules is how it exports them, not a ring.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                ring = visit(nxt)
                if ring:
                    return ring
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            ring = visit(start)
            assert ring is None, "import cycle: " + " -> ".join(ring)
