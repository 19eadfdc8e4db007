"""The sans-I/O peer wire: round trips, garbage, chunking, and the send-side state machine."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
)
from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bencode
from p2pimage.wire import (
    BLOCK_LENGTH,
    BLOCK_LENGTH_KEY,
    LISTEN_PORT_KEY,
    MAX_BLOCK_LENGTH_LIMIT,
    NEED_DATA,
    Bitfield,
    Cancel,
    Choke,
    ConnectionClosed,
    ConnectionState,
    Event,
    Extended,
    ExtendedHandshake,
    HandshakeReceived,
    Have,
    Interested,
    KeepAlive,
    Message,
    NotInterested,
    PeerAuthenticated,
    PeerConnection,
    Piece,
    Port,
    Request,
    Role,
    Unchoke,
    auth_transcript,
    build_haves_payload,
    decode_haves,
    encode_message,
    handshake_context,
)
from p2pimage.wire._codec import build_extended, build_handshake

NOW = 1_800_000_000.0
INFO_HASH = bytes(range(20))
ID_I = b"-PI0001-initiator000"
ID_R = b"-PI0001-responder000"
NONCE_I = b"\x11" * 32
NONCE_R = b"\x22" * 32
KX_I = b"\x33" * 32  # X25519 private keys (any 32 bytes are one)
KX_R = b"\x44" * 32
EXT = {b"ut_test": 7}
MAX_BLOCK = 128 * 1024
U32 = st.integers(0, 2**32 - 1)

_issuer = TokenIssuer([SigningKey.generate()], issuer="sidecar-test")
_verifier = TokenVerifier(KeySet.from_jwks(_issuer.jwks()), issuer="sidecar-test")


def authenticator(name: str) -> PeerAuthenticator:
    key = NodeKey.generate()
    token = _issuer.issue(subject=name, cluster="prod", node_jwk=key.public_jwk(), now=NOW)
    return PeerAuthenticator(
        node_key=key, token=token, verifier=_verifier, cluster="prod", clock=lambda: NOW + 1
    )


AUTH_I = authenticator("node-i")
AUTH_R = authenticator("node-r")


def initiator(auth: bool = True, **kw: Any) -> PeerConnection:
    if auth:
        return PeerConnection(
            Role.INITIATOR,
            peer_id=AUTH_I.peer_id(),
            authenticator=AUTH_I,
            nonce=NONCE_I,
            kx_key=KX_I,
            info_hash=INFO_HASH,
            **kw,
        )
    return PeerConnection(
        Role.INITIATOR,
        peer_id=ID_I,
        authenticator=None,
        open_mode=True,
        info_hash=INFO_HASH,
        **kw,
    )


def responder(auth: bool = True, **kw: Any) -> PeerConnection:
    if auth:
        return PeerConnection(
            Role.RESPONDER,
            peer_id=AUTH_R.peer_id(),
            authenticator=AUTH_R,
            nonce=NONCE_R,
            kx_key=KX_R,
            **kw,
        )
    return PeerConnection(Role.RESPONDER, peer_id=ID_R, authenticator=None, open_mode=True, **kw)


def drain(conn: PeerConnection, num_pieces: int | None = None) -> list[Event]:
    """Pull events until NEED_DATA, accepting any info-hash as a responder would."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, HandshakeReceived) and conn.our_role is Role.RESPONDER:
            conn.accept(num_pieces=num_pieces)
        if isinstance(event, ConnectionClosed):
            return events


def handshake(a: PeerConnection, b: PeerConnection) -> tuple[bytes, bytes]:
    """Pipe bytes both ways until both sides are open; return what each side sent."""
    sent_a = bytearray()
    sent_b = bytearray()
    for _ in range(6):
        data = a.data_to_send()
        sent_a += data
        if data:
            b.receive_data(data)
        drain(b)
        data = b.data_to_send()
        sent_b += data
        if data:
            a.receive_data(data)
        drain(a)
    assert a.is_open and b.is_open
    return bytes(sent_a), bytes(sent_b)


