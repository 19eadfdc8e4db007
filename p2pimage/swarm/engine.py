"""The swarm engine: one task tree per torrent that moves a layer between peers.

A :class:`Swarm` owns the piece store of one blob, a :class:`~p2pimage.swarm.picker.PiecePicker`
and a :class:`~p2pimage.swarm.choker.Choker`, and the peer sessions of that torrent. Its nursery
holds one reader, one writer and one uploader task per peer, a housekeeping tick
(request timeouts, stall detection, rates, rechoke), a flush of deferred haves (asleep
while none wait), the tracker announce loop and the origin reader, when the tracker
assigns one. The policies make every decision; this
module only moves bytes and events between them and the sockets.

What others may ask of a swarm is its small API: the announcer calls
:meth:`Swarm.announce_snapshot`, :meth:`Swarm.add_peers`, :meth:`Swarm.wait_announce_due`
and :meth:`Swarm.release`; the origin reader :meth:`Swarm.reserve_for_origin`,
:meth:`Swarm.return_to_peers`, :meth:`Swarm.held_by_peer`, :meth:`Swarm.pace_download` and
:meth:`Swarm.accept_origin_piece`; the mirror :meth:`Swarm.stream`. A swarm knows its node
only as a :class:`Dialer`.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import trio

from p2pimage.errors import (
    DigestMismatchError,
    LocalProtocolError,
    P2PImageError,
    PeerClosed,
    PieceHashError,
    RemoteProtocolError,
    StorageBusyError,
    StorageError,
    leaf_exceptions,
)
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.pieces import BlobCursor, PieceStorage
from p2pimage.swarm.choker import Choker, PeerStats
from p2pimage.swarm.picker import BlockRequest, PickerSettings, PiecePicker
from p2pimage.swarm.policy import (
    DialPolicy,
    HavePolicy,
    InterestPolicy,
    OriginShare,
    PeerTimeouts,
    RevealPolicy,
    UploadOrder,
)
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.swarm.session import SENDFILE_MIN_BLOCK, PeerSession, SessionInfo
from p2pimage.wire import (
    HAVES_EXTENSION,
    LOCAL_HAVES_ID,
    MAX_BLOCK_LENGTH_LIMIT,
    Bitfield,
    Cancel,
    Choke,
    Extended,
    Have,
    Interested,
    KeepAlive,
    Message,
    NotInterested,
    Piece,
    Request,
    Role,
    Unchoke,
    decode_haves,
)

__all__ = [
    "AnnounceSnapshot",
    "Dialer",
    "Swarm",
    "SwarmSettings",
    "SwarmStalled",
    "SwarmStats",
    "SwarmSummary",
]

log = logging.getLogger("p2pimage.swarm.engine")


class SwarmStalled(P2PImageError):
    """The swarm verified no piece for the reader's stall timeout."""


class Dialer(Protocol):
    """What a swarm needs of its node (:class:`~p2pimage.swarm.node.PeerNode`): who we
    are, and outgoing connections under the node's connection limit."""

    peer_id: bytes
    listen_address: tuple[str, int]

    async def dial(
        self,
        address: tuple[str, int],
        info_hash: bytes,
        *,
        unwanted: Callable[[bytes], bool] | None = None,
    ) -> tuple[PeerSession, SessionInfo]:
        """Connect and handshake; raises :class:`PeerClosed` or ``trio.TooSlowError``,
        also when ``unwanted`` is true of the peer id the peer's handshake names."""
        ...

    def release_connection(self) -> None:
        """A session returned by :meth:`dial` has ended."""
        ...


# A connection whose writer has moved nothing for this long (a peer that stopped reading)
# no longer counts against the swarm's upload_queue_bytes: one frozen peer must not hold
# every other peer's uploads. A 512 KiB batch takes 0.06 s at 8 MiB/s.
STUCK_WRITER_S = 2.0
# Addresses whose peer id a swarm remembers (Swarm._named): far above the peers a swarm
# is given (a tracker answer names up to 50), a bound for long-lived swarms in churn.
MAX_KNOWN_ADDRESSES = 4096


