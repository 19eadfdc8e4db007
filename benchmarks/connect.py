"""What one peer connection's set-up costs: dial, TCP connect, handshake, first messages.

Two authenticated, encrypting nodes in this process on loopback, the acceptor seeding a
small layer. Each round, the dialer runs ``PeerNode.dial`` (TCP connect, 68-byte
handshakes, X25519 exchange, extended handshakes, auth messages with token checks both
ways) and closes the session once the acceptor's swarm has adopted its side (bitfield,
the peer's tasks). Both ends run in this process, so the CPU time is both sides' cost.
A second table row is a *duplicate dial*: the dialer stops after the 68-byte handshake
because it already holds that peer (what ``Swarm._named`` does), the cost a node pays
for each dial of a peer it is connected to.

Per side: a trio instrument adds up the CPU time of each task step, the dialing task's
to the dialer, every other task's to the acceptor (its listener, the connection's
handler, the adopted peer's tasks; the dialer's session runs no task of its own), and
what runs between task steps (the scheduler, epoll) to the loop.

Prints a table and writes JSON (``--json PATH``): ``setup_us`` and ``duplicate_us`` (CPU
microseconds per connection, both ends), their wall-clock times, ``*_dialer_us``,
``*_acceptor_us`` and ``*_loop_us`` (the split, measured with the instrument on, so
a little above the totals), and with ``--profile`` the functions with the most
cumulative time per set-up.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.table import Table

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.metainfo.torrent import create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import open_peer_node

from ._util import MIB, print_table, write_random_file

POLL_S = 0.0002


class _SideClock(trio.abc.Instrument):
    """CPU time of task steps: the dialing task's, and every other task's."""

    def __init__(self, dialer: trio.lowlevel.Task) -> None:
        self.dialer_task = dialer
        self.dialer = 0.0
        self.acceptor = 0.0
        self._started = time.thread_time()  # (added in the middle of a dialer step)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        spent = time.thread_time() - self._started
        if task is self.dialer_task:
            self.dialer += spent
        else:
            self.acceptor += spent


async def _rounds(
    directory: Path, rounds: int, profile: cProfile.Profile | None
) -> dict[str, float]:
    blob = directory / "blob"
    write_random_file(blob, 1 * MIB)
    meta = create_metainfo_from_file(blob, name="blob")
    issuer = TokenIssuer([SigningKey.generate()], issuer="bench")
    results: dict[str, float] = {}
    async with (
        open_peer_node(authenticator=local_authenticator(issuer, subject="a", cluster="c")) as a,
        open_peer_node(authenticator=local_authenticator(issuer, subject="b", cluster="c")) as b,
    ):
        swarm = await a.add_swarm(meta, directory, storage=PieceStorage.open_complete(blob, meta))

        async def one(*, duplicate: bool) -> None:
            try:
                session, _ = await b.dial(
                    a.listen_address,
                    meta.info_hash,
                    unwanted=(lambda _: True) if duplicate else None,
                )
            except Exception:
                if duplicate:
                    return
                raise
            # Polled with a short timer, not sleep(0): a checkpoint loop would spin the
            # event loop (epoll with no timeout) while the other side waits for bytes.
            while b.peer_id not in swarm.peers:  # the acceptor's side is adopted
                await trio.sleep(POLL_S)
            await session.aclose("done")
            b.release_connection()
            while b.peer_id in swarm.peers:  # and gone again, before the next round
                await trio.sleep(POLL_S)

        for duplicate in (False, True):
            for _ in range(max(2, rounds // 10)):  # warm-up: caches, imports, first keys
                await one(duplicate=duplicate)
            if profile is not None:
                profile.enable()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                await one(duplicate=duplicate)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if profile is not None:
                profile.disable()
            name = "duplicate" if duplicate else "setup"
            results[f"{name}_us"] = cpu / rounds * 1e6
            results[f"{name}_wall_us"] = wall / rounds * 1e6
            # The split, in rounds of their own: the instrument costs a little itself.
            sides = _SideClock(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(sides)
            cpu = time.thread_time()
            for _ in range(rounds):
                await one(duplicate=duplicate)
            cpu = time.thread_time() - cpu
            trio.lowlevel.remove_instrument(sides)
            results[f"{name}_dialer_us"] = sides.dialer / rounds * 1e6
            results[f"{name}_acceptor_us"] = sides.acceptor / rounds * 1e6
            results[f"{name}_loop_us"] = (cpu - sides.dialer - sides.acceptor) / rounds * 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="100 rounds")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured rounds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rounds = 100 if args.quick else args.rounds
    profile = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        results = trio.run(_rounds, Path(tmp), rounds, profile)
    table = Table(title=f"peer connection set-up, both ends, {rounds} rounds")
    columns = ("connection", "CPU µs", "wall µs", "dialer µs", "acceptor µs", "loop µs")
    for column in columns:
        table.add_column(column, justify="right" if column != "connection" else "left")
    for label, name in (("full set-up", "setup"), ("duplicate dial", "duplicate")):
        table.add_row(
            label,
            *(
                f"{results[f'{name}{part}_us']:,.0f}"
                for part in ("", "_wall", "_dialer", "_acceptor", "_loop")
            ),
        )
    print_table(table)
    report: dict[str, Any] = {"rounds": rounds, **results}
    if profile is not None:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
