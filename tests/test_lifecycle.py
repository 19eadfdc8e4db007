"""Lifecycle gaps (#18 item 6): connections end with the tokens that admitted them,
origin reads use fresh credentials and only on the configured registry, and what the
registry deleted leaves the node's cache and the sidecar's torrent store."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemons.sidecar import _reconcile
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.registry import start_registry
from p2pimage.auth.tokens import (
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    local_authenticator,
)
from p2pimage.errors import PeerClosed
from p2pimage.metainfo.torrent import create_metainfo_from_file
from p2pimage.mirror.blobs import ACCESS_CACHE_S, LayerService
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import BlobCache, blob_key
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.node import PeerNode, open_peer_node
from p2pimage.swarm.origin import OriginCredentials, OriginReader, same_registry

from .test_sidecar import sidecar_env
from .test_transfer import make_blob, sha256_file

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
    issuer: TokenIssuer | None = None,
) -> AsyncIterator[tuple[PeerNode, PeerNode]]:
    if issuer is None:
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


# --- origin credentials ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:5000/v2/app/blobs/sha256:aa", True),
        ("HTTP://127.0.0.1:5000/v2/app/blobs/sha256:aa", True),
        ("http://127.0.0.1:5001/v2/app/blobs/sha256:aa", False),  # another port
        ("http://127.0.0.2:5000/v2/app/blobs/sha256:aa", False),  # another host
        ("https://127.0.0.1:5000/v2/app/blobs/sha256:aa", False),  # another scheme
        ("http://user@127.0.0.1:5000/v2/app/blobs/sha256:aa", False),  # userinfo
        ("http://127.0.0.1:5000@evil.example/v2/app", False),  # host is evil.example
        ("http://127.0.0.1:5000/token?x=/v2/", False),  # not under /v2/
        ("ftp://127.0.0.1:5000/v2/app", False),
        ("http://127.0.0.1:notaport/v2/app", False),
    ],
)
def test_origin_urls_are_accepted_only_on_the_configured_registry(url: str, ok: bool) -> None:
    assert same_registry(url, "http://127.0.0.1:5000/") is ok


def test_credentials_follow_the_latest_authorised_client_of_the_swarm_repository() -> None:
    creds = OriginCredentials("http://r:5000", "team/app", {"Authorization": "Bearer one"})
    first, headers = creds.current()
    assert headers == {"Authorization": "Bearer one"}
    creds.offer("other/app", {"Authorization": "Bearer other"})  # scoped elsewhere: ignored
    assert creds.current() == (first, {"Authorization": "Bearer one"})
    creds.offer("team/app", {"Authorization": "Bearer two"})
    second, headers = creds.current()
    assert second > first and headers == {"Authorization": "Bearer two"}
    creds.refused(first)  # an old generation refused: the current one stays
    assert creds.current() == (second, {"Authorization": "Bearer two"})
    creds.refused(second)
    third, headers = creds.current()
    assert third > second and headers == {}


async def _hostile_origin(listener: trio.SocketListener, seen: bytearray) -> None:
    async with listener:
        while True:
            stream = await listener.accept()
            async with stream:
                with trio.move_on_after(2):
                    seen.extend(await stream.receive_some(65536))


async def test_an_origin_url_on_another_host_gets_neither_a_request_nor_credentials(
    tmp_path: Path, registry: Any
) -> None:
    """A tracker naming an origin URL that is not the node's registry (say, a host it
    controls, to collect credentials) gets no connection at all; the range goes back
    to the peers, and the swarm completes from a seeder."""
    blob, meta = make_blob(tmp_path, 1024 * 1024)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen = bytearray()
    async with (
        two_nodes((time.time, time.time)) as (seeder, leecher),
        httpx.AsyncClient() as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_hostile_origin, listeners[0], seen)
        await seeder.add_swarm(meta, tmp_path / "s", storage=PieceStorage.open_complete(blob, meta))
        swarm = await leecher.add_swarm(meta, tmp_path / "l")
        creds = OriginCredentials(registry.url, "app", {"Authorization": "Bearer secret"})
        reader = OriginReader(
            swarm,
            f"http://127.0.0.1:{port}/v2/app/blobs/{meta.sha256}",
            0,
            meta.num_pieces,
            client=http,
            credentials=creds,
        )
        with trio.fail_after(30):
            await reader.run()
            assert reader.failed is not None and "configured registry" in reader.failed
            swarm.add_peers([seeder.listen_address])
            await swarm.complete.wait()
        await trio.sleep(0.1)  # a connection the reader had opened would be accepted by now
        nursery.cancel_scope.cancel()
    assert seen == b""
    assert reader.bytes_read == 0
    assert sha256_file(swarm.storage.path) == meta.sha256


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("renewed", [True, False])
async def test_refused_origin_credentials_are_dropped_and_fresh_ones_used(
    tmp_path: Path, renewed: bool
) -> None:
    """A registry with htpasswd auth refuses the credentials the reader holds (401): the
    reader never sends them again, waits for a client to bring fresh ones and reads on
    with those; with none coming, it hands its range back to the peers."""
    blob, meta = make_blob(tmp_path, 1024 * 1024)
    async with start_registry(htpasswd=("puller", "right")) as reg:
        async with RegistryClient(reg.url, username="puller", password="right") as client:
            await client.push_blob("team/app", blob.read_bytes())
        async with two_nodes((time.time, time.time)) as (node, _), httpx.AsyncClient() as http:
            swarm = await node.add_swarm(meta, tmp_path / "l")
            creds = OriginCredentials(
                reg.url,
                "team/app",
                _basic("puller", "stale"),
                refresh_wait_s=3.0 if renewed else 0.3,
            )
            reader = OriginReader(
                swarm,
                f"{reg.url}/v2/team/app/blobs/{meta.sha256}",
                0,
                meta.num_pieces,
                client=http,
                credentials=creds,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.run)
                with trio.fail_after(30):
                    # Refused: the stale credentials are gone.
                    while creds.current()[1]:
                        await trio.sleep(0.01)
                    if renewed:
                        creds.offer("team/app", _basic("puller", "right"))
                    await reader.finished.wait()
            if renewed:
                assert reader.failed is None
                assert reader.pieces_done == meta.num_pieces
                with trio.fail_after(30):
                    await swarm.complete.wait()
                assert sha256_file(swarm.storage.path) == meta.sha256
            else:
                assert reader.failed is not None and "401" in reader.failed
                assert reader.pieces_done == 0


# --- what the registry deleted leaves the node ------------------------------------------


class Mirror:
    """A LayerService over the real registry with one layer in its cache, as a node
    that pulled it holds it."""

    def __init__(self, tmp_path: Path, reg: Any, http: httpx.AsyncClient, node: Any = None):
        self.now = [1_000.0]
        self.cache = BlobCache(tmp_path / "cache", 64 * 1024 * 1024)
        self.layers = LayerService(
            registry=reg.url,
            node=node,
            cache=self.cache,
            http=http,
            sidecar=None,
            tracker=None,
            clock=lambda: self.now[0],
        )
        self.reg = reg

    def hold(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        key = blob_key(self.layers.namespace, digest[7:])
        path = self.cache.blob_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.cache.scan()
        assert self.cache.is_complete(key)
        return key

    async def pull(self, repository: str, digest: str) -> bytes:
        """What the node's blob GET does: the access check, then the read."""
        access = await self.layers.check_access(self.reg.url, repository, digest, None)
        assert access.status == 200 and access.size is not None
        out = bytearray()
        async with aclosing(
            self.layers.read(self.reg.url, repository, digest, access.size, None)
        ) as chunks:
            async for chunk in chunks:
                out += chunk
        return bytes(out)

    async def status(self, repository: str, digest: str) -> int:
        self.now[0] += ACCESS_CACHE_S + 1  # past any cached answer
        answer = await self.layers.check_access(self.reg.url, repository, digest, None)
        return answer.status


