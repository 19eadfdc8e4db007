"""The swarm engine's remaining decisions, as pure classes: whom to dial, which origin
pieces to show to whom, when to announce, which origin pieces to read and when to stop.

Like the picker and the choker, nothing here does I/O or reads a clock: callers pass
``now`` and a :class:`random.Random`. The trio engine (:mod:`p2pimage.swarm.engine`,
:mod:`p2pimage.swarm.origin`, :mod:`p2pimage.tracker.client`) and the simulator
(``benchmarks/_sim.py``) call the same objects, so the simulator validates this code and
not a copy of it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pimage.errors import LocalProtocolError
from p2pimage.tracker import Event, OriginAssignment

__all__ = [
    "AnnounceSchedule",
    "DialPolicy",
    "HavePolicy",
    "InterestPolicy",
    "OriginFollow",
    "OriginRange",
    "OriginShare",
    "OriginStep",
    "PeerTimeouts",
    "RevealPolicy",
    "UploadOrder",
    "follow_origin",
]

K = TypeVar("K", bound=Hashable)
A = TypeVar("A", bound=Hashable)


# --------------------------------------------------------------------------- dialling


@dataclass(frozen=True, slots=True)
class DialPolicy:
    """Whom a swarm dials and whom it accepts.

    ``dial_target``: dial only while fewer peers than this are connected or being dialled;
    ``max_peers``: accept connections up to this many. (Why the two differ:
    :class:`~p2pimage.swarm.engine.SwarmSettings`.)
    """

    dial_target: int
    max_peers: int
    # Simultaneous dials: see dial_delay_s.
    defer_s: float = 0.0

    def dial_delay_s(
        self,
        own: tuple[str, int],
        other: tuple[str, int],
        rng: random.Random,
        *,
        mutual: bool,
    ) -> float:
        """How long to wait before dialing ``other`` from ``own`` (listen addresses).

        When every node of a cold start dials every other, most pairs dial each other
        at once and each pair handshakes twice (key exchange, two token checks), then
        keeps one connection. Of each pair, the node whose address orders higher waits
        ``defer_s`` (with jitter) so the other's connection usually stands by then, and
        its own dial stops after the 68-byte handshake names a peer already connected.
        It still dials: a pair where only one side knows the other is never left
        unconnected, at worst connected ``defer_s`` later.

        Only where ``other`` is expected to dial us too (``mutual``: a tracker lists
        each member to the others, a full mesh given to every node). A peer named to us
        alone (a static list, a seed we were pointed at) is dialled at once: the wait
        would save nothing and delay the first byte (0.075-0.15 s of a 0.6 s pair
        transfer: docs/benchmarks.md, "Pair: the evening's regression")."""
        if not mutual or self.defer_s <= 0 or not other < own:
            return 0.0
        return self.defer_s * rng.uniform(0.5, 1.0)

    def want_more(self, connected: int, dialing: int) -> bool:
        return connected + dialing < self.dial_target

    def may_accept(self, connected: int) -> bool:
        return connected < self.max_peers

    def to_dial(
        self,
        candidates: Iterable[A],
        *,
        connected: int,
        dialing: int,
        skip: Callable[[A], bool],
    ) -> list[A]:
        """The candidates to dial now, in the order given: those ``skip`` does not rule
        out (connected, being dialled, banned, ourselves), until the dial target is met.
        Duplicates in ``candidates`` are dialled once."""
        out: list[A] = []
        seen: set[A] = set()
        for candidate in candidates:
            if not self.want_more(connected, dialing + len(out)):
                break
            if candidate in seen or skip(candidate):
                continue
            seen.add(candidate)
            out.append(candidate)
        return out


# --------------------------------------------------------------------------- interest


@dataclass(frozen=True, slots=True)
class InterestPolicy:
    """When to tell a peer we are no longer interested in it.

    BEP 3 says a downloader that has nothing to request from a peer should say so, so
    that a peer with few upload slots gives them to those who will use them. In a cold
    start the peers are leechers of the same layer: a peer we have caught up with gets a
    piece we lack again within milliseconds, and each ``not interested`` came back as an
    ``interested`` (docs/benchmarks.md: ~8 flips per connection, each a message on both
    sides and a rechoke). So toward a *cooperative* peer (a p2pimage node: its choker
    gives every peer a slot by default, and at most a brief one otherwise) interest is
    kept for ``grace_s`` after the peer last had something we need; toward stock
    clients, and once we are complete, it is dropped at once, as BEP 3 asks.
    """

    grace_s: float

    def keep_interest(self, *, idle_s: float, cooperative: bool, complete: bool) -> bool:
        """Whether to stay interested in a peer that has had nothing we need for
        ``idle_s`` seconds."""
        return cooperative and not complete and idle_s < self.grace_s


@dataclass(frozen=True, slots=True)
class HavePolicy:
    """How long a have may wait to leave with the next batch to a peer (one write
    instead of one each: most of a node's small writes were haves).

    A have waits ``delay_s`` only when the peer is interested in us already (it has our
    other pieces to ask for meanwhile), still lacks more than ``tail_pieces`` (in its
    last pieces a have can decide when it finishes), and the piece is not rare: held by
    at most ``rare_holders`` of our peers. A fresh piece spreads hop by hop through the
    haves of its first holders, and a delay there is paid at every hop: its have waits
    only ``rare_delay_s``, enough to leave with the haves of the next piece or two
    (one write for several pieces) and short next to a hop's transfer. A piece that
    other peers can serve already changes little by waiting.

    Only ``rare_fanout`` of the peers that lack a rare piece hear of it that soon
    (:meth:`first_told`, chosen at random); the others as of a common piece. A holder's
    uplink serves a few requesters of its newest piece at a time anyway, and each of
    them tells its own peers soon after: the piece still spreads hop by hop, fanning
    out, while each rare piece costs a few writes and reader wake-ups instead of one
    per peer (most of a node's small writes were these haves: docs/benchmarks.md,
    "Rare haves to a few peers first"). None: every peer hears of it soon.
    """

    delay_s: float
    tail_pieces: int = 8
    rare_holders: int = 1
    rare_delay_s: float = 0.0
    rare_fanout: int | None = None

    def __post_init__(self) -> None:
        if self.rare_fanout is not None and self.rare_fanout < 1:
            raise LocalProtocolError("rare_fanout must be at least 1 (None: every peer)")

    def first_told(self, peers: Sequence[K], holders: int, rng: random.Random) -> Sequence[K]:
        """Of ``peers``, the peers to tell about a piece ``holders`` of our peers hold
        as soon as a rare piece (``first=True`` in :meth:`wait_s`): all of them for a
        common piece, at most ``rare_fanout`` at random for a rare one."""
        fanout = self.rare_fanout
        if fanout is None or holders > self.rare_holders or len(peers) <= fanout:
            return peers
        return rng.sample(peers, fanout)

    def wait_s(self, *, interested: bool, missing: int, holders: int, first: bool = True) -> float:
        """How long a have of a piece ``holders`` of our peers hold, to a peer that lacks
        ``missing`` pieces, may wait (0: at once); ``first``: the peer is one of the
        piece's :meth:`first_told` (else a rare piece's have waits as a common one's)."""
        if self.delay_s <= 0 or not interested or missing <= self.tail_pieces:
            return 0.0
        if holders <= self.rare_holders and first:
            return min(self.rare_delay_s, self.delay_s)
        return self.delay_s


# --------------------------------------------------------------------------- uploading


@dataclass(frozen=True, slots=True)
class UploadOrder:
    """Whose request an uploader serves next, of the peers with requests waiting.

    ``arrival`` (the default): the peer waiting longest first (since its first waiting
    request came, or since it was last served). ``need``: the peer that holds the fewest
    pieces first, ties to the one waiting longest. In arrival order an uploader shares its
    link by the requests each peer keeps queued there, and a peer's pipeline follows
    the rate it already gets: a node that started behind (fewer peers, later in its
    neighbours' queues) stayed behind, and the last node of a 200-node swarm finished
    1.4x the bound after the median at 1.05x. Serving the neediest first lets the ones
    behind catch up at scale, but in a small full mesh it serves the origin fetchers
    (rich in their own range) last everywhere, and they finish last (docs/benchmarks.md,
    "Requests ahead, the neediest first"). A peer kept waiting ``max_wait_s`` goes
    ahead of the need order (the longest waiting first), so no peer starves: its
    requests would time out, and its stall clock (:class:`PeerTimeouts`) would take the
    uploader for a peer that skips its turn. A peer's own requests are always served in
    the order it sent them (it may judge a peer that answers out of order as skipping).
    """

    mode: str = "arrival"
    #: Well under ``SwarmSettings.request_timeout_s`` (15 s).
    max_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in ("need", "arrival"):
            raise LocalProtocolError(f"unknown upload order {self.mode!r}")
        if not self.max_wait_s > 0:
            raise LocalProtocolError("max_wait_s must be positive")

    def key(self, held: int, since: float, now: float) -> tuple[int, float]:
        """Sort key of a waiting peer (lowest first): ``held`` pieces it holds as far as
        we know, waiting ``since`` then (its first waiting request's arrival, or the
        last time it was served)."""
        if self.mode == "arrival" or now - since >= self.max_wait_s:
            return (-1, since)
        return (held, since)

    def next(self, waiting: Iterable[tuple[K, int, float]], now: float) -> K | None:
        """The peer to serve next of ``waiting``: (peer, pieces it holds, waiting since);
        None if nobody waits."""
        best: K | None = None
        best_key: tuple[int, float] | None = None
        for peer, held, since in waiting:
            key = self.key(held, since, now)
            if best_key is None or key < best_key:
                best, best_key = peer, key
        return best


# --------------------------------------------------------------------------- timeouts


@dataclass(frozen=True, slots=True)
class PeerTimeouts:
    """When an outstanding request, or a peer that sends nothing, has taken too long.

    Absolute timeouts misfire on slow links and in starved processes: at 0.5 MiB/s a node
    with 8 requests of 16 KiB at each of 30 peers has asked for ~7 s of its downlink, a
    peer served last stays silent for most of that, and a process that gets a fraction
    of a core stretches every wait (the calibration runs in docs/benchmarks.md lost
    hundreds of connections to "no block for 20 s" on a loaded machine, some nodes
    keeping 1 of 31). So silence is measured against what the others deliver meanwhile:

    - a request times out after the larger of ``request_timeout_s`` and ``factor``
      times the *drain time* (the bytes requested from all peers over the rate they
      deliver together);
    - a peer is stalled once it has been silent for ``stall_timeout_s`` and the other
      peers (and origin reads) delivered either ``factor`` times everything we have
      requested meanwhile (its requests would have been answered in any fair order) or
      nothing for the last ``stall_timeout_s`` (the swarm is stuck, and a peer that
      claims pieces keeps the origin readers off them: the hostage case of
      docs/reliability.md); while the others deliver some but less, it is waiting its
      turn behind them, until ``max_stall_s``.

    A request never waits longer than ``max_stall_s`` either: when nothing arrives, the
    measured rates decay towards zero and the drain time grows without bound.
    """

    request_timeout_s: float
    stall_timeout_s: float
    max_stall_s: float = 120.0
    # Requests are answered in turn with other peers' and other swarms' data: a block
    # may come last in a full drain, and rates measured over ~2 s lag behind bursts.
    factor: float = 3.0

    @staticmethod
    def drain_s(outstanding_bytes: int, download_rate: float) -> float:
        """Seconds to receive ``outstanding_bytes`` at ``download_rate`` (0: unknown)."""
        if outstanding_bytes <= 0 or download_rate <= 0:
            return 0.0
        return outstanding_bytes / download_rate

    def request_timeout(self, drain_s: float) -> float:
        """An outstanding request older than this goes back to the pool."""
        return min(max(self.request_timeout_s, self.factor * drain_s), self.max_stall_s)

    def stalled(
        self, *, silent_s: float, others_bytes: int, outstanding_bytes: int, swarm_silent_s: float
    ) -> bool:
        """Whether a peer with requests outstanding, silent for ``silent_s`` while the
        other peers sent ``others_bytes``, is to be dropped; ``outstanding_bytes``: all
        that is requested from all peers now; ``swarm_silent_s``: since anything (a
        block from any peer, an origin read) last arrived."""
        if silent_s > self.max_stall_s:
            return True
        if silent_s <= self.stall_timeout_s:
            return False
        return (
            swarm_silent_s > self.stall_timeout_s
            or others_bytes <= 0
            or others_bytes >= self.factor * outstanding_bytes
        )


# --------------------------------------------------------------------------- origin reveal


class RevealPolicy(Generic[K]):
    """Which peer hears first of a piece this node read from the registry.

    Each origin piece is revealed (``have``) to one peer only, the one with the fewest
    revealed pieces it has not yet passed on: that peer fetches it and relays it, so the
    fetcher's uplink carries the first copy of each origin piece rather than many copies
    of the newest one (the rarest piece, which every peer would ask for). Like BEP 16
    super-seeding, but only for pieces this node alone holds. A piece is shown to
    everyone once another peer announces it (:meth:`peer_has`) or ``timeout_s`` after it
    was revealed (:meth:`expired`).
    """

    def __init__(self, *, enabled: bool, timeout_s: float, rng: random.Random) -> None:
        if timeout_s < 0:
            raise LocalProtocolError("reveal timeout must be >= 0")
        self.enabled = enabled
        self.timeout_s = timeout_s
        self._rng = rng
        self._hidden: dict[int, tuple[K, float]] = {}  # piece -> (told, when)
        self._pending: dict[K, int] = {}  # peer -> hidden pieces revealed to it

    @property
    def hidden(self) -> frozenset[int]:
        """Pieces shown to one peer only (leave them out of bitfields to others)."""
        return frozenset(self._hidden)

    def is_hidden(self, index: int) -> bool:
        return index in self._hidden

    def reveal(self, index: int, candidates: Sequence[K], now: float) -> K | None:
        """A piece arrived from the registry. ``candidates``: the connected peers that do
        not have it. Returns the one peer to tell, or None: tell every peer."""
        if not self.enabled or not candidates or index in self._hidden:
            return None
        pending = self._pending
        target = min(candidates, key=lambda k: (pending.get(k, 0), self._rng.random()))
        pending[target] = pending.get(target, 0) + 1
        self._hidden[index] = (target, now)
        return target

    def peer_has(self, index: int) -> K | None:
        """A peer announced ``index``: if it was hidden, it is now shown to everyone.
        Returns the peer it had been revealed to (already told), or None if it was not
        hidden."""
        return self._show(index) if index in self._hidden else None

    def expired(self, now: float) -> list[tuple[int, K]]:
        """Hidden pieces whose timeout passed: show them to everyone now. Each item is
        (piece, the peer already told)."""
        due = [i for i, (_, at) in self._hidden.items() if now - at > self.timeout_s]
        out: list[tuple[int, K]] = []
        for index in due:
            told = self._show(index)
            if told is not None:
                out.append((index, told))
        return out

    def peer_lost(self, key: K) -> list[int]:
        """``key`` disconnected: the pieces revealed only to it are shown to everyone
        (returned), since nobody else will pass them on."""
        pieces = [i for i, (k, _) in self._hidden.items() if k == key]
        for index in pieces:
            self._show(index)
        return pieces

    def _show(self, index: int) -> K | None:
        entry = self._hidden.pop(index, None)
        if entry is None:
            return None
        told = entry[0]
        left = self._pending.get(told, 0) - 1
        if left > 0:
            self._pending[told] = left
        else:
            self._pending.pop(told, None)
        return told


# A registry read on a capped downlink covers this much of the link's time, so a piece
# reaches the swarm once its own bytes are here: reads of 256 KiB at 1 MiB/s held each
# 32 KiB piece back for up to 0.25 s, and the swarm's first piece for ~0.45 s.
ORIGIN_READ_S = 1 / 32
# ... but never less than this (per-read CPU; 16 KiB is the smallest piece).
ORIGIN_MIN_READ_BYTES = 16 * 1024


class OriginShare:
    """How many bytes a fetcher may keep asked of its peers while it reads the registry.

    Registry reads go first on the node's capped downlink (``Swarm.pace_download``). A
    block asked of a peer beyond what those reads leave of the link waits until they
    end, and so does everything that peer sends behind it on the same connection: its
    requests for the pieces the fetcher just read. With origin reads taking the whole
    link (16 nodes at 1 MiB/s, two fetchers sharing a 2 MiB/s registry), the fetcher's
    uplink, the only source of the first copies, idled, and a fresh piece reached a
    second node after a median 2.8-3.2 s (docs/benchmarks.md, "Calibration"). So while
    registry bytes flow, a fetcher keeps at most ``queue_time_s`` of the link's
    remainder (the downlink rate less the registry's rate over the last ``window_s``)
    asked of its peers; with no cap, or no registry bytes in the window, no limit.
    """

    def __init__(self, down_rate: float | None, *, window_s: float = 1.0) -> None:
        if window_s <= 0:
            raise LocalProtocolError("window must be positive")
        self.down_rate = down_rate
        self.window_s = window_s
        self._reads: deque[tuple[float, int]] = deque()  # (when, bytes) in the window
        self._bytes = 0
        self._since = 0.0  # the first read since the window was last empty

    def read(self, nbytes: int, now: float) -> None:
        """``nbytes`` registry bytes passed the downlink at ``now``."""
        if self.down_rate is None:
            return
        self._expire(now)
        if not self._reads:
            self._since = now
        self._reads.append((now, nbytes))
        self._bytes += nbytes

    def _expire(self, now: float) -> None:
        reads = self._reads
        while reads and reads[0][0] <= now - self.window_s:
            self._bytes -= reads.popleft()[1]

    def origin_rate(self, now: float) -> float:
        """The registry's bytes per second on the downlink over the last window (in the
        first window of a spell of reads, over the spell: a high estimate, the safe side)."""
        self._expire(now)
        if not self._reads:
            return 0.0
        span = min(self.window_s, now - self._since)
        return self._bytes / max(span, 1e-3)

    def read_size(self, largest: int) -> int:
        """Bytes per registry read: ``ORIGIN_READ_S`` of a capped downlink, at least
        ``ORIGIN_MIN_READ_BYTES``, at most ``largest`` (the reader's own unit)."""
        if self.down_rate is None:
            return largest
        return max(ORIGIN_MIN_READ_BYTES, min(largest, int(self.down_rate * ORIGIN_READ_S)))

    def peer_budget(self, now: float, queue_time_s: float) -> float | None:
        """Bytes the fetcher may have outstanding at all its peers together (None: no
        limit)."""
        if self.down_rate is None:
            return None
        rate = self.origin_rate(now)
        if rate <= 0:
            return None
        return max(0.0, self.down_rate - rate) * queue_time_s


# --------------------------------------------------------------------------- announcing


@dataclass(slots=True)
class AnnounceSchedule:
    """When a swarm announces next, and which event it sends.

    ``started`` first; the normal interval the tracker gave (at least 1 s); while the swarm
    is incomplete, short of ``want_peers`` and connected to fewer peers than the tracker
    counts other members, every ``hungry_interval_s`` (or the tracker's ``min
    interval``, if larger); at once on news (completion, close, origin
    progress worth a lease renewal), but never sooner than ``min_gap_s`` after the last
    announce; ``completed`` once. After a failure, retry after ``retry_s``, doubling up to
    ``retry_max_s``.
    """

    hungry_interval_s: float = 1.0
    want_peers: int = 20  # AnnounceSettings.schedule passes the swarm's dial target
    retry_s: float = 1.0
    retry_max_s: float = 30.0
    min_gap_s: float = 0.1
    started_sent: bool = False
    completed_sent: bool = False
    _retry: float | None = None

    def event(self, complete: bool) -> Event:
        """The event of the next announce."""
        if not self.started_sent:
            return Event.STARTED
        if complete and not self.completed_sent:
            return Event.COMPLETED
        return Event.NONE

    def succeeded(
        self,
        event: Event,
        *,
        interval: float,
        min_interval: float | None,
        complete: bool,
        peers: int,
        members: int = 0,
    ) -> float:
        """The announce carrying ``event`` was answered: seconds until the next one
        (news may shorten it, down to ``min_gap_s``). ``peers``: connected now;
        ``members``: the tracker's count of the swarm's members, us included
        (``complete + incomplete``; 0: not counted). A swarm connected to every other
        member has nobody more to ask for: it is not hungry, however small."""
        self._retry = None
        if event is Event.STARTED:
            self.started_sent = True
        elif event is Event.COMPLETED:
            self.completed_sent = True
        wait = float(max(interval, 1))
        others = members - 1 if members > 0 else math.inf
        if not complete and peers < self.want_peers and peers < others:
            wait = max(self.hungry_interval_s, float(min_interval or 0))
        return wait

    def failed(self) -> float:
        """The announce failed: seconds until the retry."""
        wait = self.retry_s if self._retry is None else min(self._retry * 2, self.retry_max_s)
        self._retry = wait
        return wait


# --------------------------------------------------------------------------- origin reads


@dataclass(frozen=True, slots=True)
class OriginStep:
    """The answer of :meth:`OriginRange.next_request`: pieces ``[start, stop)`` to read
    next (None: the range is done), and a range to give back to the peers, if any."""

    read: tuple[int, int] | None
    give_back: tuple[int, int] | None


class OriginRange:
    """An origin fetcher's range ``[first, end)`` of pieces to read from the registry, and
    the rules for reading it: skip pieces already here, stop where a peer already holds
    a piece (the tracker gave the rest of the range to another fetcher and we have not
    heard yet), group consecutive pieces into requests of at most ``max_request_bytes``,
    and ask the tracker to renew the lease halfway through it, so the renewal arrives
    before the reader reaches the end and reading never pauses.

    The caller reserves ``[first, end)`` for the registry in its picker, and gives back to
    the peers every range that :meth:`shrink` returns.
    """

    def __init__(self, first: int, end: int) -> None:
        if not 0 <= first <= end:
            raise LocalProtocolError(f"bad origin range [{first}, {end})")
        self.first = first
        self.end = end
        self.next_index = first
        self._renew_at = first + (end - first) // 2

    @property
    def done(self) -> bool:
        return self.next_index >= self.end

    def shrink(self, end: int) -> tuple[int, int] | None:
        """Stop at ``end`` (the tracker gave ``[end, old end)`` away, or we stop): the
        range to hand back to the peers, if any."""
        if end >= self.end:
            return None
        new_end = max(end, self.next_index)
        returned = (new_end, self.end)
        self.end = new_end
        return returned if returned[0] < returned[1] else None

    def extend(self, end: int) -> tuple[int, int] | None:
        """The tracker renewed the lease up to ``end``: the newly reserved range."""
        if end <= self.end:
            return None
        added = (self.end, end)
        self.end = end
        self._renew_at = self.next_index + (end - self.next_index) // 2
        return added

    def next_request(
        self,
        has_piece: Callable[[int], bool],
        held_by_peer: Callable[[int], bool],
        piece_size: Callable[[int], int],
        max_request_bytes: int,
    ) -> OriginStep:
        """The pieces to read in the next request (consecutive missing pieces, up to
        ``max_request_bytes``), or none: the range is done, read or stopped where a peer
        already holds a piece (``give_back`` is then the unread rest, for the peers)."""
        index = self.next_index
        while index < self.end and has_piece(index):
            index += 1
        self.next_index = index
        give_back = None
        if index < self.end and held_by_peer(index):
            give_back = self.shrink(index)
        if index >= self.end:
            return OriginStep(None, give_back)
        stop = index + 1
        span = piece_size(index)
        while (
            stop < self.end
            and not has_piece(stop)
            and not held_by_peer(stop)
            and span + piece_size(stop) <= max_request_bytes
        ):
            span += piece_size(stop)
            stop += 1
        return OriginStep((index, stop), None)

    def piece_arrived(self, index: int, *, have: bool, held_by_peer: bool) -> bool:
        """Piece ``index`` of the current request was read. True: store it; False: stop
        reading (it was stolen while in flight, or a peer holds it: the rest of the range
        went to another fetcher; call :meth:`shrink` with ``index``)."""
        if index >= self.end:
            return False
        return not (held_by_peer and not have)

    def advanced(self, index: int) -> bool:
        """Piece ``index`` was stored: True if now is the time to renew the lease."""
        self.next_index = index + 1
        if self.next_index >= self._renew_at:
            self._renew_at = self.end + 1  # once per lease
            return True
        return False


@dataclass(frozen=True, slots=True)
class OriginFollow:
    """What a fetcher does on the tracker's answer (:func:`follow_origin`).

    ``action``: ``"none"`` (not a fetcher, nothing running), ``"stop"`` (stop the current
    range where it is), ``"shrink"`` / ``"extend"`` the current range to ``end``, or
    ``"start"`` a new range ``[first, end)`` (stopping the current one first, if any).
    """

    action: str
    first: int = 0
    end: int = 0


def follow_origin(
    current: OriginRange | None, current_url: str | None, origin: OriginAssignment | None
) -> OriginFollow:
    """The fetcher's rule for the tracker's origin assignment.

    The tracker names our unfetched remainder ``[first, end)`` on every answer while we
    are a fetcher (the lease end when it gives one). Inside the current range: the tail
    was stolen, shrink. A lease renewal of the range we read: extend. No assignment: stop
    reading (the range went elsewhere). A range elsewhere: start it.
    """
    if origin is None:
        return OriginFollow("none" if current is None else "stop")
    read_end = origin.read_end
    if current is not None and current_url == origin.url:
        if current.first <= origin.first_piece and read_end <= current.end:
            return OriginFollow("shrink", end=read_end)
        if origin.first_piece <= current.next_index < read_end:
            return OriginFollow("extend", end=read_end)
    return OriginFollow("start", first=origin.first_piece, end=read_end)
