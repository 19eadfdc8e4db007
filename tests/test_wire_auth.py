"""Authenticated handshakes between two in-memory PeerConnections, with the real
p2pimage.auth.tokens.

Every attack below must end with the honest side raising a clear AuthError or
RemoteProtocolError, and with ZERO bitfield/have/piece bytes written by the honest side
even though its driver tries to send them the moment the connection says it is open.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    bound_peer_id,
)
from p2pimage.errors import (
    AuthError,
    LocalProtocolError,
    ProtocolVersionError,
    RemoteProtocolError,
)
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.wire import (
    NEED_DATA,
    Bitfield,
    ConnectionState,
    HandshakeReceived,
    PeerAuthenticated,
    PeerConnection,
    Piece,
    Role,
    auth_transcript,
)
from p2pimage.wire._codec import (
    MAX_AUTH_SIGNATURE_LENGTH,
    MAX_AUTH_TOKEN_LENGTH,
    build_extended,
    build_extended_handshake,
    build_handshake,
    handshake_context,
)
from p2pimage.wire._crypto import RecordReader, RecordWriter, derive_keys, kx_public_key

NOW = 1_800_000_000.0
CLUSTER = "prod"
INFO_HASH = hashlib.sha1(b"layer").digest()
ID_I = b"-PI0001-initiator000"
ID_R = b"-PI0001-responder000"
NONCE_I = bytes(range(32))
NONCE_R = bytes(range(32, 64))
KX_I = bytes(range(100, 132))  # X25519 private keys
KX_R = bytes(range(140, 172))
NUM_PIECES = 12
BITFIELD = b"\xff\xf0"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


SIGNING_KEY = SigningKey.generate()
ISSUER = TokenIssuer([SIGNING_KEY], issuer="sidecar-test")
VERIFIER = TokenVerifier(KeySet.from_jwks(ISSUER.jwks()), issuer="sidecar-test")


def honest_authenticator(key: NodeKey, token: str) -> PeerAuthenticator:
    return PeerAuthenticator(
        node_key=key, token=token, verifier=VERIFIER, cluster=CLUSTER, clock=lambda: NOW + 10
    )


def issue(key: NodeKey, **kw: Any) -> str:
    args: dict[str, Any] = {"subject": "node", "cluster": CLUSTER, "now": NOW} | kw
    return ISSUER.issue(node_jwk=key.public_jwk(), **args)


class ForgingAuthenticator:
    """An attacker: presents ``token`` and signs with ``key`` (or returns a bad signature)."""

    def __init__(self, token: str, key: NodeKey, *, corrupt_signature: bool = False) -> None:
        self.token, self.key, self.corrupt = token, key, corrupt_signature
        self.tokens_seen: list[bytes] = []  # the honest side's tokens it got to read

    def peer_id(self) -> bytes:
        """The id its token binds, when the token has a readable subject."""
        try:
            claims = json.loads(base64.urlsafe_b64decode(self.token.split(".")[1] + "=="))
            return bound_peer_id(claims["sub"], self.key.public_jwk())
        except (ValueError, KeyError, IndexError, TypeError):
            return b"-PI0300-attacker0000"

    def credentials(self, transcript: bytes) -> tuple[bytes, bytes]:
        sig = self.key.sign(transcript)
        if self.corrupt:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return self.token.encode(), sig

    def verify_peer(
        self, token: bytes, signature: bytes, transcript: bytes, info_hash: bytes, peer_id: bytes
    ) -> Any:
        self.tokens_seen.append(token)
        return VERIFIER.verify(token, now=NOW + 10, cluster=CLUSTER, info_hash=info_hash)


def connection(role: Role, auth: Any, **kw: Any) -> PeerConnection:
    if role is Role.INITIATOR:
        return PeerConnection(
            role,
            peer_id=auth.peer_id(),
            authenticator=auth,
            nonce=NONCE_I,
            kx_key=KX_I,
            info_hash=INFO_HASH,
            **kw,
        )
    return PeerConnection(
        role, peer_id=auth.peer_id(), authenticator=auth, nonce=NONCE_R, kx_key=KX_R, **kw
    )


def split_wire(stream: bytes) -> tuple[dict[bytes, Any], list[bytes]]:
    """A side's bytes: the extended handshake's dictionary (after the 68-byte handshake),
    and the encrypted records after it."""
    (length,) = struct.unpack_from(">I", stream, 68)
    assert stream[72] == 20 and stream[73] == 0
    ext = bdecode(stream[74 : 72 + length])
    assert isinstance(ext, dict)
    records, pos = [], 72 + length
    while pos < len(stream):
        (size,) = struct.unpack_from(">I", stream, pos)
        records.append(stream[pos : pos + 4 + size])
        pos += 4 + size
    assert pos == len(stream)
    return ext, records


@dataclass
class Driver:
    """An eager caller: flushes protocol output and sends bitfield + a piece once open."""

    conn: PeerConnection
    wire: bytearray
    events: list[Any]
    sent_payload: bool = False

    def step(self, incoming: bytes) -> None:
        if incoming:
            self.conn.receive_data(incoming)
        while True:
            self.wire += self.conn.data_to_send()
            if self.conn.is_open and not self.sent_payload:
                self.conn.num_pieces = NUM_PIECES
                self.wire += self.conn.seal(
                    self.conn.send(Bitfield(BITFIELD))
                    + self.conn.send(Piece(0, 0, b"secret layer bytes"))
                )
                self.sent_payload = True
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.wire += self.conn.data_to_send()
                return
            self.events.append(event)
            if isinstance(event, HandshakeReceived) and self.conn.our_role is Role.RESPONDER:
                self.conn.accept(num_pieces=NUM_PIECES)

    def take(self) -> bytes:
        out = bytes(self.wire)
        self.wire.clear()
        return out


def run(a: PeerConnection, b: PeerConnection) -> tuple[Driver, Driver, bytes, bytes]:
    """Pipe bytes between ``a`` and ``b`` until quiet; return drivers and all bytes sent."""
    da, db = Driver(a, bytearray(), []), Driver(b, bytearray(), [])
    all_a, all_b = bytearray(), bytearray()
    da.step(b"")
    for _ in range(8):
        out = da.take()
        all_a += out
        db.step(out)
        out = db.take()
        all_b += out
        da.step(out)
    all_a += da.take()
    return da, db, bytes(all_a), bytes(all_b)


def message_ids(stream: bytes) -> list[int]:
    """Message ids in a stream that starts with a 68-byte handshake (-1 = keep-alive)."""
    ids = []
    pos = 68 if len(stream) >= 68 else len(stream)
    while pos + 4 <= len(stream):
        (length,) = struct.unpack_from(">I", stream, pos)
        ids.append(stream[pos + 4] if length else -1)
        pos += 4 + length
    return ids


def assert_no_payload(stream: bytes, *, role: Role) -> None:
    """Before the peer is verified, a side sends its handshake and extended handshake, and
    an initiator its own auth message (one record, which is all of it): nothing else."""
    _, records = split_wire(stream)
    assert len(records) == (1 if role is Role.INITIATOR else 0), records
    for record in records:
        assert len(record) <= 20 + 6 + 8192 + 512 + 64  # an auth message at most
    assert b"secret layer bytes" not in stream


# --- the good path ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_full_authenticated_handshake(alg: str) -> None:
    issuer = TokenIssuer([SigningKey.generate(alg)], issuer="sidecar-test")
    verifier = TokenVerifier(KeySet.from_jwks(issuer.jwks()), issuer="sidecar-test")
    key_i, key_r = NodeKey.generate(), NodeKey.generate()

    def auth(key: NodeKey, name: str) -> PeerAuthenticator:
        token = issuer.issue(
            subject=name,
            cluster=CLUSTER,
            node_jwk=key.public_jwk(),
            now=NOW,
            scope=[INFO_HASH.hex()],
        )
        return PeerAuthenticator(
            node_key=key, token=token, verifier=verifier, cluster=CLUSTER, clock=lambda: NOW
        )

    a = connection(Role.INITIATOR, auth(key_i, "node-i"))
    b = connection(Role.RESPONDER, auth(key_r, "node-r"))
    da, db, wire_a, wire_b = run(a, b)
    assert a.is_open and b.is_open
    (pa,) = [e for e in da.events if isinstance(e, PeerAuthenticated)]
    (pb,) = [e for e in db.events if isinstance(e, PeerAuthenticated)]
    assert pa.token.subject == "node-r" and pb.token.subject == "node-i"
    assert a.peer_token == pa.token and b.peer_token == pb.token
    # In the clear: handshake and extended handshake only; the rest are records.
    for wire in (wire_a, wire_b):
        ext, records = split_wire(wire)
        assert records and set(ext) >= {b"p2pimage_nonce", b"p2pimage_kx", b"m"}
        assert b"secret layer bytes" not in wire
    assert Bitfield(BITFIELD) in da.events and Bitfield(BITFIELD) in db.events
    assert Piece(0, 0, b"secret layer bytes") in db.events


def test_sequencing_key_exchange_first_responder_last() -> None:
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    a = connection(Role.INITIATOR, honest_authenticator(key_i, issue(key_i)))
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    first = a.data_to_send()  # handshake + extended handshake, pipelined
    assert message_ids(first) == [20]
    b.receive_data(first)
    assert isinstance(b.next_event(), HandshakeReceived)
    b.accept()
    b.next_event()  # a's extended handshake: b has both keys, but reveals nothing yet
    assert b.state is ConnectionState.AWAIT_AUTH
    second = b.data_to_send()
    assert message_ids(second) == [20]  # handshake + extended handshake: no auth
    a.receive_data(second)
    drain_all(a)
    assert a.state is ConnectionState.AWAIT_AUTH
    third = a.data_to_send()  # a's auth message, encrypted
    assert len(split_wire(first + third)[1]) == 1
    b.receive_data(third)
    assert isinstance(b.next_event(), PeerAuthenticated) and b.is_open
    fourth = b.data_to_send()  # only now b's auth message, encrypted
    assert len(split_wire(second + fourth)[1]) == 1
    a.receive_data(fourth)
    assert isinstance(a.next_event(), PeerAuthenticated) and a.is_open


def test_protocol_output_drained_late_is_not_lost() -> None:
    """A caller may drain data_to_send() late: the initiator's opening, still queued
    when the responder's answer arrives, goes out before its auth message, not replaced
    by it. (A twin initiator, same nonce and keys, sends the same opening bytes.)"""
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    token_i = issue(key_i)
    a = connection(Role.INITIATOR, honest_authenticator(key_i, token_i))
    twin = connection(Role.INITIATOR, honest_authenticator(key_i, token_i))
    first = twin.data_to_send()
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    b.receive_data(first)
    assert isinstance(b.next_event(), HandshakeReceived)
    b.accept()
    b.next_event()
    a.receive_data(b.data_to_send())  # a's own opening not drained yet
    drain_all(a)
    assert a.state is ConnectionState.AWAIT_AUTH
    out = a.data_to_send()
    assert out.startswith(first) and len(split_wire(out)[1]) == 1
    b.receive_data(out[len(first) :])
    assert isinstance(b.next_event(), PeerAuthenticated) and b.is_open


def drain_all(conn: PeerConnection) -> list[Any]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


# --- attacks: the honest side refuses, and sends no payload --------------------------------


def _hs256_with_public_key() -> str:
    header = {"alg": "HS256", "typ": "JWT", "kid": SIGNING_KEY.kid}
    attacker = NodeKey.generate()
    claims = {
        "iss": "sidecar-test",
        "aud": "p2pimage",
        "sub": "evil",
        "cluster": CLUSTER,
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 600,
        "jti": "x",
        "cnf": {"jwk": attacker.public_jwk()},
    }
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    # The classic confusion attack: the issuer's *public* key as an HMAC secret.
    public_pem = SIGNING_KEY._key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def _alg_none(key: NodeKey) -> str:
    good = issue(key)
    header = {"alg": "none", "typ": "JWT", "kid": SIGNING_KEY.kid}
    payload = good.split(".")[1]
    return b64url(json.dumps(header).encode()) + "." + payload + "."


def _missing_cnf(key: NodeKey) -> str:
    return SIGNING_KEY.sign_jwt(
        {
            "iss": "sidecar-test",
            "aud": "p2pimage",
            "sub": "evil",
            "cluster": CLUSTER,
            "iat": int(NOW),
            "nbf": int(NOW),
            "exp": int(NOW) + 600,
            "jti": "x",
        }
    )


def _unknown_kid(key: NodeKey) -> str:
    rogue = TokenIssuer([SigningKey.generate()], issuer="sidecar-test")
    return rogue.issue(subject="evil", cluster=CLUSTER, node_jwk=key.public_jwk(), now=NOW)


def _stolen_token(key: NodeKey) -> str:
    """A real token of another node (no longer readable off the wire: say it leaked from
    a log), presented without that node's private key."""
    victim = NodeKey.generate()
    return issue(victim, subject="v")


