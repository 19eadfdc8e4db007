"""The registry sidecar against the real registry (CNCF distribution) and real images.

Each test starts a registry on a free loopback port with its ``notifications`` pointed at
an in-process sidecar (served by hypercorn under trio), pushes images with the project's
OCI client or with skopeo, and checks what the sidecar stores and serves.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import libtorrent as lt
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from daemons.sidecar import (
    Sidecar,
    SidecarSettings,
    build_sidecar,
    create_app,
    pull_rights_http,
    registry_client,
)
from daemons.testbed.registry import RegistryProcess, free_port, start_registry
from p2pimage.auth.join import JoinCredentials, generate_credential, hash_credential
from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    create_proof,
)
from p2pimage.errors import AuthError
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.image import build_image, build_index, push_image, push_index
from p2pimage.oci.notifications import (
    EVENTS_MEDIA_TYPE,
    MAX_ENVELOPE_SIZE,
    NotificationError,
    parse_envelope,
)
from p2pimage.oci.registry import (
    MAX_MANIFEST_SIZE,
    OCI_MANIFEST,
    RegistryClient,
    RegistryError,
    sha256_digest,
)
from p2pimage.sidecar.client import DPoPAuth, SidecarClient, SidecarError
from p2pimage.sidecar.indexer import Indexer, TorrentStore

pytestmark = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (CNCF distribution, Debian package docker-registry) is not installed",
)

CREDENTIAL = "join-secret-for-prod"


@dataclass
class Env:
    registry: RegistryProcess
    sidecar: Sidecar
    url: str
    client: RegistryClient
    http: httpx.AsyncClient
    tmp: Path

    def metric(self, name: str, **labels: str) -> float:
        return self.sidecar.metrics.value(name, **labels)

    async def wait_indexed(self, digests: list[str], timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while not all(d in self.sidecar.store for d in digests):
                await trio.sleep(0.05)

    async def settle(self) -> None:
        """Wait until the indexer has nothing queued or in flight."""
        with trio.fail_after(30):
            await trio.sleep(0.1)
            while self.sidecar.indexer.busy:
                await trio.sleep(0.05)


def node_auth(issuer: TokenIssuer, node: str = "test-node", cluster: str = "prod") -> DPoPAuth:
    """A cluster member's credentials: a node token and its key (a proof per request)."""
    key = NodeKey.generate()
    raw = issuer.issue(subject=node, cluster=cluster, node_jwk=key.public_jwk(), now=time.time())
    return DPoPAuth(token=raw, node_key=key)


class UnlessGiven(httpx.Auth):
    """``inner`` for requests that carry no ``Authorization`` of their own (the webhook
    tests send the registry's)."""

    def __init__(self, inner: httpx.Auth) -> None:
        self.inner = inner

    def auth_flow(self, request: httpx.Request) -> Any:
        if "authorization" in request.headers:
            yield request
        else:
            yield from self.inner.auth_flow(request)


def write_key(path: Path, alg: str = "EdDSA") -> SigningKey:
    key = SigningKey.generate(alg)
    path.write_bytes(key.to_pem())
    return key


def settings_for(tmp: Path, registry_url: str, **overrides: Any) -> SidecarSettings:
    keys = overrides.pop("signing_keys", None)
    if keys is None:
        keys = [tmp / "signing.pem"]
        if not keys[0].exists():
            write_key(keys[0])
    values: dict[str, Any] = {
        "registry_url": registry_url,
        "store_dir": tmp / "torrents",
        "signing_keys": keys,
        "issuer": "https://sidecar.test",
        "clusters": {"prod": [hash_credential(CREDENTIAL)]},
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
        "allow_plain_http_join": True,
        **overrides,
    }
    return SidecarSettings(**values)


async def serve_asgi(app: Any, nursery: trio.Nursery) -> str:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, task_status=task_status)

    urls = await nursery.start(run)
    return str(urls[0] if isinstance(urls, list) else urls)


