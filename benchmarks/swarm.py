"""Swarm distribution against the Kumar–Ross bound, with libtorrent as the reference.

N p2pimage nodes (auth on) spread over a few worker processes on loopback fetch one layer
of F bytes. Each node has upload/download caps U/D; the real registry sits behind one
shared egress cap R (a throttling TCP relay, not a per-reader limit). k = ceil(0.1·N)
nodes are origin fetchers with disjoint piece ranges covering the layer once, as the
tracker assigns them; the others start from nothing. Every node knows every other node.

The same configuration then runs with libtorrent 2.1 (a seed capped at R standing in for
the registry, N leechers capped at U/D, opentracker, peer classes mapped so the caps
apply on loopback) in the same invocation.

    python -m benchmarks.swarm [--nodes 16] [--size-mib 32] [--origin-mib-s 8]
        [--node-up-mib-s 4] [--node-down-mib-s 4] [--workers 2] [--piece-kib K]
        [--dial-target D] [--no-libtorrent] [--count-steps] [--quick] [--json PATH]

CPU is measured the same way for both: the CPU time (user + system, every thread) of
the processes that run the N nodes, from the moment the transfer starts until the last
node is done. Our nodes run in ``--workers`` processes; libtorrent's N sessions run in one
child process (its main thread, which only polls for completion, is subtracted). The
registry and its stand-in, the throttling relay and the libtorrent seed, are excluded.

JSON keys: nodes, t_all_s, t_bound_s, ratio_to_bound, t_direct_s, registry_copies, cpu_s,
cpu_ms_per_mib (per MiB delivered to the N nodes), libtorrent_t_all_s,
libtorrent_ratio_to_bound, libtorrent_registry_copies, libtorrent_cpu_s,
libtorrent_cpu_ms_per_mib, cpu_ratio (ours / libtorrent's CPU per MiB); and ours in detail:
t_first_s and t_median_s (the first and the median node done), t_origin_s (the last
origin reader done with its range), peers_banned, requests_timed_out,
min_peers_connected (the fewest connections a node still held at the end). With
``--count-steps``, task_steps_per_mib: trio task steps in our worker processes over the
same window, by task kind (session readers and writers, the uploader, the haves and tick
loops, the rest), per delivered MiB: the wake-ups behind the CPU (issue #15; the counting
costs about 1 % more CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.table import Table

from daemons.testbed.registry import start_registry
from daemons.testbed.throttle_proxy import ThrottleProxy
from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.bound import direct_pull_time, kumar_ross_bound
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.oci.registry import RegistryClient
from p2pimage.swarm.engine import SwarmSettings
from p2pimage.swarm.node import open_peer_node
from p2pimage.swarm.origin import OriginReader
from p2pimage.tracker import TrackerPolicy

from ._util import MIB, print_table, write_random_file

ISSUER = "benchmark-sidecar"
REPOSITORY = "bench/layer"


def origin_plan(num_pieces: int, nodes: int) -> list[tuple[int, int, int]]:
    """(node, first, end) for as many fetchers as the tracker's default policy names for
    ``nodes`` peers, with disjoint, covering ranges."""
    k = min(nodes, TrackerPolicy().target_fetchers(nodes))
    bounds = [num_pieces * i // k for i in range(k + 1)]
    # Spread fetchers over the node list so each worker process gets some.
    step = nodes / k
    return [(int(i * step), bounds[i], bounds[i + 1]) for i in range(k)]


# --------------------------------------------------------------------------- worker side


async def _worker(spec: dict[str, Any]) -> None:
    meta = Metainfo.from_bytes(Path(spec["torrent"]).read_bytes())
    issuer = TokenIssuer(
        [SigningKey.from_pem(Path(spec["key"]).read_bytes())], issuer=ISSUER, lifetime_s=3600
    )
    up, down = spec["up"], spec["down"]
    stdin = trio.lowlevel.FdStream(0)
    lines = _lines(stdin)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=60) as http:
        nodes = []
        for index in spec["indices"]:
            auth = local_authenticator(issuer, subject=f"node-{index}", cluster="bench")
            node = await _start_node(nursery, auth, up, down)
            nodes.append((index, node))
        print(json.dumps({"ports": {i: n.port for i, n in nodes}}), flush=True)
        go = json.loads(await lines.__anext__())
        steps = _TaskSteps()
        if spec.get("count_steps"):
            trio.lowlevel.add_instrument(steps)
        cpu_start = _process_cpu_s()
        sys_start = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        peers = [("127.0.0.1", p) for p in go["ports"]]
        start = time.time()
        t_start = trio.current_time()
        swarms = {}
        for index, node in nodes:
            settings = SwarmSettings()
            if spec.get("dial_target"):
                settings.dial_target = spec["dial_target"]
            swarm = await node.add_swarm(
                meta, Path(spec["dir"]) / f"node{index}", settings=settings
            )
            swarms[index] = swarm
        for index, swarm in swarms.items():
            others = [p for p in peers if p[1] != dict(nodes)[index].port]
            random.shuffle(others)
            swarm.add_peers(others, mutual=True)  # a full mesh: every node knows every other
        readers = []
        origin_done: list[float] = []

        async def read_origin(reader: OriginReader) -> None:
            await reader.run()
            origin_done.append(start + trio.current_time() - t_start)

        for index, first, end in go["plan"]:
            if index in swarms:
                reader = OriginReader(swarms[index], spec["origin_url"], first, end, client=http)
                readers.append(reader)
                nursery.start_soon(read_origin, reader)
        for swarm in swarms.values():
            await swarm.complete.wait()
        report = {
            "start": start,
            # trio's clock is monotonic: convert each completion to wall time via `start`.
            "completed": {
                i: start + (s.stats.completed_at or 0.0) - t_start for i, s in swarms.items()
            },
            "registry_bytes": sum(r.bytes_read for r in readers),
            "origin_done": origin_done,
            "origin_failures": [r.failed for r in readers if r.failed],
            "hash_failures": sum(s.stats.hash_failures for s in swarms.values()),
            # The engine's absolute timeouts firing (bans include "no block for
            # stall_timeout_s"), and the connections each node still held at the end.
            "peers_banned": sum(s.stats.peers_banned for s in swarms.values()),
            "requests_timed_out": sum(s.stats.requests_timed_out for s in swarms.values()),
            "peers_connected": [len(s.peers) for s in swarms.values()],
        }
        print(json.dumps(report), flush=True)
        # Keep seeding for the other workers' nodes until every node is done: the CPU
        # window is the whole transfer, as for libtorrent's sessions.
        await lines.__anext__()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {
            "cpu_s": _process_cpu_s() - cpu_start,
            "sys_s": usage.ru_stime - sys_start,
            "task_steps": steps.steps,
        }
        print(json.dumps(cpu), flush=True)
        nursery.cancel_scope.cancel()


class _TaskSteps(trio.abc.Instrument):
    """Counts trio task steps by task kind (:func:`_task_kind`)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        kind = _task_kind(task.name)
        self.steps[kind] = self.steps.get(kind, 0) + 1


