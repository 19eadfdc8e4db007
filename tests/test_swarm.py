"""Swarms of real nodes on loopback: origin range reads from the real registry, peer
exchange, streaming in order while the layer downloads."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.errors import LocalProtocolError, PeerClosed, RemoteProtocolError, StorageError
from p2pimage.metainfo.torrent import MIN_PIECES, create_metainfo_from_file
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.node import PeerNode, _connect, open_peer_node
from p2pimage.swarm.origin import OriginReader
from p2pimage.swarm.picker import PickerSettings, PiecePicker
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.swarm.session import (
    CONTROL_READ_MAX,
    SENDFILE_MIN_BLOCK,
    PeerSession,
    _recv_into,
    _send_all,
    make_connection,
    new_peer_id,
)
from p2pimage.wire import (
    HAVES_EXTENSION,
    LOCAL_HAVES_ID,
    NEED_DATA,
    Cancel,
    Extended,
    ExtendedHandshake,
    HandshakeReceived,
    Have,
    Interested,
    PeerConnection,
    Piece,
    Request,
    Role,
    build_haves_payload,
    decode_haves,
)

from .test_transfer import make_blob, sha256_file

MIB = 1024 * 1024


@asynccontextmanager
async def nodes(count: int, issuer: TokenIssuer, **kwargs: Any) -> AsyncIterator[list[PeerNode]]:
    async with AsyncExitStack() as stack:
        started = []
        for i in range(count):
            auth = local_authenticator(issuer, subject=f"node-{i}", cluster="prod")
            started.append(
                await stack.enter_async_context(open_peer_node(authenticator=auth, **kwargs))
            )
        yield started


async def push(registry: Any, blob: Path, repository: str = "test/layer") -> str:
    async with RegistryClient(registry.url) as client:
        digest = await client.push_blob(repository, blob.read_bytes())
    return f"{registry.url}/v2/{repository}/blobs/{digest}"


def mesh(swarms: list[Swarm], node_list: list[PeerNode]) -> None:
    for swarm in swarms:
        swarm.add_peers([n.listen_address for n in node_list], mutual=True)


@pytest.mark.parametrize("fetchers", [1, 2])
async def test_eight_nodes_registry_sends_one_copy(
    tmp_path: Path, registry: Any, fetchers: int
) -> None:
    blob, meta = make_blob(tmp_path, 32 * MIB)
    url = await push(registry, blob)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(8, issuer) as node_list, httpx.AsyncClient() as http:
        swarms = [
            await node.add_swarm(meta, tmp_path / f"node{i}") for i, node in enumerate(node_list)
        ]
        mesh(swarms, node_list)
        # Disjoint ranges that cover the layer once, as the tracker assigns them.
        bounds = [meta.num_pieces * k // fetchers for k in range(fetchers + 1)]
        readers = [
            OriginReader(swarms[k], url, bounds[k], bounds[k + 1], client=http)
            for k in range(fetchers)
        ]
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for reader in readers:
                    nursery.start_soon(reader.run)
                for swarm in swarms:
                    await swarm.complete.wait()
        assert all(r.failed is None for r in readers)
        registry_bytes = sum(r.bytes_read for r in readers)
        assert registry_bytes == meta.length  # exactly one copy from the registry
        from_peers = sum(s.stats.downloaded_from_peers for s in swarms)
        assert from_peers >= 7 * meta.length - fetchers * meta.length
        assert sum(s.stats.hash_failures for s in swarms) == 0
    for swarm in swarms:
        assert sha256_file(swarm.storage.path) == meta.sha256


async def test_origin_failure_hands_pieces_back_to_peers(tmp_path: Path, registry: Any) -> None:
    """A fetcher whose registry URL is wrong fails; its range returns to peer picking and
    a seeder elsewhere in the swarm supplies it."""
    blob, meta = make_blob(tmp_path, 4 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (seeder, leecher), httpx.AsyncClient() as http:
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        reader = OriginReader(
            swarm, f"{registry.url}/v2/none/blobs/{meta.sha256}", 0, meta.num_pieces, client=http
        )
        with trio.fail_after(60):
            await reader.run()
            assert reader.failed is not None
            swarm.add_peers([seeder.listen_address])
            await swarm.complete.wait()
    assert sha256_file(swarm.storage.path) == meta.sha256


async def test_stream_in_order_first_bytes_before_ten_percent(tmp_path: Path) -> None:
    blob, meta = make_blob(tmp_path, 16 * MIB)
    assert meta.num_pieces >= MIN_PIECES  # the sidecar's fewest: 10 % of them is 25
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    seed_auth = local_authenticator(issuer, subject="seeder", cluster="prod")
    leech_auth = local_authenticator(issuer, subject="leecher", cluster="prod")
    async with (
        open_peer_node(authenticator=seed_auth) as seeder,
        # A 4 MiB/s download cap makes the layer take ~4 s, so "early" is measurable.
        open_peer_node(authenticator=leech_auth, download_rate=4 * MIB) as leecher,
    ):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([seeder.listen_address])
        digest = hashlib.sha256()
        have_at_first_byte: int | None = None
        received = 0
        with trio.fail_after(60):
            async for chunk in swarm.stream():
                if have_at_first_byte is None:
                    have_at_first_byte = swarm.storage.num_have
                digest.update(chunk)
                received += len(chunk)
            await swarm.complete.wait()
    assert received == meta.length
    assert "sha256:" + digest.hexdigest() == meta.sha256
    assert have_at_first_byte is not None
    assert have_at_first_byte < meta.num_pieces // 10


async def test_peer_sending_bad_data_is_banned(tmp_path: Path) -> None:
    """A peer that serves corrupted bytes fails the piece hash, gets banned, and the
    leecher completes from an honest peer."""
    blob, meta = make_blob(tmp_path, 2 * MIB)
    bad_blob = tmp_path / "bad"
    data = bytearray(blob.read_bytes())
    for i in range(0, len(data), 4096):
        data[i] ^= 0xFF
    bad_blob.write_bytes(bytes(data))
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(3, issuer) as (liar, honest, leecher):
        # The liar's store claims every piece (verify=False) but holds the wrong bytes.
        liar_storage = PieceStorage.open_complete(bad_blob, meta, verify=False)
        await liar.add_swarm(meta, tmp_path / "liar", storage=liar_storage)
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([liar.listen_address])
        with trio.fail_after(30):
            while not swarm.banned:
                await trio.sleep(0.05)
        await honest.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm.add_peers([honest.listen_address, liar.listen_address])
        with trio.fail_after(60):
            await swarm.complete.wait()
        assert swarm.stats.hash_failures >= 1
        assert liar.peer_id in swarm.banned
    assert sha256_file(swarm.storage.path) == meta.sha256


async def test_release_while_the_runtime_still_reads_keeps_the_blob_readable(
    tmp_path: Path,
) -> None:
    """A release order can end a swarm while its reader is behind (the layer is complete
    on disk): the reader must still get every byte, and the store closes after it."""
    blob, meta = make_blob(tmp_path, 4 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (seeder, leecher):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([seeder.listen_address])
        received = bytearray()
        with trio.fail_after(30):
            async for chunk in swarm.stream(chunk_size=256 * 1024):
                received += chunk
                if len(received) == 256 * 1024:
                    await swarm.complete.wait()
                    swarm.close()  # as the announcer does on a release order
                    while leecher.swarms:
                        await trio.sleep(0.01)  # the swarm's task tree has ended
    assert bytes(received) == blob.read_bytes()
    with pytest.raises(StorageError):
        swarm.storage.read_block(0, 0, 16)  # closed once the reader finished


async def test_node_stopping_under_an_abandoned_reader_keeps_its_verified_pieces(
    tmp_path: Path,
) -> None:
    """A reader suspended at a ``yield`` and never closed (its HTTP response cancelled
    with the node) still holds the store open. The node's stop must persist the verified
    pieces anyway, or a restart fetches them all again."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    half = meta.num_pieces // 2
    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "node")
        for index in range(half):
            offset = meta.piece_offset(index)
            swarm.storage.write_piece(index, data[offset : offset + meta.piece_size(index)])
        reader = swarm.stream()
        assert await reader.__anext__()  # suspended at its yield, not closed
        summary = swarm.summary()
        assert (summary.state, summary.pieces_have, summary.readers) == ("downloading", half, 1)
        assert summary.have_bytes == half * meta.piece_length and summary.size == meta.length
        assert summary.completed_in_s is None
    assert swarm.summary().state == "closed"
    state = PieceStorage.open(tmp_path / "node", meta)
    try:
        assert state.num_have == half
    finally:
        state.close()
        await reader.aclose()


