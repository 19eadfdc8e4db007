"""Which blocks to request next, from which peer: the swarm's piece picker.

A pure policy, in the manner of libtorrent's ``piece_picker``: it sees availability,
priorities, deadlines and the requests in flight, and answers "which blocks next". It does
no I/O, never reads a clock (callers pass ``now``) and draws randomness only from the
injected :class:`random.Random`, so the swarm engine, the tests, the benchmarks and the
discrete-event simulator all run the very same code.

Order of preference in :meth:`PiecePicker.pick`:

1. the piece the reader is blocked on (:meth:`PiecePicker.set_blocked`);
2. the streaming window and explicit deadlines, earliest deadline first, taken by peers
   fast enough to meet the deadline; an urgent request that is late (past its
   ``expected_by``) may be duplicated on a peer with room (time-critical duplicate);
3. pieces already partly requested (finish what is started);
4. while we hold fewer than ``random_first_pieces`` pieces, a uniformly random piece;
5. rarest first, uniform random among the rarest;
6. endgame: once every missing block is requested, a peer with fewer than
   ``min_pipeline`` requests outstanding duplicates blocks that are late at other peers;
   :meth:`PiecePicker.block_received` returns the duplicates to cancel.

Cost model. Piece sets are Python ints used as bitsets (piece ``i`` is bit
``num_pieces - 1 - i``, the order of a BEP 3 bitfield read big-endian, so a wire bitfield
converts with one ``int.from_bytes``). Availability is kept as binary bit-planes: plane
``k`` holds bit ``k`` of every piece's count, so adding a peer's whole bitfield is a
ripple-carry add of O(log peers) bitset operations, and "the rarest of these candidate
pieces" is O(log peers) bitset operations too. No call loops over all pieces in Python;
per-block calls are O(1) plus a few bitset operations (each a C loop over
``num_pieces / 30`` machine words).
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.wire import BLOCK_LENGTH

__all__ = ["BlockRequest", "PickerSettings", "PiecePicker"]

P = TypeVar("P", bound=Hashable)

# Per-block states in _Piece.state (a bytearray, so the search for a free block is
# bytearray.find, a C loop).
_FREE: Final = 0
_REQUESTED: Final = 1
_RECEIVED: Final = 2


@dataclass(frozen=True, slots=True, order=True)
class BlockRequest:
    """One block to request: ``length`` bytes at offset ``begin`` of piece ``index``."""

    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class PickerSettings:
    """Tunables of :class:`PiecePicker`: libtorrent's choices, except the request queue,
    which is sized for a cluster network rather than the internet."""

    #: Pick uniformly random pieces until we hold this many, so that a newcomer soon has
    #: something to trade (libtorrent: ``initial_picker_threshold`` = 4).
    random_first_pieces: int = 4
    #: At most this many *extra* peers may be asked for one block (endgame and
    #: time-critical duplicates); a block is never outstanding at more than 1 + this.
    max_duplicates: int = 2
    #: Seconds of data to keep requested from a peer (libtorrent: ``request_queue_time``
    #: = 3, for internet round trips). Inside a cluster the round trip is a millisecond, so
    #: anything queued beyond a fraction of a second is latency, not throughput: every
    #: block waits behind the whole queue at its uploader, and a fresh piece crosses the
    #: swarm in about log2(N) such hops. Fast links are unaffected: their depth is capped
    #: by ``max_pipeline`` either way. Measurements: docs/benchmarks.md, "Tuned defaults".
    request_queue_time: float = 1.0
    #: Pipeline depth for a peer whose rate is unknown or tiny (libtorrent starts a new
    #: peer at 4 outstanding requests and grows it; 8 keeps a LAN link busy sooner).
    #: Measurements: docs/benchmarks.md, "Tuned defaults".
    min_pipeline: int = 8
    #: Upper bound on the pipeline (libtorrent: ``max_out_request_queue`` = 500).
    #: Both bounds count 16 KiB blocks (DEFAULT_BLOCK_SIZE): with larger blocks they
    #: shrink in proportion (never under 1), so the bytes in flight stay the same. (A
    #: floor of 2 doubled them for 256 KiB blocks: with 31 slow peers each node asked
    #: for 2 x 31 x 256 KiB, a 16 MiB layer's every piece at once, and each uplink's queue
    #: held ~4 s of requests, a wait paid at every hop a piece makes through the swarm:
    #: docs/benchmarks.md, "The 32-node swarm".)
    max_pipeline: int = 500
    #: Slow start, as TCP's window: until a peer's rate is first measured (the first
    #: :meth:`PiecePicker.update_rate` above zero; the engine measures at its 0.5 s
    #: ticks), its depth starts at the floor and grows by one block per block it delivers
    #: after its first, up to ``max_pipeline``; from then on it follows the rate. So a
    #: fast peer's link fills within a few round trips instead of running stop-and-wait
    #: at the one-block floor until the first tick (a 128 MiB pair transfer lasts
    #: ~0.6 s), while a slow peer keeps the floor: one that delivers at most one block
    #: before its rate is known (under ~2 blocks a tick, where the rate would ask for
    #: about the floor anyway) never grows. Growing on the first block too cost the
    #: simulator's 32-node rows 1-6 % (docs/benchmarks.md, "Pair: the evening's
    #: regression").
    slow_start: bool = True
    #: A request is late once it has been outstanding this many times longer than the
    #: peer's rate and queue predicted; late urgent requests may be duplicated.
    timeout_factor: float = 2.0
    #: A peer at least this fraction as fast as the fastest known peer is "fast" and may
    #: take any urgent piece; slower peers take one only if they can meet its deadline.
    fast_peer_fraction: float = 0.5


class _Peer(Generic[P]):
    """What the picker knows of one peer, but its pieces (``PiecePicker._bitsets``)."""

    __slots__ = ("delivered", "key", "rate", "requests")

    def __init__(self, key: P, slow_start: bool) -> None:
        self.key = key
        self.rate = 0.0  # bytes/s we receive from it, as reported by the caller
        # Blocks it delivered while in slow start (until its rate is first measured);
        # -1 once out of slow start.
        self.delivered = 0 if slow_start else -1
        # (piece, block number) -> its request, in the order the requests were made
        self.requests: dict[tuple[int, int], _Request[P]] = {}


class _Request(Generic[P]):
    """One peer's outstanding request for one block."""

    __slots__ = ("expected_by", "live", "peer", "requested_at")

    def __init__(self, peer: _Peer[P], requested_at: float, expected_by: float) -> None:
        self.peer = peer
        self.requested_at = requested_at
        self.expected_by = expected_by
        # Still outstanding: cleared when the request is answered, cancelled or dropped,
        # so that the expiry heap tells a stale entry without a lookup in its peer.
        self.live = True


