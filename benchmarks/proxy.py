"""The node's forward proxy against its mirror: what the proxy path costs a pull.

One node (its own ``p2pimage node`` process, ``proxy_listen`` on) in a
:func:`~daemons.testbed.localcluster.local_cluster` with the real registry, sidecar and
tracker. A random layer (default 256 MiB; ``--quick`` 64) is pushed and pulled once
through the mirror (into the node's cache); then, each the best of three:

- **mirror**: ``GET /v2/.../blobs/D?ns=...`` from the node's mirror (from the cache);
- **proxy**: the same blob as an absolute-form request through the proxy (``GET
  http://REGISTRY/v2/...``), which hands it to the same mirror code;
- **registry**: the blob straight from the registry (no p2pimage), for scale;
- **tunnel**: the registry read through a blind ``CONNECT`` tunnel of the proxy.

Every body is checked against its digest. Also **mint**: the cost of the first
intercepted handshake with a new host (a certificate minted and its TLS context built),
over 50 hosts.

Prints a table; ``--json PATH`` writes ``mirror_mib_s``, ``proxy_mib_s``,
``registry_mib_s``, ``tunnel_mib_s``, ``proxy_vs_mirror``, ``mint_ms`` (and context).
Target: ``proxy_vs_mirror`` >= 0.8 (the proxy adds a relay, not a bottleneck).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks._util import MIB
from benchmarks.mirror import REPO, _push_blob
from daemons.testbed.localcluster import local_cluster
from daemons.testbed.tls import make_ca
from p2pimage.mirror.proxy import HostCertificates

RUNS = 3
TARGET_RATIO = 0.8


async def _httpx_body(url: str, proxy: str | None, params: dict[str, str]) -> AsyncIterator[bytes]:
    async with (
        httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=300) as http,
        http.stream("GET", url, params=params) as r,
    ):
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}")
        async for chunk in r.aiter_raw():
            yield chunk


async def _tunnel_body(proxy: str, registry: str, path: str) -> AsyncIterator[bytes]:
    """``path`` from ``registry`` (host:port, plain HTTP) through a CONNECT tunnel."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"CONNECT {registry} HTTP/1.1\r\nHost: {registry}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
        rest = head.split(b"\r\n\r\n", 1)[1]
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {registry}\r\nConnection: close\r\n\r\n".encode()
        )
        buffer = rest
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(1024 * 1024)
        response_head, body = buffer.split(b"\r\n\r\n", 1)
        if not response_head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"tunnelled GET: {response_head[:80]!r}")
        yield body
        while chunk := await stream.receive_some(1024 * 1024):
            yield chunk


async def _rate(body: Callable[[], AsyncIterator[bytes]], digest: str, size: int) -> float:
    """Best MiB/s of :data:`RUNS` full reads of ``body()``, each checked against ``digest``."""
    best = 0.0
    for _ in range(RUNS):
        h = hashlib.sha256()
        got = 0
        start = time.perf_counter()
        async for chunk in body():
            h.update(chunk)
            got += len(chunk)
        seconds = time.perf_counter() - start
        if got != size or "sha256:" + h.hexdigest() != digest:
            raise RuntimeError(f"wrong bytes ({got} of {size})")
        best = max(best, size / MIB / seconds)
    return best


def _mint_ms(tmp: Path, hosts: int = 50) -> float:
    ca = make_ca(tmp / "mint-ca")
    certs = HostCertificates(ca.cert_file.read_bytes(), ca.key_file.read_bytes())
    start = time.perf_counter()
    for i in range(hosts):
        certs.server_context(f"registry-{i}.example")
    return (time.perf_counter() - start) * 1000 / hosts


async def _bench(size_mib: int) -> dict[str, Any]:
    size = size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="p2pimage-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        async with local_cluster(tmp, nodes=1, node_processes=True, forward_proxy=True) as cluster:
            digest = await _push_blob(cluster, tmp, size)
            node = cluster.nodes[0]
            assert node.proxy_url is not None
            registry = cluster.registry_host
            path = f"/v2/{REPO}/blobs/{digest}"
            ns = {"ns": registry}
            mirror = f"{node.mirror_url}{path}"
            # The first pull fills the node's cache; the measured ones read it.
            await _rate(lambda: _httpx_body(mirror, None, ns), digest, size)
            bodies: dict[str, Callable[[], AsyncIterator[bytes]]] = {
                "mirror": lambda: _httpx_body(mirror, None, ns),
                "proxy": lambda: _httpx_body(f"http://{registry}{path}", node.proxy_url, {}),
                "registry": lambda: _httpx_body(f"{cluster.registry.url}{path}", None, {}),
                "tunnel": lambda: _tunnel_body(node.proxy_url or "", registry, path),
            }
            r: dict[str, Any] = {"size_mib": size_mib}
            for name, body in bodies.items():
                r[f"{name}_mib_s"] = await _rate(body, digest, size)
    r["proxy_vs_mirror"] = r["proxy_mib_s"] / r["mirror_mib_s"]
    with tempfile.TemporaryDirectory(prefix="p2pimage-bench-mint-") as tmp_name:
        r["mint_ms"] = await trio.to_thread.run_sync(_mint_ms, Path(tmp_name))
    r["cpus"] = os.cpu_count() or 0
    r["loadavg_1m"] = os.getloadavg()[0]
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 64 MiB layer")
    parser.add_argument("--mib", type=int, default=256, help="layer size")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    r = trio.run(_bench, 64 if args.quick else args.mib)
    ok = r["proxy_vs_mirror"] >= TARGET_RATIO
    print(f"node forward proxy: {r['size_mib']} MiB cached layer, best of {RUNS}")
    print(f"{'measure':<52} {'value':>9}  target")
    rows: list[tuple[str, float, str]] = [
        ("mirror, from the cache (MiB/s)", r["mirror_mib_s"], ""),
        ("proxy, absolute-form GET, same blob (MiB/s)", r["proxy_mib_s"], ""),
        (
            "  proxy / mirror",
            r["proxy_vs_mirror"],
            f">= {TARGET_RATIO} {'ok' if ok else 'MISSED'}",
        ),
        ("registry directly (MiB/s)", r["registry_mib_s"], ""),
        ("registry through a blind CONNECT tunnel (MiB/s)", r["tunnel_mib_s"], ""),
        ("first interception of a new host: mint (ms)", r["mint_ms"], ""),
    ]
    for name, value, target in rows:
        print(f"{name:<52} {value:>9.2f}  {target}")
    print(f"cpus {r['cpus']}, load average {r['loadavg_1m']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
