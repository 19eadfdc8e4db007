"""Cluster join credentials: stored hashed, checked in constant time.

A node proves it belongs to a cluster by presenting the cluster's join secret to the
sidecar. The sidecar stores only hashes, in one of two forms:

- ``sha256$<hex>``: for generated secrets (``p2pimage keys join-credential``, 256 random
  bits), where a slow hash adds nothing;
- ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``: for secrets a human chose.

:meth:`JoinCredentials.cluster_for` hashes the candidate against every stored entry and
compares each with :func:`hmac.compare_digest`, without stopping at the first match, so
neither the timing nor the answer says which cluster (or which part) was wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from p2pimage.errors import LocalProtocolError

#: scrypt cost for human-chosen secrets: n=2^14, r=8 (16 MiB, ~50 ms), the parameters
#: RFC 7914 and OWASP give for interactive logins.
SCRYPT_LOG2_N: Final = 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
#: Longest credential accepted, so a stranger cannot make us hash megabytes.
MAX_CREDENTIAL_LENGTH: Final = 1024


def generate_credential() -> str:
    """A new random join secret (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_credential(secret: str, *, scheme: str = "sha256", log2_n: int = SCRYPT_LOG2_N) -> str:
    """The stored form of ``secret`` (``scheme`` is ``sha256`` or ``scrypt``)."""
    raw = secret.encode()
    if scheme == "sha256":
        return "sha256$" + hashlib.sha256(raw).hexdigest()
    if scheme == "scrypt":
        salt = secrets.token_bytes(16)
        digest = hashlib.scrypt(
            raw, salt=salt, n=2**log2_n, r=SCRYPT_R, p=SCRYPT_P, maxmem=256 * 1024 * 1024
        )
        return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    raise LocalProtocolError(f"unknown credential hash scheme {scheme!r}")


@dataclass(frozen=True)
class _Entry:
    cluster: str
    scheme: str
    params: tuple[int, int, int]
    salt: bytes
    digest: bytes


def _parse(cluster: str, stored: str) -> _Entry:
    parts = stored.split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 2:
            digest = bytes.fromhex(parts[1])
            if len(digest) == 32:
                return _Entry(cluster, "sha256", (0, 0, 0), b"", digest)
        if parts[0] == "scrypt" and len(parts) == 6:
            log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if 1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16:
                return _Entry(cluster, "scrypt", (log2_n, r, p), _unb64(parts[4]), _unb64(parts[5]))
    except ValueError:
        pass
    raise LocalProtocolError(
        f"join credential hash for cluster {cluster!r} is not sha256$<hex> or scrypt$...$..."
    )


class JoinCredentials:
    """Stored credential hashes by cluster (several per cluster allow rotating them)."""

    def __init__(self, hashes: Iterable[tuple[str, str]]) -> None:
        self._entries = [_parse(cluster, stored) for cluster, stored in hashes]

    @property
    def clusters(self) -> set[str]:
        return {e.cluster for e in self._entries}

    def cluster_for(self, credential: str) -> str | None:
        """The cluster this credential joins, or ``None``. Every entry is checked."""
        if not isinstance(credential, str) or not 0 < len(credential) <= MAX_CREDENTIAL_LENGTH:
            return None
        raw = credential.encode()
        found: str | None = None
        sha = hashlib.sha256(raw).digest()
        for e in self._entries:
            if e.scheme == "sha256":
                candidate = sha
            else:
                log2_n, r, p = e.params
                candidate = hashlib.scrypt(
                    raw,
                    salt=e.salt,
                    n=2**log2_n,
                    r=r,
                    p=p,
                    maxmem=256 * 1024 * 1024,
                    dklen=len(e.digest),
                )
            if hmac.compare_digest(candidate, e.digest) and found is None:
                found = e.cluster
        return found


__all__ = [
    "MAX_CREDENTIAL_LENGTH",
    "JoinCredentials",
    "generate_credential",
    "hash_credential",
]
