"""A node's view of the sidecar: its token, the cluster's keys, and layer torrents.

:class:`SidecarClient` speaks the sidecar's HTTP API (docs/protocol.md):
``POST /token``, ``GET /.well-known/jwks.json``, ``GET /torrents/{digest}``.
:class:`JwksSource` keeps a verifier's copy of the cluster's keys fresh (the tracker's and,
through the keeper, the node's).
:class:`TokenKeeper` holds the node's key and keeps a fresh token (re-issued when
:func:`~p2pimage.auth.tokens.renewal_due` says) and a fresh key set, so the tracker
client and the peer authenticator always have valid credentials.
:class:`DPoPAuth` signs every request made with the token (``Authorization: DPoP``
and a fresh ``DPoP`` proof, RFC 9449): the tracker's and the sidecar's torrent endpoint
refuse a bare token.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pimage.auth.tokens import (
    KeySet,
    NodeKey,
    PeerAuthenticator,
    TokenVerifier,
    bound_peer_id,
    create_proof,
    renewal_at,
    renewal_due,
)
from p2pimage.errors import AuthError, MetainfoError, P2PImageError
from p2pimage.metainfo.torrent import MAX_TORRENT_BYTES, Metainfo

__all__ = [
    "DEFAULT_JWKS_MIN_REFRESH_S",
    "DEFAULT_JWKS_REFRESH_S",
    "DPoPAuth",
    "JwksSource",
    "SidecarClient",
    "SidecarError",
    "TokenKeeper",
    "load_jwks_file",
]

log = logging.getLogger("p2pimage.sidecar.client")

# A JWKS document holds a handful of public keys (~200 bytes each); 1 MiB is thousands.
MAX_JWKS_BYTES = 1 << 20
#: How often a verifier reloads the cluster's keys: a rotation publishes the next key at
#: least this long before it signs (docs/operations.md).
DEFAULT_JWKS_REFRESH_S = 300.0
#: At most one extra reload this often for tokens signed by a key not yet known, so a
#: stream of forged kids cannot turn every request into a fetch.
DEFAULT_JWKS_MIN_REFRESH_S = 10.0
# The token keeper's longest sleep between checks of its wall clock.
_MAX_CHECK_S = 60.0


class SidecarError(P2PImageError):
    """The sidecar is unreachable or refused; ``status`` is its HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DPoPAuth(httpx.Auth):
    """httpx authentication by a node token with proof of possession: every request gets
    ``Authorization: DPoP <token>`` and a ``DPoP`` proof, signed by ``node_key``, for its
    own method and full URL (query included), with a fresh nonce."""

    def __init__(
        self,
        *,
        token: str | Callable[[], str],
        node_key: NodeKey,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._token = token
        self.node_key = node_key
        self.clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token() if callable(self._token) else self._token
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = create_proof(
            self.node_key,
            method=request.method,
            url=str(request.url),
            token=token,
            now=self.clock(),
        )
        yield request


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: float


class SidecarClient:
    """HTTP client of one sidecar base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient,
        timeout_s: float = 10.0,
        auth: httpx.Auth | None = None,
    ):
        """``auth`` signs torrent requests (a :class:`DPoPAuth`); a :class:`TokenKeeper`
        built on this client sets it to the node's own credentials."""
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.timeout_s = timeout_s
        self.auth = auth

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(
                method, self.base_url + path, timeout=self.timeout_s, **kwargs
            )
        except httpx.HTTPError as exc:
            raise SidecarError(f"sidecar {self.base_url} unreachable: {exc}") from None

    async def issue_token(
        self, *, node: str, jwk: dict[str, Any], credential: str, zone: str | None = None
    ) -> IssuedToken:
        body: dict[str, Any] = {"node": node, "jwk": jwk, "credential": credential}
        if zone:
            body["zone"] = zone
        response = await self._request("POST", "/token", json=body)
        if response.status_code != 200:
            raise SidecarError(
                f"token request refused: HTTP {response.status_code} {response.text[:200]}",
                status=response.status_code,
            )
        try:
            doc = response.json()
            return IssuedToken(str(doc["token"]), float(doc["expires_at"]))
        except (ValueError, KeyError, TypeError):
            raise SidecarError("token response is not the expected JSON") from None

    async def jwks(self) -> KeySet:
        response = await self._request("GET", "/.well-known/jwks.json")
        if response.status_code != 200:
            raise SidecarError(f"JWKS: HTTP {response.status_code}", status=response.status_code)
        if len(response.content) > MAX_JWKS_BYTES:
            raise SidecarError("JWKS document larger than MAX_JWKS_BYTES")
        try:
            return KeySet.from_jwks(response.json())
        except (ValueError, RecursionError, AuthError) as exc:  # deep nesting: RecursionError
            raise SidecarError(f"JWKS document is invalid: {exc}") from None

    async def torrent(self, digest: str, repository: str) -> Metainfo:
        """The layer's torrent (generated on demand by the sidecar if needed), asked for
        with the node's token and a proof of possession (``auth``)."""
        kwargs: dict[str, Any] = {} if self.auth is None else {"auth": self.auth}
        response = await self._request(
            "GET", f"/torrents/{digest}", params={"repository": repository}, **kwargs
        )
        if response.status_code != 200:
            raise SidecarError(
                f"torrent for {digest}: HTTP {response.status_code}", status=response.status_code
            )
        if len(response.content) > MAX_TORRENT_BYTES:
            raise SidecarError("torrent larger than MAX_TORRENT_BYTES")
        try:
            meta = Metainfo.from_bytes(response.content)
        except MetainfoError as exc:
            raise SidecarError(f"sidecar sent an invalid torrent: {exc}") from None
        if meta.sha256 != digest:
            raise SidecarError(f"sidecar sent the torrent of {meta.sha256} for {digest}")
        return meta


async def load_jwks_file(path: Path) -> KeySet:
    """The key set in a JWKS file (e.g. from ``p2pimage keys jwks``); raises
    :class:`OSError`, :class:`ValueError` (not JSON) or :class:`AuthError`."""
    body = await trio.Path(path).read_bytes()
    try:
        document = json.loads(body)
    except RecursionError:
        raise ValueError("JWKS file nested too deeply") from None
    return KeySet.from_jwks(document)


class JwksSource:
    """A verifier's copy of the cluster's keys, from ``load`` (the sidecar's
    :meth:`SidecarClient.jwks`, or :func:`load_jwks_file`).

    :meth:`run` reloads it every ``refresh_s``; :meth:`refresh_for_unknown_kid` reloads it
    at once for a token signed by a key not yet known (a rotation), at most once per
    ``min_refresh_s``. ``generation`` counts the changes, so a cache of verified tokens
    can tell when to drop them.
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[KeySet]],
        *,
        refresh_s: float = DEFAULT_JWKS_REFRESH_S,
        min_refresh_s: float = DEFAULT_JWKS_MIN_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.refresh_s = refresh_s
        self.min_refresh_s = min_refresh_s
        self.clock = clock
        self.keys = KeySet()
        self.generation = 0
        self.loaded_at = -math.inf  # the last successful load
        self._last_attempt = -math.inf

    def stale(self) -> bool:
        """True when the last successful load is ``refresh_s`` old (or there was none)."""
        return self.clock() - self.loaded_at >= self.refresh_s

    async def reload(self) -> bool:
        """Load the key set now; True when it changed. Raises what ``load`` raises."""
        self._last_attempt = self.clock()
        keys = await self._load()
        self.loaded_at = self._last_attempt
        changed = keys.to_jwks() != self.keys.to_jwks()
        if changed:
            self.keys = keys
            self.generation += 1
            log.info("jwks loaded", extra={"fields": {"kids": keys.kids}})
        return changed

    async def refresh(self) -> bool:
        """:meth:`reload`, with failures logged (the keys in hand stay), not raised."""
        try:
            return await self.reload()
        except (OSError, ValueError, httpx.HTTPError, P2PImageError) as exc:
            log.warning("jwks refresh failed", extra={"fields": {"error": str(exc)}})
            return False

    async def refresh_for_unknown_kid(self) -> bool:
        """:meth:`refresh`, unless one was tried within ``min_refresh_s``."""
        if self.clock() - self._last_attempt < self.min_refresh_s:
            return False
        return await self.refresh()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load once, report started, then refresh every ``refresh_s`` until cancelled."""
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self.refresh_s)
            await self.refresh()


