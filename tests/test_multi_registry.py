"""Several swarm registries per node (issue #14 item 4), with real registries and sidecars.

Registry A is the local cluster's (open, with its sidecar and the tracker); registry B has
htpasswd and a sidecar of its own (own signing key, no webhook: torrents made on demand,
as for a registry the operator does not run). Two nodes serve both: A as
``swarm_registry``, B through ``swarm_upstreams``.
"""

from __future__ import annotations

import base64
import functools
import shutil
import tomllib
from pathlib import Path

import httpx
import pytest
import trio
from pydantic import SecretStr

from daemons._config import ConfigError, dump_settings
from daemons.node import NodeDaemon, NodeSettings, SwarmUpstream, check_settings, run_node
from daemons.sidecar import run_sidecar
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.process import free_port
from daemons.testbed.registry import start_registry
from p2pimage.auth.tokens import SigningKey
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import blob_key
from p2pimage.swarm.origin import OriginCredentials

MIB = 1024 * 1024
BOB = ("bob", "b0b-secret")
BOB_AUTH = "Basic " + base64.b64encode(f"{BOB[0]}:{BOB[1]}".encode()).decode()

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


# --- configuration -----------------------------------------------------------------------


def _settings(**kw: object) -> NodeSettings:
    base: dict[str, object] = {
        "upstreams": {"a.example:5000": "https://a.example:5000", "b.example": "https://b.example"},
        "swarm_registry": "a.example:5000",
        "cache_dir": Path("/nonexistent"),
    }
    return NodeSettings.model_validate(base | kw)


def test_swarm_upstreams_resolve_through_upstreams() -> None:
    s = _settings(swarm_upstreams={"b.example": {"sidecar_url": "https://sidecar-b"}})
    assert s.swarm_upstream() == "https://a.example:5000"
    assert s.swarm_upstream_urls() == {"b.example": "https://b.example"}
    assert s.swarm_upstreams["b.example"].tracker_url is None  # the node's tracker


