"""Tracker announces per second: our tracker (memory and Redis backends, auth on) against
opentracker, on the same machine in the same run.

Each tracker runs in its own process pinned to CPU 0; the load generator runs in a second
process pinned to CPU 1: a raw-socket HTTP/1.1 client over a few keep-alive connections
(reconnecting when a server closes, as opentracker does after every answer), replaying
announces for S swarms x P peers. A first, untimed round (``event=started``) fills the
swarms; the timed rounds are regular re-announces. Our tracker sees a real node token
(one per node, as in a cluster) in ``Authorization: DPoP`` with a fresh proof of
possession per announce (made before the clock starts: the tracker's checks are timed,
the nodes' signing is not); ``memory_open`` repeats the memory run with auth off to show
what token and proof checks cost.

    python -m benchmarks.tracker [--quick] [--swarms 100] [--peers 100] [--rounds 3]
                                 [--connections 8] [--batch 20,5,50,100]
                                 [--only memory,memory_swarm,...,cold] [--json PATH]

``memory_swarm`` sends the same announces batched (p2pimage's ``POST /announce/batch``,
each request carrying ``--batch`` swarms of one node, the first size the headline, each
further size a point of the curve) and counts swarm announces; ``redis_swarm`` does the
same against the Redis backend at the headline size.

JSON keys: memory_announces_s, memory_swarm_announces_s (headline batch size, also
``batch``), memory_swarm_b<N>_announces_s (the other sizes), redis_announces_s,
redis_swarm_announces_s, opentracker_announces_s, memory_open_announces_s (and
*_errors counts). Beside each ``<run>_announces_s``: ``<run>_server_cpu`` and
``<run>_load_cpu``, the CPU the server process and the load generator used over the
timed part (fractions of one core: a server well below 1 on a quiet machine waits for
the generator), and ``<run>_server_cpu_us``, the server's CPU per (swarm) announce.

``cold`` (no server; issue #17) times a cluster's cold start in this process: N first
announces (``event=started``) into one empty swarm through the policy and the in-memory
state, for N in 500, 1,000, 2,000, 5,000 (and 5,000 over 3 zones; the Redis backend at
1,000), as CPU per join: ``cold_start_<N>_us_per_join``, ``cold_start_zoned_us_per_join``,
``redis_cold_start_1000_us_per_join``, and ``cold_start_announces_s``, joins per
CPU-second at 5,000. Flat per-join figures mean a join costs nothing proportional to the
swarm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import trio
from rich.table import Table

from benchmarks._util import print_table
from daemons.testbed.opentracker import opentracker_binary, run_opentracker
from daemons.testbed.process import cpu_seconds, free_port, stop_process
from daemons.testbed.redis import redis_binary, run_redis
from p2pimage.auth.tokens import NodeKey, SigningKey, TokenIssuer, bound_peer_id, create_proof
from p2pimage.tracker import AnnounceRequest, Event, batch_query, encode_announce_batch
from p2pimage.tracker._policy import TrackerPolicy
from p2pimage.tracker._state import MemoryState, RedisState, SwarmKey, TrackerState

ISSUER = "benchmark-sidecar"
# Swarms per batched request in the headline figure: a node in a rollout pulls a new
# image of ~10 layers while it still seeds the ~10 of the version it replaces
# (docs/benchmarks.md, "Batched announces").
HEADLINE_BATCH = 20
RUNS = ("memory", "memory_swarm", "memory_open", "redis", "redis_swarm", "opentracker", "cold")
# Swarm sizes of the cold-start line (``cold``): every peer's first announce into one
# swarm; the Redis backend's at one size (its per-join cost grows with the swarm).
COLD_SIZES = (500, 1_000, 2_000, 5_000)
COLD_REDIS_PEERS = 1_000
SERVER_CPU, LOAD_CPU = 0, 1


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (no-op where affinity is unavailable)."""
    if not hasattr(os, "sched_setaffinity") or cpu >= (os.cpu_count() or 1):
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


# ---------------------------------------------------------------------- load generator


# Peer ids are bound to a key even where the tracker checks no token (opentracker, open
# mode): any key will do there.
_UNAUTHENTICATED_JWK = NodeKey.generate().public_jwk()


