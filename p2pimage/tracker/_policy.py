"""Tracker policy: who is in a swarm, whom a peer is told about, who reads the registry,
who may stop seeding. Pure: no I/O, no clock (callers pass ``now``), randomness from an
injected :class:`random.Random`, so the daemon, the tests and the simulator run the same
code.

One :class:`SwarmRecord` object holds the state of one (cluster, info-hash) swarm. The state
backends (:mod:`._state`) hand the policy a swarm to mutate; the memory backend gives the
live object, the Redis backend a decoded snapshot that it writes back atomically.

Per-announce cost is O(numwant) for peer selection, a join, a leave or a tier change
included: each swarm keeps its selection tiers as index lists updated in place (append,
swap-remove) and samples from them; only a swarm-wide change (the fetchers, the
well-supplied line, a distrusted seeder) rebuilds them, O(peers). Expiry, counts and
origin bookkeeping are amortised O(1) (peers are kept in last-seen order, counts are
maintained incrementally, the fetcher table holds at most ``max_origin_fetchers``).
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Final

from p2pimage.errors import LocalProtocolError

from ._protocol import (
    AnnounceRequest,
    Event,
    OriginAssignment,
    ScrapeStats,
    TrackerRequestError,
    pack_peer,
)

__all__ = [
    "AnnounceOutcome",
    "FetcherRange",
    "PeerIdTakenError",
    "PeerRecord",
    "PolicyConfig",
    "SwarmRecord",
    "TrackerPolicy",
    "origin_blob_url",
]


class PeerIdTakenError(TrackerRequestError):
    """The announce names a peer id another node (token subject) holds in this swarm."""


def origin_blob_url(registry_url: str, repo: str, digest: str) -> str:
    """The OCI distribution blob URL an origin fetcher reads with Range requests."""
    return f"{registry_url.rstrip('/')}/v2/{repo}/blobs/{digest}"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Tracker policy settings, with their defaults.

    * ``interval_s``: announce interval for ordinary peers; ``fetcher_interval_s`` is the
      (shorter) interval told to origin fetchers so progress and re-splits flow quickly.
    * ``peer_timeout_s``: a peer not heard from for this long is dropped (two intervals:
      one missed announce is tolerated).
    * ``origin_ratio`` / ``max_origin_fetchers``: k = clamp(ceil(ratio * swarm size), 1,
      max) peers read disjoint piece ranges from the registry.
    * ``origin_stall_s``: a fetcher whose reported progress does not move for this long
      loses its remaining range to the next fetcher.
    * ``release_min_seeders`` / ``release_seeder_ratio``: finished peers beyond
      max(M, ceil(ratio * active leechers)) are told to release.
    * ``linger_s``: once every peer has finished and no leecher has been seen for this
      long, every peer is told to release.
    * ``well_supplied_fraction``: a leecher with at most this fraction of the largest
      ``left`` seen in the swarm counts as well-supplied for peer selection.
    * ``zone_share``: the share of a response reserved for same-zone peers.
    * ``seeder_stall_s``: a seeder's claim is one node's word. While a seeder is claimed
      (no origin work), a leecher whose ``left`` has not fallen for this long reopens
      origin work and is given a range, and every seeder that reported no upload for
      as long is distrusted: its claims no longer close origin work and leechers are
      not told about it. With the default 5 s a stalled leecher is caught at its first
      re-announce (leechers of a seeded swarm are told ``fetcher_interval_s``, 5 s), well
      inside the nodes' 15 s stall timeout.
    """

    interval_s: int = 30
    # The soonest a node short of peers comes back for more (AnnounceSchedule: hungry
    # until its dial target). 5 s was too late for a cold start: at 500 simulated nodes
    # the last ones, stuck with 8-15 peers, finished at 1.45x the bound; 1.22x at 2 s
    # (docs/benchmarks.md, "The tail at 500-5,000 nodes").
    min_interval_s: int = 2
    fetcher_interval_s: int = 5
    peer_timeout_s: float = 60.0
    origin_ratio: float = 0.1
    max_origin_fetchers: int = 16
    origin_stall_s: float = 20.0
    release_min_seeders: int = 2
    release_seeder_ratio: float = 0.25
    linger_s: float = 300.0
    well_supplied_fraction: float = 0.5
    zone_share: float = 0.75
    # Pieces a fetcher may read past its last reported progress before it must announce
    # again (its lease); None: max(4, pieces / 8); 0: no leases. Steals never take leased
    # pieces, so a fetcher that has not heard of a steal yet cannot read a stolen piece.
    # Fetchers renew halfway through a lease, so its size only sets how finely the tail
    # can be stolen, not how often a fetcher waits.
    origin_lease_pieces: int | None = None
    seeder_stall_s: float = 5.0

    def lease(self, pieces: int) -> int:
        if self.origin_lease_pieces is not None:
            return self.origin_lease_pieces
        return max(4, math.ceil(pieces / 8))


