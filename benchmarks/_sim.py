"""A discrete-event model of one layer spreading through a cluster, driven by the engine's
own policies. Every decision a node makes comes from the object the trio engine uses:
requests from its :class:`~p2pimage.swarm.picker.PiecePicker` (its pipeline depth, in
blocks of the engine's block size), unchoking from its
:class:`~p2pimage.swarm.choker.Choker`, whose waiting requests an uploader serves first
from its :class:`~p2pimage.swarm.policy.UploadOrder`, dialling from its
:class:`~p2pimage.swarm.policy.DialPolicy`, which peer hears of an origin piece first from
its :class:`~p2pimage.swarm.policy.RevealPolicy`, announce timing and events from its
:class:`~p2pimage.swarm.policy.AnnounceSchedule`, which origin pieces to read, when to stop
and when to renew the lease from its :class:`~p2pimage.swarm.policy.OriginRange` and
:func:`~p2pimage.swarm.policy.follow_origin`, which silent peer to drop from its
:class:`~p2pimage.swarm.policy.PeerTimeouts`; peer lists, origin ranges, work stealing and
release orders from the real :class:`~p2pimage.tracker.TrackerPolicy`. The settings are
the engine's defaults (:class:`~p2pimage.swarm.engine.SwarmSettings`,
:class:`~p2pimage.tracker.client.AnnounceSettings`).

Only the network is modelled, as a time-stepped fluid (step ``dt``): each node's uplink
serves its queue of block requests in the upload order (by what the uploader knows of
each sender at that step); each node's downlink caps what it takes in per step, and an
origin fetcher's registry reads share that one downlink with its peers (the reader
first, as the engine's download limiter lets registry reads go ahead of the peers'
blocks, the peers sharing the rest); the registry's egress (``origin_rate``) is shared
fairly by the readers. One request is one block of the engine's block size
(``SwarmSettings.block_size``, whole pieces up to 256 KiB, as between p2pimage peers); a
piece is held once all its blocks arrived. A connection or a message takes one step;
requests, haves and interest go ahead of queued piece data, as the engine's control queue
sends them (``SimParams.requests_behind_uploads`` models the older engine, where a request
waited behind the blocks its sender had queued for the same peer).

With ``tracker=False`` the model runs the swarm benchmark's setup (``benchmarks.swarm``):
no tracker, every node is given every other node, and the fetchers read the static
``origin_plan`` ranges from the start.
"""

from __future__ import annotations

import gc
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter

from p2pimage.bound import direct_pull_time, kumar_ross_bound
from p2pimage.metainfo.torrent import choose_piece_length
from p2pimage.swarm.choker import Choker, PeerStats
from p2pimage.swarm.engine import SwarmSettings
from p2pimage.swarm.origin import MAX_REQUEST_BYTES
from p2pimage.swarm.picker import BlockRequest, PiecePicker
from p2pimage.swarm.policy import (
    AnnounceSchedule,
    DialPolicy,
    OriginRange,
    OriginShare,
    PeerTimeouts,
    RevealPolicy,
    UploadOrder,
    follow_origin,
)
from p2pimage.tracker import AnnounceRequest, Event, PolicyConfig, TrackerPolicy
from p2pimage.tracker import SwarmRecord as TrackerSwarm
from p2pimage.tracker.client import AnnounceSettings

__all__ = ["SimParams", "SimResult", "arrival_order", "simulate"]

_left = attrgetter("left")
_dst = attrgetter("dst")
# A node's pieces held (one byte each, 0 or 1) as the digits "0" and "1".
_BINARY_DIGITS = bytes.maketrans(b"\x00\x01", b"01")

_HOST = "10.0.0.1"
_PORT0 = 10_000
_REGISTRY = "http://registry"
_REPO = "sim/layer"
_DIGEST = "sha256:" + "0" * 64


def _tracker_config() -> PolicyConfig:
    # The daemon's defaults (until 2026-11-29 23:59 ``min interval`` 1 s here, against the
    # daemon's 5 s; the daemon's is 2 s now: docs/benchmarks.md, "The tail at 500-5,000
    # nodes").
    return PolicyConfig()