def _requests(
    swarms: int, peers: int, event: Event, tokens: list[tuple[str, NodeKey]] | None, port: int
) -> list[bytes]:
    """Raw announces; with ``tokens``, each carries node ``p``'s token and a proof of
    possession made for it here (so signing is not timed; the tracker's check is)."""
    out = []
    now = time.time()
    # Node-major order: consecutive announces go to different swarms, as a cluster's
    # nodes re-announcing their layers do.
    for p in range(peers):
        jwk = tokens[p][1].public_jwk() if tokens is not None else _UNAUTHENTICATED_JWK
        for s in range(swarms):
            info_hash = s.to_bytes(4, "big") * 5
            req = AnnounceRequest(
                info_hash=info_hash,
                peer_id=bound_peer_id(f"node-{p}", jwk, b"-BM0001-", suffix=s.to_bytes(6, "big")),
                port=10000 + p,
                left=0 if p % 10 == 0 else 1_000_000,
                event=event,
            )
            target = f"/announce?{req.to_query().decode()}"
            head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            if tokens is not None:
                token, key = tokens[p]
                url = f"http://127.0.0.1:{port}{target}"
                proof = create_proof(key, method="GET", url=url, token=token, now=now)
                head += f"Authorization: DPoP {token}\r\nDPoP: {proof}\r\n"
            out.append((head + "\r\n").encode())
    return out


def cold_start(peers: int, *, zones: int = 0, redis_port: int | None = None) -> float:
    """CPU seconds (this process's) for ``peers`` first announces (``event=started``,
    leechers, origin bookkeeping on) into one empty swarm through the in-memory state
    (or, with ``redis_port``, the Redis backend), driven in this process: a cluster's cold
    start, where every join changes the swarm (the timed rounds re-announce into warm
    swarms). ``zones`` > 0 spreads the peers over that many zones."""
    policy = TrackerPolicy(rng=random.Random(1))
    key = SwarmKey("bench", b"\x01" * 20)
    reqs = [
        AnnounceRequest(
            info_hash=key.info_hash,
            peer_id=p.to_bytes(20, "big"),
            port=10_000 + p % 50_000,
            left=64 << 20,
            event=Event.STARTED,
            pieces=64,
            digest="sha256:" + "ab" * 32,
            repo="bench/layer",
        )
        for p in range(peers)
    ]
    hosts = [f"10.{p >> 16 & 255}.{p >> 8 & 255}.{p & 255}" for p in range(peers)]
    zone_of = [f"zone-{p % zones}" if zones else None for p in range(peers)]

    async def joins(state: TrackerState) -> float:
        start = time.process_time()
        for p, req in enumerate(reqs):
            await state.update(
                key,
                lambda swarm, req=req, p=p: policy.announce(
                    swarm,
                    req,
                    host=hosts[p],
                    now=1_000.0 + p * 1e-3,
                    zone=zone_of[p],
                    registry_url="http://registry:5000",
                ),
            )
        return time.process_time() - start

    async def run() -> float:
        if redis_port is None:
            return await joins(MemoryState())
        import coredis

        client = coredis.Redis("127.0.0.1", redis_port, decode_responses=False)
        async with client:
            state = RedisState(client, prefix=f"cold{peers}:")
            try:
                return await joins(state)
            finally:
                await state.clear()

    return trio.run(run)


def _batches(
    swarms: int,
    peers: int,
    event: Event,
    tokens: list[tuple[str, NodeKey]],
    port: int,
    batch: int,
) -> list[bytes]:
    """The same announces as :func:`_requests`, as ``POST /announce/batch`` requests
    (p2pimage's extension) of ``batch`` swarms of one node each, with proofs made here."""
    out = []
    now = time.time()
    for p in range(peers):
        token, key = tokens[p]
        jwk = key.public_jwk()
        mine = [
            AnnounceRequest(
                info_hash=s.to_bytes(4, "big") * 5,
                peer_id=bound_peer_id(f"node-{p}", jwk, b"-BM0001-", suffix=s.to_bytes(6, "big")),
                port=10000 + p,
                left=0 if p % 10 == 0 else 1_000_000,
                event=event,
            )
            for s in range(swarms)
        ]
        out += [_batch(mine[i : i + batch], token, key, port, now) for i in range(0, swarms, batch)]
    return out


