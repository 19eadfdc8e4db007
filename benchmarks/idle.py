"""What an idle node costs: CPU and wake-ups of node processes that hold finished layers.

A fresh :func:`~daemons.testbed.localcluster.local_cluster` (the real registry behind its
capped relay, the sidecar, the tracker, ``--nodes`` node processes) has every node pull an
image of two layers (``--layer-mib`` each) through its mirror, as the README's
``p2pimage cluster`` does; then nothing happens for ``--idle-s`` seconds. On a real fleet
nodes are idle most of the time, each seeding the layers it pulled, connected to the
peers it pulled them with and announcing them to the tracker.

Over the idle window, per node process (``/proc/<pid>/stat`` and ``/proc/<pid>/status``):
``cpu_pct`` (percent of one core: user + system CPU over wall time; the clock ticks are
10 ms, so the mean over the nodes is the figure to read) and ``wakeups_s`` (the main
thread's voluntary context switches per second: each is the event loop going to sleep
and being woken). ``harness_cpu_pct`` is this process: the sidecar, the tracker
(answering the nodes' announces) and the relay.

Prints a table; ``--json PATH`` writes ``node_cpu_pct_mean``, ``node_cpu_pct_max``,
``node_wakeups_s_mean``, ``harness_cpu_pct`` and the inputs. Target (issue #15, the
cluster demo's idle nodes): ``node_cpu_pct_mean`` < 0.2.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.table import Table

from benchmarks._util import MIB, print_table
from daemons.cli.cluster import REPOSITORY, TAG, NodeResult, _pull_all
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.process import cpu_seconds
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient

TARGET_CPU_PCT = 0.2
# After the pulls, before the window: the last announces and the swarms' last ticks.
SETTLE_S = 3.0


def _wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise OSError(f"no context switch count for {pid}")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _bench(nodes: int, layer_mib: float, idle_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2pimage-idle-") as tmp:
        workdir = Path(tmp)
        async with local_cluster(
            workdir / "cluster",
            nodes=nodes,
            registry_rate=8 * MIB,
            node_upload_rate=16 * MIB,
            node_download_rate=16 * MIB,
            node_processes=True,
        ) as cluster:
            image = build_image([int(layer_mib * MIB)] * 2, seed=int(time.time()))
            async with RegistryClient(cluster.registry.url) as client:
                await push_image(client, REPOSITORY, TAG, image)
            ref = f"{cluster.registry_host}/{REPOSITORY}:{TAG}"
            results = [NodeResult(n.name) for n in cluster.nodes]
            use_skopeo = shutil.which("skopeo") is not None
            await _pull_all(cluster, ref, use_skopeo, True, workdir, results)
            failed = [r.error for r in results if r.error]
            if failed:
                raise RuntimeError(f"pulls failed: {failed[:2]}")
            await trio.sleep(SETTLE_S)
            pids = [n.process.pid for n in cluster.nodes if n.process is not None]
            cpu0 = [cpu_seconds(p) for p in pids]
            wake0 = [_wakeups(p) for p in pids]
            own0, t0 = _own_cpu(), trio.current_time()
            await trio.sleep(idle_s)
            wall = trio.current_time() - t0
            own = _own_cpu() - own0
            cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
            wakes = [_wakeups(p) - w for p, w in zip(pids, wake0, strict=True)]
    pct = [100 * c / wall for c in cpu]
    return {
        "nodes": nodes,
        "layer_mib": layer_mib,
        "idle_s": round(wall, 2),
        "client": "skopeo" if use_skopeo else "p2pimage-oci",
        "node_cpu_pct": [round(p, 3) for p in pct],
        "node_cpu_pct_mean": round(sum(pct) / len(pct), 3),
        "node_cpu_pct_max": round(max(pct), 3),
        "node_wakeups_s": [round(w / wall, 2) for w in wakes],
        "node_wakeups_s_mean": round(sum(wakes) / len(wakes) / wall, 2),
        "harness_cpu_pct": round(100 * own / wall, 3),
        "target_cpu_pct": TARGET_CPU_PCT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 nodes, 4 MiB layers, 10 s idle")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--layer-mib", type=float, default=16.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    nodes, layer_mib, idle_s = args.nodes, args.layer_mib, args.idle_s
    if args.quick:
        nodes, layer_mib, idle_s = 4, 4.0, 10.0
    r = trio.run(_bench, nodes, layer_mib, idle_s)
    ok = r["node_cpu_pct_mean"] < TARGET_CPU_PCT
    table = Table(
        title=f"{nodes} idle nodes, each seeding 2 × {layer_mib:g} MiB, over {r['idle_s']} s"
    )
    for column in ("measure", "value", "target"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row(
        "node CPU, mean (% of a core)",
        f"{r['node_cpu_pct_mean']:.3f}",
        f"< {TARGET_CPU_PCT} {'ok' if ok else 'MISSED'}",
    )
    table.add_row("node CPU, max (% of a core)", f"{r['node_cpu_pct_max']:.3f}", "")
    table.add_row("node wake-ups per second, mean", f"{r['node_wakeups_s_mean']:.2f}", "")
    table.add_row("sidecar + tracker + relay (% of a core)", f"{r['harness_cpu_pct']:.3f}", "")
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
