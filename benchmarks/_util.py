"""Shared helpers of the benchmarks."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MIB = 1024 * 1024


def print_table(table: Table) -> None:
    """Print ``table`` on stdout, whole even when stdout is a pipe or a log file (rich
    would squeeze it to 80 columns and cut the numbers)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    console.print(table)


def write_random_file(path: Path, size: int) -> None:
    """Write ``size`` incompressible bytes (random, 4 MiB at a time)."""
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 4 * MIB))
            f.write(chunk)
            remaining -= len(chunk)


def collect(prefix: str, attribute: str) -> list[Any]:
    """The items of the list ``attribute`` of every ``benchmarks.<prefix>*`` module, in
    module then list order (the attack suite's and the fault matrix's registries). Their
    ``name`` attributes must be unique: each is a row of a table and a test id."""
    import benchmarks

    found: list[Any] = []
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda i: i.name):
        if info.name.startswith(prefix):
            found.extend(getattr(importlib.import_module(f"benchmarks.{info.name}"), attribute))
    names = [item.name for item in found]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RuntimeError(f"names in benchmarks.{prefix}* must be unique: {sorted(duplicates)}")
    return found


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
    """Rewrite what stands between the markers ``begin`` and ``end`` in ``path``."""
    head, _, rest = path.read_text().partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