@dataclass(slots=True)
class PeerRecord:
    peer_id: bytes
    host: str
    port: int
    left: int
    last_seen: float
    zone: str | None = None
    # When the peer was first seen with left == 0 (None while it is leeching).
    finished_at: float | None = None
    released: bool = False
    # The token subject that announced this peer id (None in open mode).
    subject: str | None = None
    # When ``left`` last fell (or the peer joined); when ``uploaded`` last grew (or the
    # peer became a seeder). What contradicts a claimed seeder is measured from these.
    progress_at: float = 0.0
    uploaded: int = 0
    upload_at: float = 0.0
    # How selection hands this peer out (built on first need, never persisted).
    entry: _Entry | None = field(default=None, compare=False, repr=False)
    # This record's JSON in a Redis swarm document (built on first need, never persisted;
    # a record is not changed once its announce is over, a re-announce makes a new one).
    doc: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def identity(self) -> str:
        """Who stands behind this record: the token subject, else the peer id."""
        return self.subject if self.subject is not None else self.peer_id.hex()


@dataclass(slots=True)
class FetcherRange:
    """A fetcher's unfetched remainder ``[next, end)`` of its assigned origin range."""

    peer_id: bytes
    next: int
    end: int
    last_progress: float


@dataclass(slots=True)
class SwarmRecord:
    """The state of one swarm. ``peers`` is kept in last-seen order (oldest first)."""

    peers: dict[bytes, PeerRecord] = field(default_factory=dict)
    pieces: int | None = None
    fetchers: dict[bytes, FetcherRange] = field(default_factory=dict)
    # Piece ranges not yet read from the origin and owned by no fetcher.
    unassigned: list[tuple[int, int]] = field(default_factory=list)
    # True once the whole layer is in the swarm (a seeder appeared): no more origin reads.
    origin_done: bool = False
    downloads: int = 0
    largest_left: int = 0
    # Last time a leecher was present (for the linger rule).
    leecher_seen_at: float = 0.0
    # Fetchers that stalled: never named again while they stay in the swarm.
    stalled: set[bytes] = field(default_factory=set)
    seeders: int = 0
    released: int = 0
    # Identities (token subjects) whose seeder claims were contradicted by stalled
    # leechers: their claims never close origin work and leechers are not told of them.
    distrusted: set[str] = field(default_factory=set)
    # Peer selection's tier lists, updated by every add and remove while the swarm-wide
    # inputs they depend on hold (see TrackerPolicy._tiers); never persisted.
    view: _PeerView | None = None

    @property
    def leechers(self) -> int:
        return len(self.peers) - self.seeders

    def add(self, rec: PeerRecord, *, view: bool = True) -> None:
        """Add ``rec``; ``view=False`` leaves selection's lists alone (for a record that
        replaces one they list, taken out with ``view=False``, in exactly its place)."""
        if view and self.view is not None:
            self.view.add(rec)
        self.peers[rec.peer_id] = rec
        if rec.left == 0:
            self.seeders += 1
        if rec.released:
            self.released += 1

    def remove(self, peer_id: bytes, *, view: bool = True) -> PeerRecord | None:
        rec = self.peers.pop(peer_id, None)
        if rec is not None:
            if view and self.view is not None:
                self.view.discard(peer_id)
            if rec.left == 0:
                self.seeders -= 1
            if rec.released:
                self.released -= 1
        return rec

    def expire(self, now: float, timeout_s: float) -> int:
        """Drop peers not seen for ``timeout_s``; amortised O(expired)."""
        cutoff = now - timeout_s
        # The oldest peer first: most calls end at it (nothing expired), without a list.
        oldest = next(iter(self.peers.values()), None)
        if oldest is None or oldest.last_seen >= cutoff:
            return 0
        dropped = [pid for pid, rec in _take_while_old(self.peers, cutoff)]
        for pid in dropped:
            self.remove(pid)
            self.stalled.discard(pid)
        return len(dropped)

    def stats(self) -> ScrapeStats:
        return ScrapeStats(self.seeders, self.leechers, self.downloads)


