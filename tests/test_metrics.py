"""Every daemon's ``/metrics`` after a small end-to-end pull, and the Grafana dashboard
against what the daemons really export.

One in-process cluster (the real registry, sidecar, tracker, two node mirrors): push an
image whose big layers go through the swarm, pull it through node 0, then through node 1
(which then has a peer holding every piece), and scrape.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from daemons.testbed.localcluster import LocalCluster, local_cluster
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient

MIB = 1024 * 1024
DASHBOARD = (
    Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "p2pimage-dashboard.json"
)

requires_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, set[str]]:
    """Samples by (name, labels), and every sample name the exposition declares (a
    labelled counter with no children yet has HELP/TYPE but no sample)."""
    samples: Samples = {}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        declared.update(family.name + s for s in suffixes)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, declared


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: httpx.AsyncClient, base: str) -> tuple[Samples, set[str]]:
    r = await http.get(f"{base}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def settled(nodes: list[tuple[Samples, set[str]]], pulls: int) -> bool:
    """Every node counted all its pulls, and every byte node 0 uploaded arrived at node 1
    (kept or wasted): the counters the test compares stopped moving."""
    counted = all(
        sum(v for (name, _), v in samples.items() if name == "p2pimage_node_blob_pulls_total")
        == pulls
        for samples, _ in nodes
    )
    (first, _), (second, _) = nodes
    received = value(second, "p2pimage_node_fetched_bytes_total", source="peer") + value(
        second, "p2pimage_node_wasted_bytes_total"
    )
    return counted and value(first, "p2pimage_node_uploaded_bytes_total") == received


def tracker_base(cluster: LocalCluster) -> str:
    return cluster.tracker_url.removesuffix("/announce")


@requires_registry
async def test_counters_move_after_a_pull_and_the_dashboard_matches(tmp_path: Path) -> None:
    image = build_image([3 * MIB, 2 * MIB, 700], seed=41)
    big = [layer for layer in image.layers if len(layer.data) >= MIB]
    big_bytes = sum(len(layer.data) for layer in big)
    small_bytes = sum(len(layer.data) for layer in image.layers if len(layer.data) < MIB)
    async with local_cluster(tmp_path, nodes=2) as cluster:
        async with RegistryClient(cluster.registry.url) as client:
            await push_image(client, "demo/metrics", "v1", image)
        async with httpx.AsyncClient(timeout=60) as http:
            with trio.fail_after(60):
                for node in cluster.nodes:
                    for layer in image.layers:
                        r = await http.get(
                            f"{node.mirror_url}/v2/demo/metrics/blobs/{layer.digest}",
                            params={"ns": cluster.registry_host},
                        )
                        assert r.status_code == 200 and r.content == layer.data
            # Pulls are counted when a response body ends, and blocks node 0 sent may
            # still be on their way to node 1: scrape until both settled (no fixed sleep).
            with trio.fail_after(30):
                while True:
                    nodes = [await scrape(http, node.mirror_url) for node in cluster.nodes]
                    if settled(nodes, len(image.layers)):
                        break
                    await trio.sleep(0.05)
            sidecar, sidecar_names = await scrape(http, cluster.sidecar_url)
            tracker, tracker_names = await scrape(http, tracker_base(cluster))

    # Sidecar: a torrent per big layer (the small one never needs one), a token per node.
    assert value(sidecar, "p2pimage_sidecar_torrents_generated_total") >= len(big)
    assert value(sidecar, "p2pimage_sidecar_generated_bytes_total") >= big_bytes
    assert value(sidecar, "p2pimage_sidecar_generation_seconds_count") >= len(big)
    assert value(sidecar, "p2pimage_sidecar_tokens_total", result="issued") >= 2
    assert value(sidecar, "p2pimage_sidecar_tokens_total", result="bad_credential") == 0
    assert value(sidecar, "p2pimage_sidecar_digest_mismatches_total") == 0

    # Tracker: both nodes announced both big layers, none was refused.
    assert value(tracker, "p2pimage_tracker_announces_total", result="ok") >= 2 * len(big)
    assert value(tracker, "p2pimage_tracker_announces_total", result="unauthorized") == 0
    # (A swarm may already have been released once both nodes seed it.)
    assert 1 <= value(tracker, "p2pimage_tracker_swarms") <= len(big)
    assert value(tracker, "p2pimage_tracker_origin_assignments_total") >= 1

    # Nodes: the big layers came through the swarm on both, the small one went direct.
    for samples, _ in nodes:
        served_swarm = value(samples, "p2pimage_node_served_bytes_total", source="swarm")
        assert served_swarm == big_bytes
        assert value(samples, "p2pimage_node_blob_pulls_total", result="swarm") == len(big)
        assert value(samples, "p2pimage_node_blob_pulls_total", result="direct") == 1
        assert value(samples, "p2pimage_node_served_bytes_total", source="registry") == small_bytes
        assert 1 <= value(samples, "p2pimage_node_swarms") <= len(big)
        assert not any(name == "p2pimage_node_fallbacks_total" for name, _ in samples)
        assert value(samples, "p2pimage_node_piece_hash_failures_total") == 0
    first, second = nodes[0][0], nodes[1][0]
    # Node 0 was alone: the tracker made it the origin fetcher for the whole layer.
    assert value(first, "p2pimage_node_fetched_bytes_total", source="origin") == big_bytes
    # Node 1 found a peer holding everything.
    assert value(second, "p2pimage_node_fetched_bytes_total", source="peer") == big_bytes
    # ...and node 0 uploaded it: every byte node 0 sent reached node 1, which kept one
    # copy of each block and counted the rest as wasted (under load a block can turn
    # late and be asked again, and then arrives twice). Exact, however loaded the machine.
    uploaded = value(first, "p2pimage_node_uploaded_bytes_total")
    assert uploaded == big_bytes + value(second, "p2pimage_node_wasted_bytes_total")
    assert value(first, "p2pimage_node_wasted_bytes_total") == 0
    assert value(second, "p2pimage_node_uploaded_bytes_total") == 0
    assert value(second, "p2pimage_node_connected_peers") >= 1

    # Every metric a dashboard query names is one the daemons export.
    exported = sidecar_names | tracker_names | set().union(*(names for _, names in nodes))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 20
    referenced = {m for expr in exprs for m in re.findall(r"\bp2pimage_[a-z0-9_]+", expr)}
    assert referenced, "the dashboard names no p2pimage metric"
    assert referenced - exported == set()


def test_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "p2pimage"
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "p2pimage_node_served_bytes_total",  # bytes by source
        "p2pimage_node_fetched_bytes_total",  # peer / origin / registry fallback
        "p2pimage_sidecar_generated_bytes_total",  # registry egress (sidecar side)
        "p2pimage_node_blob_pulls_total",  # pulls by result
        "p2pimage_node_fallbacks_total",  # fallbacks by reason
        "p2pimage_node_connected_peers",
        "p2pimage_tracker_swarms",
        "p2pimage_tracker_announces_total",
        "p2pimage_sidecar_tokens_total",
        "p2pimage_sidecar_generation_seconds_bucket",
    ):
        assert metric in exprs, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


@pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)
async def test_metrics_listen_serves_the_status_endpoints_and_not_the_mirror(
    tmp_path: Path,
) -> None:
    """``metrics_listen``: Prometheus can scrape the node on an address of its own while
    the mirror stays on loopback; that listener answers no registry path."""
    from tests.test_node_restart import node_settings, pull_blob, push, start_node

    image = build_image([2 * MIB], seed=41)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=0) as cluster, trio.open_nursery() as nursery:
        await push(cluster, image)
        node = await start_node(
            nursery, node_settings(cluster, "node-m", metrics_listen="127.0.0.1:0")
        )
        await node.wait_p2p()
        status_url = node.daemon.status_url
        assert status_url is not None and status_url != node.mirror_url
        with trio.fail_after(60):
            status, body = await pull_blob(node, cluster, layer.digest)
        assert status == 200 and body == layer.data
        async with httpx.AsyncClient(timeout=10) as http:
            metrics = await http.get(f"{status_url}/metrics")
            swarms = await http.get(f"{status_url}/swarms")
            health = await http.get(f"{status_url}/healthz")
            mirror = await http.get(f"{status_url}/v2/", params={"ns": cluster.registry_host})
        assert metrics.status_code == 200
        served = {
            s.labels["source"]: s.value
            for f in text_string_to_metric_families(metrics.text)
            for s in f.samples
            if s.name == "p2pimage_node_served_bytes_total"
        }
        assert served["swarm"] == len(layer.data)
        assert [s["digest"] for s in swarms.json()["swarms"]] == [layer.digest]
        assert health.json()["p2p"] is True
        assert mirror.status_code == 404
        nursery.cancel_scope.cancel()
