"""Pair throughput: our seeder → our leecher (auth on) against libtorrent → libtorrent.

All run on loopback in the same invocation, each timed from the first connection
attempt to the verified last byte. Our seeder runs in a child process and our leecher in
this one, so the pair uses both cores, as libtorrent's threads do. Ours runs as nodes
do by default (encrypted) and, for the cost of encryption, with it switched off.

    python -m benchmarks.pair [--size-mib 256] [--runs 3] [--quick] [--json PATH]

JSON keys: ours_mib_s (encrypted, the default), libtorrent_mib_s, ratio (the two
before), ours_plain_mib_s (encryption off), encryption_cost (1 - encrypted / plain);
ours_cpu_ms_per_mib, ours_plain_cpu_ms_per_mib, libtorrent_cpu_ms_per_mib (CPU of both
ends over the transfer, per MiB delivered) and cpu_ratio (ours / libtorrent's);
ours_seed_cpu_ms_per_mib and ours_plain_seed_cpu_ms_per_mib (our seeder's part: in
plaintext it sends by sendfile); medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from rich.table import Table

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import open_peer_node

from ._libtorrent import pair_transfer
from ._util import print_table, write_random_file

MIB = 1024 * 1024
ISSUER = "benchmark-sidecar"


async def _serve_seed(torrent: Path, blob: Path, key_pem: Path, encrypt: bool) -> None:
    meta = Metainfo.from_bytes(torrent.read_bytes())
    issuer = TokenIssuer([SigningKey.from_pem(key_pem.read_bytes())], issuer=ISSUER)
    auth = local_authenticator(issuer, subject="seeder", cluster="bench")
    async with open_peer_node(authenticator=auth, encrypt=encrypt) as node:
        await node.add_swarm(meta, blob.parent, storage=PieceStorage.open_complete(blob, meta))
        cpu0 = time.process_time()
        print(node.listen_address[1], flush=True)
        # Serve until the parent closes our stdin, then report the CPU spent serving.
        await trio.to_thread.run_sync(sys.stdin.read)
        print(time.process_time() - cpu0, flush=True)


async def _leech(
    meta: Metainfo, issuer: TokenIssuer, port: int, directory: Path, encrypt: bool
) -> tuple[float, float]:
    """(seconds to the last verified piece, CPU seconds until the blob is complete)."""
    auth = local_authenticator(issuer, subject="leecher", cluster="bench")
    async with open_peer_node(authenticator=auth, encrypt=encrypt) as node:
        swarm = await node.add_swarm(meta, directory)
        start = trio.current_time()
        cpu0 = time.process_time()
        swarm.add_peers([("127.0.0.1", port)])
        with trio.fail_after(600):
            await swarm.complete.wait()
        cpu = time.process_time() - cpu0
        assert swarm.stats.last_piece_at is not None
        return swarm.stats.last_piece_at - start, cpu


def run_ours(
    meta: Metainfo, torrent: Path, blob: Path, key: SigningKey, tmp: Path, *, encrypt: bool
) -> tuple[float, float, float]:
    """(seconds, CPU seconds of both ends, CPU seconds of the seeder)."""
    key_pem = tmp / "issuer.pem"
    key_pem.write_bytes(key.to_pem())
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.pair",
            "--serve-seed",
            str(torrent),
            str(blob),
            str(key_pem),
            *([] if encrypt else ["--no-encryption"]),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        issuer = TokenIssuer([key], issuer=ISSUER)
        out = tmp / f"leech-{time.monotonic_ns()}"
        seconds, cpu = trio.run(_leech, meta, issuer, port, out, encrypt)
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
    seed_cpu = float(child.stdout.readline())
    got = out / meta.digest_hex
    if not got.exists():
        raise RuntimeError("leecher finished without a complete blob")
    got.unlink()
    return seconds, cpu + seed_cpu, seed_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-seed", nargs=3, metavar=("TORRENT", "BLOB", "KEY"))
    parser.add_argument("--no-encryption", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_seed:
        torrent, blob, key = (Path(p) for p in args.serve_seed)
        trio.run(_serve_seed, torrent, blob, key, not args.no_encryption)
        return 0
    size = (64 if args.quick else args.size_mib) * MIB
    runs = 1 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="p2pimage-pair-") as tmpdir:
        tmp = Path(tmpdir)
        blob = tmp / "blob.bin"
        write_random_file(blob, size)
        meta = create_metainfo_from_file(blob, name="blob.bin")
        torrent = tmp / "blob.torrent"
        torrent.write_bytes(meta.to_bytes())
        key = SigningKey.generate()
        ours: list[float] = []
        plain: list[float] = []
        theirs: list[float] = []
        cpu: dict[str, list[float]] = {
            "ours": [],
            "plain": [],
            "libtorrent": [],
            "ours_seed": [],
            "plain_seed": [],
        }
        for _ in range(runs):  # interleaved, so drift hits all alike
            seconds, cpu_s, seed_s = run_ours(meta, torrent, blob, key, tmp, encrypt=True)
            ours.append(seconds)
            cpu["ours"].append(cpu_s)
            cpu["ours_seed"].append(seed_s)
            seconds, cpu_s, seed_s = run_ours(meta, torrent, blob, key, tmp, encrypt=False)
            plain.append(seconds)
            cpu["plain"].append(cpu_s)
            cpu["plain_seed"].append(seed_s)
            result = pair_transfer(meta.to_bytes(), blob)
            if not result.ok:
                raise RuntimeError("libtorrent transfer did not complete")
            theirs.append(result.seconds)
            cpu["libtorrent"].append(result.cpu_s)
    size_mib = size / MIB
    cpu_ms = {k: 1000 * statistics.median(v) / size_mib for k, v in cpu.items()}
    ours_rate = size_mib / statistics.median(ours)
    plain_rate = size_mib / statistics.median(plain)
    lt_rate = size_mib / statistics.median(theirs)
    report = {
        "size_mib": size_mib,
        "runs": runs,
        "ours_mib_s": round(ours_rate, 1),
        "libtorrent_mib_s": round(lt_rate, 1),
        "ratio": round(ours_rate / lt_rate, 3),
        "ours_plain_mib_s": round(plain_rate, 1),
        "encryption_cost": round(1 - ours_rate / plain_rate, 3),
        "ours_cpu_ms_per_mib": round(cpu_ms["ours"], 2),
        "ours_plain_cpu_ms_per_mib": round(cpu_ms["plain"], 2),
        "libtorrent_cpu_ms_per_mib": round(cpu_ms["libtorrent"], 2),
        "ours_seed_cpu_ms_per_mib": round(cpu_ms["ours_seed"], 2),
        "ours_plain_seed_cpu_ms_per_mib": round(cpu_ms["plain_seed"], 2),
        "cpu_ratio": round(cpu_ms["ours"] / cpu_ms["libtorrent"], 3),
    }
    table = Table(title=f"pair transfer, {size_mib:.0f} MiB over loopback, {runs} run(s)")
    table.add_column("client")
    table.add_column("seconds (each run)")
    table.add_column("MiB/s (median)", justify="right")
    table.add_column("CPU ms/MiB (median)", justify="right")
    rows = (
        ("p2pimage (auth, encrypted)", ours, ours_rate, "ours"),
        ("p2pimage (auth, plaintext)", plain, plain_rate, "plain"),
        ("libtorrent 2.1 (TCP)", theirs, lt_rate, "libtorrent"),
    )
    for label, times, rate, key_ in rows:
        table.add_row(
            label, ", ".join(f"{s:.2f}" for s in times), f"{rate:.1f}", f"{cpu_ms[key_]:.2f}"
        )
    print_table(table)
    print(f"ratio ours/libtorrent: {report['ratio']}; CPU per MiB: {report['cpu_ratio']}")
    print(f"encryption cost: {100 * report['encryption_cost']:.1f}% of plaintext throughput")
    print(
        f"our seeder's part of the CPU per MiB: {report['ours_seed_cpu_ms_per_mib']} encrypted, "
        f"{report['ours_plain_seed_cpu_ms_per_mib']} plaintext (sendfile)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