def _take_while_old(
    peers: dict[bytes, PeerRecord], cutoff: float
) -> list[tuple[bytes, PeerRecord]]:
    out = []
    for pid, rec in peers.items():
        if rec.last_seen >= cutoff:
            break
        out.append((pid, rec))
    return out


# One peer as selection hands it out: (peer id, (host, port), compact form or None when
# the host is not an IP literal). Built once per view, shared by every answer.
_Entry = tuple[bytes, tuple[str, int], bytes | None]
# tiers[same_zone][tier] for one kind of asker (its zone, leecher or seeder).
_Tiers = tuple[tuple[list[_Entry], ...], tuple[list[_Entry], ...]]


def _entry(p: PeerRecord) -> _Entry:
    entry = p.entry
    if entry is None:
        entry = p.entry = (p.peer_id, (p.host, p.port), _packed(p.host, p.port))
    return entry


@dataclass(slots=True)
class _AskerTiers:
    """The tier lists for one kind of asker (its zone, leecher or not) and where each
    peer sits in them: ``where[peer id] = (same zone, tier, index)``."""

    tiers: _Tiers
    where: dict[bytes, tuple[int, int, int]]


@dataclass(slots=True)
class _PeerView:
    """Peer selection's tier lists of one swarm, valid while ``key`` holds: the swarm-wide
    inputs of the tiers (the well-supplied line, the fetchers, the distrusted). Within
    it, :meth:`add` and :meth:`discard` keep every asker kind's lists equal (as sets) to
    a from-scratch classification in O(asker kinds): a join, a leave, an expiry or a
    tier change costs no walk over the swarm."""

    key: tuple[object, ...]
    well: float
    fetchers: frozenset[bytes]
    distrusted: frozenset[str]
    by_asker: dict[tuple[str | None, bool], _AskerTiers] = field(default_factory=dict)

    def place(self, p: PeerRecord, zone: str | None, leecher: bool) -> tuple[int, int] | None:
        """``(same zone, tier)`` of ``p`` for an asker of this kind; None: never offered."""
        if p.released:
            return None
        if p.left == 0:
            if not leecher or (self.distrusted and p.identity in self.distrusted):
                return None
            tier = 0
        elif leecher and (p.left <= self.well or p.peer_id in self.fetchers):
            tier = 1
        else:
            tier = 2
        return int(zone is not None and p.zone == zone), tier

    def build(self, peers: dict[bytes, PeerRecord], zone: str | None, leecher: bool) -> _AskerTiers:
        built = self.by_asker[(zone, leecher)] = _AskerTiers((([], [], []), ([], [], [])), {})
        for p in peers.values():
            self._append(built, p, zone, leecher)
        return built

    def _append(self, built: _AskerTiers, p: PeerRecord, zone: str | None, leecher: bool) -> None:
        placed = self.place(p, zone, leecher)
        if placed is not None:
            same, tier = placed
            group = built.tiers[same][tier]
            built.where[p.peer_id] = (same, tier, len(group))
            group.append(_entry(p))

    def add(self, p: PeerRecord) -> None:
        for (zone, leecher), built in self.by_asker.items():
            self._append(built, p, zone, leecher)

    def discard(self, peer_id: bytes) -> None:
        for built in self.by_asker.values():
            pos = built.where.pop(peer_id, None)
            if pos is None:
                continue
            same, tier, index = pos
            group = built.tiers[same][tier]
            last = group.pop()
            if index < len(group):  # swap-remove: the last entry fills the hole
                group[index] = last
                built.where[last[0]] = (same, tier, index)