@dataclass
class SwarmSettings:
    """Every tunable of a swarm, with its default and the reason for it."""

    # Connections per torrent. Each peer costs three tasks; in a cluster swarm a node
    # gains little past ~30 neighbours (libtorrent's default connections_limit is 200
    # per session, its per-torrent default is 100).
    max_peers: int = 40
    # Dial new peers only while we have fewer than this; accept up to max_peers. If every
    # node dialled up to the accept limit, the first max_peers+1 nodes of a cold start
    # would fill each other up as a clique and refuse everyone after them, cutting the
    # swarm in two (the simulator in benchmarks/_sim.py shows it at 200 nodes). Half,
    # like libtorrent keeping slots free for incoming connections.
    dial_target: int = 20
    # Of two nodes that know each other, the one whose listen address orders higher
    # dials this much later (DialPolicy.dial_delay_s): the other's connection usually
    # stands by then, and the late dial stops after the 68-byte handshake, before the
    # key exchange and token checks. 0: both dial at once (two full handshakes).
    dial_defer_s: float = 0.15
    # The choker's regular upload slots; None is unlimited (nobody is ever choked). Inside
    # one cluster all nodes cooperate, so tit-for-tat only slows the swarm down: None is
    # the default. A number turns on tit-for-tat with that many slots (0: optimistic
    # unchokes only), plus ``optimistic_slots``.
    upload_slots: int | None = None
    optimistic_slots: int = 1
    handshake_timeout_s: float = 10.0
    # A request outstanding this long goes back to the pool (libtorrent: request_timeout 60 s;
    # inside a cluster a block should never take more than a few seconds). Both timeouts
    # are floors: on a slow link they grow with what we have requested (PeerTimeouts).
    request_timeout_s: float = 15.0
    # A peer with outstanding requests that delivered nothing for this long is dropped.
    stall_timeout_s: float = 20.0
    # Send a keep-alive after this much silence (BEP 3 suggests every two minutes).
    keepalive_s: float = 90.0
    rechoke_interval_s: float = 10.0
    tick_s: float = 0.5
    # Haves to a p2pimage peer already interested in us wait up to this long, to leave
    # with the next batch to that peer (a request, a piece) or with the other haves of
    # this interval, instead of one write each (a node verifies a piece every ~30 ms at
    # 8 MiB/s and tells every peer that lacks it: most writes were haves). A peer not
    # interested hears at once (the piece may make it interested), and so does a peer
    # near its end, and every peer of a piece at most one of our peers holds (HavePolicy:
    # a fresh piece spreads through those haves, hop by hop). 0: every have at once.
    # Measurements: docs/benchmarks.md, "CPU per delivered MiB" and "Rare haves at once".
    have_delay_s: float = 0.25
    # How long the have of a rare piece (HavePolicy) waits instead: one write carries
    # the haves of the pieces verified meanwhile (a node verifies one every ~16 ms at
    # 8 MiB/s with 128 KiB pieces), where each was a write of its own to every peer and a
    # wake-up of every peer's reader (most of a node's system calls). 0: at once.
    # Measurements: docs/benchmarks.md, "Rare haves, coalesced".
    rare_have_delay_s: float = 0.03
    # How many of the peers lacking a rare piece hear of it after rare_have_delay_s
    # (HavePolicy.first_told, at random); the others as of a common piece (have_delay_s,
    # or sooner with the next batch to them). None: all of them. Measurements:
    # docs/benchmarks.md, "Rare haves to a few peers first".
    rare_have_fanout: int | None = 4
    # A quiet swarm (complete, nothing requested either way, nobody interested, no byte
    # moved in the last tick: a seeding swarm on an idle node) ticks this seldom
    # instead, and at once again on any peer's message or a new peer. Its tick then only
    # checks token expiries and keep-alives: a token a key rotation revoked closes its
    # connection within this delay, not ``tick_s``. Idle nodes cost next to no CPU
    # (docs/benchmarks.md, "Idle nodes").
    idle_tick_s: float = 5.0
    # Stay interested in a p2pimage peer this long after it last had a piece we need
    # (InterestPolicy; checked each tick): in a cold start it soon gets another, and
    # each not-interested/interested pair was two messages and two rechokes. 0: BEP 3's
    # immediate not-interested, as toward stock clients always.
    interest_grace_s: float = 2.0
    # Pieces ahead of the read cursor given deadlines (streaming window). Kept short on
    # purpose: in a cold start every node reads the same layer from the same offset, and
    # a long window makes them all chase the same few frontier pieces (a convoy on the
    # one peer that holds them) instead of trading rarest-first; the piece the reader is
    # blocked on keeps strict priority either way. Measurements: docs/benchmarks.md,
    # "Tuned defaults".
    stream_window: int = 4
    # Bytes queued for sending over all the swarm's connections (batches waiting for the
    # upload limiter included) before the uploader waits: the next request to serve is
    # chosen (upload_order) as late as this allows, so it must stay small next to the
    # requests waiting. 1.5 MiB: one connection holds what it held when this was a cap
    # per connection (1 MiB queued plus the batch being written).
    upload_queue_bytes: int = 1536 * 1024
    # Whose waiting requests are served first (UploadOrder): "arrival", the peer waiting
    # longest; "need", the peer holding the fewest pieces. In the simulator "need" takes
    # 200-500 nodes from 1.39-1.47x the bound to 1.09-1.10x, but the swarm benchmark's
    # 16 nodes from 1.35x to 1.73x (a full mesh where only the origin fetchers, rich in
    # their own range, differ: served last everywhere, they finish last), so it is not
    # the default: docs/benchmarks.md, "Requests ahead, the neediest first". With
    # "need" a node also tells every peer of each piece it verifies, also peers that
    # announced it themselves, so that their uploaders know what it holds (without these
    # haves an uploader saw about half of a requester's pieces).
    upload_order: str = "arrival"
    # Reveal each origin-read piece to one peer first (see Swarm.accept_origin_piece).
    reveal_origin_pieces: bool = True
    reveal_timeout_s: float = 2.0
    # Block size of our requests (capped at the piece length): whole pieces up to 256 KiB
    # to peers that accept them (p2pimage_block in the extended handshake), in 16 KiB
    # parts to stock clients (BEP 3). One message, one pread and one storage write per
    # block: with 16 KiB blocks the per-message costs were most of a node's CPU.
    block_size: int = MAX_BLOCK_LENGTH_LIMIT
    # Expected streaming rate (bytes/s) for deadline spacing in the streaming window.
    stream_rate: float = 50 * 1024 * 1024
    # A reader (Swarm.stream) that has sent its first chunk gathers at least this many
    # verified bytes per chunk, waiting up to stream_gather_s for the pieces after its
    # position; the first chunk and the blob's end go out at once. While a layer
    # downloads, pieces verify one at a time (64 KiB each in a 16 MiB layer), and each
    # was a chunk of its own through the HTTP layer to the runtime: a wake-up, a pass
    # through the ASGI stack and a socket send per piece (docs/benchmarks.md, "The
    # cluster demo by phase and kind"). 0 turns gathering off.
    stream_gather_bytes: int = 256 * 1024
    stream_gather_s: float = 0.05
    # The piece picker's tunables (request queue depth, endgame duplicates, ...).
    picker: PickerSettings = field(default_factory=PickerSettings)


@dataclass
class SwarmStats:
    downloaded_from_peers: int = 0
    downloaded_from_origin: int = 0
    uploaded: int = 0
    wasted: int = 0
    hash_failures: int = 0
    peers_connected: int = 0
    peers_banned: int = 0
    requests_timed_out: int = 0  # requests given back to the pool by request_timeout_s
    ticks: int = 0  # housekeeping ticks run (a quiet swarm ticks every idle_tick_s)
    started_at: float = 0.0
    first_piece_at: float | None = None
    last_piece_at: float | None = None  # every piece verified (before the whole-blob check)
    last_progress_at: float | None = None  # the latest piece verified, from anywhere
    completed_at: float | None = None


@dataclass(frozen=True)
class SwarmSummary:
    """What one swarm is doing, for status pages (:meth:`Swarm.summary`); plain values,
    so ``dataclasses.asdict`` gives its JSON form."""

    digest: str
    info_hash: str  # hex
    size: int
    have_bytes: int
    pieces: int
    pieces_have: int
    state: str  # downloading | seeding | released | failed | closed
    peers: int
    readers: int  # runtime pulls reading through the swarm now
    downloaded_from_peers: int
    downloaded_from_origin: int
    uploaded: int
    wasted: int
    hash_failures: int
    peers_banned: int
    age_s: float
    completed_in_s: float | None  # from the swarm's start to its verified blob


@dataclass(frozen=True)
class AnnounceSnapshot:
    """What the announcer tells the tracker about a swarm (:meth:`Swarm.announce_snapshot`)."""

    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    num_pieces: int
    digest: str
    complete: bool


@dataclass(eq=False)
class _Peer:
    session: PeerSession
    info: SessionInfo
    key: bytes  # peer id
    peer_choking: bool = True
    peer_interested: bool = False
    am_choking: bool = True
    am_interested: bool = False
    outstanding: dict[tuple[int, int], tuple[BlockRequest, float]] = field(default_factory=dict)
    # Blocks asked in parts (a peer with smaller blocks than ours): the part offsets
    # still due, by (index, begin) of the block.
    parts: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    uploads: deque[Request] = field(default_factory=deque)
    # When the peer's turn in UploadOrder's ties began: its first waiting request's
    # arrival, or its last request served.
    waiting_since: float = 0.0
    last_data_at: float = 0.0  # the last block, or the first request after an idle spell
    received_at_last_data: int = 0  # Swarm.received_bytes at last_data_at
    # A request timed out since the last block: an empty request queue is then no idle
    # spell, and the stall clock keeps running.
    timed_out: bool = False
    # When we sent the latest request this peer answered: peers answer requests in order,
    # so one that answers a later request has skipped (not merely queued) an older one.
    answered_sent_at: float = 0.0
    last_sent_at: float = 0.0
    connected_at: float = 0.0
    down_bytes_window: int = 0
    up_bytes_window: int = 0
    down_rate: float = 0.0
    up_rate: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: trio.Event = field(default_factory=trio.Event)  # set once out of Swarm.peers
    refill_deferred: bool = False  # inside a batch of received messages
    # Interested, but the peer has had nothing we need since then (InterestPolicy):
    # nothing to request; the tick decides when to say not interested.
    idle_since: float | None = None
    # When this peer's deferred haves are due (_haves_loop; inf: none wait, or they
    # left with a batch before).
    haves_due_at: float = math.inf


