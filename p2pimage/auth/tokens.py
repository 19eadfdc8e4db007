"""Node tokens and proof of possession.

A *node token* is a JWT the sidecar signs with the registry's private key (EdDSA/Ed25519
by default, ES256 supported). Its claims: ``iss``, ``aud`` = ``"p2pimage"``, ``sub`` (node
name), ``cluster``, ``iat``/``nbf``/``exp`` (minutes), ``jti``, ``cnf.jwk`` (the node's own
Ed25519 public key, RFC 7800 proof of possession), optionally ``zone`` and ``scope`` (a
list of hex info-hashes the token is limited to).

Verifiers allow-list algorithms (``alg: none`` and HS256-with-a-public-key are refused
before any key is touched), look keys up by ``kid`` in a JWKS document, and check expiry
with a small leeway. Nothing here reads the clock: callers pass ``now``, except
:class:`PeerAuthenticator`, which is handed a clock so the wire protocol stays pure.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from p2pimage.errors import AuthError, LocalProtocolError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AUDIENCE",
    "DEFAULT_ISSUER",
    "DEFAULT_TOKEN_LIFETIME_S",
    "DEFAULT_PROOF_WINDOW_S",
    "DPOP_TYP",
    "KeySet",
    "NodeKey",
    "NodeToken",
    "PeerAuthenticator",
    "SigningKey",
    "TokenIssuer",
    "TokenVerifier",
    "VerifiedProof",
    "ProofReplayCache",
    "access_token_hash",
    "bound_peer_id",
    "create_proof",
    "jwk_thumbprint",
    "local_authenticator",
    "renewal_due",
    "normalize_htu",
    "verify_jwk_signature",
    "verify_proof",
]

AUDIENCE = "p2pimage"
ALLOWED_ALGORITHMS = ("EdDSA", "ES256")
# A JWT larger than this is not one of ours (ours are ~600 bytes); it bounds parsing work.
MAX_TOKEN_BYTES = 8192
# Tokens whose signature a TokenVerifier has checked, kept (oldest dropped first) so that
# a token seen again costs its claim checks and not its signature: a node meets the same
# peer token on each layer it shares with that peer (a connection per swarm) and on each
# duplicate connection of two nodes that dialed each other at once. (The tracker daemon
# keeps its own cache of verified tokens in front of this one.) A signature check with
# PyJWT costs ~10x the claim checks here.
# 1,024 tokens of ~600 bytes with their claims: under 2 MiB.
VERIFIED_TOKEN_CACHE = 1024
# Default clock-skew allowance for exp/nbf checks: nodes run NTP, a minute of skew is rare.
DEFAULT_LEEWAY_S = 30.0
# The sidecar's ``iss`` unless configured otherwise (and the CLI's, so its tokens verify
# against a tracker left at the defaults).
DEFAULT_ISSUER = "p2pimage-sidecar"
# Node tokens live minutes: short enough that a leaked one soon expires, long enough that
# renewals (at two thirds of the lifetime) cost a sidecar of 5,000 nodes ~12 requests/s.
DEFAULT_TOKEN_LIFETIME_S = 600
# A peer id is an 8-byte client prefix in the Azureus style ("-PI0300-": p2pimage, peer
# protocol 3) and 12 bytes bound to the token: see bound_peer_id.
PEER_ID_PREFIX_LENGTH = 8
DEFAULT_PEER_ID_PREFIX = b"-PI0300-"
_PEER_ID_LABEL = b"p2pimage-peer-id/1\x00"
# Bytes 8-13 of a peer id: the tag that binds it to a token (bound_peer_id).
_PEER_ID_TAG = slice(8, 14)
_TAG_LENGTH = 6

_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
_PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def _private_pem(key: _PrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM of a private key, as key files hold them."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * MAX_TOKEN_BYTES:
        raise AuthError("malformed", "bad base64url value")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise AuthError("malformed", "bad base64url value") from None


def _public_jwk(key: _PublicKey) -> dict[str, Any]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(nums.x.to_bytes(32, "big")),
            "y": _b64url(nums.y.to_bytes(32, "big")),
        }
    raise LocalProtocolError("only Ed25519 and P-256 keys are supported")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url."""
    kty = jwk.get("kty")
    if kty == "OKP":
        members = {"crv": jwk.get("crv"), "kty": kty, "x": jwk.get("x")}
    elif kty == "EC":
        members = {"crv": jwk.get("crv"), "kty": kty, "x": jwk.get("x"), "y": jwk.get("y")}
    else:
        raise AuthError("malformed", f"unsupported key type {kty!r}")
    if not all(isinstance(v, str) for v in members.values()):
        raise AuthError("malformed", "JWK members must be strings")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def _key_from_jwk(jwk: Mapping[str, Any]) -> tuple[_PublicKey, str]:
    """Return the public key and the one algorithm it may be used with."""
    if not isinstance(jwk, Mapping):
        raise AuthError("malformed", "JWK is not an object")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        if kty == "OKP" and crv == "Ed25519":
            raw = _b64url_decode(jwk.get("x", ""))
            if len(raw) != 32:
                raise AuthError("malformed", "Ed25519 key must be 32 bytes")
            return ed25519.Ed25519PublicKey.from_public_bytes(raw), "EdDSA"
        if kty == "EC" and crv == "P-256":
            x = _b64url_decode(jwk.get("x", ""))
            y = _b64url_decode(jwk.get("y", ""))
            if len(x) != 32 or len(y) != 32:
                raise AuthError("malformed", "P-256 coordinates must be 32 bytes")
            nums = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            return nums.public_key(), "ES256"
    except AuthError:
        raise
    except (ValueError, TypeError):
        raise AuthError("malformed", "invalid public key") from None
    raise AuthError("malformed", f"unsupported key kty={kty!r} crv={crv!r}")