@dataclass(slots=True)
class AnnounceOutcome:
    """The policy's answer to one announce (the daemon encodes it); a value, never
    changed once made (not frozen: one is made per swarm of every announce, and a frozen
    dataclass's constructor costs several times a plain one's)."""

    complete: int
    incomplete: int
    interval: int
    min_interval: int
    origin: OriginAssignment | None = None
    release: bool = False
    # The peers chosen, in BEP 23 compact form (IPv4, IPv6) when every host is an IP
    # literal: what the daemon sends. ``peers`` lists their addresses.
    compact: tuple[bytes, bytes] | None = None
    chosen: Sequence[_Entry] = ()

    @property
    def peers(self) -> list[tuple[str, int]]:
        """The chosen peers' (host, port)."""
        return [address for _, address, _ in self.chosen]


class TrackerPolicy:
    """The tracker's rules, applied to one swarm per call."""

    def __init__(self, config: PolicyConfig | None = None, *, rng: random.Random | None = None):
        self.config = config or PolicyConfig()
        self.rng = rng or random.Random()

    # ------------------------------------------------------------------ announce

    def announce(
        self,
        swarm: SwarmRecord,
        req: AnnounceRequest,
        *,
        host: str,
        now: float,
        zone: str | None = None,
        registry_url: str | None = None,
        subject: str | None = None,
    ) -> AnnounceOutcome:
        """Apply one announce from ``host`` (the peer's address) to ``swarm``.

        ``registry_url`` (the tracker's configured registry) together with the request's
        ``repo`` and ``digest`` makes the origin URL; without all three the asker is never
        named an origin fetcher. ``subject`` is the verified token's subject: a peer id
        is held by one subject, and :class:`PeerIdTakenError` refuses another's
        announce for it (before anything changes).
        """
        cfg = self.config
        swarm.expire(now, cfg.peer_timeout_s)
        held = swarm.peers.get(req.peer_id)
        if held is not None and held.subject != subject:
            raise PeerIdTakenError("peer_id is held by another node")
        # Selection's lists keep the old record's place until the new record is known.
        old = swarm.remove(req.peer_id, view=False)
        if (old is None and not swarm.peers) or (old is not None and old.left > 0):
            # A new (or emptied) swarm, or a leecher until this moment: the linger clock
            # (time since a leecher was last present) restarts now.
            swarm.leecher_seen_at = now
        same_place = False
        if old is not None and swarm.view is not None:
            same_place = (
                req.event is not Event.STOPPED
                and old.left == req.left
                and old.host == host
                and old.port == req.port
                and old.zone == zone
            )
            if not same_place:
                swarm.view.discard(req.peer_id)
        if req.event is Event.STOPPED:
            self._forget_fetcher(swarm, req.peer_id)
            swarm.stalled.discard(req.peer_id)
            return AnnounceOutcome(
                swarm.seeders,
                swarm.leechers,
                cfg.interval_s,
                cfg.min_interval_s,
                compact=(b"", b""),
            )
        if swarm.pieces is None and req.pieces is not None:
            swarm.pieces = req.pieces
            if not swarm.origin_done and not swarm.fetchers:
                swarm.unassigned = [(0, req.pieces)]
        finished_at = old.finished_at if old is not None else None
        if req.left == 0 and finished_at is None:
            finished_at = now
            if (old is not None and old.left > 0) or req.event is Event.COMPLETED:
                swarm.downloads += 1
        became_seeder = req.left == 0 and (old is None or old.left > 0)
        # Positional, in field order (keywords cost a microsecond per announce here).
        rec = PeerRecord(
            req.peer_id,
            host,
            req.port,
            req.left,
            now,
            zone,
            finished_at if req.left == 0 else None,
            old.released if old is not None else False,
            subject,
            now if old is None or req.left < old.left else old.progress_at,
            req.uploaded,
            (now if old is None or became_seeder or req.uploaded > old.uploaded else old.upload_at),
        )
        if old is not None and old.host == host and old.port == req.port:
            rec.entry = old.entry
        # A plain re-announce (nothing its place depends on changed; subject and release
        # carry over) keeps its place in selection's lists: no work for them.
        swarm.add(rec, view=not same_place)
        swarm.largest_left = max(swarm.largest_left, req.left)
        if req.left > 0:
            swarm.leecher_seen_at = now
            if swarm.origin_done and swarm.pieces and now - rec.progress_at >= cfg.seeder_stall_s:
                self._contradict_seeders(swarm, now)
        elif became_seeder and not swarm.origin_done and rec.identity not in swarm.distrusted:
            # A seeder holds every piece: the swarm no longer needs the registry (until
            # a leecher stalls and contradicts it, see _contradict_seeders).
            swarm.origin_done = True
            swarm.fetchers.clear()
            swarm.unassigned.clear()

        origin = None
        if not swarm.origin_done:
            origin = self._origin(swarm, req, rec, now, registry_url)
        release = rec.left == 0 and self._should_release(swarm, rec, now)
        if release and not rec.released:
            swarm.remove(rec.peer_id)  # the last peer: put back where it was, released
            rec.released = True
            swarm.add(rec)
        chosen = [] if release else self._choose(swarm, rec, req.numwant)
        # Fetchers report progress often; so do leechers of a seeded swarm, so that a
        # seeder claim that does not hold is caught within seeder_stall_s.
        often = origin is not None or (rec.left > 0 and swarm.origin_done)
        interval = cfg.fetcher_interval_s if often else cfg.interval_s
        compact = None
        try:
            joined = b"".join(map(_COMPACT_FORM, chosen))
        except TypeError:
            pass  # a host that is no IP literal (never from the daemon): no compact form
        else:
            if len(joined) == 6 * len(chosen):  # all IPv4, the common case
                compact = (joined, b"")
            else:
                packed: list[bytes] = [p for _, _, p in chosen]  # type: ignore[misc]
                compact = (
                    b"".join(p for p in packed if len(p) == 6),
                    b"".join(p for p in packed if len(p) != 6),
                )
        return AnnounceOutcome(
            swarm.seeders,
            swarm.leechers,
            interval,
            min(cfg.min_interval_s, interval),
            origin,
            release,
            compact,
            chosen,
        )

    def scrape(self, swarm: SwarmRecord | None, now: float) -> ScrapeStats:
        if swarm is None:
            return ScrapeStats(0, 0, 0)
        swarm.expire(now, self.config.peer_timeout_s)
        return swarm.stats()

    # ------------------------------------------------------------------ lying seeders

    def _contradict_seeders(self, swarm: SwarmRecord, now: float) -> None:
        """A leecher made no progress for ``seeder_stall_s`` although a seeder is claimed:
        the claim is contradicted. Seeders that report no upload for as long are
        distrusted, and origin work reopens over the whole layer (the next leechers to
        announce are given ranges), so a lying member can slow a swarm, never stall it."""
        stall = self.config.seeder_stall_s
        for p in swarm.peers.values():
            if p.left == 0 and now - p.upload_at >= stall:
                swarm.distrusted.add(p.identity)
        swarm.origin_done = False
        swarm.fetchers.clear()
        swarm.unassigned = [(0, swarm.pieces or 0)]

    # ------------------------------------------------------------------ origin ranges

    def target_fetchers(self, swarm_size: int) -> int:
        cfg = self.config
        return max(1, min(cfg.max_origin_fetchers, math.ceil(cfg.origin_ratio * swarm_size)))

    def _forget_fetcher(self, swarm: SwarmRecord, peer_id: bytes) -> None:
        f = swarm.fetchers.pop(peer_id, None)
        if f is not None and f.next < f.end:
            swarm.unassigned.append((f.next, f.end))

    def _reclaim(self, swarm: SwarmRecord, now: float) -> None:
        stall = self.config.origin_stall_s
        for pid in list(swarm.fetchers):
            f = swarm.fetchers[pid]
            if pid not in swarm.peers:
                self._forget_fetcher(swarm, pid)
            elif now - f.last_progress > stall:
                self._forget_fetcher(swarm, pid)
                swarm.stalled.add(pid)

    def _origin(
        self,
        swarm: SwarmRecord,
        req: AnnounceRequest,
        rec: PeerRecord,
        now: float,
        registry_url: str | None,
    ) -> OriginAssignment | None:
        mine = swarm.fetchers.get(rec.peer_id)
        if mine is not None and req.origin_next is not None:
            progressed = min(max(req.origin_next, mine.next), mine.end)
            if progressed > mine.next:
                mine.next = progressed
                mine.last_progress = now
        if mine is not None and mine.next >= mine.end:
            del swarm.fetchers[rec.peer_id]
            mine = None
        self._reclaim(swarm, now)
        mine = swarm.fetchers.get(rec.peer_id)
        if registry_url is None or req.repo is None or req.digest is None or not swarm.pieces:
            return None
        url = origin_blob_url(registry_url, req.repo, req.digest)
        if mine is not None:
            return self._assignment(url, mine.next, mine.end, swarm.pieces)
        if rec.peer_id in swarm.stalled:
            return None
        if len(swarm.fetchers) >= self.target_fetchers(len(swarm.peers)):
            return None
        if not self._has_work(swarm) or not self._zone_may_fetch(swarm, rec):
            return None  # the cheap test first: the zone check walks the swarm
        got = self._take_work(swarm)
        if got is None:
            return None
        first, end = got
        swarm.fetchers[rec.peer_id] = FetcherRange(rec.peer_id, first, end, now)
        return self._assignment(url, first, end, swarm.pieces)

    def _zone_may_fetch(self, swarm: SwarmRecord, rec: PeerRecord) -> bool:
        """Origin fetchers spread across zones: each zone with leechers that could fetch
        has a fair share, ceil(k / zones), of the k fetcher slots. The asker's zone (None
        is a zone of its own) may take a slot while it is under its share, or when no
        other zone under its share has a leecher to give it to (no slot stays unused).
        Spread, the registry's copies enter every zone and cross-zone traffic is one
        range per zone rather than the whole layer. O(peers), only while a slot is open."""
        per_zone: dict[str | None, int] = {}
        for pid in swarm.fetchers:
            fetcher = swarm.peers.get(pid)
            zone = fetcher.zone if fetcher is not None else None
            per_zone[zone] = per_zone.get(zone, 0) + 1
        candidates = {
            p.zone
            for p in swarm.peers.values()
            if p.left > 0 and p.peer_id not in swarm.fetchers and p.peer_id not in swarm.stalled
        }
        zones = candidates | set(per_zone)
        if len(zones) <= 1:
            return True
        share = math.ceil(self.target_fetchers(len(swarm.peers)) / len(zones))
        if per_zone.get(rec.zone, 0) < share:
            return True
        return not any(per_zone.get(z, 0) < share for z in candidates if z != rec.zone)

    def _assignment(self, url: str, first: int, end: int, pieces: int) -> OriginAssignment:
        lease = self.config.lease(pieces)
        if lease <= 0 or first + lease >= end:
            return OriginAssignment(url, first, end)
        return OriginAssignment(url, first, end, first + lease)

    def _has_work(self, swarm: SwarmRecord) -> bool:
        """Whether :meth:`_take_work` would find a range; O(fetchers)."""
        if swarm.unassigned:
            return True
        lease = self.config.lease(swarm.pieces or 0)
        return any(f.end - min(f.end, f.next + lease) >= 2 for f in swarm.fetchers.values())

    def _take_work(self, swarm: SwarmRecord) -> tuple[int, int] | None:
        """An unowned remainder whole (largest first), else the tail half of the largest
        unleased remainder a fetcher still holds (work stealing)."""
        if swarm.unassigned:
            best = max(range(len(swarm.unassigned)), key=lambda i: _span(swarm.unassigned[i]))
            return swarm.unassigned.pop(best)
        lease = self.config.lease(swarm.pieces or 0)

        def stealable(f: FetcherRange) -> int:
            return f.end - min(f.end, f.next + lease)

        victim = max(swarm.fetchers.values(), key=stealable, default=None)
        if victim is None or stealable(victim) < 2:
            return None
        start = victim.next + lease
        mid = start + (victim.end - start + 1) // 2
        stolen = (mid, victim.end)
        victim.end = mid
        return stolen

    # ------------------------------------------------------------------ release

    def _should_release(self, swarm: SwarmRecord, rec: PeerRecord, now: float) -> bool:
        if rec.released:
            return True
        cfg = self.config
        leechers = swarm.leechers
        if leechers == 0 and now - swarm.leecher_seen_at >= cfg.linger_s:
            return True
        active_seeders = swarm.seeders - swarm.released
        keep = max(cfg.release_min_seeders, math.ceil(cfg.release_seeder_ratio * leechers))
        surplus = active_seeders - keep
        if surplus <= 0:
            return False
        # Rank the active seeders by how little the swarm needs them: zones with the most
        # seeders per leecher first, then the longest-finished (it has served its share).
        zone_seeders: dict[str | None, int] = {}
        zone_leechers: dict[str | None, int] = {}
        for p in swarm.peers.values():
            if p.left > 0:
                zone_leechers[p.zone] = zone_leechers.get(p.zone, 0) + 1
            elif not p.released:
                zone_seeders[p.zone] = zone_seeders.get(p.zone, 0) + 1

        def need(p: PeerRecord) -> tuple[float, float, bytes]:
            spare = zone_seeders.get(p.zone, 0) / (zone_leechers.get(p.zone, 0) + 1)
            return (-spare, p.finished_at or 0.0, p.peer_id)

        mine = need(rec)
        ahead = sum(
            1 for p in swarm.peers.values() if p.left == 0 and not p.released and need(p) < mine
        )
        return ahead < surplus

    # ------------------------------------------------------------------ peer selection

    def _select(self, swarm: SwarmRecord, asker: PeerRecord, numwant: int) -> list[tuple[str, int]]:
        """Up to ``numwant`` peers' addresses (see :meth:`_choose`)."""
        return [address for _, address, _ in self._choose(swarm, asker, numwant)]

    def _choose(self, swarm: SwarmRecord, asker: PeerRecord, numwant: int) -> list[_Entry]:
        """Up to ``numwant`` peers, never the asker nor released peers.

        For a leecher: seeders, then origin fetchers and well-supplied leechers, then the
        rest; random within a tier. A seeder gets leechers only, at random. Same-zone peers
        fill up to ``zone_share`` of the answer first. O(numwant): the shared tier lists
        are sampled (see :func:`_pick`), never searched nor rebuilt.
        """
        if numwant <= 0:
            return []
        built = self._tiers(swarm, asker.zone, asker.left > 0)
        tiers = built.tiers
        # Only the asker's own tier has to leave it out, at the index the view keeps for
        # it (one dict lookup, no search, no filtering of what was drawn).
        same, tier, index = built.where.get(asker.peer_id, (-1, -1, -1))
        if asker.zone is None:
            return self._take(tiers[0], numwant, asker.peer_id, tier, index)
        quota = max(1, math.ceil(numwant * self.config.zone_share))
        near_own = tier if same == 1 else -1
        far_own = tier if same == 0 else -1
        chosen = self._take(tiers[1], quota, asker.peer_id, near_own, index)
        chosen += self._take(tiers[0], numwant - len(chosen), asker.peer_id, far_own, index)
        if len(chosen) < numwant:  # the far tiers ran out: more near peers, not the same
            skip = {e[0] for e in chosen}
            skip.add(asker.peer_id)
            for group in tiers[1]:
                need = numwant - len(chosen)
                if need <= 0:
                    break
                chosen += _pick(self.rng, group, need, skip)
        return chosen

    def _tiers(self, swarm: SwarmRecord, zone: str | None, leecher: bool) -> _AskerTiers:
        """The swarm's tier lists for an asker in ``zone`` (a leecher or not); rebuilt
        only when a swarm-wide input changed, else kept current by every add and remove."""
        well = swarm.largest_left * self.config.well_supplied_fraction
        key = (well, tuple(swarm.fetchers), len(swarm.distrusted))
        view = swarm.view
        if view is None or view.key != key:
            view = swarm.view = _PeerView(
                key, well, frozenset(swarm.fetchers), frozenset(swarm.distrusted)
            )
        built = view.by_asker.get((zone, leecher))
        if built is None:
            built = view.build(swarm.peers, zone, leecher)
        return built

    def _take(
        self, tiers: Sequence[list[_Entry]], k: int, asker: bytes, own: int, index: int
    ) -> list[_Entry]:
        """Up to ``k`` peers, best tier first, a random subset of the last tier needed;
        never ``asker``, which may sit in tier ``own`` only, at ``index``."""
        out: list[_Entry] = []
        for tier, group in enumerate(tiers):
            need = k - len(out)
            if need <= 0:
                break
            if tier == own:
                out += _pick_without(self.rng, group, need, index, asker)
            else:
                out += _pick(self.rng, group, need, _NO_SKIP)
        return out


