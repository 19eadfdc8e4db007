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
    DEFAULT_LEEWAY_S,
    DEFAULT_PROOF_WINDOW_S,
    KeySet,
    NodeKey,
    NodeToken,
    PeerAuthenticator,
    ProofReplayCache,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    access_token_hash,
    bound_peer_id,
    create_proof,
    jwk_thumbprint,
    normalize_htu,
    verify_jwk_signature,
    verify_proof,
)
from p2pimage.errors import AuthError, LocalProtocolError, RemoteProtocolError

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


# ------------------------------------------------------------------ expiry edges


def test_expiry_edge_exp_plus_leeway(issuer: TokenIssuer, node_key: NodeKey) -> None:
    """exp + leeway - 1 s is accepted, exactly exp + leeway is the last accepted instant,
    exp + leeway + 1 s is refused."""
    token = issuer.issue(subject="n", cluster="c", node_jwk=node_key.public_jwk(), now=NOW)
    exp = int(NOW) + issuer.lifetime_s
    verifier = verifier_for(issuer)
    assert verifier.verify(token, now=exp + DEFAULT_LEEWAY_S - 1).subject == "n"
    assert verifier.verify(token, now=exp + DEFAULT_LEEWAY_S).subject == "n"
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=exp + DEFAULT_LEEWAY_S + 1)
    assert info.value.reason == "expired"


def test_audience_list_without_ours_refused(issuer: TokenIssuer, node_key: NodeKey) -> None:
    active = issuer.active_key
    for aud in (["other", "p2pimage-not"], [], "P2PIMAGE", None):
        forged = active.sign_jwt(_claims(node_key, aud=aud))
        with pytest.raises(AuthError) as info:
            verifier_for(issuer).verify(forged, now=NOW)
        assert info.value.reason == "wrong_audience"


# ------------------------------------------------------------------ survivors of mutation testing
# (docs/testing.md, "Mutation testing"): each test below kills mutants of the safety code
# that every other test let pass.


def test_audience_list_with_ours_accepted(issuer: TokenIssuer, node_key: NodeKey) -> None:
    forged = issuer.active_key.sign_jwt(_claims(node_key, aud=["registry", AUDIENCE]))
    assert verifier_for(issuer).verify(forged, now=NOW).subject == "evil"


def test_not_before_edge_nbf_minus_leeway(issuer: TokenIssuer, node_key: NodeKey) -> None:
    """nbf - leeway is the first accepted instant, one second earlier is refused."""
    forged = issuer.active_key.sign_jwt(_claims(node_key, nbf=int(NOW)))
    verifier = verifier_for(issuer)
    assert verifier.verify(forged, now=NOW - DEFAULT_LEEWAY_S).subject == "evil"
    with pytest.raises(AuthError) as info:
        verifier.verify(forged, now=NOW - DEFAULT_LEEWAY_S - 1)
    assert info.value.reason == "not_yet_valid"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"exp": True}, "missing_claim"),  # a bool is not a time, though Python's bool is int
        ({"iss": None}, "missing_claim"),
        ({"zone": 5}, "missing_claim"),
        ({"scope": "00" * 20}, "malformed"),  # a string, not a list of them
        ({"scope": [1]}, "malformed"),
        ({"cnf": {"jwk": SigningKey.generate("ES256").public_jwk()}}, "missing_cnf"),
    ],
)
def test_claims_of_the_wrong_kind_refused_with_their_reason(
    issuer: TokenIssuer, node_key: NodeKey, extra: dict[str, Any], reason: str
) -> None:
    forged = issuer.active_key.sign_jwt(_claims(node_key, **extra))
    with pytest.raises(AuthError) as info:
        verifier_for(issuer).verify(forged, now=NOW)
    assert info.value.reason == reason


def test_verified_token_carries_every_claim(issuer: TokenIssuer, node_key: NodeKey) -> None:
    claims = _claims(node_key, iat=int(NOW) - 7, nbf=int(NOW) - 5, jti="nonce-1")
    token = verifier_for(issuer).verify(issuer.active_key.sign_jwt(claims), now=NOW)
    assert (token.issuer, token.issued_at, token.not_before, token.jti) == (
        "sidecar-test",
        int(NOW) - 7,
        int(NOW) - 5,
        "nonce-1",
    )