async def delete_blob(http: httpx.AsyncClient, reg: Any, repository: str, digest: str) -> None:
    r = await http.delete(f"{reg.url}/v2/{repository}/blobs/{digest}")
    assert r.status_code == 202, r.text


async def test_a_blob_the_registry_deleted_leaves_the_cache(tmp_path: Path, registry: Any) -> None:
    """The access check's 404 from a repository the node served the blob for drops the
    cached blob; a 404 from a repository that never had it (any client can name one)
    drops nothing; while the blob lives in another served repository it stays."""
    data = bytes(range(256)) * 4096
    async with httpx.AsyncClient(timeout=10) as http:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob("team/app", data)
            await client.push_blob("team/other", data)
        mirror = Mirror(tmp_path, registry, http)
        key = mirror.hold(data)
        assert await mirror.pull("team/app", digest) == data
        assert await mirror.pull("team/other", digest) == data
        assert mirror.layers.stats.pulls["cache"] == 2

        # The registry's yes, asked again for each served repository, drops nothing:
        # only its 404 counts.
        assert await mirror.status("team/app", digest) == 200
        assert await mirror.status("team/other", digest) == 200
        assert mirror.cache.is_complete(key)

        assert await mirror.status("team/never-had-it", digest) == 404
        assert mirror.cache.is_complete(key)  # a stranger's 404 evicts nothing

        await delete_blob(http, registry, "team/app", digest)
        assert await mirror.status("team/app", digest) == 404
        assert mirror.cache.is_complete(key)  # team/other still has it

        await delete_blob(http, registry, "team/other", digest)
        assert await mirror.status("team/other", digest) == 404
        assert not mirror.cache.is_complete(key)
        assert mirror.cache.entry(key) is None
        assert not any(p.exists() for p in mirror.cache.files(key).all())


