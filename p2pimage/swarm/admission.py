"""Admission of inbound peer connections before they have authenticated (a pure policy).

A connection that has not proved cluster membership costs a socket, a task and a
handshake's CPU, and holds nothing else: it never takes one of the node's peer slots
(``max_connections`` counts authenticated peers only). Unauthenticated connections get
their own small budget instead, in total and per source address, so idle sockets opened
by anyone cannot lock real peers out:

- a new connection from an address that already has ``max_per_address`` pending ones is
  refused (a flood from one host only hurts that host);
- when ``max_pending`` connections are pending in total, one is evicted to make room:
  the oldest that has not sent a single byte (a real initiator sends its handshake the
  moment it connects, so it is never the one evicted), or failing that the oldest of
  all (a real handshake lasts milliseconds, so the oldest pending connection is almost
  surely one that stalls on purpose; evicting it would take ``max_pending`` newer
  arrivals within a real handshake's few milliseconds).

The caller bounds the time to the first byte and to the end of the handshake (see
:data:`FIRST_BYTE_TIMEOUT_S`, :data:`HANDSHAKE_TIMEOUT_S`), and tells the policy when a
connection sent its first bytes (:meth:`HandshakeAdmission.started`) and when it left the
pending set (:meth:`HandshakeAdmission.release`: authenticated, refused or gone).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from p2pimage.errors import LocalProtocolError

__all__ = [
    "FIRST_BYTE_TIMEOUT_S",
    "HANDSHAKE_TIMEOUT_S",
    "MAX_PENDING_HANDSHAKES",
    "MAX_PENDING_PER_ADDRESS",
    "Admission",
    "HandshakeAdmission",
]

# Pending (unauthenticated) connections in total. OpenSSH's MaxStartups (10:30:100) is
# the precedent for a separate pre-authentication budget: it starts refusing at 10 and
# refuses all at 100. A p2pimage handshake takes 2 round trips and ~4 ms of CPU per side
# (token verification, an Ed25519 signature and its check, X25519; 8.3 ms for both sides
# of protocol v3 against 7.6 ms for v2, measured on the 2-core test machine under load),
# so a node finishes a few hundred handshakes per second: 64 pending is a fraction of a
# second of work, more than a cold start's burst needs (a node dials dial_target = 20
# peers, spread over the whole cluster), and idle sockets are evicted, not waited for.
MAX_PENDING_HANDSHAKES: Final = 64
# Pending connections per source address: one node dials us once per swarm we share,
# and an image pull opens its layers' swarms together (a large image has ~10-30 layers);
# on loopback, where tests and benchmarks run many nodes behind 127.0.0.1, a cold start
# sends up to dial_target = 20 dials per swarm at once. 32 leaves room for those bursts
# while one host's connections (refused beyond it, not evicting anyone) hold half of
# the total budget at most.
MAX_PENDING_PER_ADDRESS: Final = 32
# Time from accept to the first byte. A real initiator writes its handshake in the same
# flight as its connect; 2 s is ten times the worst in-cluster round trip we expect
# (cross-zone ~ 2 ms, overloaded node with scheduling stalls ~ 200 ms), short enough
# that an idle socket is gone long before a fetch's 15 s stall timeout.
FIRST_BYTE_TIMEOUT_S: Final = 2.0
# Time from accept to a verified peer (was 10 s for everything): 2.5 round trips, two
# token verifications and two signatures, even on a node at full CPU, stay far below 5 s.
HANDSHAKE_TIMEOUT_S: Final = 5.0

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Admission(Generic[H]):
    """The answer to one new connection: admitted or not, and whom to evict for it."""

    admitted: bool
    evict: H | None = None
    reason: str = ""


class HandshakeAdmission(Generic[H]):
    """Budget of pending handshakes; ``H`` is whatever handle the caller evicts by."""

    def __init__(
        self,
        *,
        max_pending: int = MAX_PENDING_HANDSHAKES,
        max_per_address: int = MAX_PENDING_PER_ADDRESS,
    ) -> None:
        if max_pending < 1 or max_per_address < 1:
            raise LocalProtocolError("admission budgets must be at least 1")
        self.max_pending = max_pending
        self.max_per_address = max_per_address
        # Insertion order is age order: the first idle entry is the oldest idle one.
        self._pending: dict[H, str] = {}
        self._idle: dict[H, None] = {}
        self._per_address: Counter[str] = Counter()
        self.refused = 0
        self.evicted = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_from(self, address: str) -> int:
        return self._per_address[address]

    def admit(self, handle: H, address: str) -> Admission[H]:
        """Decide on a new connection from ``address``. When admitted with ``evict``, the
        caller closes that pending connection (it has been released already)."""
        if handle in self._pending:
            raise LocalProtocolError("this connection is pending already")
        if self._per_address[address] >= self.max_per_address:
            self.refused += 1
            return Admission(False, reason=f"{address} has {self.max_per_address} pending")
        evict: H | None = None
        if len(self._pending) >= self.max_pending:
            evict = next(iter(self._idle), None)
            if evict is None:
                evict = next(iter(self._pending))
            self.release(evict)
            self.evicted += 1
        self._pending[handle] = address
        self._idle[handle] = None
        self._per_address[address] += 1
        return Admission(True, evict=evict)

    def started(self, handle: H) -> None:
        """The connection sent its first bytes: it is no longer evicted for newcomers."""
        self._idle.pop(handle, None)

    def release(self, handle: H) -> None:
        """The connection left the pending set (authenticated, failed or closed);
        releasing one that is not pending (evicted earlier) does nothing."""
        address = self._pending.pop(handle, None)
        if address is None:
            return
        self._idle.pop(handle, None)
        self._per_address[address] -= 1
        if not self._per_address[address]:
            del self._per_address[address]