ATTACKS: dict[str, tuple[Callable[[NodeKey], str], bool, str]] = {
    # name: (token maker, corrupt signature, expected AuthError reason)
    "bad_signature": (lambda k: issue(k), True, "bad_signature"),
    "expired_token": (lambda k: issue(k, now=NOW - 3600), False, "expired"),
    "wrong_cluster": (lambda k: issue(k, cluster="staging"), False, "wrong_cluster"),
    "alg_none": (_alg_none, False, "bad_algorithm"),
    "hs256_public_key_secret": (lambda k: _hs256_with_public_key(), False, "bad_algorithm"),
    "replayed_token_without_private_key": (_stolen_token, False, "bad_signature"),
    "missing_cnf": (_missing_cnf, False, "missing_cnf"),
    "unknown_kid": (_unknown_kid, False, "unknown_kid"),
    "scope_excludes_info_hash": (
        lambda k: issue(k, scope=[hashlib.sha1(b"other").hexdigest()]),
        False,
        "out_of_scope",
    ),
}


@pytest.mark.parametrize("honest_role", [Role.INITIATOR, Role.RESPONDER], ids=lambda r: r.name)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_refused_without_payload(attack: str, honest_role: Role) -> None:
    make_token, corrupt, reason = ATTACKS[attack]
    attacker_key = NodeKey.generate()
    attacker_auth = ForgingAuthenticator(
        make_token(attacker_key), attacker_key, corrupt_signature=corrupt
    )
    honest_key = NodeKey.generate()
    honest = connection(honest_role, honest_authenticator(honest_key, issue(honest_key)))
    attacker_role = Role.RESPONDER if honest_role is Role.INITIATOR else Role.INITIATOR
    attacker = connection(attacker_role, attacker_auth)
    honest_driver = Driver(honest, bytearray(), [])
    attacker_driver = Driver(attacker, bytearray(), [])
    honest_wire = bytearray()
    first, second = (
        (honest_driver, attacker_driver)
        if honest_role is Role.INITIATOR
        else (attacker_driver, honest_driver)
    )
    with pytest.raises(AuthError) as info:
        first.step(b"")
        for _ in range(8):
            out = first.take()
            if first is honest_driver:
                honest_wire += out
            second.step(out)
            out = second.take()
            if second is honest_driver:
                honest_wire += out
            first.step(out)
    assert info.value.reason == reason
    honest_wire += honest_driver.take()
    assert honest.state is ConnectionState.CLOSED and not honest.is_open
    assert not any(isinstance(e, PeerAuthenticated) for e in honest_driver.events)
    assert_no_payload(bytes(honest_wire), role=honest_role)
    # The attacker decrypted everything the honest side sent it: no payload, and the
    # honest responder's token never (it refused the attacker first).
    assert not any(isinstance(e, Bitfield | Piece) for e in attacker_driver.events)
    if honest_role is Role.RESPONDER:
        assert attacker_auth.tokens_seen == []
    with pytest.raises(LocalProtocolError):
        honest.send(Bitfield(BITFIELD))
    with pytest.raises(RemoteProtocolError):
        honest.next_event()


