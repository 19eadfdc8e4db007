"""Shared helpers of the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 1024 * 1024


def write_random_file(path: Path, size: int) -> None:
    """Write ``size`` incompressible bytes (random, 4 MiB at a time)."""
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 4 * MIB))
            f.write(chunk)
            remaining -= len(chunk)