class _Piece(Generic[P]):
    """Download state of a piece with at least one block requested or received."""

    __slots__ = ("blocks", "num_free", "num_received", "requests", "sources", "state")

    def __init__(self, num_blocks: int) -> None:
        self.state = bytearray(num_blocks)  # all _FREE
        # Its BlockRequests, made once each: a block is asked for, cancelled and asked
        # again; a frozen dataclass costs a microsecond to build (half of a pick at scale).
        self.blocks: list[BlockRequest | None] = [None] * num_blocks
        self.num_free = num_blocks
        self.num_received = 0
        self.requests: dict[int, list[_Request[P]]] = {}  # block number -> requesters
        self.sources: set[P] = set()  # peers that delivered blocks of it


#: Torrents of up to this many pieces share one table of their single-bit masks
#: (:func:`_piece_bits`; 4,096 pieces: ~1.1 MiB of ints, once per piece count). The
#: sidecar cuts at most ``TARGET_MAX_PIECES`` (2,000) below ~32 GiB.
_PIECE_BITS_TABLE_MAX: Final = 4096


class _ShiftedBits:
    """``_piece_bits`` of a torrent too large for a shared table: computed per call."""

    def __init__(self, num_pieces: int) -> None:
        self._n1 = num_pieces - 1

    def __getitem__(self, index: int) -> int:
        return 1 << (self._n1 - index)


@functools.lru_cache(maxsize=8)
def _piece_bits(num_pieces: int) -> tuple[int, ...] | _ShiftedBits:
    """Piece ``i``'s bit in a piece set (``1 << (num_pieces - 1 - i)``), by index: a
    tuple shared by every picker of that many pieces. The per-have and per-peer bit
    tests and updates (the simulator's commonest calls) then look the bit up instead of
    building a new ``num_pieces``-bit int by a shift each time."""
    if num_pieces > _PIECE_BITS_TABLE_MAX:
        return _ShiftedBits(num_pieces)
    n1 = num_pieces - 1
    return tuple(1 << (n1 - i) for i in range(num_pieces))


def _nth_set_bit(mask: int, n: int) -> int:
    """Position of the ``n``-th (from 0, counting from the least significant) set bit."""
    if n < 8:
        # Few bits to skip (the rarest pieces are often few): clear the lowest n set bits.
        for _ in range(n):
            mask &= mask - 1
        return (mask & -mask).bit_length() - 1
    lo, hi = 0, mask.bit_length()
    # Invariant: fewer than n+1 set bits below lo, more than n below hi.
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if (mask & ((1 << mid) - 1)).bit_count() > n:
            hi = mid
        else:
            lo = mid
    return lo


