"""The node peer end to end: the real registry, sidecar, tracker and three node mirrors on
loopback; pulls through the mirrors; faults."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemons.testbed.localcluster import LocalCluster, local_cluster
from p2pimage.oci.image import BuiltImage, build_image, push_image
from p2pimage.oci.registry import RegistryClient

MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


async def pull_blob_via(
    mirror_url: str, cluster: LocalCluster, repo: str, digest: str, authorization: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.get(
            f"{mirror_url}/v2/{repo}/blobs/{digest}",
            params={"ns": cluster.registry_host},
            headers=headers,
        )
        return r.status_code, r.content, dict(r.headers)


async def push(cluster: LocalCluster, image: BuiltImage, repo: str = "demo/app") -> str:
    async with RegistryClient(cluster.registry.url) as client:
        return await push_image(client, repo, "v1", image)


def node_metric(cluster: LocalCluster, index: int) -> tuple[int, int]:
    daemon = cluster.nodes[index].daemon
    assert daemon is not None
    return daemon.layers.peer_bytes(), daemon.layers.origin_bytes()


async def test_three_nodes_pull_one_copy_from_registry(tmp_path: Path) -> None:
    image = build_image([8 * MIB, 4 * MIB, 1000], seed=1)
    async with local_cluster(tmp_path, nodes=3) as cluster:
        await push(cluster, image)
        big = [layer for layer in image.layers if len(layer.data) >= MIB]
        before = cluster.registry_egress
        results: dict[tuple[int, str], tuple[int, bytes, dict[str, str]]] = {}

        async def pull(i: int, digest: str) -> None:
            results[(i, digest)] = await pull_blob_via(
                cluster.nodes[i].mirror_url, cluster, "demo/app", digest
            )

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    for layer in image.layers:
                        nursery.start_soon(pull, i, layer.digest)
        for (_, digest), (status, body, headers) in results.items():
            assert status == 200
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
            assert headers["docker-content-digest"] == digest
        egress = cluster.registry_egress - before
        layer_bytes = sum(len(layer.data) for layer in big)
        # Direct reads are counted by the nodes: the tiny layer, and any fallback (a node
        # whose swarm could not start in time reads the registry, by design; beside two
        # CPU hogs one did, for an 8 MiB layer). The rest are origin reads: each big layer
        # crosses the registry link about once for the three nodes, where three direct
        # pulls would be 3 copies.
        direct = sum(
            node.daemon.layers.stats.bytes_served["registry"]
            for node in cluster.nodes
            if node.daemon
        )
        assert egress - direct < 1.3 * layer_bytes + 64 * 1024
        assert sum(node_metric(cluster, i)[0] for i in range(3)) >= layer_bytes


async def test_range_request_served_from_verified_pieces(tmp_path: Path) -> None:
    image = build_image([4 * MIB], seed=2)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=1) as cluster:
        await push(cluster, image)
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.get(
                f"{cluster.nodes[0].mirror_url}/v2/demo/app/blobs/{layer.digest}",
                params={"ns": cluster.registry_host},
                headers={"Range": "bytes=1000-200999"},
            )
        assert r.status_code == 206
        assert r.content == layer.data[1000:201000]
        assert r.headers["content-range"] == f"bytes 1000-200999/{len(layer.data)}"
        daemon = cluster.nodes[0].daemon
        assert daemon is not None
        assert daemon.layers.stats.bytes_served["swarm"] == 200000
        assert not daemon.layers.stats.fallbacks


async def test_sidecar_down_from_the_start_pulls_still_succeed(tmp_path: Path) -> None:
    image = build_image([3 * MIB], seed=3)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=2, notifications=False) as cluster:
        cluster.sidecar_scope.cancel()
        await push(cluster, image)
        for node in cluster.nodes:
            status, body, _ = await pull_blob_via(
                node.mirror_url, cluster, "demo/app", layer.digest
            )
            assert status == 200 and body == layer.data


def verified_bytes(cluster: LocalCluster, index: int) -> int:
    """Layer bytes node ``index`` holds verified in its live swarms."""
    daemon = cluster.nodes[index].daemon
    assert daemon is not None
    node = daemon.layers.node
    return sum(s.summary().have_bytes for s in node.swarms.values()) if node else 0


async def test_tracker_stopped_mid_pull_and_peer_killed(tmp_path: Path) -> None:
    image = build_image([16 * MIB], seed=4)
    layer = image.layers[0]
    async with local_cluster(
        tmp_path, nodes=3, node_download_rate=4 * MIB, stall_timeout_s=3.0
    ) as cluster:
        await push(cluster, image)
        results: dict[int, bytes] = {}

        async def pull(i: int) -> None:
            status, body, _ = await pull_blob_via(
                cluster.nodes[i].mirror_url, cluster, "demo/app", layer.digest
            )
            assert status == 200
            results[i] = body

        async def doomed_pull() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await pull(2)

        served = [node.daemon.layers.stats.bytes_served for node in cluster.nodes if node.daemon]

        def mid_pull() -> bool:
            """The swarm is serving both survivors' runtimes, neither has the whole layer,
            and node 2 holds part of it: the moment the faults must hit (an event, not a
            delay, so a loaded machine cannot move it before the swarm or after the pull)."""
            have = [verified_bytes(cluster, i) for i in range(3)]
            serving = all(served[i]["swarm"] > 0 for i in (0, 1))
            return serving and have[2] > 0 and max(have[:2]) < len(layer.data)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in (0, 1):
                    nursery.start_soon(pull, i)
                nursery.start_soon(doomed_pull)
                while not mid_pull():
                    await trio.sleep(0.02)
                cluster.tracker_scope.cancel()  # the tracker dies mid-pull
                cluster.nodes[2].stop()  # and so does a peer holding part of the layer
                assert not results  # both survivors' pulls were still under way
        assert results[0] == layer.data and results[1] == layer.data


async def test_client_without_credentials_gets_401_and_no_swarm_bytes(tmp_path: Path) -> None:
    image = build_image([2 * MIB], seed=5)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=1, htpasswd=("alice", "s3cret")) as cluster:
        async with RegistryClient(
            cluster.registry.url, username="alice", password="s3cret"
        ) as client:
            await push_image(client, "private/app", "v1", image)
        node = cluster.nodes[0]
        status, _, headers = await pull_blob_via(
            node.mirror_url, cluster, "private/app", layer.digest
        )
        assert status == 401
        assert "www-authenticate" in {k.lower() for k in headers}
        assert node.daemon is not None
        assert node.daemon.layers.stats.bytes_served["swarm"] == 0
        import base64

        basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        status, body, _ = await pull_blob_via(
            node.mirror_url, cluster, "private/app", layer.digest, authorization=basic
        )
        assert status == 200 and body == layer.data
        assert node.daemon.layers.stats.bytes_served["swarm"] == len(layer.data)


# --- real clients pulling through the mirror -------------------------------------------


def mirror_blob_bytes(cluster: LocalCluster, index: int) -> int:
    """Blob bytes node ``index``'s mirror served (proof the bytes came through it)."""
    daemon = cluster.nodes[index].daemon
    assert daemon is not None
    return sum(daemon.layers.stats.bytes_served.values())