@asynccontextmanager
async def sidecar_env(
    tmp: Path,
    *,
    notifications: bool = True,
    registry_port: int | None = None,
    registry_workdir: Path | None = None,
    start_registry_now: bool = True,
    htpasswd: tuple[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[Env]:
    port = registry_port or free_port()
    registry_url = f"http://127.0.0.1:{port}"
    if htpasswd is not None:
        overrides.update(registry_username=htpasswd[0], registry_password=htpasswd[1])
    settings = settings_for(tmp, registry_url, **overrides)
    user, password = htpasswd or (None, None)
    async with (
        registry_client(settings) as sidecar_client,
        pull_rights_http(settings) as pull_http,
        RegistryClient(registry_url, username=user, password=password) as pusher,
    ):
        sidecar = build_sidecar(settings, sidecar_client, pull_http)
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.indexer.run)
            url = await serve_asgi(create_app(sidecar), nursery)
            token = overrides.get("webhook_token")
            reg = RegistryProcess(
                notifications_url=f"{url}/events" if notifications else None,
                notification_headers={"Authorization": [f"Bearer {token}"]} if token else None,
                notification_backoff="200ms",
                port=port,
                workdir=registry_workdir,
                htpasswd=htpasswd,
            )
            try:
                if start_registry_now:
                    await reg.start()
                # The tests read torrents as a cluster member would.
                auth = UnlessGiven(node_auth(sidecar.issuer))
                async with httpx.AsyncClient(base_url=url, timeout=30, auth=auth) as http:
                    yield Env(reg, sidecar, url, pusher, http, tmp)
            finally:
                reg.cleanup()
                nursery.cancel_scope.cancel()


def check_torrent(data: bytes, digest: str, blob: bytes | None = None) -> Metainfo:
    meta = Metainfo.from_bytes(data)
    assert meta.sha256 == digest and meta.name == digest[7:]
    if blob is not None:
        assert meta.length == len(blob)
    info = lt.torrent_info(lt.bdecode(data))
    assert str(info.info_hashes().v1) == meta.info_hash.hex()
    return meta


# Push → torrents -----------------------------------------------------------------------


async def test_push_indexes_every_layer_and_config(tmp_path: Path) -> None:
    images = [
        build_image([10_000, 300_000, 2_000_000, 6_000_000], seed=1),
        build_image([50_000, 700_000], seed=2, docker=True),
    ]
    async with sidecar_env(tmp_path, webhook_token="hook-secret") as env:
        for i, img in enumerate(images):
            await push_image(env.client, "team/app", f"v{i}", img)
        blobs = {b.digest: b.data for img in images for b in img.blobs()}
        await env.wait_indexed(list(blobs))
        await env.settle()
        for digest, data in blobs.items():
            r = await env.http.get(f"/torrents/{digest}")
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/x-bittorrent"
            check_torrent(r.content, digest, data)
        assert env.metric("p2pimage_sidecar_torrents_generated_total") == len(blobs)
        assert env.metric("p2pimage_sidecar_webhook_events_total", result="queued") >= 2
        assert env.metric("p2pimage_sidecar_digest_mismatches_total") == 0


async def test_push_two_platform_index_indexes_both_platforms(tmp_path: Path) -> None:
    images = [build_image([40_000, 90_000], architecture=a, seed=5) for a in ("amd64", "arm64")]
    index = build_index(images)
    async with sidecar_env(tmp_path) as env:
        await push_index(env.client, "multi/app", "latest", index)
        digests = [b.digest for img in images for b in img.blobs()]
        await env.wait_indexed(digests)
        assert len(set(digests)) == 6
        await env.settle()
        # Each platform manifest arrives twice (its own push and the index): one torrent.
        assert env.metric("p2pimage_sidecar_torrents_generated_total") == 6


async def test_sidecar_reads_a_registry_that_requires_credentials(tmp_path: Path) -> None:
    img = build_image([30_000, 60_000], seed=14)
    async with sidecar_env(tmp_path, htpasswd=("sidecar", "pw")) as env:
        await push_image(env.client, "private/app", "v1", img)
        await env.wait_indexed([b.digest for b in img.blobs()])


@pytest.mark.skipif(
    shutil.which("umoci") is None or shutil.which("skopeo") is None,
    reason="umoci and skopeo (Debian packages) are needed",
)
async def test_skopeo_push_of_umoci_image_is_indexed(tmp_path: Path) -> None:
    from tests.test_oci import build_umoci_layout, skopeo_push

    layout = build_umoci_layout(tmp_path)
    async with sidecar_env(tmp_path) as env:
        await skopeo_push(layout, f"127.0.0.1:{env.registry.port}/umoci/app:v1")
        manifest = await env.client.get_manifest("umoci/app", "v1")
        digests = [b.digest for b in manifest.blobs()]
        await env.wait_indexed(digests)
        for d in digests:
            check_torrent(env.sidecar.store.load(d) or b"", d)


async def test_libtorrent_verifies_the_blob_against_the_torrent(tmp_path: Path) -> None:
    img = build_image([3_000_000], seed=9)
    layer = img.layers[0]
    async with sidecar_env(tmp_path, notifications=False) as env:
        await push_image(env.client, "lt/app", "v1", img)
        r = await env.http.get(f"/torrents/{layer.digest}", params={"repository": "lt/app"})
        assert r.status_code == 200
    save = tmp_path / "lt"
    save.mkdir()
    (save / layer.digest[7:]).write_bytes(layer.data)
    session = lt.session(
        {"enable_dht": False, "enable_lsd": False, "listen_interfaces": "127.0.0.1:0"}
    )
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(lt.bdecode(r.content))
    params.save_path = str(save)
    handle = session.add_torrent(params)
    deadline = time.monotonic() + 20
    while not handle.status().is_seeding:
        assert time.monotonic() < deadline, "libtorrent did not accept the blob as complete"
        await trio.sleep(0.05)


async def test_backfill_indexes_images_pushed_before_the_sidecar(tmp_path: Path) -> None:
    images = [build_image([20_000, 30_000], seed=s) for s in (1, 2)]
    async with sidecar_env(tmp_path, notifications=False) as env:
        await push_image(env.client, "old/one", "v1", images[0])
        await push_image(env.client, "old/two", "v1", images[1])
        assert await env.sidecar.indexer.backfill() == 2
        await env.wait_indexed([b.digest for img in images for b in img.blobs()])


# Integrity -----------------------------------------------------------------------------


def tamper(reg: RegistryProcess, digest: str) -> None:
    path = reg.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))


