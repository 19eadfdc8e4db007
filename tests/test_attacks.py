"""Every attack of the suite (benchmarks/_attacks_*.py) is refused and discloses nothing.

The same functions are tabulated by ``python -m benchmarks.attacks`` into docs/security.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._attack import Attack, AttackBed
from benchmarks.attacks import all_attacks

ATTACKS = all_attacks()


def test_the_suite_is_not_empty() -> None:
    assert len(ATTACKS) > 0


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_is_refused(attack: Attack, tmp_path: Path) -> None:
    result = await attack.run(AttackBed(tmp_path))
    assert result.refused, result.detail
    assert result.bytes_disclosed == 0, result.detail
    assert result.tokens_disclosed == 0, result.detail
    assert result.peers_disclosed == 0, result.detail
