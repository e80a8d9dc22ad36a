"""The package's layout rules: every module imports, no import cycle among lit_llm's modules, no command module
imports another command, and every ``lit-llm`` command runs the same ``main`` as ``python -m lit_llm.<command>``."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lit_llm
from lit_llm.__main__ import COMMANDS

PACKAGE = Path(lit_llm.__file__).resolve().parent
#: The command modules: every ``lit-llm`` command's module.
COMMAND_MODULES = set(COMMANDS.values())


def _modules() -> dict[str, Path]:
    found = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="lit_llm."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[info.name] = Path(spec.origin)
    return found


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The lit_llm modules that ``name`` imports (``from lit_llm.x import y`` counts ``lit_llm.x.y`` when that is a
    module, else ``lit_llm.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    modules = _modules_cache()
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lit_llm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_llm") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules and m != name}


_CACHE: dict[str, Path] = {}


def _modules_cache() -> dict[str, Path]:
    if not _CACHE:
        _CACHE.update(_modules())
    return _CACHE


def test_every_module_imports() -> None:
    for name in _modules_cache():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_no_import_cycle_among_modules() -> None:
    """Module-level imports form no cycle (a package's ``__init__`` importing its own submodules is not one: the
    submodule's import of a sibling goes through the package, which is what this graph follows)."""
    graph = {name: _imports(name, path, top_level_only=True) for name, path in _modules_cache().items()}
    # A submodule importing its parent package's __init__ is only a cycle when that __init__ imports it back.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_command_imports_another_command() -> None:
    modules = _modules_cache()
    for command in sorted(COMMAND_MODULES):
        others = _imports(command, modules[command], top_level_only=False) & (COMMAND_MODULES - {command})
        assert not others, f"{command} imports the command module(s) {sorted(others)}; move what they share"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_console_command_runs_its_modules_main(command: str) -> None:
    module = importlib.import_module(COMMANDS[command])
    assert callable(getattr(module, "main", None)), f"{COMMANDS[command]} has no main()"


def test_no_test_module_imports_another() -> None:
    """Shared fixtures live in a ``conftest.py`` and shared helpers in a helper module (``support.py``,
    ``faults.py``, ...): a test module never imports another test module."""
    tests = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(tests)} imports {n}" for n in names
                          if n.split(".")[-1].startswith("test_")]
    assert not offenders, "; ".join(offenders)


def test_the_tests_mirror_the_package() -> None:
    """Each package folder of lit_llm has its test folder of the same name."""
    tests = Path(__file__).resolve().parents[1]
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        assert (tests / folder.name).is_dir(), f"lit_llm/{folder.name}/ has no tests/{folder.name}/"