class PiecePicker(Generic[P]):
    """Piece and block selection for one torrent. Peers are opaque hashable keys.

    A peer becomes known at its first mention (``peer_bitfield``, ``peer_have``,
    ``update_rate``, ``pick``...) and is forgotten by :meth:`peer_lost`.
    """

    # Slots: the attributes live in the object itself, not in a separate values array
    # (one memory access fewer per call where pickers are many and cold: the simulator's
    # have broadcast touches a random one of 5,000 per have).
    __slots__ = (
        "_best_peer",
        "_best_rate",
        "_bits",
        "_bitsets",
        "_blocked",
        "_blocks_per_piece",
        "_busy",
        "_cursor_deadlines",
        "_expiry",
        "_expiry_seq",
        "_explicit_deadlines",
        "_full",
        "_have",
        "_last_piece_length",
        "_late",
        "_max_pipeline",
        "_min_pipeline",
        "_num_have",
        "_open",
        "_outstanding",
        "_partial",
        "_peers",
        "_pieces",
        "_planes",
        "_rng",
        "_slow_start",
        "_urgent",
        "_urgent_dirty",
        "_wanted",
        "block_size",
        "num_pieces",
        "piece_length",
        "settings",
        "total_length",
    )

    def __init__(
        self,
        num_pieces: int,
        piece_length: int,
        total_length: int,
        block_size: int = BLOCK_LENGTH,
        rng: random.Random | None = None,
        settings: PickerSettings | None = None,
    ) -> None:
        if piece_length <= 0 or block_size <= 0 or total_length <= 0:
            raise LocalProtocolError("piece_length, block_size and total_length must be > 0")
        if num_pieces != -(-total_length // piece_length):
            raise LocalProtocolError(
                f"{num_pieces} pieces of {piece_length} bytes cannot hold {total_length} bytes"
            )
        self.num_pieces: Final = num_pieces
        self.piece_length: Final = piece_length
        self.total_length: Final = total_length
        self.block_size: Final = block_size
        self.settings: Final = settings if settings is not None else PickerSettings()
        self._rng = rng if rng is not None else random.Random()
        self._last_piece_length = total_length - (num_pieces - 1) * piece_length
        self._blocks_per_piece = -(-piece_length // block_size)
        scale = min(1.0, BLOCK_LENGTH / block_size)
        self._min_pipeline = max(1, math.ceil(self.settings.min_pipeline * scale))
        self._max_pipeline = max(self._min_pipeline, math.ceil(self.settings.max_pipeline * scale))
        self._slow_start = self.settings.slow_start
        self._full = (1 << num_pieces) - 1
        self._bits: Final = _piece_bits(num_pieces)  # piece index -> its bit

        self._peers: dict[P, _Peer[P]] = {}
        # Each known peer's pieces, as a bitset, by the same keys as ``_peers``: apart
        # from the peer's other state, so that the per-HAVE update and the "who lacks
        # this piece" scan read one dict and the ints, not a peer object each.
        self._bitsets: dict[P, int] = {}
        self._planes: list[int] = []  # availability counts as bit-planes
        self._pieces: dict[int, _Piece[P]] = {}  # pieces being downloaded
        self._have = 0  # verified pieces
        self._num_have = 0
        self._wanted = self._full  # missing pieces with priority > 0
        self._open = self._full  # missing pieces with no download state
        self._partial = 0  # pieces with download state and a free block
        self._busy = 0  # download state, no free block, some block still requested
        self._outstanding = 0  # outstanding (peer, block) requests, duplicates included
        # Which requests are late, for the endgame without a scan of every busy piece:
        # requests not yet known late in a heap by ``expected_by``, and the pieces that may
        # have a late one (a superset: cleared when a piece has no request left).
        self._expiry: list[tuple[float, int, int, int, _Request[P]]] = []
        self._expiry_seq = 0
        self._late = 0

        self._blocked: int | None = None
        self._explicit_deadlines: dict[int, float] = {}
        self._cursor_deadlines: dict[int, float] = {}
        self._urgent: list[tuple[float, int]] = []  # (deadline, piece), sorted
        self._urgent_dirty = False
        self._best_rate = 0.0
        self._best_peer: P | None = None

    # ------------------------------------------------------------------ geometry

    def piece_size(self, index: int) -> int:
        """Length in bytes of piece ``index`` (the last one may be short)."""
        return self._last_piece_length if index == self.num_pieces - 1 else self.piece_length

    def blocks_in_piece(self, index: int) -> int:
        return -(-self.piece_size(index) // self.block_size)

    def _block(self, index: int, block: int) -> BlockRequest:
        begin = block * self.block_size
        plen = self._last_piece_length if index == self.num_pieces - 1 else self.piece_length
        return BlockRequest(index, begin, min(self.block_size, plen - begin))

    def _piece_block(self, index: int, dl: _Piece[P], block: int) -> BlockRequest:
        """``_block`` for a piece with download state, built once."""
        request = dl.blocks[block]
        if request is None:
            request = dl.blocks[block] = self._block(index, block)
        return request

    def _bit(self, index: int) -> int:
        if not 0 <= index < self.num_pieces:
            raise LocalProtocolError(f"piece index {index} out of range 0..{self.num_pieces - 1}")
        return self._bits[index]

    def _range_mask(self, start: int, stop: int) -> int:
        if not 0 <= start <= stop <= self.num_pieces:
            raise LocalProtocolError(f"bad piece range [{start}, {stop})")
        # pieces start..stop-1 are bits num_pieces-stop .. num_pieces-1-start
        return ((1 << (stop - start)) - 1) << (self.num_pieces - stop)

    # ------------------------------------------------------------------ availability

    def _peer(self, key: P) -> _Peer[P]:
        ps = self._peers.get(key)
        if ps is None:
            ps = self._peers[key] = _Peer(key, self._slow_start)
            self._bitsets[key] = 0
        return ps

    def _avail_add(self, mask: int) -> None:
        planes = self._planes
        carry = mask
        k = 0
        while carry:
            if k == len(planes):
                planes.append(carry)
                return
            p = planes[k]
            planes[k] = p ^ carry
            carry &= p
            k += 1

    def _avail_sub(self, mask: int) -> None:
        planes = self._planes
        borrow = mask
        k = 0
        while borrow:
            p = planes[k]
            planes[k] = p ^ borrow
            borrow &= ~p
            k += 1
        while planes and not planes[-1]:
            planes.pop()

    def _set_peer_bits(self, ps: _Peer[P], bits: int) -> None:
        old = self._bitsets[ps.key]
        if old & ~bits:
            self._avail_sub(old & ~bits)
        if bits & ~old:
            self._avail_add(bits & ~old)
        self._bitsets[ps.key] = bits

    def peer_bitfield(self, peer: P, have: bytes | bytearray | memoryview) -> None:
        """The peer's BEP 3 bitfield message payload (piece 0 = high bit of byte 0).

        Replaces what we knew of the peer. Raises :class:`RemoteProtocolError` if the
        length is wrong or a spare bit is set (BEP 3 says to drop such a peer).
        """
        data = bytes(have)
        nbytes = -(-self.num_pieces // 8)
        if len(data) != nbytes:
            raise RemoteProtocolError(f"bitfield of {len(data)} bytes, expected {nbytes}")
        value = int.from_bytes(data, "big")
        spare = nbytes * 8 - self.num_pieces
        if value & ((1 << spare) - 1):
            raise RemoteProtocolError("bitfield has spare bits set")
        self._set_peer_bits(self._peer(peer), value >> spare)

    def peer_have(self, peer: P, index: int) -> None:
        """The peer announced piece ``index`` (HAVE). Repeats are harmless."""
        # _bit, _peer and _avail_add inlined: one call per HAVE, the commonest event of a
        # swarm (each piece a node gets is announced to all its peers).
        if not 0 <= index < self.num_pieces:
            self._bit(index)  # raises
        bit = self._bits[index]
        bits = self._bitsets.get(peer)
        if bits is None:
            self._peers[peer] = _Peer(peer, self._slow_start)
            bits = 0
        if not bits & bit:
            self._bitsets[peer] = bits | bit
            planes = self._planes
            k = 0
            while bit:
                if k == len(planes):
                    planes.append(bit)
                    return
                p = planes[k]
                planes[k] = p ^ bit
                bit &= p
                k += 1

    def peer_have_all(self, peer: P) -> None:
        """The peer has every piece (BEP 6 HAVE ALL, or a seed)."""
        self._set_peer_bits(self._peer(peer), self._full)

    def peer_lost(self, peer: P) -> None:
        """The peer disconnected: its availability and its requests return to the pool."""
        ps = self._peers.get(peer)
        if ps is None:
            return
        self._drop_all_requests(ps)
        self._avail_sub(self._bitsets.pop(peer))
        del self._peers[peer]
        if self._best_peer == peer:
            self._recompute_best_rate()

    def peer_choked(self, peer: P) -> None:
        """The peer choked us: BEP 3 says it discards our requests, so they return to
        the pool. Its availability and rate are kept."""
        ps = self._peers.get(peer)
        if ps is not None:
            self._drop_all_requests(ps)

    def request_timed_out(self, peer: P, block: BlockRequest) -> None:
        """Give up on one request (a timeout, or a BEP 6 REJECT): the block returns to
        the pool unless another peer also has it outstanding. A late arrival is still
        accepted by :meth:`block_received`. Unknown requests are ignored."""
        ps = self._peers.get(peer)
        if ps is None:
            return
        key = (block.index, block.begin // self.block_size)
        if key in ps.requests:
            self._drop_request(ps, key)

    def update_rate(self, peer: P, bytes_per_s: float) -> None:
        """The measured rate at which we receive payload from the peer."""
        ps = self._peer(peer)
        ps.rate = max(0.0, float(bytes_per_s))
        if ps.rate > 0.0:
            ps.delivered = -1  # measured: slow start is over
        if ps.rate >= self._best_rate:
            self._best_rate, self._best_peer = ps.rate, peer
        elif self._best_peer == peer:
            self._recompute_best_rate()

    def _recompute_best_rate(self) -> None:
        self._best_rate, self._best_peer = 0.0, None
        for key, ps in self._peers.items():
            if ps.rate > self._best_rate:
                self._best_rate, self._best_peer = ps.rate, key

    def pipeline_depth(self, peer: P) -> int:
        """How many requests to keep outstanding at the peer: ``request_queue_time``
        seconds of data at its measured rate, within ``[min_pipeline, max_pipeline]``;
        before its rate is first measured, the slow-start window: the floor plus one per
        block it delivered after its first, up to ``max_pipeline``
        (``PickerSettings.slow_start``)."""
        ps = self._peers.get(peer)
        if ps is None:
            return self._min_pipeline
        if ps.delivered >= 0:  # slow start
            return min(self._max_pipeline, self._min_pipeline + max(0, ps.delivered - 1))
        rate = ps.rate
        s = self.settings
        depth = math.ceil(rate * s.request_queue_time / self.block_size)
        return max(self._min_pipeline, min(self._max_pipeline, depth))

    # ------------------------------------------------------------------ our progress

    def we_have(self, index: int) -> list[tuple[P, BlockRequest]]:
        """Piece ``index`` verified (or arrived another way, e.g. an origin read).

        Returns requests still outstanding for its blocks, to cancel; they are
        forgotten. Clears the piece's deadline, and the blocked piece if it was this one.
        """
        bit = self._bit(index)
        if self._have & bit:
            return []
        cancels: list[tuple[P, BlockRequest]] = []
        dl = self._pieces.pop(index, None)
        if dl is not None:
            for block, reqs in dl.requests.items():
                for r in reqs:
                    del r.peer.requests[(index, block)]
                    r.live = False
                    cancels.append((r.peer.key, self._piece_block(index, dl, block)))
                self._outstanding -= len(reqs)
        self._have |= bit
        self._num_have += 1
        self._late &= ~bit
        self._wanted &= ~bit
        self._open &= ~bit
        self._partial &= ~bit
        self._busy &= ~bit
        if self._explicit_deadlines.pop(index, None) is not None:
            self._urgent_dirty = True
        if self._cursor_deadlines.pop(index, None) is not None:
            self._urgent_dirty = True
        if self._blocked == index:
            self._blocked = None
        return cancels

    def piece_failed(self, index: int) -> frozenset[P]:
        """Piece ``index`` failed its hash check: its received blocks become requestable
        again (requests still in flight stay). Returns the peers that sent its blocks,
        for the caller's ban policy."""
        self._bit(index)
        dl = self._pieces.get(index)
        if dl is None:
            return frozenset()
        sources = frozenset(dl.sources)
        dl.sources.clear()
        state = dl.state
        for block in range(len(state)):
            if state[block] == _RECEIVED:
                state[block] = _FREE
        dl.num_free += dl.num_received
        dl.num_received = 0
        self._refresh(index, dl)
        return sources

    def block_received(self, peer: P, index: int, begin: int) -> list[tuple[P, BlockRequest]]:
        """A block arrived from ``peer``. Returns the other peers' requests for the same
        block, to cancel (endgame and time-critical duplicates); they are forgotten.

        Unrequested blocks (late after a timeout, or unsolicited) are accepted if the
        piece is still missing; repeats of a received block change nothing. Raises
        :class:`RemoteProtocolError` if (index, begin) is not a block of this torrent.
        """
        if not 0 <= index < self.num_pieces:
            raise RemoteProtocolError(f"block of piece {index}, out of range")
        plen = self.piece_size(index)
        if begin < 0 or begin >= plen or begin % self.block_size:
            raise RemoteProtocolError(f"block at offset {begin} of piece {index}")
        sender = self._peers.get(peer)
        if sender is not None and 0 <= sender.delivered < self._max_pipeline:
            sender.delivered += 1  # slow start: one more in flight per block (see settings)
        bit = self._bits[index]
        if self._have & bit:
            return []
        block = begin // self.block_size
        dl = self._pieces.get(index)
        if dl is None:
            dl = self._pieces[index] = _Piece(self.blocks_in_piece(index))
            self._open &= ~bit
        if dl.state[block] == _RECEIVED:
            return []
        cancels: list[tuple[P, BlockRequest]] = []
        reqs = dl.requests.pop(block, None)
        if reqs is None:
            dl.num_free -= 1
        else:
            self._outstanding -= len(reqs)
            for r in reqs:
                del r.peer.requests[(index, block)]
                r.live = False
                if r.peer.key != peer:
                    cancels.append((r.peer.key, self._piece_block(index, dl, block)))
        dl.state[block] = _RECEIVED
        dl.num_received += 1
        dl.sources.add(peer)
        self._refresh(index, dl)
        return cancels

    # ------------------------------------------------------------------ priorities

    def set_priority(self, index: int, priority: int) -> None:
        """0: never request piece ``index`` from peers (it comes from elsewhere, e.g. an
        origin range read); 1: normal. Requests already in flight are left alone."""
        self.set_range_priority(index, index + 1, priority)

    def set_range_priority(self, start: int, stop: int, priority: int) -> None:
        """:meth:`set_priority` for pieces ``start..stop-1``, in O(1) bitset operations."""
        if priority not in (0, 1):
            raise LocalProtocolError(f"priority must be 0 or 1, not {priority}")
        mask = self._range_mask(start, stop)
        if priority:
            self._wanted |= mask & ~self._have
        else:
            self._wanted &= ~mask

    def priority(self, index: int) -> int:
        """1 if the piece is wanted from peers, 0 if excluded (or already held)."""
        return 1 if self._wanted & self._bit(index) else 0

    def set_blocked(self, index: int | None) -> None:
        """The reader is blocked on piece ``index`` (None: on nothing): every peer that
        has it requests it before anything else."""
        if index is not None:
            self._bit(index)
        self._blocked = index

    def set_deadline(self, index: int, deadline: float | None) -> None:
        """Want piece ``index`` by time ``deadline`` (None clears an explicit deadline)."""
        self._bit(index)
        if deadline is None:
            self._explicit_deadlines.pop(index, None)
        else:
            self._explicit_deadlines[index] = deadline
        self._urgent_dirty = True

    def set_cursor(
        self, piece_index: int, window_pieces: int, now: float, deadline_spacing: float
    ) -> None:
        """The streaming window: pieces ``piece_index + k`` for ``k < window_pieces`` are
        wanted by ``now + k * deadline_spacing`` (libtorrent's streaming deadlines).
        Replaces the previous window; ``window_pieces=0`` clears it."""
        if not 0 <= piece_index <= self.num_pieces or window_pieces < 0:
            raise LocalProtocolError(f"bad cursor {piece_index} / window {window_pieces}")
        stop = min(self.num_pieces, piece_index + window_pieces)
        have = self._have
        n1 = self.num_pieces - 1
        self._cursor_deadlines = {
            i: now + (i - piece_index) * deadline_spacing
            for i in range(piece_index, stop)
            if not have >> (n1 - i) & 1
        }
        self._urgent_dirty = True

    def _urgent_order(self) -> list[tuple[float, int]]:
        if self._urgent_dirty:
            merged = dict(self._cursor_deadlines)
            for i, t in self._explicit_deadlines.items():
                if i not in merged or t < merged[i]:
                    merged[i] = t
            self._urgent = sorted((t, i) for i, t in merged.items())
            self._urgent_dirty = False
        return self._urgent

    # ------------------------------------------------------------------ picking

    def pick(self, peer: P, max_blocks: int, now: float) -> list[BlockRequest]:
        """Up to ``max_blocks`` blocks to request from ``peer`` now, already recorded
        as outstanding at it. Only pieces the peer has, we lack, and that have priority 1;
        a block is asked of a second peer only as an endgame or time-critical duplicate.
        Typically ``max_blocks = pipeline_depth(peer) - len(outstanding(peer))``."""
        out: list[BlockRequest] = []
        if max_blocks <= 0:
            return out
        ps = self._peer(peer)
        cand_bits = self._bitsets[peer] & self._wanted
        if not cand_bits:
            return out
        n1 = self.num_pieces - 1
        remaining = max_blocks

        # 1. strict priority: the piece the reader is blocked on
        blocked = self._blocked
        if blocked is not None and cand_bits >> (n1 - blocked) & 1:
            remaining -= self._take_free(ps, blocked, remaining, now, out)
            if remaining:
                remaining -= self._take_late(ps, blocked, remaining, now, out)
            if not remaining:
                return out

        # 2. deadlines, earliest first
        skip = 0  # urgent pieces this peer is too slow for
        if self._urgent_dirty or self._urgent:
            for deadline, index in self._urgent_order():
                if index == blocked or not cand_bits >> (n1 - index) & 1:
                    continue
                if not self._can_meet(ps, deadline, now):
                    skip |= 1 << (n1 - index)
                    continue
                remaining -= self._take_free(ps, index, remaining, now, out)
                if remaining:
                    remaining -= self._take_late(ps, index, remaining, now, out)
                if not remaining:
                    return out

        # 3-5. partial pieces, then random-first or rarest-first
        cand_bits &= ~skip
        rng = self._rng
        while remaining:
            partial = self._partial & cand_bits
            if partial:
                mask = self._rarest(partial)
            else:
                mask = self._open & cand_bits
                if not mask:
                    break
                if self._num_have >= self.settings.random_first_pieces:
                    mask = self._rarest(mask)
            count = mask.bit_count()
            pos = mask.bit_length() - 1 if count == 1 else _nth_set_bit(mask, rng.randrange(count))
            remaining -= self._take_free(ps, n1 - pos, remaining, now, out)

        # 6. endgame, for a peer that is (nearly) idle: as in libtorrent, a peer with a
        # full queue gets no duplicates, which bounds the waste to min_pipeline blocks
        # in flight per peer however deep the pipelines are.
        if remaining and self.is_endgame:
            budget = min(remaining, self.settings.min_pipeline - len(ps.requests))
            if budget > 0:
                self._take_endgame(ps, cand_bits, budget, now, out)
        return out

    def _rarest(self, cand: int) -> int:
        """The subset of ``cand`` with the lowest availability."""
        planes = self._planes
        for k in range(len(planes) - 1, -1, -1):
            low = cand & ~planes[k]
            if low:
                cand = low
        return cand

    def _eta(self, ps: _Peer[P], now: float) -> float:
        """When a block requested now from ``ps`` should arrive, behind its queue."""
        if ps.rate > 0.0:
            return now + (len(ps.requests) + 1) * self.block_size / ps.rate
        return now + self.settings.request_queue_time

    def _can_meet(self, ps: _Peer[P], deadline: float, now: float) -> bool:
        if deadline <= now or ps.rate >= self.settings.fast_peer_fraction * self._best_rate:
            return True
        return self._eta(ps, now) <= deadline

    def _new_request(self, ps: _Peer[P], index: int, block: int, now: float) -> _Request[P]:
        wait = self._eta(ps, now) - now
        req = _Request(ps, now, now + wait * self.settings.timeout_factor)
        ps.requests[(index, block)] = req
        self._outstanding += 1
        self._expiry_seq += 1
        heapq.heappush(self._expiry, (req.expected_by, self._expiry_seq, index, block, req))
        if self._expiry[0][0] < now:
            self._mark_late(now)
        return req

    def _mark_late(self, now: float) -> None:
        """Move the requests late at ``now`` (``now > expected_by``) out of the heap,
        marking their pieces in ``_late``; requests no longer outstanding are dropped."""
        expiry, n1 = self._expiry, self.num_pieces - 1
        while expiry and expiry[0][0] < now:
            _, _, index, _, req = heapq.heappop(expiry)
            if req.live:
                self._late |= 1 << (n1 - index)

    def _take_free(
        self, ps: _Peer[P], index: int, want: int, now: float, out: list[BlockRequest]
    ) -> int:
        dl = self._pieces.get(index)
        if dl is None:
            dl = self._pieces[index] = _Piece(self.blocks_in_piece(index))
            self._open &= ~self._bits[index]
        if not dl.num_free:
            return 0
        state = dl.state
        taken = 0
        block = state.find(_FREE)
        while block >= 0 and taken < want:
            state[block] = _REQUESTED
            dl.requests[block] = [self._new_request(ps, index, block, now)]
            out.append(self._piece_block(index, dl, block))
            taken += 1
            block = state.find(_FREE, block + 1)
        dl.num_free -= taken
        self._refresh(index, dl)
        return taken

    def _take_late(
        self, ps: _Peer[P], index: int, want: int, now: float, out: list[BlockRequest]
    ) -> int:
        """Time-critical duplicates: blocks of urgent piece ``index`` outstanding at other
        peers and late there (past their ``expected_by``), asked of ``ps`` as well.

        Duplicates cost uploads that the cancel usually cannot recall (the block is
        already queued at the uploader), so they are kept for blocks that look stuck:
        only late ones (not merely past a streaming deadline that another peer might
        beat), and only from a peer with room, at most ``min_pipeline`` requests
        outstanding at it, as in endgame. Measurements: docs/benchmarks.md, "Tuned
        defaults"."""
        want = min(want, self.settings.min_pipeline - len(ps.requests))
        dl = self._pieces.get(index)
        if want <= 0 or dl is None or not dl.requests:
            return 0
        limit = 1 + self.settings.max_duplicates
        taken = 0
        for block, reqs in dl.requests.items():
            if len(reqs) >= limit or (index, block) in ps.requests:
                continue
            if now > min(r.expected_by for r in reqs):
                reqs.append(self._new_request(ps, index, block, now))
                out.append(self._piece_block(index, dl, block))
                taken += 1
                if taken == want:
                    break
        return taken

    def _take_endgame(
        self, ps: _Peer[P], cand_bits: int, want: int, now: float, out: list[BlockRequest]
    ) -> None:
        """Duplicate late outstanding blocks the peer has, least-duplicated first.

        Only late blocks (outstanding past their ``expected_by``), by the same rule as
        time-critical duplicates (see :meth:`_take_late` for the measurement): in a
        cluster swarm every node ends at about the same moment, and duplicating every
        outstanding block, as libtorrent's endgame does, spends uploads the others' tails
        need. A block held by a slow or dead peer still turns late and is duplicated.

        The scan stops as soon as it has ``want`` blocks with a single requester (the
        best possible), so a pick costs O(want) plus the already-duplicated blocks it
        skips, not O(all outstanding blocks)."""
        limit = 1 + self.settings.max_duplicates
        mine = ps.requests
        pieces = self._pieces
        single: list[tuple[int, int]] = []
        others: list[tuple[int, float, int, int]] = []
        # The busy pieces the peer has that may hold a late request (no other piece has a
        # block to offer), lowest index first: the bitset's binary digits, most
        # significant first (one C call, not two bitset operations per piece).
        self._mark_late(now)
        digits = format(self._busy & cand_bits & self._late, "b").lstrip("0")
        first = self.num_pieces - len(digits)  # the piece of digits[0]
        j = digits.find("1")
        while j >= 0 and len(single) < want:
            index = first + j
            j = digits.find("1", j + 1)
            for block, reqs in pieces[index].requests.items():
                n = len(reqs)
                if n >= limit or (index, block) in mine:
                    continue
                if n == 1:
                    if now > reqs[0].expected_by:
                        single.append((index, block))
                        if len(single) == want:
                            break
                elif now > min(r.expected_by for r in reqs):
                    others.append((n, reqs[0].requested_at, index, block))
        options = single
        if len(single) < want and others:
            others.sort()
            options += [(index, block) for _, _, index, block in others[: want - len(single)]]
        for index, block in options:
            dl = self._pieces[index]
            dl.requests[block].append(self._new_request(ps, index, block, now))
            out.append(self._piece_block(index, dl, block))

    # ------------------------------------------------------------------ bookkeeping

    def _refresh(self, index: int, dl: _Piece[P]) -> None:
        """Put piece ``index`` in the right one of open / partial / busy / finished."""
        bit = self._bits[index]
        if dl.num_free == len(dl.state):
            # nothing requested or received any more: back to a fresh piece
            del self._pieces[index]
            self._open |= bit
            self._partial &= ~bit
            self._busy &= ~bit
        elif dl.num_free:
            self._partial |= bit
            self._busy &= ~bit
        elif dl.requests:
            self._partial &= ~bit
            self._busy |= bit
        else:
            self._partial &= ~bit
            self._busy &= ~bit
        if not dl.requests:
            self._late &= ~bit

    def _drop_request(self, ps: _Peer[P], key: tuple[int, int]) -> None:
        index, block = key
        ps.requests.pop(key).live = False
        self._outstanding -= 1
        dl = self._pieces[index]
        reqs = [r for r in dl.requests[block] if r.peer is not ps]
        if reqs:
            dl.requests[block] = reqs
            return
        del dl.requests[block]
        dl.state[block] = _FREE
        dl.num_free += 1
        self._refresh(index, dl)

    def _drop_all_requests(self, ps: _Peer[P]) -> None:
        for key in list(ps.requests):
            self._drop_request(ps, key)

    # ------------------------------------------------------------------ introspection

    @property
    def is_endgame(self) -> bool:
        """Every block of every missing wanted piece is requested or received, and some
        are still outstanding (libtorrent's strict endgame). A piece no peer has yet
        keeps us out of endgame: at a cold start the swarm holds only what the origin
        fetchers have read so far, and duplicating all of it would waste the links."""
        wanted = self._wanted
        return bool(self._busy & wanted) and not (self._open | self._partial) & wanted

    @property
    def num_have(self) -> int:
        return self._num_have

    @property
    def is_complete(self) -> bool:
        """We hold every piece."""
        return self._num_have == self.num_pieces

    @property
    def num_outstanding(self) -> int:
        """Outstanding (peer, block) requests, duplicates counted each."""
        return self._outstanding

    @property
    def peers(self) -> list[P]:
        return list(self._peers)

    def have(self, index: int) -> bool:
        return bool(self._have & self._bit(index))

    def peer_has(self, peer: P, index: int) -> bool:
        bits = self._bitsets.get(peer)
        return bits is not None and bool(bits & self._bit(index))

    def peer_piece_count(self, peer: P) -> int:
        """How many pieces ``peer`` has, as far as we know (0 for an unknown peer)."""
        return self._bitsets.get(peer, 0).bit_count()

    def peers_without(self, index: int, peers: Collection[P]) -> list[P]:
        """Those of ``peers`` not known to have piece ``index`` (the ones to tell of it),
        in their order: ``[k for k in peers if not peer_has(k, index)]`` in one call
        (``peers`` is iterated twice: the keys, and their states looked up in C)."""
        bit = self._bit(index)
        return [
            k
            for k, bits in zip(peers, map(self._bitsets.get, peers), strict=True)
            if bits is None or not bits & bit
        ]

    def peer_missing(self, peer: P) -> int:
        """How many pieces the peer lacks, by what it announced (all of them for a peer
        never heard of)."""
        return self.num_pieces - self._bitsets.get(peer, 0).bit_count()

    def peer_is_interesting(self, peer: P) -> bool:
        """The peer has a piece we lack and want from peers (send INTERESTED)."""
        return bool(self._bitsets.get(peer, 0) & self._wanted)

    def availability(self, index: int) -> int:
        """How many known peers have piece ``index``."""
        pos = self.num_pieces - 1 - index
        self._bit(index)
        return sum(((plane >> pos) & 1) << k for k, plane in enumerate(self._planes))

    def outstanding(self, peer: P) -> list[BlockRequest]:
        """The peer's outstanding requests, oldest first."""
        ps = self._peers.get(peer)
        if ps is None:
            return []
        return [self._block(i, b) for i, b in ps.requests]

    def outstanding_count(self, peer: P) -> int:
        """``len(outstanding(peer))`` in O(1)."""
        ps = self._peers.get(peer)
        return 0 if ps is None else len(ps.requests)

    def requesters(self, block: BlockRequest) -> list[P]:
        """Peers the block is outstanding at."""
        dl = self._pieces.get(block.index)
        if dl is None:
            return []
        return [r.peer.key for r in dl.requests.get(block.begin // self.block_size, [])]

    def is_finished(self, index: int) -> bool:
        """Every block of the piece has been received (time to hash it), and the piece
        is not yet marked held."""
        dl = self._pieces.get(index)
        return dl is not None and dl.num_received == len(dl.state)

    def check_invariants(self) -> None:
        """Recompute the incremental state from scratch and assert it matches.
        O(pieces * peers): for tests and debugging only."""
        n = self.num_pieces
        for i in range(n):
            pos = n - 1 - i
            count = sum(1 for bits in self._bitsets.values() if bits >> pos & 1)
            assert self.availability(i) == count, (i, self.availability(i), count)
            dl = self._pieces.get(i)
            have = bool(self._have >> pos & 1)
            assert bool(self._open >> pos & 1) == (not have and dl is None), i
            if dl is None:
                assert not self._partial >> pos & 1 and not self._busy >> pos & 1, i
                continue
            assert not have, i
            st = dl.state
            assert dl.num_free == st.count(_FREE) and dl.num_received == st.count(_RECEIVED)
            assert dl.num_free < len(st), i
            assert bool(self._partial >> pos & 1) == (dl.num_free > 0), i
            assert bool(self._busy >> pos & 1) == (dl.num_free == 0 and bool(dl.requests)), i
            for b in range(len(st)):
                reqs = dl.requests.get(b)
                assert (st[b] == _REQUESTED) == bool(reqs), (i, b)
                for r in reqs or ():
                    assert r.peer.requests.get((i, b)) is r, (i, b)
                    assert self._peers.get(r.peer.key) is r.peer
                assert len({id(r.peer) for r in reqs or ()}) == len(reqs or ()), (i, b)
        assert list(self._bitsets) == list(self._peers), "bitsets and peers differ"
        for _, _, index, block, req in self._expiry:  # the live flag, as _mark_late reads it
            assert req.live == (req.peer.requests.get((index, block)) is req), (index, block)
        total = sum(len(ps.requests) for ps in self._peers.values())
        assert total == self._outstanding, (total, self._outstanding)
        for ps in self._peers.values():  # slow start lasts until a rate is measured
            assert ps.delivered == -1 or (ps.rate == 0.0 and self._slow_start), ps.key
        assert not self._wanted & self._have