async def test_a_reader_in_flight_finishes_and_the_blob_goes_after_it(
    tmp_path: Path, registry: Any
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    async with httpx.AsyncClient(timeout=10) as http:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob("team/app", data)
        mirror = Mirror(tmp_path, registry, http)
        key = mirror.hold(data)
        chunks = mirror.layers.read(registry.url, "team/app", digest, len(data), None)
        async with aclosing(chunks):
            received = bytearray(await chunks.__anext__())  # the reader holds the blob now
            await delete_blob(http, registry, "team/app", digest)
            assert await mirror.status("team/app", digest) == 404
            assert mirror.cache.blob_path(key).exists()  # pinned by the reader
            async for chunk in chunks:
                received += chunk
        assert bytes(received) == data
        assert not mirror.cache.blob_path(key).exists()
        assert mirror.cache.entry(key) is None


async def test_registry_lost_drops_that_blob_and_its_access_answers_only(
    tmp_path: Path, registry: Any
) -> None:
    """``registry_lost(digest)`` drops the cached blob and every cached access answer
    for that digest (so the next check asks the registry again at once), and nothing of
    another digest; it says whether it dropped anything, and a malformed digest is a
    no-op."""
    data, other = os.urandom(64 * 1024), os.urandom(64 * 1024)
    async with httpx.AsyncClient(timeout=10) as http:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob("team/app", data)
            kept = await client.push_blob("team/app", other)
        mirror = Mirror(tmp_path, registry, http)
        key = mirror.hold(data)
        kept_key = mirror.hold(other)
        assert await mirror.pull("team/app", digest) == data
        assert await mirror.pull("team/app", kept) == other
        # Both gone from the registry; within access_cache_s the cached yes still stands.
        await delete_blob(http, registry, "team/app", digest)
        await delete_blob(http, registry, "team/app", kept)
        assert mirror.layers.registry_lost(digest) is True
        assert mirror.cache.entry(key) is None
        assert mirror.cache.is_complete(kept_key)
        layers = mirror.layers
        assert (await layers.check_access(registry.url, "team/app", digest, None)).status == 404
        assert (await layers.check_access(registry.url, "team/app", kept, None)).status == 200
        assert layers.registry_lost(digest) is False  # nothing left to drop
        assert layers.registry_lost("sha256:not-hex") is False
        assert layers.registry_lost("sha256:" + "0" * 64) is False
        assert mirror.cache.is_complete(kept_key)


async def test_registry_lost_counts_a_closed_swarm_without_a_cache_entry(
    tmp_path: Path, registry: Any
) -> None:
    """A swarm of the digest seeded from outside the cache: closing it is what
    ``registry_lost`` dropped, and it says so."""
    data = os.urandom(256 * 1024)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    meta = create_metainfo_from_file(blob)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with (
        httpx.AsyncClient(timeout=10) as http,
        two_nodes((time.time, time.time)) as (node, _),
    ):
        mirror = Mirror(tmp_path, registry, http, node=node)
        seeding = await node.add_swarm(
            meta, tmp_path / "seed", storage=PieceStorage.open_complete(blob, meta)
        )
        assert mirror.cache.entry(blob_key(mirror.layers.namespace, digest[7:])) is None
        assert mirror.layers.registry_lost(digest) is True
        with trio.fail_after(10):
            await seeding.closed.wait()
        assert meta.info_hash not in node.swarms
        assert mirror.layers.registry_lost(digest) is False


async def test_a_deleted_blob_stops_being_served_to_peers(tmp_path: Path, registry: Any) -> None:
    """The node seeding a layer closes that swarm when the registry answers 404: peers
    asking for it are refused at the handshake, and the cached blob is gone."""
    data = os.urandom(1024 * 1024)
    async with (
        httpx.AsyncClient(timeout=10) as http,
        two_nodes((time.time, time.time)) as (node, other),
    ):
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob("team/app", data)
        mirror = Mirror(tmp_path, registry, http, node=node)
        key = mirror.hold(data)
        meta = create_metainfo_from_file(mirror.cache.blob_path(key))
        seeding = await node.add_swarm(
            meta,
            mirror.cache.directory(mirror.layers.namespace),
            storage=PieceStorage.open_complete(mirror.cache.blob_path(key), meta),
        )
        assert await mirror.pull("team/app", digest) == data
        await delete_blob(http, registry, "team/app", digest)
        assert await mirror.status("team/app", digest) == 404
        with trio.fail_after(10):
            await seeding.closed.wait()
        assert meta.info_hash not in node.swarms
        assert mirror.cache.entry(key) is None
        leecher = await other.add_swarm(meta, tmp_path / "leecher")
        with pytest.raises(PeerClosed, match=r"unknown info-hash|closed during handshake"):
            await other.dial(node.listen_address, meta.info_hash)
        assert not leecher.peers


# --- the sidecar's reconciliation --------------------------------------------------------


async def test_reconciliation_drops_torrents_of_blobs_the_registry_lost(tmp_path: Path) -> None:
    """No delete events reach the sidecar (a lost webhook): its periodic reconciliation
    HEADs every stored digest in the repositories recorded with it and drops the
    torrents none of them has any more; a blob still in one repository, a torrent with
    no repository recorded, and everything while the registry is down are kept."""
    image = build_image([300_000, 400_000, 500_000], seed=1806)
    shared, deleted, legacy = (layer.digest for layer in image.layers)
    async with sidecar_env(tmp_path, notifications=False) as env:
        await push_image(env.client, "team/app", "v1", image)
        await env.client.push_blob("team/other", image.layers[0].data)
        store = env.sidecar.store
        for digest in (shared, deleted, legacy):
            r = await env.http.get(f"/torrents/{digest}", params={"repository": "team/app"})
            assert r.status_code == 200
        r = await env.http.get(f"/torrents/{shared}", params={"repository": "team/other"})
        assert r.status_code == 200
        assert store.repositories(shared) == ["team/app", "team/other"]
        assert store.repositories(deleted) == ["team/app"]
        store.path(legacy).with_suffix(".repositories").unlink()  # as an older version left it
        assert store.repositories(legacy) == []

        async with httpx.AsyncClient() as http:
            for digest in (shared, deleted, legacy):
                await delete_blob(http, env.registry, "team/app", digest)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_reconcile, env.sidecar.indexer, 0.05, env.sidecar.metrics)
            with trio.fail_after(30):
                while deleted in store:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        assert not store.path(deleted).with_suffix(".repositories").exists()
        assert shared in store and legacy in store
        assert env.metric("p2pimage_sidecar_torrents_deleted_total") == 1
        r = await env.http.get(f"/torrents/{deleted}")
        assert r.status_code == 404

        async with httpx.AsyncClient() as http:
            await delete_blob(http, env.registry, "team/other", shared)
        env.registry.cleanup()  # the registry is down: nothing can be checked
        assert await env.sidecar.indexer.reconcile() == 0
        assert shared in store
        await env.registry.start()
        assert await env.sidecar.indexer.reconcile() == 1
        assert shared not in store and legacy in store