async def test_a_reader_learns_that_the_blob_failed_its_digest_instead_of_mixing(
    tmp_path: Path,
) -> None:
    """Every piece verifies but the whole blob does not (a wrong torrent): the store
    resets, and a reader already past the first piece gets DigestMismatchError rather
    than waiting on (or reading) the pieces of a second attempt."""
    from p2pimage.errors import DigestMismatchError
    from p2pimage.metainfo.torrent import Metainfo

    blob, good = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    meta = Metainfo(good.name, good.length, good.piece_length, good.pieces, "sha256:" + "0" * 64)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "node")
        storage = swarm.storage
        storage.write_piece(0, data[: meta.piece_size(0)])
        reader = swarm.stream(chunk_size=meta.piece_length)
        assert await reader.__anext__() == data[: meta.piece_size(0)]
        for index in range(1, meta.num_pieces):
            offset = meta.piece_offset(index)
            storage.write_piece(index, data[offset : offset + meta.piece_size(index)])
        with pytest.raises(DigestMismatchError):
            storage.finalize_sync()
        with trio.fail_after(5), pytest.raises(DigestMismatchError):
            await reader.__anext__()
        await reader.aclose()


async def test_reader_waiting_for_the_frontier_is_not_stalled_while_pieces_arrive(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Stall means the swarm verified nothing for the timeout, not that the reader's next
    piece is late: in a cold start the registry sends a layer piece by piece and every
    reader waits at the frontier while other pieces keep arriving.

    On trio's MockClock, moved only by this test: the timeout is measured in the swarm's
    own clock, so a loaded machine cannot stretch a gap between pieces past it."""
    from p2pimage.swarm.engine import SwarmStalled

    stall = 0.2
    blob, meta = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "node")

        async def feed_backwards() -> None:
            for index in reversed(range(meta.num_pieces)):
                await trio.testing.wait_all_tasks_blocked()  # the reader is waiting
                mock_clock.jump(0.75 * stall)  # a gap shorter than the timeout
                offset = meta.piece_offset(index)
                await swarm.accept_origin_piece(
                    index, data[offset : offset + meta.piece_size(index)]
                )
            # Fed: a reader still waiting now would wait forever on this clock, so let
            # it run: such a reader then stalls and fails the test instead of hanging it.
            mock_clock.autojump_threshold = 0

        received = bytearray()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed_backwards)
            # Piece 0 comes last, num_pieces gaps of 0.15 s after the start.
            async for chunk in swarm.stream(stall_timeout_s=stall):
                received += chunk
        assert bytes(received) == data
        assert trio.current_time() - start >= meta.num_pieces * 0.75 * stall > 4 * stall

    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "empty")
        start = trio.current_time()
        mock_clock.autojump_threshold = 0  # nothing arrives: let the clock run to the timeout
        with pytest.raises(SwarmStalled):
            async for _ in swarm.stream(stall_timeout_s=stall):
                pass
        assert stall <= trio.current_time() - start < 2 * stall


async def test_stream_gathers_pieces_into_larger_chunks_after_the_first(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Pieces that verify one at a time reach the reader as chunks of at least
    ``stream_gather_bytes``: the first chunk goes at once (time to first byte), later ones
    wait for the pieces after the position, but never longer than ``stream_gather_s``,
    and the range's end never waits. On trio's MockClock, moved only by this test."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    settings = SwarmSettings()
    gather = settings.stream_gather_bytes
    per_chunk = gather // meta.piece_length
    assert per_chunk >= 4 and meta.num_pieces > 2 * per_chunk + 2
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "node")
        chunks: list[bytes] = []

        async def read() -> None:
            async for chunk in swarm.stream():
                chunks.append(chunk)

        async def put(index: int) -> None:
            offset = meta.piece_offset(index)
            await swarm.accept_origin_piece(index, data[offset : offset + meta.piece_size(index)])
            await trio.testing.wait_all_tasks_blocked()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await put(0)
            assert [len(c) for c in chunks] == [meta.piece_size(0)]  # the first: at once
            for index in range(1, per_chunk):
                await put(index)
                assert len(chunks) == 1  # gathering: fewer than gather bytes ahead
            await put(per_chunk)
            assert [len(c) for c in chunks[1:]] == [gather]
            # One more piece, then nothing for stream_gather_s: it goes out alone.
            await put(per_chunk + 1)
            assert len(chunks) == 2
            mock_clock.jump(settings.stream_gather_s)
            await trio.testing.wait_all_tasks_blocked()
            assert [len(c) for c in chunks[2:]] == [meta.piece_length]
            # The rest, last piece first: the range's end goes without waiting.
            for index in reversed(range(per_chunk + 2, meta.num_pieces)):
                await put(index)
        assert b"".join(chunks) == data
        assert all(len(c) >= gather for c in chunks[3:-1])


def _record_dials(node: PeerNode) -> list[tuple[str, int]]:
    """The addresses ``node`` dials from now on, in order (its dials still go through)."""
    dials: list[tuple[str, int]] = []
    dial = node.dial

    async def counted(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        dials.append(address)
        return await dial(address, *args, **kwargs)

    node.dial = counted  # type: ignore[method-assign]
    return dials


async def test_a_peer_that_dialled_us_is_not_dialled_again_at_every_tracker_answer(
    tmp_path: Path,
) -> None:
    """A peer that dialled us is known by an ephemeral source port, the tracker lists its
    listen address: the first dial there stops after the 68-byte handshake (already
    connected), and the swarm remembers whose address it is, so later tracker answers
    dial it no more while it stays connected. (b names no listen port, as a client
    without BEP 10's ``p``; with it, not even the first dial happens: the next test.)"""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (a, b):
        b.port = 0  # (what its handshakes advertise: nothing)
        swarm_a = await a.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm_b = await b.add_swarm(meta, tmp_path / "b")
        dials = _record_dials(a)
        swarm_b.add_peers([a.listen_address])
        with trio.fail_after(10):
            while b.peer_id not in swarm_a.peers:
                await trio.sleep(0.01)
        for _ in range(3):  # three tracker answers naming b
            swarm_a.add_peers([b.listen_address])
            with trio.fail_after(10):
                while swarm_a.want_more_peers() and swarm_a._dialing:
                    await trio.sleep(0.01)
        assert dials == [b.listen_address]  # the first answer's dial only
        assert list(swarm_a.peers) == [b.peer_id]


async def test_a_peer_that_dialled_us_and_named_its_listen_port_is_never_dialled(
    tmp_path: Path,
) -> None:
    """BEP 10's ``p``: a peer that dialled us names the port it listens on, so the
    tracker's listing of it (its listen address) is known as a connected peer before
    any dial: neither a tracker answer (``add_peers``) nor the deferred side's dial of a
    mutual pair (``dial_defer_s``, the peer connecting during the wait) opens a
    connection to it. Before, each cost a TCP connection and the 68-byte handshakes."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (a, b):
        # a is the side of the pair that defers (its address orders higher).
        if a.listen_address < b.listen_address:
            a, b = b, a
        settings = SwarmSettings(dial_defer_s=1.0)
        swarm_a = await a.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta), settings=settings
        )
        swarm_b = await b.add_swarm(meta, tmp_path / "b")
        dials = _record_dials(a)
        swarm_a.add_peers([b.listen_address], mutual=True)  # waits 0.5-1 s, then dials
        assert swarm_a._dialing == {b.listen_address}
        swarm_b.add_peers([a.listen_address])  # b dials a meanwhile
        with trio.fail_after(10):
            while swarm_a._dialing:
                await trio.sleep(0.01)
        assert b.peer_id in swarm_a.peers
        swarm_a.add_peers([b.listen_address])  # a later tracker answer
        assert not swarm_a._dialing
        assert dials == []
        assert list(swarm_a.peers) == [b.peer_id]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_a_dial_reaches_ip_literals_directly_and_names_through_the_resolver(
    host: str,
) -> None:
    """``PeerNode.dial``'s connect: an IPv4 or IPv6 literal (every tracker answer) is
    connected without open_tcp_stream, a host name still resolves; both arrive."""
    if host == "::1":
        try:
            listeners = await trio.open_tcp_listeners(0, host="::1")
        except OSError:
            pytest.skip("no IPv6 loopback here")
    else:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        stream = await _connect(host, port)
        async with stream, await listener.accept() as accepted:
            await stream.send_all(b"ping")
            assert await accepted.receive_some(4) == b"ping"
            assert stream.socket.getpeername()[1] == port


async def test_request_queue_follows_the_swarm_picker_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SwarmSettings.picker reaches the wire: with ``min_pipeline=4`` (16 KiB blocks; the
    layer's 32 KiB blocks: 2) and a request queue time too short to ask for more at any
    loopback rate, the leecher never has more than 2 requests outstanding, where the
    defaults (floor 8 x 16 KiB, one second of data: 32 blocks at the 1 MiB/s link) would
    put 4 and more on the wire.

    Every pick is recorded as it happens (no sampling), so the result does not depend on
    how fast the machine is."""
    blob, meta = make_blob(tmp_path, 2 * MIB, piece_length=32 * 1024)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    # ceil(rate * 1e-4 s / 32 KiB) <= 1 below 320 MB/s: the depth is the floor, 2 (slow
    # start off: it would deepen the pipeline before the first tick's rate, see
    # test_slow_start_deepens_the_pipeline_with_each_block_before_any_rate).
    settings = SwarmSettings(
        picker=PickerSettings(request_queue_time=1e-4, min_pipeline=4, slow_start=False)
    )
    async with (
        open_peer_node(authenticator=local_authenticator(issuer, subject="s", cluster="c")) as s,
        open_peer_node(
            authenticator=local_authenticator(issuer, subject="l", cluster="c"),
            download_rate=1 * MIB,
        ) as leecher,
    ):
        await s.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher", settings=settings)
        picker = swarm.picker
        picks: list[tuple[int, int]] = []  # (depth, outstanding after the pick)
        real_pick = PiecePicker.pick  # the class's (a picker has slots, no instance dict)

        def recording_pick(self: PiecePicker[Any], peer: Any, count: int, now: float) -> Any:
            blocks = real_pick(self, peer, count, now)
            if self is picker:
                picks.append((picker.pipeline_depth(peer), picker.outstanding_count(peer)))
            return blocks

        monkeypatch.setattr(PiecePicker, "pick", recording_pick)
        swarm.add_peers([s.listen_address])
        with trio.fail_after(30):
            await swarm.complete.wait()
    assert picks, "the leecher never asked for a block"
    assert {depth for depth, _ in picks} == {2}
    assert max(outstanding for _, outstanding in picks) == 2
    assert PickerSettings().min_pipeline == 8  # the default this test stays under


class _ShortBlocks(PieceStorage):
    """A store that serves every block one byte short: a misbehaving peer."""

    def read_block(self, index: int, begin: int, length: int) -> bytes:
        return super().read_block(index, begin, length)[:-1]


async def test_a_block_of_the_wrong_length_closes_that_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A block that is not the length we asked for is the peer's fault: its session ends
    at once (not a storage error, not a ban, nothing stored)."""
    caplog.set_level(logging.DEBUG, logger="p2pimage.swarm.engine")
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (liar, leecher):
        await liar.add_swarm(meta, tmp_path, storage=_ShortBlocks.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([liar.listen_address])
        with trio.fail_after(10):
            while "were asked" not in caplog.text:
                await trio.sleep(0.02)
        assert swarm.storage.num_have == 0 and swarm.stats.hash_failures == 0
        assert not swarm.banned and "internal error" not in caplog.text


async def _relay(listener: trio.SocketListener, target: tuple[str, int], seen: bytearray) -> None:
    """Forward one connection to ``target`` and record every byte both ways: what
    someone on the node network would see."""
    client = await listener.accept()
    server = await trio.open_tcp_stream(*target)

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some(65536):
                seen.extend(data)
                await dst.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await dst.send_eof()

    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, server)
        nursery.start_soon(pump, server, client)


@pytest.mark.parametrize("encrypt", [True, False])
async def test_peer_traffic_is_encrypted_on_the_wire(tmp_path: Path, encrypt: bool) -> None:
    """Between authenticated nodes the layer's bytes do not appear on the network (and,
    as a control, they do with encryption switched off on both sides)."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    seen = bytearray()
    async with nodes(2, issuer, encrypt=encrypt) as (seeder, leecher):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        async with trio.open_nursery() as nursery:
            (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(_relay, listener, seeder.listen_address, seen)
            swarm.add_peers([listener.socket.getsockname()[:2]])
            with trio.fail_after(30):
                await swarm.complete.wait()
            nursery.cancel_scope.cancel()
    assert sha256_file(swarm.storage.path) == meta.sha256
    assert len(seen) > len(data)  # the whole layer went through the relay
    samples = [data[i : i + 64] for i in range(0, len(data), len(data) // 16)]
    leaked = sum(sample in seen for sample in samples)
    assert leaked == (0 if encrypt else len(samples))


async def test_two_nodes_dialing_each_other_keep_the_same_one_connection(
    tmp_path: Path,
) -> None:
    """Both dial at once: each side keeps the connection the node with the smaller peer
    id opened and closes the other, waiting for the replaced peer to be gone (an event,
    no polling) before it adopts the new one."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (seeder, leecher):
        seeding = await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta)
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        seeding.add_peers([leecher.listen_address], mutual=True)
        swarm.add_peers([seeder.listen_address], mutual=True)
        with trio.fail_after(30):
            await swarm.complete.wait()
            while len(seeding.peers) != 1 or len(swarm.peers) != 1:
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # both dials over: one connection replaced or refused per side
        assert len(seeding.peers) == len(swarm.peers) == 1
        ((_, kept_by_leecher),) = swarm.peers.items()
        ((_, kept_by_seeder),) = seeding.peers.items()
        # One TCP connection, seen from its two ends.
        assert kept_by_leecher.session.conn.our_role is not kept_by_seeder.session.conn.our_role
    assert sha256_file(swarm.storage.path) == meta.sha256


async def test_the_deferred_dial_of_a_pair_is_not_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both nodes know each other: the one whose address orders higher waits, meanwhile
    the other's connection arrives naming its listen port (BEP 10's ``p``), and the
    deferred dial is skipped (no connection at all; a peer that names no port is found
    in the 68-byte handshake instead: the dial stops there, before the key exchange);
    one connection remains, both sides agree."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(dial_defer_s=1.0)
    caplog.set_level(logging.DEBUG, logger="p2pimage.swarm.engine")
    async with nodes(2, issuer) as (seeder, leecher):
        seeding = await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta), settings=settings
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher", settings=settings)
        early = min(seeder.listen_address, leecher.listen_address)
        seeding.add_peers([leecher.listen_address], mutual=True)
        swarm.add_peers([seeder.listen_address], mutual=True)

        def stopped() -> list[str]:
            return [m for r in caplog.records if "connected to it already" in (m := r.getMessage())]

        with trio.fail_after(30):
            await swarm.complete.wait()
            while not stopped():
                await trio.sleep(0.05)
        assert len(seeding.peers) == len(swarm.peers) == 1
        # Only the late node's dial (to the node with the lower address) was skipped.
        assert stopped() == [f"dial {early} skipped: connected to it already"]
        assert not [r for r in caplog.records if "already connected" in r.getMessage()]
    assert sha256_file(swarm.storage.path) == meta.sha256


async def test_a_peer_named_to_us_alone_is_dialled_at_once(tmp_path: Path) -> None:
    """A static peer list that the peer was not given (a seed we were pointed at, the
    pair benchmark) is dialled without the pair's deferral, which would only delay the
    first byte: the other side never dials. The same list marked ``mutual`` waits."""
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(dial_defer_s=60.0)
    async with nodes(2, issuer) as pair:
        # The node whose address orders higher is the one that would defer.
        seeder, leecher = sorted(pair, key=lambda n: n.listen_address)
        await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta), settings=settings
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher", settings=settings)
        swarm.add_peers([seeder.listen_address], mutual=True)
        await trio.sleep(0.5)
        assert not swarm.peers  # deferred: 30-60 s
        swarm.add_peers([seeder.listen_address])  # still dialing: not dialled twice
        assert not swarm.peers
    async with nodes(2, issuer) as pair:
        seeder, leecher = sorted(pair, key=lambda n: n.listen_address)
        await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta), settings=settings
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher2", settings=settings)
        swarm.add_peers([seeder.listen_address])
        with trio.fail_after(20):  # far below the 30 s the deferral would take
            await swarm.complete.wait()
    assert sha256_file(swarm.storage.path) == meta.sha256


async def test_slow_start_deepens_the_pipeline_with_each_block_before_any_rate(
    tmp_path: Path,
) -> None:
    """No rate is measured (no tick within the transfer), yet the leecher's pipeline to
    its seeder grows with the blocks it delivers, so the transfer does not run
    stop-and-wait at the one-block floor of large blocks; without slow start it does."""
    blob, meta = make_blob(tmp_path, 16 * MIB, piece_length=256 * 1024)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    for slow_start in (True, False):
        settings = SwarmSettings(tick_s=120.0, picker=PickerSettings(slow_start=slow_start))
        async with nodes(2, issuer) as (seeder, leecher):
            await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
            swarm = await leecher.add_swarm(
                meta, tmp_path / f"leecher-{slow_start}", settings=settings
            )
            swarm.add_peers([seeder.listen_address])
            deepest = 0
            with trio.fail_after(60):
                while not swarm.complete.is_set():
                    deepest = max([deepest, *(len(p.outstanding) for p in swarm.peers.values())])
                    await trio.sleep(0.001)
            assert swarm.picker.block_size == 256 * 1024  # a floor of one block
            blocks = meta.length // swarm.picker.block_size
            (seed_key,) = swarm.peers
            if slow_start:  # the floor plus one per block after the first, up to the cap
                assert swarm.picker.pipeline_depth(seed_key) == min(32, blocks)
                assert deepest > 4
            else:
                assert swarm.picker.pipeline_depth(seed_key) == 1
                assert deepest == 1
        assert sha256_file(swarm.storage.path) == meta.sha256


async def test_a_dial_stops_after_the_handshake_names_an_unwanted_peer(tmp_path: Path) -> None:
    blob, meta = make_blob(tmp_path, 1 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (seeder, leecher):
        seeding = await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta)
        )
        named: list[bytes] = []

        def unwanted(peer_id: bytes) -> bool:
            named.append(peer_id)
            return True

        with pytest.raises(PeerClosed, match="already connected"):
            await leecher.dial(seeder.listen_address, meta.info_hash, unwanted=unwanted)
        assert named == [seeder.peer_id] and leecher.connections == 0
        await trio.sleep(0.2)
        assert not seeding.peers


@pytest.mark.parametrize("grace", [2.0, 0.0])
async def test_interest_in_a_cooperative_peer_outlasts_a_spell_with_nothing_new(
    tmp_path: Path, grace: float
) -> None:
    """A leecher that has caught up with a p2pimage peer stays interested for
    ``interest_grace_s`` (that peer may soon get another piece: no not-interested /
    interested pair), then says not interested; with no grace at once (BEP 3)."""
    blob, meta = make_blob(tmp_path, 4 * MIB)
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(tick_s=0.1, interest_grace_s=grace)
    async with nodes(2, issuer) as (holder, leecher):
        source = await holder.add_swarm(meta, tmp_path / "holder", settings=settings)
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher", settings=settings)
        swarm.add_peers([holder.listen_address])
        with trio.fail_after(10):
            while leecher.peer_id not in source.peers or holder.peer_id not in swarm.peers:
                await trio.sleep(0.05)
        assert await source.accept_origin_piece(0, data[: meta.piece_size(0)])
        with trio.fail_after(10):
            while not swarm.has_piece(0):
                await swarm.wait_changed()
        caught_up = trio.current_time()
        seen = source.peers[leecher.peer_id]
        with trio.fail_after(10):
            while seen.peer_interested:
                await trio.sleep(0.02)
        waited = trio.current_time() - caught_up
        if grace:
            assert waited >= grace - 0.1
        else:
            assert waited < 1.0
        assert swarm.peers[holder.peer_id].idle_since is None


@pytest.mark.parametrize("rare_delay", [0.0, 0.5])
async def test_the_have_of_a_rare_piece_waits_rare_have_delay_s_not_have_delay_s(
    tmp_path: Path, rare_delay: float
) -> None:
    """A have of a piece no other peer holds, to a peer already interested in us, leaves
    after ``rare_have_delay_s`` (with whatever haves wait by then), not ``have_delay_s``;
    with 0 at once."""
    blob, meta = make_blob(tmp_path, 4 * MIB)  # 256 pieces
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(
        have_delay_s=3.0,
        rare_have_delay_s=rare_delay,
        reveal_origin_pieces=False,
        interest_grace_s=30.0,  # the watcher stays interested after catching up
    )
    async with nodes(2, issuer) as (holder, watcher):
        source = await holder.add_swarm(meta, tmp_path / "holder", settings=settings)
        swarm = await watcher.add_swarm(meta, tmp_path / "watcher", settings=settings)
        swarm.add_peers([holder.listen_address])
        with trio.fail_after(10):
            while watcher.peer_id not in source.peers or holder.peer_id not in swarm.peers:
                await trio.sleep(0.05)
        assert await source.accept_origin_piece(0, data[: meta.piece_size(0)])
        with trio.fail_after(10):  # told at once (not interested yet), asked, fetched
            while not swarm.has_piece(0):
                await swarm.wait_changed()
        seen = source.peers[watcher.peer_id]
        assert seen.peer_interested
        await trio.sleep(0.2)  # the holder's writer is idle: nothing to ride along with
        start = trio.current_time()
        piece = data[meta.piece_offset(1) :][: meta.piece_size(1)]
        assert await source.accept_origin_piece(1, piece)
        with trio.fail_after(10):
            while not swarm.picker.peer_has(holder.peer_id, 1):
                await trio.sleep(0.01)
        waited = trio.current_time() - start
        if rare_delay:
            assert rare_delay - 0.05 <= waited < settings.have_delay_s - 1.0
        else:
            assert waited < 0.3


async def test_a_rare_piece_is_told_soon_to_rare_have_fanout_peers_and_later_to_the_rest(
    tmp_path: Path,
) -> None:
    """Of the peers that lack a piece no other peer holds, ``rare_have_fanout`` hear of it
    after ``rare_have_delay_s``; the others as of a common piece, after ``have_delay_s``:
    the haves loop flushes each peer's haves when its own are due, not every peer's
    when the first is."""
    blob, meta = make_blob(tmp_path, 4 * MIB)  # 256 pieces
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(
        have_delay_s=4.0,
        rare_have_delay_s=0.05,
        rare_have_fanout=1,
        reveal_origin_pieces=False,
        interest_grace_s=60.0,  # the watchers stay interested after catching up
    )
    async with nodes(4, issuer) as (holder, *watchers):
        source = await holder.add_swarm(meta, tmp_path / "holder", settings=settings)
        swarms = [
            await w.add_swarm(meta, tmp_path / f"watcher-{i}", settings=settings)
            for i, w in enumerate(watchers)
        ]
        for swarm in swarms:  # each watcher knows the holder only
            swarm.add_peers([holder.listen_address])
        with trio.fail_after(10):
            while len(source.peers) != 3 or not all(s.peers for s in swarms):
                await trio.sleep(0.05)
        assert await source.accept_origin_piece(0, data[: meta.piece_size(0)])
        with trio.fail_after(10):  # told at once (not interested yet), asked, fetched
            while not all(s.has_piece(0) for s in swarms):
                await trio.sleep(0.02)
        assert all(p.peer_interested for p in source.peers.values())
        await trio.sleep(0.2)
        start = trio.current_time()
        piece = data[meta.piece_offset(1) :][: meta.piece_size(1)]
        assert await source.accept_origin_piece(1, piece)  # no peer of the holder has it

        def told() -> int:
            return sum(s.picker.peer_has(holder.peer_id, 1) for s in swarms)

        with trio.fail_after(10):
            while not told():
                await trio.sleep(0.01)
        assert trio.current_time() - start < settings.have_delay_s - 2
        await trio.sleep(1.0)
        assert told() == 1  # the first told's flush did not send the others' haves
        with trio.fail_after(settings.have_delay_s + 5):
            while told() < 3:
                await trio.sleep(0.05)
        assert trio.current_time() - start >= settings.have_delay_s - 0.1


@pytest.mark.parametrize("order", ["arrival", "need"])
async def test_a_have_goes_only_to_peers_not_known_to_hold_the_piece(
    tmp_path: Path, order: str
) -> None:
    """A verified piece is announced to the peers not known to hold it; under the need
    order to every peer (its uploader orders requesters by what they hold)."""
    blob, meta = make_blob(tmp_path, 4 * MIB)  # 256 pieces
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(have_delay_s=0.0, reveal_origin_pieces=False, upload_order=order)
    async with nodes(2, issuer) as (a, b):
        first = await a.add_swarm(meta, tmp_path / "a", settings=settings)
        second = await b.add_swarm(meta, tmp_path / "b", settings=settings)
        first.add_peers([b.listen_address])
        with trio.fail_after(10):
            while b.peer_id not in first.peers or a.peer_id not in second.peers:
                await trio.sleep(0.05)
        assert await second.accept_origin_piece(0, data[: meta.piece_size(0)])
        with trio.fail_after(10):  # b told a of piece 0; a fetched it from b
            while not first.has_piece(0):
                await first.wait_changed()
        assert first.picker.peer_has(b.peer_id, 0)
        piece = data[meta.piece_offset(1) :][: meta.piece_size(1)]
        assert await first.accept_origin_piece(1, piece)  # b lacks it: told
        with trio.fail_after(10):  # haves arrive in order: piece 0's, if sent, came first
            while not second.picker.peer_has(a.peer_id, 1):
                await trio.sleep(0.01)
        assert second.picker.peer_has(a.peer_id, 0) == (order == "need")


async def test_a_peer_asked_after_an_idle_spell_is_not_taken_for_a_staller(
    tmp_path: Path,
) -> None:
    """The stall clock starts at the first request after a spell with nothing to ask: a
    peer that had nothing we needed for longer than ``stall_timeout_s`` and then gets a
    piece is asked for it, and its first (paced) block is no stall."""
    blob, meta = make_blob(tmp_path, 16 * MIB)  # 256 KiB pieces
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(stall_timeout_s=3.0, tick_s=0.1)
    auth = [local_authenticator(issuer, subject=f"node-{i}", cluster="prod") for i in range(2)]
    async with (
        # A 256 KiB piece takes ~0.75 s at 256 KiB/s beyond the 64 KiB burst: several
        # ticks pass between the request and the block.
        open_peer_node(authenticator=auth[0], upload_rate=256 * 1024) as holder,
        open_peer_node(authenticator=auth[1]) as leecher,
    ):
        source = await holder.add_swarm(meta, tmp_path / "holder", settings=settings)
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher", settings=settings)
        swarm.add_peers([holder.listen_address])
        with trio.fail_after(10):
            while len(swarm.peers) != 1 or len(source.peers) != 1:
                await trio.sleep(0.05)
        await trio.sleep(settings.stall_timeout_s + 0.5)  # nothing to ask the holder yet
        assert await source.accept_origin_piece(0, data[: meta.piece_size(0)])
        with trio.fail_after(10):
            while not swarm.has_piece(0):
                await swarm.wait_changed()
        assert swarm.stats.peers_banned == 0 and len(swarm.peers) == 1


async def test_a_node_requiring_encryption_refuses_one_without(tmp_path: Path) -> None:
    blob, meta = make_blob(tmp_path, 256 * 1024)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    auth = [local_authenticator(issuer, subject=f"node-{i}", cluster="prod") for i in range(2)]
    async with (
        open_peer_node(authenticator=auth[0], encrypt=False) as seeder,
        open_peer_node(authenticator=auth[1], encrypt=True) as leecher,
    ):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        with pytest.raises(Exception, match="does not offer encryption"):
            await leecher.dial(seeder.listen_address, meta.info_hash)
        assert not swarm.peers and swarm.storage.num_have == 0


async def test_the_announcer_and_origin_api(tmp_path: Path) -> None:
    """What the announcer and the origin reader ask of a swarm, on a running node:
    snapshots, news that makes the next announce due at once, origin pieces through the
    one path into storage (duplicates refused, bad bytes rejected, completion at the
    last piece), release."""
    from p2pimage.errors import PieceHashError

    blob, meta = make_blob(tmp_path, 1 * MIB)
    data = blob.read_bytes()
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(1, issuer) as (node,):
        swarm = await node.add_swarm(meta, tmp_path / "node")
        snap = swarm.announce_snapshot()
        assert (snap.peer_id, snap.port, snap.info_hash) == (
            node.peer_id,
            node.listen_address[1],
            meta.info_hash,
        )
        assert (snap.left, snap.downloaded, snap.complete) == (meta.length, 0, False)
        with trio.move_on_after(0.1) as quiet:
            await swarm.wait_announce_due(10)
        assert quiet.cancelled_caught  # no news: the interval runs
        swarm.announce_soon()
        with trio.fail_after(1):
            await swarm.wait_announce_due(10)  # news: due at once, until the next snapshot
            await swarm.wait_announce_due(10)
        swarm.announce_snapshot()
        with trio.move_on_after(0.1) as quiet:
            await swarm.wait_announce_due(10)
        assert quiet.cancelled_caught

        def piece(index: int) -> bytes:
            offset = meta.piece_offset(index)
            return data[offset : offset + meta.piece_size(index)]

        with pytest.raises(PieceHashError):
            await swarm.accept_origin_piece(0, bytes(meta.piece_size(0)))
        assert not swarm.has_piece(0)
        assert await swarm.accept_origin_piece(0, piece(0))
        assert not await swarm.accept_origin_piece(0, piece(0))  # had it already
        assert swarm.stats.downloaded_from_origin == meta.piece_size(0)
        for index in range(1, meta.num_pieces):
            await swarm.accept_origin_piece(index, piece(index))
        assert swarm.complete.is_set() and sha256_file(swarm.storage.path) == meta.sha256
        snap = swarm.announce_snapshot()
        assert (snap.left, snap.downloaded, snap.complete) == (0, meta.length, True)
        swarm.release()
        assert swarm.released and swarm.closed.is_set()
        with trio.fail_after(1):
            await swarm.wait_announce_due(10)  # closed: always due


async def _tcp_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        a = await trio.open_tcp_stream(*listener.socket.getsockname()[:2])
        return a, await listener.accept()


async def _open_session_pair(
    *, haves_on_b: bool, tcp: bool = False
) -> tuple[PeerSession, PeerConnection, Any]:
    """A session (open mode, as make_connection builds it) and a bare peer connection
    on the other end of an in-memory stream (or of a loopback TCP connection); the peer
    advertises p2pimage_haves or not."""
    a_stream: Any
    b_stream: Any
    if tcp:
        a_stream, b_stream = await _tcp_stream_pair()
    else:
        a_stream, b_stream = trio.testing.memory_stream_pair()
    info_hash = bytes(range(20))
    a = make_connection(
        Role.INITIATOR, peer_id=new_peer_id(), info_hash=info_hash, authenticator=None
    )
    b = PeerConnection(
        Role.RESPONDER,
        peer_id=new_peer_id(),
        authenticator=None,
        open_mode=True,
        extensions={HAVES_EXTENSION: LOCAL_HAVES_ID} if haves_on_b else None,
    )
    a.num_pieces = 100
    session = PeerSession(a_stream, a, address=("127.0.0.1", 1))
    # Handshake by hand: b accepts; each side then holds the other's extended handshake.
    seen: list[Any] = []
    for sender, receiver, stream in ((a, b, b_stream), (b, a, a_stream), (a, b, b_stream)):
        await (a_stream if sender is a else b_stream).send_all(sender.data_to_send())
        receiver.receive_data(await stream.receive_some())
        while (event := receiver.next_event()) is not NEED_DATA:
            seen.append(event)
            if isinstance(event, HandshakeReceived) and receiver is b:
                b.accept(num_pieces=100)
    assert a.is_open and b.is_open
    assert [type(e) for e in seen].count(ExtendedHandshake) == 2
    return session, b, b_stream


@pytest.mark.parametrize("haves_on_b", [True, False], ids=["p2pimage peer", "stock peer"])
async def test_haves_of_one_batch_travel_in_one_message(haves_on_b: bool) -> None:
    session, peer, stream = await _open_session_pair(haves_on_b=haves_on_b)
    for index in (3, 7, 42, 99):
        session.send_have(index)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        events: list[Any] = []
        with trio.fail_after(5):
            while sum(len(e.payload) // 4 if isinstance(e, Extended) else 1 for e in events) < 4:
                peer.receive_data(await stream.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
        nursery.cancel_scope.cancel()
    if haves_on_b:
        assert events == [Extended(LOCAL_HAVES_ID, build_haves_payload([3, 7, 42, 99]))]
        assert decode_haves(events[0].payload, 100) == (3, 7, 42, 99)
    else:
        assert events == [Have(3), Have(7), Have(42), Have(99)]


async def _events_until(peer: PeerConnection, stream: Any, done: Any) -> list[Any]:
    events: list[Any] = []
    with trio.fail_after(5):
        while not done(events):
            peer.receive_data(await stream.receive_some())
            while (event := peer.next_event()) is not NEED_DATA:
                events.append(event)
    return events


async def test_deferred_haves_wait_for_the_next_batch_or_a_flush() -> None:
    """A deferred have wakes nobody: it leaves with the next message queued to the peer
    (here a request), or when flush_haves() is called; never alone before that."""
    session, peer, stream = await _open_session_pair(haves_on_b=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        session.send_have(3, defer=True)
        session.send_have(7, defer=True)
        await trio.sleep(0.2)
        with trio.move_on_after(0.2):
            data = await stream.receive_some()
            pytest.fail(f"deferred haves were sent alone: {data!r}")
        session.send(Request(1, 0, 16384))  # the haves ride along, in the same batch
        events = await _events_until(peer, stream, lambda e: len(e) >= 2)
        assert events == [
            Request(1, 0, 16384),
            Extended(LOCAL_HAVES_ID, build_haves_payload([3, 7])),
        ]
        session.send_have(42, defer=True)
        session.flush_haves()
        events = await _events_until(peer, stream, lambda e: len(e) >= 1)
        assert events == [Extended(LOCAL_HAVES_ID, build_haves_payload([42]))]
        session.flush_haves()  # nothing deferred: no write
        session.send_have(50)  # not deferred: at once
        events = await _events_until(peer, stream, lambda e: len(e) >= 1)
        assert events == [Extended(LOCAL_HAVES_ID, build_haves_payload([50]))]
        nursery.cancel_scope.cancel()


async def test_deferred_have_to_a_stock_client_goes_at_once() -> None:
    session, peer, stream = await _open_session_pair(haves_on_b=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        session.send_have(5, defer=True)  # a BEP 3 have: no batching to wait for
        assert await _events_until(peer, stream, lambda e: len(e) >= 1) == [Have(5)]
        nursery.cancel_scope.cancel()


async def test_file_blocks_go_out_by_sendfile_in_order(tmp_path: Path) -> None:
    """A plaintext TCP session sends a complete blob's blocks from the file (sendfile),
    between the messages queued before and after them; a closed store ends only that
    connection (its header is out already), as a PeerClosed."""
    blob, meta = make_blob(tmp_path, 3 * 256 * 1024)
    data = blob.read_bytes()
    session, peer, stream = await _open_session_pair(haves_on_b=False, tcp=True)
    assert session.can_send_file
    store = PieceStorage.open_complete(blob, meta)
    session.send(Have(1))
    size = meta.piece_size(1)
    session.send_piece_from_file(1, 0, store, store.block_offset(1, 0, size), size)
    session.send_piece_from_file(2, 5, store, store.block_offset(2, 5, 1000), 1000)
    session.send(Have(2))
    events: list[Any] = []
    ended: list[str] = []

    async def write() -> None:
        try:
            await session.run_writer()
        except PeerClosed as exc:  # as the swarm does: the session ends, nothing else
            ended.append(str(exc))
            await session.aclose(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        with trio.fail_after(10):
            while len(events) < 4:
                peer.receive_data(await stream.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
        store.close()
        session.send_piece_from_file(0, 0, store, 0, 1000)
        with trio.fail_after(10), pytest.raises(RemoteProtocolError, match="middle"):
            while True:
                peer.receive_data(await stream.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
    assert ended and "cannot serve the block" in ended[0] and "closed" in ended[0]
    offset = meta.piece_offset(1)
    assert events[:4] == [
        Have(1),
        Piece(1, 0, data[offset : offset + size]),
        Piece(2, 5, data[meta.piece_offset(2) + 5 : meta.piece_offset(2) + 1005]),
        Have(2),
    ]
    assert session.payload_sent == size + 1000 + 1000


async def test_file_blocks_need_a_plaintext_tcp_session(tmp_path: Path) -> None:
    blob, meta = make_blob(tmp_path, 256 * 1024)
    session, _, _ = await _open_session_pair(haves_on_b=False)  # in-memory stream
    assert not session.can_send_file
    with PieceStorage.open_complete(blob, meta) as store, pytest.raises(LocalProtocolError):
        session.send_piece_from_file(0, 0, store, 0, 100)


@pytest.mark.parametrize(
    ("encrypt", "piece_kib", "by_sendfile"),
    [(True, 256, False), (False, 256, True), (False, 16, False)],
)
async def test_a_complete_seed_serves_plaintext_peers_by_sendfile(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    encrypt: bool,
    piece_kib: int,
    by_sendfile: bool,
) -> None:
    """Between nodes with encryption off, a complete layer's blocks of at least
    SENDFILE_MIN_BLOCK go out by sendfile and arrive verified; encrypted, every block is
    sealed, and small blocks are read and batched (sendfile would cost more calls)."""
    assert 16 * 1024 < SENDFILE_MIN_BLOCK <= 256 * 1024
    blob, _ = make_blob(tmp_path, 4 * MIB)
    meta = create_metainfo_from_file(blob, piece_length=piece_kib * 1024)
    calls: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real_sendfile(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer, encrypt=encrypt) as (seeder, leecher):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([seeder.listen_address])
        with trio.fail_after(30):
            await swarm.complete.wait()
    assert sha256_file(swarm.storage.path) == meta.sha256
    assert sum(calls) == (meta.length if by_sendfile else 0)


class _WatchedStream(trio.abc.Stream):
    """A stream whose ``send_all`` yields to the other tasks several times before it
    passes the bytes on (a slow socket), and notes whether the bytes it was handed
    changed meanwhile, and which buffer they were a view of."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.buffers: list[object] = []
        self.overwritten = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        before = bytes(data)
        self.buffers.append(data.obj if isinstance(data, memoryview) else None)
        for _ in range(5):
            await trio.lowlevel.checkpoint()
        self.overwritten += bytes(data) != before
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_writer_reuses_its_send_buffer_only_after_each_send() -> None:
    """Messages queued while a batch is in flight are sealed into the session's one send
    buffer only once the send returns: every batch reaches the peer as it was sealed, the
    peer gets every piece and every have in order (a have may pass queued pieces:
    test_control_messages_go_ahead_of_queued_piece_data), and the batches share one
    buffer."""
    session, peer, stream = await _open_session_pair(haves_on_b=False)
    watched = _WatchedStream(session.stream)
    session.stream = watched
    expected: list[Any] = []
    events: list[Any] = []

    async def queue() -> None:
        for wave in range(6):
            for k in range(24):
                message = Piece((wave * 24 + k) % 100, 0, bytes([wave, k]) * 8192)
                session.send(message)
                expected.append(message)
                if k % 7 == 0:
                    await trio.lowlevel.checkpoint()  # a send may be in flight now
            session.send(Have(wave))
            expected.append(Have(wave))
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        nursery.start_soon(queue)
        with trio.fail_after(20):
            while len(events) < 6 * 25:
                peer.receive_data(await stream.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
        nursery.cancel_scope.cancel()
    for kind in (Piece, Have):
        assert [e for e in events if isinstance(e, kind)] == [
            m for m in expected if isinstance(m, kind)
        ]
    assert len(events) == len(expected)
    assert watched.overwritten == 0
    reused = [b for b in watched.buffers if b is not None]
    assert len(reused) >= 3 and all(b is reused[0] for b in reused)


@pytest.mark.parametrize("queued_pieces", [48, 0])
async def test_control_messages_go_ahead_of_queued_piece_data(
    queued_pieces: int, mock_clock: trio.testing.MockClock
) -> None:
    """A request (or have, cancel, interest) queued behind piece data on a paced uplink
    goes out at the head of the next batch, ahead of the pieces still queued: behind
    them, at scale, requests reached the uploaders ~1 s late (docs/benchmarks.md,
    "Requests ahead, the neediest first"). Control messages keep their own order, pieces
    theirs, and no piece is split; with no piece data queued a control message keeps its
    place in line."""
    mock_clock.autojump_threshold = 0
    session, peer, stream = await _open_session_pair(haves_on_b=False)
    # 48 blocks of 16 KiB at 1 MiB/s: one batch of 512 KiB (0.5 s), then 256 KiB more.
    session._upload = RateLimiter(1024 * 1024, burst=16 * 1024)
    pieces = [Piece(i % 100, 0, bytes([i]) * 16384) for i in range(queued_pieces)]
    for message in pieces:
        session.send(message)
    controls: list[Any] = [Request(9, 0, 16384), Have(5), Interested(), Cancel(9, 0, 16384)]
    events: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        await trio.sleep(0.1)  # the first batch is waiting for the limiter
        for message in controls:
            session.send(message)
        with trio.fail_after(10):
            while len(events) < len(pieces) + len(controls):
                peer.receive_data(await stream.receive_some())
                while (event := peer.next_event()) is not NEED_DATA:
                    events.append(event)
        nursery.cancel_scope.cancel()
    assert [e for e in events if isinstance(e, Piece)] == pieces
    assert [e for e in events if not isinstance(e, Piece)] == controls
    first_control = next(i for i, e in enumerate(events) if not isinstance(e, Piece))
    if queued_pieces:
        # Behind the batch on its way (32 blocks), ahead of the 16 still queued.
        assert first_control == 32
    else:
        assert first_control == 0


async def test_a_peer_that_stops_reading_stops_counting_against_the_upload_budget(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The swarm's uploader waits while its connections hold ``upload_queue_bytes``
    unsent. A batch past the upload limiter no longer counts (a receiver that reads
    slowly holds it in TCP, not in our uplink), and what queues behind a writer that
    moves nothing for ``stuck_s`` (a peer that stopped reading) stops counting, so one
    frozen peer cannot hold every other peer's uploads."""
    mock_clock.autojump_threshold = 0
    session, _, _ = await _open_session_pair(haves_on_b=False)
    stuck, _unread = trio.testing.lockstep_stream_pair()  # send_all waits for a reader
    session.stream = stuck
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        session.send(Piece(1, 0, b"x" * 16384))
        await trio.sleep(0.5)
        assert session.unsent_bytes == 0  # past the limiter, stuck in send_all
        session.send(Piece(2, 0, b"y" * 16384))
        await trio.sleep(0.5)
        assert session.unsent_bytes > 16384  # queued behind it
        assert session.unsent_bytes_moving(trio.current_time(), 2.0) == session.unsent_bytes
        await trio.sleep(2)
        assert session.unsent_bytes > 16384
        assert session.unsent_bytes_moving(trio.current_time(), 2.0) == 0
        nursery.cancel_scope.cancel()


async def test_data_path_socket_calls_move_every_byte_and_keep_trio_semantics() -> None:
    """The session's own socket calls (``_send_all``, ``_recv_into``): a send far beyond
    the socket buffers completes through waits, in order; a receive waits for bytes and
    returns 0 at EOF; each call is a checkpoint (a cancelled scope stops it even when
    the socket is ready, and a wait can be cancelled); a closed socket is an OSError."""
    a, b = await _tcp_stream_pair()
    payload = os.urandom(8 * 1024 * 1024)  # far more than loopback's socket buffers
    received = bytearray()
    buffer = bytearray(64 * 1024)

    async def drain() -> None:
        reads = 0
        while n := await _recv_into(b.socket, buffer):
            received.extend(buffer[:n])
            reads += 1
            if reads % 8 == 0:
                await trio.sleep(0.002)  # a slow reader: the sender must wait

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await _send_all(a.socket, memoryview(payload))
            await _send_all(a.socket, b"")
            await a.send_eof()
    assert received == payload

    c, d = await _tcp_stream_pair()
    await _send_all(c.socket, b"ready")
    await trio.sleep(0.05)
    with trio.CancelScope() as scope:
        scope.cancel()
        await _recv_into(d.socket, buffer)  # bytes wait, but the scope is cancelled
    assert scope.cancelled_caught
    with trio.move_on_after(0.05) as scope:
        assert await _recv_into(d.socket, buffer) == 5
        await _recv_into(d.socket, buffer)  # nothing more: waits until cancelled
    assert scope.cancelled_caught and bytes(buffer[:5]) == b"ready"
    # wait_first (the last read came back short): a wait, cancellable, then the bytes.
    with trio.move_on_after(0.05) as scope:
        await _recv_into(d.socket, buffer, wait_first=True)
    assert scope.cancelled_caught
    await _send_all(c.socket, b"again", yielded=True)
    assert await _recv_into(d.socket, buffer, wait_first=True) == 5
    await c.aclose()
    assert await _recv_into(d.socket, buffer, wait_first=True) == 0
    await d.aclose()
    with pytest.raises(OSError):
        await _send_all(d.socket, b"after close")
    with pytest.raises(OSError):
        await _recv_into(d.socket, buffer)
    await a.aclose()
    await b.aclose()


async def test_a_control_message_wakes_the_writer_once_and_is_read_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wake-ups and system calls per control message (issue #15): the writer, woken by
    a have, writes it without a second yield; the reader, whose last read emptied the
    socket, waits until it is readable before reading, so no read fails with EAGAIN
    first (half of a swarm's reads did)."""
    session, peer, stream = await _open_session_pair(haves_on_b=True, tcp=True)
    receiver = PeerSession(stream, peer, address=("127.0.0.1", 2))
    reads = 0
    readv = os.readv

    def counting_readv(fd: int, buffers: Any) -> int:
        nonlocal reads
        reads += 1
        return readv(fd, buffers)

    monkeypatch.setattr(os, "readv", counting_readv)
    writer_steps = 0

    class WriterSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal writer_steps
            writer_steps += task.name == "writer"

    count = 40
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer, name="writer")
        await trio.sleep(0.05)
        instrument = WriterSteps()
        trio.lowlevel.add_instrument(instrument)
        try:
            for index in range(count):
                session.send_have(index)
                with trio.fail_after(5):
                    messages = await receiver.receive_batch()
                assert messages == [Extended(LOCAL_HAVES_ID, build_haves_payload([index]))]
        finally:
            trio.lowlevel.remove_instrument(instrument)
        nursery.cancel_scope.cancel()
    # One step and one read per message (two each before), plus the first read's try.
    assert writer_steps <= count + 1
    assert count <= reads <= count + 1


@pytest.mark.parametrize("size", [20, CONTROL_READ_MAX + 1], ids=["control read", "bulk read"])
def test_control_reads_are_not_held_behind_origin_reads(size: int) -> None:
    """A fetcher's downlink full of registry reads (which go first on its download
    limiter) must not hold back a small socket read: it carries its peers' requests, and
    behind the origin reads the fetcher's uplink, the swarm's only source of first
    copies, idled until its whole range was read (docs/benchmarks.md, "Calibration").
    A bulk read (piece data) still waits behind them."""
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> float:
        limiter = RateLimiter(64 * 1024, burst=16 * 1024)
        stream, _ = trio.testing.memory_stream_pair()
        conn = make_connection(
            Role.INITIATOR, peer_id=new_peer_id(), info_hash=bytes(20), authenticator=None
        )
        session = PeerSession(stream, conn, address=("127.0.0.1", 1), download=limiter)

        async def origin_reads() -> None:
            for _ in range(5):  # 5 s of registry reads at the link's rate
                await limiter.acquire(64 * 1024, first=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin_reads)
            await trio.sleep(0.01)  # the origin reads hold the link
            start = trio.current_time()
            # A handshake's first bytes, padded: the connection just waits for more.
            await session._received(b"\x13BitTorrent protocol".ljust(size, b"\0")[:size])
            return trio.current_time() - start

    elapsed = trio.run(main, clock=clock)
    if size <= CONTROL_READ_MAX:
        assert elapsed < 0.1  # its own 20 bytes, nothing else
    else:
        assert elapsed > 3.0  # behind the origin reads


async def quiet_ticks(swarms: list[Swarm]) -> list[int]:
    """Wait until ``swarms`` tick no more for a second (20 ticks at ``tick_s`` 0.05; the
    handshakes' last messages may still wake them at first); their tick counts then."""
    with trio.fail_after(10):
        while True:
            ticks = [s.stats.ticks for s in swarms]
            await trio.sleep(1.0)
            if [s.stats.ticks for s in swarms] == ticks:
                return ticks


async def test_a_quiet_swarm_stops_ticking_and_wakes_for_a_newcomer(tmp_path: Path) -> None:
    """Two seeds connected to each other have nothing to do: their ticks stop (an idle
    node sleeps) until a leecher connects, which is then served at full speed; once it is
    done, they fall quiet again."""
    blob, meta = make_blob(tmp_path, 4 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    settings = SwarmSettings(tick_s=0.05, idle_tick_s=60.0)
    async with nodes(3, issuer) as (a, b, c):
        seeds = [
            await node.add_swarm(
                meta,
                tmp_path / name,
                storage=PieceStorage.open_complete(blob, meta),
                settings=settings,
            )
            for node, name in ((a, "a"), (b, "b"))
        ]
        seeds[0].add_peers([b.listen_address])
        with trio.fail_after(10):
            while not all(s.peers for s in seeds):
                await trio.sleep(0.02)
        ticks = await quiet_ticks(seeds)

        leecher = await c.add_swarm(meta, tmp_path / "c", settings=settings)
        leecher.add_peers([a.listen_address, b.listen_address])
        with trio.fail_after(10):
            await leecher.complete.wait()
        assert sha256_file(leecher.storage.path) == sha256_file(blob)
        with trio.fail_after(10):
            while len(leecher.peers) < 2:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        # The newcomer woke both seeds (rates and timeouts tick again while they serve).
        assert all(s.stats.ticks > t for s, t in zip(seeds, ticks, strict=True))
        await quiet_ticks([*seeds, leecher])


async def test_a_fetcher_whose_registry_reads_fill_its_downlink_asks_its_peers_for_nothing(
    tmp_path: Path,
) -> None:
    """Blocks a fetcher asks of a peer while its registry reads take its whole downlink
    wait for those reads to end, and hold up the requests that peer sends behind them:
    the fetcher's uplink idled (docs/benchmarks.md, "Calibration"). So it asks for
    nothing meanwhile (``OriginShare``), and for everything once the reads end."""
    blob, meta = make_blob(tmp_path, 2 * MIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    rate = 1 * MIB
    # A deep pipeline: without the rule the fetcher asks the seed for 32 blocks at once.
    settings = SwarmSettings(picker=PickerSettings(min_pipeline=64))
    auth = local_authenticator(issuer, subject="fetcher", cluster="prod")
    async with (
        nodes(1, issuer) as (seed_node,),
        open_peer_node(authenticator=auth, download_rate=rate) as fetcher_node,
    ):
        await seed_node.add_swarm(
            meta, tmp_path / "seed", storage=PieceStorage.open_complete(blob, meta)
        )
        fetcher = await fetcher_node.add_swarm(meta, tmp_path / "fetcher", settings=settings)
        reading = True

        async def registry_reads() -> None:
            nonlocal reading
            for _ in range(40):  # 64 KiB at a time at the link's rate: 2.5 s
                await fetcher.pace_download(64 * 1024)
            reading = False

        most = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry_reads)
            await trio.sleep(1.0)  # the reads hold the link
            fetcher.add_peers([seed_node.listen_address])
            while reading:
                asked = sum(len(p.outstanding) for p in fetcher.peers.values())
                most = max(most, asked)
                await trio.sleep(0.02)
        assert fetcher.peers  # it was connected while it read
        # At most the link's slack (the reads' pace wobbles): a block or two of 8 KiB.
        assert most <= 4, most
        with trio.fail_after(20):
            await fetcher.complete.wait()
        assert sha256_file(fetcher.storage.path) == sha256_file(blob)