async def test_tampered_blob_gives_no_torrent_and_raises_the_alarm(tmp_path: Path) -> None:
    img = build_image([100_000, 200_000], seed=4)
    bad = img.layers[1].digest
    async with sidecar_env(tmp_path) as env:
        for blob in img.blobs():  # blobs first: no manifest event yet
            await env.client.push_blob("t/app", blob.data)
        tamper(env.registry, bad)
        await env.client.push_manifest("t/app", "v1", img.manifest, img.media_type)
        await env.wait_indexed([img.config.digest, img.layers[0].digest])
        await env.settle()
        assert bad not in env.sidecar.store
        assert not env.sidecar.store.path(bad).exists()
        assert env.metric("p2pimage_sidecar_digest_mismatches_total") == 1
        r = await env.http.get(f"/torrents/{bad}", params={"repository": "t/app"})
        assert r.status_code == 502 and r.json()["error"] == "digest_mismatch"
        assert env.metric("p2pimage_sidecar_digest_mismatches_total") == 2
        assert not list(env.sidecar.store.directory.iterdir()) or bad[7:] not in {
            p.stem for p in env.sidecar.store.directory.iterdir()
        }


# On demand, single flight, restarts ---------------------------------------------------


async def test_on_demand_generation_without_notifications_is_single_flight(tmp_path: Path) -> None:
    img = build_image([48_000_000], seed=6)
    layer = img.layers[0].digest
    async with sidecar_env(tmp_path, notifications=False) as env:
        await push_image(env.client, "od/app", "v1", img)
        r = await env.http.get(f"/torrents/{layer}")
        assert r.status_code == 404 and "repository" in r.json()["message"]
        results: list[httpx.Response] = []

        async def fetch() -> None:
            results.append(await env.http.get(f"/torrents/{layer}?repository=od/app"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            with trio.fail_after(10):
                while layer not in env.sidecar.indexer._flights:
                    await trio.sleep(0.001)
            for _ in range(2):
                nursery.start_soon(fetch)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert len({r.content for r in results}) == 1
        check_torrent(results[0].content, layer)
        assert env.sidecar.indexer.generations_started == 1
        assert env.sidecar.indexer.flights_joined == 2
        assert env.metric("p2pimage_sidecar_torrents_generated_total") == 1
        again = await env.http.get(f"/torrents/{layer}")  # stored: no repository needed
        assert again.content == results[0].content
        assert env.sidecar.indexer.generations_started == 1

        unknown = "sha256:" + "1" * 64
        r = await env.http.get(f"/torrents/{unknown}?repository=od/app")
        assert r.status_code == 404 and r.json()["error"] == "blob_unknown"
        assert (await env.http.get("/torrents/sha256:XYZ")).status_code == 400
        r = await env.http.get(f"/torrents/{unknown}?repository=Bad..Name")
        assert r.status_code == 400


async def test_sidecar_stopped_mid_generation_leaves_nothing_half_written(
    tmp_path: Path,
) -> None:
    img = build_image([200_000_000], seed=12)
    layer = img.layers[0].digest
    port, workdir = free_port(), tmp_path / "registry"
    workdir.mkdir()
    opts: dict[str, Any] = {
        "notifications": False,
        "registry_port": port,
        "registry_workdir": workdir,
    }
    async with sidecar_env(tmp_path, **opts) as env:
        await push_image(env.client, "big/app", "v1", img)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(env.http.get, f"/torrents/{layer}?repository=big/app")
            with trio.fail_after(10):
                while layer not in env.sidecar.indexer._flights:
                    await trio.sleep(0.001)
            await trio.sleep(0.02)
            assert layer in env.sidecar.indexer._flights  # still hashing
            nursery.cancel_scope.cancel()
        # Leaving the block stops the sidecar mid-generation.
    store_dir = tmp_path / "torrents"
    assert [p.name for p in store_dir.iterdir()] == []
    async with sidecar_env(tmp_path, **opts) as env:
        assert layer not in env.sidecar.store
        r = await env.http.get(f"/torrents/{layer}?repository=big/app")
        assert r.status_code == 200
        meta = check_torrent(r.content, layer)
        assert meta.length == len(img.layers[0].data)


async def test_sidecar_process_killed_mid_generation_serves_only_complete_torrents(
    tmp_path: Path,
) -> None:
    """The real daemon (``p2pimage sidecar``) is SIGKILLed while it hashes a layer; the
    restarted daemon never serves a partial torrent and regenerates a complete one."""
    import os
    import signal
    import subprocess
    import sys

    img = build_image([200_000_000], seed=13)
    layer = img.layers[0].digest
    key = tmp_path / "signing.pem"
    write_key(key)
    store = tmp_path / "torrents"
    async with start_registry() as reg:
        async with RegistryClient(reg.url) as c:
            await push_image(c, "kill/app", "v1", img)
        config = tmp_path / "sidecar.toml"

        def start() -> tuple[Any, str]:
            port = free_port()
            config.write_text(
                f'listen = "127.0.0.1:{port}"\nregistry_url = "{reg.url}"\n'
                f'store_dir = "{store}"\nsigning_keys = ["{key}"]\n'
                f'[clusters]\nprod = ["{hash_credential(CREDENTIAL)}"]\n'
            )
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from daemons.cli import main; main()",
                    "sidecar",
                    "--config",
                    str(config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "sidecar.log", "ab"),  # noqa: SIM115
                cwd=Path(__file__).resolve().parent.parent,
            )
            return p, f"http://127.0.0.1:{port}"

        async def wait_up(http: httpx.AsyncClient, url: str) -> None:
            with trio.fail_after(20):
                while True:
                    try:
                        if (await http.get(f"{url}/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

        issuer = TokenIssuer([SigningKey.from_pem(key.read_bytes())], issuer="p2pimage-sidecar")
        async with httpx.AsyncClient(timeout=30, auth=node_auth(issuer)) as http:
            proc, url = start()
            try:
                await wait_up(http, url)

                async def doomed_get() -> None:
                    with contextlib.suppress(httpx.TransportError):
                        await http.get(f"{url}/torrents/{layer}?repository=kill/app")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(doomed_get)
                    with trio.fail_after(20):
                        while (
                            "generations_in_flight 1.0"
                            not in (await http.get(f"{url}/metrics")).text
                        ):
                            await trio.sleep(0.005)
                    os.kill(proc.pid, signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
            # Never a file under the served name; at most a temp file from the write.
            assert not (store / f"{layer[7:]}.torrent").exists()
            proc, url = start()
            try:
                await wait_up(http, url)
                assert (await http.get(f"{url}/torrents/{layer}")).status_code == 404
                r = await http.get(f"{url}/torrents/{layer}?repository=kill/app")
                assert r.status_code == 200
                assert check_torrent(r.content, layer).length == len(img.layers[0].data)
                # The torrent and the repositories recorded with it; no temp file left.
                assert sorted(p.name for p in store.iterdir()) == [
                    f"{layer[7:]}.repositories",
                    f"{layer[7:]}.torrent",
                ]
            finally:
                proc.terminate()
                proc.wait()


async def test_store_never_serves_partial_or_foreign_torrents(tmp_path: Path) -> None:
    img = build_image([500_000], seed=7)
    digest = img.layers[0].digest
    store_dir = tmp_path / "torrents"
    store_dir.mkdir()
    # What a crash mid-write leaves: a temp file (never under the served name)...
    (store_dir / ".tmp-crashed").write_bytes(b"d8:announce")
    # ...and what a careless copy leaves: a truncated file under the served name.
    async with sidecar_env(tmp_path, notifications=False) as env:
        assert not (store_dir / ".tmp-crashed").exists()
        await push_image(env.client, "s/app", "v1", img)
        good = (await env.http.get(f"/torrents/{digest}?repository=s/app")).content
    env.sidecar.store.path(digest).write_bytes(good[: len(good) // 2])
    store = TorrentStore(store_dir)
    assert store.load(digest) is None
    assert store.path(digest).with_suffix(".corrupt").exists()
    # A valid torrent of another blob under this digest's name is refused too.
    other = build_image([1000], seed=8).layers[0]
    store.path(digest).write_bytes(good)
    store.path(other.digest).write_bytes(good)
    assert store.load(other.digest) is None and store.load(digest) == good


# Registry trouble ----------------------------------------------------------------------


async def test_event_while_registry_down_is_retried_until_it_returns(tmp_path: Path) -> None:
    img = build_image([100_000, 400_000], seed=10)
    port = free_port()
    workdir = tmp_path / "registry"
    workdir.mkdir()
    async with start_registry(port=port, workdir=workdir) as reg, RegistryClient(reg.url) as c:
        await push_image(c, "down/app", "v1", img)
    # The registry is gone; the event it had sent arrives now.
    envelope = {
        "events": [
            {
                "id": "evt-1",
                "action": "push",
                "target": {
                    "mediaType": OCI_MANIFEST,
                    "digest": img.digest,
                    "repository": "down/app",
                    "tag": "v1",
                },
            }
        ]
    }
    async with sidecar_env(
        tmp_path,
        notifications=False,
        registry_port=port,
        registry_workdir=workdir,
        start_registry_now=False,
    ) as env:
        r = await env.http.post(
            "/events", content=json.dumps(envelope), headers={"content-type": EVENTS_MEDIA_TYPE}
        )
        assert r.status_code == 202 and r.json()["queued"] == 1
        with trio.fail_after(10):
            while env.metric("p2pimage_sidecar_index_retries_total", kind="manifest") < 2:
                await trio.sleep(0.05)
        assert env.sidecar.indexer.busy
        await env.registry.start()
        await env.wait_indexed([b.digest for b in img.blobs()])
        assert (
            env.metric(
                "p2pimage_sidecar_index_failures_total", kind="manifest", reason="RegistryError"
            )
            == 0
        )


async def test_large_manifest_near_the_cap_is_indexed_once_per_blob(tmp_path: Path) -> None:
    """A 3.5 MiB manifest (18,000 layer entries naming two blobs) is indexed, and the real
    registry itself refuses anything over 4 MiB, the same cap as ours."""
    img = build_image([2000, 3000], seed=15)
    descriptors = [layer.descriptor() for layer in img.layers]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": img.config.descriptor(),
        "layers": [{**descriptors[i % 2], "annotations": {"n": str(i)}} for i in range(18_000)],
    }
    raw = json.dumps(doc).encode()
    assert 3 * 1024 * 1024 < len(raw) < MAX_MANIFEST_SIZE
    async with sidecar_env(tmp_path) as env:
        for blob in img.blobs():
            await env.client.push_blob("large/app", blob.data)
        await env.client.push_manifest("large/app", "v1", raw, OCI_MANIFEST)
        await env.wait_indexed([b.digest for b in img.blobs()])
        await env.settle()
        assert env.metric("p2pimage_sidecar_torrents_generated_total") == 3
        doc["layers"] = doc["layers"] * 2  # over 4 MiB
        with pytest.raises(RegistryError) as err:
            await env.client.push_manifest(
                "large/app", "v2", json.dumps(doc).encode(), OCI_MANIFEST
            )
        assert err.value.status == 400


async def test_oversized_manifest_is_refused_without_harm(tmp_path: Path) -> None:
    """The real registry refuses manifests over 4 MiB, so a registry that serves one is
    played by a mock; the indexer drops it with an error and keeps working."""
    small = build_image([1000], seed=11)
    huge = b'{"schemaVersion":2,' + b" " * MAX_MANIFEST_SIZE + b"}"
    huge_digest = sha256_digest(huge)

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith(f"/manifests/{huge_digest}"):
            return httpx.Response(200, headers={"content-type": OCI_MANIFEST}, content=huge)
        if path.endswith(f"/manifests/{small.digest}"):
            return httpx.Response(
                200, headers={"content-type": OCI_MANIFEST}, content=small.manifest
            )
        for blob in small.blobs():
            if path.endswith(f"/blobs/{blob.digest}"):
                return httpx.Response(200, content=blob.data)
        return httpx.Response(404)

    failures: list[tuple[str, str]] = []
    async with RegistryClient("http://mock.test", transport=httpx.MockTransport(handler)) as c:
        from p2pimage.sidecar.indexer import IndexerHooks

        hooks = IndexerHooks(failed=lambda kind, reason: failures.append((kind, reason)))
        indexer = Indexer(c, TorrentStore(tmp_path / "t"), hooks=hooks)
        async with trio.open_nursery() as nursery:
            await nursery.start(indexer.run)
            await indexer.submit_manifest("m/app", huge_digest)
            await indexer.submit_manifest("m/app", small.digest)
            with trio.fail_after(10):
                while not all(b.digest in indexer.store for b in small.blobs()) or not failures:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert failures == [("manifest", "ManifestError")]


# Webhook input -------------------------------------------------------------------------


def envelope(*targets: dict[str, Any], action: str = "push") -> bytes:
    return json.dumps(
        {"events": [{"id": str(i), "action": action, "target": t} for i, t in enumerate(targets)]}
    ).encode()


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        (b"not json", EVENTS_MEDIA_TYPE, 400),
        (b"{}", EVENTS_MEDIA_TYPE, 400),
        (b'{"events": {}}', EVENTS_MEDIA_TYPE, 400),
        (b'{"events": []}', "text/plain", 400),
        (b"[" * 100_000, EVENTS_MEDIA_TYPE, 400),
        (b" " * (MAX_ENVELOPE_SIZE + 1), EVENTS_MEDIA_TYPE, 413),
        (b'{"events": []}', EVENTS_MEDIA_TYPE, 202),
    ],
)
async def test_malformed_webhook_bodies(
    tmp_path: Path, body: bytes, content_type: str, status: int
) -> None:
    async with sidecar_env(tmp_path, start_registry_now=False) as env:
        r = await env.http.post("/events", content=body, headers={"content-type": content_type})
        assert r.status_code == status
        if status != 202:
            assert r.json()["error"] in ("malformed", "too_large")


async def test_webhook_sorts_events_it_does_not_index(tmp_path: Path) -> None:
    good = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "repository": "a/b"}
    body = (
        envelope(
            {**good, "mediaType": "application/vnd.example.unknown+json"},  # unknown type
            {**good, "mediaType": "application/octet-stream"},  # a blob push
            {**good, "digest": "sha256:short"},  # invalid
            {"mediaType": OCI_MANIFEST},  # no repository
        )
        + b""
    )
    async with sidecar_env(tmp_path, start_registry_now=False) as env:
        r = await env.http.post(
            "/events", content=body, headers={"content-type": EVENTS_MEDIA_TYPE}
        )
        assert r.status_code == 202
        assert r.json() == {"queued": 0, "deleted": 0, "ignored": 2, "invalid": 2}
        pulls = envelope(good, action="pull")
        r = await env.http.post(
            "/events", content=pulls, headers={"content-type": EVENTS_MEDIA_TYPE}
        )
        assert r.json() == {"queued": 0, "deleted": 0, "ignored": 1, "invalid": 0}


async def test_registry_delete_events_drop_the_torrents(tmp_path: Path) -> None:
    """A blob deleted from the real registry (delete enabled in its config) loses its
    torrent through the registry's own delete event; the other layers keep theirs, and
    asking for the deleted one again gives no torrent (the registry has no such blob)."""
    image = build_image([300_000, 2_000_000], seed=19)
    async with sidecar_env(tmp_path) as env:
        await push_image(env.client, "team/app", "v1", image)
        await env.wait_indexed([b.digest for b in image.blobs()])
        await env.settle()
        kept, gone = image.layers[0].digest, image.layers[1].digest
        async with httpx.AsyncClient() as http:
            r = await http.delete(f"{env.registry.url}/v2/team/app/blobs/{gone}")
            assert r.status_code == 202
        with trio.fail_after(30):
            while env.sidecar.store.path(gone).exists():
                await trio.sleep(0.05)
        assert gone not in env.sidecar.store and kept in env.sidecar.store
        assert env.metric("p2pimage_sidecar_torrents_deleted_total") == 1
        assert env.metric("p2pimage_sidecar_webhook_events_total", result="deleted") == 1
        r = await env.http.get(f"/torrents/{gone}", params={"repository": "team/app"})
        assert r.status_code == 404
        assert gone not in env.sidecar.store
        r = await env.http.get(f"/torrents/{kept}")
        assert r.status_code == 200
        check_torrent(r.content, kept, image.layers[0].data)


def test_delete_events_name_the_digest_they_removed() -> None:
    digest = "sha256:" + "4" * 64
    events = parse_envelope(
        envelope(
            {"digest": digest, "repository": "a/b"},  # a blob or manifest delete
            {"repository": "a/b", "tag": "v1"},  # a tag delete
            {"digest": "sha256:short", "repository": "a/b"},
            {"digest": digest, "repository": "Not/Valid"},
            {"repository": "a/b"},
            action="delete",
        )
    )
    assert [e.deleted_digest for e in events] == [digest, None, None, None, None]
    assert [e.valid for e in events] == [True, True, False, False, False]
    pushed = {"mediaType": OCI_MANIFEST, "digest": digest, "repository": "a/b"}
    push = parse_envelope(envelope(pushed))
    assert push[0].deleted_digest is None and push[0].is_manifest_push


async def test_webhook_token_and_full_queue(tmp_path: Path) -> None:
    good = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "3" * 64, "repository": "a/b"}
    async with sidecar_env(
        tmp_path,
        start_registry_now=False,
        webhook_token="hook-secret",
        queue_size=1,
        manifest_workers=1,
        retry_initial_s=30,
    ) as env:
        hdrs = {"content-type": EVENTS_MEDIA_TYPE}
        assert (
            await env.http.post("/events", content=envelope(good), headers=hdrs)
        ).status_code == 401
        hdrs["authorization"] = "Bearer hook-secret"
        statuses = []
        for i in range(4):
            event = {**good, "digest": f"sha256:{i:064x}"}
            r = await env.http.post("/events", content=envelope(event), headers=hdrs)
            statuses.append(r.status_code)
        assert statuses[0] == 202 and 503 in statuses
        # A re-sent event that is already pending is acknowledged, not queued twice.
        event = {**good, "digest": f"sha256:{0:064x}"}
        r = await env.http.post("/events", content=envelope(event), headers=hdrs)
        assert r.status_code == 202 and r.json()["queued"] == 1
        assert env.metric("p2pimage_sidecar_webhook_events_total", result="rejected_full") >= 1


def test_parse_envelope_garbage_raises_only_notification_error() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def check(body: bytes) -> None:
        with contextlib.suppress(NotificationError):
            parse_envelope(body)

    check()


def test_parse_envelope_structured_garbage_never_raises_other_errors() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    value = st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["action", "target", "mediaType", "digest", "repository", "tag"]),
                inner,
                max_size=5,
            )
        ),
        max_leaves=15,
    )

    @given(st.lists(value, max_size=5))
    def check(events: list[Any]) -> None:
        body = json.dumps({"events": events}).encode()
        for ev in parse_envelope(body, EVENTS_MEDIA_TYPE):
            assert ev.valid or ev.problem
            if ev.is_manifest_push:
                assert ev.repository and ev.digest.startswith("sha256:")

    check()


