"""Encode+decode throughput of the sans-I/O peer wire for 16 KiB piece messages.

No sockets: one open-mode PeerConnection pair, piece messages encoded by one and parsed by
the other, fed in 256 KiB reads (what the trio layer asks of the socket). Prints a table
and writes JSON (``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import time

from p2pimage.wire import BLOCK_LENGTH as BLOCK
from p2pimage.wire import NEED_DATA, PeerConnection, Piece, Role

READ_SIZE = 256 * 1024


def _open_pair() -> tuple[PeerConnection, PeerConnection]:
    info_hash = b"\x01" * 20
    a = PeerConnection(
        Role.INITIATOR, peer_id=b"A" * 20, authenticator=None, open_mode=True, info_hash=info_hash
    )
    b = PeerConnection(Role.RESPONDER, peer_id=b"B" * 20, authenticator=None, open_mode=True)
    b.receive_data(a.data_to_send())
    b.next_event()
    b.accept()
    a.receive_data(b.data_to_send())
    while a.next_event() is not NEED_DATA:
        pass
    while b.next_event() is not NEED_DATA:  # a's extended handshake, sent after b's bit
        b.receive_data(a.data_to_send())
    return a, b


def run(messages: int, *, header_path: bool) -> dict[str, float]:
    a, b = _open_pair()
    b.receive_data(a.data_to_send())
    while b.next_event() is not NEED_DATA:
        pass
    block = bytes(range(256)) * (BLOCK // 256)
    received = 0
    start = time.perf_counter()
    pending = bytearray()
    for i in range(messages):
        if header_path:
            pending += a.piece_header(i, 0, BLOCK)
            pending += block
        else:
            pending += a.send(Piece(i, 0, block))
        if len(pending) >= READ_SIZE:
            view = memoryview(pending)
            for off in range(0, len(view), READ_SIZE):
                b.receive_data(view[off : off + READ_SIZE])
                while (event := b.next_event()) is not NEED_DATA:
                    assert isinstance(event, Piece), event
                    received += len(event.data)
            view.release()
            pending.clear()
    if pending:  # b"" would mean EOF
        b.receive_data(bytes(pending))
    while (event := b.next_event()) is not NEED_DATA:
        assert isinstance(event, Piece), event
        received += len(event.data)
    elapsed = time.perf_counter() - start
    assert received == messages * BLOCK
    return {
        "messages_per_s": messages / elapsed,
        "mib_per_s": received / elapsed / 2**20,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {
        "send(Piece)": run(args.messages, header_path=False),
        "piece_header()+data": run(args.messages, header_path=True),
    }
    print(f"{'path':<22} {'msgs/s':>10} {'MiB/s':>9}")
    for name, r in results.items():
        print(f"{name:<22} {r['messages_per_s']:>10,.0f} {r['mib_per_s']:>9,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"block": BLOCK, "messages": args.messages, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
