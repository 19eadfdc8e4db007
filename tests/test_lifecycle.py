"""Lifecycle gaps (#18 item 6): connections end with the tokens that admitted them,
origin reads use fresh credentials and only on the configured registry, and what the
registry deleted leaves the node's cache and the sidecar's torrent store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.node import PeerNode, open_peer_node

from .test_transfer import make_blob

LIFETIME_S = 600
TICK = SwarmSettings(tick_s=0.05)


class SkewedClock:
    """The wall clock plus an offset the test moves: tokens expire without waiting."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


@asynccontextmanager
async def two_nodes(
    clocks: tuple[Callable[[], float], Callable[[], float]],
) -> AsyncIterator[tuple[PeerNode, PeerNode]]:
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=LIFETIME_S)
    async with AsyncExitStack() as stack:
        started = []
        for i, clock in enumerate(clocks):
            auth = local_authenticator(issuer, subject=f"node-{i}", cluster="prod", clock=clock)
            started.append(await stack.enter_async_context(open_peer_node(authenticator=auth)))
        yield started[0], started[1]


async def connected(swarm: Swarm, peer_id: bytes) -> None:
    with trio.fail_after(20):
        while peer_id not in swarm.peers:
            await trio.sleep(0.01)


async def test_a_connection_outlives_no_token_and_is_dialled_again(tmp_path: Path) -> None:
    """Past the admitting tokens' expiry (plus leeway) both ends drop the connection;
    the dialer dials again at once with its renewed token, so the swarm carries on
    over a connection admitted by live tokens."""
    blob, meta = make_blob(tmp_path, 256 * 1024)
    clock = SkewedClock()
    async with two_nodes((clock, clock)) as (seeder, leecher):
        seed = await seeder.add_swarm(
            meta, tmp_path / "s", storage=PieceStorage.open_complete(blob, meta), settings=TICK
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "l", settings=TICK)
        swarm.add_peers([seeder.listen_address])
        await connected(swarm, seeder.peer_id)
        await connected(seed, leecher.peer_id)
        with trio.fail_after(20):
            await swarm.complete.wait()
        before_dialer = swarm.peers[seeder.peer_id]
        before_acceptor = seed.peers[leecher.peer_id]
        old_tokens = {before_dialer.info.token.jti, before_acceptor.info.token.jti}  # type: ignore[union-attr]

        # Still valid a few ticks later (less than the lifetime gone): nothing closes.
        clock.skew = LIFETIME_S / 2
        await trio.sleep(TICK.tick_s * 5)
        assert swarm.peers[seeder.peer_id] is before_dialer
        assert seed.peers[leecher.peer_id] is before_acceptor

        # Past exp + leeway: the old connection goes, a new one with new tokens comes.
        clock.skew = LIFETIME_S + 31
        with trio.fail_after(20):
            while swarm.peers.get(seeder.peer_id) in (None, before_dialer) or seed.peers.get(
                leecher.peer_id
            ) in (None, before_acceptor):
                await trio.sleep(0.01)
        after_dialer = swarm.peers[seeder.peer_id]
        after_acceptor = seed.peers[leecher.peer_id]
        assert before_dialer.session.conn.is_open is False
        for peer in (after_dialer, after_acceptor):
            assert peer.info.token is not None
            assert peer.info.token.jti not in old_tokens
            assert peer.info.token.expires_at > clock()


async def test_an_acceptor_drops_a_dialer_that_keeps_an_expired_token(tmp_path: Path) -> None:
    """The dialer's clock says its token is fine (say it never closes on its own: a
    hostile or broken peer); the acceptor's clock is past that token's expiry plus
    leeway, and the acceptor closes the connection by itself."""
    blob, meta = make_blob(tmp_path, 256 * 1024)
    acceptor_clock = SkewedClock()
    async with two_nodes((acceptor_clock, time.time)) as (seeder, leecher):
        seed = await seeder.add_swarm(
            meta, tmp_path / "s", storage=PieceStorage.open_complete(blob, meta), settings=TICK
        )
        swarm = await leecher.add_swarm(meta, tmp_path / "l", settings=TICK)
        swarm.add_peers([seeder.listen_address])
        await connected(seed, leecher.peer_id)
        admitted = seed.peers[leecher.peer_id]
        acceptor_clock.skew = LIFETIME_S + 31
        with trio.fail_after(20):
            while seed.peers.get(leecher.peer_id) is admitted:
                await trio.sleep(0.01)
        assert admitted.session.conn.is_open is False
        assert admitted.info.admission_expired()