# Tokens --------------------------------------------------------------------------------


async def get_verifier(env: Env) -> TokenVerifier:
    jwks = (await env.http.get("/.well-known/jwks.json")).json()
    return TokenVerifier(KeySet.from_jwks(jwks), issuer="https://sidecar.test")


async def request_token(env: Env, node_key: NodeKey, **fields: Any) -> httpx.Response:
    body = {"node": "node-1.example", "jwk": node_key.public_jwk(), "credential": CREDENTIAL}
    body.update(fields)
    return await env.http.post("/token", json=body)


async def test_token_issuance_and_refusals(tmp_path: Path) -> None:
    node_key = NodeKey.generate()
    async with sidecar_env(tmp_path, start_registry_now=False) as env:
        r = await request_token(env, node_key, zone="eu-west-1a")
        assert r.status_code == 200
        body = r.json()
        token = TokenVerifier.verify(
            await get_verifier(env), body["token"], now=time.time(), cluster="prod"
        )
        assert token.subject == "node-1.example" and token.zone == "eu-west-1a"
        assert token.cnf_jwk["x"] == node_key.public_jwk()["x"]
        assert body["expires_at"] == token.expires_at

        wrong = await request_token(env, node_key, credential="guess")
        empty = await request_token(env, node_key, credential="")
        assert wrong.status_code == empty.status_code == 401
        assert (
            wrong.json()
            == empty.json()
            == {"error": "unauthorized", "message": "invalid join credential"}
        )
        private = {**node_key.public_jwk(), "d": "AAAA"}
        for fields in (
            {"node": "Not_A_Name"},
            {"jwk": private},
            {"jwk": {"kty": "RSA"}},
            {"zone": "x" * 100},
            {"credential": 5},
        ):
            assert (await request_token(env, node_key, **fields)).status_code == 400, fields
        assert (await env.http.post("/token", content=b"{nope")).status_code == 400
        assert env.metric("p2pimage_sidecar_tokens_total", result="issued") == 1
        assert env.metric("p2pimage_sidecar_tokens_total", result="bad_credential") == 2
        metrics = (await env.http.get("/metrics")).text
        assert "p2pimage_sidecar_generation_seconds_bucket" in metrics
        assert (await env.http.get("/healthz")).json()["status"] == "ok"