def verify_jwk_signature(jwk: Mapping[str, Any], signature: bytes, data: bytes) -> None:
    """Check ``signature`` over ``data`` by the public key ``jwk`` (Ed25519 or P-256).

    P-256 signatures are the 64-byte ``r || s`` form, as in JWS.
    """
    _verify_with_key(_key_from_jwk(jwk)[0], signature, data)


def _verify_with_key(key: _PublicKey, signature: bytes, data: bytes) -> None:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

            if len(signature) != 64:
                raise AuthError("bad_signature", "P-256 signature must be 64 bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthError("bad_signature", "signature does not verify") from None


def _peer_id_digest(subject: str, node_jwk: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(
        _PEER_ID_LABEL
        + subject.encode("utf-8")
        + b"\x00"
        + jwk_thumbprint(node_jwk).encode("ascii")
    ).digest()


def bound_peer_id(
    subject: str,
    node_jwk: Mapping[str, Any],
    prefix: bytes = DEFAULT_PEER_ID_PREFIX,
    *,
    suffix: bytes | None = None,
) -> bytes:
    """A peer id bound to a token's subject and ``cnf.jwk`` key.

    ``prefix (8) || tag (6) || suffix (6)`` where ``tag`` is the first 6 bytes of
    ``SHA-256("p2pimage-peer-id/1\0" || sub (UTF-8) || "\0" || RFC 7638 thumbprint of
    cnf.jwk)``. Peers and trackers check the tag against the verified token
    (:meth:`NodeToken.binds_peer_id`), so a member cannot pose under another node's peer
    id. The suffix is free (one node may run several peers); by default it is the next 6
    bytes of the same digest, so a node's id is stable across restarts.
    """
    if not isinstance(prefix, bytes) or len(prefix) != PEER_ID_PREFIX_LENGTH:
        raise LocalProtocolError(f"a peer id prefix is {PEER_ID_PREFIX_LENGTH} bytes")
    digest = _peer_id_digest(subject, node_jwk)
    tail = digest[_TAG_LENGTH : 2 * _TAG_LENGTH] if suffix is None else suffix
    if len(tail) != 20 - _PEER_ID_TAG.stop:
        raise LocalProtocolError("a peer id suffix is 6 bytes")
    return prefix + digest[:_TAG_LENGTH] + tail


class SigningKey:
    """The issuer's (the sidecar's) private signing key, identified by ``kid``."""

    def __init__(self, private_key: _PrivateKey, kid: str | None = None) -> None:
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.alg = "EdDSA"
        elif isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
            private_key.curve, ec.SECP256R1
        ):
            self.alg = "ES256"
        else:
            raise LocalProtocolError("signing keys must be Ed25519 or P-256")
        self._key = private_key
        self._public = _public_jwk(private_key.public_key())
        self.kid = kid or jwk_thumbprint(self._public)

    @classmethod
    def generate(cls, alg: str = "EdDSA", kid: str | None = None) -> SigningKey:
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate(), kid)
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()), kid)
        raise LocalProtocolError(f"unsupported algorithm {alg!r}; use one of {ALLOWED_ALGORITHMS}")

    @classmethod
    def from_pem(cls, pem: bytes, kid: str | None = None) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"cannot load private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise LocalProtocolError("signing keys must be Ed25519 or P-256")
        return cls(key, kid)

    def to_pem(self) -> bytes:
        return _private_pem(self._key)

    def public_jwk(self) -> dict[str, Any]:
        return {**self._public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self._key, algorithm=self.alg, headers={"kid": self.kid})


