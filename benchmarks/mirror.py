"""The node mirror as the runtime sees it: time to first byte, and memory while serving.

Two measures, each on a fresh :func:`~daemons.testbed.localcluster.local_cluster` whose nodes run
as their own ``p2pimage node`` processes (the real registry, sidecar and tracker beside):

- **ttfb**: a random layer (``--ttfb-mib``, default 256; ``--quick`` 64) is pushed, its
  torrent indexed, and four nodes pull it with the registry capped (the layer takes
  several seconds to leave it) and every node's peer links capped. Three nodes start,
  then one second later the cold node asks; its time from request to the first body byte
  is ``ttfb_s`` (the others' are printed for context). Every body's SHA-256 is checked.
- **rss**: two fresh nodes, one per size (``--rss-mib``, default 64 and 512; ``--quick``
  32 and 128), each alone in its swarm, pull their layer through the mirror uncapped; the
  node's peak resident set (``VmHWM`` of ``/proc/<pid>/status``) after the pull is
  ``rss_mib_small`` / ``rss_mib_large``. Streaming means the large one is no bigger.

Prints a table; ``--json PATH`` writes ``ttfb_s``, ``rss_mib_small``, ``rss_mib_large``
(and context). Targets: ``ttfb_s`` < 1; ``rss_mib_large`` <= ``rss_mib_small`` + 20 and
<= 150.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks._util import MIB, write_random_file
from daemons.testbed.localcluster import ClusterNode, LocalCluster, local_cluster
from p2pimage.oci.registry import RegistryClient
from p2pimage.sidecar.client import SidecarClient, TokenKeeper

REPO = "bench/mirror"
# Peer links of every node, and the registry's egress, in the ttfb run: the registry needs
# several seconds for the layer, so first bytes must come long before the layer is whole.
TTFB_NODE_RATE = 64 * MIB
TTFB_REGISTRY_SECONDS = 8.0


def _write_blob(path: Path, size: int) -> str:
    """Write ``size`` random (incompressible) bytes; return their digest."""
    write_random_file(path, size)
    h = hashlib.sha256()
    for chunk in _file_chunks(path):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            yield chunk


async def _push_blob(cluster: LocalCluster, tmp: Path, size: int) -> str:
    """Push a random blob of ``size`` bytes and wait until the sidecar has its torrent."""
    path = tmp / "blob.bin"
    digest = await trio.to_thread.run_sync(_write_blob, path, size)
    async with RegistryClient(cluster.registry.url, timeout=300) as client:
        await client.push_blob_stream(REPO, digest, size, _file_chunks(path))
    path.unlink()
    # A bare blob has no manifest to notify about: ask for its torrent now, so the sidecar
    # hashes it before the clock starts (as the push webhook does for a real image).
    async with httpx.AsyncClient(timeout=300) as http:
        # As a cluster member: the sidecar serves torrents to a node token with its proof.
        sidecar = SidecarClient(cluster.sidecar_url, http=http, timeout_s=300)
        keeper = TokenKeeper(sidecar, node="bench-pusher", credential=cluster.credential)
        await keeper.refresh()
        await sidecar.torrent(digest, REPO)
    return digest


async def _pull(
    node: ClusterNode, cluster: LocalCluster, digest: str, size: int
) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the last) for one full pull."""
    h = hashlib.sha256()
    got = 0
    first: float | None = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        start = time.perf_counter()
        async with http.stream(
            "GET",
            f"{node.mirror_url}/v2/{REPO}/blobs/{digest}",
            params={"ns": cluster.registry_host},
        ) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{node.name}: HTTP {r.status_code}")
            async for chunk in r.aiter_raw():
                if first is None and chunk:
                    first = time.perf_counter() - start
                got += len(chunk)
                h.update(chunk)
        total = time.perf_counter() - start
    if got != size or "sha256:" + h.hexdigest() != digest:
        raise RuntimeError(f"{node.name}: wrong bytes ({got} of {size})")
    assert first is not None
    return first, total