def _task_kind(name: str) -> str:
    """A task's kind from its name: a session's reader runs in the task that dialed or
    accepted the connection, its writer in ``run_writer``."""
    for marker, kind in (
        ("run_writer", "session writers"),
        ("Swarm._dial", "session readers"),
        ("_run_handler", "session readers"),
        ("Swarm._uploader", "uploader"),
        ("Swarm._haves_loop", "haves loop"),
        ("Swarm._tick_loop", "tick loop"),
    ):
        if marker in name:
            return kind
    return "other"


def _process_cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _start_node(nursery: trio.Nursery, auth: Any, up: float, down: float) -> Any:
    holder: list[Any] = []

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_peer_node(
            authenticator=auth, upload_rate=up, download_rate=down, handshake_timeout_s=30
        ) as node:
            holder.append(node)
            task_status.started()
            await trio.sleep_forever()

    await nursery.start(run)
    return holder[0]


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data


# --------------------------------------------------------------------------- main side


async def run_ours(
    meta: Metainfo,
    blob: Path,
    tmp: Path,
    nodes: int,
    workers: int,
    origin_rate: float,
    up: float,
    down: float,
    dial_target: int | None = None,
    count_steps: bool = False,
) -> dict[str, Any]:
    """``dial_target``: the swarms' ``SwarmSettings.dial_target`` (None: the default);
    ``count_steps``: count the workers' trio task steps (:class:`_TaskSteps`)."""
    key = SigningKey.generate()
    (tmp / "issuer.pem").write_bytes(key.to_pem())
    torrent = tmp / "layer.torrent"
    torrent.write_bytes(meta.to_bytes())
    async with start_registry() as registry:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob(REPOSITORY, blob.read_bytes())
        host, port = registry.url.removeprefix("http://").split(":")
        proxy = ThrottleProxy((host, int(port)), origin_rate)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            origin_url = f"{proxy.url}/v2/{REPOSITORY}/blobs/{digest}"
            groups = [list(range(nodes))[w::workers] for w in range(workers)]
            procs = []
            for group in groups:
                spec = {
                    "torrent": str(torrent),
                    "key": str(tmp / "issuer.pem"),
                    "indices": group,
                    "up": up,
                    "down": down,
                    "dial_target": dial_target,
                    "count_steps": count_steps,
                    "dir": str(tmp / "nodes"),
                    "origin_url": origin_url,
                }
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "benchmarks.swarm", "--worker", json.dumps(spec)],
                    stdin=-1,
                    stdout=-1,
                )
                procs.append(proc)
            readers = [_lines(p.stdout) for p in procs]  # type: ignore[arg-type]
            ports: list[int] = []
            for lines in readers:
                ports += json.loads(await lines.__anext__())["ports"].values()
            plan = origin_plan(meta.num_pieces, nodes)
            t0 = time.time()
            go = (json.dumps({"ports": ports, "plan": plan}) + "\n").encode()
            for proc in procs:
                assert proc.stdin is not None
                await proc.stdin.send_all(go)
            reports = []
            with trio.fail_after(600):
                for lines in readers:
                    reports.append(json.loads(await lines.__anext__()))
                for proc in procs:
                    assert proc.stdin is not None
                    await proc.stdin.send_all(b"stop\n")
                cpu = [json.loads(await lines.__anext__()) for lines in readers]
            for proc in procs:
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            nursery.cancel_scope.cancel()
    completions = [t for r in reports for t in r["completed"].values()]
    steps: dict[str, int] = {}
    for c in cpu:
        for kind, n in c["task_steps"].items():
            steps[kind] = steps.get(kind, 0) + n
    return {
        "t_all_s": max(completions) - t0,
        "t_first_s": min(completions) - t0,
        "t_median_s": sorted(completions)[len(completions) // 2] - t0,
        # When the last origin reader finished its range (the registry's part done).
        "t_origin_s": max((t for r in reports for t in r["origin_done"]), default=t0) - t0,
        "registry_bytes": proxy.bytes_down,
        "registry_payload_bytes": sum(r["registry_bytes"] for r in reports),
        "cpu_s": sum(c["cpu_s"] for c in cpu),
        "sys_s": sum(c["sys_s"] for c in cpu),
        "hash_failures": sum(r["hash_failures"] for r in reports),
        "peers_banned": sum(r["peers_banned"] for r in reports),
        "requests_timed_out": sum(r["requests_timed_out"] for r in reports),
        "peers_connected": [c for r in reports for c in r["peers_connected"]],
        "origin_failures": [f for r in reports for f in r["origin_failures"]],
        "task_steps": steps,
    }


def run_libtorrent(
    meta: Metainfo, blob: Path, tmp: Path, nodes: int, origin_rate: float, up: float, down: float
) -> dict[str, Any]:
    """The seed (the registry's stand-in) here; the N leechers in one child process."""
    from daemons.testbed.opentracker import run_opentracker

    from ._libtorrent import add, make_session

    torrent = tmp / "layer.torrent"
    torrent.write_bytes(meta.to_bytes())
    with run_opentracker([meta.info_hash]) as tracker:
        seed = make_session(upload_rate=int(origin_rate), throttle_local=True)
        seed_handle = add(
            seed, meta.to_bytes(), blob.parent, seed=True, trackers=[tracker.announce_url]
        )
        spec = {
            "torrent": str(torrent),
            "dir": str(tmp),
            "tracker": tracker.announce_url,
            "nodes": nodes,
            "up": up,
            "down": down,
        }
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.swarm", "--libtorrent-worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            timeout=900,
        )
        sent = seed_handle.status().all_time_upload
        seed.remove_torrent(seed_handle)
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    if result["finished"] < nodes:
        raise RuntimeError(f"libtorrent: only {result['finished']} of {nodes} finished")
    result["registry_bytes"] = sent
    return result