def open_pair(auth: bool = False, **kw: Any) -> tuple[PeerConnection, PeerConnection]:
    a, b = initiator(auth, **kw), responder(auth, **kw)
    handshake(a, b)
    assert a.data_to_send() == b"" and b.data_to_send() == b""
    return a, b


# --- strategies ---------------------------------------------------------------------------

blocks = st.integers(1, MAX_BLOCK)
messages: dict[type, st.SearchStrategy[Any]] = {
    KeepAlive: st.just(KeepAlive()),
    Choke: st.just(Choke()),
    Unchoke: st.just(Unchoke()),
    Interested: st.just(Interested()),
    NotInterested: st.just(NotInterested()),
    Have: st.builds(Have, U32),
    Bitfield: st.builds(Bitfield, st.binary(min_size=1, max_size=300)),
    Request: st.builds(Request, U32, U32, blocks),
    Piece: st.builds(Piece, U32, U32, st.binary(min_size=1, max_size=3000)),
    Cancel: st.builds(Cancel, U32, U32, blocks),
    Port: st.builds(Port, st.integers(0, 65535)),
    Extended: st.builds(Extended, st.just(7), st.binary(max_size=500)),
}
no_bitfield = st.one_of([s for t, s in messages.items() if t is not Bitfield])
message_sequences = st.tuples(
    st.lists(messages[Bitfield], max_size=1), st.lists(no_bitfield, max_size=12)
).map(lambda t: t[0] + t[1])


# --- round trips --------------------------------------------------------------------------


