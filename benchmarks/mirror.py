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

- **cpu**: in the rss cluster, CPU per MiB the node process spends serving a blob to a
  fast reader (``curl`` to /dev/null, another process), beside the registry process
  (the real CNCF distribution) serving the same blob to the same client, both from
  ``/proc/<pid>/stat`` over the transfer. *Cache*: the large layer, complete in the
  second node's cache, alternately from the registry and from that node's mirror
  (``--cpu-samples`` each, every sample at least 512 MiB of repeated reads so the 10 ms
  clock ticks stay below 4 %; ``--quick``: 2 of 256 MiB; the lowest of each counts).
  *Stream*: the first
  node pulls the same layer, which it does not hold, so its mirror streams it from the
  swarm (the second node seeds it) while it downloads: the node's CPU then includes the
  download (peer wire, piece hashes, writes, the final SHA-256). For context, the
  second node's CPU during its rss pull (streamed while it read the layer from the
  registry as the swarm's origin) is ``mirror_origin_stream_cpu_ms_per_mib``.

Prints a table; ``--json PATH`` writes ``ttfb_s``, ``rss_mib_small``, ``rss_mib_large``,
``mirror_cpu_ms_per_mib``, ``registry_cpu_ms_per_mib``, ``mirror_cpu_ratio``,
``mirror_stream_cpu_ms_per_mib``, ``mirror_stream_cpu_ratio`` (and context). Targets:
``ttfb_s`` < 1; ``rss_mib_large`` <= ``rss_mib_small`` + 20 and <= 150. The CPU figures
have no target yet: issue #15 asks for them beside the registry's.
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
from daemons.testbed.process import cpu_seconds
from p2pimage.oci.registry import RegistryClient
from p2pimage.sidecar.client import SidecarClient, TokenKeeper

REPO = "bench/mirror"
# Peer links of every node, and the registry's egress, in the ttfb run: the registry needs
# several seconds for the layer, so first bytes must come long before the layer is whole.
TTFB_NODE_RATE = 64 * MIB
TTFB_REGISTRY_SECONDS = 8.0
# Bytes read per CPU sample (the blob again and again): /proc counts CPU in 10 ms ticks,
# and the registry spends about 0.5 ms per MiB, so 512 MiB keep a tick under 4 % of a
# sample (``--quick``: 256 MiB, 8 %).
CPU_SAMPLE_BYTES = 512 * MIB


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


async def _curl(url: str, size: int) -> None:
    """Read ``url`` with curl into /dev/null (a fast reader in a process of its own)."""
    result = await trio.run_process(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url],
        capture_stdout=True,
    )
    code, got = result.stdout.decode().split()
    if code not in ("200", "206") or int(got) != size:
        raise RuntimeError(f"{url}: HTTP {code}, {got} of {size} bytes")


async def _cpu_per_mib(pid: int, url: str, size: int, times: int = 1) -> float:
    """CPU milliseconds process ``pid`` spends per MiB while curl reads ``url``
    ``times`` times in a row."""
    before = cpu_seconds(pid)
    for _ in range(times):
        await _curl(url, size)
    return (cpu_seconds(pid) - before) * 1000 / (times * size / MIB)


