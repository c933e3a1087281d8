"""The architecture, checked: a ground that imports no capability, capabilities that use each other only through
the few library modules meant for it, and no import cycle (the rules are written out in the README's Layout)."""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import mtool

PACKAGE = Path(mtool.__file__).parent
# The capabilities; everything else under mtool/ but the CLI modules is the ground they stand on.
CAPABILITIES = ("naming", "merger", "adapters", "train", "evaluate", "demo", "moe", "export", "publish")
CLI_MODULES = ("mtool.cli", "mtool.commands_info")
# What a capability may import from another one (module prefixes); never a ``commands`` module.
MAY_IMPORT = {
    "naming": (),
    # --search evaluates each trial's merge with the evaluation library (never its command)
    "merger": ("mtool.naming.finish", "mtool.naming.card_results", "mtool.evaluate.spec", "mtool.evaluate.run",
               "mtool.evaluate.results", "mtool.evaluate.models"),
    "adapters": ("mtool.merger.methods", "mtool.naming.finish"),
    "train": ("mtool.adapters.merge", "mtool.naming.finish"),
    # evaluation reads data, renders and masks it as training does, and writes results into cards
    "evaluate": ("mtool.train.data", "mtool.train.formats", "mtool.train.batching", "mtool.train.tokenizer",
                 "mtool.train.model", "mtool.naming.card"),
    "demo": ("mtool.naming", "mtool.merger", "mtool.adapters", "mtool.train", "mtool.evaluate"),
    "moe": ("mtool.naming.finish",),
    "export": ("mtool.naming", "mtool.adapters.merge"),
    "publish": ("mtool.naming",),
}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported mtool module, at module level)`` for every import of an mtool module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    type_checking = {id(node) for block in tree.body if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "mtool" or name.startswith("mtool."):
                found.append((name, id(node) in top_level))
    return found


@functools.cache
def _modules() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _existing(name: str, modules: dict) -> str | None:
    """The module an imported name refers to (``mtool.io.reading.open_checkpoint`` -> ``mtool.io.reading``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _capability(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in CAPABILITIES else None


def test_the_ground_imports_no_capability_and_nothing_imports_the_cli() -> None:
    problems = []
    for module, imports in _modules().items():
        for name, _ in imports:
            target = _existing(name, _modules())
            if target in CLI_MODULES and module != target:
                problems.append(f"{module} imports the CLI module {target}")
            if _capability(module) is None and module not in CLI_MODULES and _capability(target or "") is not None:
                problems.append(f"the ground module {module} imports the capability module {target}")
    assert problems == []


def test_capabilities_use_each_other_only_through_their_library_modules() -> None:
    problems = []
    modules = _modules()
    for module, imports in modules.items():
        own = _capability(module)
        if own is None:
            continue
        for name, _ in imports:
            target = _existing(name, modules)
            other = _capability(target or "")
            if other is None or other == own:
                continue
            if target.endswith(".commands") or not target.startswith(MAY_IMPORT[own]):
                problems.append(f"{module} imports {target}")
    assert problems == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, imports in modules.items():
        for name, top_level in imports:
            target = _existing(name, modules)
            if top_level and target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycles.append(stack[stack.index(child):] + [child])
            elif child not in state:
                visit(child)
        stack.pop()
        state[node] = 2

    for node in sorted(modules):
        if node not in state:
            visit(node)
    assert cycles == []


def test_modules_stay_small_or_say_why() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and "longer than 400 lines because" not in text[:3000]:
            long.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
    assert long == []
