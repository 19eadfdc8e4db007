"""Encrypted peer connections (``p2pimage_kx``, AES-GCM records) between two in-memory
PeerConnections with the real p2pimage.auth.tokens: what arrives, what an observer sees on the
wire (never a token, in either direction), and what a man in the middle can do (nothing but
break the connection)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.auth.tokens import NodeKey, PeerAuthenticator
from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.wire import (
    NEED_DATA,
    Bitfield,
    ConnectionClosed,
    Have,
    PeerAuthenticated,
    PeerConnection,
    Piece,
    Request,
    Role,
)
from p2pimage.wire._codec import build_extended
from p2pimage.wire._crypto import (
    MAX_RECORD_PLAINTEXT,
    RECORD_OVERHEAD,
    RecordReader,
    RecordWriter,
    kx_public_key,
    sealed_length,
)

from .test_wire_auth import (
    BITFIELD,
    ID_I,
    INFO_HASH,
    KX_I,
    KX_R,
    NONCE_I,
    NONCE_R,
    NUM_PIECES,
    honest_authenticator,
    issue,
)

SECRET = b"secret layer bytes " * 100


def connection(
    role: Role, *, encrypt: bool = True, auth: PeerAuthenticator | None = None
) -> PeerConnection:
    if auth is None:
        key = NodeKey.generate()
        auth = honest_authenticator(key, issue(key))
    if role is Role.INITIATOR:
        return PeerConnection(
            role,
            peer_id=auth.peer_id(),
            authenticator=auth,
            nonce=NONCE_I,
            kx_key=KX_I,
            encrypt=encrypt,
            info_hash=INFO_HASH,
        )
    return PeerConnection(
        role,
        peer_id=auth.peer_id(),
        authenticator=auth,
        nonce=NONCE_R,
        kx_key=KX_R,
        encrypt=encrypt,
    )


@dataclass
class Side:
    """Drives one connection: flushes protocol output, then sends ``payload`` (sealed)
    once open, and records every event."""

    conn: PeerConnection
    payload: list[Any]
    wire: bytearray = field(default_factory=bytearray)
    events: list[Any] = field(default_factory=list)
    sent: bool = False

    def step(self, incoming: bytes) -> None:
        if incoming:
            self.conn.receive_data(incoming)
        while True:
            self.wire += self.conn.data_to_send()
            if self.conn.is_open and not self.sent:
                self.conn.num_pieces = NUM_PIECES
                plain = b"".join(self.conn.send(m) for m in self.payload)
                self.wire += self.conn.seal(plain)
                self.sent = True
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.wire += self.conn.data_to_send()
                return
            self.events.append(event)
            if self.conn.our_role is Role.RESPONDER and self.conn.state.name == "AWAIT_ACCEPT":
                self.conn.accept(num_pieces=NUM_PIECES)

    def take(self) -> bytes:
        out = bytes(self.wire)
        self.wire.clear()
        return out


PAYLOAD = [Bitfield(BITFIELD), Piece(0, 0, SECRET), Have(3), Request(1, 0, 16384)]


def run(
    a: PeerConnection, b: PeerConnection, *, tamper: Any = None
) -> tuple[Side, Side, bytes, bytes]:
    """Pipe bytes both ways until quiet; ``tamper(direction, chunk)`` may rewrite them."""
    sa, sb = Side(a, list(PAYLOAD)), Side(b, list(PAYLOAD))
    all_a, all_b = bytearray(), bytearray()
    sa.step(b"")
    for _ in range(8):
        out = sa.take()
        out = tamper("a->b", out) if tamper else out
        all_a += out
        sb.step(out)
        out = sb.take()
        out = tamper("b->a", out) if tamper else out
        all_b += out
        sa.step(out)
    return sa, sb, bytes(all_a), bytes(all_b)


def test_encrypted_connection_delivers_and_hides_the_payload() -> None:
    a = connection(Role.INITIATOR)
    b = connection(Role.RESPONDER)
    sa, sb, wire_a, wire_b = run(a, b)
    assert a.is_open and b.is_open and a.encrypted and b.encrypted
    for side in (sa, sb):
        assert [e for e in side.events if not isinstance(e, PeerAuthenticated)][-4:] == PAYLOAD
    # An observer sees the handshakes, not the layer bytes nor the message framing.
    for wire in (wire_a, wire_b):
        assert b"secret layer bytes" not in wire
        assert struct.pack(">IB", 9 + len(SECRET), 7) not in wire


def token_fragments(token: str) -> list[bytes]:
    """The token, and each of its three parts: what a wire capture must not contain."""
    return [token.encode(), *(part.encode() for part in token.split(".") if len(part) > 8)]


@pytest.mark.parametrize("encrypt", [True, False])
def test_no_token_byte_crosses_the_wire_in_the_clear(encrypt: bool) -> None:
    """A relay recording both directions of a full handshake (and the traffic after it)
    finds neither side's token, nor any part of one: both roles, both directions."""
    keys = NodeKey.generate(), NodeKey.generate()
    auths = [honest_authenticator(k, issue(k, subject=f"n{i}")) for i, k in enumerate(keys)]
    a = connection(Role.INITIATOR, encrypt=encrypt, auth=auths[0])
    b = connection(Role.RESPONDER, encrypt=encrypt, auth=auths[1])
    _, _, wire_a, wire_b = run(a, b)
    assert a.is_open and b.is_open
    assert a.peer_token is not None and a.peer_token.subject == "n1"
    assert b.peer_token is not None and b.peer_token.subject == "n0"
    for auth in auths:
        for fragment in token_fragments(auth.current_token()):
            assert fragment not in wire_a and fragment not in wire_b
    assert (SECRET in wire_a) is (not encrypt)  # the control: piece traffic is visible plain