def session_keys(id_i: bytes, id_r: bytes) -> tuple[bytes, bytes]:
    """(initiator->responder, responder->initiator) record keys of a handshake between
    ``connection()``s (KX_I, KX_R, NONCE_I, NONCE_R): what an endpoint can compute."""
    context = handshake_context(
        info_hash=INFO_HASH,
        initiator_peer_id=id_i,
        responder_peer_id=id_r,
        initiator_nonce=NONCE_I,
        responder_nonce=NONCE_R,
        initiator_kx=kx_public_key(KX_I),
        responder_kx=kx_public_key(KX_R),
    )
    return derive_keys(
        our_role=Role.INITIATOR, private=KX_I, peer_public=kx_public_key(KX_R), context=context
    )


def test_reflected_auth_message_is_refused() -> None:
    """A responder that echoes the initiator's own token and signature back fails: the
    transcript names the signer's role."""
    key = NodeKey.generate()
    honest = connection(Role.INITIATOR, honest_authenticator(key, issue(key)))
    assert message_ids(honest.data_to_send()) == [20]
    fake_id = bound_peer_id("node", NodeKey.generate().public_jwk())
    honest.receive_data(
        build_handshake(INFO_HASH, fake_id, extensions=True)
        + build_extended_handshake(
            {b"p2pimage_auth_v3": 3},
            client=None,
            reqq=None,
            nonce=NONCE_R,
            kx=kx_public_key(KX_R),
        )
    )
    drain_all(honest)
    i2r, r2i = session_keys(honest.our_peer_id, fake_id)
    auth_frame = RecordReader(i2r).feed(honest.data_to_send())
    assert auth_frame[4] == 20 and auth_frame[5] == 3
    # Echo it to the id the honest side advertised for its own auth extension (1).
    honest.receive_data(RecordWriter(r2i).seal(auth_frame[:5] + b"\x01" + auth_frame[6:]))
    with pytest.raises(AuthError) as info:
        honest.next_event()
    assert info.value.reason == "bad_signature"
    assert not honest.is_open