class NodeKey:
    """A node's own Ed25519 key pair; its public half is bound into the token (``cnf.jwk``)."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        self._key = private_key
        self._jwk = _public_jwk(private_key.public_key())

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> NodeKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"cannot load node key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise LocalProtocolError("node keys must be Ed25519")
        return cls(key)

    def to_pem(self) -> bytes:
        return _private_pem(self._key)

    def public_jwk(self) -> dict[str, Any]:
        return dict(self._jwk)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class KeySet:
    """Public verification keys by ``kid``: the content of a JWKS document."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[_PublicKey, str, dict[str, Any]]] = {}

    @classmethod
    def from_jwks(cls, doc: Mapping[str, Any]) -> KeySet:
        keys = doc.get("keys") if isinstance(doc, Mapping) else None
        if not isinstance(keys, list):
            raise AuthError("malformed", "JWKS document has no 'keys' list")
        ks = cls()
        for jwk in keys:
            ks.add(jwk)
        return ks

    def add(self, jwk: Mapping[str, Any]) -> None:
        key, alg = _key_from_jwk(jwk)
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("malformed", "JWKS key without kid")
        declared = jwk.get("alg")
        if declared is not None and declared != alg:
            raise AuthError("bad_algorithm", f"key {kid} declares alg {declared!r}")
        self._keys[kid] = (key, alg, dict(jwk))

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def lookup(self, kid: str) -> tuple[_PublicKey, str]:
        try:
            key, alg, _ = self._keys[kid]
        except KeyError:
            raise AuthError("unknown_kid", f"no key with kid {kid!r}") from None
        return key, alg

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [jwk for _, _, jwk in self._keys.values()]}


@dataclass(frozen=True, slots=True)
class NodeToken:
    """The verified claims of a node token."""

    raw: str
    issuer: str
    subject: str
    cluster: str
    issued_at: int
    not_before: int
    expires_at: int
    jti: str
    cnf_jwk: dict[str, Any]
    zone: str | None = None
    scope: frozenset[str] | None = None
    # The tag every peer id of this node carries (see bound_peer_id), worked out once:
    # a tracker checks it for each swarm of a batched announce.
    _peer_id_tag: bytes = field(init=False, repr=False, compare=False)
    # The cnf key as a key object and the token's ``ath``, made at the first DPoP proof
    # checked against this token: a tracker caches verified tokens and checks a proof
    # with every request.
    _proof_key: tuple[_PublicKey, str] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # The last DPoP proof header (base64url, as sent) that passed verify_proof's header
    # checks against this token: a node sends the same header with every proof, and the
    # checks depend on nothing else, so the next proof skips decoding it again.
    _proof_header: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tag = _peer_id_digest(self.subject, self.cnf_jwk)[:_TAG_LENGTH]
        object.__setattr__(self, "_peer_id_tag", tag)

    def proof_key(self) -> tuple[_PublicKey, str]:
        """The ``cnf.jwk`` key object and the token's ``ath`` (:func:`access_token_hash`),
        worked out once; :class:`AuthError` ("malformed") for an unusable key."""
        if self._proof_key is None:
            key = (_key_from_jwk(self.cnf_jwk)[0], access_token_hash(self.raw))
            object.__setattr__(self, "_proof_key", key)
            return key
        return self._proof_key

    def covers(self, info_hash: bytes) -> bool:
        """Whether the token may be used for the swarm ``info_hash``."""
        return self.scope is None or info_hash.hex() in self.scope

    def binds_peer_id(self, peer_id: bytes) -> bool:
        """Whether ``peer_id`` carries this token's tag (see :func:`bound_peer_id`)."""
        if not isinstance(peer_id, bytes) or len(peer_id) != 20:
            return False
        return hmac.compare_digest(peer_id[_PEER_ID_TAG], self._peer_id_tag)


