"""The floors of the code base, imports only downward.

core (``fedmq`` without ``fedmq.net``) <- net (``fedmq.net``) <- services (``edge_agent``,
``aggregator``, which never import each other) <- tools (``fedmq_ops``). Every import counts,
also one inside a function and a module named to ``importlib.import_module``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedmq", "edge_agent", "aggregator", "fedmq_ops")


def floor_of(module: str) -> tuple[int, str] | None:
    """(floor, package) of a project module; None for third-party and stdlib modules."""
    top = module.split(".")[0]
    if module == "fedmq.net" or module.startswith("fedmq.net."):
        return 1, "fedmq.net"
    if top == "fedmq":
        return 0, "fedmq"
    if top in ("edge_agent", "aggregator"):
        return 2, top
    if top == "fedmq_ops":
        return 3, top
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, relative ones resolved."""
    package = module.rsplit(".", 1)[0] if "." in module else module
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # ``from fedmq import net`` imports fedmq.net
                yield node.lineno, f"{name}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            is_name = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            if called in ("import_module", "__import__") and is_name:
                yield node.lineno, str(arg.value)


def violations(source: str, module: str) -> list[str]:
    """Imports of ``module``'s source that go up a floor or sideways between services."""
    here = floor_of(module)
    if here is None:
        return []
    out: dict[int, str] = {}  # one finding per import statement
    for line, name in imported_modules(source, module):
        there = floor_of(name)
        if there is None or line in out:
            continue
        if there[0] > here[0] or (there[0] == here[0] == 2 and there[1] != here[1]):
            out[line] = f"{module}:{line} imports {name} ({there[1]} is not below {here[1]})"
    return list(out.values())


def _sources() -> Iterator[tuple[Path, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, _module_name(path)


def test_every_project_module_is_checked() -> None:
    modules = {name for _, name in _sources()}
    assert {"fedmq.wire", "fedmq.net.mqtt", "aggregator.engine", "fedmq_ops.cli"} <= modules


def test_imports_only_go_down() -> None:
    found = [v for path, name in _sources() for v in violations(path.read_text(), name)]
    assert not found, "imports that do not go down a floor:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("fedmq.wire", "from fedmq.net.mqtt import make_client\n"),
        ("fedmq.wire", "def f():\n    import aggregator.store\n"),
        ("fedmq.models.spec", "from ..net import mqtt\n"),
        ("fedmq.net.mqtt", "from fedmq_ops.cli import main\n"),
        ("edge_agent.agent", "from aggregator.engine import Engine\n"),
        ("aggregator.cli", "import importlib\nimportlib.import_module('fedmq_ops.cli')\n"),
        ("fedmq.update.codecs", "from fedmq import net\n"),
    ],
)
def test_an_upward_import_is_caught(module: str, source: str) -> None:
    assert len(violations(source, module)) == 1


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("fedmq_ops.cli", "import importlib\nimportlib.import_module('aggregator.cli')\n"),
        ("aggregator.engine", "from fedmq.update.codecs import get_codec\n"),
        ("fedmq.net.mqtt", "from fedmq.errors import ConfigError\nimport paho.mqtt.client\n"),
        ("fedmq.update.codecs", "from . import accumulate\n"),
    ],
)
def test_a_downward_import_passes(module: str, source: str) -> None:
    assert violations(source, module) == []