async def test_the_mirror_hands_origin_reads_the_latest_authorised_credentials(
    tmp_path: Path,
) -> None:
    """Each pull the access check lets through refreshes the credentials the blob's
    origin reads send; a refused pull (401) changes nothing, and neither does a pull
    through another repository (a registry token is scoped to one)."""
    data = os.urandom(2 * 1024 * 1024)
    alice, bob = ("alice", "a-secret"), ("bob", "b-secret")
    async with (
        start_registry(htpasswd=alice, workdir=tmp_path / "registry") as reg,
        httpx.AsyncClient(timeout=10) as http,
        two_nodes((time.time, time.time)) as (node, _),
    ):
        async with RegistryClient(reg.url, username=alice[0], password=alice[1]) as client:
            digest = await client.push_blob("team/app", data)
            await client.push_blob("team/other", data)
        mirror = Mirror(tmp_path, reg, http, node=node)
        (tmp_path / "blob").write_bytes(data)
        meta = create_metainfo_from_file(tmp_path / "blob")
        first = _basic(*alice)["Authorization"]
        await mirror.layers._start_swarm(meta, "team/app", first)
        credentials = mirror.layers.origin_credentials(digest)
        assert credentials is not None and credentials.current()[1] == {"Authorization": first}

        async def pull(repository: str, authorization: str) -> int:
            access = await mirror.layers.check_access(reg.url, repository, digest, authorization)
            if access.status == 200:
                chunks = mirror.layers.read(reg.url, repository, digest, len(data), authorization)
                async with aclosing(chunks) as it:
                    async for _ in it:
                        break  # the read has begun: that is when the mirror offers
            return access.status

        assert await pull("team/app", _basic(*bob)["Authorization"]) == 401
        assert credentials.current()[1] == {"Authorization": first}
        fresh = "basic " + base64.b64encode(b"alice:a-secret").decode()  # scheme is case-free
        assert await pull("team/other", fresh) == 200
        assert credentials.current()[1] == {"Authorization": first}  # another repository
        assert await pull("team/app", fresh) == 200
        assert credentials.current()[1] == {"Authorization": fresh}