def _libtorrent_leechers(spec: dict[str, Any]) -> None:
    from ._libtorrent import add, make_session

    torrent = Path(spec["torrent"]).read_bytes()
    leechers = []
    for i in range(spec["nodes"]):
        ses = make_session(
            upload_rate=int(spec["up"]), download_rate=int(spec["down"]), throttle_local=True
        )
        out = Path(spec["dir"]) / f"lt{i}"
        out.mkdir()
        leechers.append((ses, add(ses, torrent, out, seed=False, trackers=[spec["tracker"]])))
    t0 = time.monotonic()
    cpu0, poll0 = time.process_time(), time.thread_time()
    done: dict[int, float] = {}
    while len(done) < len(leechers) and time.monotonic() - t0 < 600:
        for i, (_, handle) in enumerate(leechers):
            if i not in done and handle.status().is_seeding:
                done[i] = time.monotonic() - t0
        time.sleep(0.02)
    # libtorrent's own threads only: this (polling) thread's time is taken out.
    cpu_s = (time.process_time() - cpu0) - (time.thread_time() - poll0)
    for ses, handle in leechers:
        ses.remove_torrent(handle)
    print(
        json.dumps(
            {"t_all_s": max(done.values(), default=0.0), "finished": len(done), "cpu_s": cpu_s}
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--size-mib", type=float, default=32)
    parser.add_argument("--origin-mib-s", type=float, default=8)
    parser.add_argument("--node-up-mib-s", type=float, default=4)
    parser.add_argument("--node-down-mib-s", type=float, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--piece-kib", type=int, help="piece length (default: the sidecar's choice for the size)"
    )
    parser.add_argument(
        "--dial-target", type=int, help="SwarmSettings.dial_target (default: the engine's)"
    )
    parser.add_argument("--no-libtorrent", action="store_true")
    parser.add_argument(
        "--count-steps", action="store_true", help="count our workers' trio task steps by kind"
    )
    parser.add_argument("--quick", action="store_true", help="8 nodes, 8 MiB")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--libtorrent-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        trio.run(_worker, json.loads(args.worker))
        return 0
    if args.libtorrent_worker:
        _libtorrent_leechers(json.loads(args.libtorrent_worker))
        return 0
    if args.quick:
        args.nodes, args.size_mib = 8, 8
    size = int(args.size_mib * MIB)
    origin, up, down = (
        args.origin_mib_s * MIB,
        args.node_up_mib_s * MIB,
        args.node_down_mib_s * MIB,
    )
    with tempfile.TemporaryDirectory(prefix="p2pimage-swarm-") as tmpdir:
        tmp = Path(tmpdir)
        blob = tmp / "layer.bin"
        write_random_file(blob, size)
        meta = create_metainfo_from_file(
            blob, piece_length=args.piece_kib * 1024 if args.piece_kib else None
        )
        ours = trio.run(
            run_ours,
            meta,
            blob,
            tmp,
            args.nodes,
            args.workers,
            origin,
            up,
            down,
            args.dial_target,
            args.count_steps,
        )
        lt = (
            None
            if args.no_libtorrent
            else run_libtorrent(meta, blob, tmp, args.nodes, origin, up, down)
        )
    bound = kumar_ross_bound(size, args.nodes, origin, up, down)
    delivered_mib = args.nodes * size / MIB
    report: dict[str, Any] = {
        "nodes": args.nodes,
        "size_mib": args.size_mib,
        "piece_kib": meta.piece_length // 1024,
        "t_all_s": round(ours["t_all_s"], 2),
        "t_bound_s": round(bound, 2),
        "ratio_to_bound": round(ours["t_all_s"] / bound, 3),
        "t_direct_s": round(direct_pull_time(size, args.nodes, origin), 2),
        "registry_copies": round(ours["registry_bytes"] / size, 3),
        "cpu_s": round(ours["cpu_s"], 2),
        "cpu_ms_per_mib": round(1000 * ours["cpu_s"] / delivered_mib, 2),
        "cpu_sys_s": round(ours["sys_s"], 2),
        "t_first_s": round(ours["t_first_s"], 2),
        "t_median_s": round(ours["t_median_s"], 2),
        "t_origin_s": round(ours["t_origin_s"], 2),
        "peers_banned": ours["peers_banned"],
        "requests_timed_out": ours["requests_timed_out"],
        "min_peers_connected": min(ours["peers_connected"], default=0),
    }
    if args.count_steps:
        report["task_steps_per_mib"] = {
            kind: round(n / delivered_mib, 1)
            for kind, n in sorted(ours["task_steps"].items(), key=lambda kv: -kv[1])
        }
    if lt is not None:
        report["libtorrent_t_all_s"] = round(lt["t_all_s"], 2)
        report["libtorrent_ratio_to_bound"] = round(lt["t_all_s"] / bound, 3)
        report["libtorrent_registry_copies"] = round(lt["registry_bytes"] / size, 3)
        report["libtorrent_cpu_s"] = round(lt["cpu_s"], 2)
        report["libtorrent_cpu_ms_per_mib"] = round(1000 * lt["cpu_s"] / delivered_mib, 2)
        report["cpu_ratio"] = round(ours["cpu_s"] / lt["cpu_s"], 3)
    table = Table(
        title=(
            f"{args.nodes} nodes, {args.size_mib:g} MiB layer, "
            f"registry {args.origin_mib_s:g} MiB/s, "
            f"nodes {args.node_up_mib_s:g}/{args.node_down_mib_s:g} MiB/s up/down"
        )
    )
    for col in ("", "all done (s)", "× bound", "registry copies", "CPU s", "CPU ms/MiB"):
        table.add_column(col, justify="right")
    table.add_row("Kumar–Ross bound", f"{bound:.2f}", "1.00", "", "", "")
    table.add_row(
        "p2pimage",
        f"{ours['t_all_s']:.2f}",
        f"{report['ratio_to_bound']:.2f}",
        f"{report['registry_copies']:.2f}",
        f"{report['cpu_s']:.2f}",
        f"{report['cpu_ms_per_mib']:.2f}",
    )
    if lt is not None:
        table.add_row(
            "libtorrent 2.1",
            f"{lt['t_all_s']:.2f}",
            f"{report['libtorrent_ratio_to_bound']:.2f}",
            f"{report['libtorrent_registry_copies']:.2f}",
            f"{report['libtorrent_cpu_s']:.2f}",
            f"{report['libtorrent_cpu_ms_per_mib']:.2f}",
        )
    table.add_row(
        "direct pulls (N·F/R)",
        f"{report['t_direct_s']:.2f}",
        f"{report['t_direct_s'] / bound:.2f}",
        f"{args.nodes}",
        "",
        "",
    )
    print_table(table)
    print(
        f"cpu_ratio (ours / libtorrent, per MiB): {report.get('cpu_ratio', 'n/a')}; "
        f"hash failures: {ours['hash_failures']}; "
        f"origin failures: {ours['origin_failures'] or 'none'}"
    )
    if args.count_steps:
        per_mib = report["task_steps_per_mib"]
        print(
            f"trio task steps per delivered MiB: {sum(per_mib.values()):.1f} ("
            + ", ".join(f"{kind} {n}" for kind, n in per_mib.items())
            + ")"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