def _batch(reqs: list[AnnounceRequest], token: str, key: NodeKey, port: int, now: float) -> bytes:
    body = encode_announce_batch(reqs)
    target = f"/announce/batch?{batch_query(body)}"
    url = f"http://127.0.0.1:{port}{target}"
    proof = create_proof(key, method="POST", url=url, token=token, now=now)
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: DPoP {token}\r\nDPoP: {proof}\r\n"
        f"Content-Type: application/x-bittorrent\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _replay(port: int, requests: list[bytes], connections: int) -> tuple[float, int, int]:
    """Send every request once over ``connections`` keep-alive sockets; returns
    (seconds, answered with 200, other answers or failures).

    A server that closes an idle keep-alive connection (opentracker closes after every
    answer without saying so) costs a reconnect and a resend, not an error.
    """
    sel = selectors.DefaultSelector()
    todo = iter(requests)
    ok = bad = 0
    # socket -> [receive buffer, request in flight, sent on a fresh connection]
    state: dict[socket.socket, list[object]] = {}

    def close(sock: socket.socket) -> None:
        sel.unregister(sock)
        del state[sock]
        sock.close()

    def send(req: bytes | None, sock: socket.socket | None = None) -> None:
        if req is None:
            return
        fresh = sock is None
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(sock, selectors.EVENT_READ)
        state[sock] = [bytearray(), req, fresh]
        with contextlib.suppress(OSError):  # a dead connection shows up as EOF
            sock.sendall(req)

    started = time.perf_counter()
    for _ in range(connections):
        send(next(todo, None))
    while state:
        for key, _ in sel.select(timeout=10):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            buf, req, fresh = state[sock]
            assert isinstance(buf, bytearray) and isinstance(req, bytes)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if not data:
                    close(sock)
                    if buf or fresh:
                        bad += 1
                        send(next(todo, None))
                    else:
                        send(req)  # the server had closed this connection: resend
                continue
            head = bytes(buf[:end]).lower()
            length = -1
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if data and (length < 0 or len(buf) < end + 4 + length):
                continue  # more to come (or a body that runs until close)
            if head.startswith((b"http/1.1 200", b"http/1.0 200")):
                ok += 1
            else:
                bad += 1
            if not data or length < 0 or b"connection: close" in head:
                close(sock)
                send(next(todo, None))
            else:
                nxt = next(todo, None)
                if nxt is None:
                    close(sock)
                else:
                    send(nxt, sock)
    return time.perf_counter() - started, ok, bad


def _load_main(
    port: int,
    server_pid: int,
    warmup: list[bytes],
    timed: list[bytes],
    connections: int,
    out: object,
) -> None:
    _pin(os.getpid(), LOAD_CPU)
    _replay(port, warmup, connections)
    server_before, load_before = cpu_seconds(server_pid), time.process_time()
    seconds, ok, bad = _replay(port, timed, connections)
    server_cpu = cpu_seconds(server_pid) - server_before
    load_cpu = time.process_time() - load_before
    out.put((seconds, ok, bad, server_cpu, load_cpu))  # type: ignore[attr-defined]


