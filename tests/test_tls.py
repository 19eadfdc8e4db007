"""TLS for the control plane (issue #12, hole 5): the sidecar and the tracker over HTTPS,
nodes verifying them against ``ca_file``, and join credentials never over plain HTTP
unless the operator opts in."""

from __future__ import annotations

import io
import shutil
import ssl
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from daemons._config import ConfigError
from daemons._http import TlsFiles, client_tls, system_tls
from daemons.node import NodeSettings, check_settings
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.tls import make_tls
from p2pimage.auth.tokens import NodeKey
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient

MIB = 1024 * 1024

needs_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


def node(tmp_path: Path, **kw: object) -> NodeSettings:
    fields: dict[str, object] = {
        "tracker_url": "https://tracker.example/announce",
        "credential": "a-join-credential",
        "cache_dir": tmp_path / "cache",
        **kw,
    }
    return NodeSettings.model_validate(fields)


def test_the_node_never_sends_its_join_credential_to_an_http_sidecar(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sidecar_url.*clear text"):
        check_settings(node(tmp_path, sidecar_url="http://sidecar.example:8090"))
    with pytest.raises(ConfigError, match="sidecar_url"):
        check_settings(node(tmp_path, sidecar_url="HTTP://sidecar.example:8090"))
    check_settings(
        node(tmp_path, sidecar_url="http://sidecar.example:8090", allow_plain_http_join=True)
    )
    check_settings(node(tmp_path, sidecar_url="https://sidecar.example:8090"))


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    assert TlsFiles.from_settings(None, None) is None
    assert TlsFiles.from_settings(tls.cert_file, tls.key_file) == TlsFiles(
        tls.cert_file, tls.key_file
    )
    with pytest.raises(ConfigError, match="tls_key_file"):
        TlsFiles.from_settings(tls.cert_file, None)
    with pytest.raises(ConfigError, match="tls_cert_file"):
        TlsFiles.from_settings(tls.ca_file, tls.key_file)  # the key does not match
    with pytest.raises(ConfigError, match="ca_file"):
        client_tls(tmp_path / "missing.pem")
    context = client_tls(tls.ca_file)
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert client_tls(None) is system_tls()  # the system's trust store, built once


@needs_registry
async def test_a_cluster_over_https(tmp_path: Path) -> None:
    image = build_image([3 * MIB], seed=1230)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=2, tls=True) as cluster:
        assert cluster.tls is not None
        assert cluster.sidecar_url.startswith("https://")
        assert cluster.tracker_url.startswith("https://")
        async with RegistryClient(cluster.registry.url) as c:
            await push_image(c, "demo/app", "v1", image)
        # Nobody reaches the control plane without trusting its CA.
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError) as refused:
                await untrusting.get(f"{cluster.sidecar_url}/healthz")
        chain: list[BaseException] = []
        cause: BaseException | None = refused.value
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain), chain
        # Over HTTPS the sidecar takes a join credential; over plain HTTP nothing answers.
        async with httpx.AsyncClient(timeout=10, verify=client_tls(cluster.tls.ca_file)) as http:
            body = {"node": "n1", "jwk": NodeKey.generate().public_jwk(), "credential": "x"}
            r = await http.post(f"{cluster.sidecar_url}/token", json=body)
            assert r.status_code == 401  # refused for the credential, not the transport
            body["credential"] = cluster.credential
            assert (await http.post(f"{cluster.sidecar_url}/token", json=body)).status_code == 200
        async with httpx.AsyncClient(timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.post(cluster.sidecar_url.replace("https", "http") + "/token", json=body)
        # The nodes got their tokens from the sidecar and their peers from the tracker,
        # both over HTTPS: the second pull comes through the swarm.
        for i in (0, 1):
            async with httpx.AsyncClient(timeout=60) as http:
                r = await http.get(
                    f"{cluster.nodes[i].mirror_url}/v2/demo/app/blobs/{layer.digest}",
                    params={"ns": cluster.registry_host},
                )
            assert r.status_code == 200 and r.content == layer.data
        daemons = [n.daemon for n in cluster.nodes]
        assert all(d is not None and d.layers.node is not None for d in daemons)
        assert sum(d.layers.peer_bytes() for d in daemons if d is not None) >= len(layer.data)


@needs_registry
async def test_p2pimage_cluster_tls_runs_everything_over_https(tmp_path: Path) -> None:
    from daemons.cli.cluster import ClusterParams, run_cluster

    params = ClusterParams(
        nodes=2,
        layer_mib=[2.0],
        registry_mib_s=16.0,
        node_up_mib_s=32.0,
        node_down_mib_s=32.0,
        client="oci",
        direct=False,
        workdir=tmp_path,
        tls=True,
    )
    report = await run_cluster(params, Console(file=io.StringIO()))
    assert report["control_plane"] == "https"
    assert report["digests_ok"], report["per_node"]
    assert report["peer_mib"] > 0  # tokens and peer lists came over HTTPS
    assert (tmp_path / "cluster" / "tls" / "ca.pem").is_file()


async def test_the_node_mirror_serves_https_when_asked(tmp_path: Path) -> None:
    import trio

    from daemons.node import run_node

    tls = make_tls(tmp_path / "tls")
    settings = NodeSettings(
        listen="127.0.0.1:0",
        cache_dir=tmp_path / "cache",
        tls_cert_file=tls.cert_file,
        tls_key_file=tls.key_file,
        log_json=True,
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_node, settings)
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=client_tls(tls.ca_file), timeout=10) as http:
            assert (await http.get(f"{url}/healthz")).json()["status"] == "ok"
        nursery.cancel_scope.cancel()
