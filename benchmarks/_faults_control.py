"""Faults of the control plane and the registry: the sidecar, the tracker (in memory or
on Redis), Redis itself, the registry going down or crawling.

Each scenario runs the real registry, sidecar and tracker(s) and in-process node daemons
on loopback, pulls a small image through every node's mirror while the fault hits, and
checks the end state (see :mod:`benchmarks._fault`).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import trio

from daemons.testbed.localcluster import LocalCluster, local_cluster
from daemons.testbed.process import free_port
from daemons.testbed.redis import run_redis
from daemons.testbed.service_proxy import ServiceProxy
from p2pimage.oci.image import build_image
from p2pimage.swarm.ratelimit import RateLimiter

from ._fault import (
    Fault,
    FaultBed,
    FaultResult,
    Pulls,
    RunningNode,
    count_holding,
    node_settings,
    push,
    start_node,
    start_tracker,
    tracker_settings,
    wait_until,
)
from ._util import MIB


async def _pull_all(pulls: Pulls, nodes: list[RunningNode], digests: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        for node in nodes:
            for digest in digests:
                nursery.start_soon(pulls.pull, node.mirror_url, digest)


def _lost(nodes: list[RunningNode], before: list[int]) -> int:
    """Verified bytes the nodes no longer hold in their swarms (a swarm that restarted
    from nothing after the fault would show here)."""
    return sum(max(0, b - n.verified_bytes()) for n, b in zip(nodes, before, strict=True))


async def _start_nodes(
    nursery: trio.Nursery, cluster: LocalCluster, count: int, tracker_urls: list[str] | None = None
) -> list[RunningNode]:
    nodes = []
    for i in range(count):
        url = tracker_urls[i % len(tracker_urls)] if tracker_urls else None
        nodes.append(await start_node(nursery, node_settings(cluster, f"node-{i}", url)))
    for node in nodes:
        await node.wait_p2p()
    return nodes


def _mid_layer(nodes: list[RunningNode], size: int) -> bool:
    """Every node holds part of the layer, none all of it."""
    have = [n.verified_bytes() for n in nodes]
    return all(h > 0 for h in have) and max(have) < size


async def sidecar_down(bed: FaultBed) -> FaultResult:
    """Sidecar down from the start: every pull goes straight to the registry; once the
    sidecar is back, the nodes join and the next pulls fill their caches."""
    image = build_image([3 * MIB, 2 * MIB], seed=101)
    digests = [layer.digest for layer in image.layers]
    async with local_cluster(bed.tmp, nodes=0, notifications=False) as cluster:
        cluster.sidecar_scope.cancel()
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = [
                await start_node(nursery, node_settings(cluster, f"node-{i}")) for i in range(2)
            ]
            with trio.fail_after(60):
                await _pull_all(pulls, nodes, digests)
            direct = sum(n.daemon.layers.stats.bytes_served["registry"] for n in nodes)
            await cluster.start_sidecar()
            for node in nodes:
                await node.wait_p2p(30)
            with trio.fail_after(60):
                await _pull_all(pulls, nodes, digests)
            holding = await count_holding([n.daemon for n in nodes], cluster, digests)
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=2,
        nodes_holding=holding,
        detail=f"{direct // MIB} MiB read direct while the sidecar was down, then cached",
    )


async def tracker_restarted(bed: FaultBed) -> FaultResult:
    """The in-memory tracker killed mid-layer and started again empty: the nodes go on
    with the peers they know, announce again, and lose no verified piece."""
    image = build_image([12 * MIB], seed=102)
    layer = image.layers[0]
    size = len(layer.data)
    async with local_cluster(bed.tmp, nodes=0, registry_rate=6 * MIB) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = await _start_nodes(nursery, cluster, 3)
            async with trio.open_nursery() as clients:
                for node in nodes:
                    clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
                await wait_until(lambda: _mid_layer(nodes, size), 60, "mid-layer")
                before = [n.verified_bytes() for n in nodes]
                await cluster.restart_tracker()
                lost = _lost(nodes, before)
            holding = await count_holding([n.daemon for n in nodes], cluster, [layer.digest])
            fallbacks = sum(sum(n.daemon.layers.stats.fallbacks.values()) for n in nodes)
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        bytes_lost=lost,
        detail=f"tracker restarted mid-layer; {fallbacks} fallbacks",
    )


async def _redis_trackers(bed: FaultBed, *, kill: Literal["tracker", "redis"]) -> FaultResult:
    """Two trackers on one Redis behind one address; one tracker, or Redis, dies."""
    image = build_image([12 * MIB], seed=103 if kill == "tracker" else 104)
    layer = image.layers[0]
    size = len(layer.data)
    with contextlib.ExitStack() as redis:
        redis_port = redis.enter_context(run_redis())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        async with local_cluster(bed.tmp, nodes=0, registry_rate=6 * MIB) as cluster:
            await push(cluster, image)
            pulls = Pulls(cluster.registry_host)
            async with trio.open_nursery() as nursery:
                trackers = [
                    await start_tracker(
                        nursery,
                        tracker_settings(
                            cluster, free_port(), backend="redis", redis_url=redis_url
                        ),
                    )
                    for _ in range(2)
                ]
                # The two replicas behind one address, as a Kubernetes Service puts them.
                service = ServiceProxy(
                    [_address(t.settings.listen) for t in trackers], host="127.0.0.1"
                )
                await nursery.start(service.run)
                nodes = await _start_nodes(
                    nursery, cluster, 3, [f"http://127.0.0.1:{service.port}/announce"]
                )
                async with trio.open_nursery() as clients:
                    for node in nodes:
                        clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
                    await wait_until(lambda: _mid_layer(nodes, size), 60, "mid-layer")
                    before = [n.verified_bytes() for n in nodes]
                    if kill == "tracker":
                        await trackers[0].stop()
                        detail = "tracker 1 of 2 killed mid-layer (both on one Redis)"
                    else:
                        # Killed (stop_process: SIGTERM, no persistence), back empty.
                        redis.close()
                        await trio.sleep(2)
                        redis.enter_context(run_redis(redis_port))
                        detail = "Redis killed mid-layer, back empty 2 s later"
                    lost = _lost(nodes, before)
                holding = await count_holding([n.daemon for n in nodes], cluster, [layer.digest])
                fallbacks = sum(sum(n.daemon.layers.stats.fallbacks.values()) for n in nodes)
                nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        bytes_lost=lost,
        detail=f"{detail}; {fallbacks} fallbacks",
    )


def _address(listen: str) -> tuple[str, int]:
    host, port = listen.rsplit(":", 1)
    return host, int(port)


async def one_redis_tracker_killed(bed: FaultBed) -> FaultResult:
    return await _redis_trackers(bed, kill="tracker")


async def redis_restarted(bed: FaultBed) -> FaultResult:
    return await _redis_trackers(bed, kill="redis")


async def registry_down(bed: FaultBed) -> FaultResult:
    """The registry stopped once the origin fetchers have started reading it, and started
    again 3 s later: fetchers and pulls wait for it, then finish."""
    image = build_image([12 * MIB], seed=105)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=0, registry_rate=4 * MIB) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = await _start_nodes(nursery, cluster, 3)
            async with trio.open_nursery() as clients:
                for node in nodes:
                    clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
                await wait_until(
                    lambda: sum(n.daemon.layers.origin_bytes() for n in nodes) > 0,
                    60,
                    "origin reads",
                )
                cluster.registry.stop(grace=0)
                await trio.sleep(3)
                await cluster.registry.start()
            holding = await count_holding([n.daemon for n in nodes], cluster, [layer.digest])
            fallbacks = sum(sum(n.daemon.layers.stats.fallbacks.values()) for n in nodes)
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        detail=f"registry down 3 s during origin reads; {fallbacks} fallbacks",
    )


async def registry_slow(bed: FaultBed) -> FaultResult:
    """The registry's link falls to a byte a second once one node holds the layer: the
    other nodes must take it from that node, not wait on the registry."""
    image = build_image([6 * MIB], seed=106)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=0) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = await _start_nodes(nursery, cluster, 3)
            with trio.fail_after(60):
                await pulls.pull(nodes[0].mirror_url, layer.digest)
            await count_holding([nodes[0].daemon], cluster, [layer.digest])
            # A byte a second from here on (after a 64 KiB burst: the pulls' manifest
            # and access checks, which a slow registry still answers).
            cluster.proxy.limiter = RateLimiter(1.0, burst=64 * 1024)
            with trio.fail_after(60):
                await _pull_all(pulls, nodes[1:], [layer.digest])
            holding = await count_holding([n.daemon for n in nodes], cluster, [layer.digest])
            swarm = sum(n.daemon.layers.peer_bytes() for n in nodes[1:])
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        detail=f"registry at 1 B/s; {swarm // MIB} MiB came from the peer",
    )


FAULTS: list[Fault] = [
    Fault(
        "sidecar-down",
        "sidecar down from the start (no tokens, no torrents), back after the first pulls",
        sidecar_down,
    ),
    Fault(
        "tracker-restarted",
        "in-memory tracker killed mid-layer and restarted empty on its address",
        tracker_restarted,
    ),
    Fault(
        "redis-tracker-killed",
        "one of two Redis-backed trackers (behind one Service address) killed mid-layer",
        one_redis_tracker_killed,
        quick=False,
    ),
    Fault(
        "redis-restarted",
        "the trackers' Redis killed mid-layer, restarted empty 2 s later",
        redis_restarted,
        quick=False,
    ),
    Fault(
        "registry-down",
        "registry stopped once origin fetchers read it, started again 3 s later",
        registry_down,
    ),
    Fault(
        "registry-slow",
        "registry link at one byte a second once a node holds the layer",
        registry_slow,
        quick=False,
    ),
]
