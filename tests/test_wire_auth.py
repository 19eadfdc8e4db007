"""Authenticated handshakes between two in-memory PeerConnections, with the real
p2pimage.auth.tokens.

Every attack below must end with the honest side raising a clear AuthError or
RemoteProtocolError, and with ZERO bitfield/have/piece bytes written by the honest side
even though its driver tries to send them the moment the connection says it is open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
)
from p2pimage.errors import AuthError, LocalProtocolError, RemoteProtocolError
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
from p2pimage.wire._codec import build_extended, build_extended_handshake, build_handshake

NOW = 1_800_000_000.0
CLUSTER = "prod"
INFO_HASH = hashlib.sha1(b"layer").digest()
ID_I = b"-PI0001-initiator000"
ID_R = b"-PI0001-responder000"
NONCE_I = bytes(range(32))
NONCE_R = bytes(range(32, 64))
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

    def credentials(self, transcript: bytes) -> tuple[bytes, bytes]:
        sig = self.key.sign(transcript)
        if self.corrupt:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return self.token.encode(), sig

    def verify_peer(
        self, token: bytes, signature: bytes, transcript: bytes, info_hash: bytes
    ) -> Any:
        return VERIFIER.verify(token, now=NOW + 10, cluster=CLUSTER, info_hash=info_hash)


def connection(role: Role, auth: Any) -> PeerConnection:
    if role is Role.INITIATOR:
        return PeerConnection(
            role, peer_id=ID_I, authenticator=auth, nonce=NONCE_I, info_hash=INFO_HASH
        )
    return PeerConnection(role, peer_id=ID_R, authenticator=auth, nonce=NONCE_R)


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
                self.wire += self.conn.send(Bitfield(BITFIELD))
                self.wire += self.conn.send(Piece(0, 0, b"secret layer bytes"))
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


def assert_no_payload(stream: bytes) -> None:
    ids = message_ids(stream)
    assert set(ids) <= {20}, f"honest side sent non-extended messages: {ids}"
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
    # Each side's payload arrived, after its auth message: 20 (ext hs), 20 (auth), 5, 7.
    assert message_ids(wire_a) == [20, 20, 5, 7]
    assert message_ids(wire_b) == [20, 20, 5, 7]
    assert Bitfield(BITFIELD) in da.events and Bitfield(BITFIELD) in db.events
    assert Piece(0, 0, b"secret layer bytes") in db.events


def test_sequencing_is_one_and_a_half_round_trips() -> None:
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    a = connection(Role.INITIATOR, honest_authenticator(key_i, issue(key_i)))
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    first = a.data_to_send()  # handshake + extended handshake, pipelined
    assert message_ids(first) == [20]
    b.receive_data(first)
    assert isinstance(b.next_event(), HandshakeReceived)
    b.accept()
    b.next_event()  # a's extended handshake: b knows both nonces and signs
    assert b.state is ConnectionState.AWAIT_AUTH
    second = b.data_to_send()
    assert message_ids(second) == [20, 20]  # extended handshake + auth
    a.receive_data(second)
    events = []
    while (event := a.next_event()) is not NEED_DATA:
        events.append(event)
    assert isinstance(events[-1], PeerAuthenticated) and a.is_open
    b.receive_data(a.data_to_send())
    assert isinstance(b.next_event(), PeerAuthenticated) and b.is_open


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
    """A real token of another node, copied off the wire of a legitimate session."""
    victim = NodeKey.generate()
    a = connection(Role.INITIATOR, honest_authenticator(victim, issue(victim, subject="v")))
    other = NodeKey.generate()
    b = connection(Role.RESPONDER, honest_authenticator(other, issue(other)))
    _, _, wire_a, _ = run(a, b)
    ext_len = struct.unpack_from(">I", wire_a, 68)[0] + 4
    auth_frame = wire_a[68 + ext_len :]
    (length,) = struct.unpack_from(">I", auth_frame)
    payload = bdecode(auth_frame[6 : 4 + length])
    assert isinstance(payload, dict)
    token = payload[b"token"]
    assert isinstance(token, bytes)
    return token.decode()


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
    assert_no_payload(bytes(honest_wire))
    with pytest.raises(LocalProtocolError):
        honest.send(Bitfield(BITFIELD))
    with pytest.raises(RemoteProtocolError):
        honest.next_event()


def test_reflected_auth_message_is_refused() -> None:
    """A responder that echoes the initiator's own token and signature back fails: the
    transcript names the signer's role."""
    key = NodeKey.generate()
    honest = connection(Role.INITIATOR, honest_authenticator(key, issue(key)))
    out = honest.data_to_send()
    assert message_ids(out) == [20]
    honest.receive_data(
        build_handshake(INFO_HASH, ID_R, extensions=True)
        + build_extended_handshake({b"p2pimage_auth": 3}, client=None, reqq=None, nonce=NONCE_R)
    )
    while honest.next_event() is not NEED_DATA:
        pass
    auth_frame = honest.data_to_send()
    assert message_ids(b"\x00" * 68 + auth_frame) == [20] and auth_frame[5] == 3
    # Echo it to the id the honest side advertised for its own auth extension (1).
    reflected = auth_frame[:5] + b"\x01" + auth_frame[6:]
    honest.receive_data(reflected)
    with pytest.raises(AuthError) as info:
        honest.next_event()
    assert info.value.reason == "bad_signature"
    assert not honest.is_open


