"""Runs of pieces per request (``p2pimage_runs``): a node that joins late and fetches a
layer from complete seeds, with runs offered and without, alternating in one invocation.

Seeds and the leecher run in this process (encrypted, authenticated, as nodes do), the
seeds' uplinks and the leecher's downlink capped as in ``benchmarks.swarm``, so the
per-message costs that runs remove show as they do in a swarm. The layer is cut by the
sidecar's rule (a 32 MiB layer: 128 KiB pieces, so runs of 2; 16 MiB: 64 KiB, runs of
4). In a cold-start swarm runs hardly form (a peer seldom holds two consecutive pieces
we lack at the moment we ask): docs/benchmarks.md, "Runs of pieces per request".

    python -m benchmarks.runs [--size-mib 32] [--seeds 2] [--rounds 3] [--quick] [--json PATH]

JSON keys: per variant (``runs``, ``no_runs``) the lists ``seconds``, ``cpu_ms_per_mib``
(CPU of this process, seeds and leecher, per delivered MiB), ``requests`` (request
messages the leecher sent) and ``pieces_in_runs``; ``cpu_ratio`` (median runs / median
no runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from rich.table import Table

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import open_peer_node

from ._util import print_table, write_random_file

MIB = 1024 * 1024


async def _fetch(
    meta: Metainfo, blob: Path, tmp: Path, *, seeds: int, rate: float, runs: bool
) -> tuple[float, float, int, int]:
    """(seconds, CPU seconds, requests sent, pieces asked in runs) for one late joiner."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="bench")
    async with AsyncExitStack() as stack:
        addresses = []
        for i in range(seeds):
            auth = local_authenticator(issuer, subject=f"seed-{i}", cluster="bench")
            node = await stack.enter_async_context(
                open_peer_node(authenticator=auth, upload_rate=rate, runs=runs)
            )
            await node.add_swarm(meta, tmp, storage=PieceStorage.open_complete(blob, meta))
            addresses.append(node.listen_address)
        auth = local_authenticator(issuer, subject="late", cluster="bench")
        leecher = await stack.enter_async_context(
            open_peer_node(authenticator=auth, download_rate=seeds * rate, runs=runs)
        )
        directory = tmp / f"late-{runs}-{time.monotonic_ns()}"
        directory.mkdir()
        swarm = await leecher.add_swarm(meta, directory)
        start, cpu0 = trio.current_time(), time.process_time()
        swarm.add_peers(addresses)
        with trio.fail_after(600):
            await swarm.complete.wait()
        seconds, cpu = trio.current_time() - start, time.process_time() - cpu0
        return seconds, cpu, swarm.stats.requests_sent, swarm.stats.pieces_in_runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rate-mib-s", type=float, default=8, help="each seed's uplink")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 MiB, one round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    size = int((8 if args.quick else args.size_mib) * MIB)
    rounds = 1 if args.quick else args.rounds
    results: dict[str, dict[str, list[float]]] = {
        name: {"seconds": [], "cpu_ms_per_mib": [], "requests": [], "pieces_in_runs": []}
        for name in ("runs", "no_runs")
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        blob = tmp / "layer"
        write_random_file(blob, size)
        meta = create_metainfo_from_file(blob)
        for _ in range(rounds):
            for name, runs in (("no_runs", False), ("runs", True)):
                seconds, cpu, requests, in_runs = trio.run(
                    lambda runs=runs: _fetch(
                        meta, blob, tmp, seeds=args.seeds, rate=args.rate_mib_s * MIB, runs=runs
                    )
                )
                row = results[name]
                row["seconds"].append(round(seconds, 2))
                row["cpu_ms_per_mib"].append(round(cpu * 1000 / (size / MIB), 2))
                row["requests"].append(requests)
                row["pieces_in_runs"].append(in_runs)
    table = Table(
        title=f"late joiner: {size / MIB:g} MiB ({meta.num_pieces} pieces of "
        f"{meta.piece_length // 1024} KiB) from {args.seeds} seeds at "
        f"{args.rate_mib_s:g} MiB/s each"
    )
    for column in ("", "seconds", "CPU ms/MiB", "requests", "pieces in runs"):
        table.add_column(column, justify="right")
    for name, row in results.items():
        table.add_row(
            name,
            ", ".join(f"{v:.2f}" for v in row["seconds"]),
            ", ".join(f"{v:.2f}" for v in row["cpu_ms_per_mib"]),
            ", ".join(f"{v:g}" for v in row["requests"]),
            ", ".join(f"{v:g}" for v in row["pieces_in_runs"]),
        )
    print_table(table)
    ratio = statistics.median(results["runs"]["cpu_ms_per_mib"]) / statistics.median(
        results["no_runs"]["cpu_ms_per_mib"]
    )
    print(f"cpu_ratio (runs / no runs, medians): {ratio:.3f}")
    report: dict[str, Any] = {
        "size_mib": size / MIB,
        "piece_kib": meta.piece_length // 1024,
        "seeds": args.seeds,
        "rate_mib_s": args.rate_mib_s,
        **results,
        "cpu_ratio": round(ratio, 3),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