@dataclass
class SimParams:
    nodes: int = 200
    size: int = 256 * 1024 * 1024
    pieces: int | None = None  # None: as the sidecar cuts the layer (choose_piece_length)
    origin_rate: float = 64 * 1024 * 1024  # registry egress, bytes/s
    up: float = 16 * 1024 * 1024  # per node
    down: float = 16 * 1024 * 1024
    dt: float = 0.05
    announce_jitter_s: float = 0.5  # nodes start announcing within this
    tracker: bool = True  # False: the swarm benchmark's static setup
    swarm: SwarmSettings = field(default_factory=SwarmSettings)
    announce: AnnounceSettings = field(default_factory=AnnounceSettings)
    policy: PolicyConfig = field(default_factory=_tracker_config)
    # False (the engine now): a node's requests go ahead of the piece data it has queued
    # (``PeerSession``'s control queue, branch ``simpolicy``). True: the older engine, where
    # a request to a peer waited behind the blocks already queued for that same peer (the
    # connection's send queue), not behind its uploads to other peers (a what-if;
    # docs/benchmarks.md, "The model's request order").
    requests_behind_uploads: bool = False
    timeline: bool = False  # record the time course, one row per simulated second
    seed: int = 1
    max_time_s: float = 3600.0


@dataclass
class SimResult:
    nodes: int
    pieces: int
    t_all_s: float
    t_median_s: float
    t_bound_s: float
    t_direct_s: float
    registry_copies: float
    t_origin_s: float  # the last registry read
    fetchers: int
    released: int
    events: int
    stalls: int  # peers dropped for sending nothing within the stall timeout
    t_p10_s: float  # the 10th percentile node
    t_p99_s: float  # the 99th percentile node
    timeline: list[dict[str, float]] | None = None  # SimParams.timeline: see _timeline_row


@dataclass(eq=False, slots=True)
class _Transfer:
    src: int
    dst: int
    piece: int
    begin: int  # the block's offset in the piece
    length: int
    left: float
    ready: float = 0.0  # when the request reaches the uploader


@dataclass(eq=False, slots=True)
class _Node:
    index: int
    picker: PiecePicker[int]
    choker: Choker[int]
    reveal: RevealPolicy[int]
    schedule: AnnounceSchedule
    neighbors: dict[int, None] = field(default_factory=dict)  # in connection order
    unchoked: set[int] = field(default_factory=set)  # peers we let request
    # Peers that let us request (whose ``unchoked`` holds us), mirrored so that a refill
    # need not touch every neighbour's node (a cache miss each at 5,000 nodes).
    unchoking: set[int] = field(default_factory=set)
    queue: deque[_Transfer] = field(default_factory=deque)  # uploads, in order
    # When each requester was last served (a block of its started): arrival order's
    # ``waiting_since`` for a requester with more requests queued (Swarm._uploader).
    served: dict[int, float] = field(default_factory=dict)
    out: dict[int, int] = field(default_factory=dict)  # pieces in flight from each peer
    recv: dict[int, float] = field(default_factory=dict)  # bytes from each peer this tick
    rate: dict[int, float] = field(default_factory=dict)
    depth: dict[int, int] = field(default_factory=dict)  # picker.pipeline_depth, per rate
    last_data: dict[int, tuple[float, float]] = field(default_factory=dict)  # from each
    # peer: (when, ``received`` then)
    received: float = 0.0  # bytes from all peers
    received_at: float = 0.0  # when the last of them arrived
    banned: set[int] = field(default_factory=set)
    # Pieces held, one byte each (a set of 1,024 ints is ~32 KiB per node, touched at
    # random by every have: at 5,000 nodes the model waits on memory).
    have: bytearray = field(default_factory=bytearray)
    num_have: int = 0
    done_at: float | None = None
    released: bool = False
    next_announce: float = 0.0
    last_announce: float = -math.inf
    origin: OriginRange | None = None  # the latest range (its progress is reported)
    reading: bool = False  # ``origin`` is still being read
    request: list[int] | None = None  # [next piece, stop) of the registry read in flight
    share: OriginShare | None = None  # a fetcher's: what its registry reads leave its peers
    partial: float = 0.0  # bytes of request[0] read so far


