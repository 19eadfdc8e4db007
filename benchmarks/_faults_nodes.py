"""Faults of the nodes themselves: killed mid-layer (some for good, one restarted), a full
cache disk, a clock ten minutes off, and a containerd pull through three node mirrors
while one of them dies.

Each scenario runs the real registry, sidecar and tracker and in-process node daemons on
loopback (:mod:`benchmarks._fault`); the containerd one runs three real containerd
daemons, one per node, as root.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from daemons.testbed.localcluster import ClusterNode, LocalCluster, local_cluster
from p2pimage.oci.image import build_image, build_index, push_index
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import blob_key, registry_namespace

from ._fault import (
    REPO,
    Fault,
    FaultBed,
    FaultResult,
    Pulls,
    RunningNode,
    count_holding,
    node_settings,
    push,
    start_node,
    wait_until,
)
from ._util import MIB


async def _start(
    nursery: trio.Nursery, cluster: LocalCluster, count: int, **overrides: Any
) -> list[RunningNode]:
    nodes = [
        await start_node(nursery, node_settings(cluster, f"node-{i}", **overrides))
        for i in range(count)
    ]
    for node in nodes:
        await node.wait_p2p()
    return nodes


async def nodes_killed(bed: FaultBed) -> FaultResult:
    """Ten nodes pull one layer; three of them, chosen at random, die each at a random
    point of the layer (between 5% and 90% of it verified)."""
    image = build_image([8 * MIB], seed=201)
    layer = image.layers[0]
    size = len(layer.data)
    rng = random.Random(201)
    async with local_cluster(bed.tmp, nodes=0, registry_rate=8 * MIB) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = await _start(nursery, cluster, 10)
            victims = rng.sample(range(10), 3)
            survivors = [n for i, n in enumerate(nodes) if i not in victims]
            killed_at: list[int] = []

            key = blob_key(registry_namespace(cluster.relay_url), layer.digest[7:])

            async def kill_at(node: RunningNode, fraction: float) -> None:
                def reached() -> bool:
                    # Or done already (a loaded machine can be slower to look than the
                    # swarm to finish, and a finished swarm may be released at once).
                    cache = node.daemon.layers.cache
                    return node.verified_bytes() >= fraction * size or cache.is_complete(key)

                await wait_until(reached, 60, "victim mid-layer")
                done = node.daemon.layers.cache.is_complete(key)
                killed_at.append(size if done else node.verified_bytes())
                await node.stop()

            async with trio.open_nursery() as clients:
                for i, node in enumerate(nodes):
                    if i in victims:
                        clients.start_soon(pulls.doomed, node.mirror_url, layer.digest)
                        clients.start_soon(kill_at, node, rng.uniform(0.05, 0.9))
                    else:
                        clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
            # A victim may have been an origin fetcher: its range goes back to the others
            # after the tracker's origin_stall_s (20 s) and their next announce, so the
            # survivors' swarms may finish well after their clients fell back.
            holding = await count_holding(
                [n.daemon for n in survivors], cluster, [layer.digest], timeout_s=90
            )
            fallbacks = sum(sum(n.daemon.layers.stats.fallbacks.values()) for n in survivors)
            nursery.cancel_scope.cancel()
    where = ", ".join(f"{100 * b // size}%" for b in sorted(killed_at))
    return pulls.result(
        nodes_surviving=len(survivors),
        nodes_holding=holding,
        detail=f"3 of 10 killed at {where} of the layer; {fallbacks} fallbacks",
    )


async def node_restarted(bed: FaultBed) -> FaultResult:
    """A node killed with half a layer verified and started again on the same cache: it
    resumes, and fetches none of the pieces it had verified."""
    image = build_image([12 * MIB], seed=202)
    layer = image.layers[0]
    size = len(layer.data)
    async with local_cluster(bed.tmp, nodes=0, registry_rate=4 * MIB) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            a, b = await _start(nursery, cluster, 2)
            async with trio.open_nursery() as clients:
                clients.start_soon(pulls.doomed, a.mirror_url, layer.digest)
                clients.start_soon(pulls.pull, b.mirror_url, layer.digest)
                await wait_until(lambda: a.verified_bytes() >= size // 2, 60, "half the layer")
                peer = a.daemon.layers.node
                assert peer is not None
                storages = [s.storage for s in peer.swarms.values()]
                await a.stop()
                had = sum(s.bytes_have for s in storages)  # as recorded when it died
                a = await start_node(nursery, a.settings)
                await a.wait_p2p()
                clients.start_soon(pulls.pull, a.mirror_url, layer.digest)
            holding = await count_holding([a.daemon, b.daemon], cluster, [layer.digest])
            # Everything the restarted node took, from peers, the registry or a fallback,
            # beyond what it was missing, is verified data it had to fetch again.
            fetched = a.fetched_bytes()
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=2,
        nodes_holding=holding,
        bytes_lost=max(0, fetched - (size - had)),
        detail=f"killed with {had // MIB} of {size // MIB} MiB; fetched {fetched // MIB} MiB after",
    )


@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A ``size``-byte tmpfs on ``path`` (root), unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def cache_disk_full(bed: FaultBed) -> FaultResult:
    """The node's cache is a 10 MiB tmpfs that another tenant has filled: pulls of an
    8 MiB layer hit ENOSPC and must still be served right; once the space is freed the
    next pull caches the layer."""
    image = build_image([8 * MIB], seed=203)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=0) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        cache = bed.tmp / "node-0" / "cache"
        with _tmpfs(cache, 10 * MIB):
            filler = cache / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                f.write(b"\0" * (10 * MIB))  # as much as fits
            async with trio.open_nursery() as nursery:
                (node,) = await _start(nursery, cluster, 1, cache_dir=cache)
                with trio.fail_after(60):
                    await pulls.pull(node.mirror_url, layer.digest)
                    await pulls.pull(node.mirror_url, layer.digest)
                fallbacks = dict(node.daemon.layers.stats.fallbacks)
                filler.unlink()
                with trio.fail_after(60):
                    await pulls.pull(node.mirror_url, layer.digest)
                holding = await count_holding([node.daemon], cluster, [layer.digest])
                nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=1,
        nodes_holding=holding,
        detail=f"disk full: fallbacks {fallbacks or 'none'}; cached once space was freed",
    )


async def _clock_skew(bed: FaultBed, skew_s: float) -> FaultResult:
    """One of three nodes runs with its clock ``skew_s`` off (its tokens, proofs and peer
    checks read that clock); every node still gets the layer through the swarm."""
    image = build_image([8 * MIB], seed=204)
    layer = image.layers[0]
    async with local_cluster(bed.tmp, nodes=0) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        async with trio.open_nursery() as nursery:
            nodes = [
                await start_node(nursery, node_settings(cluster, f"node-{i}")) for i in range(2)
            ]
            skewed = await start_node(
                nursery, node_settings(cluster, "node-skewed"), clock=lambda: time.time() + skew_s
            )
            nodes.append(skewed)
            for node in nodes[:2]:
                await node.wait_p2p()
            with trio.move_on_after(15):
                await skewed.wait_p2p(15)
            with trio.fail_after(60):
                async with trio.open_nursery() as clients:
                    for node in nodes:
                        clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
            holding = await count_holding([n.daemon for n in nodes], cluster, [layer.digest])
            stats = skewed.daemon.layers.stats
            served = dict(stats.bytes_served)
            nursery.cancel_scope.cancel()
    if served.get("swarm", 0) < len(layer.data):
        pulls.failed += 1  # it could not use the swarm: the skew cost it p2p
        pulls.errors.append("the skewed node did not get the layer through the swarm")
    return pulls.result(
        nodes_surviving=3,
        nodes_holding=holding,
        detail=f"skewed node served {served}, fallbacks {dict(stats.fallbacks) or 'none'}",
    )


async def clock_ahead(bed: FaultBed) -> FaultResult:
    return await _clock_skew(bed, 600)


async def clock_behind(bed: FaultBed) -> FaultResult:
    return await _clock_skew(bed, -600)


async def containerd_node_killed(bed: FaultBed) -> FaultResult:
    """Three containerd daemons pull a two-platform image (amd64, arm64), each through its
    own node's mirror; one node dies mid-layer. The other two pulls succeed through their
    mirrors (containerd's silent fallback to the registry is ruled out: the mirrors
    served the layers)."""
    from p2pimage.mirror.runtime_config import write_hosts_dir
    from tests.runtimes import actr_pull, start_containerd

    images = [
        build_image([8 * MIB, 2 * MIB, 300], seed=205, architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    index = build_index(images)
    amd64 = images[0]
    big = [layer for layer in amd64.layers if len(layer.data) >= MIB]
    async with local_cluster(bed.tmp, nodes=0, registry_rate=8 * MIB) as cluster:
        async with RegistryClient(cluster.registry.url) as client:
            pushed = await push_index(client, REPO, "v1", index)
        pulls = Pulls(cluster.registry_host)
        ref = f"{cluster.registry_host}/{REPO}:v1"
        digests: dict[int, str] = {}
        async with (
            start_containerd() as c0,
            start_containerd() as c1,
            start_containerd() as c2,
            trio.open_nursery() as nursery,
        ):
            runtimes = [c0, c1, c2]
            nodes = await _start(nursery, cluster, 3)
            victim = nodes[2]

            async def pull(i: int) -> None:
                hosts = bed.tmp / f"certs.d-{i}"
                write_hosts_dir(
                    hosts, [cluster.registry_host], nodes[i].mirror_url, plain_http=True
                )
                try:
                    digests[i] = await actr_pull(
                        runtimes[i], ref, hosts_dir=hosts, platform="linux/amd64"
                    )
                except Exception as exc:
                    if i != 2:
                        pulls.failed += 1
                        pulls.errors.append(f"ctr {i}: {str(exc)[-200:]}")

            pulls.made += 2  # the survivors' runtimes (the victim's dies with its node)
            async with trio.open_nursery() as clients:
                for i in range(3):
                    clients.start_soon(pull, i)
                await wait_until(
                    lambda: 0 < victim.verified_bytes() < len(big[0].data), 90, "victim mid-layer"
                )
                await victim.stop()
            for i in (0, 1):
                if i in digests and digests[i] != pushed:
                    pulls.failed += 1
                    pulls.errors.append(f"ctr {i} recorded {digests[i]}, pushed {pushed}")
                served = nodes[i].daemon.layers.stats.bytes_served
                if served.total() < sum(len(layer.data) for layer in big):
                    pulls.failed += 1
                    pulls.errors.append(f"ctr {i} bypassed its mirror ({served.total()} B)")
            holding = await count_holding(
                [n.daemon for n in nodes[:2]], cluster, [layer.digest for layer in big]
            )
            nursery.cancel_scope.cancel()
    return pulls.result(
        nodes_surviving=2,
        nodes_holding=holding,
        detail="containerd ×3, linux/amd64 of a two-platform index, node 2 killed mid-layer",
    )


def _holds_on_disk(cache_dir: Path, cluster: LocalCluster, digest: str) -> bool:
    """A node process's cache holds ``digest`` complete (the blob file exists only after
    its SHA-256 matched), and its bytes hash to it."""
    path = cache_dir / registry_namespace(cluster.relay_url) / digest.removeprefix("sha256:")
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == digest
    except OSError:
        return False


async def nodes_killed_netns(bed: FaultBed) -> FaultResult:
    """Network-namespace mode: five node processes, each its own host behind a shaped
    veth (16 MiB/s each way, the registry at 8 MiB/s); two of them are sent SIGKILL at
    random points of the layer, as a node that loses power would stop."""
    image = build_image([8 * MIB], seed=206)
    layer = image.layers[0]
    size = len(layer.data)
    rng = random.Random(206)
    async with local_cluster(
        bed.tmp,
        nodes=5,
        network="netns",
        registry_rate=8 * MIB,
        node_upload_rate=16 * MIB,
        node_download_rate=16 * MIB,
        stall_timeout_s=5.0,
    ) as cluster:
        await push(cluster, image)
        pulls = Pulls(cluster.registry_host)
        victims = rng.sample(range(5), 2)
        survivors = [n for i, n in enumerate(cluster.nodes) if i not in victims]
        killed_at: list[int] = []

        async def have(node: ClusterNode) -> int:
            async with httpx.AsyncClient(timeout=5) as http:
                doc = (await http.get(f"{node.mirror_url}/swarms")).json()
            return sum(int(s["have_bytes"]) for s in doc["swarms"])

        async def kill_at(node: ClusterNode, fraction: float) -> None:
            with trio.fail_after(60):
                while (held := await have(node)) < fraction * size:
                    if _holds_on_disk(node.settings.cache_dir, cluster, layer.digest):
                        held = size  # finished before we looked (and maybe released)
                        break
                    await trio.sleep(0.05)
            assert node.process is not None
            node.process.kill()
            killed_at.append(held)

        with trio.fail_after(120):
            async with trio.open_nursery() as clients:
                for i, node in enumerate(cluster.nodes):
                    if i in victims:
                        clients.start_soon(pulls.doomed, node.mirror_url, layer.digest)
                        clients.start_soon(kill_at, node, rng.uniform(0.05, 0.9))
                    else:
                        clients.start_soon(pulls.pull, node.mirror_url, layer.digest)
        holding = 0
        with trio.move_on_after(60):
            while True:
                holding = sum(
                    _holds_on_disk(n.settings.cache_dir, cluster, layer.digest) for n in survivors
                )
                if holding == len(survivors):
                    break
                await trio.sleep(0.2)
    where = ", ".join(f"{100 * b // size}%" for b in sorted(killed_at))
    return pulls.result(
        nodes_surviving=len(survivors),
        nodes_holding=holding,
        detail=f"2 of 5 node processes SIGKILLed at {where} of the layer",
    )


FAULTS: list[Fault] = [
    Fault(
        "nodes-killed-30pct",
        "3 of 10 nodes killed, each at a random point of the layer",
        nodes_killed,
    ),
    Fault(
        "node-restarted",
        "a node killed with half a layer and restarted on its cache",
        node_restarted,
    ),
    Fault(
        "cache-disk-full",
        "the node's cache on a full 10 MiB tmpfs, freed after two pulls",
        cache_disk_full,
    ),
    Fault(
        "clock-ahead-10min",
        "one node's wall clock (tokens, proofs, peer checks) ten minutes ahead",
        clock_ahead,
    ),
    Fault(
        "clock-behind-10min",
        "one node's wall clock ten minutes behind",
        clock_behind,
        quick=False,
    ),
    Fault(
        "containerd-node-killed",
        "three containerd pull a two-platform image through three mirrors; one node "
        "killed mid-layer",
        containerd_node_killed,
        quick=False,
    ),
    Fault(
        "nodes-killed-netns",
        "namespace mode: 2 of 5 node processes SIGKILLed at random points of the layer",
        nodes_killed_netns,
        quick=False,
        slow=True,
    ),
]
