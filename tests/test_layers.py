"""The code's layers, as docs/architecture.md draws them, hold: no module imports upward.

Every module of ``p2pimage`` and ``daemons`` belongs to exactly one layer (the longest
matching prefix in :data:`LAYERS`); an import of a module in a higher layer fails this
test, and so does a module that no layer names (place it before you add it).
Imports under ``if TYPE_CHECKING:`` count too: a type that points upward is a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS: list[tuple[str, list[str]]] = [
    ("errors", ["p2pimage.errors", "p2pimage._lazy"]),
    (
        "codecs and identity",
        ["p2pimage.metainfo", "p2pimage.wire", "p2pimage.tracker._protocol", "p2pimage.auth"],
    ),
    (
        "policies",
        [
            "p2pimage.settings",
            "p2pimage.bound",
            "p2pimage.swarm.picker",
            "p2pimage.swarm.choker",
            "p2pimage.swarm.ratelimit",
            "p2pimage.swarm.admission",
            "p2pimage.swarm.policy",
            "p2pimage.tracker._policy",
            "p2pimage.tracker._state",
            "p2pimage.tracker",
        ],
    ),
    ("storage and registry client", ["p2pimage.storage", "p2pimage.oci"]),
    (
        "engine",
        [
            "p2pimage.swarm",
            "p2pimage.tracker.client",
            "p2pimage.sidecar",
        ],
    ),
    ("serving the runtime", ["p2pimage.mirror"]),
    ("library facade", ["p2pimage"]),
    ("daemons", ["daemons"]),
    ("tools", ["daemons.cli", "daemons.testbed"]),
]


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    if best is None:
        raise LookupError(module)
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(name: str, is_package: bool, text: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of p2pimage or daemons in *text*."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" names a submodule x when x is one
                if node.module is None:
                    found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
                    continue
            else:
                target = node.module or ""
            found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in ("p2pimage", "daemons")]


def sources() -> list[Path]:
    return sorted([*ROOT.glob("p2pimage/**/*.py"), *ROOT.glob("daemons/**/*.py")])


def upward_imports(path: Path, text: str | None = None) -> list[str]:
    """The imports in *path* (or in *text*, read as if it were *path*) that point upward."""
    importer = module_name(path)
    own = layer_of(importer)
    text = path.read_text() if text is None else text
    problems = []
    for line, target in imports_of(importer, path.name == "__init__.py", text):
        try:
            theirs = layer_of(target)
        except LookupError:
            problems.append(f"{path.relative_to(ROOT)}:{line}: {target} is in no layer")
            continue
        if theirs > own:
            problems.append(
                f"{path.relative_to(ROOT)}:{line}: {importer} ({LAYERS[own][0]}) imports "
                f"{target} ({LAYERS[theirs][0]})"
            )
    return problems


def test_every_module_has_a_layer() -> None:
    missing = []
    for path in sources():
        try:
            layer_of(module_name(path))
        except LookupError:
            missing.append(module_name(path))
    assert missing == []


def test_no_module_imports_a_higher_layer() -> None:
    assert [p for path in sources() for p in upward_imports(path)] == []


@pytest.mark.parametrize(
    ("module", "line", "layer"),
    [
        ("p2pimage/wire/_codec.py", "from p2pimage.swarm.engine import Swarm", "engine"),
        (
            "p2pimage/swarm/picker.py",
            "from p2pimage.storage.pieces import PieceStorage",
            "storage and",
        ),
        ("p2pimage/storage/pieces.py", "from p2pimage.swarm.engine import Swarm", "engine"),
        ("p2pimage/swarm/engine.py", "from daemons.node import NodeSettings", "daemons"),
        ("daemons/node.py", "from daemons.testbed.registry import RegistryProcess", "tools"),
    ],
)
def test_an_upward_import_is_caught(module: str, line: str, layer: str) -> None:
    # The same checker, over one module's text with one upward import added.
    path = ROOT / module
    text = path.read_text()
    assert upward_imports(path, text) == []
    problems = upward_imports(path, text + "\n" + line + "\n")
    assert len(problems) == 1 and f"({layer}" in problems[0], problems