async def test_key_rotation_keeps_old_tokens_valid(tmp_path: Path) -> None:
    old_path, new_path = tmp_path / "old.pem", tmp_path / "new.pem"
    old, new = write_key(old_path), write_key(new_path, "ES256")
    node_key = NodeKey.generate()
    async with sidecar_env(tmp_path, start_registry_now=False, signing_keys=[old_path]) as env:
        old_token = (await request_token(env, node_key)).json()["token"]
    # Rotation: the new key signs, the old one stays published until its tokens expire.
    async with sidecar_env(
        tmp_path, start_registry_now=False, signing_keys=[new_path, old_path]
    ) as env:
        assert {
            k["kid"] for k in (await env.http.get("/.well-known/jwks.json")).json()["keys"]
        } == {old.kid, new.kid}
        body = (await request_token(env, node_key)).json()
        assert body["kid"] == new.kid
        verifier = await get_verifier(env)
        assert (
            verifier.verify(old_token, now=time.time(), cluster="prod").subject == "node-1.example"
        )
        assert verifier.verify(body["token"], now=time.time(), cluster="prod")
        assert (
            json.loads(__import__("base64").urlsafe_b64decode(body["token"].split(".")[0] + "=="))[
                "kid"
            ]
            == new.kid
        )
    # Once the old key is withdrawn, its tokens stop verifying.
    async with sidecar_env(tmp_path, start_registry_now=False, signing_keys=[new_path]) as env:
        with pytest.raises(AuthError) as err:
            (await get_verifier(env)).verify(old_token, now=time.time(), cluster="prod")
        assert err.value.reason == "unknown_kid"