class TokenIssuer:
    """Signs node tokens with ``keys[0]``; publishes every key in ``keys`` (rotation)."""

    def __init__(
        self, keys: Sequence[SigningKey], *, issuer: str, lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S
    ) -> None:
        if not keys:
            raise LocalProtocolError("TokenIssuer needs at least one signing key")
        if lifetime_s <= 0:
            raise LocalProtocolError("token lifetime must be positive")
        self._keys = list(keys)
        self.issuer = issuer
        self.lifetime_s = lifetime_s

    @property
    def active_key(self) -> SigningKey:
        return self._keys[0]

    def issue(
        self,
        *,
        subject: str,
        cluster: str,
        node_jwk: Mapping[str, Any],
        now: float,
        zone: str | None = None,
        scope: Iterable[str] | None = None,
    ) -> str:
        node_key, node_alg = _key_from_jwk(node_jwk)
        if node_alg != "EdDSA":
            raise AuthError("malformed", "node keys must be Ed25519")
        if not subject or not cluster:
            raise LocalProtocolError("subject and cluster must be non-empty")
        iat = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": subject,
            "cluster": cluster,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self.lifetime_s,
            "jti": secrets.token_urlsafe(16),
            "cnf": {"jwk": _public_jwk(node_key)},
        }
        if zone:
            claims["zone"] = zone
        if scope is not None:
            claims["scope"] = sorted(scope)
        return self.active_key.sign_jwt(claims)

    def key_set(self) -> KeySet:
        ks = KeySet()
        for key in self._keys:
            ks.add(key.public_jwk())
        return ks

    def jwks(self) -> dict[str, Any]:
        return self.key_set().to_jwks()