async def test_skopeo_pulls_multi_layer_image_through_three_mirrors(
    tmp_path: Path, skopeo_available: None
) -> None:
    from p2pimage.mirror.runtime_config import write_registries_conf
    from tests.runtimes import askopeo_copy

    image = build_image([6 * MIB, 3 * MIB, 2 * MIB, 500], seed=6)
    async with local_cluster(tmp_path, nodes=3) as cluster:
        pushed = await push(cluster, image)
        before = cluster.registry_egress
        digests: dict[int, str] = {}

        async def pull(i: int) -> None:
            conf = write_registries_conf(
                tmp_path / f"reg{i}.conf", cluster.registry_host, cluster.nodes[i].mirror_host
            )
            digests[i] = await askopeo_copy(
                f"{cluster.registry_host}/demo/app:v1", tmp_path / f"out{i}", conf
            )

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(pull, i)
        assert digests == {0: pushed, 1: pushed, 2: pushed}
        layer_bytes = sum(len(layer.data) for layer in image.layers)
        for i in range(3):
            assert mirror_blob_bytes(cluster, i) >= layer_bytes - 500
        big = sum(len(layer.data) for layer in image.layers if len(layer.data) >= MIB)
        assert cluster.registry_egress - before < 1.3 * big + 3 * 64 * 1024


async def test_containerd_pulls_through_the_mirror(tmp_path: Path, containerd: Any) -> None:
    from p2pimage.mirror.runtime_config import write_hosts_dir
    from tests.runtimes import actr_pull

    image = build_image([4 * MIB, 1 * MIB, 300], seed=7)
    async with local_cluster(tmp_path, nodes=1) as cluster:
        pushed = await push(cluster, image)
        hosts = tmp_path / "certs.d"
        write_hosts_dir(
            hosts, [cluster.registry_host], cluster.nodes[0].mirror_url, plain_http=True
        )
        with trio.fail_after(120):
            digest = await actr_pull(
                containerd, f"{cluster.registry_host}/demo/app:v1", hosts_dir=hosts
            )
        assert digest == pushed
        # containerd falls back to the upstream silently on mirror errors: prove the
        # layers came through the mirror and the swarm.
        daemon = cluster.nodes[0].daemon
        assert daemon is not None
        assert daemon.layers.stats.bytes_served["swarm"] >= 5 * MIB
        assert not daemon.layers.stats.fallbacks


async def test_podman_pulls_through_the_mirror(tmp_path: Path, podman_available: None) -> None:
    from p2pimage.mirror.runtime_config import write_registries_conf
    from tests.runtimes import apodman_pull

    image = build_image([3 * MIB, 200], seed=8)
    async with local_cluster(tmp_path, nodes=1) as cluster:
        pushed = await push(cluster, image)
        conf = write_registries_conf(
            tmp_path / "reg.conf", cluster.registry_host, cluster.nodes[0].mirror_host
        )
        with trio.fail_after(180):
            digest = await apodman_pull(f"{cluster.registry_host}/demo/app:v1", conf)
        assert digest == pushed
        assert mirror_blob_bytes(cluster, 0) >= 3 * MIB