def test_every_message_type_has_a_strategy() -> None:
    assert set(messages) == set(Message.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", list(messages), ids=lambda t: t.__name__)
@settings(max_examples=200)
@given(data=st.data())
def test_round_trip(kind: type, data: st.DataObject) -> None:
    message = data.draw(messages[kind])
    a, b = open_pair(extensions=EXT, max_block_length=MAX_BLOCK)
    wire = a.send(message)
    assert wire == encode_message(message)
    (length,) = struct.unpack_from(">I", wire)
    assert length == len(wire) - 4
    b.receive_data(wire)
    assert drain(b) == [message]
    # and the other direction
    a.receive_data(b.send(message))
    assert drain(a) == [message]


def test_round_trip_largest_block_and_bitfield() -> None:
    a, b = open_pair(max_block_length=MAX_BLOCK)
    a.num_pieces = b.num_pieces = 2**21
    bits = b"\xff" * (2**21 // 8)
    block = bytes(range(256)) * (MAX_BLOCK // 256)
    b.receive_data(a.send(Bitfield(bits)) + a.send(Piece(5, 0, block)))
    assert drain(b) == [Bitfield(bits), Piece(5, 0, block)]


def test_piece_header_fast_path_and_memoryview_data() -> None:
    a, b = open_pair()
    block = bytearray(b"x" * 16384)
    b.receive_data(a.piece_header(3, 16384, len(block)) + block)
    b.receive_data(a.send(Piece(4, 0, memoryview(block)[:100])))
    events = drain(b)
    assert events == [Piece(3, 16384, bytes(block)), Piece(4, 0, b"x" * 100)]
    assert all(type(e.data) is bytes for e in events if isinstance(e, Piece))


def test_handshake_bytes_are_standard() -> None:
    a = initiator(auth=False)
    wire = a.data_to_send()
    assert len(wire) == 68
    assert wire[:20] == b"\x13BitTorrent protocol"
    assert wire[20 + 5] & 0x10  # BEP 10
    assert wire[28:48] == INFO_HASH and wire[48:] == ID_I


def test_extended_handshake_contents() -> None:
    a = initiator(auth=True, extensions=EXT)
    b = responder(auth=True, extensions=EXT)
    a_wire = a.data_to_send()
    b.receive_data(a_wire)
    events = drain(b)
    assert isinstance(events[0], HandshakeReceived)
    assert events[0].info_hash == INFO_HASH and events[0].peer_id == AUTH_I.peer_id()
    assert events[0].supports_extensions
    ext = events[1]
    assert isinstance(ext, ExtendedHandshake)
    assert ext.extensions == {b"p2pimage_auth_v3": 1, b"ut_test": 7}
    assert ext.payload[b"p2pimage_nonce"] == NONCE_I
    assert len(ext.payload[b"p2pimage_kx"]) == 32 and b"p2pimage_plain" not in ext.payload
    assert b"token" not in ext.payload and AUTH_I.current_token().encode() not in a_wire
    assert ext.client == b"p2pimage/0.1" and ext.reqq == 500
    assert b.peer_extension_id(b"ut_test") == 7


def test_open_mode_extended_handshake_optional() -> None:
    # A stock peer without BEP 10: no extended handshake, open right after the handshake.
    a = initiator(auth=False)
    a.data_to_send()
    a.receive_data(b"\x13BitTorrent protocol" + bytes(8) + INFO_HASH + ID_R)
    assert [type(e) for e in drain(a)] == [HandshakeReceived]
    assert a.is_open and a.data_to_send() == b""  # no extended handshake to a non-BEP 10 peer
    a.receive_data(b"\x00\x00\x00\x02\x05\x80")
    assert drain(a) == [Bitfield(b"\x80")]


def test_eof() -> None:
    a, b = open_pair()
    b.receive_data(a.send(Choke()))
    b.receive_data(b"")
    assert drain(b) == [Choke(), ConnectionClosed()]
    assert b.state is ConnectionState.CLOSED
    assert b.next_event() == ConnectionClosed()
    a2, b2 = open_pair()
    b2.receive_data(a2.send(Have(1))[:-1])
    b2.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        b2.next_event()


# --- garbage never raises anything but RemoteProtocolError -----------------------------------

PEER_MESSAGES = b"".join(
    encode_message(m)
    for m in (
        Bitfield(b"\xff\xf0"),
        Have(3),
        Interested(),
        Unchoke(),
        Request(1, 0, 16384),
        Piece(1, 0, b"abc"),
        Cancel(1, 0, 16384),
        Port(6881),
        Extended(7, b"d1:ai1ee"),
        KeepAlive(),
        Choke(),
        NotInterested(),
    )
)


def _record() -> dict[str, tuple[Callable[[], PeerConnection], bytes]]:
    """For each fuzzed state: a factory for a connection in that state, and the bytes a
    well-behaved peer would send it next (material for mutations)."""
    i, r = initiator(extensions=EXT), responder(extensions=EXT)
    sent_i, sent_r = handshake(i, r)
    # The initiator's output: handshake (68), extended handshake, auth message (a record).
    hs_i, rest_i = sent_i[:68], sent_i[68:]
    ext_len = struct.unpack_from(">I", rest_i)[0] + 4
    ext_i, auth_i = rest_i[:ext_len], rest_i[ext_len:]

    def responder_in(state: ConnectionState, auth: bool = True) -> Callable[[], PeerConnection]:
        feed = {
            ConnectionState.AWAIT_HANDSHAKE: b"",
            ConnectionState.AWAIT_EXT_HANDSHAKE: hs_i,
            ConnectionState.AWAIT_AUTH: hs_i + ext_i,
            ConnectionState.OPEN: sent_i,
        }[state]

        def make() -> PeerConnection:
            conn = responder(auth, extensions=EXT)
            if feed:
                conn.receive_data(feed)
                drain(conn, num_pieces=12)
            assert conn.state is state
            conn.data_to_send()
            return conn

        return make

    def open_plain(num_pieces: int | None) -> Callable[[], PeerConnection]:
        def make() -> PeerConnection:
            conn = responder(False, extensions=EXT)
            conn.receive_data(hs_i)
            drain(conn, num_pieces=num_pieces)
            assert conn.is_open
            return conn

        return make

    return {
        "initiator-await-handshake": (
            lambda: initiator(extensions=EXT),
            sent_r + PEER_MESSAGES,
        ),
        "responder-await-handshake": (
            responder_in(ConnectionState.AWAIT_HANDSHAKE),
            sent_i + PEER_MESSAGES,
        ),
        "open-mode-await-handshake": (
            lambda: responder(False, extensions=EXT),
            hs_i + PEER_MESSAGES,
        ),
        "await-ext-handshake": (
            responder_in(ConnectionState.AWAIT_EXT_HANDSHAKE),
            ext_i + auth_i + PEER_MESSAGES,
        ),
        "await-auth": (responder_in(ConnectionState.AWAIT_AUTH), auth_i + PEER_MESSAGES),
        "open-authenticated": (responder_in(ConnectionState.OPEN), PEER_MESSAGES),
        "open-mode-num-pieces": (open_plain(12), ext_i + PEER_MESSAGES),
        "open-mode-no-num-pieces": (open_plain(None), ext_i + PEER_MESSAGES),
    }


FUZZ_STATES = _record()


_BENCODED = [
    {b"m": {b"p2pimage_auth_v3": 1}, b"p2pimage_nonce": b"n" * 32},
    {b"m": {b"p2pimage_auth_v3": 300}, b"p2pimage_nonce": b"n" * 31},
    {b"m": {b"p2pimage_auth_v3": 1}},
    {b"m": 5, b"reqq": -1, b"v": 7},
    {b"m": {b"ut_test": 7}, b"p2pimage_nonce": b"\x11" * 32},
    {b"sig": b"s" * 64, b"token": b"a.b.c"},
    {b"sig": 1, b"token": b""},
    {b"token": b"x" * 9000},
    [b"m", 1],
]
_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 20, 20, 13, 255]


def hostile(valid: bytes) -> st.SearchStrategy[list[bytes]]:
    """Chunks of: random bytes, a mutated valid stream, or random framed messages.

    Three draws per example (kind, a random blob, a seed for the structure), so thousands
    of examples stay cheap; the blob supplies the random material, the seed the shape.
    """
    return st.builds(
        _hostile,
        st.just(valid),
        st.integers(0, 2),
        st.binary(max_size=300),
        st.integers(0, 2**32 - 1),
    )


def _hostile(valid: bytes, kind: int, blob: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    if kind == 0:
        data = blob
    elif kind == 1:
        buf = bytearray(valid[: rng.randint(0, len(valid))])
        for _ in range(rng.randint(1, 4)):
            pos = rng.randint(0, len(buf))
            op = rng.randrange(3)
            if op == 0 and pos < len(buf):
                buf[pos] = blob[pos % len(blob)] if blob else rng.randrange(256)
            elif op == 1:
                buf[pos:pos] = blob[: rng.randint(1, 8)] or b"\x00"
            else:
                del buf[pos : pos + rng.randint(1, 8)]
        data = bytes(buf)
    else:
        frames = []
        for _ in range(rng.randint(1, 4)):
            shape = rng.randrange(3)
            if shape == 0:
                payload = blob[rng.randint(0, len(blob)) :][: rng.randint(0, 40)]
            elif shape == 1:
                payload = bytes([rng.choice([0, 1, 7, 9])]) + blob[: rng.randint(0, 40)]
            else:
                value: Any = rng.choice(_BENCODED)
                payload = bytes([rng.choice([0, 1])]) + bencode(value)
            msg_id = rng.choice(_IDS)
            frames.append(struct.pack(">IB", len(payload) + 1, msg_id) + payload)
        data = b"".join(frames)
        if rng.random() < 0.5:
            data = valid[: rng.randint(0, len(valid))] + data
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


HOSTILE = {state: hostile(valid) for state, (_, valid) in FUZZ_STATES.items()}


@pytest.mark.parametrize("state", list(FUZZ_STATES))
@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_garbage_raises_only_remote_protocol_error(state: str, data: st.DataObject) -> None:
    make = FUZZ_STATES[state][0]
    conn = make()
    authenticated_before = conn.is_open or not conn.authenticated
    chunks = data.draw(HOSTILE[state])
    with_eof = data.draw(st.booleans())
    try:
        for chunk in [*(c for c in chunks if c), *([b""] if with_eof else [])]:
            if conn.state is ConnectionState.CLOSED:
                break  # the peer's EOF was seen already
            conn.receive_data(chunk)
            for event in drain(conn, num_pieces=12):
                if isinstance(event, PeerAuthenticated):
                    authenticated_before = True
                if isinstance(event, Message):
                    # No BEP 3 message ever surfaces before the peer has authenticated.
                    assert authenticated_before
    except RemoteProtocolError:
        assert conn.state is ConnectionState.CLOSED
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        with pytest.raises(LocalProtocolError):
            conn.send(Choke())


# --- chunking -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(msgs=message_sequences, data=st.data())
def test_arbitrary_chunking_yields_the_same_events(
    msgs: list[Message], data: st.DataObject
) -> None:
    i, r = (
        initiator(extensions=EXT, max_block_length=MAX_BLOCK),
        responder(extensions=EXT, max_block_length=MAX_BLOCK),
    )
    sent_i, _ = handshake(i, r)
    stream = sent_i + i.seal(b"".join(i.send(m) for m in msgs))

    whole = responder(extensions=EXT, max_block_length=MAX_BLOCK)
    whole.receive_data(stream)
    expected = drain(whole)
    assert [e for e in expected if isinstance(e, Message)] == msgs

    chunked = responder(extensions=EXT, max_block_length=MAX_BLOCK)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    got: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if a != b:
            chunked.receive_data(stream[a:b])
        got += drain(chunked)
    assert got == expected
    assert chunked.data_to_send() == whole.data_to_send()


@pytest.mark.parametrize("mode", ["encrypted", "plaintext", "open"])
@settings(max_examples=60, deadline=None)
@given(msgs=message_sequences, data=st.data())
def test_reads_into_one_reused_buffer_yield_the_same_events(
    mode: str, msgs: list[Message], data: st.DataObject
) -> None:
    """What PeerSession does over TCP: every socket read lands in one reusable buffer
    and is fed as a memoryview of it, which the next read overwrites. receive_data keeps
    copies, so the events are those of the whole stream fed at once."""
    auth = mode != "open"
    kw: dict[str, Any] = {"extensions": EXT, "max_block_length": MAX_BLOCK}
    if mode == "plaintext":
        kw["encrypt"] = False
    i, r = initiator(auth, **kw), responder(auth, **kw)
    sent_i, _ = handshake(i, r)
    stream = sent_i + i.seal(b"".join(i.send(m) for m in msgs))

    whole = responder(auth, **kw)
    whole.receive_data(stream)
    expected = drain(whole)
    assert [e for e in expected if isinstance(e, Message)] == msgs

    reader = responder(auth, **kw)
    size = data.draw(st.integers(1, 4096), label="read size")
    buffer = bytearray(size)
    view = memoryview(buffer)
    got: list[Event] = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, min(size, len(stream) - pos)), label="read")
        buffer[:n] = stream[pos : pos + n]
        pos += n
        reader.receive_data(view[:n])
        buffer[:] = b"\xee" * size  # the next read overwrites what was fed
        got += drain(reader)
    assert got == expected


def test_byte_at_a_time() -> None:
    msgs: Sequence[Message] = [Bitfield(b"\x01"), Have(0), Piece(0, 0, b"z" * 50), KeepAlive()]
    i, r = initiator(), responder()
    sent_i, _ = handshake(i, r)
    stream = sent_i + i.seal(b"".join(i.send(m) for m in msgs))
    conn = responder()
    got: list[Event] = []
    for k in range(len(stream)):
        conn.receive_data(stream[k : k + 1])
        got += drain(conn)
    assert [e for e in got if isinstance(e, Message)] == list(msgs)


# --- the state machine refuses out-of-order sends -------------------------------------------

ALL_SENDS: list[Message] = [
    KeepAlive(),
    Choke(),
    Unchoke(),
    Interested(),
    NotInterested(),
    Have(0),
    Bitfield(b"\x80"),
    Request(0, 0, 16384),
    Piece(0, 0, b"x"),
    Cancel(0, 0, 16384),
    Port(1),
    Extended(7, b""),
]


@pytest.mark.parametrize(
    "state",
    [
        "initiator-await-handshake",
        "responder-await-handshake",
        "open-mode-await-handshake",
        "await-ext-handshake",
        "await-auth",
    ],
)
def test_sends_before_open_are_refused(state: str) -> None:
    conn = FUZZ_STATES[state][0]()
    assert not conn.is_open
    conn.data_to_send()
    for message in ALL_SENDS:
        with pytest.raises(LocalProtocolError):
            conn.send(message)
    with pytest.raises(LocalProtocolError):
        conn.piece_header(0, 0, 16384)
    assert conn.data_to_send() == b""  # refused sends queue nothing


def test_responder_must_decide_before_reading_on() -> None:
    i, r = initiator(), responder()
    r.receive_data(i.data_to_send())
    assert isinstance(r.next_event(), HandshakeReceived)
    assert r.state is ConnectionState.AWAIT_ACCEPT
    with pytest.raises(LocalProtocolError):
        r.next_event()
    with pytest.raises(LocalProtocolError):
        i.accept()
    r.reject()
    assert r.state is ConnectionState.CLOSED and r.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        r.accept()


def test_open_send_rules() -> None:
    a, _ = open_pair(extensions=EXT)
    a.num_pieces = 10
    with pytest.raises(LocalProtocolError):
        a.send(Bitfield(b"\xff"))  # 10 pieces need 2 bytes
    with pytest.raises(LocalProtocolError):
        a.send(Bitfield(b"\xff\xff"))  # spare bits set
    with pytest.raises(LocalProtocolError):
        a.send(Have(10))
    a.send(Have(9))
    with pytest.raises(LocalProtocolError):
        a.send(Bitfield(b"\xff\xc0"))  # a bitfield goes before any have
    with pytest.raises(LocalProtocolError):
        a.send(Request(0, 0, 16385))  # above max_block_length
    with pytest.raises(LocalProtocolError):
        a.send(Request(0, 0, 0))
    with pytest.raises(LocalProtocolError):
        a.send(Piece(0, 0, b""))
    with pytest.raises(LocalProtocolError):
        a.send(Extended(9, b""))  # the peer did not advertise id 9
    with pytest.raises(LocalProtocolError):
        a.send(Have(-1))
    a.close()
    with pytest.raises(LocalProtocolError):
        a.send(Choke())


def test_constructor_refuses_misuse() -> None:
    with pytest.raises(LocalProtocolError):  # open mode is never the default
        PeerConnection(Role.INITIATOR, peer_id=ID_I, authenticator=None, info_hash=INFO_HASH)
    with pytest.raises(LocalProtocolError):
        PeerConnection(
            Role.INITIATOR,
            peer_id=ID_I,
            authenticator=AUTH_I,
            open_mode=True,
            nonce=NONCE_I,
            info_hash=INFO_HASH,
        )
    with pytest.raises(LocalProtocolError):  # no nonce
        PeerConnection(Role.INITIATOR, peer_id=ID_I, authenticator=AUTH_I, info_hash=INFO_HASH)
    with pytest.raises(LocalProtocolError):  # short nonce
        PeerConnection(
            Role.INITIATOR, peer_id=ID_I, authenticator=AUTH_I, nonce=b"x", info_hash=INFO_HASH
        )
    with pytest.raises(LocalProtocolError):  # initiator without info-hash
        PeerConnection(Role.INITIATOR, peer_id=ID_I, authenticator=AUTH_I, nonce=NONCE_I)
    with pytest.raises(LocalProtocolError):  # extension id taken by auth
        responder(extensions={b"x": 1})
    with pytest.raises(LocalProtocolError):
        responder(max_block_length=2**20)


# --- receive-side validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00\x00\x02\x00\x00",  # choke with payload
        b"\x00\x00\x00\x05\x04\x00\x00\x00\x0c",  # have 12 of 12 pieces
        b"\x00\x00\x00\x02\x05\xff",  # bitfield too short for 12 pieces
        b"\x00\x00\x00\x03\x05\xff\xf8",  # bitfield with spare bits set
        b"\x00\x00\x00\x0d\x06" + struct.pack(">III", 0, 0, 16385),  # request above max block
        b"\x00\x00\x00\x0d\x06" + struct.pack(">III", 0, 0, 0),  # zero-length request
        b"\x00\x00\x00\x09\x07" + bytes(8),  # piece without data
        b"\x00\x00\x40\x0a\x07" + bytes(8),  # piece above max block (rejected from header)
        b"\x00\x00\x00\x01\x0d",  # unknown id (BEP 6 have-all, not negotiated)
        b"\x7f\xff\xff\xff",  # absurd length
        b"\x00\x00\x00\x02\x14\x05",  # extended id we never advertised
        b"\x00\x00\x00\x05\x14\x00d1:m",  # truncated bencoding in an extended handshake
    ],
)
def test_bad_frames_are_remote_errors(frame: bytes) -> None:
    conn = FUZZ_STATES["open-mode-num-pieces"][0]()
    conn.receive_data(frame)
    with pytest.raises(RemoteProtocolError):
        drain(conn)


