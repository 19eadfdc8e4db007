"""Shared helpers of the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

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