# An entry's compact form (None for a host that is no IP literal).
_COMPACT_FORM: Final = operator.itemgetter(2)


def _sample(rng: random.Random, group: list[_Entry], k: int, without: int = -1) -> list[_Entry]:
    """``k`` distinct entries of ``group`` (fewer than it holds), leaving out
    ``group[without]`` when ``without`` is an index, uniformly at random: a partial
    Fisher-Yates shuffle of a copy (the left-out entry's slot taken by the last one).
    ``random.sample`` draws the same way, one Python-level ``_randbelow`` call per entry;
    drawing ``int(random() * m)`` (bias under m / 2**53) takes 0.6-0.7 of its time (40 of
    89 entries: 12-14 against 18-21 µs under load), and this runs once per swarm of every
    announce."""
    pool = group.copy()
    if without >= 0:
        pool[without] = pool[-1]
        pool.pop()
    n = len(pool)
    draw = rng.random
    for i in range(k):
        j = i + int(draw() * (n - i))
        pool[i], pool[j] = pool[j], pool[i]
    del pool[k:]
    return pool


def _pick_without(
    rng: random.Random, group: list[_Entry], k: int, index: int, peer_id: bytes
) -> list[_Entry]:
    """:func:`_pick` leaving out the one entry ``group[index]``, that of ``peer_id`` (the
    asker's, where the view keeps it): no skip set, and nothing drawn is filtered out,
    which cost as much as the draws (a list comprehension over k + 1 entries per swarm
    of every announce)."""
    n = len(group)
    if not 0 <= index < n or group[index][0] != peer_id:
        return _pick(rng, group, k, {peer_id})  # not where the view says: look it up
    if n - 1 <= k:
        return group[:index] + group[index + 1 :]
    if n <= _COPY_FACTOR * (k + 1):
        return _sample(rng, group, k, index)
    return _pick(rng, group, k, {peer_id})