class Swarm:
    """One torrent's swarm on this node."""

    def __init__(
        self,
        metainfo: Metainfo,
        storage: PieceStorage,
        *,
        dialer: Dialer,
        settings: SwarmSettings | None = None,
        download_limiter: RateLimiter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``download_limiter``: the node's download link, which origin reads share with
        the peer sessions (:meth:`pace_download`)."""
        self.metainfo = metainfo
        self.info_hash = metainfo.info_hash
        self.storage = storage
        self._dialer = dialer
        self._download_limiter = download_limiter or RateLimiter(None)
        self.settings = settings or SwarmSettings()
        self._rng = rng or random.Random()
        self.picker: PiecePicker[bytes] = PiecePicker(
            num_pieces=metainfo.num_pieces,
            piece_length=metainfo.piece_length,
            total_length=metainfo.length,
            block_size=min(self.settings.block_size, metainfo.piece_length),
            rng=self._rng,
            settings=self.settings.picker,
        )
        for index in range(metainfo.num_pieces):
            if storage.has_piece(index):
                self.picker.we_have(index)
        self.choker: Choker[bytes] = Choker(
            upload_slots=self.settings.upload_slots,
            optimistic_slots=self.settings.optimistic_slots,
            rechoke_interval=self.settings.rechoke_interval_s,
            rng=self._rng,
        )
        self.dial_policy = DialPolicy(
            self.settings.dial_target, self.settings.max_peers, self.settings.dial_defer_s
        )
        self.interest = InterestPolicy(self.settings.interest_grace_s)
        self.timeouts = PeerTimeouts(self.settings.request_timeout_s, self.settings.stall_timeout_s)
        self.upload_order = UploadOrder(self.settings.upload_order)
        self.have_policy = HavePolicy(
            self.settings.have_delay_s,
            rare_delay_s=self.settings.rare_have_delay_s,
            rare_fanout=self.settings.rare_have_fanout,
        )
        self.origin_share = OriginShare(self._download_limiter.rate)
        self._upload_wakeup = trio.Event()  # a request arrived
        self._upload_room = trio.lowlevel.ParkingLot()  # a session wrote a batch
        self.reveal: RevealPolicy[bytes] = RevealPolicy(
            enabled=self.settings.reveal_origin_pieces,
            timeout_s=self.settings.reveal_timeout_s,
            rng=self._rng,
        )
        self.stats = SwarmStats()
        self.received_bytes = 0  # from peers and the registry (PeerTimeouts.stalled)
        self.received_at = trio.current_time()  # the last of them (or the start)
        self.peers: dict[bytes, _Peer] = {}
        self.banned: set[bytes] = set()
        self._banned_addresses: set[tuple[str, int]] = set()
        self._dialing: set[tuple[str, int]] = set()
        # The peer id each dialled address named in its handshake. A peer that dialled us
        # is known by its id and an ephemeral source port, not by the listen address the
        # tracker lists: without this, every tracker answer dialled it again, to stop
        # after the 68-byte handshake (3 such dials per connected pair in the cluster
        # demo's pulls: docs/benchmarks.md, "The cluster demo by phase and kind").
        self._peer_at: dict[tuple[str, int], bytes] = {}
        self._nursery: trio.Nursery | None = None
        self.complete = trio.Event()
        self._finalizing = False
        self.failed: str | None = None
        self.released = False  # the tracker ordered this swarm to stop seeding
        self._streams = 0  # readers inside stream()
        self._close_storage_when_idle = False
        # Set by news worth telling the tracker before the interval (completion, close,
        # an origin range done); cleared by the next announce_snapshot().
        self._announce_news = trio.Event()
        self.closed = trio.Event()
        self._changed = trio.Event()
        # When _haves_loop sends the deferred haves (inf: none wait); the event wakes it
        # when that moves earlier.
        self._haves_flush_at = math.inf
        self._haves_flush_moved = trio.Event()
        # Set while the tick loop waits out a quiet spell: activity sets it (_stir).
        self._quiet_wait: trio.Event | None = None
        if storage.complete:
            self.complete.set()

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the swarm until cancelled or :meth:`close` is called."""
        self.stats.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._uploader)
                if self.settings.have_delay_s > 0:
                    nursery.start_soon(self._haves_loop)
                task_status.started()
                await self.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.closed.set()

    def start_soon(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` inside this swarm's task tree (it ends when the swarm closes)."""
        if self._nursery is None:
            raise LocalProtocolError("the swarm is not running")
        self._nursery.start_soon(fn)

    def close(self) -> None:
        self.closed.set()
        self._announce_news.set()

    # --- the announcer's API -------------------------------------------------------------

    def announce_soon(self) -> None:
        """Wake the announcer now (a milestone: progress worth telling the tracker)."""
        self._announce_news.set()

    def announce_snapshot(self) -> AnnounceSnapshot:
        """What to announce now; news before this call is then considered told."""
        if self._announce_news.is_set() and not self.closed.is_set():
            self._announce_news = trio.Event()
        stats = self.stats
        return AnnounceSnapshot(
            info_hash=self.info_hash,
            peer_id=self._dialer.peer_id,
            port=self._dialer.listen_address[1],
            uploaded=stats.uploaded,
            downloaded=stats.downloaded_from_peers + stats.downloaded_from_origin,
            left=self.left,
            num_pieces=self.metainfo.num_pieces,
            digest=self.metainfo.sha256,
            complete=self.complete.is_set(),
        )

    async def wait_announce_due(self, interval_s: float) -> None:
        """Sleep until the next announce is due: after ``interval_s``, or at once on news
        since the last :meth:`announce_snapshot` (completion, close, :meth:`announce_soon`)."""
        with trio.move_on_after(interval_s):
            await self._announce_news.wait()

    def release(self) -> None:
        """The tracker ordered this swarm to stop seeding: close it (the blob stays)."""
        self.released = True
        self.close()

    @property
    def peer_count(self) -> int:
        return len(self.peers)

    def summary(self, now: float | None = None) -> SwarmSummary:
        """A snapshot of this swarm (``now`` on the trio clock; default: the current time)."""
        now = trio.current_time() if now is None else now
        stats = self.stats
        if self.failed is not None:
            state = "failed"
        elif self.released:
            state = "released"
        elif self.complete.is_set():
            state = "seeding"
        elif self.closed.is_set():
            state = "closed"
        else:
            state = "downloading"
        completed_in = (
            stats.completed_at - stats.started_at if stats.completed_at is not None else None
        )
        return SwarmSummary(
            digest=self.metainfo.sha256,
            info_hash=self.info_hash.hex(),
            size=self.metainfo.length,
            have_bytes=self.storage.bytes_have,
            pieces=self.metainfo.num_pieces,
            pieces_have=self.storage.num_have,
            state=state,
            peers=len(self.peers),
            readers=self._streams,
            downloaded_from_peers=stats.downloaded_from_peers,
            downloaded_from_origin=stats.downloaded_from_origin,
            uploaded=stats.uploaded,
            wasted=stats.wasted,
            hash_failures=stats.hash_failures,
            peers_banned=len(self.banned),
            age_s=round(max(0.0, now - stats.started_at), 3),
            completed_in_s=round(completed_in, 3) if completed_in is not None else None,
        )

    @property
    def is_seeding(self) -> bool:
        return self.storage.complete

    @property
    def left(self) -> int:
        return self.metainfo.length - self.storage.bytes_have

    # --- peers --------------------------------------------------------------------------

    def want_more_peers(self) -> bool:
        return self.dial_policy.want_more(len(self.peers), len(self._dialing))

    def add_peers(self, addresses: Iterable[tuple[str, int]], *, mutual: bool = False) -> None:
        """Dial peers (tracker results, or a static list) that we are not connected to.

        ``mutual``: they were given our address too and may dial us at the same time (a
        tracker's peer lists), so of each pair one side defers its dial
        (``DialPolicy.dial_delay_s``); otherwise (a list only we were given) all are
        dialled at once."""
        if self._nursery is None:
            return
        connected = {p.session.address for p in self.peers.values()}
        unwanted = connected | self._dialing | self._banned_addresses
        unwanted.add(self._dialer.listen_address)
        peer_at, peers = self._peer_at, self.peers

        def skip(address: tuple[str, int]) -> bool:
            return address in unwanted or peer_at.get(address, b"") in peers

        for address in self.dial_policy.to_dial(
            addresses,
            connected=len(self.peers),
            dialing=len(self._dialing),
            skip=skip,
        ):
            self._dialing.add(address)
            self._nursery.start_soon(self._dial, address, mutual)

    async def _dial(self, address: tuple[str, int], mutual: bool) -> None:
        try:
            try:
                delay = self.dial_policy.dial_delay_s(
                    self._dialer.listen_address, address, self._rng, mutual=mutual
                )
                if delay:
                    await trio.sleep(delay)
                    if self._peer_at.get(address, b"") in self.peers:
                        # It dialled us meanwhile and named this listen address (BEP
                        # 10's "p"): no connection, no handshake to find that out.
                        log.debug("dial %s skipped: connected to it already", address)
                        return
                # A peer already connected (it dialed us meanwhile) is not dialed twice.
                session, info = await self._dialer.dial(
                    address, self.info_hash, unwanted=partial(self._named, address)
                )
            except (PeerClosed, trio.TooSlowError) as exc:
                log.debug("dial %s failed: %s", address, exc)
                return
            finally:
                self._dialing.discard(address)
            try:
                await self._serve_session(session, info)
            finally:
                self._dialer.release_connection()
            if info.admission_expired():
                # Closed because a token ran out: dial again at once, with the node's
                # renewed token (the peer re-verifies everything).
                self.add_peers([address])
        except PeerClosed as exc:
            log.debug("peer %s: %s", address, exc.reason)

    def _named(self, address: tuple[str, int], peer_id: bytes) -> bool:
        """The peer at ``address`` named ``peer_id`` in its handshake: remember it, and
        say whether that peer is connected already (the dial then stops)."""
        self._remember(address, peer_id)
        return peer_id in self.peers

    def _remember(self, address: tuple[str, int], peer_id: bytes) -> None:
        """``address`` (a listen address) is the peer ``peer_id``'s: while that peer is
        connected, tracker answers naming ``address`` dial nothing."""
        if len(self._peer_at) >= MAX_KNOWN_ADDRESSES and address not in self._peer_at:
            self._peer_at.clear()  # (a bound; what is forgotten costs one dial each)
        self._peer_at[address] = peer_id

    async def adopt(self, session: PeerSession, info: SessionInfo) -> None:
        """Take over an accepted session (called by the node's listener)."""
        await self._serve_session(session, info)

    async def _serve_session(self, session: PeerSession, info: SessionInfo) -> None:
        key = info.peer_id
        existing = self.peers.get(key)
        if existing is not None and self._keep_new_connection(session, existing.session, key):
            existing.scope.cancel()
            with trio.move_on_after(1):
                await existing.gone.wait()
        if (
            key in self.peers
            or key in self.banned
            or key == self._dialer.peer_id
            or not self.dial_policy.may_accept(len(self.peers))
            or self.closed.is_set()
        ):
            await session.aclose("duplicate or unwanted")
            return
        now = trio.current_time()
        peer = _Peer(
            session=session,
            info=info,
            key=key,
            connected_at=now,
            last_data_at=now,
            received_at_last_data=self.received_bytes,
        )
        self.peers[key] = peer
        self.stats.peers_connected = len(self.peers)
        listen_port = info.extended.listen_port if info.extended is not None else None
        if listen_port is not None and session.conn.our_role is Role.RESPONDER:
            # A peer that dialled us comes from an ephemeral port; the tracker lists it
            # at the address it listens on. Only an authenticated peer gets here, and
            # what it names can only be an address on its own IP (at worst it spares
            # us a dial of its own host while it stays connected).
            self._remember((session.address[0], listen_port), key)
        self._stir()
        reason = "done"
        try:
            with peer.scope:
                async with trio.open_nursery() as nursery:
                    session.set_sent_lot(self._upload_room)
                    nursery.start_soon(session.run_writer)
                    self._greet(peer)
                    for message in info.messages:
                        self._handle(peer, message)
                    await self._reader(peer)
        except* PeerClosed as group:
            reason = "; ".join(str(exc) for exc in leaf_exceptions(group))
        except* (StorageError, DigestMismatchError) as group:
            reason = f"storage: {group.exceptions[0]}"
            log.error("swarm %s: %s", self.info_hash.hex()[:12], reason)
        except* Exception as group:
            # A bug while serving one peer must not take the node down: drop that peer.
            reason = f"internal error: {group.exceptions[0]!r}"
            log.error(
                "swarm %s: peer %s: %s",
                self.info_hash.hex()[:12],
                session.address,
                reason,
                exc_info=group,
            )
        finally:
            if peer.scope.cancelled_caught and info.admission_expired():
                reason = "token expired"
            if self.peers.get(key) is peer:
                del self.peers[key]
                peer.gone.set()
                self.picker.peer_lost(key)
                for index in self.reveal.peer_lost(key):
                    self._show_to_all(index, key)
            self.stats.peers_connected = len(self.peers)
            self._rechoke(trio.current_time())
            await session.aclose(reason)
            self._refill_all()
            log.debug("peer %s gone: %s", session.address, reason)

    def _keep_new_connection(self, new: PeerSession, old: PeerSession, key: bytes) -> bool:
        """Two nodes that dial each other at once must keep the same one of the two
        connections, or each closes the one the other kept: keep the connection opened by
        the node with the smaller peer id."""
        ours = self._dialer.peer_id
        keeper = min(ours, key)
        new_initiator = ours if new.conn.our_role is Role.INITIATOR else key
        old_initiator = ours if old.conn.our_role is Role.INITIATOR else key
        return new_initiator == keeper and old_initiator != keeper

    def _greet(self, peer: _Peer) -> None:
        if self.storage.num_have:
            have = self.storage.have
            hidden = self.reveal.hidden
            if hidden:
                bits = bytearray(have)
                for index in hidden:
                    bits[index >> 3] &= ~(0x80 >> (index & 7))
                have = bytes(bits)
            peer.session.send(Bitfield(have))
        now = trio.current_time()
        self._rechoke(now)  # with unlimited slots: unchoked from the start, no delay
        peer.last_sent_at = now

    # --- receiving ----------------------------------------------------------------------

    async def _reader(self, peer: _Peer) -> None:
        while True:
            messages = await peer.session.receive_batch()
            # One refill for the whole batch (often a run of haves), not one per message.
            peer.refill_deferred = True
            try:
                for message in messages:
                    self._handle(peer, message)
            finally:
                peer.refill_deferred = False
            self._refill(peer)
            self._stir()
            if self.storage.all_pieces_verified and not self.complete.is_set():
                # A verified last piece: finish the blob (hash, rename) outside _handle.
                await self.finalize_if_done()

    def _handle(self, peer: _Peer, message: Message) -> None:
        if isinstance(message, Piece):
            self._on_block(peer, message)
        elif isinstance(message, Have):
            if message.index >= self.metainfo.num_pieces:
                raise PeerClosed(f"have for piece {message.index} out of range")
            self.picker.peer_have(peer.key, message.index)
            told = self.reveal.peer_has(message.index)
            if told is not None:
                self._show_to_all(message.index, told)  # an origin piece we revealed is out
            if not peer.am_interested or peer.idle_since is not None:
                self._update_interest(peer)  # (a have never makes a peer less interesting)
        elif isinstance(message, Extended) and message.extended_id == LOCAL_HAVES_ID:
            try:
                indexes = decode_haves(message.payload, self.metainfo.num_pieces)
            except RemoteProtocolError as exc:
                raise PeerClosed(f"bad haves: {exc}") from None
            for index in indexes:
                self.picker.peer_have(peer.key, index)
                told = self.reveal.peer_has(index)
                if told is not None:
                    self._show_to_all(index, told)
            if not peer.am_interested or peer.idle_since is not None:
                self._update_interest(peer)
        elif isinstance(message, Bitfield):
            try:
                self.picker.peer_bitfield(peer.key, message.bitfield)
            except RemoteProtocolError as exc:
                raise PeerClosed(f"bad bitfield: {exc}") from None
            self._update_interest(peer)
        elif isinstance(message, Unchoke):
            peer.peer_choking = False
            self._refill(peer)
        elif isinstance(message, Choke):
            peer.peer_choking = True
            self.picker.peer_choked(peer.key)
            peer.outstanding.clear()
            peer.parts.clear()
            self._refill_all()
        elif isinstance(message, Request):
            self._on_request(peer, message)
        elif isinstance(message, Cancel):
            peer.uploads = deque(
                r
                for r in peer.uploads
                if (r.index, r.begin, r.length) != (message.index, message.begin, message.length)
            )
        elif isinstance(message, (Interested, NotInterested)):
            interested = isinstance(message, Interested)
            if interested != peer.peer_interested:
                peer.peer_interested = interested
                if self.choker.interest_matters:
                    self._rechoke(trio.current_time())

    def _on_block(self, peer: _Peer, message: Piece) -> None:
        now = trio.current_time()
        length = len(message.data)
        peer.last_data_at = now
        self.received_bytes += length
        self.received_at = now
        peer.received_at_last_data = self.received_bytes
        peer.timed_out = False
        peer.down_bytes_window += length
        index, begin = message.index, message.begin
        block_begin = begin - begin % self.picker.block_size
        key = (index, block_begin)
        parts = peer.parts.get(key)
        if parts is not None and begin in parts and key in peer.outstanding:
            parts.discard(begin)  # one part of a block asked in parts
            done = not parts
        elif parts is None and begin == block_begin and key in peer.outstanding:
            done = True
        else:
            # Unrequested, or cancelled and arrived anyway: harmless, but not counted.
            self.stats.wasted += length
            return
        block, sent = peer.outstanding[key]
        peer.answered_sent_at = max(peer.answered_sent_at, sent)
        expected = block.length
        if parts is not None:
            part = peer.session.conn.peer_max_block_length
            expected = min(part, block.begin + block.length - begin)
        if length != expected:
            raise PeerClosed(f"piece {index}+{begin}: {length} bytes where {expected} were asked")
        self.stats.downloaded_from_peers += length
        cancels: list[tuple[bytes, BlockRequest]] = []
        if done:
            del peer.outstanding[key]
            peer.parts.pop(key, None)
            try:
                cancels = self.picker.block_received(peer.key, index, block_begin)
            except RemoteProtocolError as exc:
                raise PeerClosed(f"bad block: {exc}") from None
        self._send_cancels(cancels)
        if self.storage.has_piece(message.index):
            self.stats.wasted += length
            self._refill(peer)
            return
        try:
            verified = self.storage.write_block(message.index, message.begin, message.data)
        except PieceHashError:
            self._piece_failed(message.index)
            self._refill_all()
            return
        except StorageBusyError:
            # Back-pressure: the store will not buffer another partial piece. Drop the
            # block and ask again later.
            self.stats.wasted += length
            peer.outstanding.pop(key, None)
            peer.parts.pop(key, None)
            self.picker.request_timed_out(peer.key, BlockRequest(index, block_begin, length))
            self._refill(peer)
            return
        if verified:
            self._piece_verified(message.index)
        self._refill(peer)

    def _send_cancels(self, cancels: list[tuple[bytes, BlockRequest]]) -> None:
        for other_key, block in cancels:
            other = self.peers.get(other_key)
            key = (block.index, block.begin)
            if other is not None and key in other.outstanding:
                del other.outstanding[key]
                parts = other.parts.pop(key, None)
                if parts is None:
                    other.session.send(Cancel(block.index, block.begin, block.length))
                    continue
                end = block.begin + block.length
                part = other.session.conn.peer_max_block_length
                for begin in sorted(parts):
                    other.session.send(Cancel(block.index, begin, min(part, end - begin)))

    def _piece_failed(self, index: int) -> None:
        self.stats.hash_failures += 1
        contributors = self.picker.piece_failed(index)
        # With one contributor the culprit is certain; with several, all are suspects, but
        # an authenticated cluster peer never sends a bad piece by accident: ban them all.
        for key in contributors:
            self.ban(key, f"sent bad data for piece {index}")

    def ban(self, key: bytes, reason: str) -> None:
        self.banned.add(key)
        self.stats.peers_banned += 1
        peer = self.peers.get(key)
        log.warning("banning peer %s: %s", key.hex()[:16], reason)
        if peer is not None:
            # Ban the exact address too (the one we dialed, or the peer's socket address):
            # not the host, since many nodes of one machine or NAT share it.
            self._banned_addresses.add(peer.session.address)
            peer.scope.cancel()

    # --- the origin reader's API ---------------------------------------------------------

    def has_piece(self, index: int) -> bool:
        return self.storage.has_piece(index)

    def held_by_peer(self, index: int) -> bool:
        """A connected peer has announced piece ``index``."""
        return self.picker.availability(index) > 0

    def reserve_for_origin(self, first: int, end: int) -> None:
        """Pieces ``[first, end)`` come from the registry: peers are asked for them only
        after everything else."""
        self.picker.set_range_priority(first, end, 0)

    def return_to_peers(self, first: int, end: int) -> None:
        """Pieces ``[first, end)`` are no longer read from the registry: ask peers."""
        self.picker.set_range_priority(first, end, 1)

    async def pace_download(self, nbytes: int) -> None:
        """Wait until the node's download link has room for ``nbytes`` more registry
        bytes: ahead of the peers' blocks queued for it (``RateLimiter.acquire(first=True)``)."""
        await self._download_limiter.acquire(nbytes, first=True)
        self.origin_share.read(nbytes, trio.current_time())

    def origin_read_size(self, largest: int) -> int:
        """Bytes per registry read on our download link (:meth:`OriginShare.read_size`)."""
        return self.origin_share.read_size(largest)

    async def accept_origin_piece(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Store a whole piece read from the registry and show it to the swarm; once every
        piece is verified, complete the blob. False if the piece was here already.

        Takes the same path into storage as peer blocks. Raises :class:`PieceHashError`
        if ``data`` is not the piece the torrent names (nothing is stored).

        The piece is revealed (``have``) to the one peer the
        :class:`~p2pimage.swarm.policy.RevealPolicy` names, and to everyone once another
        peer announces it or after ``reveal_timeout_s``.
        """
        if self.storage.has_piece(index) or not self.storage.write_block(index, 0, data):
            return False
        self.stats.downloaded_from_origin += len(data)
        self.received_bytes += len(data)  # evidence our link works, as peer blocks are
        self.received_at = trio.current_time()
        self._reveal_origin_piece(index)
        await self.finalize_if_done()
        return True

    def _reveal_origin_piece(self, index: int) -> None:
        self._record_verified(index)
        candidates = [k for k in self.peers if not self.picker.peer_has(k, index)]
        target = self.reveal.reveal(index, candidates, trio.current_time())
        if target is None:
            self._announce(index)
        else:
            self.peers[target].session.send_have(index)

    def _show_to_all(self, index: int, told: bytes) -> None:
        """A hidden origin piece is shown to every peer but ``told``, which knows it."""
        self._announce(index, but=told)  # (with the batch's other haves)

    def _piece_verified(self, index: int) -> None:
        self._record_verified(index)
        self._announce(index)

    def _record_verified(self, index: int) -> None:
        self._send_cancels(self.picker.we_have(index))
        now = trio.current_time()
        self.stats.last_progress_at = now
        if self.stats.first_piece_at is None:
            self.stats.first_piece_at = now
        if self.storage.all_pieces_verified:
            self.stats.last_piece_at = now
        for peer in self.peers.values():
            if (
                peer.am_interested
                and peer.idle_since is None
                and not self._peer_has_something_we_need(peer)
            ):
                self._lose_interest(peer, now)
        self._changed.set()
        self._changed = trio.Event()

    def _announce(self, index: int, but: bytes | None = None) -> None:
        """Haves of ``index`` to our peers (but ``but``) not known to hold it; to all of
        them under the need order: a peer that announced the piece itself does not need
        it for picking, but the need order's uploader orders requesters by what they
        hold."""
        holders = self.picker.availability(index)  # for HavePolicy
        keys = [key for key in self.peers if key != but]
        if self.upload_order.mode != "need":
            keys = self.picker.peers_without(index, keys)
        self._send_haves(keys, index, holders)

    def _send_haves(self, told: list[bytes], index: int, holders: int) -> None:
        """Haves of ``index`` to the peers ``told`` (:meth:`_send_have`), the first of a
        rare piece chosen by :meth:`HavePolicy.first_told`."""
        first = self.have_policy.first_told(told, holders, self._rng)
        chosen = None if first is told else set(first)  # None: every one of them
        for key in told:
            first_told = chosen is None or key in chosen
            self._send_have(self.peers[key], index, holders, first=first_told)

    def _send_have(self, peer: _Peer, index: int, holders: int, *, first: bool = True) -> None:
        """A have for ``peer``: deferred by as long as :class:`HavePolicy` lets it wait
        (``holders``: how many of our peers hold it; ``first``: one of the first told of
        a rare piece), with the haves deferred before it. Each peer's deferred haves
        leave with its next batch, or when its own earliest is due (:meth:`_haves_loop`)."""
        wait = self.have_policy.wait_s(
            interested=peer.peer_interested,
            missing=self.picker.peer_missing(peer.key),
            holders=holders,
            first=first,
        )
        if wait <= 0:
            peer.session.send_have(index)
            return
        due = trio.current_time() + wait
        if not peer.session.haves_waiting:
            peer.haves_due_at = due  # (an earlier due left with a batch meanwhile)
        elif due < peer.haves_due_at:
            peer.haves_due_at = due
        peer.session.send_have(index, defer=True)
        if due < self._haves_flush_at:
            self._haves_flush_at = due
            self._haves_flush_moved.set()

    async def finalize_if_done(self) -> None:
        """Once every piece is verified: check the whole SHA-256 and complete the blob."""
        if not self.storage.all_pieces_verified or self.complete.is_set() or self._finalizing:
            return
        self._finalizing = True
        try:
            await self.storage.finalize()
        except DigestMismatchError:
            # Every piece matched its SHA-1 but the blob is not the layer: the torrent
            # itself is wrong. The store has reset; nothing more to fetch from peers.
            log.error("swarm %s: pieces verify but the SHA-256 does not", self.metainfo.sha256)
            self.failed = "digest mismatch"
            self.close()
            raise
        finally:
            self._finalizing = False
        self.stats.completed_at = trio.current_time()
        self.complete.set()
        self.announce_soon()
        for peer in self.peers.values():
            if peer.am_interested:
                peer.am_interested = False
                peer.idle_since = None
                peer.session.send(NotInterested())
        log.info("swarm %s complete", self.metainfo.sha256)

    def _peer_has_something_we_need(self, peer: _Peer) -> bool:
        return self.picker.peer_is_interesting(peer.key)

    def _update_interest(self, peer: _Peer) -> None:
        interesting = not self.storage.all_pieces_verified and self._peer_has_something_we_need(
            peer
        )
        if interesting:
            peer.idle_since = None
            if not peer.am_interested:
                peer.am_interested = True
                peer.session.send(Interested())
        elif peer.am_interested and peer.idle_since is None:
            self._lose_interest(peer, trio.current_time())
        self._refill(peer)

    def _lose_interest(self, peer: _Peer, now: float) -> None:
        """The peer has nothing we need now: say so, or (InterestPolicy) wait a while,
        since it may soon get something; :meth:`_review_interest` decides later."""
        if self.interest.keep_interest(
            idle_s=0.0,
            cooperative=self._cooperative(peer),
            complete=self.storage.all_pieces_verified,
        ):
            peer.idle_since = now
            return
        peer.am_interested = False
        peer.idle_since = None
        peer.session.send(NotInterested())

    def _review_interest(self, peer: _Peer, now: float) -> None:
        """At a tick, for a peer kept interested while idle: interesting again (a
        request given back to the pool, a piece that failed its hash), or time to say
        not interested."""
        since = peer.idle_since
        if since is None:
            return
        if self._peer_has_something_we_need(peer) and not self.storage.all_pieces_verified:
            peer.idle_since = None
        elif not self.interest.keep_interest(
            idle_s=now - since,
            cooperative=self._cooperative(peer),
            complete=self.storage.all_pieces_verified,
        ):
            peer.am_interested = False
            peer.idle_since = None
            peer.session.send(NotInterested())

    @staticmethod
    def _cooperative(peer: _Peer) -> bool:
        """A p2pimage node (it speaks our extensions), not a stock client."""
        return peer.session.conn.peer_extension_id(HAVES_EXTENSION) is not None

    # --- requesting ---------------------------------------------------------------------

    def _refill(self, peer: _Peer) -> None:
        if (
            peer.refill_deferred
            or peer.peer_choking
            or not peer.am_interested
            or peer.idle_since is not None  # (nothing it has is needed)
            or self.storage.complete
        ):
            return
        want = self.picker.pipeline_depth(peer.key) - len(peer.outstanding)
        if want <= 0:
            return
        now = trio.current_time()
        budget = self.origin_share.peer_budget(now, self.picker.settings.request_queue_time)
        if budget is not None:  # registry reads hold most of our downlink (OriginShare)
            asked = sum(b.length for p in self.peers.values() for b, _ in p.outstanding.values())
            want = min(want, int((budget - asked) // self.picker.block_size))
            if want <= 0:
                return
        if not peer.outstanding and not peer.timed_out:
            # The stall clock starts when we start waiting: a spell with nothing to ask
            # of this peer is no stall (else the first request after 20 idle seconds
            # banned it at the next tick; frequent with few pieces, see #15).
            peer.last_data_at = now
            peer.received_at_last_data = self.received_bytes
        part = peer.session.conn.peer_max_block_length
        for block in self.picker.pick(peer.key, want, now):
            peer.outstanding[(block.index, block.begin)] = (block, now)
            if block.length <= part:
                peer.session.send(Request(block.index, block.begin, block.length))
                continue
            # A stock client: ask for the block in parts it accepts (16 KiB, BEP 3).
            end = block.begin + block.length
            begins = range(block.begin, end, part)
            peer.parts[(block.index, block.begin)] = set(begins)
            for begin in begins:
                peer.session.send(Request(block.index, begin, min(part, end - begin)))

    def _refill_all(self) -> None:
        for peer in list(self.peers.values()):
            self._refill(peer)

    # --- uploading ----------------------------------------------------------------------

    def _on_request(self, peer: _Peer, request: Request) -> None:
        if peer.am_choking or not self.storage.has_piece(request.index):
            return  # BEP 3: requests while choked are dropped
        if len(peer.uploads) >= 2048:
            raise PeerClosed("request flood")
        if not peer.uploads:
            peer.waiting_since = trio.current_time()
        peer.uploads.append(request)
        self._upload_wakeup.set()

    def _serve_request(self, peer: _Peer, request: Request) -> None:
        index, begin, length = request.index, request.begin, request.length
        storage, session = self.storage, peer.session
        try:
            if length >= SENDFILE_MIN_BLOCK and storage.complete and session.can_send_file:
                # Plaintext from a complete blob: sendfile, no copy through Python.
                offset = storage.block_offset(index, begin, length)
                session.send_piece_from_file(index, begin, storage, offset, length)
            else:
                data = storage.read_block(index, begin, length)
                length = len(data)
                session.send(Piece(index, begin, data))
        except LocalProtocolError as exc:  # outside the piece: the peer's mistake
            raise PeerClosed(f"bad request: {exc}") from None
        peer.up_bytes_window += length
        self.stats.uploaded += length
        peer.last_sent_at = trio.current_time()

    async def _uploader(self) -> None:
        """Serve the peers' requests, whose first by :attr:`upload_order`, each chosen
        once the swarm's sessions hold at most ``upload_queue_bytes`` unsent."""
        limit = self.settings.upload_queue_bytes
        while True:
            waiting = [p for p in self.peers.values() if p.uploads]
            if not waiting:
                self._upload_wakeup = trio.Event()
                await self._upload_wakeup.wait()
                continue
            now = trio.current_time()
            # A peer that stopped reading holds its bytes, not the link: they do not count.
            unsent = sum(
                p.session.unsent_bytes_moving(now, STUCK_WRITER_S) for p in self.peers.values()
            )
            if unsent > limit:
                with trio.move_on_after(STUCK_WRITER_S):
                    await self._upload_room.park()  # until a session has written a batch
                continue
            picker = self.picker
            key = self.upload_order.next(
                ((p.key, picker.peer_piece_count(p.key), p.waiting_since) for p in waiting),
                now=trio.current_time(),
            )
            peer = self.peers[key]  # type: ignore[index]
            try:
                self._serve_request(peer, peer.uploads.popleft())
            except (PeerClosed, StorageError) as exc:
                # That peer's fault or its block's: the connection goes, the swarm goes on.
                log.warning("closing peer %s: %s", peer.session.address, exc)
                peer.uploads.clear()
                peer.scope.cancel()
                continue
            if peer.uploads:
                peer.waiting_since = trio.current_time()
            await trio.lowlevel.checkpoint()

    # --- housekeeping -------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_tick = trio.current_time()
        quiet = False
        while True:
            if quiet:
                self._quiet_wait = trio.Event()
                with trio.move_on_after(self.settings.idle_tick_s):
                    await self._quiet_wait.wait()
                self._quiet_wait = None
            else:
                await trio.sleep(self.settings.tick_s)
            now = trio.current_time()
            elapsed = max(now - last_tick, 1e-6)
            last_tick = now
            self.stats.ticks += 1
            peers = list(self.peers.values())
            moved = any(p.down_bytes_window or p.up_bytes_window for p in peers)
            # Rates as of the previous tick (this one updates them peer by peer).
            outstanding = sum(b.length for p in peers for b, _ in p.outstanding.values())
            drain = self.timeouts.drain_s(outstanding, sum(p.down_rate for p in peers))
            for peer in peers:
                self._tick_peer(peer, now, elapsed, drain, outstanding)
            for index, told in self.reveal.expired(now):
                self._show_to_all(index, told)
            if self.choker.rechoke_due(now):
                self._rechoke(now)
            self._refill_all()
            quiet = not moved and self._quiet()
            if quiet:
                for peer in self.peers.values():
                    peer.down_rate = peer.up_rate = 0.0  # (true: nothing moved this tick)

    def _quiet(self) -> bool:
        """Whether the tick has nothing to do but token expiries and keep-alives: the
        blob complete, no piece held back for a reveal, and no peer with requests either
        way or interest on either side (no rates, timeouts, interest reviews or
        refills to keep)."""
        if not self.complete.is_set() or self.reveal.hidden:
            return False
        return not any(
            p.outstanding or p.uploads or p.peer_interested or p.am_interested
            for p in self.peers.values()
        )

    def _stir(self) -> None:
        """Activity: a quiet swarm's tick loop goes back to ticking every ``tick_s``."""
        if self._quiet_wait is not None:
            self._quiet_wait.set()

    async def _haves_loop(self) -> None:
        """When the earliest deferred have is due (:meth:`_send_have`), send the haves
        deferred to each peer whose own earliest one is due (a peer whose haves may wait
        longer is not woken for another peer's rare piece); asleep while none wait (an
        idle seed never wakes)."""
        while True:
            with trio.move_on_at(self._haves_flush_at):
                await self._haves_flush_moved.wait()
                self._haves_flush_moved = trio.Event()
                continue  # deferred haves, or one due sooner
            now = trio.current_time()
            later = math.inf
            for peer in self.peers.values():
                if not peer.session.haves_waiting:
                    peer.haves_due_at = math.inf  # (they left with a batch)
                elif peer.haves_due_at <= now:
                    peer.haves_due_at = math.inf
                    peer.session.flush_haves()
                elif peer.haves_due_at < later:
                    later = peer.haves_due_at
            self._haves_flush_at = later

    def _tick_peer(
        self, peer: _Peer, now: float, elapsed: float, drain_s: float, outstanding: int
    ) -> None:
        if peer.info.admission_expired():
            log.info("closing peer %s: the token that admitted it expired", peer.session.address)
            peer.scope.cancel()
            return
        # Exponentially weighted rates over ~2 s.
        alpha = min(1.0, elapsed / 2.0)
        peer.down_rate += alpha * (peer.down_bytes_window / elapsed - peer.down_rate)
        peer.up_rate += alpha * (peer.up_bytes_window / elapsed - peer.up_rate)
        peer.down_bytes_window = peer.up_bytes_window = 0
        self.picker.update_rate(peer.key, peer.down_rate)
        request_timeout = self.timeouts.request_timeout(drain_s)
        timed_out = [
            (block, sent)
            for block, sent in peer.outstanding.values()
            if now - sent > request_timeout
        ]
        self.stats.requests_timed_out += len(timed_out)
        if timed_out:
            peer.timed_out = True
        for block, _ in timed_out:
            del peer.outstanding[(block.index, block.begin)]
            peer.parts.pop((block.index, block.begin), None)
            self.picker.request_timed_out(peer.key, block)
        if any(sent < peer.answered_sent_at for _, sent in timed_out):
            # It serves later requests and not this one: it claims pieces it will not
            # send (a liar keeps the swarm's other sources, origin readers included, off
            # the pieces it claims).
            self.ban(peer.key, f"skipped a request for {request_timeout:.3g} s")
            return
        silent = now - peer.last_data_at
        if peer.outstanding and self.timeouts.stalled(
            silent_s=silent,
            others_bytes=self.received_bytes - peer.received_at_last_data,
            swarm_silent_s=now - self.received_at,
            outstanding_bytes=outstanding,
        ):
            # Banned, not just dropped: dialed again, a peer that unchokes and then sits
            # on our requests would hold the pieces it claims hostage once more (and the
            # origin readers leave pieces a peer claims to the peers).
            self.ban(peer.key, f"no block for {silent:.3g} s")
            return
        self._review_interest(peer, now)
        if now - peer.last_sent_at > self.settings.keepalive_s:
            peer.session.send(KeepAlive())
            peer.last_sent_at = now

    def _rechoke(self, now: float) -> None:
        """Ask the choker whom to unchoke, and tell the peers whose state changed. Called
        every ``rechoke_interval_s`` and when a peer arrives, leaves or changes interest."""
        stats = [
            PeerStats(
                key=p.key,
                interested=p.peer_interested,
                download_rate=p.down_rate,
                upload_rate=p.up_rate,
            )
            for p in self.peers.values()
        ]
        unchoked = self.choker.rechoke(stats, seeding=self.storage.complete, now=now)
        for peer in self.peers.values():
            should_choke = peer.key not in unchoked
            if should_choke != peer.am_choking:
                peer.am_choking = should_choke
                peer.session.send(Choke() if should_choke else Unchoke())
                if should_choke:
                    peer.uploads.clear()

    # --- streaming ----------------------------------------------------------------------

    def set_read_cursor(self, offset: int) -> None:
        """Tell the picker where the runtime is reading: the piece under ``offset`` is
        urgent, the next ``stream_window`` pieces get deadlines."""
        index = min(offset // self.metainfo.piece_length, self.metainfo.num_pieces - 1)
        self.picker.set_blocked(None if self.storage.has_piece(index) else index)
        self.picker.set_cursor(
            index,
            self.settings.stream_window,
            trio.current_time(),
            self.metainfo.piece_length / self.settings.stream_rate,
        )
        self._refill_all()

    async def stream(
        self,
        start: int = 0,
        end: int | None = None,
        chunk_size: int = 1024 * 1024,
        *,
        stall_timeout_s: float | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Yield the blob ``[start, end)`` in order while it downloads, steering the picker:
        the piece under the read position is urgent, the window after it has deadlines.

        With ``stall_timeout_s``, raises :class:`SwarmStalled` when the swarm as a whole
        has verified no piece for that long while the reader waits. A reader that merely
        waits for the swarm's frontier (in a cold start the registry sends the layer
        piece by piece) is not stalled as long as pieces keep arriving.
        """
        if chunk_size <= 0:
            raise LocalProtocolError(f"bad chunk size {chunk_size}")
        self._streams += 1
        try:
            cursor = self.storage.cursor(start, end)
            gather = min(self.settings.stream_gather_bytes, chunk_size)
            first = True
            while not cursor.done:
                if cursor.missing():
                    await self._wait_missing(cursor, stall_timeout_s)
                await cursor.wait()  # a checkpoint once the piece is there
                if not first and gather > 0:
                    await self._gather(cursor, gather)
                first = False
                yield cursor.read(chunk_size)
            if not self.closed.is_set():
                self.picker.set_blocked(None)
        finally:
            self._streams -= 1
            if self._streams == 0 and self._close_storage_when_idle:
                self.storage.close()

    async def _gather(self, cursor: BlobCursor, nbytes: int) -> None:
        """Return once ``nbytes`` verified bytes (or the rest of the range) lie ahead of
        the reader, or after ``stream_gather_s``, whichever comes first."""
        with trio.move_on_after(self.settings.stream_gather_s):
            while True:
                ready = cursor.ready(nbytes)
                if ready >= nbytes or cursor.position + ready >= cursor.end:
                    return
                await cursor.wait_at(cursor.position + ready)

    async def _wait_missing(self, cursor: BlobCursor, stall_timeout_s: float | None) -> None:
        """The reader's policy while the piece under its position is missing: make that
        piece urgent, and give up with :class:`SwarmStalled` once the swarm as a whole has
        verified nothing for ``stall_timeout_s``."""
        if not self.closed.is_set():
            self.set_read_cursor(cursor.position)
        if stall_timeout_s is None:
            await cursor.wait()
            return
        waiting_since = trio.current_time()
        while True:
            with trio.move_on_after(stall_timeout_s):
                await cursor.wait()
                return
            last = max(waiting_since, self.stats.last_progress_at or 0.0)
            if trio.current_time() - last >= stall_timeout_s:
                raise SwarmStalled(
                    f"no piece of {self.metainfo.sha256} verified for {stall_timeout_s:g} s"
                )

    def release_storage(self) -> None:
        """The swarm has ended: close its store now, or when the last reader finishes.

        A release order (or the tracker's linger rule) can end a swarm while the runtime
        is still reading the complete blob through :meth:`stream`; the file must stay
        open for that reader."""
        if self._streams == 0:
            self.storage.close()
        else:
            # Persist the verified pieces now: the reader may be abandoned rather than
            # closed (its node stopping), and a restart must still find them.
            self._close_storage_when_idle = True
            self.storage.flush()

    async def wait_changed(self) -> None:
        await self._changed.wait()