class TokenKeeper:
    """The node's identity: key pair, current token, and the cluster's verification keys.

    ``run()`` keeps both fresh; ``authenticator()`` (after ``ready``) gives the peer
    authenticator that always signs with the current token and verifies peers against the
    current key set, so key rotation at the sidecar reaches running swarms.
    """

    def __init__(
        self,
        sidecar: SidecarClient,
        *,
        node: str,
        credential: str,
        zone: str | None = None,
        node_key: NodeKey | None = None,
        jwks_refresh_s: float = DEFAULT_JWKS_REFRESH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sidecar = sidecar
        self.node = node
        self.credential = credential
        self.zone = zone
        self.node_key = node_key or NodeKey.generate()
        self.clock = clock
        self.jwks = JwksSource(sidecar.jwks, refresh_s=jwks_refresh_s, clock=clock)
        self.verifier = TokenVerifier(KeySet())
        self._token: IssuedToken | None = None
        self._issued_at = 0.0
        self._cluster: str | None = None
        # The sidecar's clock minus ours, learnt from each token's ``iat``: token times,
        # proofs and peer checks all read the sidecar's time, so a node whose clock is
        # off (no NTP yet, a paused VM) still agrees with the tracker and its peers.
        self.clock_offset_s = 0.0
        self.ready = trio.Event()
        if sidecar.auth is None:
            sidecar.auth = self.request_auth()

    @property
    def token(self) -> str:
        if self._token is None:
            raise SidecarError("no token yet")
        return self._token.token

    @property
    def cluster(self) -> str:
        if self._cluster is None:
            raise SidecarError("no token yet")
        return self._cluster

    def _token_due(self, now: float) -> bool:
        return self._token is None or renewal_due(self._issued_at, self._token.expires_at, now)

    def now(self) -> float:
        """The time as the sidecar counts it (our clock corrected by its last token)."""
        return self.clock() + self.clock_offset_s

    async def refresh(self) -> None:
        now = self.now()
        await self.jwks.reload()
        keys = self.jwks.keys
        if self._token_due(now):
            asked = self.clock()
            issued = await self.sidecar.issue_token(
                node=self.node,
                jwk=self.node_key.public_jwk(),
                credential=self.credential,
                zone=self.zone,
            )
            local = (asked + self.clock()) / 2
            offset = _issued_at(issued.token, default=local) - local
            now = self.clock() + offset
            # Our own token tells us our cluster; verifying it proves the JWKS matches
            # (and the signature covers the iat the offset was taken from: a token that
            # fails leaves the offset as it was).
            claims = TokenVerifier(keys).verify(issued.token, now=now)
            self.clock_offset_s = offset
            self._token, self._issued_at, self._cluster = issued, now, claims.cluster
        self.verifier.keys = keys
        self.ready.set()

    async def run(self) -> None:
        """Keep the token and keys fresh until cancelled; retry with backoff on failure."""
        backoff = 1.0
        while True:
            now = self.now()
            if self._token_due(now) or self.jwks.stale():
                try:
                    await self.refresh()
                    backoff = 1.0
                except (SidecarError, AuthError) as exc:
                    log.warning("token refresh failed (retrying in %.0f s): %s", backoff, exc)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    continue
            # Asleep until the token or the key set is due, not polling each second
            # (an idle node's wake-ups); at least a second apart as ever, and at most
            # _MAX_CHECK_S, so a wall clock that jumps (a resumed VM) is noticed.
            await trio.sleep(min(max(self._due_in_s(), 1.0), _MAX_CHECK_S))

    def _due_in_s(self) -> float:
        """Seconds until :meth:`run` must refresh the token or the key set."""
        if self._token is None:
            return 0.0
        token_in = renewal_at(self._issued_at, self._token.expires_at) - self.now()
        jwks_in = self.jwks.loaded_at + self.jwks.refresh_s - self.jwks.clock()
        return min(token_in, jwks_in)

    def request_auth(self) -> DPoPAuth:
        """Proof-of-possession authentication for HTTP requests (tracker, sidecar) made
        with this node's current token."""
        return DPoPAuth(token=lambda: self.token, node_key=self.node_key, clock=self.now)

    def peer_id(self) -> bytes:
        """This node's peer id, bound to its name (the token subject) and its key: the
        tracker and peers refuse a peer id that does not carry their tag."""
        return bound_peer_id(self.node, self.node_key.public_jwk())

    def authenticator(self) -> PeerAuthenticator:
        """The peer authenticator for this node (call after ``ready`` is set)."""
        return PeerAuthenticator(
            node_key=self.node_key,
            token=lambda: self.token,
            verifier=self.verifier,
            cluster=self.cluster,
            clock=self.now,
        )


def _issued_at(token: str, *, default: float) -> float:
    """The ``iat`` claim of a JWT, read before verification (``default`` when it has
    none readable); the caller verifies the token next, at the time this gives."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["iat"])
    except (IndexError, ValueError, KeyError, TypeError):
        return default