def test_peer_id_tag_is_the_documented_digest() -> None:
    """The tag is SHA-256("p2pimage-peer-id/1\\0" || sub || "\\0" || thumbprint)[:6] and the
    default suffix the next 6 bytes (docs/protocol.md): computed here independently."""
    key = NodeKey.generate()
    digest = hashlib.sha256(
        b"p2pimage-peer-id/1\0" + b"node-1" + b"\0" + jwk_thumbprint(key.public_jwk()).encode()
    ).digest()
    assert bound_peer_id("node-1", key.public_jwk()) == b"-PI0300-" + digest[:12]


def test_peer_id_prefix_and_suffix_lengths_are_checked() -> None:
    jwk = NodeKey.generate().public_jwk()
    with pytest.raises(LocalProtocolError, match="prefix"):
        bound_peer_id("n", jwk, b"-PI0300")
    with pytest.raises(LocalProtocolError, match="suffix"):
        bound_peer_id("n", jwk, suffix=b"12345")


def test_proof_fields_and_replay_key(bound: NodeToken, node_key: NodeKey) -> None:
    proof = create_proof(node_key, method="GET", url=ANNOUNCE, token=bound.raw, now=NOW)
    jti = json.loads(base64.urlsafe_b64decode(proof.split(".")[1] + "=="))["jti"]
    checked = verify_proof(proof, token=bound, method="GET", url=ANNOUNCE, now=NOW)
    assert checked.jti == jti
    x = node_key.public_jwk()["x"]
    assert checked.replay_key == hashlib.sha256(f"{x}.{jti}".encode()).digest()[:16]


def test_proof_jti_length_edges_and_odd_encodings(bound: NodeToken, node_key: NodeKey) -> None:
    def signed(claims: dict[str, Any], sig: str | None = None) -> str:
        header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": node_key.public_jwk()}
        h, c = b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode())
        return f"{h}.{c}.{sig or b64url(node_key.sign(f'{h}.{c}'.encode()))}"

    def check(proof: Any) -> str:
        return verify_proof(proof, token=bound, method="GET", url=ANNOUNCE, now=NOW).jti

    base = {"htm": "GET", "htu": ANNOUNCE, "iat": int(NOW), "ath": access_token_hash(bound.raw)}
    assert check(signed({**base, "jti": "j"})) == "j"
    assert check(signed({**base, "jti": "j" * 64})) == "j" * 64
    for proof in (
        signed({**base, "jti": ""}),
        signed({**base, "jti": "j"}, sig="A"),  # not base64url (one character: no byte)
        signed({**base, "jti": "j"}).replace(".", ".\u00e9", 1),  # not ASCII
        b"a.b.c",  # bytes, not a string
    ):
        with pytest.raises(AuthError) as info:
            check(proof)
        assert info.value.reason == "bad_proof", proof


# ------------------------------------------------------------------ DPoP proofs

ANNOUNCE = "http://tracker.test:6969/announce?info_hash=%00%01&peer_id=x&port=1"