def test_swarm_upstreams_survive_the_config_file_a_node_process_gets() -> None:
    entry = SwarmUpstream(sidecar_url="https://sidecar-b", credential_file=Path("/join-b"))
    s = _settings(swarm_upstreams={"b.example": entry})
    back = NodeSettings.model_validate(tomllib.loads(dump_settings(s, secrets=True)))
    assert back.swarm_upstreams == {"b.example": entry}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"c.example": SwarmUpstream(sidecar_url="https://s")}, "not a key of upstreams"),
        ({"a.example:5000": SwarmUpstream(sidecar_url="https://s")}, "already has a swarm"),
        ({"b.example/x": SwarmUpstream(sidecar_url="https://s")}, "host\\[:port\\]"),
    ],
)
def test_bad_swarm_upstreams_are_config_errors(
    entries: dict[str, SwarmUpstream], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_settings(_settings(swarm_upstreams=entries))


def test_a_plain_http_sidecar_of_an_entry_gets_no_credential_unless_allowed() -> None:
    entries = {"b.example": SwarmUpstream(sidecar_url="http://sidecar-b")}
    s = _settings(swarm_upstreams=entries, credential=SecretStr("join"))
    with pytest.raises(ConfigError, match=r"swarm_upstreams\.b\.example\.sidecar_url"):
        check_settings(s)
    check_settings(s.model_copy(update={"allow_plain_http_join": True}))


def test_rebased_origin_reads_stay_on_the_nodes_registry() -> None:
    digest = "sha256:" + "ab" * 32
    told = f"http://tracker-registry:5000/v2/team/app/blobs/{digest}"
    plain = OriginCredentials("http://b.example:5000")
    assert plain.read_url(told) is None  # refused, as before
    rebased = OriginCredentials("http://b.example:5000", rebase=True)
    assert rebased.read_url(told) == f"http://b.example:5000/v2/team/app/blobs/{digest}"
    assert rebased.read_url("http://elsewhere/not-a-blob") is None
    on_b = f"http://b.example:5000/v2/x/blobs/{digest}"
    assert rebased.read_url(on_b) == on_b


# --- two registries, two sidecars, two nodes ---------------------------------------------


async def _get(
    http: httpx.AsyncClient, node: str, ns: str, repo: str, digest: str, auth: str | None
) -> httpx.Response:
    headers = {"Authorization": auth} if auth else {}
    return await http.get(f"{node}/v2/{repo}/blobs/{digest}", params={"ns": ns}, headers=headers)


@needs_registry
async def test_two_registries_swarm_apart_and_serve_each_its_own_clients(tmp_path: Path) -> None:
    size = 3 * MIB
    only_a, only_b = build_image([size], seed=1401), build_image([size], seed=1402)
    both = build_image([size], seed=1403)
    la, lb, lc = only_a.layers[0], only_b.layers[0], both.layers[0]
    async with (
        local_cluster(tmp_path / "a", nodes=0) as cluster,
        start_registry(htpasswd=BOB, workdir=tmp_path / "registry-b") as registry_b,
        httpx.AsyncClient(timeout=60) as http,
        trio.open_nursery() as nursery,
    ):
        assert cluster.sidecar_settings is not None
        key_b = tmp_path / "sidecar-b-key.pem"
        key_b.write_bytes(SigningKey.generate().to_pem())
        key_b.chmod(0o600)
        port_b = free_port("127.0.0.1")
        sidecar_b = f"http://127.0.0.1:{port_b}"
        await nursery.start(
            run_sidecar,
            cluster.sidecar_settings.model_copy(
                update={
                    "listen": f"127.0.0.1:{port_b}",
                    "registry_url": registry_b.url,
                    "registry_username": BOB[0],
                    "registry_password": SecretStr(BOB[1]),
                    "store_dir": tmp_path / "torrents-b",
                    "signing_keys": [key_b],
                }
            ),
        )
        host_a, host_b = cluster.registry_host, registry_b.url.split("://", 1)[1]
        for image in (only_a, both):
            async with RegistryClient(cluster.registry.url) as c:
                await push_image(c, "team/app", "v1", image)
        for image in (only_b, both):
            async with RegistryClient(registry_b.url, username=BOB[0], password=BOB[1]) as c:
                await push_image(c, "team/app", "v1", image)

        daemons: list[NodeDaemon] = []
        urls: list[str] = []
        for i in range(2):
            settings = NodeSettings(
                listen="127.0.0.1:0",
                node_name=f"node-{i}",
                peer_host="127.0.0.1",
                peer_port=0,
                sidecar_url=cluster.sidecar_url,
                tracker_url=cluster.tracker_url,
                credential=SecretStr(cluster.credential),
                upstreams={host_a: cluster.relay_url, host_b: registry_b.url},
                default_upstream=cluster.relay_url,
                swarm_registry=host_a,
                swarm_upstreams={host_b: SwarmUpstream(sidecar_url=sidecar_b)},
                cache_dir=tmp_path / f"node-{i}" / "cache",
                allow_plain_http_join=True,
                preheat_poll_s=None,
            )
            urls.append(
                await nursery.start(
                    functools.partial(run_node, settings, daemon_ready=daemons.append)
                )
            )
        with trio.fail_after(30):
            while not all(d.layers.node is not None for d in daemons):
                await trio.sleep(0.05)
        node0, node1 = daemons

        # A layer from each registry comes through the swarm, to both nodes.
        for url in urls:
            r = await _get(http, url, host_a, "team/app", la.digest, None)
            assert r.status_code == 200 and r.content == la.data
            r = await _get(http, url, host_b, "team/app", lb.digest, BOB_AUTH)
            assert r.status_code == 200 and r.content == lb.data
        assert node0.layers.stats.pulls["swarm"] == 2
        assert node1.layers.stats.pulls["swarm"] == 2
        assert node1.layers.stats.bytes_served["registry"] == 0
        assert node1.layers.peer_bytes() >= size  # B's layer too came from node-0
        assert node0.layers.stats.fallbacks == {}

        # The digest in both: a registry-A pull caches it under A ...
        r = await _get(http, urls[0], host_a, "team/app", lc.digest, None)
        assert r.status_code == 200 and r.content == lc.data
        # ... and a client without rights in B gets B's refusal, not A's bytes.
        for auth in (None, "Basic " + base64.b64encode(b"bob:wrong").decode()):
            r = await _get(http, urls[0], host_b, "team/app", lc.digest, auth)
            assert r.status_code == 401 and lc.data[:64] not in r.content
        assert node0.layers.stats.pulls["denied"] == 2
        assert node0.layers.node is not None and node1.layers.node is not None
        swarms_of_c = [
            s for s in node0.layers.node.swarms.values() if s.metainfo.sha256 == lc.digest
        ]
        assert len(swarms_of_c) == 1  # no swarm of B was started for the refused clients
        # Bob is served from B's own swarm: another info-hash, other peers.
        for url in urls:
            r = await _get(http, url, host_b, "team/app", lc.digest, BOB_AUTH)
            assert r.status_code == 200 and r.content == lc.data
        swarms_of_c = [
            s for s in node0.layers.node.swarms.values() if s.metainfo.sha256 == lc.digest
        ]
        assert len(swarms_of_c) == 2
        swarm_a, swarm_b = sorted(swarms_of_c, key=lambda s: "@" in s.metainfo.name)
        assert swarm_a.info_hash != swarm_b.info_hash
        assert swarm_b.metainfo.name.endswith("@" + host_b)
        assert swarm_b.metainfo.pieces == swarm_a.metainfo.pieces
        # node-1 joined B's swarm of the digest only, and never met node-0 in A's.
        on_node1 = [s for s in node1.layers.node.swarms.values() if s.metainfo.sha256 == lc.digest]
        assert [s.info_hash for s in on_node1] == [swarm_b.info_hash]
        assert swarm_a.stats.uploaded == 0
        # Each registry's copy is its own cache entry.
        hex_ = lc.digest.removeprefix("sha256:")
        services = list(node0.services.values())
        with trio.fail_after(10):
            while not all(
                node0.layers.cache.is_complete(blob_key(s.namespace, hex_)) for s in services
            ):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