# --- sequencing violations ---------------------------------------------------------------------


def _attacker_frames() -> tuple[PeerConnection, bytes, bytes, bytes, Callable[[], RecordWriter]]:
    """An honest RESPONDER; a legitimate initiator's handshake, extended handshake and
    (decrypted) auth message; and a factory of that initiator's record writer."""
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    auth_i = honest_authenticator(key_i, issue(key_i))
    a = connection(Role.INITIATOR, auth_i)
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    _, _, wire_a, _ = run(a, b)
    hs = wire_a[:68]
    ext_len = struct.unpack_from(">I", wire_a, 68)[0] + 4
    ext = wire_a[68 : 68 + ext_len]
    _, records = split_wire(wire_a)
    victim = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    i2r, _ = session_keys(a.our_peer_id, victim.our_peer_id)
    auth = RecordReader(i2r).feed(records[0])
    assert auth[4] == 20 and auth[5] == 1
    return victim, hs, ext, auth, lambda: RecordWriter(i2r)


def _feed_until_error(
    conn: PeerConnection, data: bytes, *, authenticated_first: bool = False
) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        while True:
            event = conn.next_event()
            assert event is not NEED_DATA, "the connection accepted the sequence"
            assert authenticated_first or not isinstance(event, PeerAuthenticated)
            if isinstance(event, HandshakeReceived):
                conn.accept(num_pieces=NUM_PIECES)
    assert conn.state is ConnectionState.CLOSED
    out = conn.data_to_send()
    if not authenticated_first:
        assert_no_payload(b"\x00" * 68 + out[68:], role=Role.RESPONDER)
    return info.value