def _timeline_row(
    t: float, acc: dict[str, float], nodes: list[_Node], pieces: int, p: SimParams
) -> dict[str, float]:
    """The last simulated second: link use and where the swarm stands."""
    steps, n = acc["steps"], len(nodes)
    leechers = [node for node in nodes if node.done_at is None]
    union = 0
    for node in nodes:
        union |= int.from_bytes(node.have, "little")
    return {
        "t": round(t, 2),
        # Shares of all uplinks' and downlinks' capacity used.
        "up_use": round(acc["up"] / (steps * p.dt * p.up * n), 3),
        "down_use": round(acc["down"] / (steps * p.dt * p.down * n), 3),
        # Share of uplinks with capacity left while requests for them were still on
        # their way (queued behind the requester's own uploads).
        "idle_in_transit": round(acc["idle_in_transit"] / (steps * n), 3),
        "held": round(sum(node.num_have for node in nodes) / (n * pieces), 3),
        "in_swarm": union.bit_count() / pieces,
        "queued_mib": round(sum(sum(map(_left, node.queue)) for node in nodes) / n / 2**20, 2),
        "in_flight": round(
            sum(sum(node.out.values()) for node in leechers) / max(1, len(leechers)), 1
        ),
        "done": n - len(leechers),
    }


def arrival_order(
    queue: Sequence[_Transfer], served: dict[int, float], now: float
) -> Iterable[_Transfer]:
    """An uploader's waiting requests (``queue``, in arrival order) in the order the
    engine's uploader serves them in ``UploadOrder("arrival")``: the blocks already
    started first; then the requester waiting longest (since its first waiting request
    came, or since ``served[requester]``, when it was last served), one block each in
    turn, each one's requests in order. Requests not yet arrived (``ready > now``) are
    left out. Not the queue's order: there a requester's share of the link grew with the
    requests it kept queued, and a node that asked for few (a slow start, an origin
    fetcher whose peers' rates were measured while its registry reads held its
    downlink) stayed behind.

    A step serves a few blocks, so the later turns are worked out only when reached
    (the first turn is one C-level pass: each requester's first request)."""
    heads = dict(zip(map(_dst, reversed(queue)), reversed(queue), strict=True))  # first wins
    get = served.get
    first = sorted(
        (t for t in heads.values() if t.ready <= now),
        key=lambda t: (t.left == t.length, max(get(t.dst, -1.0), t.ready)),
    )
    if len(heads) == len(queue):
        return first
    return chain(first, _later_turns(queue, heads, served, now))


def _later_turns(
    queue: Sequence[_Transfer], heads: dict[int, _Transfer], served: dict[int, float], now: float
) -> Iterator[_Transfer]:
    """:func:`arrival_order` after the first turn: each requester's second request, in
    the same order of requesters, then the third..."""
    waiting: dict[int, list[_Transfer]] = {}
    for t in queue:
        if t.ready > now or heads[t.dst] is t:
            continue
        mine = waiting.get(t.dst)
        if mine is None:
            waiting[t.dst] = [t]
        else:
            mine.append(t)
    get = served.get
    turns = [
        mine
        for _, mine in sorted(
            waiting.items(), key=lambda item: max(get(item[0], -1.0), heads[item[0]].ready)
        )
    ]
    for turn in range(max(map(len, turns), default=0)):
        for mine in turns:
            if len(mine) > turn:
                yield mine[turn]


def simulate(p: SimParams) -> SimResult:
    """Run the model once (deterministic for a given ``p.seed``)."""
    # The cyclic garbage collector is off for the run: the model keeps millions of
    # objects alive at 5,000 nodes, and the collections its allocations set off walked
    # them all (40 % of a 5,000-node run: 467 -> 276 CPU s, the same results). What the
    # run leaves in cycles (~18,000 objects at 200 nodes) is collected once it is back on.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(p)
    finally:
        if enabled:
            gc.enable()