def test_unencrypted_peers_still_talk_in_the_clear() -> None:
    a = connection(Role.INITIATOR, encrypt=False)
    b = connection(Role.RESPONDER, encrypt=False)
    _, sb, wire_a, _ = run(a, b)
    assert a.is_open and b.is_open and not a.encrypted
    assert Piece(0, 0, SECRET) in sb.events
    assert SECRET in wire_a


@pytest.mark.parametrize("requires", [Role.INITIATOR, Role.RESPONDER])
def test_a_side_requiring_encryption_refuses_a_peer_without(requires: Role) -> None:
    a = connection(Role.INITIATOR, encrypt=requires is Role.INITIATOR)
    b = connection(Role.RESPONDER, encrypt=requires is Role.RESPONDER)
    with pytest.raises(RemoteProtocolError, match="encrypt"):
        run(a, b)
    assert not (a.is_open or b.is_open)


def _rewrite_ext_handshake(chunk: bytes, edit: Any) -> bytes:
    """Rewrite the first extended handshake in ``chunk`` (after the 68-byte handshake)."""
    pos = 68
    (length,) = struct.unpack_from(">I", chunk, pos)
    assert chunk[pos + 4] == 20 and chunk[pos + 5] == 0
    payload = bdecode(chunk[pos + 6 : pos + 4 + length])
    edit(payload)
    return chunk[:pos] + build_extended(0, bencode(payload)) + chunk[pos + 4 + length :]


def _mitm_on_initiators_kx(kx: bytes | None) -> tuple[PeerConnection, Any]:
    """A responder, and a man in the middle (``run``'s ``tamper``) who replaces the key in
    the initiator's extended handshake with ``kx`` (None: removes it)."""

    def edit(payload: dict[bytes, Any]) -> None:
        if kx is None:
            del payload[b"p2pimage_kx"]
        else:
            payload[b"p2pimage_kx"] = kx

    def tamper(direction: str, chunk: bytes) -> bytes:
        if direction == "a->b" and len(chunk) > 68 and chunk[:1] == b"\x13":
            return _rewrite_ext_handshake(chunk, edit)
        return chunk

    return connection(Role.RESPONDER), tamper


