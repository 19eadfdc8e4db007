"""Attacks on the peer wire (protocol v3), each against real node peers on loopback.

The attacker is an endpoint: it runs the key exchange itself, so it can decrypt
everything a node sends it. What protects a node's token is the order of the handshake
(the responder reveals its token only after it has verified the connector's), and what
protects both tokens from a passive observer is the encryption that starts right after
the extended handshakes. Each attack counts the tokens it got to read: handed to its
``verify_peer`` (decrypted) or found in the clear in the bytes it received or recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pimage.auth.tokens import (
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    bound_peer_id,
    local_authenticator,
)
from p2pimage.errors import AuthError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import PeerNode, open_peer_node
from p2pimage.swarm.session import PeerClosed
from p2pimage.wire import NEED_DATA, ConnectionClosed, HandshakeReceived, PeerConnection, Role
from p2pimage.wire._codec import build_extended, build_extended_handshake, build_handshake
from p2pimage.wire._crypto import kx_public_key

from ._attack import Attack, AttackBed, AttackResult
from ._util import MIB, write_random_file

CLUSTER = "cluster-b"
ISSUER_NAME = "attack-sidecar"


# --- the attacker's tools ---------------------------------------------------------------


class AttackerAuthenticator:
    """What an attacker plugs into a real :class:`PeerConnection`: it presents ``token``
    with a signature of its choosing, and records any token the node hands it (then stops,
    having won)."""

    def __init__(
        self,
        token: str,
        key: NodeKey,
        *,
        signature: bytes | None = None,
        corrupt: bool = False,
    ) -> None:
        self.token, self.key = token, key
        self.signature, self.corrupt = signature, corrupt
        self.tokens_seen: list[bytes] = []

    def credentials(self, transcript: bytes) -> tuple[bytes, bytes]:
        signature = self.signature or self.key.sign(transcript)
        if self.corrupt:
            signature = bytes([signature[0] ^ 1]) + signature[1:]
        return self.token.encode(), signature

    def verify_peer(
        self, token: bytes, signature: bytes, transcript: bytes, info_hash: bytes, peer_id: bytes
    ) -> Any:
        self.tokens_seen.append(token)
        raise AuthError("captured", "the attacker read the node's token")


def token_fragments(token: str) -> list[bytes]:
    """The token and each of its parts: what the attacker looks for in the clear."""
    return [token.encode(), *(p.encode() for p in token.split(".") if len(p) > 8)]


def count_tokens_in(data: bytes, tokens: list[str]) -> int:
    return sum(any(f in data for f in token_fragments(t)) for t in tokens)


@dataclass
class Exchange:
    """What an attacking connection saw."""

    received: bytearray = field(default_factory=bytearray)
    events: list[Any] = field(default_factory=list)
    error: str = ""
    closed_by_node: bool = False


async def attack_connection(
    address: tuple[str, int],
    conn: PeerConnection,
    *,
    seconds: float = 3.0,
    send_first: bytes | None = None,
) -> Exchange:
    """Drive ``conn`` (the attacker's side) over TCP to ``address`` until the node closes,
    the protocol fails, or ``seconds`` pass; ``send_first`` replaces the protocol's
    opening bytes (to simulate another client)."""
    out = Exchange()
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        opening = conn.data_to_send()
        await stream.send_all(send_first if send_first is not None else opening)
        with trio.move_on_after(seconds):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    out.closed_by_node = True
                    return out
                out.received += data
                if send_first is not None:  # a simulated client: only record
                    if not data:
                        out.closed_by_node = True
                        return out
                    continue
                try:
                    conn.receive_data(data)
                    while (event := conn.next_event()) is not NEED_DATA:
                        out.events.append(event)
                        if isinstance(event, ConnectionClosed):
                            out.closed_by_node = True
                            return out
                    reply = conn.data_to_send()
                    if reply:
                        await stream.send_all(reply)
                except (RemoteProtocolError, trio.BrokenResourceError) as exc:
                    out.error = str(exc)
                    out.closed_by_node = not data
                    return out
    return out


def attacker_connection(
    info_hash: bytes, auth: AttackerAuthenticator, *, peer_id: bytes | None = None
) -> PeerConnection:
    return PeerConnection(
        Role.INITIATOR,
        peer_id=peer_id or bound_peer_id("attacker", auth.key.public_jwk()),
        authenticator=auth,
        nonce=os.urandom(32),
        kx_key=os.urandom(32),
        info_hash=info_hash,
    )


def make_layer(tmp: Path, size: int) -> tuple[Path, Metainfo]:
    path = tmp / "layer"
    write_random_file(path, size)
    return path, create_metainfo_from_file(path)


@asynccontextmanager
async def seeding_node(
    tmp: Path, issuer: TokenIssuer, size: int = 256 * 1024, **kwargs: Any
) -> AsyncIterator[tuple[PeerNode, PeerAuthenticator, Path, Metainfo]]:
    """A real node of ``CLUSTER`` seeding a fresh random layer."""
    blob, meta = make_layer(tmp, size)
    auth = local_authenticator(issuer, subject="seeder", cluster=CLUSTER)
    async with open_peer_node(authenticator=auth, **kwargs) as node:
        await node.add_swarm(meta, tmp, storage=PieceStorage.open_complete(blob, meta))
        yield node, auth, blob, meta


def new_issuer() -> TokenIssuer:
    return TokenIssuer([SigningKey.generate()], issuer=ISSUER_NAME)


async def fetch(
    tmp: Path, issuer: TokenIssuer, meta: Metainfo, seeder: tuple[str, int], name: str
) -> float:
    """A real node fetching the layer from ``seeder``; seconds to the verified last byte."""
    auth = local_authenticator(issuer, subject=name, cluster=CLUSTER)
    async with open_peer_node(authenticator=auth) as node:
        swarm = await node.add_swarm(meta, tmp / name)
        start = trio.current_time()
        swarm.add_peers([seeder])
        with trio.fail_after(60):
            await swarm.complete.wait()
        return trio.current_time() - start


@dataclass
class FloodStats:
    connected: int = 0
    closed_by_node: int = 0
    bytes_received: int = 0


@asynccontextmanager
async def idle_flood(
    target: tuple[str, int], *, sockets: int, sources: list[str], reconnect_s: float = 0.5
) -> AsyncIterator[FloodStats]:
    """``sockets`` TCP connections to ``target`` that never send a byte, spread over the
    ``sources`` loopback addresses; each one closed by the node is reopened after
    ``reconnect_s`` (a persistent attacker)."""
    stats = FloodStats()

    async def hold(source: str) -> None:
        while True:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                await sock.bind((source, 0))
                await sock.connect(target)
                stats.connected += 1
                while data := await sock.recv(65536):
                    stats.bytes_received += len(data)
                stats.closed_by_node += 1
            except OSError:
                stats.closed_by_node += 1
            finally:
                sock.close()
            await trio.sleep(reconnect_s)

    async with trio.open_nursery() as nursery:
        for i in range(sockets):
            nursery.start_soon(hold, sources[i % len(sources)])
        yield stats
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def idle_flood_process(
    target: tuple[str, int], *, sockets: int, sources: list[str], reconnect_s: float = 0.5
) -> AsyncIterator[FloodStats]:
    """:func:`idle_flood` from a separate process, as an attacker on another host would
    run it: the node's process pays only for its own side. ``stats`` follows the child's
    reports (every 0.2 s)."""
    stats = FloodStats()
    command = [
        sys.executable,
        "-m",
        "benchmarks._attacks_wire",
        target[0],
        str(target[1]),
        str(sockets),
        str(reconnect_s),
        *sources,
    ]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None

    async def follow(stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        while chunk := await stream.receive_some(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                report = json.loads(line)
                stats.connected = report["connected"]
                stats.closed_by_node = report["closed_by_node"]
                stats.bytes_received = report["bytes_received"]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, process.stdout)
            yield stats
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def _flood_main(
    target: tuple[str, int], sockets: int, reconnect_s: float, sources: list[str]
) -> None:
    async with idle_flood(target, sockets=sockets, sources=sources, reconnect_s=reconnect_s) as st:
        while True:
            print(json.dumps(st.__dict__), flush=True)
            await trio.sleep(0.2)


async def relay(
    listener: trio.SocketListener,
    target: tuple[str, int],
    seen: bytearray,
    rewrite: Callable[[bytes], bytes] | None = None,
) -> None:
    """Forward one connection to ``target``, recording both directions into ``seen``;
    ``rewrite`` (an active man in the middle) may change the connector's bytes."""
    client = await listener.accept()
    server = await trio.open_tcp_stream(*target)

    async def pump(
        src: trio.abc.Stream, dst: trio.abc.Stream, edit: Callable[[bytes], bytes] | None
    ) -> None:
        broken = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        with contextlib.suppress(*broken):
            while data := await src.receive_some(65536):
                seen.extend(data)
                await dst.send_all(edit(data) if edit else data)
        with contextlib.suppress(*broken):
            await dst.send_eof()  # type: ignore[attr-defined]

    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, server, rewrite)
        nursery.start_soon(pump, server, client, None)


