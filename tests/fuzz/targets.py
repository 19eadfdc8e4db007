"""The fuzz targets: each takes arbitrary bytes and may raise only the decoder's own error.

Every target is a plain function, so the regression tests and the seed corpus use the same
code as the fuzzer. A target returns normally for accepted input, raises the documented
``RemoteProtocolError`` subclass for garbage, and anything else is a bug.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

from p2pimage.errors import RemoteProtocolError
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.metainfo.torrent import Metainfo, MetainfoBuilder
from p2pimage.oci.notifications import parse_envelope
from p2pimage.tracker import parse_announce, parse_announce_response, parse_scrape
from p2pimage.wire import NEED_DATA, ConnectionClosed, HandshakeReceived, PeerConnection, Role
from p2pimage.wire._crypto import RecordReader, RecordWriter

INFO_HASH = b"\x11" * 20
RECORD_KEY = b"\x22" * 32


def fuzz_bencode(data: bytes) -> None:
    try:
        value = bdecode(data)
    except RemoteProtocolError:
        return
    # What decodes must encode back to the same bytes (canonical form only).
    assert bencode(value) == data


def fuzz_metainfo(data: bytes) -> None:
    try:
        meta = Metainfo.from_bytes(data)
    except RemoteProtocolError:
        return
    assert meta.num_pieces >= 1


def fuzz_tracker_query(data: bytes) -> None:
    for parse in (parse_announce, parse_scrape):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


def fuzz_tracker_response(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_announce_response(data)


def fuzz_webhook(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_envelope(data, "application/json")


def _drive(conn: PeerConnection, data: bytes) -> None:
    # Feed in two chunks (split by the first byte) so chunk boundaries are fuzzed too,
    # then end of stream; stop at the first error or close, as the trio layer does.
    cut = data[0] if data else 0
    chunks = [c for c in (data[:cut], data[cut:]) if c] + [b""]
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if isinstance(event, ConnectionClosed):
                    return
                if event is NEED_DATA:
                    break
                if isinstance(event, HandshakeReceived):
                    conn.accept(num_pieces=64)
        except RemoteProtocolError:
            return


def _valid_handshake() -> bytes:
    initiator = PeerConnection(
        Role.INITIATOR,
        peer_id=b"I" * 20,
        authenticator=None,
        open_mode=True,
        info_hash=INFO_HASH,
    )
    return initiator.data_to_send()


_HANDSHAKE = _valid_handshake()


def fuzz_wire(data: bytes) -> None:
    """An open-mode responder (what a stock peer meets): fuzzed bytes after a valid
    handshake, so the fuzzer spends its time on the message parser."""
    conn = PeerConnection(Role.RESPONDER, peer_id=b"R" * 20, authenticator=None, open_mode=True)
    _drive(conn, _HANDSHAKE + data)


def fuzz_wire_handshake(data: bytes) -> None:
    """The same responder from its first byte: handshake and extended-handshake parsing."""
    conn = PeerConnection(Role.RESPONDER, peer_id=b"R" * 20, authenticator=None, open_mode=True)
    _drive(conn, data)


def fuzz_records(data: bytes) -> None:
    """The encrypted record layer: arbitrary bytes must fail authentication cleanly."""
    reader = RecordReader(RECORD_KEY)
    cut = data[0] if data else 0
    try:
        reader.feed(data[:cut])
        reader.feed(data[cut:])
    except RemoteProtocolError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "bencode": fuzz_bencode,
    "metainfo": fuzz_metainfo,
    "tracker_query": fuzz_tracker_query,
    "tracker_response": fuzz_tracker_response,
    "webhook": fuzz_webhook,
    "wire": fuzz_wire,
    "wire_handshake": fuzz_wire_handshake,
    "records": fuzz_records,
}


def seeds(target: str) -> list[bytes]:
    """Valid inputs for *target*: where the fuzzer starts mutating from."""
    if target == "bencode":
        return [bencode({b"a": [1, -2, b"xyz", {b"k": b""}]}), b"i0e", b"le", b"de"]
    if target == "metainfo":
        blob = os.urandom(40000)
        builder = MetainfoBuilder(len(blob), "sha256:" + "ab" * 32, piece_length=16384)
        builder.update(blob)
        return [builder.finish().to_bytes()]
    if target == "tracker_query":
        return [
            b"info_hash=%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11%11"
            b"&peer_id=-PI0100-abcdefghijkl&port=6881&uploaded=0&downloaded=0&left=100"
            b"&compact=1&event=started&numwant=50",
        ]
    if target == "tracker_response":
        return [
            bencode({b"interval": 30, b"peers": b"\x7f\x00\x00\x01\x1a\xe1", b"complete": 1}),
            bencode({b"failure reason": b"no"}),
        ]
    if target == "webhook":
        event = {
            "id": "1",
            "timestamp": "2026-01-01T00:00:00Z",
            "action": "push",
            "target": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "ab" * 32,
                "repository": "library/app",
                "size": 10,
            },
            "request": {"host": "registry:5000"},
        }
        return [json.dumps({"events": [event]}).encode()]
    if target in ("wire", "wire_handshake"):
        msgs = bytes.fromhex("0000000106") + bytes.fromhex("000000050400000003")
        return [msgs] if target == "wire" else [_HANDSHAKE + msgs]
    if target == "records":
        writer = RecordWriter(RECORD_KEY)
        return [b"\x00" + writer.seal(b"hello") + writer.seal(b"x" * 3000)]
    raise KeyError(target)