def test_stripping_the_key_exchange_is_refused() -> None:
    b, strip = _mitm_on_initiators_kx(None)
    with pytest.raises(RemoteProtocolError, match="key-exchange key"):
        run(connection(Role.INITIATOR), b, tamper=strip)
    assert not b.is_open


def test_swapping_the_key_exchange_reveals_nothing() -> None:
    """A man in the middle who puts its own X25519 key in a's extended handshake (to read
    the auth messages) gets keys a never used: b cannot open a's auth record, refuses it,
    and never sends its own."""
    b, swap = _mitm_on_initiators_kx(kx_public_key(bytes(32 * [7])))
    with pytest.raises(RemoteProtocolError, match="record failed authentication"):
        run(connection(Role.INITIATOR), b, tamper=swap)
    assert not b.is_open and b.peer_token is None


def _open_pair() -> tuple[Side, Side]:
    a = connection(Role.INITIATOR)
    b = connection(Role.RESPONDER)
    sa, sb = Side(a, []), Side(b, [])
    sa.step(b"")
    for _ in range(4):
        sb.step(sa.take())
        sa.step(sb.take())
    assert a.is_open and b.is_open
    return sa, sb


@pytest.mark.parametrize("where", ["length", "ciphertext", "tag"])
def test_an_altered_record_closes_the_connection(where: str) -> None:
    sa, sb = _open_pair()
    record = bytearray(sa.conn.seal(sa.conn.send(Piece(0, 0, SECRET))))
    index = {"length": 3, "ciphertext": 40, "tag": len(record) - 1}[where]
    record[index] ^= 0x01
    with pytest.raises(RemoteProtocolError, match="record"):
        sb.conn.receive_data(bytes(record))
        while sb.conn.next_event() is not NEED_DATA:
            pass
    with pytest.raises(RemoteProtocolError):
        sb.conn.next_event()  # stays failed


def test_replayed_and_reordered_records_fail() -> None:
    sa, sb = _open_pair()
    first = sa.conn.seal(sa.conn.send(Have(1)))
    sb.conn.receive_data(first)
    assert sb.conn.next_event() == Have(1)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        sb.conn.receive_data(first)  # replayed
    sa, sb = _open_pair()
    first = sa.conn.seal(sa.conn.send(Have(1)))
    second = sa.conn.seal(sa.conn.send(Have(2)))
    with pytest.raises(RemoteProtocolError, match="authentication"):
        sb.conn.receive_data(second)  # before the first


def test_a_record_cut_by_eof_is_an_error() -> None:
    sa, sb = _open_pair()
    record = sa.conn.seal(sa.conn.send(Have(1)))
    sb.conn.receive_data(record[:-3])
    assert sb.conn.next_event() is NEED_DATA
    sb.conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        sb.conn.next_event()


def test_eof_between_records_is_a_clean_close() -> None:
    sa, sb = _open_pair()
    sb.conn.receive_data(sa.conn.seal(sa.conn.send(Have(1))))
    assert sb.conn.next_event() == Have(1)
    sb.conn.receive_data(b"")
    assert isinstance(sb.conn.next_event(), ConnectionClosed)


def test_a_low_order_key_exchange_key_is_refused() -> None:
    b, zero = _mitm_on_initiators_kx(bytes(32))
    with pytest.raises(RemoteProtocolError, match="key-exchange key is invalid"):
        run(connection(Role.INITIATOR), b, tamper=zero)


def test_seal_is_refused_before_the_connection_is_open() -> None:
    a = connection(Role.INITIATOR)
    with pytest.raises(LocalProtocolError):
        a.seal(b"x")
    with pytest.raises(LocalProtocolError, match="open mode"):
        PeerConnection(
            Role.INITIATOR,
            peer_id=ID_I,
            authenticator=None,
            open_mode=True,
            kx_key=KX_I,
            info_hash=INFO_HASH,
        )


