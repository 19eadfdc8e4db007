"""The fault matrix: every scenario of benchmarks/_faults_*.py ends with every surviving
node holding the image with the right digests, every client pull served with the right
bytes, and no verified byte fetched twice.

The same functions are tabulated by ``python -m benchmarks.reliability`` into
docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._fault import Fault, FaultBed
from benchmarks.reliability import all_faults

FAULTS = all_faults()


def test_the_matrix_has_every_kind_of_fault() -> None:
    assert len(FAULTS) >= 16


@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, marks=[pytest.mark.slow] if f.slow else []) for f in FAULTS],
    ids=[f.name for f in FAULTS],
)
async def test_cluster_survives(fault: Fault, tmp_path: Path) -> None:
    result = await fault.run(FaultBed(tmp_path))
    assert result.pulls > 0, result.detail
    assert result.pulls_failed == 0, result.detail
    assert result.wrong_bytes_served == 0, result.detail
    assert result.bytes_lost == 0, result.detail
    assert result.nodes_holding == result.nodes_surviving, result.detail
    assert result.passed