def test_valid_sequence_is_accepted() -> None:
    victim, hs, ext, auth, writer = _attacker_frames()
    victim.receive_data(hs + ext + writer().seal(auth))
    events = []
    while (event := victim.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, HandshakeReceived):
            victim.accept()
    assert isinstance(events[-1], PeerAuthenticated)


def test_auth_before_extended_handshake() -> None:
    victim, hs, ext, auth, _ = _attacker_frames()
    err = _feed_until_error(victim, hs + auth + ext)
    assert "before its extended handshake" in str(err)


def test_auth_in_the_clear_after_the_extended_handshake() -> None:
    victim, hs, ext, auth, _ = _attacker_frames()
    err = _feed_until_error(victim, hs + ext + auth)
    assert "record" in str(err)


def test_auth_sent_twice() -> None:
    victim, hs, ext, auth, writer = _attacker_frames()
    err = _feed_until_error(victim, hs + ext + writer().seal(auth + auth), authenticated_first=True)
    assert "second auth" in str(err)


def test_replayed_auth_record_is_refused() -> None:
    """The same encrypted auth message twice: the second fails its record tag."""
    victim, hs, ext, auth, writer = _attacker_frames()
    record = writer().seal(auth)
    err = _feed_until_error(victim, hs + ext + record + record, authenticated_first=True)
    assert "record failed authentication" in str(err)


def test_auth_message_replayed_into_another_connection_is_refused() -> None:
    """A peer that received a node's (decrypted) auth message in one connection replays
    it in another, sealed properly: the signature covers the first connection's nonces
    and keys, so it fails."""
    victim, hs, ext, auth, _ = _attacker_frames()
    fresh_nonce = bytes(32 * [9])
    payload = bdecode(ext[6:])
    assert isinstance(payload, dict)
    payload[b"p2pimage_nonce"] = fresh_nonce
    ext2 = build_extended(0, bencode(payload))
    context = handshake_context(
        info_hash=INFO_HASH,
        initiator_peer_id=hs[48:68],
        responder_peer_id=victim.our_peer_id,
        initiator_nonce=fresh_nonce,
        responder_nonce=NONCE_R,
        initiator_kx=kx_public_key(KX_I),
        responder_kx=kx_public_key(KX_R),
    )
    i2r, _ = derive_keys(
        our_role=Role.INITIATOR, private=KX_I, peer_public=kx_public_key(KX_R), context=context
    )
    victim.receive_data(hs + ext2 + RecordWriter(i2r).seal(auth))
    with pytest.raises(AuthError) as info:
        drain_all_accepting(victim)
    assert info.value.reason == "bad_signature"
    assert not victim.is_open