def test_late_bitfield_tolerated_from_stock_clients() -> None:
    """aria2 sends its bitfield after its first haves; open mode accepts it as an update."""
    a, b = open_pair()
    b.receive_data(a.send(Have(1)) + encode_message(Bitfield(b"\xc0")))
    assert [e for e in drain(b) if isinstance(e, Have | Bitfield)] == [Have(1), Bitfield(b"\xc0")]


def test_receive_buffer_is_bounded() -> None:
    a, b = open_pair()
    chunk = a.send(Piece(0, 0, b"y" * 16384)) * 32  # 512 KiB of pieces, not drained
    b.receive_data(chunk)
    with pytest.raises(LocalProtocolError):
        b.receive_data(chunk)


def test_transcript_layout() -> None:
    kx_i, kx_r = b"\x11" * 32, b"\x22" * 32
    base: dict[str, Any] = {
        "info_hash": INFO_HASH,
        "initiator_peer_id": ID_I,
        "responder_peer_id": ID_R,
        "initiator_nonce": NONCE_I,
        "responder_nonce": NONCE_R,
        "initiator_kx": kx_i,
        "responder_kx": kx_r,
    }
    context = handshake_context(**base)
    assert context == INFO_HASH + ID_I + ID_R + NONCE_I + NONCE_R + kx_i + kx_r + b"E"
    assert handshake_context(**base, encrypted=False)[-1:] == b"P"
    signed = auth_transcript(signer=Role.RESPONDER, context=context)
    assert signed == b"p2pimage-peer-auth/3\x00R" + context
    with pytest.raises(LocalProtocolError):
        handshake_context(**(base | {"info_hash": INFO_HASH[:19]}))
    with pytest.raises(LocalProtocolError):  # both key-exchange keys are required
        handshake_context(**(base | {"initiator_kx": b""}))