@pytest.fixture
def bound(issuer: TokenIssuer, node_key: NodeKey) -> NodeToken:
    raw = issuer.issue(subject="node-1", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    return verifier_for(issuer).verify(raw, now=NOW)


def test_proof_round_trip(bound: NodeToken, node_key: NodeKey) -> None:
    proof = create_proof(node_key, method="get", url=ANNOUNCE, token=bound.raw, now=NOW)
    header = json.loads(base64.urlsafe_b64decode(proof.split(".")[0] + "=="))
    assert header["typ"] == "dpop+jwt" and header["alg"] == "EdDSA"
    assert header["jwk"] == node_key.public_jwk()
    checked = verify_proof(proof, token=bound, method="GET", url=ANNOUNCE, now=NOW + 3)
    assert checked.issued_at == int(NOW)
    assert checked.expires_at == int(NOW) + DEFAULT_PROOF_WINDOW_S + 1
    # The URL compares after normalisation of scheme, host and default port only.
    same = "HTTP://Tracker.TEST:6969/announce?info_hash=%00%01&peer_id=x&port=1#frag"
    assert verify_proof(proof, token=bound, method="GET", url=same, now=NOW).jti == checked.jti
    assert normalize_htu("https://h:443/a") == "https://h/a"
    assert normalize_htu("http://[::1]:80") == "http://[::1]/"


def test_a_tokens_proof_key_is_made_once_and_still_refuses_others(
    bound: NodeToken, node_key: NodeKey, issuer: TokenIssuer
) -> None:
    """The cnf key object and ``ath`` a tracker checks every proof against are worked out
    at the first proof and kept on the (cached) token; later proofs are checked against
    them exactly as the first."""
    key, ath = bound.proof_key()
    assert bound.proof_key()[0] is key and ath == access_token_hash(bound.raw)
    for _ in range(2):
        proof = create_proof(node_key, method="GET", url=ANNOUNCE, token=bound.raw, now=NOW)
        assert verify_proof(proof, token=bound, method="GET", url=ANNOUNCE, now=NOW).jti
    # The header checked once is kept too; any other header is checked in full (below).
    assert bound._proof_header == proof.split(".")[0]
    other = issuer.issue(subject="node-1", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    stolen = create_proof(node_key, method="GET", url=ANNOUNCE, token=other, now=NOW)
    with pytest.raises(AuthError) as info:
        verify_proof(stolen, token=bound, method="GET", url=ANNOUNCE, now=NOW)
    assert _reason(info) == "proof_token"
    thief = create_proof(NodeKey.generate(), method="GET", url=ANNOUNCE, token=bound.raw, now=NOW)
    with pytest.raises(AuthError) as info:
        verify_proof(thief, token=bound, method="GET", url=ANNOUNCE, now=NOW)
    assert _reason(info) == "proof_key_mismatch"


def _reason(exc: pytest.ExceptionInfo[AuthError]) -> str:
    return exc.value.reason


def test_proof_refusals(bound: NodeToken, node_key: NodeKey, issuer: TokenIssuer) -> None:
    def check(proof: str | None, reason: str, **kw: Any) -> None:
        args: dict[str, Any] = {"token": bound, "method": "GET", "url": ANNOUNCE, "now": NOW}
        args.update(kw)
        with pytest.raises(AuthError) as info:
            verify_proof(proof, **args)
        assert _reason(info) == reason, info.value

    good = create_proof(node_key, method="GET", url=ANNOUNCE, token=bound.raw, now=NOW)
    check(None, "missing_proof")
    check("", "missing_proof")
    check("a.b", "bad_proof")
    check("x" * 10_000, "bad_proof")
    # Another key (a thief holding the token but not the node's key).
    thief = NodeKey.generate()
    check(
        create_proof(thief, method="GET", url=ANNOUNCE, token=bound.raw, now=NOW),
        "proof_key_mismatch",
    )
    # The thief keeps the victim's jwk in the header but signs with its own key.
    head, claims, _ = create_proof(
        thief, method="GET", url=ANNOUNCE, token=bound.raw, now=NOW
    ).split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    header["jwk"] = node_key.public_jwk()
    head = b64url(json.dumps(header).encode())
    check(f"{head}.{claims}.{b64url(thief.sign(f'{head}.{claims}'.encode()))}", "proof_signature")
    # Another method, another URL (path or query), the wrong token, outside the window.
    check(good, "proof_method", method="POST")
    check(good, "proof_url", url=ANNOUNCE.replace("port=1", "port=2"))
    check(good, "proof_url", url=ANNOUNCE.replace("/announce", "/scrape"))
    check(good, "proof_url", url=ANNOUNCE.replace("tracker.test", "other.test"))
    check(good, "proof_stale", now=NOW + DEFAULT_PROOF_WINDOW_S + 1)
    check(good, "proof_stale", now=NOW - DEFAULT_PROOF_WINDOW_S - 1)
    assert verify_proof(
        good, token=bound, method="GET", url=ANNOUNCE, now=NOW + DEFAULT_PROOF_WINDOW_S
    )
    other = issuer.issue(subject="node-1", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    check(create_proof(node_key, method="GET", url=ANNOUNCE, token=other, now=NOW), "proof_token")

    # Headers that must be refused however the rest looks.
    def forged(header: dict[str, Any], claims: dict[str, Any] | None = None) -> str:
        body = claims or {
            "jti": "j", "htm": "GET", "htu": ANNOUNCE, "iat": int(NOW),
            "ath": access_token_hash(bound.raw),
        }  # fmt: skip
        h = b64url(json.dumps(header).encode())
        c = b64url(json.dumps(body).encode())
        return f"{h}.{c}.{b64url(node_key.sign(f'{h}.{c}'.encode()))}"

    jwk = node_key.public_jwk()
    check(forged({"typ": "JWT", "alg": "EdDSA", "jwk": jwk}), "bad_proof")
    check(forged({"typ": "dpop+jwt", "alg": "none", "jwk": jwk}), "bad_proof")
    check(forged({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}), "bad_proof")
    check(forged({"typ": "dpop+jwt", "alg": "EdDSA"}), "bad_proof")
    check(forged({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {**jwk, "d": "secret"}}), "bad_proof")
    base = {"jti": "j", "htm": "GET", "htu": ANNOUNCE, "iat": int(NOW), "ath": "x"}
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk}
    check(forged(header, {**base, "jti": "j" * 65}), "bad_proof")
    check(forged(header, {**base, "iat": str(int(NOW))}), "bad_proof")
    check(forged(header, {**base, "iat": True}), "bad_proof")
    check(forged(header, {**base, "htu": "ftp://x/"}), "bad_proof")
    # HS256 keyed with the node's public key: refused before any key is tried.
    hs = jwt.encode(base, b64url(b"x" * 32), algorithm="HS256", headers={"typ": "dpop+jwt"})
    check(hs, "bad_proof")


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_garbage_proofs_raise_only_auth_error(data: str) -> None:
    key = NodeKey(_FIXED_NODE_KEY._key)
    raw = TokenIssuer([SigningKey(_FIXED_KEY._key)], issuer="i").issue(
        subject="n", cluster="c", node_jwk=key.public_jwk(), now=NOW
    )
    token = TokenVerifier(TokenIssuer([SigningKey(_FIXED_KEY._key)], issuer="i").key_set()).verify(
        raw, now=NOW
    )
    with pytest.raises(AuthError):
        verify_proof(data, token=token, method="GET", url=ANNOUNCE, now=NOW)
    with pytest.raises(AuthError):
        verify_proof(f"{data}.{data}.{data}", token=token, method="GET", url=ANNOUNCE, now=NOW)


_FIXED_NODE_KEY = NodeKey.generate()


def test_replay_cache_refuses_a_nonce_twice_and_forgets_it_after_expiry() -> None:
    cache = ProofReplayCache(max_entries=3)
    assert cache.claim(b"a", NOW + 61, NOW) is True
    assert cache.claim(b"a", NOW + 61, NOW + 30) is False
    assert cache.claim(b"b", NOW + 40, NOW + 1) is True
    assert cache.claim(b"c", NOW + 90, NOW + 2) is True
    # Full of live entries: refuse rather than forget one (that would reopen replay).
    assert cache.claim(b"d", NOW + 90, NOW + 3) is None
    # b expires at NOW + 40: then room again, and a is still remembered until NOW + 61.
    assert cache.claim(b"d", NOW + 100, NOW + 41) is True
    assert len(cache) == 3
    assert cache.claim(b"a", NOW + 130, NOW + 60) is False
    assert cache.claim(b"a", NOW + 130, NOW + 62) is True


def test_peer_id_is_bound_to_the_subject_and_key() -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    issuer = TokenIssuer([SigningKey.generate(kid="k")], issuer="sidecar")
    raw = issuer.issue(subject="node-1", cluster="c", node_jwk=key.public_jwk(), now=NOW)
    token = TokenVerifier(issuer.key_set(), issuer="sidecar").verify(raw, now=NOW)
    pid = bound_peer_id("node-1", key.public_jwk())
    assert len(pid) == 20 and pid.startswith(b"-PI0300-")
    assert pid == bound_peer_id("node-1", key.public_jwk())  # stable for a node
    assert token.binds_peer_id(pid)
    # Any prefix and suffix: one node may run several peers.
    assert token.binds_peer_id(
        bound_peer_id("node-1", key.public_jwk(), b"-XX0001-", suffix=b"\0" * 6)
    )
    assert not token.binds_peer_id(bound_peer_id("node-2", key.public_jwk()))
    assert not token.binds_peer_id(bound_peer_id("node-1", other.public_jwk()))
    assert not token.binds_peer_id(pid[:19])
    with pytest.raises(LocalProtocolError):
        bound_peer_id("node-1", key.public_jwk(), suffix=b"\0" * 5)


def test_header_that_is_not_a_json_object_is_malformed(issuer: TokenIssuer) -> None:
    for head in (b"not json", b"[1]"):
        with pytest.raises(AuthError) as info:
            verifier_for(issuer).verify(f"{b64url(head)}.e30.c2ln", now=NOW)
        assert info.value.reason == "malformed", head


def test_proof_key_must_match_in_type_and_curve(bound: NodeToken, node_key: NodeKey) -> None:
    """The same ``x`` under another ``kty`` or ``crv`` is another key (RFC 7638)."""
    body = {"jti": "j", "htm": "GET", "htu": ANNOUNCE, "iat": int(NOW)}
    body["ath"] = access_token_hash(bound.raw)
    for change in ({"crv": "X25519"}, {"kty": "EC"}):
        header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {**node_key.public_jwk(), **change}}
        h, c = b64url(json.dumps(header).encode()), b64url(json.dumps(body).encode())
        proof = f"{h}.{c}.{b64url(node_key.sign(f'{h}.{c}'.encode()))}"
        with pytest.raises(AuthError) as info:
            verify_proof(proof, token=bound, method="GET", url=ANNOUNCE, now=NOW)
        assert info.value.reason == "proof_key_mismatch", change


def test_replay_cache_entry_is_gone_at_its_expiry() -> None:
    cache = ProofReplayCache(max_entries=1)
    assert cache.claim(b"a", NOW + 10, NOW) is True
    assert cache.claim(b"b", NOW + 20, NOW + 9) is None  # full of a live entry
    assert cache.claim(b"b", NOW + 20, NOW + 10) is True  # a expired at NOW + 10, exactly


def test_header_and_payload_refusals_name_their_reason(
    issuer: TokenIssuer, node_key: NodeKey
) -> None:
    key = issuer.active_key
    other_alg = "ES256" if key.alg == "EdDSA" else "EdDSA"
    unsigned = lambda _: b"x" * 64  # noqa: E731 (refused before the signature is checked)
    payload_not_json = jwt.api_jws.PyJWS().encode(
        b"not json", key._key, algorithm=key.alg, headers={"kid": key.kid}
    )
    for token, reason in [
        (_forge({"alg": key.alg}, _claims(node_key), unsigned), "unknown_kid"),
        (_forge({"alg": other_alg, "kid": key.kid}, _claims(node_key), unsigned), "bad_algorithm"),
        (payload_not_json, "malformed"),
        (123, "malformed"),  # neither str nor bytes
    ]:
        with pytest.raises(AuthError) as info:
            verifier_for(issuer).verify(token, now=NOW)  # type: ignore[arg-type]
        assert info.value.reason == reason, token


def test_admits_until_expiry_plus_leeway_and_no_longer(issuer: TokenIssuer) -> None:
    """A connection stays open while its token passes the expiry check: up to and
    including ``exp + leeway`` (the same edge as ``verify``), never past it."""
    alice = NodeKey.generate()
    token = issuer.issue(subject="alice", cluster="prod", node_jwk=alice.public_jwk(), now=NOW)
    verifier = TokenVerifier(KeySet.from_jwks(issuer.jwks()), issuer="sidecar-test", leeway_s=7)
    now = [NOW]
    auth = PeerAuthenticator(
        node_key=alice, token=token, verifier=verifier, cluster="prod", clock=lambda: now[0]
    )
    tok, sig = auth.credentials(b"t")
    admitted = auth.verify_peer(tok, sig, b"t", INFO_HASH, auth.peer_id())
    exp = admitted.expires_at
    assert exp > NOW
    for at, admits in [
        (NOW, True),
        (exp, True),
        (exp + 7, True),
        (exp + 7.001, False),
        (exp + 3600, False),
    ]:
        now[0] = at
        assert auth.admits(admitted) is admits, at


def test_a_token_seen_again_skips_its_signature_but_not_its_claims(
    issuer: TokenIssuer, node_key: NodeKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifier keeps tokens whose signature verified: seen again, a token costs its
    claim checks only, which still run in full; a key set that maps the kid to another
    key checks the signature again; the cache is bounded."""
    import p2pimage.auth.tokens as tokens

    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting_decode)
    verifier = verifier_for(issuer)
    token = issuer.issue(subject="n", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
    for _ in range(3):
        assert verifier.verify(token, now=NOW, cluster="prod").subject == "n"
    assert decodes == 1
    for now, cluster, reason in [
        (NOW + 10_000, "prod", "expired"),
        (NOW - 10_000, "prod", "not_yet_valid"),
        (NOW, "other", "wrong_cluster"),
    ]:
        with pytest.raises(AuthError) as caught:
            verifier.verify(token, now=now, cluster=cluster)
        assert caught.value.reason == reason
    assert decodes == 1
    # The same kid now names another key (a new key set): the signature is checked again.
    header = jwt.get_unverified_header(token)
    other = TokenIssuer([SigningKey.generate(header["alg"])], issuer="sidecar-test")
    doc = other.jwks()
    doc["keys"][0]["kid"] = header["kid"]
    verifier.keys = KeySet.from_jwks(doc)
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, now=NOW, cluster="prod")
    assert caught.value.reason == "bad_signature" and decodes == 2
    # Bounded: with room for two, the first of three tokens is verified afresh.
    monkeypatch.setattr(tokens, "VERIFIED_TOKEN_CACHE", 2)
    fresh = verifier_for(issuer)
    three = [
        issuer.issue(subject=f"n{i}", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW)
        for i in range(3)
    ]
    for t in three:
        fresh.verify(t, now=NOW)
    decodes = 0
    fresh.verify(three[2], now=NOW)
    assert decodes == 0
    fresh.verify(three[0], now=NOW)
    assert decodes == 1


def test_a_cached_token_is_reused_but_refused_once_expired_revoked_or_out_of_scope(
    node_key: NodeKey,
) -> None:
    """A token whose claims passed is kept as its NodeToken (a node meets the same peer
    token on every connection with that peer): seen again it is the same object, with
    its cnf key object made once. Each use still checks the time, the cluster and the
    scope; a kid gone from the key set (a revoked signing key) is refused before the
    cache; a token that failed a claim check fails again (a failure never becomes a
    success by being cached)."""
    key = SigningKey.generate()
    issuer = TokenIssuer([key], issuer="sidecar-test")
    verifier = verifier_for(issuer)
    scoped = issuer.issue(
        subject="n", cluster="prod", node_jwk=node_key.public_jwk(), now=NOW, scope=["aa" * 20]
    )
    first = verifier.verify(scoped, now=NOW, cluster="prod", info_hash=b"\xaa" * 20)
    again = verifier.verify(scoped, now=NOW + 60, cluster="prod", info_hash=b"\xaa" * 20)
    assert again is first
    assert first.proof_key() is again.proof_key()
    for now, cluster, info_hash, reason in [
        (first.expires_at + DEFAULT_LEEWAY_S + 1, "prod", None, "expired"),
        (NOW - DEFAULT_LEEWAY_S - 1, "prod", None, "not_yet_valid"),
        (NOW, "other", None, "wrong_cluster"),
        (NOW, "prod", b"\xbb" * 20, "out_of_scope"),
    ]:
        with pytest.raises(AuthError) as caught:
            verifier.verify(scoped, now=now, cluster=cluster, info_hash=info_hash)
        assert caught.value.reason == reason
    assert verifier.verify(scoped, now=NOW, cluster="prod") is first  # still valid now
    # The signing key is revoked: the sidecar's JWKS no longer lists its kid.
    verifier.keys = KeySet.from_jwks(TokenIssuer([SigningKey.generate()], issuer="x").jwks())
    with pytest.raises(AuthError) as caught:
        verifier.verify(scoped, now=NOW, cluster="prod")
    assert caught.value.reason == "unknown_kid"
    # A token that failed a claim check is refused at every use.
    wrong = key.sign_jwt(_claims(node_key, aud="registry"))
    verifier.keys = KeySet.from_jwks(issuer.jwks())
    for _ in range(3):
        with pytest.raises(AuthError) as caught:
            verifier.verify(wrong, now=NOW)
        assert caught.value.reason == "wrong_audience"