@pytest.mark.parametrize("field", [b"token", b"sig"])
def test_altered_auth_message_is_refused(field: bytes) -> None:
    victim, hs, ext, auth, writer = _attacker_frames()
    payload = bdecode(auth[6:])
    assert isinstance(payload, dict)
    value = bytearray(payload[field])
    value[len(value) // 2] ^= 0x01
    payload[field] = bytes(value)
    altered = build_extended(1, bencode(payload))
    victim.receive_data(hs + ext + writer().seal(altered))
    with pytest.raises(RemoteProtocolError):
        drain_all_accepting(victim)
    assert not victim.is_open and victim.peer_token is None


def drain_all_accepting(conn: PeerConnection) -> list[Any]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, HandshakeReceived):
            conn.accept(num_pieces=NUM_PIECES)
    return events


def test_peer_id_must_be_the_one_the_token_binds() -> None:
    """A member with a valid token and key posing under another peer id is refused."""
    key = NodeKey.generate()
    honest_key = NodeKey.generate()
    impostor = PeerConnection(
        Role.INITIATOR,
        peer_id=bound_peer_id("someone-else", key.public_jwk()),
        authenticator=honest_authenticator(key, issue(key)),
        nonce=NONCE_I,
        kx_key=KX_I,
        info_hash=INFO_HASH,
    )
    honest = connection(Role.RESPONDER, honest_authenticator(honest_key, issue(honest_key)))
    with pytest.raises(AuthError) as info:
        run(impostor, honest)
    assert info.value.reason == "wrong_peer_id"
    assert not honest.is_open


def test_extended_handshake_without_nonce() -> None:
    victim, hs, _, auth, writer = _attacker_frames()
    ext = build_extended_handshake(
        {b"p2pimage_auth_v3": 1}, client=None, reqq=None, nonce=None, kx=kx_public_key(KX_I)
    )
    err = _feed_until_error(victim, hs + ext + writer().seal(auth))
    assert "nonce" in str(err)


def test_extended_handshake_without_key_exchange() -> None:
    victim, hs, _, auth, writer = _attacker_frames()
    ext = build_extended_handshake({b"p2pimage_auth_v3": 1}, client=None, reqq=None, nonce=NONCE_I)
    err = _feed_until_error(victim, hs + ext + writer().seal(auth))
    assert "key-exchange key" in str(err)


def test_extended_handshake_without_auth_extension() -> None:
    victim, hs, _, auth, writer = _attacker_frames()
    ext = build_extended_handshake({}, client=None, reqq=None, nonce=NONCE_I)
    err = _feed_until_error(victim, hs + ext + writer().seal(auth))
    assert "p2pimage_auth_v3" in str(err)


@pytest.mark.parametrize(("name", "version"), [(b"p2pimage_auth", 2), (b"p2pimage_auth_v4", 4)])
def test_a_peer_of_another_version_is_refused_by_name(name: bytes, version: int) -> None:
    victim, hs, _, _, _ = _attacker_frames()
    ext = build_extended_handshake(
        {name: 1}, client=None, reqq=None, nonce=NONCE_I, kx=kx_public_key(KX_I)
    )
    err = _feed_until_error(victim, hs + ext)
    assert isinstance(err, ProtocolVersionError) and err.peer_version == version
    assert f"v{version}" in str(err) and "v3" in str(err)


def test_second_extended_handshake_before_auth() -> None:
    victim, hs, ext, auth, writer = _attacker_frames()
    err = _feed_until_error(victim, hs + ext + writer().seal(ext + auth))
    assert "second extended handshake" in str(err)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00\x00\x03\x05\xff\xf0",  # bitfield
        b"\x00\x00\x00\x05\x04\x00\x00\x00\x01",  # have
        b"\x00\x00\x00\x0d\x06" + struct.pack(">III", 0, 0, 16384),  # request
        b"\x00\x00\x00\x0c\x07" + struct.pack(">II", 0, 0) + b"abc",  # piece
        b"\x00\x00\x00\x01\x01",  # unchoke
        b"\x00\x00\x00\x00",  # keep-alive
    ],
)
@pytest.mark.parametrize("where", ["before_ext_handshake", "before_auth"])
def test_payload_messages_before_auth_close_the_connection(frame: bytes, where: str) -> None:
    victim, hs, ext, auth, writer = _attacker_frames()
    if where == "before_ext_handshake":
        data = hs + frame + ext + writer().seal(auth)
    else:
        data = hs + ext + writer().seal(frame + auth)
    err = _feed_until_error(victim, data)
    assert "before authentication" in str(err)


