"""CPU of the peer data path's parts on loopback TCP, each alone (issue #15).

- send: one PeerSession's writer sends blocks of a complete blob to a socket that a
  thread drains, by sendfile (file regions) or read and batched (pread, one send_all per
  write batch), for several block sizes: where sendfile pays (``SENDFILE_MIN_BLOCK``);
- receive: one PeerSession's ``receive_batch`` parses piece messages that a thread
  writes into the socket (recv_into one reusable buffer);
- records: the AEAD record layer alone, sealing 512 KiB write batches (joined and sealed
  into new buffers, or sealed from their chunks into one reused buffer as the session's
  writer does) and opening them in 256 KiB reads;
- control: one have at a time from a session's writer to another session's reader, both
  authenticated and encrypted, in one trio loop (a swarm's most frequent event: a small
  message that is one write, one wake-up and one read), CPU µs and trio task steps per
  message.

CPU is that of the trio thread (``time.thread_time``: user and system), per MiB.

    python -m benchmarks.wire_path [--mib 256] [--runs 2] [--quick] [--json PATH]

JSON keys: ``send_ms_per_mib`` ({"sendfile"|"read": {block KiB: ms}}),
``receive_ms_per_mib``, ``seal_ms_per_mib``, ``seal_reused_ms_per_mib``,
``open_ms_per_mib``, ``control_us_per_message`` (best of the runs),
``control_steps_per_message``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio
from rich.table import Table

from p2pimage.auth.tokens import SigningKey, TokenIssuer, local_authenticator
from p2pimage.metainfo.torrent import create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.swarm.session import PeerSession, make_connection, new_peer_id
from p2pimage.wire import (
    MAX_BLOCK_LENGTH_LIMIT,
    NEED_DATA,
    Extended,
    HandshakeReceived,
    Piece,
    Role,
)
from p2pimage.wire import PeerConnection as Connection
from p2pimage.wire._crypto import RecordReader, RecordWriter, sealed_length

from ._util import print_table, write_random_file

MIB = 1024 * 1024
BLOCK_KIB = (16, 32, 64, 128, 256)


async def _session_pair() -> tuple[PeerSession, Connection, trio.SocketStream]:
    """An open-mode session on one end of a loopback TCP connection, a bare protocol
    object (handshaken) for the other end, and that end's stream."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        ours = await trio.open_tcp_stream(*listener.socket.getsockname()[:2])
        theirs = await listener.accept()
    a = make_connection(
        Role.INITIATOR, peer_id=new_peer_id(), info_hash=bytes(20), authenticator=None
    )
    b = Connection(
        Role.RESPONDER,
        peer_id=new_peer_id(),
        authenticator=None,
        open_mode=True,
        max_block_length=MAX_BLOCK_LENGTH_LIMIT,
    )
    a.num_pieces = 1 << 20
    for sender, receiver, stream in ((a, b, theirs), (b, a, ours), (a, b, theirs)):
        await (ours if sender is a else theirs).send_all(sender.data_to_send())
        receiver.receive_data(await stream.receive_some())
        while (event := receiver.next_event()) is not NEED_DATA:
            if isinstance(event, HandshakeReceived) and receiver is b:
                b.accept(num_pieces=1 << 20)
    return PeerSession(ours, a, address=("127.0.0.1", 0)), b, theirs


def _blocking_twin(stream: trio.SocketStream) -> socket.socket:
    raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
    raw.setblocking(True)
    return raw


