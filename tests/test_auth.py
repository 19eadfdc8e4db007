"""Node tokens: issuing, verifying, and every way a token must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.auth.tokens import (
    AUDIENCE,
    KeySet,
    NodeKey,
    PeerAuthenticator,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    bound_peer_id,
    jwk_thumbprint,
    verify_jwk_signature,
)
from p2pimage.errors import AuthError, RemoteProtocolError

NOW = 1_800_000_000.0
INFO_HASH = bytes(range(20))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(params=["EdDSA", "ES256"])
def issuer(request: pytest.FixtureRequest) -> TokenIssuer:
    return TokenIssuer([SigningKey.generate(request.param)], issuer="sidecar-test")


@pytest.fixture
def node_key() -> NodeKey:
    return NodeKey.generate()


def verifier_for(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(KeySet.from_jwks(issuer.jwks()), issuer="sidecar-test")


def test_issue_and_verify_round_trip(issuer: TokenIssuer, node_key: NodeKey) -> None:
    token = issuer.issue(
        subject="node-1", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW, zone="a"
    )
    claims = verifier_for(issuer).verify(token, now=NOW + 5, cluster="prod")
    assert claims.subject == "node-1"
    assert claims.cluster == "prod"
    assert claims.zone == "a"
    assert claims.expires_at == int(NOW) + issuer.lifetime_s
    assert jwk_thumbprint(claims.cnf_jwk) == jwk_thumbprint(node_key.public_jwk())
    assert claims.covers(INFO_HASH)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda v, t: v.verify(t, now=NOW + 10_000), "expired"),
        (lambda v, t: v.verify(t, now=NOW - 10_000), "not_yet_valid"),
        (lambda v, t: v.verify(t, now=NOW, cluster="other"), "wrong_cluster"),
        (
            lambda v, t: v.verify(t[:-4] + ("AAAA" if t[-4:] != "AAAA" else "BBBB"), now=NOW),
            "bad_signature",
        ),
        (lambda v, t: v.verify("not-a-token", now=NOW), "malformed"),
        (lambda v, t: v.verify(b"\xff\xfe.a.b", now=NOW), "malformed"),
    ],
)
def test_refusals(issuer: TokenIssuer, node_key: NodeKey, mutate: Any, reason: str) -> None:
    token = issuer.issue(subject="n", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    with pytest.raises(AuthError) as info:
        mutate(verifier_for(issuer), token)
    assert info.value.reason == reason


def test_leeway_accepts_small_skew(issuer: TokenIssuer, node_key: NodeKey) -> None:
    token = issuer.issue(subject="n", cluster="c", node_jwk=node_key.public_jwk(), now=NOW)
    verifier_for(issuer).verify(token, now=NOW + issuer.lifetime_s + 10)
    verifier_for(issuer).verify(token, now=NOW - 10)


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return signing_input + "." + b64url(sign(signing_input.encode()))


def _claims(node_key: NodeKey, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "sidecar-test",
        "aud": AUDIENCE,
        "sub": "evil",
        "cluster": "prod",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 600,
        "jti": "x",
        "cnf": {"jwk": node_key.public_jwk()},
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def test_alg_none_refused(issuer: TokenIssuer, node_key: NodeKey) -> None:
    kid = issuer.active_key.kid
    token = _forge({"alg": "none", "kid": kid}, _claims(node_key), lambda _: b"")
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(token, now=NOW)
    assert info.value.reason == "bad_algorithm"


def test_hs256_with_public_key_as_secret_refused(issuer: TokenIssuer, node_key: NodeKey) -> None:
    kid = issuer.active_key.kid
    secret = json.dumps(issuer.active_key.public_jwk()).encode()
    token = _forge(
        {"alg": "HS256", "kid": kid, "typ": "JWT"},
        _claims(node_key),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(token, now=NOW)
    assert info.value.reason == "bad_algorithm"


def test_unknown_kid_refused(issuer: TokenIssuer, node_key: NodeKey) -> None:
    other = TokenIssuer([SigningKey.generate()], issuer="sidecar-test")
    token = other.issue(subject="n", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(token, now=NOW)
    assert info.value.reason == "unknown_kid"


def test_missing_cnf_refused(node_key: NodeKey) -> None:
    key = SigningKey.generate()
    issuer = TokenIssuer([key], issuer="sidecar-test")
    token = key.sign_jwt(_claims(node_key, cnf=None))
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(token, now=NOW)
    assert info.value.reason == "missing_cnf"


def test_wrong_audience_and_issuer_refused(node_key: NodeKey) -> None:
    key = SigningKey.generate()
    issuer = TokenIssuer([key], issuer="sidecar-test")
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(key.sign_jwt(_claims(node_key, aud="registry")), now=NOW)
    assert info.value.reason == "wrong_audience"
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(key.sign_jwt(_claims(node_key, iss="someone")), now=NOW)
    assert info.value.reason == "wrong_issuer"


def test_scope_must_cover_info_hash(node_key: NodeKey) -> None:
    issuer = TokenIssuer([SigningKey.generate()], issuer="sidecar-test")
    token = issuer.issue(
        subject="n",
        cluster="prod",
        node_jwk=node_key.public_jwk(),
        now=NOW,
        scope=[INFO_HASH.hex()],
    )
    verifier = verifier_for(issuer)
    assert verifier.verify(token, now=NOW, info_hash=INFO_HASH).scope == {INFO_HASH.hex()}
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=NOW, info_hash=b"\x01" * 20)
    assert info.value.reason == "out_of_scope"


def test_rotation_old_tokens_verify_new_tokens_use_new_kid(node_key: NodeKey) -> None:
    old = SigningKey.generate()
    before = TokenIssuer([old], issuer="sidecar-test")
    old_token = before.issue(subject="n", cluster="c", node_jwk=node_key.public_jwk(), now=NOW)
    new = SigningKey.generate("ES256")
    after = TokenIssuer([new, old], issuer="sidecar-test")
    new_token = after.issue(subject="n", cluster="c", node_jwk=node_key.public_jwk(), now=NOW)
    verifier = verifier_for(after)
    assert verifier.verify(old_token, now=NOW).subject == "n"
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    assert verifier.verify(new_token, now=NOW).subject == "n"
    # Once the old key is withdrawn, its tokens stop verifying.
    with pytest.raises(AuthError):
        verifier_for(TokenIssuer([new], issuer="sidecar-test")).verify(old_token, now=NOW)


def test_pem_round_trip() -> None:
    for alg in ("EdDSA", "ES256"):
        key = SigningKey.generate(alg)
        again = SigningKey.from_pem(key.to_pem())
        assert again.kid == key.kid and again.alg == alg
    node = NodeKey.generate()
    assert NodeKey.from_pem(node.to_pem()).public_jwk() == node.public_jwk()


def test_proof_of_possession(issuer: TokenIssuer) -> None:
    alice, mallory = NodeKey.generate(), NodeKey.generate()
    token = issuer.issue(subject="alice", cluster="prod", node_jwk=alice.public_jwk(), now=NOW)
    verifier = verifier_for(issuer)
    honest = PeerAuthenticator(
        node_key=alice, token=token, verifier=verifier, cluster="prod", clock=lambda: NOW
    )
    alice_id = honest.peer_id()
    assert alice_id == bound_peer_id("alice", alice.public_jwk())
    tok, sig = honest.credentials(b"transcript")
    assert honest.verify_peer(tok, sig, b"transcript", INFO_HASH, alice_id).subject == "alice"
    # Alice's own proof under another peer id (Mallory's, say) is refused.
    with pytest.raises(AuthError) as info:
        honest.verify_peer(
            tok, sig, b"transcript", INFO_HASH, bound_peer_id("alice", mallory.public_jwk())
        )
    assert info.value.reason == "wrong_peer_id"
    # The same token presented by a node without Alice's private key fails.
    thief = PeerAuthenticator(
        node_key=mallory, token=token, verifier=verifier, cluster="prod", clock=lambda: NOW
    )
    tok, sig = thief.credentials(b"transcript")
    with pytest.raises(AuthError) as info:
        honest.verify_peer(tok, sig, b"transcript", INFO_HASH, alice_id)
    assert info.value.reason == "bad_signature"
    # A signature over another transcript does not carry over.
    tok, sig = honest.credentials(b"other transcript")
    with pytest.raises(AuthError):
        honest.verify_peer(tok, sig, b"transcript", INFO_HASH, alice_id)


def test_verify_jwk_signature_rejects_garbage_keys() -> None:
    with pytest.raises(AuthError):
        verify_jwk_signature({"kty": "OKP", "crv": "Ed25519", "x": "short"}, b"s", b"d")
    with pytest.raises(AuthError):
        verify_jwk_signature({"kty": "RSA"}, b"s", b"d")


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_garbage_tokens_raise_only_auth_error(data: bytes | str) -> None:
    issuer = TokenIssuer([SigningKey(_FIXED_KEY._key)], issuer="sidecar-test")
    with pytest.raises(RemoteProtocolError):
        verifier_for(issuer).verify(data, now=NOW)


@settings(max_examples=300)
@given(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_", max_size=80),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_", max_size=80),
)
def test_three_part_garbage_raises_only_auth_error(a: str, b: str) -> None:
    issuer = TokenIssuer([SigningKey(_FIXED_KEY._key)], issuer="sidecar-test")
    with pytest.raises(AuthError):
        verifier_for(issuer).verify(f"{a}.{b}.{a}", now=NOW)


_FIXED_KEY = SigningKey.generate()