# --- the attacks ----------------------------------------------------------------------


async def token_off_the_peer_port(bed: AttackBed) -> AttackResult:
    """No credentials at all: connect, run the key exchange, present a self-made token,
    and read whatever the node sends; then a second connector that never authenticates
    and just waits."""
    issuer = new_issuer()
    async with seeding_node(bed.tmp, issuer) as (node, auth, _, meta):
        key = NodeKey.generate()
        rogue = TokenIssuer([SigningKey.generate()], issuer=ISSUER_NAME)
        fake = rogue.issue(subject="x", cluster=CLUSTER, node_jwk=key.public_jwk(), now=0)
        forged = AttackerAuthenticator(fake, key)
        first = await attack_connection(
            node.listen_address, attacker_connection(meta.info_hash, forged)
        )
        silent_auth = AttackerAuthenticator(fake, key)
        silent = attacker_connection(meta.info_hash, silent_auth)
        # Handshake and extended handshake only: then wait, never sending the auth.
        opening = silent.data_to_send()
        second = await attack_connection(
            node.listen_address, silent, send_first=opening, seconds=1.5
        )
        ours = [auth.current_token()]
        tokens = (
            len(forged.tokens_seen)
            + len(silent_auth.tokens_seen)
            + count_tokens_in(bytes(first.received) + bytes(second.received), ours)
        )
    refused = first.closed_by_node and not forged.tokens_seen
    return AttackResult(
        refused=refused,
        tokens_disclosed=tokens,
        detail=f"forged token: closed after {len(first.received)} B (handshakes only); "
        f"silent connector got {len(second.received)} B",
    )