def test_join_credentials_hashes() -> None:
    secret = generate_credential()
    creds = JoinCredentials(
        [
            ("prod", hash_credential(secret)),
            ("dev", hash_credential("correct horse", scheme="scrypt", log2_n=10)),
        ]
    )
    assert creds.cluster_for(secret) == "prod"
    assert creds.cluster_for("correct horse") == "dev"
    assert creds.cluster_for("correct horse!") is None
    assert creds.cluster_for("x" * 5000) is None
    with pytest.raises(Exception, match="not sha256"):
        JoinCredentials([("prod", "plaintext")])


# Command line --------------------------------------------------------------------------


def test_keys_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from daemons.cli import main

    runner = CliRunner()
    for alg in ("EdDSA", "ES256"):
        out = tmp_path / f"{alg}.pem"
        r = runner.invoke(main, ["keys", "generate", "--alg", alg, "-o", str(out)])
        assert r.exit_code == 0, r.output
        key = SigningKey.from_pem(out.read_bytes())
        assert r.output.strip() == key.kid and key.alg == alg
        assert out.stat().st_mode & 0o777 == 0o600
    r = runner.invoke(main, ["keys", "generate", "-o", str(tmp_path / "EdDSA.pem")])
    assert r.exit_code == 1
    r = runner.invoke(
        main, ["keys", "jwks", str(tmp_path / "EdDSA.pem"), str(tmp_path / "ES256.pem")]
    )
    assert [k["alg"] for k in json.loads(r.output)["keys"]] == ["EdDSA", "ES256"]
    assert all("d" not in k for k in json.loads(r.output)["keys"])
    r = runner.invoke(main, ["keys", "join-credential", "--cluster", "prod"])
    lines = r.output.splitlines()
    secret, stored = lines[1], lines[-1].split('"')[3]
    assert JoinCredentials([("prod", stored)]).cluster_for(secret) == "prod"