def _simulate(p: SimParams) -> SimResult:
    rng = random.Random(p.seed)
    pieces = p.pieces or -(-p.size // choose_piece_length(p.size))
    piece_len = -(-p.size // pieces)
    last_len = p.size - (pieces - 1) * piece_len
    block_len = min(p.swarm.block_size, piece_len)  # the engine's requests

    def piece_size(i: int) -> int:
        return last_len if i == pieces - 1 else piece_len

    ss, an = p.swarm, p.announce
    dial = DialPolicy(ss.dial_target, ss.max_peers)
    timeouts = PeerTimeouts(ss.request_timeout_s, ss.stall_timeout_s)
    stalls = 0
    policy = TrackerPolicy(p.policy, rng=random.Random(p.seed + 1))
    swarm = TrackerSwarm()
    url = f"{_REGISTRY}/v2/{_REPO}/blobs/{_DIGEST}"

    def make_node(i: int) -> _Node:
        node_rng = random.Random(p.seed * 7919 + i)
        return _Node(
            i,
            PiecePicker(
                pieces, piece_len, p.size, block_size=block_len, rng=node_rng, settings=ss.picker
            ),
            Choker(
                upload_slots=ss.upload_slots,
                optimistic_slots=ss.optimistic_slots,
                rechoke_interval=ss.rechoke_interval_s,
                rng=node_rng,
            ),
            RevealPolicy(
                enabled=ss.reveal_origin_pieces, timeout_s=ss.reveal_timeout_s, rng=node_rng
            ),
            an.schedule(dial_target=ss.dial_target),
            have=bytearray(pieces),
        )

    # One int object per node, allocated together and used for every mention of the node
    # (dict keys, sets, transfers): a peer key computed afresh (an announce's port minus
    # the base) would be a new object, scattered in memory, and each dict lookup with it
    # would compare the two objects' values (cache misses at 5,000 nodes) instead of
    # finding the same object.
    ids = list(range(p.nodes))
    nodes = [make_node(i) for i in ids]
    pickers = [node.picker for node in nodes]
    # Every node's ``have`` again, in one array (node k's piece i at k * pieces + i): the
    # have broadcast's check touches one cache line, not a node object and its bytearray.
    holds = bytearray(p.nodes * pieces)
    fetchers: set[int] = set()  # the nodes ever given an origin range
    upload_order = UploadOrder(ss.upload_order)
    by_need = upload_order.mode != "arrival"
    min_depth = nodes[0].picker.pipeline_depth(-1)  # a peer whose rate is not known yet
    queue_time_s = ss.picker.request_queue_time
    done = 0
    for node in nodes:
        node.next_announce = rng.uniform(0, p.announce_jitter_s) if p.tracker else math.inf
    registry_bytes = 0.0
    t_origin = 0.0
    announces = 0
    haves = 0  # haves received, each one an event
    shows = 0  # show_to_all calls (a nested one may tell a node what it is telling)
    now = 0.0
    dirty: set[int] = set()

    # ------------------------------------------------------------------ the engine's calls

    def rechoke(node: _Node) -> None:
        stats = [
            PeerStats(
                key=k,
                interested=nodes[k].done_at is None,
                download_rate=node.rate.get(k, 0.0),
            )
            for k in node.neighbors
        ]
        unchoked = node.choker.rechoke(stats, seeding=node.done_at is not None, now=now)
        me = node.index
        for k in node.unchoked - unchoked:
            nodes[k].unchoking.discard(me)
            choked(node, k)
        for k in unchoked - node.unchoked:
            nodes[k].unchoking.add(me)
            dirty.add(k)
        node.unchoked = unchoked

    def choked(node: _Node, k: int) -> None:
        """``node`` chokes ``k``: the requests ``k`` queued at it are dropped (BEP 3)."""
        node.queue = deque(t for t in node.queue if t.dst != k)
        other = nodes[k]
        other.out.pop(node.index, None)
        other.picker.peer_choked(node.index)
        dirty.add(k)

    def bitfield(node: _Node) -> bytes | None:
        # Piece 0 the most significant bit: the held bytes read as one binary numeral.
        visible = int(node.have.translate(_BINARY_DIGITS), 2)
        for i in node.reveal.hidden:
            visible &= ~(1 << (pieces - 1 - i))
        if not visible:
            return None
        return (visible << (-pieces % 8)).to_bytes((pieces + 7) // 8, "big")

    def connect(a: int, b: int) -> None:
        """``a`` dialled ``b``; ``b`` accepts while under its accept limit."""
        na, nb = nodes[a], nodes[b]
        if b in na.neighbors or a == b or nb.released or na.released:
            return
        if b in na.banned or a in nb.banned:
            return
        if not dial.may_accept(len(nb.neighbors)) or not dial.may_accept(len(na.neighbors)):
            return
        na.neighbors[b] = None
        nb.neighbors[a] = None
        na.last_data[b] = (now, na.received)
        nb.last_data[a] = (now, nb.received)
        for x, y in ((na, nb), (nb, na)):
            bits = bitfield(y)
            if bits is not None:
                x.picker.peer_bitfield(y.index, bits)
        rechoke(na)
        rechoke(nb)
        dirty.add(a)
        dirty.add(b)

    def lose(node: _Node, k: int) -> None:
        """``node``'s connection to ``k`` has closed: its side of it."""
        del node.neighbors[k]
        node.out.pop(k, None)
        node.rate.pop(k, None)
        node.depth.pop(k, None)
        node.last_data.pop(k, None)
        node.picker.peer_lost(k)
        node.queue = deque(t for t in node.queue if t.dst != k)
        node.unchoked.discard(k)
        nodes[k].unchoking.discard(node.index)
        for index in node.reveal.peer_lost(k):
            show_to_all(node, index, k)
        rechoke(node)
        dirty.add(node.index)

    def disconnect(node: _Node) -> None:
        """``node`` closes every connection (a release order)."""
        for k in list(node.neighbors):
            lose(nodes[k], node.index)
        node.neighbors.clear()
        node.queue.clear()

    def ban(node: _Node, k: int) -> None:
        """``node`` drops and bans ``k`` (``Swarm.ban``: no block within the stall timeout)."""
        nonlocal stalls
        stalls += 1
        node.banned.add(k)
        lose(node, k)
        lose(nodes[k], node.index)

    def add_peers(node: _Node, candidates: list[int]) -> None:
        for b in dial.to_dial(
            candidates,
            connected=len(node.neighbors),
            dialing=0,
            skip=lambda b: b in node.neighbors or b == node.index,
        ):
            connect(node.index, b)

    def tell(src: _Node, dst: int, piece: int) -> None:
        """``dst`` receives ``have piece`` from ``src``."""
        nonlocal haves
        haves += 1
        target = nodes[dst]
        target.picker.peer_have(src.index, piece)
        told = target.reveal.peer_has(piece)
        if told is not None:
            show_to_all(target, piece, told)
        if not target.have[piece]:
            dirty.add(dst)

    def show_to_all(node: _Node, piece: int, told: int | None) -> None:
        """``node`` tells every peer (but ``told``) of ``piece``; without
        the need order (``SwarmSettings.upload_order``), only those not known to have it."""
        nonlocal haves, shows
        shows += 1
        me, picker = node.index, node.picker
        shown_before = shows
        to_all = upload_order.mode == "need"  # as the engine: Swarm._announce
        for k in list(node.neighbors) if to_all else picker.peers_without(piece, node.neighbors):
            # A have that reached ``node`` meanwhile (a hidden piece shown on by a peer
            # it told, in a nested show_to_all) may say that ``k`` has the piece: then
            # ``k`` is not told.
            if k == told or (not to_all and shows != shown_before and picker.peer_has(k, piece)):
                continue
            haves += 1
            # tell(node, k, piece), inlined: the model's commonest event. At 5,000 nodes
            # it waits on memory: it reads the picker from a list and the held flag from
            # ``holds``, not through ``k``'s node object.
            pickers[k].peer_have(me, piece)
            # Only an origin fetcher ever hides a piece (RevealPolicy.reveal, on an
            # origin read): nobody else's reveal policy need be asked.
            if k in fetchers:
                shown = nodes[k].reveal.peer_has(piece)
                if shown is not None:
                    show_to_all(nodes[k], piece, shown)
            if not holds[k * pieces + piece]:
                dirty.add(k)

    def cancel(node: _Node, cancels: list[tuple[int, BlockRequest]]) -> None:
        for peer, block in cancels:
            queue = nodes[peer].queue
            for t in queue:
                if t.dst == node.index and t.piece == block.index and t.begin == block.begin:
                    queue.remove(t)
                    node.out[peer] -= 1
                    break

    def got_piece(node: _Node, piece: int, from_origin: bool) -> None:
        if not node.have[piece]:
            node.have[piece] = 1
            holds[node.index * pieces + piece] = 1
            node.num_have += 1
        cancel(node, node.picker.we_have(piece))
        if from_origin:
            candidates = node.picker.peers_without(piece, node.neighbors)
            target = node.reveal.reveal(piece, candidates, now)
            if target is not None:
                tell(node, target, piece)
                check_done(node)
                return
        show_to_all(node, piece, None)
        check_done(node)

    def check_done(node: _Node) -> None:
        nonlocal done
        if node.num_have == pieces and node.done_at is None:
            node.done_at = now
            done += 1
            news(node)
            rechoke(node)

    def news(node: _Node) -> None:
        """Something worth telling the tracker now (``Swarm.announce_soon``)."""
        if p.tracker and not node.released:
            soonest = max(now, node.last_announce + node.schedule.min_gap_s)
            node.next_announce = min(node.next_announce, soonest)

    backlogs: dict[int, dict[int, float]] = {}

    def need_key(node: _Node, held: dict[int, int], t: _Transfer) -> tuple[int, float]:
        count = held.get(t.dst)
        if count is None:
            count = held[t.dst] = node.picker.peer_piece_count(t.dst)
        return upload_order.key(count, t.ready, now)

    def backlog(node: _Node, peer: int) -> float:
        """Bytes ``node`` has queued for ``peer`` (this step; requests from ``peer``
        still on their way are not queued yet): its requests to ``peer`` wait behind them,
        as the engine sends them through the same connection's send queue. Its uploads to
        other peers go through their own connections (and the download limiter no longer
        holds small reads behind origin reads: ``CONTROL_READ_MAX``), so they hold nothing."""
        per_peer = backlogs.get(node.index)
        if per_peer is None:
            per_peer = backlogs[node.index] = {}
            get, t_now = per_peer.get, now
            for t in node.queue:
                if t.ready <= t_now:
                    dst = t.dst
                    per_peer[dst] = get(dst, 0.0) + t.left
        return per_peer.get(peer, 0.0)

    def refill(node: _Node) -> None:
        if node.done_at is not None:
            return
        me, picker, out, depth = node.index, node.picker, node.out, node.depth
        unchoking = node.unchoking
        room: int | None = None  # blocks the fetcher's downlink leaves (Swarm._refill)
        if node.share is not None:
            budget = node.share.peer_budget(now, queue_time_s)
            if budget is not None:
                room = int((budget - sum(out.values()) * block_len) // block_len)
                if room <= 0:
                    return
        for peer in node.neighbors:
            # The engine asks only peers it is interested in and not choked by, for up to
            # their pipeline depth (cached per rate update and per block received while
            # slow start lasts: the hot path of the model).
            # ``pick`` returns nothing for a peer that is not interesting (has nothing we
            # want), so it is not asked ``peer_is_interesting`` first.
            if peer not in unchoking:
                continue
            want = depth.get(peer, min_depth) - out.get(peer, 0)
            if room is not None:
                want = min(want, room)
            if want <= 0:
                continue
            blocks = picker.pick(peer, want, now)
            if blocks:
                if room is not None:
                    room -= len(blocks)
                src = nodes[peer]
                if not out.get(peer, 0):
                    # The engine's stall clock starts when we start waiting (Swarm._refill):
                    # a spell with nothing to ask of this peer is no stall.
                    node.last_data[peer] = (now, node.received)
                ready = now + backlog(node, peer) / p.up if p.requests_behind_uploads else now
                src.queue.extend(
                    _Transfer(peer, me, b.index, b.begin, b.length, b.length, ready) for b in blocks
                )
                out[peer] = out.get(peer, 0) + len(blocks)

    # ------------------------------------------------------------------ origin reads

    def start_range(node: _Node, first: int, end: int) -> None:
        fetchers.add(node.index)
        if node.share is None:
            node.share = OriginShare(p.down)  # Swarm.origin_share
        node.origin = OriginRange(first, end)
        node.reading = True
        node.picker.set_range_priority(first, end, 0)  # Swarm.reserve_for_origin
        next_request(node)

    def give_back(node: _Node, back: tuple[int, int] | None) -> None:
        if back is not None:
            node.picker.set_range_priority(back[0], back[1], 1)  # Swarm.return_to_peers
            dirty.add(node.index)

    def stop_range(node: _Node) -> None:
        if node.origin is not None and node.reading:
            give_back(node, node.origin.shrink(node.origin.next_index))
            node.reading = False
            node.request = None
            news(node)  # the announcer reports a finished range at once

    def next_request(node: _Node) -> None:
        assert node.origin is not None
        step = node.origin.next_request(
            lambda i: node.have[i] == 1,
            lambda i: node.picker.availability(i) > 0,
            piece_size,
            MAX_REQUEST_BYTES,
        )
        give_back(node, step.give_back)
        node.partial = 0.0
        if step.read is None:
            stop_range(node)
        else:
            node.request = list(step.read)

    def origin_bytes(node: _Node, got: float) -> None:
        if node.share is not None:
            node.share.read(round(got), now)  # Swarm.pace_download
        node.partial += got
        while node.request is not None and node.origin is not None:
            index, stop = node.request
            size = piece_size(index)
            if node.partial < size:
                return
            node.partial -= size
            held = node.picker.availability(index) > 0
            have = node.have[index] == 1
            if not node.origin.piece_arrived(index, have=have, held_by_peer=held):
                give_back(node, node.origin.shrink(index))
                next_request(node)
                continue
            if not have:
                got_piece(node, index, from_origin=True)
            if node.origin.advanced(index):
                news(node)  # renew the lease
            if index + 1 >= stop:
                next_request(node)
            else:
                node.request[0] = index + 1

    # ------------------------------------------------------------------ the tracker

    def announce(node: _Node) -> None:
        nonlocal announces
        announces += 1
        complete = node.done_at is not None
        event = node.schedule.event(complete)
        held = node.num_have * piece_len - (piece_len - last_len) * node.have[pieces - 1]
        left = 0 if complete else p.size - held
        req = AnnounceRequest(
            info_hash=b"\x01" * 20,
            peer_id=node.index.to_bytes(20, "big"),
            port=_PORT0 + node.index,
            left=left,
            event=event,
            numwant=an.numwant,
            pieces=pieces,
            digest=_DIGEST,
            repo=_REPO,
            origin_next=node.origin.next_index if node.origin is not None else None,
        )
        out = policy.announce(swarm, req, host=_HOST, now=now, registry_url=_REGISTRY)
        node.last_announce = now
        add_peers(node, [ids[port - _PORT0] for _, port in out.peers])
        current = node.origin if node.reading else None
        follow = follow_origin(current, url if current is not None else None, out.origin)
        if current is not None and follow.action == "shrink":
            give_back(node, current.shrink(follow.end))
        elif current is not None and follow.action == "extend":
            added = current.extend(follow.end)
            if added is not None:
                node.picker.set_range_priority(added[0], added[1], 0)
        else:
            if current is not None:
                stop_range(node)
            if follow.action == "start":
                start_range(node, follow.first, follow.end)
        if out.release and complete:
            node.released = True
            node.next_announce = math.inf
            disconnect(node)
            stopped = AnnounceRequest(
                info_hash=req.info_hash,
                peer_id=req.peer_id,
                port=req.port,
                left=0,
                event=Event.STOPPED,
            )
            policy.announce(swarm, stopped, host=_HOST, now=now)
            return
        wait = node.schedule.succeeded(
            event,
            interval=out.interval,
            min_interval=out.min_interval,
            complete=complete,
            peers=len(node.neighbors),
            members=out.complete + out.incomplete,
        )
        node.next_announce = now + wait

    # ------------------------------------------------------------------ the benchmark's setup

    if not p.tracker:
        from benchmarks.swarm import origin_plan

        for node in nodes:
            others = [k for k in ids if k != node.index]
            rng.shuffle(others)
            add_peers(node, others)
        for index, first, end in origin_plan(pieces, p.nodes):
            start_range(nodes[index], first, end)

    # ------------------------------------------------------------------ the network

    next_tick = ss.tick_s
    timeline: list[dict[str, float]] | None = [] if p.timeline else None
    acc = dict.fromkeys(("steps", "up", "down", "idle_in_transit"), 0.0)
    next_row = 1.0
    last_tick = 0.0
    while now < p.max_time_s:
        for node in nodes:
            if node.next_announce <= now:
                announce(node)
        # The registry: its egress shared fairly by the readers, each reader first on its
        # own downlink (Swarm.pace_download goes ahead of the peers' blocks), the peers
        # sending to it sharing what is left.
        down_left = [p.down * p.dt] * len(nodes)
        readers = [n for n in nodes if n.request is not None]
        if readers:
            caps = sorted((p.down * p.dt, n.index) for n in readers)
            budget = p.origin_rate * p.dt
            t_origin = now + p.dt
            for position, (cap, index) in enumerate(caps):
                got = min(cap, budget / (len(caps) - position))
                budget -= got
                registry_bytes += got
                down_left[index] -= got
                origin_bytes(nodes[index], got)
        # Uplinks and downlinks.
        up_step = p.up * p.dt
        for node in nodes:
            if not node.queue:
                continue
            budget = up_step
            finished = []
            me = node.index
            order: Iterable[_Transfer] = node.queue
            if len(node.queue) > 1:
                if by_need:
                    # The neediest requester first (the engine's Swarm._uploader asks
                    # UploadOrder at each block it serves); each one's requests in order.
                    held: dict[int, int] = {}
                    order = sorted(node.queue, key=lambda t: need_key(node, held, t))
                else:
                    order = arrival_order(node.queue, node.served, now)
            for t in order:
                if budget <= 0:
                    break
                if t.ready > now:
                    continue
                dst = t.dst
                take = t.left  # min(budget, downlink left, block left), inlined
                if budget < take:
                    take = budget
                if down_left[dst] < take:
                    take = down_left[dst]
                if take <= 0:
                    continue
                if t.left == t.length:
                    node.served[dst] = now  # the uploader picked this block
                receiver = nodes[dst]
                receiver.received += take
                receiver.received_at = now
                receiver.last_data[me] = (now, receiver.received)
                t.left -= take
                budget -= take
                down_left[dst] -= take
                if t.left <= 1e-9:
                    finished.append(t)
            if timeline is not None:
                acc["up"] += up_step - budget
                if budget > 1e-9 and any(t.ready > now for t in node.queue):
                    acc["idle_in_transit"] += 1
            for t in finished:
                node.queue.remove(t)
                dst = nodes[t.dst]
                dst.out[node.index] -= 1
                dst.recv[node.index] = dst.recv.get(node.index, 0.0) + t.length
                dirty.add(dst.index)
                if holds[t.dst * pieces + t.piece]:
                    continue
                cancel(dst, dst.picker.block_received(node.index, t.piece, t.begin))
                # Slow start: the depth grows with each block until the rate is measured.
                dst.depth[node.index] = dst.picker.pipeline_depth(node.index)
                if dst.picker.is_finished(t.piece):
                    got_piece(dst, t.piece, from_origin=False)
        if timeline is not None:
            acc["steps"] += 1
            acc["down"] += sum(p.down * p.dt - d for d in down_left)
            if now + p.dt >= next_row:
                timeline.append(_timeline_row(now + p.dt, acc, nodes, pieces, p))
                acc = dict.fromkeys(acc, 0.0)
                next_row += 1.0
        now += p.dt
        if now >= next_tick:
            # The engine's tick: rates (EWMA over ~2 s), reveal timeouts, rechoke.
            elapsed = now - last_tick
            alpha = min(1.0, elapsed / 2.0)
            for node in nodes:
                if node.released:
                    continue
                outstanding = sum(node.out.values()) * block_len
                for k in node.neighbors:
                    r = node.rate.get(k, 0.0)
                    r += alpha * (node.recv.get(k, 0.0) / elapsed - r)
                    node.rate[k] = r
                    node.picker.update_rate(k, r)
                    node.depth[k] = node.picker.pipeline_depth(k)
                node.recv.clear()
                for k in [
                    k
                    for k, n in node.out.items()
                    if n > 0
                    and timeouts.stalled(
                        silent_s=now - node.last_data[k][0],
                        others_bytes=int(node.received - node.last_data[k][1]),
                        outstanding_bytes=outstanding,
                        swarm_silent_s=now - node.received_at,
                    )
                ]:
                    ban(node, k)
                for index, told in node.reveal.expired(now):
                    show_to_all(node, index, told)
                if node.choker.rechoke_due(now):
                    rechoke(node)
                dirty.add(node.index)
            last_tick = now
            next_tick = now + ss.tick_s
        backlogs.clear()
        while dirty:
            refill(nodes[dirty.pop()])
        if done == len(nodes):
            break
    if timeline is not None and acc["steps"]:
        timeline.append(_timeline_row(now, acc, nodes, pieces, p))  # the last, partial second
    times = sorted(n.done_at if n.done_at is not None else math.inf for n in nodes)
    return SimResult(
        nodes=p.nodes,
        pieces=pieces,
        t_all_s=times[-1],
        t_median_s=times[len(times) // 2],
        t_bound_s=kumar_ross_bound(p.size, p.nodes, p.origin_rate, p.up, p.down),
        t_direct_s=direct_pull_time(p.size, p.nodes, p.origin_rate),
        registry_copies=registry_bytes / p.size,
        t_origin_s=t_origin,
        fetchers=len(fetchers),
        released=sum(1 for n in nodes if n.released),
        events=announces + haves,
        stalls=stalls,
        t_p10_s=times[len(times) // 10],
        t_p99_s=times[min(len(times) - 1, len(times) * 99 // 100)],
        timeline=timeline,
    )
