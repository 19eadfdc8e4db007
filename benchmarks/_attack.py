"""What one attack on p2pimage reports, shared by ``benchmarks.attacks`` and the tests.

An attack is an async function taking an :class:`AttackBed` (a scratch directory) and
returning an :class:`AttackResult`. It sets up what it needs itself (real daemons on
loopback, in-memory protocol objects), plays the attacker, and counts what leaked:
layer bytes the attacker received, peer addresses it learnt, tokens it read. ``refused``
is true only when the system refused the attack *and* nothing leaked.

Each family of attacks lives in its own module (``benchmarks._attacks_*``) with a list
``ATTACKS``; ``tests/test_attacks.py`` runs every one of them as a test and
``python -m benchmarks.attacks`` tabulates them into docs/security.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AttackBed:
    """Where an attack may put its files (a fresh directory per attack)."""

    tmp: Path


@dataclass(frozen=True)
class AttackResult:
    refused: bool
    """The system said no (an error, a 4xx, a closed connection) where it should have."""
    bytes_disclosed: int = 0
    """Layer bytes (or torrent metadata bytes of a private blob) the attacker obtained."""
    tokens_disclosed: int = 0
    """Node tokens the attacker read."""
    peers_disclosed: int = 0
    """Peer addresses the attacker learnt."""
    detail: str = ""
    """One line: what the system answered."""

    @property
    def held(self) -> bool:
        return (
            self.refused
            and self.bytes_disclosed == 0
            and self.tokens_disclosed == 0
            and self.peers_disclosed == 0
        )


@dataclass(frozen=True)
class Attack:
    name: str
    """Short, unique, stable: the row of the table in docs/security.md."""
    hole: str
    """What an attacker would win if this were not refused."""
    run: Callable[[AttackBed], Awaitable[AttackResult]]
    quick: bool = True
    """Part of ``--quick`` (a few seconds at most)."""
