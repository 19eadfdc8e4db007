"""Start-up imports: each process imports what it runs, and the public names still resolve.

The package facades (``p2pimage``, ``p2pimage.tracker``) resolve most names on first use
(PEP 562 ``__getattr__``) and ``p2pimage``'s command line imports a subcommand's module
when it runs (docs/benchmarks.md, "Where the cluster demo's CPU goes")."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import p2pimage
import p2pimage.tracker

ROOT = Path(__file__).resolve().parent.parent


def _type_checking_imports(package: ModuleType) -> dict[str, str]:
    """name → absolute module of the imports under ``if TYPE_CHECKING:`` in its source."""
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module is not None
                module = importlib.util.resolve_name(
                    "." * stmt.level + stmt.module, package.__name__
                )
                found.update({alias.name: module for alias in stmt.names})
    return found


@pytest.mark.parametrize("package", [p2pimage, p2pimage.tracker], ids=lambda p: p.__name__)
def test_every_public_name_resolves_to_its_module(package: ModuleType) -> None:
    lazy: dict[str, str] = package._LAZY
    # The names type checkers see are the names resolved at run time, from the same place.
    assert _type_checking_imports(package) == lazy
    assert set(lazy) <= set(package.__all__)
    for name in package.__all__:
        value = getattr(package, name)
        if name in lazy:
            assert value is getattr(importlib.import_module(lazy[name]), name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = package.no_such_name


def _imported_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has imported after ``statement`` (not the entries
    that block an import)."""
    code = (
        f"{statement}\nimport json, sys\n"
        "print(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_each_daemon_imports_only_what_it_runs() -> None:
    node = _imported_by("import daemons.node")
    assert "p2pimage.swarm.engine" in node  # the sanity check: it imports its own parts
    assert {"p2pimage.tracker._policy", "p2pimage.tracker._state", "daemons.tracker"}.isdisjoint(
        node
    )
    tracker = _imported_by("import daemons.tracker")
    assert "p2pimage.tracker._policy" in tracker
    assert {"p2pimage.swarm.engine", "p2pimage.storage.pieces", "daemons.node"}.isdisjoint(tracker)
    sidecar = _imported_by("import daemons.sidecar")
    assert {"p2pimage.swarm.engine", "p2pimage.tracker._policy"}.isdisjoint(sidecar)
    for modules in (node, tracker, sidecar):
        # httpx's own command-line client (rich, pygments) is not ours to run
        assert "httpx" in modules
        assert {"httpx._main", "rich", "pygments"}.isdisjoint(modules)


def test_command_line_imports_a_subcommand_when_it_runs() -> None:
    cli = _imported_by("import daemons.cli")
    assert {"daemons.node", "daemons.tracker", "daemons.sidecar", "daemons.cli.cluster"}.isdisjoint(
        cli
    )
    node = _imported_by(
        "from daemons.cli import main\n"
        "try:\n    main(['node', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0"
    )
    assert "daemons.node" in node
    assert {"daemons.cli.cluster", "daemons.tracker", "rich"}.isdisjoint(node)


def test_command_line_help_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemons.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    commands = out.split("Commands:", 1)[1].split()
    for name in ("cluster", "fetch", "keys", "node", "preheat", "sidecar", "status", "token"):
        assert name in commands
    assert {"containerd", "torrent", "tracker"} <= set(commands)
