"""``p2pimage cluster``: the whole system on one machine, and what it is for.

Starts the real registry, the sidecar, the tracker and N node peers (each its own
process) on loopback, builds and pushes an image, then has every node pull it through its
own mirror at the same moment — with skopeo, a real client, where installed — and then
the same N pulls straight from the registry. Prints per-node times, registry egress in
copies of the image, bytes exchanged between peers, and the Kumar–Ross lower bound.

With ``--preheat``, a preheat job (``p2pimage preheat``) first has every node fetch the
image's layers; the report then says what the preheat cost the registry
(``preheat_registry_copies``) and how many layer bytes the later pulls still read from it
(``pull_registry_bytes``, 0 when the preheat did its job).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import httpx
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from daemons._http import client_tls, system_tls
from daemons._run import run_until_signalled
from daemons.cli.preheat import submit_preheat, wait_preheat
from daemons.testbed import netns as _netns
from daemons.testbed.localcluster import LocalCluster, local_cluster
from daemons.testbed.process import cpu_seconds
from p2pimage.bound import kumar_ross_bound
from p2pimage.mirror.runtime_config import write_registries_conf
from p2pimage.oci.image import BuiltImage, build_image, push_image
from p2pimage.oci.registry import RegistryClient

__all__ = ["ClusterParams", "cluster", "run_cluster"]

MIB = 1024 * 1024
REPOSITORY = "p2pimage/demo"
TAG = "v1"


@dataclass
class ClusterParams:
    nodes: int = 8
    layer_mib: list[float] = field(default_factory=lambda: [16.0, 16.0])
    registry_mib_s: float = 8.0
    node_up_mib_s: float = 16.0
    node_down_mib_s: float = 16.0
    client: str = "auto"  # skopeo | oci | auto
    direct: bool = True
    workdir: Path | None = None
    network: Literal["loopback", "netns"] = "loopback"
    tls: bool = False  # control plane over HTTPS (throwaway CA)
    preheat: bool = False  # preheat every node first, then pull


class NetnsNotPermitted(click.ClickException):
    """``--network netns`` where namespaces, veth or tc are not permitted (exit code 2)."""

    exit_code = 2


@dataclass
class NodeResult:
    name: str
    seconds: float = math.nan
    ttfb_s: float | None = None
    digest: str = ""
    error: str | None = None


def check_netns() -> None:
    """Raise :class:`NetnsNotPermitted` (exit code 2) unless namespace mode can run here."""
    problem = _netns.permission_problem()
    if problem is not None:
        raise NetnsNotPermitted(
            f"--network netns is not available here: {problem}. "
            "Run as root on Linux with iproute2, or use --network loopback."
        )


# --------------------------------------------------------------------------- clients


async def skopeo_pull(
    ref: str, dest: Path, registries_conf: Path, prefix: Sequence[str] = ()
) -> str:
    """``skopeo copy docker://REF oci:DEST``; returns the pulled manifest digest.
    ``prefix`` (e.g. ``ip netns exec NS``) runs it on another host (namespace)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = await trio.run_process(
        [
            *prefix,
            "skopeo",
            "--registries-conf",
            str(registries_conf),
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{ref}",
            f"oci:{dest}:{TAG}",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo: {proc.stderr.decode(errors='replace').strip()[-500:]}")
    index = json.loads((dest / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


async def oci_pull(base_url: str, repository: str, tag: str) -> str:
    """Pull manifest, config and layers with the project's own client, verifying digests."""
    async with RegistryClient(base_url, timeout=600) as client:
        manifest = await client.get_manifest(repository, tag)
        for blob in manifest.blobs():
            async with client.open_blob(repository, blob.digest) as stream:
                async for _ in stream.chunks():
                    pass
        return manifest.digest


async def oci_pull_in(prefix: Sequence[str], base_url: str, repository: str, tag: str) -> str:
    """:func:`oci_pull` in a child process started with ``prefix`` (a node's namespace)."""
    code = (
        "import sys, trio\n"
        "from daemons.cli.cluster import oci_pull\n"
        "print(trio.run(oci_pull, *sys.argv[1:]))"
    )
    proc = await trio.run_process(
        [*prefix, sys.executable, "-c", code, base_url, repository, tag],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"oci pull: {lines[-1][-280:]}")
    return proc.stdout.decode().strip().splitlines()[-1]


# --------------------------------------------------------------------------- the run


async def _scrape(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        text = (await http.get(f"{url}/metrics", timeout=2)).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("p2pimage_node_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def _ttfb_from_log(log_path: Path) -> float | None:
    """The node's first 'blob served' time to first byte (from its JSON log)."""
    try:
        lines = log_path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if '"blob served"' in line:
            try:
                value = json.loads(line).get("ttfb_s")
            except ValueError:
                continue
            if isinstance(value, int | float):
                return float(value)
    return None


async def _pull_all(
    cluster: LocalCluster,
    image_ref: str,
    use_skopeo: bool,
    via_mirror: bool,
    tmp: Path,
    results: list[NodeResult],
) -> float:
    t0 = trio.current_time()

    async def one(i: int) -> None:
        node = cluster.nodes[i]
        result = results[i]
        try:
            if use_skopeo:
                conf = tmp / f"registries-{i}-{via_mirror}.conf"
                # Direct pulls cross the same capped registry link (the proxy).
                mirror = node.mirror_host if via_mirror else cluster.proxy.url
                write_registries_conf(conf, cluster.registry_host, mirror)
                result.digest = await skopeo_pull(
                    image_ref, tmp / f"pull-{i}-{via_mirror}", conf, node.exec_prefix()
                )
            else:
                base = node.mirror_url if via_mirror else cluster.proxy.url
                if node.netns:  # the client runs on the node's host, as skopeo does
                    result.digest = await oci_pull_in(node.exec_prefix(), base, REPOSITORY, TAG)
                else:
                    result.digest = await oci_pull(base, REPOSITORY, TAG)
        except Exception as exc:  # a failed pull is a result to report, not a crash
            result.error = str(exc)[:300]
        result.seconds = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        for i in range(len(cluster.nodes)):
            nursery.start_soon(one, i)
    return trio.current_time() - t0


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (node processes, skopeo...)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class _CpuSample:
    """CPU seconds so far, by kind of process (see :class:`CpuLedger`)."""

    harness: float  # this process: the sidecar, tracker, relay, push client, display
    reaped: float  # its reaped children: clients (skopeo) at once, nodes and registry at exit
    nodes: float  # the live node processes (/proc)
    registry: float  # the live registry process (/proc)


# The kinds a phase's CPU is split into, as printed and written to JSON.
_KINDS = ("harness", "nodes", "registry", "reaped")


class CpuLedger:
    """The whole run's CPU (``cpu_s``) split into phases and kinds of process.

    Each :meth:`mark` closes a phase. Live node and registry processes are read from
    /proc; the skopeo clients are counted when they are reaped (during the phase that ran
    them); node and registry processes are reaped at teardown, where ``reaped`` is their
    CPU after the last /proc reading (their exit). The phases add up to ``cpu_s``."""

    def __init__(self) -> None:
        self._last = _CpuSample(*_own_and_reaped(), 0.0, 0.0)
        self.phases: dict[str, dict[str, float]] = {}

    def mark(self, phase: str, cluster: LocalCluster | None) -> None:
        harness, reaped = _own_and_reaped()
        nodes, registry = _live_cpu(cluster) if cluster is not None else (0.0, 0.0)
        now = _CpuSample(harness, reaped, nodes, registry)
        before = self._last
        if cluster is None:  # after teardown: what the live processes used until they exited
            now = _CpuSample(harness, reaped, before.nodes, before.registry)
        spent = {
            "harness": now.harness - before.harness,
            "nodes": now.nodes - before.nodes,
            "registry": now.registry - before.registry,
            # Reaped at exit: subtract what /proc already counted for nodes and registry.
            "reaped": now.reaped
            - before.reaped
            - (before.nodes + before.registry if cluster is None else 0.0),
        }
        spent["total"] = sum(spent.values())
        self.phases[phase] = {k: round(v, 2) for k, v in spent.items()}
        self._last = now

    def kinds(self) -> dict[str, float]:
        """Each kind's CPU over the whole run."""
        return {k: round(sum(p[k] for p in self.phases.values()), 2) for k in _KINDS}


def _own_and_reaped() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _live_cpu(cluster: LocalCluster) -> tuple[float, float]:
    """CPU seconds so far of the live node processes and of the registry (/proc); a
    process not started yet or already gone counts 0."""
    pids = [n.process.pid for n in cluster.nodes if n.process is not None]
    if cluster.launcher is not None and cluster.launcher.pid is not None:
        pids.append(cluster.launcher.pid)  # the imports the forked nodes share
    out = []
    for group in (pids, [cluster.registry.pid] if cluster.registry.pid else []):
        total = 0.0
        for pid in group:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        out.append(total)
    return out[0], out[1]


def _nodes_cpu_seconds(cluster: LocalCluster) -> float | None:
    """User + system CPU seconds of the node processes so far (/proc), or None when the
    nodes do not run as processes of their own."""
    total = 0.0
    for node in cluster.nodes:
        if node.process is None:
            return None
        try:
            total += cpu_seconds(node.process.pid)
        except OSError:
            return None
    return total


async def run_cluster(params: ClusterParams, console: Console | None = None) -> dict[str, Any]:
    cpu_before = _cpu_seconds()
    ledger = CpuLedger()
    console = console or Console(stderr=True)
    if params.network == "netns":
        await trio.to_thread.run_sync(check_netns)
    use_skopeo = params.client == "skopeo" or (
        params.client == "auto" and shutil.which("skopeo") is not None
    )
    if params.client == "skopeo" and shutil.which("skopeo") is None:
        raise click.ClickException("skopeo is not installed (Debian package skopeo)")
    if shutil.which("docker-registry") is None:
        raise click.ClickException(
            "the CNCF registry is not installed: apt-get install docker-registry"
        )
    sizes = [int(m * MIB) for m in params.layer_mib]
    image = build_image(sizes, seed=int(time.time()))
    image_bytes = sum(len(layer.data) for layer in image.layers) + len(image.config.data)
    ledger.mark("image", None)
    origin, up, down = (
        params.registry_mib_s * MIB,
        params.node_up_mib_s * MIB,
        params.node_down_mib_s * MIB,
    )
    with tempfile.TemporaryDirectory(prefix="p2pimage-cluster-") as tmpdir:
        tmp = params.workdir or Path(tmpdir)
        async with local_cluster(
            tmp / "cluster",
            nodes=params.nodes,
            registry_rate=origin,
            node_upload_rate=up,
            node_download_rate=down,
            node_processes=True,
            network=params.network,
            tls=params.tls,
            preheat_poll_s=_PREHEAT_POLL_S if params.preheat else None,
        ) as cluster:
            ledger.mark("startup", cluster)
            pushed = await _push(cluster, image)
            ledger.mark("push", cluster)
            preheat: dict[str, Any] | None = None
            if params.preheat:
                preheat = await _preheat(cluster, console)
                ledger.mark("preheat", cluster)
            control_plane = cluster.sidecar_url.partition("://")[0]  # the scheme really used
            ref = f"{cluster.registry_host}/{REPOSITORY}:{TAG}"
            results = [NodeResult(n.name) for n in cluster.nodes]
            egress0 = cluster.registry_egress
            link0 = cluster.topology.registry_link_bytes() if cluster.topology else 0
            nodes_cpu0 = _nodes_cpu_seconds(cluster)
            async with (
                httpx.AsyncClient(verify=system_tls()) as http,
                trio.open_nursery() as nursery,
            ):
                metrics0 = [await _scrape(http, n.mirror_url) for n in cluster.nodes]
                done = trio.Event()
                nursery.start_soon(_progress, console, cluster, http, results, image_bytes, done)
                t_all = await _pull_all(cluster, ref, use_skopeo, True, tmp, results)
                nodes_cpu1 = _nodes_cpu_seconds(cluster)
                done.set()
                metrics = [await _scrape(http, n.mirror_url) for n in cluster.nodes]
            p2p_egress = cluster.registry_egress - egress0
            # netns: what tc let through the registry's capped link (frames, headers too)
            link_bytes = cluster.topology.registry_link_bytes() - link0 if cluster.topology else 0
            for node, result in zip(cluster.nodes, results, strict=True):
                result.ttfb_s = _ttfb_from_log(tmp / "cluster" / node.name / "node.log")
            ledger.mark("p2p_pulls", cluster)
            direct_results = [NodeResult(n.name) for n in cluster.nodes]
            t_direct = math.nan
            if params.direct:
                console.print(
                    f"[bold]now the same {params.nodes} pulls straight from the registry…[/]"
                )
                t_direct = await _pull_all(cluster, ref, use_skopeo, False, tmp, direct_results)
                ledger.mark("direct_pulls", cluster)
    # Uploaded but not counted by any receiver: duplicates and cancelled blocks in flight.
    # Over the pulls only (a preheat before them moved bytes too).
    pairs = list(zip(metrics, metrics0, strict=True))
    uploaded = sum(_delta(m, m0, "p2pimage_node_uploaded_bytes_total") for m, m0 in pairs)
    peer_bytes = sum(
        _delta(m, m0, 'p2pimage_node_fetched_bytes_total{source="peer"}') for m, m0 in pairs
    )
    fallback = sum(
        _delta(m, m0, 'p2pimage_node_fetched_bytes_total{source="registry_fallback"}')
        for m, m0 in pairs
    )
    bound = kumar_ross_bound(image_bytes, params.nodes, origin, up, down)
    ledger.mark("teardown", None)
    cpu_used = _cpu_seconds() - cpu_before
    digests_ok = all(r.digest == pushed and r.error is None for r in results)
    delivered_mib = params.nodes * image_bytes / MIB
    nodes_cpu = (
        nodes_cpu1 - nodes_cpu0 if nodes_cpu0 is not None and nodes_cpu1 is not None else None
    )
    report: dict[str, Any] = {
        "nodes": params.nodes,
        "network": params.network,
        "control_plane": control_plane,
        "image_mib": round(image_bytes / MIB, 2),
        "client": "skopeo" if use_skopeo else "p2pimage-oci",
        "t_all_s": round(t_all, 2),
        "t_bound_s": round(bound, 2),
        "ratio_to_bound": round(t_all / bound, 3),
        "registry_copies": round(p2p_egress / image_bytes, 3),
        "registry_link_copies": round(link_bytes / image_bytes, 3) if link_bytes else None,
        "peer_mib": round(peer_bytes / MIB, 1),
        "peer_wasted_mib": round(max(uploaded - peer_bytes, 0.0) / MIB, 1),
        "fallback_mib": round(fallback / MIB, 1),
        "t_direct_s": round(t_direct, 2),
        "speedup_vs_direct": round(t_direct / t_all, 2) if params.direct else None,
        "cpu_s": round(cpu_used, 1),
        # cpu_s by phase and by kind of process (CpuLedger): they add up to it.
        "cpu_phases": ledger.phases,
        "cpu_kinds": ledger.kinds(),
        # The node processes only, over the p2p pulls: CPU per MiB delivered to the nodes.
        "node_cpu_s": round(nodes_cpu, 2) if nodes_cpu is not None else None,
        "node_cpu_ms_per_mib": (
            round(1000 * nodes_cpu / delivered_mib, 2) if nodes_cpu is not None else None
        ),
        "digests_ok": digests_ok,
        "per_node": [
            {
                "node": r.name,
                "seconds": round(r.seconds, 2),
                "ttfb_s": r.ttfb_s,
                "ok": r.error is None and r.digest == pushed,
                "error": r.error,
            }
            for r in results
        ],
        "direct_errors": [r.error for r in direct_results if r.error],
    }
    if preheat is not None:
        # Layer bytes the nodes read from the registry during the pulls: origin ranges,
        # and direct reads beyond the config blob (below the swarm threshold, it always
        # passes through; one read per node).
        config_bytes = len(image.config.data)
        pull_layer_bytes = sum(
            _delta(m, m0, 'p2pimage_node_fetched_bytes_total{source="origin"}')
            + max(
                0.0,
                _delta(m, m0, 'p2pimage_node_served_bytes_total{source="registry"}') - config_bytes,
            )
            for m, m0 in pairs
        )
        report.update(
            {
                "t_preheat_s": preheat["seconds"],
                # The preheat is the cold distribution here (the pulls read caches).
                "preheat_ratio_to_bound": round(preheat["seconds"] / bound, 3),
                "preheat_nodes_done": preheat["nodes_done"],
                "preheat_registry_copies": round(preheat["egress"] / image_bytes, 3),
                "pull_registry_bytes": int(pull_layer_bytes),
                # Everything the registry sent during the pulls: manifests, the config
                # blob, HEADs of the access checks and HTTP headers included.
                "pull_registry_total_bytes": p2p_egress,
            }
        )
    return report


# The nodes' poll interval for preheat jobs in the demo (a real cluster polls every 30 s).
_PREHEAT_POLL_S = 0.5


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def _preheat(cluster: LocalCluster, console: Console) -> dict[str, Any]:
    """Submit a preheat job for the pushed image and wait until every node reports."""
    console.print(f"[bold]preheating {len(cluster.nodes)} nodes…[/]")
    egress0 = cluster.registry_egress
    t0 = trio.current_time()
    verify = client_tls(cluster.tls.ca_file if cluster.tls else None)
    async with httpx.AsyncClient(timeout=30, verify=verify) as http:
        job, auth = await submit_preheat(
            registry_url=cluster.registry.url,
            image=f"{cluster.registry_host}/{REPOSITORY}:{TAG}",
            repository=REPOSITORY,
            reference=TAG,
            tracker_url=cluster.tracker_url,
            sidecar_url=cluster.sidecar_url,
            credential=cluster.credential,
            http=http,
        )
        job = await wait_preheat(
            tracker_url=cluster.tracker_url,
            job_id=int(job["id"]),
            auth=auth,
            expect_nodes=len(cluster.nodes),
            timeout_s=600,
            http=http,
        )
    if job["nodes_failed"]:
        raise click.ClickException(f"preheat failed on some nodes: {job['errors']}")
    return {
        "seconds": round(trio.current_time() - t0, 2),
        "nodes_done": job["nodes_done"],
        "egress": cluster.registry_egress - egress0,
    }


async def _push(cluster: LocalCluster, image: BuiltImage) -> str:
    async with RegistryClient(cluster.registry.url, timeout=600) as client:
        return await push_image(client, REPOSITORY, TAG, image)


async def _progress(
    console: Console,
    cluster: LocalCluster,
    http: httpx.AsyncClient,
    results: list[NodeResult],
    image_bytes: int,
    done: trio.Event,
) -> None:
    """A live table of every node's progress while the pulls run."""

    def table(metrics: list[dict[str, float]]) -> Table:
        t = Table(title="pulling through the node mirrors", expand=False)
        for col in ("node", "served", "from peers", "from registry", "status"):
            t.add_column(col, justify="right")
        for node, m, r in zip(cluster.nodes, metrics, results, strict=True):
            served = sum(
                v for k, v in m.items() if k.startswith("p2pimage_node_served_bytes_total")
            )
            peer = m.get('p2pimage_node_fetched_bytes_total{source="peer"}', 0.0)
            origin = m.get('p2pimage_node_fetched_bytes_total{source="origin"}', 0.0)
            status = (
                "[red]failed"
                if r.error
                else f"[green]{r.seconds:.1f} s"
                if not math.isnan(r.seconds)
                else "…"
            )
            t.add_row(
                node.name,
                f"{min(served / image_bytes, 1):.0%}",
                f"{peer / MIB:.1f} MiB",
                f"{origin / MIB:.1f} MiB",
                status,
            )
        t.caption = f"registry egress {cluster.registry_egress / image_bytes:.2f} image copies"
        return t

    metrics: list[dict[str, float]] = [{} for _ in cluster.nodes]
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            # A node whose pull is done fetches nothing more: its row stays as last read
            # (each scrape costs the node and this process a few ms).
            for i, (node, result) in enumerate(zip(cluster.nodes, results, strict=True)):
                if not metrics[i] or math.isnan(result.seconds):
                    metrics[i] = await _scrape(http, node.mirror_url)
            live.update(table(metrics))
            if done.is_set():
                return
            with trio.move_on_after(0.5):
                await done.wait()


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"{report['nodes']} nodes pulled a {report['image_mib']} MiB image "
        f"({report['client']}, {report.get('network', 'loopback')})"
    )
    table.add_column("node")
    table.add_column("done after (s)", justify="right")
    table.add_column("first byte (s)", justify="right")
    table.add_column("digest ok")
    for row in report["per_node"]:
        ttfb = "-" if row["ttfb_s"] is None else f"{row['ttfb_s']:.2f}"
        table.add_row(
            row["node"],
            f"{row['seconds']:.2f}",
            ttfb,
            "yes" if row["ok"] else f"NO {row['error'] or ''}",
        )
    console.print(table)
    summary = Table(show_header=False)
    summary.add_column()
    summary.add_column(justify="right")
    summary.add_row("all nodes done (p2p)", f"{report['t_all_s']:.2f} s")
    summary.add_row("Kumar–Ross lower bound", f"{report['t_bound_s']:.2f} s")
    summary.add_row("ratio to bound", f"{report['ratio_to_bound']:.2f}")
    if report.get("preheat_registry_copies") is not None:
        summary.add_row(
            "preheat: all nodes done",
            f"{report['t_preheat_s']:.2f} s ({report['preheat_nodes_done']} nodes)",
        )
        summary.add_row(
            "preheat: registry egress", f"{report['preheat_registry_copies']:.2f} image copies"
        )
        summary.add_row(
            "pulls after it: layer bytes from the registry", str(report["pull_registry_bytes"])
        )
    summary.add_row("registry egress", f"{report['registry_copies']:.2f} image copies")
    if report.get("registry_link_copies") is not None:
        summary.add_row(
            "registry link (tc, with headers)", f"{report['registry_link_copies']:.2f} image copies"
        )
    summary.add_row("bytes between peers", f"{report['peer_mib']:.1f} MiB")
    summary.add_row("uploaded in vain (duplicates)", f"{report['peer_wasted_mib']:.1f} MiB")
    summary.add_row("read directly after fallback", f"{report['fallback_mib']:.1f} MiB")
    if report["speedup_vs_direct"] is not None:
        summary.add_row("same pulls straight from the registry", f"{report['t_direct_s']:.2f} s")
        summary.add_row("speed-up", f"{report['speedup_vs_direct']:.1f}×")
    summary.add_row("CPU used (all processes)", f"{report['cpu_s']:.1f} s")
    if report.get("node_cpu_s") is not None:
        summary.add_row(
            "CPU of the nodes during the pulls",
            f"{report['node_cpu_s']:.1f} s ({report['node_cpu_ms_per_mib']:.1f} ms per MiB)",
        )
    summary.add_row("every node's image digest matches", "yes" if report["digests_ok"] else "NO")
    console.print(summary)
    if report.get("cpu_phases"):
        console.print(_cpu_table(report["cpu_phases"], report["cpu_kinds"]))


_KIND_HEADINGS = {
    "harness": "this process¹",
    "nodes": "nodes",
    "registry": "registry",
    "reaped": "reaped²",
}


def _cpu_table(phases: dict[str, dict[str, float]], kinds: dict[str, float]) -> Table:
    """``cpu_s`` by phase (rows) and kind of process (columns), in CPU seconds."""
    table = Table(
        title="where the CPU went (CPU seconds)",
        caption="¹ sidecar, tracker, registry relay, image build and push, display; "
        "² skopeo clients, and at teardown the nodes' and registry's exit",
    )
    table.add_column("phase")
    for kind in _KINDS:
        table.add_column(_KIND_HEADINGS[kind], justify="right")
    table.add_column("total", justify="right")
    for phase, spent in phases.items():
        table.add_row(phase, *(f"{spent[k]:.2f}" for k in (*_KINDS, "total")))
    table.add_row("all", *(f"{kinds[k]:.2f}" for k in _KINDS), f"{sum(kinds.values()):.2f}")
    return table


def _layer_list(value: str) -> list[float]:
    try:
        sizes = [float(v) for v in re.split(r"[,\s]+", value.strip()) if v]
    except ValueError:
        raise click.BadParameter("layer sizes are MiB numbers, e.g. 16,16") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise click.BadParameter("give at least one positive layer size")
    return sizes


@click.command("cluster")
@click.option("--nodes", "-n", type=click.IntRange(1, 128), default=8, show_default=True)
@click.option(
    "--layers",
    "layers",
    default="16,16",
    show_default=True,
    help="layer sizes in MiB, comma-separated",
)
@click.option(
    "--registry-mib-s",
    type=click.FloatRange(min=0.1),
    default=8.0,
    show_default=True,
    help="registry egress cap",
)
@click.option(
    "--node-up-mib-s",
    type=click.FloatRange(min=0.1),
    default=16.0,
    show_default=True,
    help="per-node upload cap",
)
@click.option(
    "--node-down-mib-s",
    type=click.FloatRange(min=0.1),
    default=16.0,
    show_default=True,
    help="per-node download cap",
)
@click.option(
    "--client",
    type=click.Choice(["auto", "skopeo", "oci"]),
    default="auto",
    show_default=True,
    help="who pulls: skopeo, or p2pimage's own OCI client",
)
@click.option("--no-direct", is_flag=True, help="skip the direct-pull comparison")
@click.option(
    "--network",
    type=click.Choice(["loopback", "netns"]),
    default="loopback",
    show_default=True,
    help="loopback with token-bucket caps, or one network namespace per node with tc-shaped "
    "veth links (root only)",
)
@click.option(
    "--tls",
    is_flag=True,
    help="run the control plane (sidecar, tracker) over HTTPS with a throwaway CA",
)
@click.option(
    "--preheat",
    is_flag=True,
    help="preheat every node first (p2pimage preheat), then pull: reports "
    "preheat_registry_copies and pull_registry_bytes",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="write the report as JSON",
)
def cluster(
    nodes: int,
    layers: str,
    registry_mib_s: float,
    node_up_mib_s: float,
    node_down_mib_s: float,
    client: str,
    no_direct: bool,
    network: Literal["loopback", "netns"],
    tls: bool,
    preheat: bool,
    json_path: Path | None,
) -> None:
    """Run a local cluster (registry, sidecar, tracker, N nodes) and pull an image on
    every node at once, then the same pulls straight from the registry."""
    params = ClusterParams(
        nodes=nodes,
        layer_mib=_layer_list(layers),
        registry_mib_s=registry_mib_s,
        node_up_mib_s=node_up_mib_s,
        node_down_mib_s=node_down_mib_s,
        client=client,
        direct=not no_direct,
        network=network,
        tls=tls,
        preheat=preheat,
    )
    if network == "netns":
        check_netns()  # here, so click reports it (exit code 2) before anything starts
    console = Console()
    report = run_until_signalled(run_cluster, params, console)
    if report is None:
        console.print("[yellow]interrupted: everything stopped[/]")
        sys.exit(130)
    print_report(report, console)
    if json_path is not None:
        flat = {k: v for k, v in report.items() if k not in ("per_node", "direct_errors")}
        json_path.write_text(json.dumps(flat, indent=2) + "\n")
    if not report["digests_ok"]:
        sys.exit(1)