messages = st.lists(
    st.one_of(
        st.builds(Have, st.integers(0, NUM_PIECES - 1)),
        st.builds(
            Piece,
            st.integers(0, NUM_PIECES - 1),
            st.integers(0, 1 << 20),
            st.binary(min_size=1, max_size=16384),
        ),
        st.builds(
            Request,
            st.integers(0, NUM_PIECES - 1),
            st.integers(0, 1 << 20),
            st.integers(1, 16384),
        ),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(messages, min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 70_000), max_size=40),
)
def test_any_batching_and_any_split_delivers_the_same_messages(
    batches: list[list[Any]], cuts: list[int]
) -> None:
    """However the sender groups messages into sealed writes, and however TCP splits the
    bytes, the receiver gets exactly the messages, in order."""
    sa, sb = _open_pair()
    stream = b"".join(
        sa.conn.seal(b"".join(sa.conn.send(m) for m in batch)) for batch in batches if batch
    )
    received: list[Any] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        chunk = stream[pos : pos + cut]
        pos += len(chunk)
        if chunk:
            sb.conn.receive_data(chunk)
        while (event := sb.conn.next_event()) is not NEED_DATA:
            received.append(event)
        if pos >= len(stream):
            break
    assert received == [m for batch in batches for m in batch]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([1, 13, 4096, MAX_RECORD_PLAINTEXT - 1, MAX_RECORD_PLAINTEXT])
        | st.integers(1, 2 * MAX_RECORD_PLAINTEXT + 5),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(1, 300_000), max_size=12),
    limit=st.none() | st.integers(1, 4),
)
def test_records_sealed_and_opened_in_place_match_one_shot_aead(
    sizes: list[int], cuts: list[int], limit: int | None
) -> None:
    """The record layer encrypts into and decrypts out of single buffers: its records
    are byte for byte AES-GCM's one-shot output (length header as associated data,
    counter nonces), and however the stream is split, the reader returns exactly the
    plaintext of the records it may open (``limit``), leaving the rest raw."""
    key = bytes(range(32))
    aead = AESGCM(key)
    writer = RecordWriter(key)
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    expected_records: list[bytes] = []
    stream = bytearray()
    for payload in payloads:
        sealed = writer.seal(payload)
        one_shot = bytearray()
        for start in range(0, len(payload), MAX_RECORD_PLAINTEXT):
            chunk = payload[start : start + MAX_RECORD_PLAINTEXT]
            header = struct.pack(">I", len(chunk) + 16)
            nonce = struct.pack(">4xQ", len(expected_records))
            one_shot += header + aead.encrypt(nonce, chunk, header)
            expected_records.append(chunk)
        assert sealed == one_shot
        stream += sealed
    reader = RecordReader(key, limit=limit)
    opened = bytearray()
    pos = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[pos : pos + cut]
        pos += len(piece)
        opened += reader.feed(piece)
        if pos >= len(stream):
            break
    kept = expected_records if limit is None else expected_records[:limit]
    assert opened == b"".join(kept)
    assert reader.exhausted == (limit is not None and limit <= len(expected_records))
    assert reader.pending == len(stream) - sum(len(r) + RECORD_OVERHEAD for r in kept)


def test_a_read_of_exactly_one_record_opens_as_a_split_one_does() -> None:
    """The one-record paths (a control batch sealed in one AEAD call, a read that holds
    exactly one record opened without buffering): the same records and plaintext as the
    general paths, whatever the buffer type, with the counter kept across both paths, and
    a record altered in transit refused (issue #15: most of a node's writes and reads)."""
    key = bytes(range(32))
    writer = RecordWriter(key)
    payloads = [b"a" * 45, bytes(MAX_RECORD_PLAINTEXT), b"b" * 7, b"c" * (MAX_RECORD_PLAINTEXT + 9)]
    records = [writer.seal(p) for p in payloads]
    records.append(writer.seal(memoryview(b"d" * 20)))  # (the general path)
    assert [len(r) for r in records] == [sealed_length(len(p)) for p in [*payloads, b"d" * 20]]
    whole, split = RecordReader(key), RecordReader(key)
    for record, plain in zip(records, [*payloads, b"d" * 20], strict=True):
        for kind in range(3):
            assert RecordReader(key).feed(_as(kind, bytes(records[0]))) == payloads[0]
        assert whole.feed(memoryview(bytes(record))) == plain  # exactly one or two records
        assert split.feed(record[:3]) + split.feed(record[3:]) == plain
        assert whole.pending == split.pending == 0
    tampered = bytearray(RecordWriter(key).seal(b"x" * 30))
    tampered[10] ^= 1
    with pytest.raises(RemoteProtocolError, match="authentication"):
        RecordReader(key).feed(tampered)