def measure(
    port: int,
    server_pid: int,
    warmup: list[bytes],
    timed: list[bytes],
    connections: int,
    per_request: float = 1,
) -> dict[str, float]:
    """Announces per second; ``per_request`` swarm announces ride in each request (on
    average).

    Also which side limits the figure: the CPU the server process (``server_pid``) and
    the load generator used over the timed part, as a fraction of one core. A server
    below ~0.95 on a quiet machine is waiting for the generator or for round trips, and
    the figure measures the client; ``server_cpu_us`` (server CPU per announce) stays a
    fair comparison then."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_load_main, args=(port, server_pid, warmup, timed, connections, queue)
    )
    proc.start()
    seconds, ok, bad, server_cpu, load_cpu = queue.get(timeout=600)
    proc.join()
    ok = round(ok * per_request)
    return {
        "announces_s": ok / seconds,
        "errors": bad,
        "seconds": seconds,
        "announces": ok,
        "server_cpu": server_cpu / seconds,
        "server_cpu_us": server_cpu * 1e6 / max(ok, 1),
        "load_cpu": load_cpu / seconds,
    }


# ---------------------------------------------------------------------- the trackers


@contextlib.contextmanager
def our_tracker(tmp: Path, **settings: object) -> Iterator[tuple[int, int]]:
    """A tracker daemon pinned to ``SERVER_CPU``: (its port, its pid)."""
    port = free_port()
    lines = [f'listen = "127.0.0.1:{port}"', 'log_level = "warning"']
    for key, value in settings.items():
        text = json.dumps(str(value)) if isinstance(value, str | Path) else str(value).lower()
        lines.append(f"{key} = {text}")
    config = tmp / f"tracker-{port}.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemons.tracker", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"tracker exited: {err.strip()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1),
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tracker did not start")
            time.sleep(0.1)
        _pin(proc.pid, SERVER_CPU)
        yield port, proc.pid
    finally:
        stop_process(proc, grace=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracker", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 swarms x 50 peers, 1 round")
    parser.add_argument("--swarms", type=int, default=100)
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timed announce rounds")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--batch",
        default=f"{HEADLINE_BATCH},5,50,100",
        help="swarms per batched request, comma-separated; the first is the headline "
        "(memory_swarm_announces_s), each gets memory_swarm_b<N>_announces_s",
    )
    parser.add_argument(
        "--only", default=None, help=f"run only these, comma-separated: {','.join(RUNS)}"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.swarms, args.peers, args.rounds = 20, 50, 1
    batches = [int(b) for b in args.batch.split(",")]
    if not batches or min(batches) < 1 or args.swarms % batches[0]:
        parser.error("--batch: sizes of at least 1, the first dividing --swarms")
    only = set(RUNS if args.only is None else args.only.split(","))
    if only - set(RUNS):
        parser.error(f"--only: unknown {sorted(only - set(RUNS))}")

    issuer = TokenIssuer([SigningKey.generate()], issuer=ISSUER, lifetime_s=3600)
    now = time.time()
    keys = [NodeKey.generate() for _ in range(args.peers)]
    tokens = [
        (
            issuer.issue(subject=f"node-{i}", cluster="bench", node_jwk=key.public_jwk(), now=now),
            key,
        )
        for i, key in enumerate(keys)
    ]
    results: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    cold: dict[str, float] = {}
    if "cold" in only:
        for n in COLD_SIZES:
            cold[f"cold_start_{n}_us_per_join"] = cold_start(n) / n * 1e6
        zoned = cold_start(COLD_SIZES[-1], zones=3)
        cold["cold_start_zoned_us_per_join"] = zoned / COLD_SIZES[-1] * 1e6
        if redis_binary() is not None:
            with run_redis() as redis_port:
                n = COLD_REDIS_PEERS
                cold[f"redis_cold_start_{n}_us_per_join"] = (
                    cold_start(n, redis_port=redis_port) / n * 1e6
                )

    def run(name: str, server: tuple[int, int], auth: bool) -> None:
        port, pid = server
        toks = tokens if auth else None
        warm = _requests(args.swarms, args.peers, Event.STARTED, toks, port)
        # A proof is good once: every round gets its own.
        timed = [
            r
            for _ in range(args.rounds)
            for r in _requests(args.swarms, args.peers, Event.NONE, toks, port)
        ]
        results[name] = measure(port, pid, warm, timed, args.connections)

    def run_batched(name: str, server: tuple[int, int], batch: int) -> None:
        port, pid = server
        warm = _batches(args.swarms, args.peers, Event.STARTED, tokens, port, batch)
        timed = [
            r
            for _ in range(args.rounds)
            for r in _batches(args.swarms, args.peers, Event.NONE, tokens, port, batch)
        ]
        per_request = args.swarms * args.peers * args.rounds / len(timed)
        results[name] = measure(port, pid, warm, timed, args.connections, per_request=per_request)

    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmpdir:
        tmp = Path(tmpdir)
        jwks = tmp / "jwks.json"
        jwks.write_text(json.dumps(issuer.jwks()))
        # Proofs are made before a run starts and a full Redis run lasts ~30 s: widen the
        # freshness window so the last announces are not refused as stale.
        auth = {
            "jwks_file": jwks,
            "issuer": ISSUER,
            "peer_timeout_s": 3600.0,
            "proof_window_s": 300.0,
        }
        if "memory" in only:
            with our_tracker(tmp, **auth) as server:
                run("memory", server, auth=True)
        if "memory_swarm" in only:
            for i, batch in enumerate(batches):
                with our_tracker(tmp, **auth) as server:
                    run_batched(
                        "memory_swarm" if i == 0 else f"memory_swarm_b{batch}", server, batch
                    )
        if "memory_open" in only:
            with our_tracker(tmp, open_mode=True, peer_timeout_s=3600.0) as server:
                run("memory_open", server, auth=False)
        if not only & {"redis", "redis_swarm"}:
            pass
        elif redis_binary() is None:
            skipped["redis"] = skipped["redis_swarm"] = "redis-server not installed"
        else:
            with run_redis() as redis_port:
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
                if "redis" in only:
                    with our_tracker(
                        tmp, backend="redis", redis_url=redis_url, redis_prefix="single:", **auth
                    ) as server:
                        run("redis", server, auth=True)
                if "redis_swarm" in only:
                    with our_tracker(
                        tmp, backend="redis", redis_url=redis_url, redis_prefix="batch:", **auth
                    ) as server:
                        run_batched("redis_swarm", server, batches[0])
        if "opentracker" not in only:
            pass
        elif opentracker_binary() is None:
            skipped["opentracker"] = "opentracker not installed"
        else:
            hashes = [s.to_bytes(4, "big") * 5 for s in range(args.swarms)]
            with run_opentracker(hashes) as ot:
                _pin(ot.process.pid, SERVER_CPU)
                run("opentracker", (ot.port, ot.process.pid), auth=False)

    table = Table(title=f"tracker announces/s: {args.swarms} swarms x {args.peers} peers, "
                  f"{args.rounds} timed round(s), {args.connections} connections")  # fmt: skip
    columns = (
        "tracker",
        "announces/s",
        "announces",
        "errors",
        "seconds",
        "server CPU",
        "server µs/announce",
        "generator CPU",
    )
    for col in columns:
        table.add_column(col, justify="right" if col != "tracker" else "left")
    labels = {
        "memory": "ours, memory, auth on",
        "memory_swarm": f"ours, memory, auth on, batched ({batches[0]} swarms a request)",
        "memory_open": "ours, memory, open mode",
        "redis": "ours, redis, auth on",
        "redis_swarm": f"ours, redis, auth on, batched ({batches[0]} swarms a request)",
        "opentracker": "opentracker",
    }
    for batch in batches[1:]:
        labels[f"memory_swarm_b{batch}"] = f"ours, memory, auth on, batched ({batch} a request)"
    flat: dict[str, object] = {}
    for name, r in results.items():
        table.add_row(
            labels[name],
            f"{r['announces_s']:,.0f}",
            f"{int(r['announces']):,}",
            str(int(r["errors"])),
            f"{r['seconds']:.2f}",
            f"{r['server_cpu']:.0%}",
            f"{r['server_cpu_us']:.1f}",
            f"{r['load_cpu']:.0%}",
        )
        flat[f"{name}_announces_s"] = round(r["announces_s"], 1)
        flat[f"{name}_errors"] = int(r["errors"])
        flat[f"{name}_server_cpu"] = round(r["server_cpu"], 3)
        flat[f"{name}_server_cpu_us"] = round(r["server_cpu_us"], 2)
        flat[f"{name}_load_cpu"] = round(r["load_cpu"], 3)
    for name, why in skipped.items():
        table.add_row(labels[name], "skipped", "", "", why)
        flat[f"{name}_announces_s"] = None
    if results or skipped:
        print_table(table)
    if cold:
        cold_table = Table(title="tracker cold start: first announces into one empty swarm, "
                           "in process (tracker CPU per join)")  # fmt: skip
        cold_table.add_column("backend, peers", justify="left")
        cold_table.add_column("µs per join", justify="right")
        cold_table.add_column("joins per CPU-second", justify="right")
        for name, us in cold.items():
            label = name.removesuffix("_us_per_join").replace("_", " ")
            label = label.replace("zoned", f"{COLD_SIZES[-1]}, 3 zones")
            cold_table.add_row(label, f"{us:,.1f}", f"{1e6 / us:,.0f}")
            flat[name] = round(us, 2)
        flat["cold_start_announces_s"] = round(
            1e6 / cold[f"cold_start_{COLD_SIZES[-1]}_us_per_join"], 1
        )
        print_table(cold_table)
    flat.update(
        {
            "swarms": args.swarms,
            "peers": args.peers,
            "rounds": args.rounds,
            "batch": batches[0],
        }
    )
    if args.json is not None:
        args.json.write_text(json.dumps(flat, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