async def test_a_node_whose_token_was_not_renewed_dials_nobody(tmp_path: Path) -> None:
    """Its token expired and could not be renewed (the sidecar away): the node dials no
    peer, rather than be admitted within a peer's leeway and closed again at once."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="test", lifetime_s=LIFETIME_S)
    clock = SkewedClock()
    key = NodeKey.generate()
    fixed = issuer.issue(subject="stale", cluster="prod", node_jwk=key.public_jwk(), now=clock())
    stale = PeerAuthenticator(
        node_key=key,
        token=fixed,  # never renewed
        verifier=TokenVerifier(issuer.key_set(), issuer="test"),
        cluster="prod",
        clock=clock,
    )
    blob, meta = make_blob(tmp_path, 256 * 1024)
    async with (
        open_peer_node(authenticator=stale) as node,
        two_nodes((time.time, time.time), issuer) as (seeder, _),
    ):
        await seeder.add_swarm(meta, tmp_path / "s", storage=PieceStorage.open_complete(blob, meta))
        session, _info = await node.dial(seeder.listen_address, meta.info_hash)
        await session.aclose()
        node.release_connection()
        clock.skew = LIFETIME_S + 1  # past exp, within the peer's 30 s leeway
        with pytest.raises(PeerClosed, match="our token has expired"):
            await node.dial(seeder.listen_address, meta.info_hash)
        assert node.connections == 0


async def test_a_layer_deleted_in_the_registry_leaves_every_node_that_pulls_it_again(
    tmp_path: Path,
) -> None:
    """The real daemons: two nodes pull a layer (through the swarm, into their caches);
    the registry deletes it; each node's next pull is answered 404 as the registry
    says, and that node closes the layer's swarm and drops it from its cache."""
    image = build_image([3 * 1024 * 1024], seed=1807)
    layer = image.layers[0]
    async with (
        local_cluster(tmp_path / "cluster", nodes=2) as cluster,
        httpx.AsyncClient(timeout=60) as http,
    ):
        daemons = [node.daemon for node in cluster.nodes]
        for daemon in daemons:
            assert daemon is not None
            daemon.layers.settings.access_cache_s = 0.0  # every pull asks the registry
        async with RegistryClient(cluster.registry.url) as client:
            await push_image(client, "team/app", "v1", image)

        async def pull(node: int) -> httpx.Response:
            return await http.get(
                f"{cluster.nodes[node].mirror_url}/v2/team/app/blobs/{layer.digest}",
                params={"ns": cluster.registry_host},
            )

        keys = []
        for i, daemon in enumerate(daemons):
            assert daemon is not None
            r = await pull(i)
            assert r.status_code == 200 and r.content == layer.data
            key = blob_key(daemon.layers.namespace, layer.digest[7:])
            with trio.fail_after(30):
                while not daemon.layers.cache.is_complete(key):
                    await trio.sleep(0.05)
            keys.append(key)
        assert daemons[0] is not None and daemons[0].layers.node is not None
        assert any(
            s.metainfo.sha256 == layer.digest for s in daemons[0].layers.node.swarms.values()
        )

        await delete_blob(http, cluster.registry, "team/app", layer.digest)
        for i, daemon in enumerate(daemons):
            assert daemon is not None and daemon.layers.node is not None
            r = await pull(i)
            assert r.status_code == 404 and layer.data[:64] not in r.content
            with trio.fail_after(10):
                while daemon.layers.cache.entry(keys[i]) is not None:
                    await trio.sleep(0.05)
            assert not any(p.exists() for p in daemon.layers.cache.files(keys[i]).all())
            assert not any(
                s.metainfo.sha256 == layer.digest for s in daemon.layers.node.swarms.values()
            )
