"""Isolation by registry, not by digest (issue #12, hole 1), with the real registry.

The attacks themselves (an ``ns=`` naming an attacker's registry, containerd's
``_default`` catch-all, no/wrong/forged/other user's credentials before and after an
authorised pull) run as tests in tests/test_attacks.py (benchmarks/_attacks_mirror.py);
here: the mirror's upstream resolution, what a refused request leaves behind, and the
access cache's bounds.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from benchmarks._attacks_mirror import (
    ALICE,
    MALLORY,
    PRIVATE_REPO,
    cached_private_layer,
    lying_registry,
    trusting,
)
from daemons._config import ConfigError
from daemons.node import NodeSettings
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.registry import start_registry
from daemons.testbed.token_realm import TokenRealm
from p2pimage.mirror.blobs import ACCESS_CACHE_S, LayerService
from p2pimage.mirror.runtime_config import write_hosts_dir
from p2pimage.oci.image import OCI_MANIFEST, build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import BlobCache
from tests.runtimes import ContainerdProcess, RuntimeCommandError, actr_pull

MIB = 1024 * 1024

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


# --- which registry an ns= names --------------------------------------------------------


def test_only_configured_registries_are_served() -> None:
    s = NodeSettings(
        upstreams={"registry.example.com": "http://in-cluster:5000/"},
        cache_dir=Path("/nonexistent"),
    )
    assert s.upstream_for("registry.example.com") == "http://in-cluster:5000"
    assert s.upstream_for(None) == "https://registry-1.docker.io"
    assert s.upstream_for("") == "https://registry-1.docker.io"
    assert s.upstream_for("docker.io") == "https://registry-1.docker.io"
    assert s.upstream_for("registry-1.docker.io") == "https://registry-1.docker.io"
    for attacker in (
        "attacker.example",
        "registry.example.com.attacker.example",
        "in-cluster:5000",
    ):
        assert s.upstream_for(attacker) is None
    # The swarm registry: the only configured upstream, unless named.
    assert s.swarm_upstream() == "http://in-cluster:5000"


def test_docker_io_is_not_an_alias_for_another_default() -> None:
    s = NodeSettings(default_upstream="http://127.0.0.1:5000", cache_dir=Path("/nonexistent"))
    assert s.upstream_for("docker.io") is None
    assert s.upstream_for("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert s.swarm_upstream() == "http://127.0.0.1:5000"


def test_swarm_registry_must_be_configured() -> None:
    two = {"a.example": "https://a.example", "b.example": "https://b.example"}
    s = NodeSettings(upstreams=two, swarm_registry="b.example", cache_dir=Path("/x"))
    assert s.swarm_upstream() == "https://b.example"
    s = NodeSettings(upstreams=two, swarm_registry="c.example", cache_dir=Path("/x"))
    with pytest.raises(ConfigError, match="swarm_registry"):
        s.swarm_upstream()


# --- an ns= outside the configuration: refused, and nothing reaches that registry -------


@needs_registry
async def test_unconfigured_ns_is_refused_for_every_path_and_never_contacted(
    tmp_path: Path,
) -> None:
    image = build_image([2 * MIB], seed=1210)
    layer = image.layers[0]
    async with lying_registry(len(layer.data), tmp_path / "attacker") as liar:
        with trusting(tmp_path / "attacker" / "ca.pem"):
            async with local_cluster(tmp_path / "cluster", nodes=1) as cluster:
                async with RegistryClient(cluster.registry.url) as c:
                    await push_image(c, "demo/app", "v1", image)
                mirror = cluster.nodes[0].mirror_url
                async with httpx.AsyncClient(timeout=30) as http:
                    for method, path in (
                        ("GET", "/v2/"),
                        ("HEAD", f"/v2/demo/app/blobs/{layer.digest}"),
                        ("GET", f"/v2/demo/app/blobs/{layer.digest}"),
                        ("GET", "/v2/demo/app/manifests/v1"),
                        ("HEAD", "/v2/demo/app/manifests/v1"),
                    ):
                        r = await http.request(method, mirror + path, params={"ns": liar.host})
                        assert r.status_code == 404, (method, path, r.status_code)
                    # The configured registry is served as before, through the swarm.
                    r = await http.get(
                        f"{mirror}/v2/demo/app/blobs/{layer.digest}",
                        params={"ns": cluster.registry_host},
                    )
                    assert r.status_code == 200 and r.content == layer.data
                daemon = cluster.nodes[0].daemon
                assert daemon is not None
                assert daemon.layers.stats.pulls["unknown_registry"] == 5
                assert daemon.layers.stats.bytes_served["swarm"] == len(layer.data)
    assert liar.requests == []


@needs_registry
async def test_refused_clients_start_no_swarm_and_leave_no_cache_entry(tmp_path: Path) -> None:
    """The reverse order: clients without pull rights first. They get the registry's
    refusal; the node asks the sidecar for nothing, joins no swarm, caches nothing."""
    image = build_image([2 * MIB], seed=1211)
    layer = image.layers[0]
    realm = TokenRealm(tmp_path / "realm", dict([ALICE, MALLORY]), {"alice": {PRIVATE_REPO}})
    scope = f"repository:{PRIVATE_REPO}:pull"
    async with trio.open_nursery() as nursery:
        await nursery.start(realm.serve)
        async with (
            local_cluster(
                tmp_path / "cluster", nodes=1, token_auth=realm.registry_auth(), sidecar_login=ALICE
            ) as cluster,
            httpx.AsyncClient(timeout=30) as http,
        ):
            async with RegistryClient(
                cluster.registry.url, username=ALICE[0], password=ALICE[1]
            ) as c:
                await push_image(c, PRIVATE_REPO, "v1", image)
            url = f"{cluster.nodes[0].mirror_url}/v2/{PRIVATE_REPO}/blobs/{layer.digest}"
            mallory = await realm.token_for(http, *MALLORY, scope)
            for authorization in (None, f"Bearer {mallory}", "Basic bm9ib2R5Om5vcGU="):
                headers = {"Authorization": authorization} if authorization else {}
                r = await http.get(url, params={"ns": cluster.registry_host}, headers=headers)
                assert r.status_code == 401
                assert "www-authenticate" in r.headers  # the registry's challenge, relayed
            daemon = cluster.nodes[0].daemon
            assert daemon is not None and daemon.layers.node is not None
            assert not daemon.layers.node.swarms
            assert daemon.layers.cache.used_bytes == 0
            assert sum(daemon.layers.stats.bytes_served.values()) == 0
            assert daemon.layers.stats.pulls["denied"] == 3
            # The rightful client is served, and nobody else is afterwards.
            alice = await realm.token_for(http, *ALICE, scope)
            ok = await http.get(
                url,
                params={"ns": cluster.registry_host},
                headers={"Authorization": f"Bearer {alice}"},
            )
            assert ok.status_code == 200 and ok.content == layer.data
            r = await http.get(
                url,
                params={"ns": cluster.registry_host},
                headers={"Authorization": f"Bearer {mallory}"},
            )
            assert r.status_code == 401 and layer.data[:64] not in r.content
        nursery.cancel_scope.cancel()


# --- the access cache --------------------------------------------------------------------


@needs_registry
async def test_access_answers_are_cached_per_credential_and_expire(tmp_path: Path) -> None:
    image = build_image([4096], seed=1212)
    layer = image.layers[0]
    now = [1_000.0]
    alice = "Basic " + base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
    async with (
        start_registry(htpasswd=ALICE, workdir=tmp_path / "registry") as reg,
        httpx.AsyncClient(timeout=10) as http,
    ):
        async with RegistryClient(reg.url, username=ALICE[0], password=ALICE[1]) as c:
            await push_image(c, PRIVATE_REPO, "v1", image)
        layers = LayerService(
            registry=reg.url,
            node=None,
            cache=BlobCache(tmp_path / "cache", MIB),
            http=http,
            sidecar=None,
            tracker=None,
            clock=lambda: now[0],
        )

        async def check(authorization: str | None) -> int:
            answer = await layers.check_access(reg.url, PRIVATE_REPO, layer.digest, authorization)
            return answer.status

        assert await check(None) == 401
        # What the client needs from the answer: the registry's challenge on a refusal,
        # the size on a success (mutation testing found neither checked).
        refused = await layers.check_access(reg.url, PRIVATE_REPO, layer.digest, None)
        assert refused.size is None and "www-authenticate" in refused.headers
        assert set(refused.headers) <= {
            "www-authenticate",
            "docker-distribution-api-version",
            "content-type",
        }
        granted = await layers.check_access(reg.url + "/", PRIVATE_REPO, layer.digest, alice)
        assert (granted.status, granted.size) == (200, len(layer.data))
        assert "docker-distribution-api-version" in granted.headers
        assert await check(None) == 401  # alice's answer is hers alone
        # Another registry is another key, for the same credential, repository and digest.
        other = await layers.check_access("http://127.0.0.1:9", PRIVATE_REPO, layer.digest, alice)
        assert other.status == 502
        assert other.headers == {} and other.size is None
        assert other.body.startswith(b"registry unreachable: ")
        assert await check("Basic " + base64.b64encode(b"alice:guess").decode()) == 401
        # The blob is deleted upstream: alice's answer stands until it expires, no longer.
        r = await http.delete(
            f"{reg.url}/v2/{PRIVATE_REPO}/blobs/{layer.digest}", headers={"Authorization": alice}
        )
        assert r.status_code == 202
        now[0] += ACCESS_CACHE_S - 1
        assert await check(alice) == 200
        now[0] += 1  # exactly ACCESS_CACHE_S after the answer: expired
        assert await check(alice) == 404
        # Refusals are not cached: the next answer comes from the registry again.
        assert await check(alice) == 404


# --- containerd's _default catch-all, with the real containerd ----------------------------


@pytest.mark.root
@needs_registry
async def test_containerd_default_catch_all_gets_no_private_layer(
    containerd: ContainerdProcess, tmp_path: Path
) -> None:
    """Every registry goes through the node (``_default/hosts.toml``). A pod's image lives
    on the attacker's registry and lists a private layer the node holds in its cache.
    containerd asks the node for it with ``ns=<attacker>``: the node answers 404 without
    asking anyone, containerd asks the attacker's registry directly, which does not have
    the bytes: the pull fails and no private byte reaches containerd's content store.
    (containerd speaks plain HTTP to a loopback registry; the same attack over HTTPS
    with a trusted certificate, at the HTTP level, is benchmarks/_attacks_mirror.py's.)"""
    private = build_image([2 * MIB], seed=1213)
    layer = private.layers[0]
    decoy = build_image([1000], seed=1214)  # the attacker's own config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": decoy.config.descriptor(),
            "layers": [layer.descriptor()],
        }
    ).encode()
    async with lying_registry(len(layer.data), tmp_path / "attacker", tls=False) as liar:
        liar.manifests["v1"] = (manifest, OCI_MANIFEST)
        liar.blobs[decoy.config.digest] = decoy.config.data
        async with local_cluster(tmp_path / "cluster", nodes=1, htpasswd=ALICE) as cluster:
            await cached_private_layer(cluster, private)
            daemon = cluster.nodes[0].daemon
            assert daemon is not None
            served_before = sum(daemon.layers.stats.bytes_served.values())
            hosts = tmp_path / "certs.d"
            write_hosts_dir(hosts, [], cluster.nodes[0].mirror_url, default=True)
            with pytest.raises(RuntimeCommandError) as failed:
                await actr_pull(containerd, f"{liar.host}/evil/app:v1", hosts_dir=hosts)
            assert sum(daemon.layers.stats.bytes_served.values()) == served_before
            assert "not found" in failed.value.stderr
            # The node refused the manifest, the config and the layer, asking nobody.
            assert daemon.layers.stats.pulls["unknown_registry"] >= 3
    content = await trio.to_thread.run_sync(
        lambda: (
            subprocess.run(
                containerd.ctr("content", "ls"), capture_output=True, check=True, text=True
            ).stdout
        )
    )
    stored = {line.split()[0] for line in content.splitlines()[1:] if line.strip()}
    assert layer.digest not in stored
    # containerd went to the attacker's registry itself for the layer, and got nothing.
    assert f"GET /v2/evil/app/blobs/{layer.digest}" in liar.requests