async def _bench_cpu(
    cluster: LocalCluster, digest: str, size: int, samples: int, sample_bytes: int
) -> dict[str, Any]:
    """CPU per MiB: registry and mirror (cache, alternately), then a streaming pull."""
    seeder, streamer = cluster.nodes[1], cluster.nodes[0]
    assert seeder.process is not None and streamer.process is not None
    registry_pid = cluster.registry.pid
    assert registry_pid is not None
    path = f"/v2/{REPO}/blobs/{digest}"
    registry_url = f"{cluster.registry.url}{path}"
    ns = f"?ns={cluster.registry_host}"
    times = max(1, -(-sample_bytes // size))
    registry: list[float] = []
    mirror: list[float] = []
    for _ in range(samples):
        registry.append(await _cpu_per_mib(registry_pid, registry_url, size, times))
        mirror.append(
            await _cpu_per_mib(seeder.process.pid, seeder.mirror_url + path + ns, size, times)
        )
    egress0, served0 = cluster.registry_egress, await _swarm_served(streamer)
    stream = await _cpu_per_mib(streamer.process.pid, streamer.mirror_url + path + ns, size)
    registry_ms, mirror_ms = min(registry), min(mirror)
    return {
        "registry_cpu_ms_per_mib": registry_ms,
        "mirror_cpu_ms_per_mib": mirror_ms,
        "mirror_cpu_ratio": mirror_ms / registry_ms,
        "mirror_stream_cpu_ms_per_mib": stream,
        "mirror_stream_cpu_ratio": stream / registry_ms,
        "registry_cpu_ms_per_mib_samples": registry,
        "mirror_cpu_ms_per_mib_samples": mirror,
        "cpu_layer_mib": size / MIB,
        "cpu_sample_mib": times * size / MIB,
        # 1.0 and 0.0: the streamed pull came from the swarm, none of it from the registry.
        "mirror_stream_swarm_fraction": (await _swarm_served(streamer) - served0) / size,
        "mirror_stream_registry_copies": (cluster.registry_egress - egress0) / size,
    }


async def _bench_rss_cpu(
    tmp: Path, small_mib: int, large_mib: int, cpu_samples: int, sample_bytes: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Started as a pod starts them (not forked from a launcher): a pod's memory.
    async with local_cluster(
        tmp / "rss", nodes=2, node_processes=True, fork_nodes=False
    ) as cluster:
        for i, (key, mib) in enumerate((("small", small_mib), ("large", large_mib))):
            size = mib * MIB
            digest = await _push_blob(cluster, tmp, size)
            node = cluster.nodes[i]
            assert node.process is not None
            before = _vm_hwm_mib(node.process.pid)
            cpu_before = cpu_seconds(node.process.pid)
            _, seconds = await _pull(node, cluster, digest, size)
            cpu = cpu_seconds(node.process.pid) - cpu_before
            out[f"rss_mib_{key}"] = _vm_hwm_mib(node.process.pid)
            out[f"rss_mib_{key}_idle"] = before
            out[f"rss_{key}_layer_mib"] = mib
            out[f"rss_{key}_pull_mib_s"] = mib / seconds
            out[f"rss_{key}_swarm_fraction"] = await _swarm_served(node) / size
        # The large layer is complete in nodes[1]'s cache and unknown to nodes[0].
        out["mirror_origin_stream_cpu_ms_per_mib"] = cpu * 1000 / large_mib
        out.update(await _bench_cpu(cluster, digest, large_mib * MIB, cpu_samples, sample_bytes))
    return out


async def _bench(
    ttfb_mib: int, small_mib: int, large_mib: int, cpu_samples: int, sample_bytes: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2pimage-bench-mirror-") as tmp:
        r = await _bench_ttfb(Path(tmp), ttfb_mib)
        r.update(await _bench_rss_cpu(Path(tmp), small_mib, large_mib, cpu_samples, sample_bytes))
    r["cpus"] = os.cpu_count() or 0
    r["loadavg_1m"] = os.getloadavg()[0]
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mirror", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB ttfb, 32/128 MiB rss, 2 CPU samples of 256 MiB"
    )
    parser.add_argument("--ttfb-mib", type=int, default=256)
    parser.add_argument("--rss-mib", type=int, nargs=2, default=[64, 512], metavar=("S", "L"))
    parser.add_argument(
        "--cpu-samples", type=int, default=3, help="CPU samples of registry and mirror each"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    ttfb_mib, (small_mib, large_mib) = args.ttfb_mib, args.rss_mib
    cpu_samples, sample_bytes = args.cpu_samples, CPU_SAMPLE_BYTES
    if args.quick:
        ttfb_mib, small_mib, large_mib, cpu_samples = 64, 32, 128, 2
        sample_bytes = CPU_SAMPLE_BYTES // 2
    r = trio.run(_bench, ttfb_mib, small_mib, large_mib, cpu_samples, sample_bytes)
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
        ("CPU per MiB, registry serving the large layer (ms)", r["registry_cpu_ms_per_mib"], ""),
        ("CPU per MiB, mirror serving it from its cache (ms)", r["mirror_cpu_ms_per_mib"], ""),
        ("  ratio mirror / registry", r["mirror_cpu_ratio"], ""),
        (
            "CPU per MiB, mirror streaming it from the swarm (ms)",
            r["mirror_stream_cpu_ms_per_mib"],
            f"swarm share {r['mirror_stream_swarm_fraction']:.2f}",
        ),
        ("  ratio stream / registry", r["mirror_stream_cpu_ratio"], ""),
        (
            "  stream while the node reads it as origin (ms per MiB)",
            r["mirror_origin_stream_cpu_ms_per_mib"],
            "",
        ),
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