def test_late_bitfield_refused_between_p2pimage_peers() -> None:
    a, b = open_pair(auth=True)
    b.receive_data(a.seal(a.send(Have(1)) + encode_message(Bitfield(b"\xc0"))))
    with pytest.raises(RemoteProtocolError):
        drain(b)


# --- large blocks (p2pimage_block) ---------------------------------------------------------


@pytest.mark.parametrize("auth", [True, False], ids=["authenticated", "open"])
def test_large_blocks_are_offered_in_the_extended_handshake(auth: bool) -> None:
    a, b = open_pair(auth, max_block_length=MAX_BLOCK_LENGTH_LIMIT)
    assert a.peer_max_block_length == b.peer_max_block_length == MAX_BLOCK_LENGTH_LIMIT
    block = bytes(range(256)) * (MAX_BLOCK_LENGTH_LIMIT // 256)
    b.receive_data(a.seal(a.send(Request(2, 0, MAX_BLOCK_LENGTH_LIMIT))))
    assert drain(b) == [Request(2, 0, MAX_BLOCK_LENGTH_LIMIT)]
    a.receive_data(b.seal(b.piece_header(2, 0, len(block)) + block))
    assert drain(a) == [Piece(2, 0, block)]


def test_a_peer_that_offers_nothing_gets_bep3_blocks_only() -> None:
    """A stock client sends no p2pimage_block: we may accept large blocks ourselves,
    but a request we send it stays within 16 KiB."""
    ours, stock = initiator(False, max_block_length=MAX_BLOCK_LENGTH_LIMIT), responder(False)
    handshake(ours, stock)
    assert ours.peer_max_block_length == BLOCK_LENGTH
    assert stock.peer_max_block_length == MAX_BLOCK_LENGTH_LIMIT
    ours.send(Request(0, 0, BLOCK_LENGTH))
    with pytest.raises(LocalProtocolError):
        ours.send(Request(0, 0, BLOCK_LENGTH + 1))
    with pytest.raises(LocalProtocolError):
        ours.send(Cancel(0, 0, 2 * BLOCK_LENGTH))


@pytest.mark.parametrize(
    ("offered", "seen"),
    [
        (2**40, MAX_BLOCK_LENGTH_LIMIT),
        (MAX_BLOCK_LENGTH_LIMIT + 1, MAX_BLOCK_LENGTH_LIMIT),
        (64 * 1024, 64 * 1024),
        (100, BLOCK_LENGTH),
        (-5, BLOCK_LENGTH),
        (b"262144", BLOCK_LENGTH),
    ],
)
def test_an_offered_block_length_is_clamped_to_what_the_wire_allows(
    offered: object, seen: int
) -> None:
    ours = initiator(False)
    peer_handshake = build_handshake(INFO_HASH, ID_R, extensions=True)
    payload = bencode({b"m": {}, BLOCK_LENGTH_KEY: offered})  # type: ignore[dict-item]
    ours.receive_data(peer_handshake + build_extended(0, payload))
    drain(ours)
    assert ours.is_open
    assert ours.peer_max_block_length == seen


@pytest.mark.parametrize("auth", [True, False], ids=["authenticated", "open"])
def test_the_listen_port_travels_in_the_extended_handshake(auth: bool) -> None:
    """BEP 10's ``p``: a side names the port it listens on (the accepting side uses it
    to recognise a peer that dialled it); a side that names none sends no ``p``."""
    a, b = initiator(auth, listen_port=6881), responder(auth)
    seen: dict[str, list[ExtendedHandshake]] = {"a": [], "b": []}
    for _ in range(6):
        for ours, theirs, name in ((b, a, "b"), (a, b, "a")):
            if data := theirs.data_to_send():
                ours.receive_data(data)
            seen[name] += [e for e in drain(ours) if isinstance(e, ExtendedHandshake)]
    assert a.is_open and b.is_open
    assert [e.listen_port for e in seen["b"]] == [6881]
    assert [e.listen_port for e in seen["a"]] == [None]


@pytest.mark.parametrize("offered", [0, 65536, -1, 2**40, b"6881", [6881]], ids=repr)
def test_a_listen_port_that_is_no_port_is_ignored_not_refused(offered: object) -> None:
    ours = initiator(False)
    peer_handshake = build_handshake(INFO_HASH, ID_R, extensions=True)
    payload = bencode({b"m": {}, LISTEN_PORT_KEY: offered})  # type: ignore[dict-item]
    ours.receive_data(peer_handshake + build_extended(0, payload))
    extended = [e for e in drain(ours) if isinstance(e, ExtendedHandshake)]
    assert ours.is_open
    assert len(extended) == 1 and extended[0].listen_port is None


def test_a_bad_own_listen_port_is_the_callers_error() -> None:
    with pytest.raises(LocalProtocolError):
        initiator(False, listen_port=70000)


# --- p2pimage_haves -----------------------------------------------------------------------


@given(indexes=st.lists(st.integers(0, 999), min_size=1, max_size=300))
def test_haves_payload_round_trip(indexes: list[int]) -> None:
    assert decode_haves(build_haves_payload(indexes), 1000) == tuple(indexes)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x00", b"\x00\x00\x00\x01\x00", struct.pack(">II", 3, 1000)],
    ids=["empty", "short", "ragged", "index out of range"],
)
def test_haves_garbage_is_the_peers_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_haves(payload, 1000)