# --- the cluster command ------------------------------------------------------------------


def test_cluster_command_three_nodes(tmp_path: Path) -> None:
    """`p2pimage cluster` at N=3 with a small image: every node's image digest matches and
    the printed registry egress is about one copy."""
    import json
    import subprocess
    import sys

    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemons.cli",
            "cluster",
            "--nodes",
            "3",
            "--layers",
            "2,1",
            "--registry-mib-s",
            "16",
            "--node-up-mib-s",
            "32",
            "--node-down-mib-s",
            "32",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["digests_ok"] is True
    assert report["nodes"] == 3
    assert report["registry_copies"] <= 1.2
    for key in (
        "t_all_s",
        "t_bound_s",
        "ratio_to_bound",
        "t_direct_s",
        "speedup_vs_direct",
        "cpu_s",
    ):
        assert isinstance(report[key], int | float)
    # The registry sent one copy; the other two nodes' layers came from peers (the config
    # blob is too small for a swarm), and duplicates, if any, are reported, not hidden.
    assert report["peer_mib"] >= 2 * (report["image_mib"] - 0.1)
    assert 0 <= report["peer_wasted_mib"] < report["peer_mib"]
    printed = re.search(r"registry egress\s*│\s*([0-9.]+) image copies", proc.stdout)
    assert printed is not None
    assert abs(float(printed.group(1)) - report["registry_copies"]) < 0.006
    # cpu_s explained: every phase, split by kind of process, adding up to the whole.
    phases = report["cpu_phases"]
    assert list(phases) == [
        "image",
        "startup",
        "push",
        "p2p_pulls",
        "direct_pulls",
        "teardown",
    ]
    for spent in phases.values():
        assert set(spent) == {"harness", "nodes", "registry", "reaped", "total"}
        assert abs(sum(v for k, v in spent.items() if k != "total") - spent["total"]) < 0.05
    assert abs(sum(p["total"] for p in phases.values()) - report["cpu_s"]) < 0.2
    # Three node processes start (Python, imports) and serve the pulls; the registry
    # serves the direct pulls.
    assert phases["startup"]["nodes"] > 0.1
    assert phases["p2p_pulls"]["nodes"] > 0
    if report["client"] == "skopeo":  # a child process per pull
        assert phases["p2p_pulls"]["reaped"] > 0 and phases["direct_pulls"]["reaped"] > 0
    assert phases["direct_pulls"]["registry"] > 0
    assert report["cpu_kinds"]["nodes"] == pytest.approx(
        sum(p["nodes"] for p in phases.values()), abs=0.05
    )
    assert "where the CPU went" in proc.stdout


async def test_a_fake_seeder_slows_the_next_pull_never_stalls_it(tmp_path: Path) -> None:
    """A member with a real token and key claims to seed a layer nobody holds yet and
    serves nothing. The next pull through a real node completes through the swarm (the
    tracker reopens origin work for the stalled leecher) within the node's stall timeout,
    with no fallback to a direct registry read."""
    from p2pimage.sidecar.client import SidecarClient, TokenKeeper
    from p2pimage.tracker import AnnounceRequest, Event
    from p2pimage.tracker.client import TrackerClient

    image = build_image([6 * MIB], seed=31)
    layer = image.layers[0]
    stall_timeout_s = 15.0
    async with local_cluster(tmp_path, nodes=1, stall_timeout_s=stall_timeout_s) as cluster:
        await push(cluster, image)
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            sidecar = SidecarClient(cluster.sidecar_url, http=http)
            liar = TokenKeeper(sidecar, node="liar", credential=cluster.credential)
            await liar.refresh()
            meta = await sidecar.torrent(layer.digest, "demo/app")

            async def silent(stream: trio.SocketStream) -> None:
                await trio.sleep_forever()  # accepts connections, says nothing

            listeners = await nursery.start(trio.serve_tcp, silent, 0)
            claim = AnnounceRequest(
                info_hash=meta.info_hash,
                peer_id=liar.peer_id(),
                port=listeners[0].socket.getsockname()[1],
                left=0,
                event=Event.STARTED,
            )
            tracker = TrackerClient(cluster.tracker_url, http=http, auth=liar.request_auth())
            assert (await tracker.announce(claim)).complete == 1
            started = trio.current_time()
            status, body, _ = await pull_blob_via(
                cluster.nodes[0].mirror_url, cluster, "demo/app", layer.digest
            )
            took = trio.current_time() - started
            nursery.cancel_scope.cancel()
    assert status == 200 and body == layer.data
    assert took < stall_timeout_s, took
    daemon = cluster.nodes[0].daemon
    assert daemon is not None
    assert not daemon.layers.stats.fallbacks
    assert daemon.layers.stats.bytes_served["registry"] == 0
    assert daemon.layers.stats.bytes_served["swarm"] == len(layer.data)
