"""Runs of whole pieces per request (``p2pimage_runs``, docs/protocol.md §3.6): the
capability, the geometry of a run request and its bounds, and swarms of nodes that offer
runs beside a node that does not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pimage.auth.tokens import SigningKey, TokenIssuer
from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bencode
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import PeerNode, open_peer_node
from p2pimage.swarm.session import new_peer_id
from p2pimage.wire import (
    BLOCK_LENGTH,
    MAX_BLOCK_LENGTH_LIMIT,
    NEED_DATA,
    RUNS_KEY,
    Bitfield,
    ExtendedHandshake,
    Interested,
    PeerConnection,
    Piece,
    Request,
    Role,
    Unchoke,
    run_pieces,
)
from p2pimage.wire._codec import BLOCK_LENGTH_KEY, EXT_HANDSHAKE_ID, build_extended

from .test_swarm import nodes
from .test_transfer import make_blob, sha256_file
from .test_wire import drain, handshake, initiator, responder

KIB = 1024
MIB = 1024 * KIB


# --- the capability ---------------------------------------------------------------------


@pytest.mark.parametrize("auth", [True, False], ids=["authenticated", "open mode"])
def test_runs_hold_only_when_both_sides_offer_them(auth: bool) -> None:
    a, b = (
        initiator(auth, max_block_length=MAX_BLOCK_LENGTH_LIMIT, runs=True),
        responder(auth, max_block_length=MAX_BLOCK_LENGTH_LIMIT, runs=True),
    )
    handshake(a, b)
    assert a.peer_runs and b.peer_runs
    a = initiator(auth, max_block_length=MAX_BLOCK_LENGTH_LIMIT, runs=True)
    b = responder(auth, max_block_length=MAX_BLOCK_LENGTH_LIMIT)
    handshake(a, b)
    assert b.peer_runs and not a.peer_runs  # a may not send runs to b


def test_a_side_without_runs_sends_the_extended_handshake_it_sent_before() -> None:
    """No ``p2pimage_runs`` key unless offered: a node with runs off (and every stock
    client) is on the wire exactly as before."""
    a, b = initiator(False, max_block_length=MAX_BLOCK_LENGTH_LIMIT), responder(False)
    sent_a, _ = handshake(a, b)
    assert RUNS_KEY not in sent_a
    a, b = initiator(False, max_block_length=MAX_BLOCK_LENGTH_LIMIT, runs=True), responder(False)
    sent_a, _ = handshake(a, b)
    assert RUNS_KEY + b"i1e" in sent_a


def test_runs_need_blocks_above_16_kib() -> None:
    with pytest.raises(LocalProtocolError):
        initiator(False, runs=True)  # max_block_length 16 KiB


@pytest.mark.parametrize(
    ("block", "flag"),
    [
        (MAX_BLOCK_LENGTH_LIMIT, 0),
        (MAX_BLOCK_LENGTH_LIMIT, 2),
        (MAX_BLOCK_LENGTH_LIMIT, -1),
        (MAX_BLOCK_LENGTH_LIMIT, b"1"),
        (MAX_BLOCK_LENGTH_LIMIT, [1]),
        (None, 1),  # the flag alone: 16 KiB blocks, no runs
        (BLOCK_LENGTH, 1),
    ],
)
def test_an_offer_is_the_flag_1_with_blocks_above_16_kib(block: int | None, flag: Any) -> None:
    a = initiator(False, max_block_length=MAX_BLOCK_LENGTH_LIMIT, runs=True)
    b = responder(False)
    b.receive_data(a.data_to_send())
    drain(b)
    a.receive_data(b.data_to_send())
    payload: dict[bytes, Any] = {b"m": {}, RUNS_KEY: flag}
    if block is not None:
        payload[BLOCK_LENGTH_KEY] = block
    a.receive_data(build_extended(EXT_HANDSHAKE_ID, bencode(payload)))
    assert any(isinstance(e, ExtendedHandshake) for e in drain(a))
    assert not a.peer_runs


# --- the geometry of a run request ------------------------------------------------------


def test_run_pieces_names_the_whole_pieces_of_a_run() -> None:
    geometry = {"piece_length": 64 * KIB, "total_length": 10 * 64 * KIB + 1000}
    assert run_pieces(3, 0, 64 * KIB, **geometry) == range(3, 4)  # one piece
    assert run_pieces(3, 16 * KIB, 16 * KIB, **geometry) == range(3, 4)  # a part of it
    assert run_pieces(3, 0, 4 * 64 * KIB, **geometry) == range(3, 7)
    assert run_pieces(9, 0, 64 * KIB + 1000, **geometry) == range(9, 11)  # to the short end
    assert run_pieces(10, 0, 1000, **geometry) == range(10, 11)


@pytest.mark.parametrize(
    ("index", "begin", "length", "why"),
    [
        (3, 1, 64 * KIB, "from offset"),  # a run must start at a piece's start
        (3, 0, 64 * KIB + 1, "splits a piece"),
        (3, 0, 2 * 64 * KIB - 1, "splits a piece"),
        (9, 0, 2 * 64 * KIB, "end"),  # past the blob's end
        (10, 0, 1001, "end"),
        (11, 0, 1, "piece 11"),  # no such piece
        (2**32 - 1, 0, 1, "piece"),
    ],
)
def test_hostile_run_requests_are_the_peers_fault(
    index: int, begin: int, length: int, why: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        run_pieces(index, begin, length, piece_length=64 * KIB, total_length=10 * 64 * KIB + 1000)


@given(
    piece_length=st.sampled_from([16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB]),
    total_length=st.integers(1, 4 * MIB),
    index=st.integers(0, 2**32 - 1),
    begin=st.integers(0, 2**32 - 1),
    length=st.integers(1, MAX_BLOCK_LENGTH_LIMIT),
)
def test_run_pieces_answers_pieces_that_hold_the_request_or_refuses(
    piece_length: int, total_length: int, index: int, begin: int, length: int
) -> None:
    """Any request: either the consecutive pieces that exactly hold a run (or the one
    piece a request within it names), or RemoteProtocolError, nothing else."""
    num_pieces = -(-total_length // piece_length)
    index %= num_pieces + 2  # mostly real pieces, some beyond
    try:
        pieces = run_pieces(
            index, begin, length, piece_length=piece_length, total_length=total_length
        )
    except RemoteProtocolError:
        return
    assert 0 <= pieces.start < pieces.stop <= num_pieces
    if len(pieces) > 1:
        sizes = sum(min(piece_length, total_length - i * piece_length) for i in pieces)
        assert begin == 0 and sizes == length
    else:
        size = min(piece_length, total_length - index * piece_length)
        assert begin + length <= size


# --- swarms -----------------------------------------------------------------------------


async def test_two_nodes_with_runs_use_them_beside_a_node_without(tmp_path: Path) -> None:
    """A leecher that offers runs fetches from a seed that offers them (runs of whole
    pieces) and from one that does not (one piece per request, as before): both serve,
    the blob is whole, nobody is closed for a bad request; a leecher without runs asks
    the runs seed one piece per request."""
    blob, meta = make_blob(tmp_path, 2 * MIB, piece_length=16 * KIB)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    rate = 1 * MIB
    async with (
        nodes(1, issuer, upload_rate=rate) as (with_runs,),
        nodes(1, issuer, upload_rate=rate, runs=False) as (without,),
        nodes(1, issuer) as (leecher,),
        nodes(1, issuer, runs=False) as (old_leecher,),
    ):
        seeds = []
        for i, node in enumerate((with_runs, without)):
            storage = PieceStorage.open_complete(blob, meta)
            seeds.append(await node.add_swarm(meta, tmp_path / f"s{i}", storage=storage))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        old = await old_leecher.add_swarm(meta, tmp_path / "old")
        addresses = [with_runs.listen_address, without.listen_address]
        swarm.add_peers(addresses)
        old.add_peers(addresses)
        with trio.fail_after(30):
            await swarm.complete.wait()
            await old.complete.wait()
        assert sha256_file(swarm.storage.path) == sha256_file(blob)
        assert sha256_file(old.storage.path) == sha256_file(blob)
        assert swarm.stats.pieces_in_runs > 0
        assert swarm.stats.requests_sent < meta.num_pieces  # fewer requests than pieces
        assert old.stats.pieces_in_runs == 0
        assert old.stats.requests_sent >= meta.num_pieces
        assert seeds[0].stats.uploaded > 0 and seeds[1].stats.uploaded > 0
        assert not swarm.banned and not old.banned and swarm.stats.hash_failures == 0


async def _bare_peer(node: PeerNode, meta: Metainfo, *, runs: bool) -> tuple[Any, PeerConnection]:
    """A TCP connection to an open-mode node, driven by a bare PeerConnection that
    offers 256 KiB blocks (and runs, with ``runs``): open, both extended handshakes in."""
    stream = await trio.open_tcp_stream(*node.listen_address)
    conn = PeerConnection(
        Role.INITIATOR,
        peer_id=new_peer_id(),
        authenticator=None,
        open_mode=True,
        info_hash=meta.info_hash,
        num_pieces=meta.num_pieces,
        max_block_length=MAX_BLOCK_LENGTH_LIMIT,
        runs=runs,
    )
    await stream.send_all(conn.data_to_send())
    with trio.fail_after(5):
        while not (conn.is_open and conn.peer_extensions):
            conn.receive_data(await stream.receive_some())
            while conn.next_event() is not NEED_DATA:
                pass
            if out := conn.data_to_send():
                await stream.send_all(out)
    return stream, conn


async def _closed_by_node(stream: Any, conn: PeerConnection) -> bool:
    """Read until the node hangs up (True) or 5 s pass (False)."""
    with trio.move_on_after(5):
        while True:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                return True
            if not data:
                return True
            conn.receive_data(data)
            while conn.next_event() is not NEED_DATA:
                pass
    return False


@pytest.mark.parametrize(
    ("runs", "request_"),
    [
        (True, "past the end"),
        (True, "splits a piece"),
        (False, "a run"),  # we did not offer runs: a request longer than a piece
    ],
)
async def test_a_bad_run_request_closes_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, runs: bool, request_: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pimage.swarm.engine")
    blob, meta = make_blob(tmp_path, 1 * MIB, piece_length=16 * KIB)
    async with open_peer_node(authenticator=None, open_mode=True, runs=runs) as seed:
        await seed.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        stream, conn = await _bare_peer(seed, meta, runs=True)
        assert conn.peer_runs is runs
        last = meta.num_pieces - 1
        request = {
            "past the end": Request(last - 1, 0, 3 * 16 * KIB),
            "splits a piece": Request(0, 0, 16 * KIB + 1),
            "a run": Request(0, 0, 2 * 16 * KIB),
        }[request_]
        await stream.send_all(conn.send(Interested()) + conn.send(request))
        assert await _closed_by_node(stream, conn)
        await stream.aclose()
    assert "bad request" in caplog.text and "internal error" not in caplog.text


async def test_a_run_answered_by_one_long_piece_closes_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that answers a run of pieces with one piece message of the run's length
    (a block we did not ask for) is disconnected; nothing of it is stored."""
    caplog.set_level(logging.DEBUG, logger="p2pimage.swarm.engine")
    blob, meta = make_blob(tmp_path, 1 * MIB, piece_length=16 * KIB)
    async with open_peer_node(authenticator=None, open_mode=True) as leecher:
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        stream, conn = await _bare_peer(leecher, meta, runs=True)
        assert conn.peer_runs
        full = (1 << meta.num_pieces) - 1
        bits = (full << (-meta.num_pieces % 8)).to_bytes(-(-meta.num_pieces // 8), "big")
        await stream.send_all(conn.send(Bitfield(bits)) + conn.send(Unchoke()))
        run: Request | None = None
        with trio.fail_after(5):
            while run is None:
                conn.receive_data(await stream.receive_some())
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, Request) and event.length > meta.piece_length:
                        run = event
        with blob.open("rb") as f:
            f.seek(run.index * meta.piece_length)
            data = f.read(run.length)
        await stream.send_all(conn.send(Piece(run.index, 0, data)))
        assert await _closed_by_node(stream, conn)
        await stream.aclose()
        assert not swarm.storage.has_piece(run.index)
    assert "were asked" in caplog.text and "internal error" not in caplog.text