async def _swarm_served(node: ClusterNode) -> int:
    """Blob bytes the node served to its client from the swarm (its /metrics)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{node.mirror_url}/metrics")).text
    m = re.search(
        r'^p2pimage_node_(?:served_bytes|bytes_served)_total\{source="swarm"\} (\S+)$', text, re.M
    )
    return int(float(m.group(1))) if m else 0


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def _bench_ttfb(tmp: Path, size_mib: int) -> dict[str, Any]:
    size = size_mib * MIB
    registry_rate = size / TTFB_REGISTRY_SECONDS
    async with local_cluster(
        tmp / "ttfb",
        nodes=4,
        registry_rate=registry_rate,
        node_upload_rate=TTFB_NODE_RATE,
        node_download_rate=TTFB_NODE_RATE,
        node_processes=True,
    ) as cluster:
        digest = await _push_blob(cluster, tmp, size)
        results: dict[int, tuple[float, float]] = {}

        async def pull(i: int) -> None:
            results[i] = await _pull(cluster.nodes[i], cluster, digest, size)

        egress0 = cluster.registry_egress
        async with trio.open_nursery() as nursery:
            for i in (1, 2, 3):
                nursery.start_soon(pull, i)
            await trio.sleep(1.0)  # the swarm is busy when the cold node asks
            nursery.start_soon(pull, 0)
        return {
            "ttfb_s": results[0][0],
            "ttfb_total_s": results[0][1],
            "ttfb_others_s": [results[i][0] for i in (1, 2, 3)],
            "ttfb_layer_mib": size_mib,
            "ttfb_registry_mib_s": registry_rate / MIB,
            "ttfb_node_mib_s": TTFB_NODE_RATE / MIB,
            "ttfb_registry_copies": (cluster.registry_egress - egress0) / size,
            # 1.0: the measured pull came through the swarm, not a registry fallback.
            "ttfb_swarm_fraction": await _swarm_served(cluster.nodes[0]) / size,
        }


async def _bench_rss(tmp: Path, small_mib: int, large_mib: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with local_cluster(tmp / "rss", nodes=2, node_processes=True) as cluster:
        for i, (key, mib) in enumerate((("small", small_mib), ("large", large_mib))):
            size = mib * MIB
            digest = await _push_blob(cluster, tmp, size)
            node = cluster.nodes[i]
            assert node.process is not None
            before = _vm_hwm_mib(node.process.pid)
            _, seconds = await _pull(node, cluster, digest, size)
            out[f"rss_mib_{key}"] = _vm_hwm_mib(node.process.pid)
            out[f"rss_mib_{key}_idle"] = before
            out[f"rss_{key}_layer_mib"] = mib
            out[f"rss_{key}_pull_mib_s"] = mib / seconds
            out[f"rss_{key}_swarm_fraction"] = await _swarm_served(node) / size
    return out


async def _bench(ttfb_mib: int, small_mib: int, large_mib: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2pimage-bench-mirror-") as tmp:
        r = await _bench_ttfb(Path(tmp), ttfb_mib)
        r.update(await _bench_rss(Path(tmp), small_mib, large_mib))
    r["cpus"] = os.cpu_count() or 0
    r["loadavg_1m"] = os.getloadavg()[0]
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mirror", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB ttfb, 32/128 MiB rss")
    parser.add_argument("--ttfb-mib", type=int, default=256)
    parser.add_argument("--rss-mib", type=int, nargs=2, default=[64, 512], metavar=("S", "L"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    ttfb_mib, (small_mib, large_mib) = args.ttfb_mib, args.rss_mib
    if args.quick:
        ttfb_mib, small_mib, large_mib = 64, 32, 128
    r = trio.run(_bench, ttfb_mib, small_mib, large_mib)
    ok_ttfb = r["ttfb_s"] < 1
    ok_rss = r["rss_mib_large"] <= r["rss_mib_small"] + 20 and r["rss_mib_large"] <= 150
    print("node mirror: time to first byte, and peak RSS while serving")
    print(f"{'measure':<58} {'value':>9}  target")
    rows = [
        (
            f"ttfb, cold node, {ttfb_mib} MiB layer (s)",
            r["ttfb_s"],
            f"< 1 {'ok' if ok_ttfb else 'MISSED'}",
        ),
        ("  same pull, last byte (s)", r["ttfb_total_s"], ""),
        ("  other three nodes' ttfb, max (s)", max(r["ttfb_others_s"]), ""),
        (
            f"  caps: registry {r['ttfb_registry_mib_s']:.0f} MiB/s, "
            f"nodes {r['ttfb_node_mib_s']:.0f} MiB/s; registry copies",
            r["ttfb_registry_copies"],
            "",
        ),
        (f"peak RSS serving {small_mib} MiB (MiB)", r["rss_mib_small"], ""),
        (
            f"peak RSS serving {large_mib} MiB (MiB)",
            r["rss_mib_large"],
            f"<= small + 20, <= 150 {'ok' if ok_rss else 'MISSED'}",
        ),
        ("  idle node before the pull (MiB)", r["rss_mib_small_idle"], ""),
        (
            "  share served from the swarm: ttfb / small / large",
            r["ttfb_swarm_fraction"],
            f"{r['rss_small_swarm_fraction']:.2f} / {r['rss_large_swarm_fraction']:.2f}",
        ),
        (f"  pull rate, {large_mib} MiB (MiB/s)", r["rss_large_pull_mib_s"], ""),
    ]
    for name, value, target in rows:
        print(f"{name:<58} {value:>9.3f}  {target}")
    print(f"cpus {r['cpus']}, load average {r['loadavg_1m']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if ok_ttfb and ok_rss else 1


if __name__ == "__main__":
    raise SystemExit(main())