def test_sidecar_command_config_errors_exit_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from daemons.cli import main

    key = tmp_path / "k.pem"
    write_key(key)
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'signing_keys = ["{key}"]\nwebhook_token = "secret-value"\n'
        f'[clusters]\nprod = ["{hash_credential(CREDENTIAL)}"]\n'
    )
    runner = CliRunner()
    args = ["sidecar", "--config", str(config), "--print-config"]
    r = runner.invoke(main, args, env={"P2PIMAGE_SIDECAR_BLOB_WORKERS": "7"})
    assert r.exit_code == 0, r.output
    assert "blob_workers = 7" in r.output and "secret-value" not in r.output
    for env, message in [
        ({"P2PIMAGE_SIDECAR_BLOB_WORKRS": "7"}, "unknown setting"),
        ({"P2PIMAGE_SIDECAR_SIGNING_KEYS": '["/nonexistent.pem"]'}, "signing_keys"),
        ({"P2PIMAGE_SIDECAR_CLUSTERS": '{"prod": ["plain"]}'}, "clusters"),
        ({"P2PIMAGE_SIDECAR_CLUSTERS": "{}"}, "no cluster can join"),
    ]:
        r = runner.invoke(main, args, env=env)
        assert r.exit_code == 2 and message in r.output, (env, r.output)