def test_auth_message_missing_fields() -> None:
    victim, hs, ext, _, writer = _attacker_frames()
    bogus = build_extended(1, bencode({b"token": b"a.b.c"}))
    err = _feed_until_error(victim, hs + ext + writer().seal(bogus))
    assert "signature" in str(err)


def test_peer_without_extension_bit_is_refused() -> None:
    key = NodeKey.generate()
    honest = connection(Role.INITIATOR, honest_authenticator(key, issue(key)))
    err = _feed_until_error(honest, build_handshake(INFO_HASH, ID_R, extensions=False))
    assert "BEP 10" in str(err)


def test_initiator_refuses_other_info_hash() -> None:
    key = NodeKey.generate()
    honest = connection(Role.INITIATOR, honest_authenticator(key, issue(key)))
    _feed_until_error(honest, build_handshake(b"\x00" * 20, ID_R, extensions=True))


def test_transcript_binds_each_field() -> None:
    base = {
        "info_hash": INFO_HASH,
        "initiator_peer_id": ID_I,
        "responder_peer_id": ID_R,
        "initiator_nonce": NONCE_I,
        "responder_nonce": NONCE_R,
        "initiator_kx": b"\x11" * 32,
        "responder_kx": b"\x22" * 32,
    }
    variants = {
        "info_hash": b"\x00" * 20,
        "initiator_peer_id": ID_R,
        "responder_peer_id": ID_I,
        "initiator_nonce": NONCE_R,
        "responder_nonce": NONCE_I,
        "initiator_kx": b"\x33" * 32,
        "responder_kx": b"\x44" * 32,
        "encrypted": False,
    }
    contexts = {handshake_context(**base)}
    for name, value in variants.items():
        contexts.add(handshake_context(**(base | {name: value})))
    assert len(contexts) == 1 + len(variants)
    context = handshake_context(**base)
    signed = {auth_transcript(signer=r, context=context) for r in Role}
    assert len(signed) == 2


# --- what an unauthenticated connector gets to read ---------------------------------------


def _responder_facing(opening_tail: bytes) -> tuple[PeerConnection, bytes]:
    """An honest responder fed a real initiator's handshake and extended handshake, then
    ``opening_tail``; returns it and everything it wrote."""
    victim, hs, ext, _, _ = _attacker_frames()
    out = bytearray()
    victim.receive_data(hs + ext)
    drain_all_accepting(victim)
    out += victim.data_to_send()
    if opening_tail:
        with contextlib.suppress(RemoteProtocolError):
            victim.receive_data(opening_tail)
            drain_all_accepting(victim)
    with contextlib.suppress(LocalProtocolError):
        out += victim.data_to_send()
    return victim, bytes(out)


def test_a_connector_that_never_authenticates_gets_no_token() -> None:
    victim, out = _responder_facing(b"")
    assert victim.state is ConnectionState.AWAIT_AUTH
    ext, records = split_wire(out)
    assert records == [] and b"token" not in ext and b"sig" not in ext


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=600))
def test_whatever_an_unverified_connector_sends_the_responder_reveals_nothing(
    tail: bytes,
) -> None:
    """Garbage after the key exchange (it cannot forge an auth record without a key the
    honest initiator holds) closes the connection or waits: never a responder record."""
    victim, out = _responder_facing(tail)
    _, records = split_wire(out)
    assert records == [] and not victim.is_open


# --- edges of the auth message and the handshake context (mutation testing) -------------


def _auth_with(token: Any, sig: Any) -> tuple[PeerConnection, bytes]:
    """A victim responder, and the initiator's opening with an auth message carrying
    ``token`` and ``sig`` (the real ones where given as None)."""
    victim, hs, ext, auth, writer = _attacker_frames()
    payload = bdecode(auth[6:])
    assert isinstance(payload, dict)
    if token is not None:
        payload[b"token"] = token
    if sig is not None:
        payload[b"sig"] = sig
    return victim, hs + ext + writer().seal(build_extended(1, bencode(payload)))


@pytest.mark.parametrize(
    ("token", "sig", "refusal"),
    [
        (5, None, "lacks a token"),
        ([b"a.b.c"], None, "lacks a token"),
        (b"", None, "lacks a token"),
        (b"x" * (MAX_AUTH_TOKEN_LENGTH + 1), None, "lacks a token"),
        (None, 7, "lacks a signature"),
        (None, b"", "lacks a signature"),
        (None, b"s" * (MAX_AUTH_SIGNATURE_LENGTH + 1), "lacks a signature"),
    ],
)
def test_auth_message_fields_of_the_wrong_type_or_size(token: Any, sig: Any, refusal: str) -> None:
    """Refused as a protocol error naming the field, before any verification."""
    victim, data = _auth_with(token, sig)
    err = _feed_until_error(victim, data)
    assert type(err) is RemoteProtocolError and refusal in str(err)


