"""Real bytes over real TCP: seeder → leecher through the trio peer layer, auth on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import open_peer_node

MIB = 1024 * 1024


def make_blob(
    directory: Path, size: int, name: str = "blob", piece_length: int | None = None
) -> tuple[Path, Metainfo]:
    path = directory / name
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 4 * MIB))
            f.write(chunk)
            remaining -= len(chunk)
    return path, create_metainfo_from_file(path, piece_length=piece_length)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer([SigningKey.generate()], issuer="test-sidecar")


async def test_64mib_loopback_transfer_with_auth(tmp_path: Path, issuer: TokenIssuer) -> None:
    blob, meta = make_blob(tmp_path, 64 * MIB)
    seed_auth = local_authenticator(issuer, subject="seeder", cluster="prod")
    leech_auth = local_authenticator(issuer, subject="leecher", cluster="prod")
    async with (
        open_peer_node(authenticator=seed_auth) as seeder,
        open_peer_node(authenticator=leech_auth) as leecher,
    ):
        await seeder.add_swarm(meta, tmp_path, storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([seeder.listen_address])
        with trio.fail_after(120):
            await swarm.complete.wait()
        assert swarm.stats.hash_failures == 0
        assert swarm.stats.downloaded_from_peers == meta.length
    assert sha256_file(swarm.storage.path) == meta.sha256


@pytest.mark.parametrize("wrong", ["cluster", "issuer"])
async def test_unauthorized_peer_gets_no_piece_bytes(
    tmp_path: Path, issuer: TokenIssuer, wrong: str
) -> None:
    blob, meta = make_blob(tmp_path, 2 * MIB)
    seed_auth = local_authenticator(issuer, subject="seeder", cluster="prod")
    if wrong == "cluster":
        leech_auth = local_authenticator(issuer, subject="intruder", cluster="staging")
    else:
        rogue = TokenIssuer([SigningKey.generate()], issuer="test-sidecar")
        leech_auth = local_authenticator(rogue, subject="intruder", cluster="prod")
    async with (
        open_peer_node(authenticator=seed_auth) as seeder,
        open_peer_node(authenticator=leech_auth) as leecher,
    ):
        seed_swarm = await seeder.add_swarm(
            meta, tmp_path, storage=PieceStorage.open_complete(blob, meta)
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "leecher")
        swarm.add_peers([seeder.listen_address])
        await trio.sleep(1.0)
        assert not swarm.complete.is_set()
        assert swarm.storage.num_have == 0
        assert seed_swarm.stats.uploaded == 0
        assert not seed_swarm.peers and not swarm.peers


async def test_open_mode_requires_explicit_opt_in() -> None:
    from p2pimage.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        async with open_peer_node(authenticator=None):
            pass


async def test_a_peer_gone_while_we_answer_its_handshake_is_a_clean_close(
    issuer: TokenIssuer,
) -> None:
    """The dialer sends its handshake and leaves before our answer: writing the answer
    fails, and that must be a PeerClosed for this one connection, not an error that
    escapes (it used to propagate out of the listener and stop the node)."""
    import trio.testing

    from p2pimage.swarm.session import PeerClosed, PeerSession, make_connection, new_peer_id
    from p2pimage.wire import Role

    info_hash = hashlib.sha1(b"layer").digest()
    auth = local_authenticator(issuer, subject="node-r", cluster="prod")
    dialer = make_connection(
        Role.INITIATOR,
        peer_id=new_peer_id(),
        info_hash=info_hash,
        authenticator=local_authenticator(issuer, subject="node-i", cluster="prod"),
    )
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(dialer.data_to_send())
    await theirs.aclose()
    conn = make_connection(
        Role.RESPONDER, peer_id=new_peer_id(), info_hash=None, authenticator=auth
    )
    session = PeerSession(ours, conn, address=("127.0.0.1", 1))  # type: ignore[arg-type]
    with pytest.raises(PeerClosed, match="connection lost"):
        await session.handshake(accept=lambda ih: ih == info_hash)
