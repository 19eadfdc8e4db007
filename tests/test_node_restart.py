"""A restarted node: resumes a partial layer (verified pieces are not fetched again) and
keeps seeding the complete ones it kept.

The registry, sidecar and tracker come from :func:`daemons.testbed.localcluster.local_cluster`;
the nodes under test are started here (:func:`start_node`) so a test can stop one and
start it again on the same cache directory, as a node restarting after a crash or an
upgrade does. :func:`node_settings`, :func:`start_node` and :func:`pull_blob` are also
used by ``tests/test_cache.py`` and ``tests/test_tokens_refresh.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemons.node import NodeDaemon, NodeSettings, run_node
from daemons.testbed.localcluster import LocalCluster, local_cluster
from daemons.testbed.throttle_proxy import CHUNK as RELAY_CHUNK
from p2pimage.oci.image import BuiltImage, build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import blob_key, registry_namespace

MIB = 1024 * 1024
REPO = "demo/app"

pytestmark = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


# --- helpers (shared with the cache and token tests) ------------------------------------


def node_settings(cluster: LocalCluster, name: str, **overrides: Any) -> NodeSettings:
    """Settings of a node of ``cluster`` (as local_cluster makes them), with overrides."""
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "node_name": name,
        "peer_host": "127.0.0.1",
        "peer_port": 0,
        "sidecar_url": cluster.sidecar_url,
        "tracker_url": cluster.tracker_url,
        "credential": cluster.credential,
        "upstreams": {cluster.registry_host: cluster.proxy.url},
        "default_upstream": cluster.proxy.url,
        "cache_dir": cluster.workdir / name / "cache",
        "allow_plain_http_join": True,
        "log_json": True,
    }
    return NodeSettings.model_validate({**fields, **overrides})


@dataclass
class RunningNode:
    settings: NodeSettings
    mirror_url: str
    daemon: NodeDaemon
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    async def stop(self) -> None:
        """Kill the node (its mirror, peer and swarms) and wait until it is gone."""
        self.scope.cancel()
        await self.stopped.wait()

    async def wait_p2p(self, timeout_s: float = 15.0) -> None:
        """Until the node holds a token and its peer runs (else pulls go direct)."""
        with trio.fail_after(timeout_s):
            while self.daemon.layers.node is None:
                await trio.sleep(0.05)


async def start_node(nursery: trio.Nursery, settings: NodeSettings) -> RunningNode:
    """Run ``run_node(settings)`` in ``nursery``; the node stops with ``.stop()``."""
    scope = trio.CancelScope()
    stopped = trio.Event()
    daemons: list[NodeDaemon] = []

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await run_node(settings, task_status=task_status, daemon_ready=daemons.append)
        finally:
            stopped.set()

    url = await nursery.start(run)
    return RunningNode(settings, url, daemons[0], scope, stopped)


async def pull_blob(
    node: RunningNode, cluster: LocalCluster, digest: str, repo: str = REPO
) -> tuple[int, bytes]:
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.get(
            f"{node.mirror_url}/v2/{repo}/blobs/{digest}", params={"ns": cluster.registry_host}
        )
    return r.status_code, r.content


async def push(cluster: LocalCluster, image: BuiltImage, repo: str = REPO) -> None:
    async with RegistryClient(cluster.registry.url) as client:
        await push_image(client, repo, "v1", image)


def fetched_bytes(node: RunningNode) -> int:
    """Layer bytes this node run took from anywhere: peers, origin reads, fallback."""
    layers = node.daemon.layers
    return layers.peer_bytes() + layers.origin_bytes() + layers.stats.bytes_served["registry"]


# --- tests ------------------------------------------------------------------------------


async def test_restarted_node_resumes_a_partial_layer(tmp_path: Path) -> None:
    image = build_image([16 * MIB], seed=21)
    layer = image.layers[0]
    size = len(layer.data)
    hex_ = layer.digest.removeprefix("sha256:")
    # A slow registry (4 MiB/s) so the node can be killed with the layer half there.
    async with (
        local_cluster(tmp_path, nodes=0, registry_rate=4 * MIB) as cluster,
        trio.open_nursery() as nursery,
    ):
        await push(cluster, image)
        settings = node_settings(cluster, "node-a", stall_timeout_s=5.0)
        node = await start_node(nursery, settings)
        await node.wait_p2p()

        async def doomed_pull() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await pull_blob(node, cluster, layer.digest)

        nursery.start_soon(doomed_pull)
        had = 0
        with trio.fail_after(30):
            while had < 6 * MIB:
                await trio.sleep(0.05)
                peer = node.daemon.layers.node
                swarms = list(peer.swarms.values()) if peer is not None else []
                had = max((s.storage.bytes_have for s in swarms), default=0)
        await node.stop()
        assert had < size  # killed mid-layer
        # Kept under the registry's own directory (keyed by registry and digest).
        cache = settings.cache_dir / registry_namespace(cluster.proxy.url)
        assert (cache / f"{hex_}.partial").exists() and (cache / f"{hex_}.state").exists()
        assert not (cache / hex_).exists()

        egress_before = cluster.registry_egress
        node = await start_node(nursery, settings)
        await node.wait_p2p()
        with trio.fail_after(60):
            status, body = await pull_blob(node, cluster, layer.digest)
        assert status == 200 and body == layer.data
        # The verified pieces were kept: the restarted node fetched only the rest, from
        # whatever source, and the registry sent only the rest. (Its count also holds what
        # was in flight to the killed node when it died, and HEAD answers: up to one relay
        # chunk (the registry relay counts a chunk as it passes it, CHUNK = 1 MiB since it
        # splices) and 512 KiB of reads and headers, against the 6+ MiB a node that lost
        # its pieces would read again.)
        fetched = fetched_bytes(node)
        assert fetched <= size - had, (fetched, size, had)
        in_flight = RELAY_CHUNK + 512 * 1024
        assert cluster.registry_egress - egress_before <= size - had + in_flight
        with trio.fail_after(10):
            while not node.daemon.layers.cache.is_complete(f"{cache.name}/{hex_}"):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_restarted_node_keeps_seeding_complete_layers(tmp_path: Path) -> None:
    image = build_image([8 * MIB], seed=22)
    layer = image.layers[0]
    size = len(layer.data)
    hex_ = layer.digest.removeprefix("sha256:")
    async with (
        local_cluster(tmp_path, nodes=0) as cluster,
        trio.open_nursery() as nursery,
    ):
        await push(cluster, image)
        settings_a = node_settings(cluster, "node-a")
        a = await start_node(nursery, settings_a)
        await a.wait_p2p()
        with trio.fail_after(60):
            status, body = await pull_blob(a, cluster, layer.digest)
        assert status == 200 and body == layer.data
        with trio.fail_after(10):
            key = blob_key(registry_namespace(cluster.proxy.url), hex_)
            while not a.daemon.layers.cache.is_complete(key):
                await trio.sleep(0.05)
        await a.stop()

        a = await start_node(nursery, settings_a)
        await a.wait_p2p()
        with trio.fail_after(10):  # seeding again from the cache, with no pull asking
            while not any(
                s.metainfo.sha256 == layer.digest and s.complete.is_set()
                for s in (a.daemon.layers.node.swarms.values() if a.daemon.layers.node else ())
            ):
                await trio.sleep(0.05)

        # A second node pulls; the tracker knows the layer is in the swarm (a seeder was
        # seen), so it names no origin fetcher: the bytes can only come from the restarted
        # node. Were it not seeding, b would stall and read the registry after 5 s.
        b = await start_node(nursery, node_settings(cluster, "node-b", stall_timeout_s=5.0))
        await b.wait_p2p()
        egress_before = cluster.registry_egress
        with trio.fail_after(60):
            status, body = await pull_blob(b, cluster, layer.digest)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == hex_
        assert cluster.registry_egress - egress_before < 64 * 1024  # HEADs only
        assert b.daemon.layers.peer_bytes() == size
        assert not b.daemon.layers.stats.fallbacks
        assert b.daemon.layers.stats.bytes_served["swarm"] == size
        peer_a = a.daemon.layers.node
        assert peer_a is not None
        seeding = [s for s in peer_a.swarms.values() if s.metainfo.sha256 == layer.digest]
        assert seeding and seeding[0].stats.uploaded >= size
        assert a.daemon.layers.stats.bytes_served.total() == 0  # a served no runtime since
        nursery.cancel_scope.cancel()