async def passive_capture(bed: AttackBed) -> AttackResult:
    """Record both directions of a real transfer between two nodes (a relay in the
    path): look for either node's token, and for the layer's bytes."""
    issuer = new_issuer()
    seen = bytearray()
    async with seeding_node(bed.tmp, issuer, size=1 * MIB) as (seeder, seed_auth, blob, meta):
        leech_auth = local_authenticator(issuer, subject="leecher", cluster=CLUSTER)
        async with open_peer_node(authenticator=leech_auth) as leecher:
            swarm = await leecher.add_swarm(meta, bed.tmp / "leecher")
            async with trio.open_nursery() as nursery:
                listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
                nursery.start_soon(relay, listener, seeder.listen_address, seen)
                swarm.add_peers([listener.socket.getsockname()[:2]])
                with trio.fail_after(30):
                    await swarm.complete.wait()
                nursery.cancel_scope.cancel()
        tokens = count_tokens_in(
            bytes(seen), [seed_auth.current_token(), leech_auth.current_token()]
        )
    data = blob.read_bytes()
    samples = [data[i : i + 64] for i in range(0, len(data), len(data) // 64)]
    leaked = sum(len(s) for s in samples if s in seen)
    return AttackResult(
        refused=tokens == 0 and leaked == 0,
        tokens_disclosed=tokens,
        bytes_disclosed=leaked,
        detail=f"recorded {len(seen)} B both ways: no token, no layer bytes in the clear",
    )


async def key_swap_in_the_middle(bed: AttackBed) -> AttackResult:
    """An active relay replaces the connector's X25519 key with its own in the extended
    handshake, to pass as the connector to the node: the node's keys no longer match the
    connector's, it cannot open the connector's auth record and never sends its own.

    (A relay that terminates *both* key exchanges is two peers to the two nodes: it can
    read the connector's token, as anyone the connector dials can, and use it nowhere;
    see docs/protocol.md §3.4, "Limits".)"""
    issuer = new_issuer()
    seen = bytearray()
    mitm_secret = os.urandom(32)
    buffered = bytearray()
    done = False

    def swap(data: bytes) -> bytes:
        nonlocal done
        if done:
            return data
        buffered.extend(data)
        if len(buffered) < 72:
            return b""
        (length,) = struct.unpack_from(">I", buffered, 68)
        if len(buffered) < 72 + length:
            return b""
        payload = bdecode(bytes(buffered[74 : 72 + length]))
        assert isinstance(payload, dict)
        payload[b"p2pimage_kx"] = kx_public_key(mitm_secret)
        done = True
        return (
            bytes(buffered[:68])
            + build_extended(0, bencode(payload))
            + bytes(buffered[72 + length :])
        )

    async with seeding_node(bed.tmp, issuer) as (seeder, seed_auth, _, meta):
        leech_auth = local_authenticator(issuer, subject="leecher", cluster=CLUSTER)
        async with open_peer_node(authenticator=leech_auth) as leecher, trio.open_nursery() as n:
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            n.start_soon(relay, listener, seeder.listen_address, seen, swap)
            try:
                await leecher.dial(listener.socket.getsockname()[:2], meta.info_hash)
                outcome = "the connection opened"
            except PeerClosed as exc:
                outcome = exc.reason
            n.cancel_scope.cancel()
        tokens = count_tokens_in(
            bytes(seen), [seed_auth.current_token(), leech_auth.current_token()]
        )
    return AttackResult(
        refused=done and outcome != "the connection opened",
        tokens_disclosed=tokens,
        detail=f"key swapped in flight: {outcome}; no token in the {len(seen)} B it relayed",
    )


async def idle_socket_flood(bed: AttackBed) -> AttackResult:
    """~250 idle sockets held against a seeder (reopened as it closes them), from 25
    source addresses and another process, while a real node fetches from it; the fetch
    is timed against one without the flood."""
    issuer = new_issuer()
    async with seeding_node(bed.tmp, issuer, size=8 * MIB) as (node, _, _, meta):
        baseline = await fetch(bed.tmp, issuer, meta, node.listen_address, "baseline")
        sources = [f"127.0.0.{i}" for i in range(2, 27)]
        flood = idle_flood_process(node.listen_address, sockets=250, sources=sources)
        async with flood as stats:
            with trio.fail_after(10):  # until the pending budget is full and evicting
                while stats.connected < 250 or not node.admission.evicted:
                    await trio.sleep(0.05)
            pending = node.admission.pending
            try:
                flooded = await fetch(bed.tmp, issuer, meta, node.listen_address, "flooded")
            except trio.TooSlowError:
                flooded = float("inf")
    # Normal speed: within 3x the unflooded time, plus a second for a loaded machine.
    ok = flooded <= 3 * baseline + 1.0
    return AttackResult(
        refused=ok and stats.bytes_received == 0,
        detail=f"fetch {flooded:.2f} s under the flood vs {baseline:.2f} s without; "
        f"{stats.connected} idle connects, {pending} pending (the budget), "
        f"{node.admission.evicted} evicted",
    )


async def old_version_peer(bed: AttackBed) -> AttackResult:
    """A v2 peer (plain ``p2pimage_auth``, tokens in the clear after the extended
    handshake) dials a v3 node: refused by name, nothing revealed, the node serves on."""
    issuer = new_issuer()
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    logger = logging.getLogger("p2pimage.swarm.session")
    logger.addHandler(handler)
    try:
        async with seeding_node(bed.tmp, issuer) as (node, auth, _, meta):
            old = build_handshake(meta.info_hash, b"-PI0100-" + os.urandom(12), extensions=True)
            old += build_extended_handshake(
                {b"p2pimage_auth": 1},
                client=b"p2pimage/0.1",
                reqq=500,
                nonce=os.urandom(32),
                kx=kx_public_key(os.urandom(32)),
            )
            dummy = attacker_connection(
                meta.info_hash, AttackerAuthenticator("a.b.c", NodeKey.generate())
            )
            seen = await attack_connection(node.listen_address, dummy, send_first=old)
            after = await fetch(bed.tmp, issuer, meta, node.listen_address, "new-node")
            tokens = count_tokens_in(bytes(seen.received), [auth.current_token()])
    finally:
        logger.removeHandler(handler)
    warned = [r for r in records if "older p2pimage peer protocol (v2" in r.getMessage()]
    return AttackResult(
        refused=seen.closed_by_node and bool(warned),
        tokens_disclosed=tokens,
        detail=f"closed after {len(seen.received)} B (handshakes); log: "
        f"{warned[0].getMessage() if warned else 'no warning'}; a v3 fetch after: {after:.2f} s",
    )


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def replayed_auth(bed: AttackBed) -> AttackResult:
    """A member that received another node's auth message (it was that node's peer)
    replays it, sealed properly, to a third node, posing under the victim's peer id."""
    issuer = new_issuer()
    async with seeding_node(bed.tmp, issuer) as (node, auth, _, meta):
        # The victim's auth message, as its peer (the attacker) decrypted it.
        victim_key = NodeKey.generate()
        victim_token = issuer.issue(
            subject="victim", cluster=CLUSTER, node_jwk=victim_key.public_jwk(), now=time.time()
        )
        victim_auth = PeerAuthenticator(
            node_key=victim_key,
            token=victim_token,
            verifier=auth.verifier,
            cluster=CLUSTER,
        )
        captured = _capture_auth(victim_auth, meta.info_hash)
        replay = AttackerAuthenticator(victim_token, NodeKey.generate(), signature=captured)
        conn = attacker_connection(meta.info_hash, replay, peer_id=victim_auth.peer_id())
        seen = await attack_connection(node.listen_address, conn)
    return AttackResult(
        refused=seen.closed_by_node and not replay.tokens_seen,
        tokens_disclosed=len(replay.tokens_seen),
        detail=f"replayed auth message: connection closed after {len(seen.received)} B",
    )


def _capture_auth(victim: PeerAuthenticator, info_hash: bytes) -> bytes:
    """Run the victim (initiator) against an in-memory responder the attacker controls,
    and return the signature the victim sent in its (decrypted) auth message."""
    captured: list[bytes] = []

    class Catcher(AttackerAuthenticator):
        def verify_peer(
            self,
            token: bytes,
            signature: bytes,
            transcript: bytes,
            info_hash: bytes,
            peer_id: bytes,
        ) -> Any:
            captured.append(signature)
            raise AuthError("captured", "the attacker keeps the signature")

    key = NodeKey.generate()
    catcher = Catcher("a.b.c", key)
    a = PeerConnection(
        Role.INITIATOR,
        peer_id=victim.peer_id(),
        authenticator=victim,
        nonce=os.urandom(32),
        kx_key=os.urandom(32),
        info_hash=info_hash,
    )
    b = PeerConnection(
        Role.RESPONDER,
        peer_id=bound_peer_id("attacker", key.public_jwk()),
        authenticator=catcher,
        nonce=os.urandom(32),
        kx_key=os.urandom(32),
    )
    try:
        for _ in range(4):
            b.receive_data(a.data_to_send())
            while (event := b.next_event()) is not NEED_DATA:
                if isinstance(event, HandshakeReceived):
                    b.accept()
            a.receive_data(b.data_to_send())
            while a.next_event() is not NEED_DATA:
                pass
    except AuthError:
        pass
    assert captured, "the in-memory victim did not send its auth message"
    return captured[0]


async def cluster_a_token_at_cluster_b(bed: AttackBed) -> AttackResult:
    """A genuine member of cluster A (valid token, its own key) dials a cluster-B node."""
    issuer = new_issuer()
    async with seeding_node(bed.tmp, issuer) as (node, _, _, meta):
        key = NodeKey.generate()
        token = issuer.issue(
            subject="node-a", cluster="cluster-a", node_jwk=key.public_jwk(), now=time.time()
        )
        member = AttackerAuthenticator(token, key)
        conn = attacker_connection(
            meta.info_hash, member, peer_id=bound_peer_id("node-a", key.public_jwk())
        )
        seen = await attack_connection(node.listen_address, conn)
    return AttackResult(
        refused=seen.closed_by_node and not member.tokens_seen,
        tokens_disclosed=len(member.tokens_seen),
        detail=f"cluster-a token at cluster-b: closed after {len(seen.received)} B",
    )


async def forged_auth_signature(bed: AttackBed) -> AttackResult:
    """A member's real token (leaked, say from a log) with a signature by the attacker's
    own key, under that member's peer id."""
    issuer = new_issuer()
    async with seeding_node(bed.tmp, issuer) as (node, _, _, meta):
        member_key = NodeKey.generate()
        token = issuer.issue(
            subject="member", cluster=CLUSTER, node_jwk=member_key.public_jwk(), now=time.time()
        )
        forger = AttackerAuthenticator(token, NodeKey.generate())
        conn = attacker_connection(
            meta.info_hash, forger, peer_id=bound_peer_id("member", member_key.public_jwk())
        )
        seen = await attack_connection(node.listen_address, conn)
    return AttackResult(
        refused=seen.closed_by_node and not forger.tokens_seen,
        tokens_disclosed=len(forger.tokens_seen),
        detail=f"forged signature: closed after {len(seen.received)} B",
    )


ATTACKS: list[Attack] = [
    Attack(
        "wire: token off a peer port",
        "a node token read by connecting without credentials",
        token_off_the_peer_port,
    ),
    Attack(
        "wire: passive capture",
        "tokens and layer bytes read off the network",
        passive_capture,
    ),
    Attack(
        "wire: key swapped by a relay",
        "an active relay posing as the connector to read the node's token",
        key_swap_in_the_middle,
    ),
    Attack(
        "wire: idle socket flood",
        "every real peer locked out by ~250 idle sockets",
        idle_socket_flood,
    ),
    Attack(
        "wire: old-version peer",
        "a v2 peer reading a v3 node's token, or crashing it",
        old_version_peer,
    ),
    Attack(
        "wire: replayed auth message",
        "posing as a node with its captured auth message",
        replayed_auth,
    ),
    Attack(
        "wire: cluster-A token at cluster B",
        "a member of one cluster joining another's swarms",
        cluster_a_token_at_cluster_b,
    ),
    Attack(
        "wire: forged auth signature",
        "posing as a node with its token alone",
        forged_auth_signature,
    ),
]


if __name__ == "__main__":  # the flood's own process: HOST PORT SOCKETS RECONNECT_S SOURCE...
    host, port, count, pause, *addresses = sys.argv[1:]
    trio.run(_flood_main, (host, int(port)), int(count), float(pause), addresses)
