"""Which peers we upload to: the tit-for-tat choker.

A pure policy, like the piece picker: the caller passes each peer's interest and measured
rates and the time; the choker answers with the set of peers to unchoke. No I/O, no
clock reads, randomness only from the injected :class:`random.Random`, and decisions never
depend on set or hash order, so a run is reproducible from the rng's seed.

The rules are BEP 3's and the original client's, as libtorrent implements them:

* **Regular slots** (``upload_slots``): while leeching, the interested peers that send to
  us fastest (reciprocation); while seeding, the interested peers we send to fastest
  (libtorrent's ``fastest_upload``), or a rotation over the interested peers
  (``seed_mode="round_robin"``). While leeching, snubbed peers come after all others
  (a slot goes to one only if no unsnubbed interested peer is left for it).
* **Optimistic slots** (``optimistic_slots``): choked interested peers picked at random,
  newcomers (seen for less than one ``optimistic_interval``) three times as likely as the
  others, as in the original client; the choice is kept for ``optimistic_interval``
  seconds, then rotated.
* Uninterested peers never take a slot and are never in the returned set. (The original
  client also unchoked uninterested peers faster than the downloaders so they could
  start at once on becoming interested; here the caller simply rechokes when a peer's
  interest changes, where that can matter: :attr:`Choker.interest_matters`.)
* When there are no more interested peers than slots, every interested peer is
  unchoked.
* ``upload_slots=None`` means unlimited, and nothing else does: no peer ever waits for a
  slot, so every connected peer is unchoked, interested or not, and can request the
  moment it becomes interested (no unchoke round trip). This is the cooperative rule
  used inside a p2pimage cluster (``SwarmSettings.upload_slots`` defaults to None), with
  tit-for-tat one setting away. ``upload_slots=0`` is zero regular slots: only the
  optimistic unchokes.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from p2pimage.errors import LocalProtocolError

__all__ = ["Choker", "PeerStats", "SeedMode"]

K = TypeVar("K", bound=Hashable)

SeedMode = Literal["fastest_upload", "round_robin"]

#: The original client made a new connection three times as likely as the others to be
#: the next optimistic unchoke, so newcomers quickly get a first piece to trade.
NEW_PEER_WEIGHT: Final = 3


@dataclass(frozen=True, slots=True)
class PeerStats(Generic[K]):
    """What the choker needs to know about one connected peer."""

    key: K
    #: The peer is interested in what we have.
    interested: bool
    #: Bytes/s we receive from it (reciprocation, used while leeching).
    download_rate: float = 0.0
    #: Bytes/s we send to it (used while seeding).
    upload_rate: float = 0.0
    #: It has sent us nothing for a long time although we asked (libtorrent's 60 s rule).
    snubbed: bool = False


class Choker(Generic[K]):
    """Tit-for-tat unchoking for one torrent.

    Call :meth:`rechoke` every ``rechoke_interval`` seconds (see :meth:`rechoke_due`),
    and also when a peer connects, disconnects, or changes interest if you want a
    quicker answer; the optimistic choice only rotates once per ``optimistic_interval``.
    """

    def __init__(
        self,
        upload_slots: int | None = 4,
        optimistic_slots: int = 1,
        rechoke_interval: float = 10.0,
        optimistic_interval: float = 30.0,
        rng: random.Random | None = None,
        seed_mode: SeedMode = "fastest_upload",
    ) -> None:
        if upload_slots is not None and upload_slots < 0:
            raise LocalProtocolError("upload_slots must be >= 0 or None (unlimited)")
        if optimistic_slots < 0 or rechoke_interval <= 0 or optimistic_interval <= 0:
            raise LocalProtocolError("bad choker intervals or slot counts")
        if seed_mode not in ("fastest_upload", "round_robin"):
            raise LocalProtocolError(f"unknown seed_mode {seed_mode!r}")
        self.upload_slots: Final = upload_slots
        self.optimistic_slots: Final = optimistic_slots
        self.rechoke_interval: Final = rechoke_interval
        self.optimistic_interval: Final = optimistic_interval
        self.seed_mode: Final = seed_mode
        self._rng = rng if rng is not None else random.Random()
        self._first_seen: dict[K, float] = {}
        self._optimistic: list[K] = []
        self._rotated_at: float | None = None
        self._last_rechoke: float | None = None
        self._unchoked: set[K] = set()
        self._rr_next = 0  # round-robin position, in first-seen order

    @property
    def unchoked(self) -> frozenset[K]:
        """The answer of the last :meth:`rechoke`."""
        return frozenset(self._unchoked)

    @property
    def optimistic(self) -> tuple[K, ...]:
        """The current optimistic unchokes."""
        return tuple(self._optimistic)

    @property
    def interest_matters(self) -> bool:
        """Whether a peer's change of interest can change :meth:`rechoke`'s answer: not
        with unlimited slots (every connected peer is unchoked), so a caller need not
        rechoke on each ``interested`` / ``not interested``."""
        return self.upload_slots is not None

    def rechoke_due(self, now: float) -> bool:
        return self._last_rechoke is None or now - self._last_rechoke >= self.rechoke_interval

    def rechoke(self, peers: Sequence[PeerStats[K]], seeding: bool, now: float) -> set[K]:
        """The peers to unchoke now (all others stay or become choked).

        ``peers`` is every connected peer; keys must be unique. With unlimited slots
        (``upload_slots=None``) the result is every connected peer. Otherwise it holds
        only interested peers: at most ``upload_slots`` regular ones plus at most
        ``optimistic_slots`` optimistic ones.
        """
        self._last_rechoke = now
        first_seen = self._first_seen
        present: dict[K, PeerStats[K]] = {}
        for st in peers:
            if st.key in present:
                raise LocalProtocolError(f"peer {st.key!r} listed twice")
            present[st.key] = st
            first_seen.setdefault(st.key, now)
        for key in [k for k in first_seen if k not in present]:
            del first_seen[key]

        slots = self.upload_slots
        if slots is None:
            self._optimistic = []
            self._unchoked = set(present)
            return set(self._unchoked)
        interested = [st for st in peers if st.interested]
        if len(interested) <= slots + self.optimistic_slots:
            self._optimistic = []
            self._unchoked = {st.key for st in interested}
            return set(self._unchoked)

        regular = self._regular(interested, seeding, slots)
        chosen = {st.key for st in regular}

        # Keep the optimistic picks that are still eligible until the period is over.
        rotate = self._rotated_at is None or now - self._rotated_at >= self.optimistic_interval
        if rotate:
            self._rotated_at = now
            kept: list[K] = []
        else:
            kept = [
                k
                for k in self._optimistic
                if k in present and present[k].interested and k not in chosen
            ]
        pool = [st.key for st in interested if st.key not in chosen and st.key not in kept]
        while len(kept) < self.optimistic_slots and pool:
            kept.append(pool.pop(self._weighted_index(pool, now)))
        self._optimistic = kept
        self._unchoked = chosen | set(kept)
        return set(self._unchoked)

    def _regular(
        self, interested: list[PeerStats[K]], seeding: bool, slots: int
    ) -> list[PeerStats[K]]:
        if seeding and self.seed_mode == "round_robin":
            ordered = sorted(interested, key=lambda st: self._first_seen[st.key])
            start = self._rr_next % len(ordered)
            self._rr_next = start + slots
            return (ordered[start:] + ordered[:start])[:slots]
        pool = list(interested)
        self._rng.shuffle(pool)  # random tie-breaks; sort is stable
        if seeding:
            pool.sort(key=lambda st: st.upload_rate, reverse=True)
        else:
            pool.sort(key=lambda st: (not st.snubbed, st.download_rate), reverse=True)
        return pool[:slots]

    def _weighted_index(self, pool: list[K], now: float) -> int:
        weights = [
            NEW_PEER_WEIGHT if now - self._first_seen[k] < self.optimistic_interval else 1
            for k in pool
        ]
        pick = self._rng.randrange(sum(weights))
        for i, w in enumerate(weights):
            pick -= w
            if pick < 0:
                return i
        raise AssertionError("unreachable")
