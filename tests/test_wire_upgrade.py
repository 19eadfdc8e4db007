"""Rolling upgrade: a node of the previous peer protocol (v2: plain ``p2pimage_auth``,
tokens in the clear) meets a v3 node. Its extended handshake is simulated byte for byte;
either way round the v3 node refuses it by name in its log, reveals no token, closes
cleanly and keeps serving."""

from __future__ import annotations

import functools
import logging
import os
import struct
from pathlib import Path

import pytest
import trio

from benchmarks._attacks_wire import (
    CLUSTER,
    count_tokens_in,
    fetch,
    new_issuer,
    seeding_node,
)
from p2pimage.auth.tokens import local_authenticator
from p2pimage.metainfo.bencoding import bdecode
from p2pimage.swarm.node import open_peer_node
from p2pimage.swarm.session import PeerClosed
from p2pimage.wire._codec import build_extended_handshake, build_handshake
from p2pimage.wire._crypto import kx_public_key


def v2_opening(info_hash: bytes) -> bytes:
    """What a v2 node sends first: handshake and its extended handshake."""
    return build_handshake(info_hash, b"-PI0100-" + os.urandom(12), extensions=True) + (
        build_extended_handshake(
            {b"p2pimage_auth": 1},
            client=b"p2pimage/0.1",
            reqq=500,
            nonce=os.urandom(32),
            kx=kx_public_key(os.urandom(32)),
        )
    )


def extended_handshakes(stream: bytes) -> list[dict[bytes, object]]:
    """The messages after a 68-byte handshake, all of which must be extended handshakes."""
    found, pos = [], 68
    while pos < len(stream):
        (length,) = struct.unpack_from(">I", stream, pos)
        assert stream[pos + 4] == 20 and stream[pos + 5] == 0, "not an extended handshake"
        payload = bdecode(stream[pos + 6 : pos + 4 + length])
        assert isinstance(payload, dict)
        found.append(payload)
        pos += 4 + length
    return found


async def test_a_v2_node_dialing_a_v3_node_is_refused_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = new_issuer()
    caplog.set_level(logging.WARNING, logger="p2pimage.swarm.session")
    async with seeding_node(tmp_path, issuer) as (node, auth, _, meta):
        stream = await trio.open_tcp_stream(*node.listen_address)
        received = bytearray()
        async with stream:
            await stream.send_all(v2_opening(meta.info_hash))
            with trio.fail_after(5):
                while data := await stream.receive_some(65536):
                    received += data
        # The v3 node said who it is (its version by name) and nothing else, then closed.
        (ext,) = extended_handshakes(bytes(received))
        m = ext[b"m"]
        assert isinstance(m, dict) and b"p2pimage_auth_v3" in m and b"p2pimage_auth" not in m
        assert count_tokens_in(bytes(received), [auth.current_token()]) == 0
        assert any(
            "older p2pimage peer protocol (v2, this node v3)" in r.getMessage()
            for r in caplog.records
        )
        # The node serves on.
        await fetch(tmp_path, issuer, meta, node.listen_address, "v3-leecher")


async def test_a_v3_node_dialing_a_v2_node_is_refused_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = new_issuer()
    caplog.set_level(logging.WARNING, logger="p2pimage.swarm.session")
    info_hash = os.urandom(20)
    auth = local_authenticator(issuer, subject="new", cluster=CLUSTER)
    received = bytearray()

    async def v2_responder(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.fail_after(5):
                while data := await stream.receive_some(65536):
                    received.extend(data)
                    if len(received) >= 68 and len(received) - len(data) < 68:
                        await stream.send_all(v2_opening(info_hash))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, v2_responder, 0, host="127.0.0.1")
        )
        address = listeners[0].socket.getsockname()[:2]
        async with open_peer_node(authenticator=auth) as node:
            with pytest.raises(PeerClosed, match=r"protocol version.*older.*\(v2"):
                await node.dial(address, info_hash)
            assert node.connections == 0
        nursery.cancel_scope.cancel()
    # What the old node got from us: handshake and extended handshake, no token.
    assert len(extended_handshakes(bytes(received))) == 1
    assert count_tokens_in(bytes(received), [auth.current_token()]) == 0
    assert any("older p2pimage peer protocol (v2" in r.getMessage() for r in caplog.records)
