"""Hostile peers inside the cluster: a member with a real token and key (it joined with
the cluster's credential) that misbehaves on the peer wire while three honest nodes pull
a layer. It sends corrupt pieces, stops after unchoking, drips bytes, floods have and
request messages, or lies about the pieces it has.

The hostile peer is built like the attackers of ``benchmarks._attacks_wire``: a real
:class:`~p2pimage.wire.PeerConnection` (the sans-I/O protocol, so the handshake, the
key exchange and the proof of possession are the real ones) driven by a short trio loop
that does what an honest peer would not. It announces itself to the tracker holding
half the layer, so the nodes dial it as they would any peer.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass

import httpx
import trio

from daemons.testbed.localcluster import local_cluster
from p2pimage.errors import RemoteProtocolError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.image import build_image
from p2pimage.sidecar.client import SidecarClient, TokenKeeper
from p2pimage.tracker import AnnounceRequest, Event
from p2pimage.tracker.client import TrackerClient
from p2pimage.wire import (
    NEED_DATA,
    Bitfield,
    ConnectionClosed,
    HandshakeReceived,
    Have,
    Message,
    PeerAuthenticated,
    PeerConnection,
    Piece,
    Request,
    Role,
    Unchoke,
)

from ._fault import (
    REPO,
    Fault,
    FaultBed,
    FaultResult,
    Pulls,
    count_holding,
    node_settings,
    push,
    start_node,
)
from ._util import MIB


class Misbehaviour(enum.Enum):
    CORRUPT = "corrupt"  # answers every request with the block's bytes flipped
    SILENT = "silent"  # unchokes, then never answers a request
    DRIP = "drip"  # answers with the right bytes, one byte every 0.2 s
    FLOOD = "flood"  # sends have and request messages as fast as it can
    LIAR = "liar"  # claims every piece, serves only the first half, ignores the rest


@dataclass
class HostileStats:
    connections: int = 0
    closed_by_node: int = 0
    blocks_sent: int = 0
    messages_flooded: int = 0


class HostilePeer:
    """Serves ``data`` (the layer ``meta`` describes) badly, as ``misbehaviour`` says."""

    def __init__(
        self, keeper: TokenKeeper, meta: Metainfo, data: bytes, misbehaviour: Misbehaviour
    ) -> None:
        self.keeper, self.meta, self.data = keeper, meta, data
        self.misbehaviour = misbehaviour
        self.stats = HostileStats()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._session, listeners)

    async def _session(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        conn = PeerConnection(
            Role.RESPONDER,
            peer_id=self.keeper.peer_id(),
            authenticator=self.keeper.authenticator(),
            nonce=os.urandom(32),
            kx_key=os.urandom(32),
        )
        try:
            async with stream, trio.open_nursery() as nursery:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        self.stats.closed_by_node += 1
                        nursery.cancel_scope.cancel()
                        return
                    conn.receive_data(data)
                    while (event := conn.next_event()) is not NEED_DATA:
                        if isinstance(event, HandshakeReceived):
                            conn.accept(num_pieces=self.meta.num_pieces)
                        elif isinstance(event, PeerAuthenticated):
                            await stream.send_all(conn.data_to_send())
                            await self._opened(conn, stream, nursery)
                        elif isinstance(event, ConnectionClosed):
                            self.stats.closed_by_node += 1
                            nursery.cancel_scope.cancel()
                            return
                        elif isinstance(event, Request):
                            await self._answer(conn, stream, event)
                        await self._send_pending(conn, stream)
                    await self._send_pending(conn, stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
            self.stats.closed_by_node += 1

    @staticmethod
    async def _send_pending(conn: PeerConnection, stream: trio.SocketStream) -> None:
        if pending := conn.data_to_send():
            await stream.send_all(pending)

    async def _send(self, conn: PeerConnection, stream: trio.SocketStream, m: Message) -> None:
        await stream.send_all(conn.seal(conn.send(m)))

    async def _opened(
        self, conn: PeerConnection, stream: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        n = self.meta.num_pieces
        bits = bytearray((n + 7) // 8)
        for i in range(n):
            bits[i // 8] |= 0x80 >> (i % 8)
        await self._send(conn, stream, Bitfield(bytes(bits)))
        await self._send(conn, stream, Unchoke())
        if self.misbehaviour is Misbehaviour.FLOOD:
            nursery.start_soon(self._flood, conn, stream)

    async def _flood(self, conn: PeerConnection, stream: trio.SocketStream) -> None:
        n = self.meta.num_pieces
        i = 0
        while True:
            batch = b"".join(
                conn.send(Have((i + k) % n)) + conn.send(Request((i + k) % n, 0, 16384))
                for k in range(256)
            )
            await stream.send_all(conn.seal(batch))
            self.stats.messages_flooded += 512
            i += 256

    async def _answer(self, conn: PeerConnection, stream: trio.SocketStream, r: Request) -> None:
        start = self.meta.piece_offset(r.index) + r.begin
        block = self.data[start : start + r.length]
        m = self.misbehaviour
        if m in (Misbehaviour.SILENT, Misbehaviour.FLOOD):
            return
        if m is Misbehaviour.LIAR and r.index >= self.meta.num_pieces // 2:
            return  # claimed, never had
        if m is Misbehaviour.CORRUPT:
            block = bytes(b ^ 0x5A for b in block)
        sealed = conn.seal(conn.send(Piece(r.index, r.begin, block)))
        if m is Misbehaviour.DRIP:
            for k in range(len(sealed)):
                await stream.send_all(sealed[k : k + 1])
                await trio.sleep(0.2)
        else:
            await stream.send_all(sealed)
        self.stats.blocks_sent += 1


async def against(bed: FaultBed, misbehaviour: Misbehaviour, seed: int) -> FaultResult:
    """Three honest nodes pull a 6 MiB layer with the hostile peer in their swarm."""
    image = build_image([6 * MIB], seed=seed)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=0, registry_rate=8 * MIB) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            sidecar = SidecarClient(cluster.sidecar_url, http=http)
            keeper = TokenKeeper(sidecar, node="hostile", credential=cluster.credential)
            await keeper.refresh()
            meta = await sidecar.torrent(layer.digest, REPO)
            peer = HostilePeer(keeper, meta, layer.data, misbehaviour)
            port = await nursery.start(peer.serve)
            tracker = TrackerClient(cluster.tracker_url, http=http, auth=keeper.request_auth())
            await tracker.announce(
                AnnounceRequest(
                    info_hash=meta.info_hash,
                    peer_id=keeper.peer_id(),
                    port=port,
                    left=meta.length // 2,
                    event=Event.STARTED,
                )
            )
            nodes = [
                await start_node(nursery, node_settings(cluster, f"node-{i}")) for i in range(3)
            ]
            for node in nodes:
                await node.wait_p2p()
            with trio.fail_after(90):
                async with trio.open_nursery() as clients:
                    for node in nodes:
                        clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
            holding = await count_holding(
                [n.daemon for n in nodes], cluster, [layer.digest], timeout_s=40
            )
            fallbacks: Counter[str] = sum(
                (n.daemon.layers.stats.fallbacks for n in nodes), Counter()
            )
            nursery.cancel_scope.cancel()
    s = peer.stats
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        detail=(
            f"{s.connections} connections from nodes, {s.closed_by_node} closed by them; "
            f"{s.blocks_sent} blocks sent"
            + (f", {s.messages_flooded} messages flooded" if s.messages_flooded else "")
            + f"; {fallbacks.total()} fallbacks"
            + (f" {dict(fallbacks)}" if fallbacks else "")
        ),
    )


async def corrupt_pieces(bed: FaultBed) -> FaultResult:
    return await against(bed, Misbehaviour.CORRUPT, 301)


async def silent_after_unchoke(bed: FaultBed) -> FaultResult:
    return await against(bed, Misbehaviour.SILENT, 302)


async def dripping(bed: FaultBed) -> FaultResult:
    return await against(bed, Misbehaviour.DRIP, 303)


async def flooding(bed: FaultBed) -> FaultResult:
    return await against(bed, Misbehaviour.FLOOD, 304)


async def lying(bed: FaultBed) -> FaultResult:
    return await against(bed, Misbehaviour.LIAR, 305)


FAULTS: list[Fault] = [
    Fault(
        "peer-corrupt-pieces",
        "a member peer answers every request with corrupt bytes",
        corrupt_pieces,
    ),
    Fault(
        "peer-silent-after-unchoke",
        "a member peer unchokes, then never answers a request",
        silent_after_unchoke,
        quick=False,
    ),
    Fault(
        "peer-drips-bytes",
        "a member peer sends the right bytes, one every 0.2 s",
        dripping,
        quick=False,
    ),
    Fault(
        "peer-floods-have-request",
        "a member peer floods have and request messages",
        flooding,
        quick=False,
    ),
    Fault(
        "peer-lies-about-pieces",
        "a member peer claims every piece and serves only half",
        lying,
        quick=False,
    ),
]