class TokenVerifier:
    """Verifies node tokens against a :class:`KeySet`.

    Raises :class:`AuthError` with a ``reason`` naming the first check that failed.
    """

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str | None = None,
        audience: str = AUDIENCE,
        leeway_s: float = DEFAULT_LEEWAY_S,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        # token -> (the key that verified its signature, its claims, the NodeToken once
        # its time-independent claims passed); see VERIFIED_TOKEN_CACHE. An entry counts
        # only while the key set still maps the token's kid to that same key object (a
        # new key set never reuses one). What depends on the time or the caller (exp,
        # nbf, cluster, scope) is checked at every use.
        self._verified: dict[str, tuple[object, dict[str, Any], NodeToken | None]] = {}

    def verify(
        self,
        token: str | bytes,
        *,
        now: float,
        cluster: str | None = None,
        info_hash: bytes | None = None,
    ) -> NodeToken:
        if isinstance(token, bytes | bytearray):
            try:
                token = bytes(token).decode("ascii")
            except UnicodeDecodeError:
                raise AuthError("malformed", "token is not ASCII") from None
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise AuthError("malformed", "not a compact JWS")
        header = self._header(token)
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError("bad_algorithm", f"algorithm {alg!r} not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("unknown_kid", "token header has no kid")
        key, key_alg = self.keys.lookup(kid)
        if alg != key_alg:
            raise AuthError("bad_algorithm", f"key {kid} is {key_alg}, token says {alg}")
        cached = self._verified.get(token)
        if cached is not None and cached[0] is key:
            if cached[2] is not None:
                return self._check_use(cached[2], now=now, cluster=cluster, info_hash=info_hash)
            return self._check_claims(
                token, cached[1], now=now, cluster=cluster, info_hash=info_hash
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[key_alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", str(exc)) from None
        if len(self._verified) >= VERIFIED_TOKEN_CACHE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (key, claims, None)
        return self._check_claims(token, claims, now=now, cluster=cluster, info_hash=info_hash)

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        try:
            header = json.loads(_b64url_decode(token.split(".", 1)[0]))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AuthError("malformed", "token header is not JSON") from None
        if not isinstance(header, dict):
            raise AuthError("malformed", "token header is not an object")
        return header

    def _check_claims(
        self,
        raw: str,
        claims: dict[str, Any],
        *,
        now: float,
        cluster: str | None,
        info_hash: bytes | None,
    ) -> NodeToken:
        def need(name: str, kind: type) -> Any:
            value = claims.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise AuthError("missing_claim", f"claim {name!r} missing or not {kind.__name__}")
            return value

        if claims.get("aud") != self.audience:
            aud = claims.get("aud")
            if not (isinstance(aud, list) and self.audience in aud):
                raise AuthError("wrong_audience", f"audience {aud!r}")
        iss = need("iss", str)
        if self.issuer is not None and iss != self.issuer:
            raise AuthError("wrong_issuer", f"issuer {iss!r}")
        exp, nbf, iat = need("exp", int), need("nbf", int), need("iat", int)
        self._check_time(exp, nbf, now)
        sub, token_cluster, jti = need("sub", str), need("cluster", str), need("jti", str)
        cnf = claims.get("cnf")
        jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
        if not isinstance(jwk, dict):
            raise AuthError("missing_cnf", "token has no cnf.jwk key binding")
        _, node_alg = _key_from_jwk(jwk)
        if node_alg != "EdDSA":
            raise AuthError("missing_cnf", "cnf.jwk must be an Ed25519 key")
        zone = claims.get("zone")
        if zone is not None and not isinstance(zone, str):
            raise AuthError("missing_claim", "zone must be a string")
        scope_claim = claims.get("scope")
        scope: frozenset[str] | None = None
        if scope_claim is not None:
            if not isinstance(scope_claim, list) or not all(
                isinstance(s, str) for s in scope_claim
            ):
                raise AuthError("malformed", "scope must be a list of hex info-hashes")
            scope = frozenset(s.lower() for s in scope_claim)
        token = NodeToken(
            raw=raw,
            issuer=iss,
            subject=sub,
            cluster=token_cluster,
            issued_at=iat,
            not_before=nbf,
            expires_at=exp,
            jti=jti,
            cnf_jwk=jwk,
            zone=zone,
            scope=scope,
        )
        entry = self._verified.get(raw)
        if entry is not None and entry[1] is claims:
            # Every check that does not depend on the time or the caller passed: the
            # next use of this token checks only those (_check_use).
            self._verified[raw] = (entry[0], claims, token)
        return self._check_use(token, now=now, cluster=cluster, info_hash=info_hash)

    def _check_time(self, exp: int, nbf: int, now: float) -> None:
        if now > exp + self.leeway_s:
            raise AuthError("expired", f"token expired at {exp}")
        if now < nbf - self.leeway_s:
            raise AuthError("not_yet_valid", f"token valid from {nbf}")

    def _check_use(
        self, token: NodeToken, *, now: float, cluster: str | None, info_hash: bytes | None
    ) -> NodeToken:
        """The checks that depend on the time and the caller, on a token whose other
        claims passed (the whole check of a cached token)."""
        self._check_time(token.expires_at, token.not_before, now)
        if cluster is not None and token.cluster != cluster:
            raise AuthError("wrong_cluster", f"token is for cluster {token.cluster!r}")
        if info_hash is not None and not token.covers(info_hash):
            raise AuthError("out_of_scope", f"token does not cover {info_hash.hex()}")
        return token


class PeerAuthenticator:
    """Proof of possession on the peer wire; the object a wire connection calls.

    ``credentials`` returns our token and our node key's signature over a transcript;
    ``verify_peer`` checks the peer's token (same cluster, not expired, scope covers the
    swarm), then its signature by the key the token binds (``cnf.jwk``), so a token
    copied off the wire is useless without the node's private key, and then that the
    peer id is the one the token binds (:func:`bound_peer_id`).
    """

    def __init__(
        self,
        *,
        node_key: NodeKey,
        token: str | Callable[[], str],
        verifier: TokenVerifier,
        cluster: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_key = node_key
        self._token = token
        self.verifier = verifier
        self.cluster = cluster
        self._clock = clock

    def current_token(self) -> str:
        return self._token() if callable(self._token) else self._token

    def credentials(self, transcript: bytes) -> tuple[bytes, bytes]:
        return self.current_token().encode("ascii"), self.node_key.sign(transcript)

    def _own_claims(self) -> dict[str, Any]:
        try:
            claims = json.loads(_b64url_decode(self.current_token().split(".")[1]))
        except (ValueError, IndexError, UnicodeDecodeError):
            raise LocalProtocolError("our own token is not a JWT") from None
        if not isinstance(claims, dict):
            raise LocalProtocolError("our own token has no claims")
        return claims

    def peer_id(self, prefix: bytes = DEFAULT_PEER_ID_PREFIX) -> bytes:
        """Our peer id: bound to our token's subject and our node key."""
        claims = self._own_claims()
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise LocalProtocolError("our own token has no subject")
        return bound_peer_id(subject, self.node_key.public_jwk(), prefix)

    def own_expiry(self) -> float:
        """``exp`` of the token :meth:`credentials` presents now (unverified: it is ours)."""
        exp = self._own_claims().get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise LocalProtocolError("our own token has no expiry")
        return float(exp)

    def admits(self, token: NodeToken) -> bool:
        """Whether ``token`` (verified by :meth:`verify_peer` earlier) still passes the
        expiry check now, with the verifier's leeway: a connection it admitted may stay
        open only while this holds (docs/protocol.md, "Connection lifetime")."""
        return self._clock() <= token.expires_at + self.verifier.leeway_s

    def now(self) -> float:
        """The wall clock this authenticator checks expiry against."""
        return self._clock()

    def verify_peer(
        self, token: bytes, signature: bytes, transcript: bytes, info_hash: bytes, peer_id: bytes
    ) -> NodeToken:
        verified = self.verifier.verify(
            token, now=self._clock(), cluster=self.cluster, info_hash=info_hash
        )
        # The cnf key object, made once per token (a verified token is cached).
        _verify_with_key(verified.proof_key()[0], signature, transcript)
        if not verified.binds_peer_id(peer_id):
            raise AuthError("wrong_peer_id", "the peer id is not the one its token binds")
        return verified


def renewal_due(issued_at: float, expires_at: float, now: float) -> bool:
    """Whether a token issued at ``issued_at`` and expiring at ``expires_at`` should be
    replaced at ``now``: once two thirds of its lifetime have passed, which leaves the
    last third for retries while the sidecar is slow or away."""
    return now >= renewal_at(issued_at, expires_at)


def renewal_at(issued_at: float, expires_at: float) -> float:
    """When :func:`renewal_due` turns true for that token."""
    return issued_at + (expires_at - issued_at) * 2 / 3


def local_authenticator(
    issuer: TokenIssuer,
    *,
    subject: str,
    cluster: str,
    node_key: NodeKey | None = None,
    clock: Callable[[], float] = time.time,
) -> PeerAuthenticator:
    """An authenticator whose tokens come straight from ``issuer`` (no sidecar round trip).

    For programs that hold the issuer themselves: the local demo cluster, tests and
    benchmarks. Tokens are re-issued as :func:`renewal_due` says.
    """
    key = node_key or NodeKey.generate()
    cache: dict[str, tuple[str, float, float]] = {}  # "token" -> (token, issued, expires)

    def token() -> str:
        now = clock()
        current = cache.get("token")
        if current is None or renewal_due(current[1], current[2], now):
            issued = issuer.issue(
                subject=subject, cluster=cluster, node_jwk=key.public_jwk(), now=now
            )
            cache["token"] = (issued, now, now + issuer.lifetime_s)
            return issued
        return current[0]

    return PeerAuthenticator(
        node_key=key,
        token=token,
        verifier=TokenVerifier(issuer.key_set(), issuer=issuer.issuer),
        cluster=cluster,
        clock=clock,
    )


# ------------------------------------------------------------------ proof of possession
#
# Every request a node makes with its token (tracker announce and scrape, sidecar torrent
# fetches) carries a DPoP proof (RFC 9449): a JWT signed by the node's own key, the one
# its token binds in ``cnf.jwk``. The proof names the request (``htm``, ``htu``), the time
# (``iat``), a nonce the server never accepts twice (``jti``) and the token it goes with
# (``ath``), so a token read off the wire, or a proof captured beside it, buys nothing.

DPOP_TYP = "dpop+jwt"
# A proof is accepted while |now - iat| <= this. Nodes run NTP; half a minute of skew is
# rare, and the replay cache has to remember every nonce for twice this long.
DEFAULT_PROOF_WINDOW_S = 30.0
# Our proofs are ~600 bytes plus 4/3 of the URL (query included). 16 KiB covers any URL
# up to ~11 KiB, beyond every request the tracker accepts (queries are capped at 4 KiB,
# checked after authentication) and beyond what reaches the sidecar.
MAX_PROOF_BYTES = 16384
# ``jti`` values we mint are 22 characters; anything longer than this is not a nonce.
MAX_JTI_CHARS = 64
# Replay-cache entries at the tracker: a node announces each swarm every few seconds at
# most; a million live nonces is ~16,000 announces per second over the 60 s an entry
# lives, far beyond one tracker replica (~5,000/s measured), and ~100 MB at worst.
DEFAULT_REPLAY_CACHE_ENTRIES = 1_000_000
# Bytes 8..14 of a node's peer id: a tag derived from the token's subject.


def access_token_hash(token: str) -> str:
    """``ath``: base64url SHA-256 of the token's ASCII (RFC 9449 section 4.2)."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def normalize_htu(url: str) -> str:
    """The form of a URL that ``htu`` is compared in.

    Scheme and host lower-cased, a default port (80 for http, 443 for https) dropped,
    the fragment dropped; the path and the query are kept byte for byte (p2pimage binds
    the query too: see docs/protocol.md, "Tracker request authentication").
    """
    if not isinstance(url, str) or len(url) > MAX_PROOF_BYTES:
        raise AuthError("bad_proof", "htu is not a URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AuthError("bad_proof", "htu is not a URL") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise AuthError("bad_proof", "htu must be an http(s) URL")
    if ":" in host:
        host = f"[{host}]"
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{host}{parts.path or '/'}{query}"


def create_proof(
    node_key: NodeKey,
    *,
    method: str,
    url: str,
    token: str,
    now: float,
    jti: str | None = None,
) -> str:
    """A DPoP proof for one request: ``method`` and the full ``url`` (query included) as
    the request will be sent, by the node whose token is ``token``."""
    header = {"typ": DPOP_TYP, "alg": "EdDSA", "jwk": node_key.public_jwk()}
    claims = {
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
        "htm": method.upper(),
        "htu": normalize_htu(url),
        "iat": int(now),
        "ath": access_token_hash(token),
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = node_key.sign(signing_input.encode("ascii"))
    return signing_input + "." + _b64url(signature)


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """A proof that verified; the caller still has to claim its nonce (``replay_key``)
    in a replay cache until ``expires_at``, and refuse the request if it was taken."""

    jti: str
    issued_at: int
    replay_key: bytes
    expires_at: float


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(_b64url_decode(part))
    except (ValueError, UnicodeDecodeError, RecursionError, AuthError):
        raise AuthError("bad_proof", f"proof {what} is not JSON") from None
    if not isinstance(doc, dict):
        raise AuthError("bad_proof", f"proof {what} is not an object")
    return doc


def _check_proof_header(head_b64: str, cnf: dict[str, Any]) -> None:
    """A proof header's checks: ``typ``, ``alg`` and the embedded key, which must be
    ``cnf`` (the token's key)."""
    header = _json_part(head_b64, "header")
    if header.get("typ") != DPOP_TYP:
        raise AuthError("bad_proof", f"proof typ must be {DPOP_TYP!r}")
    if header.get("alg") != "EdDSA":
        raise AuthError("bad_proof", f"proof algorithm {header.get('alg')!r} not allowed")
    embedded = header.get("jwk")
    if not isinstance(embedded, dict) or "d" in embedded:
        raise AuthError("bad_proof", "proof header needs the public jwk")
    # cnf.jwk is an Ed25519 key (the token verifier insists): the same key is the same
    # (kty, crv, x), which is what its RFC 7638 thumbprint covers.
    if any(embedded.get(m) != cnf.get(m) for m in ("kty", "crv", "x")):
        raise AuthError("proof_key_mismatch", "proof key is not the token's cnf.jwk")


def verify_proof(
    proof: str | None,
    *,
    token: NodeToken,
    method: str,
    url: str,
    now: float,
    window_s: float = DEFAULT_PROOF_WINDOW_S,
) -> VerifiedProof:
    """Check a DPoP proof for a request (``method``, ``url`` as the server received it)
    made with the verified ``token``.

    The proof must be a compact JWS with ``typ: dpop+jwt`` and ``alg: EdDSA``, signed by
    the key the token binds (``cnf.jwk``; a ``jwk`` header, as RFC 9449 has it, must be
    that same key and is never used to verify), with ``htm``/``htu`` naming this request,
    ``iat`` within ``window_s`` of ``now``, a ``jti`` nonce and ``ath`` the token's hash.
    Raises :class:`AuthError` whose ``reason`` names the failed check: ``missing_proof``,
    ``bad_proof``, ``proof_key_mismatch``, ``proof_signature``, ``proof_method``,
    ``proof_url``, ``proof_stale``, ``proof_token``.
    """
    if proof is None or proof == "":
        raise AuthError("missing_proof", "a DPoP proof header is required")
    if not isinstance(proof, str) or len(proof) > MAX_PROOF_BYTES or proof.count(".") != 2:
        raise AuthError("bad_proof", "proof is not a compact JWS")
    head_b64, claims_b64, sig_b64 = proof.split(".")
    cnf = token.cnf_jwk
    if head_b64 != token._proof_header:
        _check_proof_header(head_b64, cnf)
        object.__setattr__(token, "_proof_header", head_b64)
    try:
        signature = _b64url_decode(sig_b64)
    except AuthError:
        raise AuthError("bad_proof", "proof signature is not base64url") from None
    try:
        key, ath_expected = token.proof_key()
        _verify_with_key(key, signature, f"{head_b64}.{claims_b64}".encode("ascii"))
    except AuthError:
        raise AuthError("proof_signature", "proof signature does not verify") from None
    except UnicodeEncodeError:
        raise AuthError("bad_proof", "proof is not ASCII") from None
    claims = _json_part(claims_b64, "claims")
    jti, htm, htu, iat, ath = (claims.get(k) for k in ("jti", "htm", "htu", "iat", "ath"))
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
        raise AuthError("bad_proof", "proof jti must be a string of 1-64 characters")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise AuthError("bad_proof", "proof iat must be an integer")
    if htm != method.upper():
        raise AuthError("proof_method", f"proof is for method {htm!r}")
    if not isinstance(htu, str):
        raise AuthError("proof_url", "proof is for another URL")
    # Equal strings (the common case) normalise alike, or fail alike: normalised once.
    here = normalize_htu(htu)
    if htu != url and here != normalize_htu(url):
        raise AuthError("proof_url", "proof is for another URL")
    if abs(now - iat) > window_s:
        raise AuthError("proof_stale", f"proof iat {iat} is outside the {window_s:.0f} s window")
    if not isinstance(ath, str) or not hmac.compare_digest(ath, ath_expected):
        raise AuthError("proof_token", "proof is for another token (ath)")
    replay_key = hashlib.sha256(f"{cnf['x']}.{jti}".encode()).digest()[:16]
    return VerifiedProof(jti, iat, replay_key, iat + window_s + 1.0)


class ProofReplayCache:
    """The nonces (``VerifiedProof.replay_key``) seen in the last window, bounded. Pure:
    callers pass ``now``. The tracker's Redis backend keeps the same set in Redis instead
    (``SET NX`` with a TTL), so replicas share it.

    When full of live entries it refuses new ones (``claim`` returns ``None``): forgetting
    a live nonce would reopen replay, and only authenticated members can fill it.
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, key: bytes, expires_at: float, now: float) -> bool | None:
        """True if ``key`` was new (now remembered until ``expires_at``), False if it
        was seen before (a replay), None if the cache is full."""
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] <= now:
            at, old = heapq.heappop(heap)
            if expiry.get(old) == at:
                del expiry[old]
        seen = expiry.get(key)
        if seen is not None and seen > now:
            return False
        if len(expiry) >= self.max_entries:
            return None
        expiry[key] = expires_at
        heapq.heappush(heap, (expires_at, key))
        return True