_NO_SKIP: Final[frozenset[bytes]] = frozenset()
# Groups up to this many times the entries wanted are sampled from a copy (a C-speed
# copy beats drawing and checking indices there); larger ones by drawing indices.
_COPY_FACTOR: Final = 32


def _pick(
    rng: random.Random, group: list[_Entry], k: int, skip: AbstractSet[bytes]
) -> list[_Entry]:
    """Up to ``k`` distinct entries of ``group`` whose peer id is not in ``skip``,
    uniformly at random, without changing ``group`` (which may be what is returned: the
    caller must not change it). O(k + len(skip)) for a group over ``_COPY_FACTOR``
    times that, drawing indices (repeats and skipped ids drawn again: under two draws per
    entry taken); below, a partial shuffle of a copy, ``k + len(skip)`` long, whose
    entries not skipped are a uniform choice."""
    n = len(group)
    s = len(skip)
    if n <= k:
        return group if not s else [e for e in group if e[0] not in skip]
    if n <= _COPY_FACTOR * (k + s):
        picked = _sample(rng, group, min(n, k + s))
        return picked if not s else [e for e in picked if e[0] not in skip][:k]
    draw = rng.random
    seen: set[int] = set()
    out: list[_Entry] = []
    while len(out) < k:
        i = int(draw() * n)
        if i in seen:
            continue
        seen.add(i)
        entry = group[i]
        if entry[0] not in skip:
            out.append(entry)
    return out


def _packed(host: str, port: int) -> bytes | None:
    try:
        return pack_peer(host, port)
    except LocalProtocolError:
        return None


def _span(r: tuple[int, int]) -> int:
    return r[1] - r[0]