# Who may read a torrent ---------------------------------------------------------------


async def test_torrents_only_for_node_proofs_or_pull_rights(tmp_path: Path) -> None:
    """A private registry: anonymous callers, bare tokens, replayed proofs and wrong
    credentials learn nothing (not even whether a digest exists); a node with its proof
    and a client with pull rights get the torrent."""
    img = build_image([300_000], seed=21)
    layer = img.layers[0].digest
    unknown_layer = build_image([200_000], seed=22).layers[0]
    async with sidecar_env(tmp_path, htpasswd=("puller", "pw"), notifications=False) as env:
        await push_image(env.client, "private/app", "v1", img)
        await env.client.push_blob("private/app", unknown_layer.data)
        stored = await env.http.get(f"/torrents/{layer}?repository=private/app")
        assert stored.status_code == 200  # a node (env.http signs as one): generated
        generated = env.metric("p2pimage_sidecar_torrents_generated_total")
        good_basic = httpx.BasicAuth("puller", "pw")
        node = node_auth(env.sidecar.issuer)
        raw = node._token if isinstance(node._token, str) else ""
        async with httpx.AsyncClient(base_url=env.url, timeout=30) as anon:
            refusals: list[tuple[dict[str, Any], int, str]] = [
                ({}, 401, "unauthorized"),
                ({"auth": httpx.BasicAuth("puller", "wrong")}, 403, "forbidden"),
                ({"auth": httpx.BasicAuth("nobody", "pw")}, 403, "forbidden"),
                ({"headers": {"Authorization": f"Bearer {raw}"}}, 403, "forbidden"),
                ({"headers": {"Authorization": f"DPoP {raw}"}}, 401, "missing_proof"),
                ({"auth": node_auth(TokenIssuer([SigningKey.generate()], issuer="x"))}, 401,
                 "unknown_kid"),
            ]  # fmt: skip
            for digest in (layer, unknown_layer.digest):
                for kwargs, status, code in refusals:
                    url = f"/torrents/{digest}?repository=private/app"
                    r = await anon.get(url, **kwargs)
                    assert r.status_code == status, (kwargs, r.text)
                    assert r.json()["error"] == code
                    assert b"pieces" not in r.content and r.headers["content-type"].startswith(
                        "application/json"
                    )
                    if status == 401:
                        assert "DPoP" in r.headers["www-authenticate"]
                    # Without ?repository= as well.
                    assert (await anon.get(f"/torrents/{digest}", **kwargs)).status_code in (
                        400, 401, 403,
                    )  # fmt: skip
            # Nothing was generated for a refused caller.
            assert env.metric("p2pimage_sidecar_torrents_generated_total") == generated
            assert unknown_layer.digest not in env.sidecar.store
            # A captured proof replayed, and a proof for another digest: refused.
            url = f"{env.url}/torrents/{layer}"
            proof = create_proof(node.node_key, method="GET", url=url, token=raw, now=time.time())
            headers = {"Authorization": f"DPoP {raw}", "DPoP": proof}
            assert (await anon.get(url, headers=headers)).status_code == 200
            again = await anon.get(url, headers=headers)
            assert again.status_code == 401 and again.json()["error"] == "replayed_proof"
            other = await anon.get(f"{env.url}/torrents/{unknown_layer.digest}", headers={
                "Authorization": f"DPoP {raw}",
                "DPoP": create_proof(node.node_key, method="GET", url=url, token=raw,
                                     now=time.time()),
            })  # fmt: skip
            assert other.status_code == 401 and other.json()["error"] == "proof_url"
            # Pull rights: the registry's yes to the caller's own credentials.
            r = await anon.get(f"/torrents/{layer}?repository=private/app", auth=good_basic)
            assert r.status_code == 200 and r.content == stored.content
            assert r.headers["cache-control"].startswith("private")
            r = await anon.get(f"/torrents/{layer}", auth=good_basic)
            assert r.status_code == 400 and r.json()["error"] == "repository_required"
            r = await anon.get(
                f"/torrents/{unknown_layer.digest}?repository=private/app", auth=good_basic
            )
            assert r.status_code == 200
            check_torrent(r.content, unknown_layer.digest, unknown_layer.data)
            # Garbage credentials: a 4xx, never a 500, never a torrent.
            for value in (
                "Basic \u00e9t\u00e9".encode(),
                b"DPoP \xff\xfe",
                b"DPoP a.b.c",
                b"Basic !!!",
                b"Negotiate x",
                b"DPoP",
            ):
                r = await anon.get(
                    f"/torrents/{layer}?repository=private/app",
                    headers={b"Authorization": value, b"DPoP": b"e30.e30.e30"},
                )
                assert r.status_code in (401, 403), (value, r.status_code)
        # The node's own client sends its proof (SidecarClient with a TokenKeeper's auth).
        async with httpx.AsyncClient(timeout=30) as http:
            client = SidecarClient(env.url, http=http, auth=node_auth(env.sidecar.issuer))
            meta = await client.torrent(layer, "private/app")
            assert meta.sha256 == layer
            bare = SidecarClient(env.url, http=http)
            with pytest.raises(SidecarError) as info:
                await bare.torrent(layer, "private/app")
            assert info.value.status == 401
