"""A discrete-event model of one layer spreading through a cluster, driven by the real
policies: every node's requests come from its own :class:`~p2pimage.swarm.picker.PiecePicker`,
and peer lists, origin ranges and their work stealing come from the real
:class:`~p2pimage.tracker.TrackerPolicy`. Only the network is modelled.

The network is a time-stepped fluid model (step ``dt``): each node's uplink serves its
queue of piece requests in order, each node's downlink caps what it takes in per step, and
the registry's egress (``origin_rate``) is shared fairly by the origin fetchers. One
request is one piece. Like the engine, a fetcher reveals each piece it read from the
registry to one neighbour first (the least loaded), and to everyone once that neighbour
has it or ``reveal_timeout_s`` passes.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from p2pimage.bound import direct_pull_time, kumar_ross_bound
from p2pimage.swarm.picker import PiecePicker
from p2pimage.tracker import AnnounceRequest, Event, PolicyConfig, TrackerPolicy
from p2pimage.tracker import SwarmRecord as TrackerSwarm

__all__ = ["SimParams", "SimResult", "simulate"]

_HOST = "10.0.0.1"
_PORT0 = 10_000


@dataclass
class SimParams:
    nodes: int = 200
    size: int = 256 * 1024 * 1024
    pieces: int = 256
    origin_rate: float = 64 * 1024 * 1024  # registry egress, bytes/s
    up: float = 16 * 1024 * 1024  # per node
    down: float = 16 * 1024 * 1024
    dt: float = 0.05
    max_peers: int = 40
    dial_target: int = 20
    slots: int = 4  # pieces a node downloads at once
    hungry_interval_s: float = 1.0
    want_peers: int = 8
    reveal_timeout_s: float = 2.0
    announce_jitter_s: float = 0.5
    seed: int = 1
    max_time_s: float = 3600.0


@dataclass
class SimResult:
    nodes: int
    t_all_s: float
    t_median_s: float
    t_bound_s: float
    t_direct_s: float
    registry_copies: float
    fetchers: int
    events: int


@dataclass(eq=False)
class _Transfer:
    src: int
    dst: int
    piece: int
    left: float


@dataclass(eq=False)
class _Node:
    index: int
    picker: PiecePicker[int]
    neighbors: set[int] = field(default_factory=set)
    queue: deque[_Transfer] = field(default_factory=deque)  # uploads, in order
    active: int = 0  # downloads in flight
    have: set[int] = field(default_factory=set)
    done_at: float | None = None
    next_announce: float = 0.0
    started_sent: bool = False
    completed_sent: bool = False
    was_fetcher: bool = False
    renew_at: int = 0
    origin: tuple[int, int] | None = None  # [next, end) to read from the registry
    origin_partial: float = 0.0
    hidden: dict[int, tuple[int, float]] = field(default_factory=dict)  # piece -> (to, at)
    reveals: dict[int, int] = field(default_factory=dict)  # neighbour -> pending reveals
    known_to: dict[int, set[int]] = field(default_factory=dict)  # piece -> who was told


def simulate(p: SimParams) -> SimResult:
    rng = random.Random(p.seed)
    piece_size = p.size / p.pieces
    policy = TrackerPolicy(
        PolicyConfig(min_interval_s=1, fetcher_interval_s=5, interval_s=30),
        rng=random.Random(p.seed + 1),
    )
    swarm = TrackerSwarm()
    nodes = [
        # One block per piece: the model moves whole pieces.
        _Node(
            i,
            PiecePicker(p.pieces, 1, p.pieces, block_size=1, rng=random.Random(p.seed * 7919 + i)),
        )
        for i in range(p.nodes)
    ]
    for node in nodes:
        node.next_announce = rng.uniform(0, p.announce_jitter_s)
    registry_bytes = 0.0
    events = 0
    now = 0.0
    dirty: set[int] = set()

    def connect(a: int, b: int) -> None:
        """``a`` dials ``b``, as the engine does: only while ``a`` has fewer than
        ``dial_target`` peers, and ``b`` accepts up to ``max_peers``."""
        na, nb = nodes[a], nodes[b]
        if b in na.neighbors or a == b:
            return
        if len(na.neighbors) >= p.dial_target or len(nb.neighbors) >= p.max_peers:
            return
        na.neighbors.add(b)
        nb.neighbors.add(a)
        for x, y in ((na, nb), (nb, na)):
            visible = [i for i in y.have if i not in y.hidden]
            if visible:
                x.picker.peer_bitfield(y.index, _bitfield(visible, p.pieces))
            dirty.add(x.index)

    def tell(src: _Node, dst: int, piece: int) -> None:
        nonlocal events
        events += 1
        target = nodes[dst]
        if piece in target.have:
            return
        target.picker.peer_have(src.index, piece)
        src.known_to.setdefault(piece, set()).add(dst)
        if target.active < p.slots:
            dirty.add(dst)

    def got_piece(node: _Node, piece: int, from_origin: bool) -> None:
        node.have.add(piece)
        for peer, _block in node.picker.we_have(piece):  # endgame duplicates: cancel
            queue = nodes[peer].queue
            for t in list(queue):
                if t.dst == node.index and t.piece == piece:
                    queue.remove(t)
                    node.active -= 1
        if from_origin and node.neighbors:
            candidates = [n for n in node.neighbors if piece not in nodes[n].have]
            if candidates:
                to = min(candidates, key=lambda n: (node.reveals.get(n, 0), rng.random()))
                node.reveals[to] = node.reveals.get(to, 0) + 1
                node.hidden[piece] = (to, now)
                tell(node, to, piece)
                check_done(node)
                return
        for n in list(node.neighbors):
            tell(node, n, piece)
        # Anyone who revealed this piece to us only can now show it to everyone.
        for n in list(node.neighbors):
            other = nodes[n]
            hidden = other.hidden.get(piece)
            if hidden is not None and hidden[0] == node.index:
                unhide(other, piece)
        check_done(node)

    def check_done(node: _Node) -> None:
        if len(node.have) == p.pieces and node.done_at is None:
            node.done_at = now
            node.next_announce = now

    def unhide(node: _Node, piece: int) -> None:
        to, _ = node.hidden.pop(piece)
        node.reveals[to] = max(0, node.reveals.get(to, 0) - 1)
        told = node.known_to.get(piece, set())
        for n in list(node.neighbors):
            if n not in told:
                tell(node, n, piece)

    def refill(node: _Node) -> None:
        if node.done_at is not None:
            return
        peers = list(node.neighbors)
        rng.shuffle(peers)
        for peer in peers:
            if node.active >= p.slots:
                return
            blocks = node.picker.pick(peer, 1, now)
            for block in blocks:
                nodes[peer].queue.append(_Transfer(peer, node.index, block.index, piece_size))
                node.active += 1

    def set_origin(node: _Node, new: tuple[int, int] | None) -> None:
        """What the engine's OriginReader does: pieces it will read are not asked of
        peers; pieces it gives up go back to the peers."""
        old = node.origin
        keep = set(range(*new)) if new else set()
        if old is not None:
            for i in range(old[0], old[1]):
                if i not in keep and i not in node.have:
                    node.picker.set_priority(i, 1)
            if new is None or new[0] != old[0]:
                node.origin_partial = 0.0
        for i in keep:
            if i not in node.have:
                node.picker.set_priority(i, 0)
        node.origin = new
        dirty.add(node.index)

    def announce(node: _Node) -> None:
        nonlocal events
        events += 1
        left = 0 if node.done_at is not None else int(p.size - len(node.have) * piece_size)
        event = Event.NONE
        if not node.started_sent:
            event = Event.STARTED
            node.started_sent = True
        if node.done_at is not None and not node.completed_sent:
            event = Event.COMPLETED
            node.completed_sent = True
        origin_next = node.origin[0] if node.origin else None
        req = AnnounceRequest(
            info_hash=b"\x01" * 20,
            peer_id=node.index.to_bytes(20, "big"),
            port=_PORT0 + node.index,
            left=left,
            event=event,
            numwant=p.max_peers,
            pieces=p.pieces,
            digest="sha256:" + "0" * 64,
            repo="sim/layer",
            origin_next=origin_next,
        )
        out = policy.announce(swarm, req, host=_HOST, now=now, registry_url="http://registry")
        for _, port in out.peers:
            connect(node.index, port - _PORT0)
        if out.origin is not None:
            node.was_fetcher = True
            # Like the engine: read only up to the lease end; renew halfway.
            first, end = out.origin.first_piece, out.origin.read_end
            if node.origin is not None and node.origin[0] <= first and end <= node.origin[1]:
                set_origin(node, (node.origin[0], end))  # the tail was stolen
            else:
                set_origin(node, (first, end))
            node.renew_at = first + (end - first) // 2
        elif node.origin is not None:
            set_origin(node, None)
        if node.done_at is not None:
            node.next_announce = now + out.interval
        elif len(node.neighbors) < p.want_peers:
            node.next_announce = now + max(p.hungry_interval_s, out.min_interval)
        else:
            node.next_announce = now + min(out.interval, 1.0 if node.origin else out.interval)

    while now < p.max_time_s:
        for node in nodes:
            if node.next_announce <= now:
                announce(node)
        # Registry: fair share of the egress among fetchers still reading.
        readers = [n for n in nodes if n.origin is not None and n.origin[0] < n.origin[1]]
        if readers:
            share = p.origin_rate * p.dt / len(readers)
            for node in readers:
                got = min(share, p.down * p.dt)
                registry_bytes += got
                node.origin_partial += got
                while (
                    node.origin is not None
                    and node.origin_partial >= piece_size
                    and node.origin[0] < node.origin[1]
                ):
                    piece = node.origin[0]
                    if piece not in node.have and node.picker.availability(piece) > 0:
                        # As the engine's OriginReader: a peer has it, so the rest of
                        # this range went to another fetcher; stop reading here.
                        set_origin(node, (piece, piece))
                        break
                    node.origin_partial -= piece_size
                    node.origin = (piece + 1, node.origin[1])
                    if piece + 1 >= node.renew_at:
                        node.renew_at = node.origin[1] + 1
                        node.next_announce = min(node.next_announce, now)  # renew the lease
                    if piece not in node.have:
                        got_piece(node, piece, from_origin=True)
        # Uplinks and downlinks.
        down_left = [p.down * p.dt for _ in nodes]
        for node in nodes:
            if not node.queue:
                continue
            budget = p.up * p.dt
            finished = []
            for t in node.queue:
                if budget <= 0:
                    break
                take = min(budget, down_left[t.dst], t.left)
                if take <= 0:
                    continue
                t.left -= take
                budget -= take
                down_left[t.dst] -= take
                if t.left <= 1e-9:
                    finished.append(t)
            for t in finished:
                node.queue.remove(t)
                dst = nodes[t.dst]
                dst.active -= 1
                dst.picker.block_received(node.index, t.piece, 0)
                if t.piece not in dst.have:
                    got_piece(dst, t.piece, from_origin=False)
                dirty.add(dst.index)
        # Reveal timeouts.
        for node in nodes:
            for piece, (_, at) in list(node.hidden.items()):
                if now - at > p.reveal_timeout_s:
                    unhide(node, piece)
        while dirty:
            refill(nodes[dirty.pop()])
        now += p.dt
        if all(n.done_at is not None for n in nodes):
            break
    times = sorted(n.done_at if n.done_at is not None else math.inf for n in nodes)
    fetchers = sum(1 for n in nodes if n.was_fetcher)
    return SimResult(
        nodes=p.nodes,
        t_all_s=times[-1],
        t_median_s=times[len(times) // 2],
        t_bound_s=kumar_ross_bound(p.size, p.nodes, p.origin_rate, p.up, p.down),
        t_direct_s=direct_pull_time(p.size, p.nodes, p.origin_rate),
        registry_copies=registry_bytes / p.size,
        fetchers=fetchers,
        events=events,
    )


def _bitfield(indices: list[int], pieces: int) -> bytes:
    out = bytearray((pieces + 7) // 8)
    for i in indices:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)