def _as(kind: int, data: bytes) -> bytes | bytearray | memoryview:
    return (data, bytearray(data), memoryview(data))[kind]


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from([0, 1, 13, MAX_RECORD_PLAINTEXT - 13, MAX_RECORD_PLAINTEXT])
                | st.integers(0, 300_000),
                st.integers(0, 2),
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=6,
    ),
    capacity=st.integers(0, 3 * MAX_RECORD_PLAINTEXT),
)
def test_sealing_into_one_reused_buffer_gives_the_records_of_fresh_buffers(
    batches: list[list[tuple[int, int]]], capacity: int
) -> None:
    """A writer that seals each batch's chunks into one buffer, sent (copied out) before
    the next batch overwrites it, puts on the wire exactly the records that a writer
    sealing each joined batch into a new buffer does; a batch that does not fit is
    refused before anything is written or a nonce is used, and goes through a new buffer
    instead (as the session's writer does)."""
    key = bytes(range(32))
    fresh, reused = RecordWriter(key), RecordWriter(key)
    buffer = bytearray(capacity)
    expected, wire = bytearray(), bytearray()
    for n, batch in enumerate(batches):
        chunks = [_as(kind, bytes([(n + i) % 251]) * size) for i, (size, kind) in enumerate(batch)]
        plain = b"".join(chunks)
        expected += fresh.seal(plain)
        if sealed_length(len(plain)) > capacity:
            before = bytes(buffer)
            with pytest.raises(LocalProtocolError, match="do not fit"):
                reused.seal_into(buffer, chunks)
            assert buffer == before
            wire += reused.seal(plain)
            continue
        written = reused.seal_into(buffer, chunks)
        assert written == sealed_length(len(plain))
        wire += buffer[:written]  # "sent": the next batch may overwrite the buffer
    assert wire == expected
    reader = RecordReader(key)
    assert reader.feed(wire) == b"".join(
        bytes([(n + i) % 251]) * size
        for n, batch in enumerate(batches)
        for i, (size, _) in enumerate(batch)
    )


@settings(max_examples=30, deadline=None)
@given(
    batches=st.lists(st.tuples(messages, st.booleans()), min_size=1, max_size=6),
    encrypt=st.booleans(),
)
def test_a_connection_mixing_seal_and_seal_into_delivers_every_message(
    batches: list[tuple[list[Any], bool]], encrypt: bool
) -> None:
    """``PeerConnection.seal_into`` continues the same record stream as ``seal`` (one
    counter, one order), encrypted or in the clear, whichever each batch takes."""
    a = connection(Role.INITIATOR, encrypt=encrypt)
    b = connection(Role.RESPONDER, encrypt=encrypt)
    sa, sb = Side(a, []), Side(b, [])
    sa.step(b"")
    for _ in range(4):
        sb.step(sa.take())
        sa.step(sb.take())
    assert a.is_open and b.is_open
    buffer = bytearray(64 * 1024)
    for batch, into in batches:
        if not batch:
            continue  # (no bytes: receive_data(b"") would mean the peer closed)
        chunks = [a.send(m) for m in batch]
        if into:
            size = a.sealed_length(sum(map(len, chunks)))
            assert a.seal_into(buffer, chunks) == size
            b.receive_data(buffer[:size])
        else:
            b.receive_data(a.seal(b"".join(chunks)))
    received = []
    while (event := b.next_event()) is not NEED_DATA:
        received.append(event)
    assert received == [m for batch, _ in batches for m in batch]
    with pytest.raises(LocalProtocolError, match="do not fit"):
        a.seal_into(bytearray(10), [a.send(Have(1)), a.send(Have(2))])