# --- sequencing violations ---------------------------------------------------------------------


def _attacker_frames() -> tuple[PeerConnection, bytes, bytes, bytes]:
    """An honest RESPONDER, plus a legitimate initiator's handshake, ext handshake and auth."""
    key_i, key_r = NodeKey.generate(), NodeKey.generate()
    a = connection(Role.INITIATOR, honest_authenticator(key_i, issue(key_i)))
    b = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    _, _, wire_a, _ = run(a, b)
    hs, rest = wire_a[:68], wire_a[68:]
    ext_len = struct.unpack_from(">I", rest)[0] + 4
    ext, rest = rest[:ext_len], rest[ext_len:]
    auth_len = struct.unpack_from(">I", rest)[0] + 4
    auth = rest[:auth_len]
    victim = connection(Role.RESPONDER, honest_authenticator(key_r, issue(key_r)))
    return victim, hs, ext, auth


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
    assert_no_payload(b"\x00" * 68 + conn.data_to_send()[68:])
    return info.value


def test_valid_sequence_is_accepted() -> None:
    victim, hs, ext, auth = _attacker_frames()
    victim.receive_data(hs + ext + auth)
    events = []
    while (event := victim.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, HandshakeReceived):
            victim.accept()
    assert isinstance(events[-1], PeerAuthenticated)


def test_auth_before_extended_handshake() -> None:
    victim, hs, ext, auth = _attacker_frames()
    err = _feed_until_error(victim, hs + auth + ext)
    assert "before its extended handshake" in str(err)


def test_auth_sent_twice() -> None:
    victim, hs, ext, auth = _attacker_frames()
    err = _feed_until_error(victim, hs + ext + auth + auth, authenticated_first=True)
    assert "second auth" in str(err)


def test_extended_handshake_without_nonce() -> None:
    victim, hs, _, auth = _attacker_frames()
    ext = build_extended_handshake({b"p2pimage_auth": 1}, client=None, reqq=None, nonce=None)
    err = _feed_until_error(victim, hs + ext + auth)
    assert "nonce" in str(err)


def test_extended_handshake_without_auth_extension() -> None:
    victim, hs, _, auth = _attacker_frames()
    ext = build_extended_handshake({}, client=None, reqq=None, nonce=NONCE_I)
    err = _feed_until_error(victim, hs + ext + auth)
    assert "p2pimage_auth" in str(err)


def test_second_extended_handshake_before_auth() -> None:
    victim, hs, ext, auth = _attacker_frames()
    _feed_until_error(victim, hs + ext + ext + auth)


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
    victim, hs, ext, auth = _attacker_frames()
    data = hs + frame + ext + auth if where == "before_ext_handshake" else hs + ext + frame + auth
    err = _feed_until_error(victim, data)
    assert "before authentication" in str(err)


def test_auth_message_missing_fields() -> None:
    victim, hs, ext, _ = _attacker_frames()
    bogus = build_extended(1, bencode({b"token": b"a.b.c"}))
    err = _feed_until_error(victim, hs + ext + bogus)
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
        "signer": Role.INITIATOR,
        "info_hash": INFO_HASH,
        "initiator_peer_id": ID_I,
        "responder_peer_id": ID_R,
        "initiator_nonce": NONCE_I,
        "responder_nonce": NONCE_R,
    }
    variants = {
        "signer": Role.RESPONDER,
        "info_hash": b"\x00" * 20,
        "initiator_peer_id": ID_R,
        "responder_peer_id": ID_I,
        "initiator_nonce": NONCE_R,
        "responder_nonce": NONCE_I,
        "initiator_kx": b"\x11" * 32,
        "responder_kx": b"\x22" * 32,
    }
    seen = {auth_transcript(**base)}
    for name, value in variants.items():
        seen.add(auth_transcript(**(base | {name: value})))
    assert len(seen) == 1 + len(variants)