async def _send(store: PieceStorage, block: int, total: int, by_file: bool) -> float:
    session, _, theirs = await _session_pair()
    raw = _blocking_twin(theirs)

    def drain() -> None:
        buf = bytearray(MIB)
        while raw.recv_into(buf):
            pass

    thread = threading.Thread(target=drain)
    thread.start()
    meta = store.metainfo
    per_piece = max(1, meta.piece_length // block)
    cpu0 = time.thread_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run_writer)
        for k in range(total // block):
            index, begin = (k // per_piece) % meta.num_pieces, (k % per_piece) * block
            length = min(block, meta.piece_size(index) - begin)
            await session.wait_queue_below(MIB)
            if by_file:
                offset = store.block_offset(index, begin, length)
                session.send_piece_from_file(index, begin, store, offset, length)
            else:
                session.send(Piece(index, begin, store.read_block(index, begin, length)))
        await session.wait_queue_below(0)
        cpu = time.thread_time() - cpu0
        nursery.cancel_scope.cancel()
    await session.aclose()
    await theirs.aclose()
    thread.join()
    raw.close()
    return 1000 * cpu / (total / MIB)


async def _receive(total: int, block: int = 128 * 1024) -> float:
    session, peer, theirs = await _session_pair()
    raw = _blocking_twin(theirs)
    data = os.urandom(block)
    burst = b"".join(peer.piece_header(i, 0, block) + data for i in range(8))

    def write() -> None:
        for _ in range(total // len(data) // 8):
            raw.sendall(burst)

    thread = threading.Thread(target=write)
    cpu0 = time.thread_time()
    thread.start()
    got = 0
    while got < total:
        for message in await session.receive_batch():
            assert isinstance(message, Piece)
            got += len(message.data)
    cpu = time.thread_time() - cpu0
    thread.join()
    raw.close()
    await session.aclose()
    await theirs.aclose()
    return 1000 * cpu / (total / MIB)


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def _control(count: int) -> tuple[float, float]:
    """(CPU µs, task steps) per have sent alone from one encrypted session to another,
    the next only once the last has been read (the driving task's own wake-up counted)."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="bench", lifetime_s=3600)
    auth = [local_authenticator(issuer, subject=f"n{i}", cluster="c") for i in range(2)]
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        ours = await trio.open_tcp_stream(*listener.socket.getsockname()[:2])
        theirs = await listener.accept()
    sessions = []
    for stream, role, a in ((ours, Role.INITIATOR, auth[0]), (theirs, Role.RESPONDER, auth[1])):
        conn = make_connection(
            role,
            peer_id=a.peer_id(),
            info_hash=bytes(20) if a is auth[0] else None,
            authenticator=a,
        )
        conn.num_pieces = 1 << 16
        # Limited as a node's links are (never low enough to hold a have back).
        sessions.append(
            PeerSession(
                stream,
                conn,
                address=("127.0.0.1", 0),
                upload=RateLimiter(1 << 30),
                download=RateLimiter(1 << 30),
            )
        )
    sender, receiver = sessions
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.handshake)
        await receiver.handshake(accept=lambda info_hash: True)
    steps = _Steps()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run_writer)
        await trio.sleep(0.05)
        trio.lowlevel.add_instrument(steps)
        cpu0 = time.thread_time()
        for index in range(count):
            sender.send_have(index % (1 << 16))
            (message,) = await receiver.receive_batch()
            assert isinstance(message, Extended)
        cpu = time.thread_time() - cpu0
        trio.lowlevel.remove_instrument(steps)
        nursery.cancel_scope.cancel()
    for session in sessions:
        await session.aclose()
    return 1e6 * cpu / count, steps.steps / count


def _records(total: int) -> tuple[float, float, float]:
    """(seal, seal into a reused buffer, open) ms per MiB. Each sealed batch of the first
    is joined and sealed into new buffers, both dropped before the next batch: what the
    allocator then does with the freed buffers (here: give them back to the kernel, and
    fault them in again) is part of the cost. The second seals the batch's chunks into
    one buffer kept throughout, as the session's writer does."""
    key = os.urandom(32)
    batch = [os.urandom(13) if i % 2 == 0 else os.urandom(128 * 1024) for i in range(8)]
    batches = max(1, total // sum(map(len, batch)))
    mib = batches * sum(map(len, batch)) / MIB
    writer = RecordWriter(key)
    cpu0 = time.thread_time()
    for _ in range(batches):
        sealed = writer.seal(b"".join(batch))
        del sealed
    seal = 1000 * (time.thread_time() - cpu0) / mib
    out = bytearray(sealed_length(sum(map(len, batch))))
    cpu0 = time.thread_time()
    for _ in range(batches):
        writer.seal_into(out, batch)
    reused = 1000 * (time.thread_time() - cpu0) / mib
    again = RecordWriter(key)  # the same records, kept this time, for the reader
    wire = memoryview(b"".join([again.seal(b"".join(batch)) for _ in range(batches)]))
    reader = RecordReader(key)
    cpu0 = time.thread_time()
    step = 256 * 1024
    opened = sum(len(reader.feed(wire[o : o + step])) for o in range(0, len(wire), step))
    assert opened == mib * MIB
    return seal, reused, 1000 * (time.thread_time() - cpu0) / mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="bytes moved per measurement")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32 MiB, one run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    total = (32 if args.quick else args.mib) * MIB
    runs = 1 if args.quick else args.runs
    send: dict[str, dict[int, float]] = {"sendfile": {}, "read": {}}
    with tempfile.TemporaryDirectory(prefix="p2pimage-wire-path-") as tmp:
        blob = Path(tmp) / "blob"
        write_random_file(blob, 64 * MIB)
        meta = create_metainfo_from_file(blob, piece_length=256 * 1024)
        with PieceStorage.open_complete(blob, meta) as store:
            for _ in range(runs):  # interleaved, so drift hits all alike
                for kib in BLOCK_KIB:
                    for mode in ("sendfile", "read"):
                        ms = trio.run(_send, store, kib * 1024, total, mode == "sendfile")
                        send[mode][kib] = min(send[mode].get(kib, ms), ms)
    receive = min(trio.run(_receive, total) for _ in range(runs))
    records = [_records(total) for _ in range(runs)]
    control = [trio.run(_control, 2_000 if args.quick else 20_000) for _ in range(runs)]
    report = {
        "mib": total / MIB,
        "runs": runs,
        "send_ms_per_mib": {m: {k: round(v, 3) for k, v in d.items()} for m, d in send.items()},
        "receive_ms_per_mib": round(receive, 3),
        "seal_ms_per_mib": round(min(r[0] for r in records), 3),
        "seal_reused_ms_per_mib": round(min(r[1] for r in records), 3),
        "open_ms_per_mib": round(min(r[2] for r in records), 3),
        "control_us_per_message": round(min(c[0] for c in control), 1),
        "control_steps_per_message": round(min(c[1] for c in control), 2),
    }
    table = Table(title=f"peer data path, CPU ms per MiB of the trio thread ({runs} run(s), best)")
    table.add_column("part")
    for kib in BLOCK_KIB:
        table.add_column(f"{kib} KiB", justify="right")
    for mode, label in (("sendfile", "send by sendfile"), ("read", "send read and batched")):
        table.add_row(label, *(f"{send[mode][kib]:.3f}" for kib in BLOCK_KIB))
    table.add_row("receive (128 KiB pieces)", f"{receive:.3f}", *[""] * (len(BLOCK_KIB) - 1))
    table.add_row("seal (512 KiB batches)", f"{report['seal_ms_per_mib']}", *[""] * 4)
    table.add_row("seal into a reused buffer", f"{report['seal_reused_ms_per_mib']}", *[""] * 4)
    table.add_row("open (256 KiB reads)", f"{report['open_ms_per_mib']}", *[""] * 4)
    control_row = (
        f"{report['control_us_per_message']} µs, {report['control_steps_per_message']} task steps"
    )
    table.add_row("a have, session to session", control_row, *[""] * 4)
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