@pytest.mark.parametrize(
    ("token", "sig"),
    [
        (b"x", None),
        (b"x" * MAX_AUTH_TOKEN_LENGTH, None),
        (None, b"s"),
        (None, b"s" * MAX_AUTH_SIGNATURE_LENGTH),
    ],
)
def test_auth_message_fields_within_their_size_reach_verification(token: Any, sig: Any) -> None:
    """A token or signature of 1 byte or of the maximum length is not refused for its
    size: verification refuses it (AuthError), not the frame check."""
    victim, data = _auth_with(token, sig)
    victim.receive_data(data)
    with pytest.raises(AuthError):
        drain_all_accepting(victim)
    assert not victim.is_open and victim.peer_token is None


def test_extended_handshake_resent_after_auth_with_more_behind_it() -> None:
    """An extended handshake re-sent once open (BEP 10) is parsed to its own end: the
    message in the same record behind it is the next event."""
    victim, hs, ext, auth, writer = _attacker_frames()
    w = writer()
    victim.receive_data(hs + ext + w.seal(auth))
    assert isinstance(drain_all_accepting(victim)[-1], PeerAuthenticated)
    victim.receive_data(w.seal(ext + b"\x00\x00\x00\x01\x02"))  # then "interested"
    events = drain_all_accepting(victim)
    assert [type(e).__name__ for e in events] == ["ExtendedHandshake", "Interested"]
    assert victim.is_open


def _context(mode: bytes, id_i: bytes, id_r: bytes) -> bytes:
    """The handshake context as docs/protocol.md §3.2 writes it, built by hand."""
    return b"".join(
        (INFO_HASH, id_i, id_r, NONCE_I, NONCE_R, kx_public_key(KX_I), kx_public_key(KX_R), mode)
    )


def test_handshake_context_known_answer() -> None:
    fields = {
        "info_hash": INFO_HASH,
        "initiator_peer_id": ID_I,
        "responder_peer_id": ID_R,
        "initiator_nonce": NONCE_I,
        "responder_nonce": NONCE_R,
        "initiator_kx": kx_public_key(KX_I),
        "responder_kx": kx_public_key(KX_R),
    }
    assert handshake_context(**fields) == _context(b"E", ID_I, ID_R)
    assert handshake_context(**fields, encrypted=True) == _context(b"E", ID_I, ID_R)
    assert handshake_context(**fields, encrypted=False) == _context(b"P", ID_I, ID_R)
    assert len(_context(b"P", ID_I, ID_R)) == 20 * 3 + 32 * 4 + 1


@pytest.mark.parametrize("encrypt", [True, False])
def test_record_keys_come_from_the_context_naming_the_mode(encrypt: bool) -> None:
    """A responder in either mode accepts the initiator's auth message sealed under the
    keys of the documented context with its own mode byte, and refuses it under the
    other mode's."""
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    a = connection(Role.INITIATOR, honest_authenticator(key_i, issue(key_i)), encrypt=encrypt)
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)), encrypt=encrypt)
    _, _, wire_a, _ = run(a, b)
    ext_end = 72 + struct.unpack_from(">I", wire_a, 68)[0]
    hs, ext = wire_a[:68], wire_a[68:ext_end]
    records = split_wire(wire_a)[1]
    own = _context(b"E" if encrypt else b"P", a.our_peer_id, b.our_peer_id)
    i2r, _ = derive_keys(
        our_role=Role.INITIATOR, private=KX_I, peer_public=kx_public_key(KX_R), context=own
    )
    auth = RecordReader(i2r).feed(records[0])
    assert auth[4] == 20
    for mode in (b"E", b"P"):
        victim = connection(
            Role.RESPONDER, honest_authenticator(key_r, issue(key_r)), encrypt=encrypt
        )
        context = _context(mode, a.our_peer_id, victim.our_peer_id)
        i2r, _ = derive_keys(
            our_role=Role.INITIATOR, private=KX_I, peer_public=kx_public_key(KX_R), context=context
        )
        victim.receive_data(hs + ext + RecordWriter(i2r).seal(auth))
        if mode == (b"E" if encrypt else b"P"):
            assert isinstance(drain_all_accepting(victim)[-1], PeerAuthenticated)
            assert victim.encrypted is encrypt
        else:
            with pytest.raises(RemoteProtocolError, match="record failed authentication"):
                drain_all_accepting(victim)
