"""The tracker daemon: wiring only.

Config in (TOML ``--config`` + ``P2PIMAGE_TRACKER_*``), library objects constructed
(:class:`~p2pimage.tracker.TrackerPolicy`, a state backend, a
:class:`~p2pimage.auth.tokens.TokenVerifier` fed from the sidecar's JWKS), endpoints mounted:

- ``GET /announce``: BEP 3 announce, compact peers (BEP 23), p2pimage extras;
- ``GET /scrape``: BEP 48 scrape of the caller's own cluster;
- ``POST /preheat``, ``GET /preheat``, ``GET /preheat/jobs``, ``GET /preheat/{id}``,
  ``POST /preheat/report``: preheat jobs of the caller's cluster (JSON; docs/protocol.md §4.2),
  kept in a :class:`~p2pimage.tracker.PreheatBoard` apart from the swarms;
- ``GET /healthz``, ``GET /metrics`` (Prometheus).

Every request proves possession of its token (RFC 9449 DPoP): ``Authorization: DPoP
<token>`` and a ``DPoP`` proof signed by the token's ``cnf.jwk`` for this very request
(method and URL with its query), fresh (``proof_window_s``) and never seen before (the
nonce is claimed in the state backend, so Redis replicas share it). A bare bearer token
gets 401. The announce's ``peer_id`` must carry the token subject's tag and is held by
that subject alone. Every swarm is keyed by (cluster from the verified token,
info-hash). Missing or unusable credentials get a bencoded ``failure reason`` with HTTP
401 (authentication failed) or 403 (valid token, not allowed here); malformed queries
get HTTP 400 with a failure reason. ``open_mode`` switches auth off for interop tests
with stock clients (every peer is in cluster ``open``). See docs/protocol.md, "Tracker
request authentication".
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import bencodepy
import click
import httpx
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemons._config import ConfigError, config_options, settings_for_command
from daemons._http import (
    ClientGone,
    TlsFiles,
    client_tls,
    read_body,
    receive_body,
    request_url,
)
from daemons._logging import LogJson, LogLevel, setup_logging
from daemons._run import exit_after_shutdown, run_until_signalled
from p2pimage.auth.tokens import (
    DEFAULT_LEEWAY_S,
    DEFAULT_PROOF_WINDOW_S,
    NodeToken,
    TokenVerifier,
    verify_proof,
)
from p2pimage.errors import AuthError, P2PImageError
from p2pimage.sidecar.client import (
    DEFAULT_JWKS_MIN_REFRESH_S,
    DEFAULT_JWKS_REFRESH_S,
    JwksSource,
    SidecarClient,
    load_jwks_file,
)
from p2pimage.tracker import (
    MAX_BATCH_BYTES,
    AnnounceOutcome,
    AnnounceRequest,
    AnnounceResponse,
    MemoryState,
    PeerIdTakenError,
    PolicyConfig,
    PreheatBoard,
    PreheatError,
    RedisState,
    ScrapeStats,
    StateUnavailableError,
    SwarmKey,
    SwarmRecord,
    TrackerPolicy,
    TrackerRequestError,
    TrackerState,
    check_batch_digest,
    encode_announce_answer,
    encode_announce_batch_response,
    encode_announce_response,
    encode_failure,
    encode_scrape_response,
    parse_announce,
    parse_announce_batch,
    parse_preheat_report,
    parse_preheat_request,
    parse_scrape,
)
from p2pimage.tracker._preheat import (
    DEFAULT_JOB_TTL_S,
    MAX_JOBS_PER_CLUSTER,
    MAX_PREHEAT_BODY,
    PreheatBoardFull,
)

log = logging.getLogger("p2pimage.tracker")

OPEN_CLUSTER = "open"
_BENCODE_TYPE = "text/plain"
# Authorization failures (a valid token that may not do this) are 403; everything else
# about a token is an authentication failure, 401.
_FORBIDDEN_REASONS = frozenset({"wrong_audience", "wrong_issuer", "wrong_cluster", "out_of_scope"})
_CHALLENGE = {"WWW-Authenticate": 'DPoP algs="EdDSA"'}
# An announce's metrics result and the HTTP status a single announce answers it with.
_STATUS: Final = {"ok": 200, "forbidden": 403, "unavailable": 503}
# Verified tokens cached by raw string; at 600 s lifetimes and one token per node this
# holds ~10 renewals of a 5,000-node cluster. Beyond it the cache is emptied, not grown.
_TOKEN_CACHE_MAX = 100_000
# The library's defaults, which the settings below take as theirs.
_POLICY: Final = PolicyConfig()


class TrackerSettings(BaseModel):
    """Tracker configuration (TOML keys; env ``P2PIMAGE_TRACKER_<KEY>``)."""

    model_config = ConfigDict(extra="forbid")

    listen: str = Field(default="127.0.0.1:6969", description="host:port to serve on")
    open_mode: bool = Field(
        default=False, description="auth off, one cluster 'open' (interop tests)"
    )
    sidecar_url: str | None = Field(default=None, description="sidecar base URL; JWKS from there")
    jwks_file: Path | None = Field(default=None, description="JWKS file (instead of sidecar_url)")
    issuer: str | None = Field(default=None, description="required token 'iss' (None: any)")
    jwks_refresh_s: float = Field(
        default=DEFAULT_JWKS_REFRESH_S, gt=0, description="periodic JWKS refresh"
    )
    jwks_min_refresh_s: float = Field(
        default=DEFAULT_JWKS_MIN_REFRESH_S, ge=0, description="rate limit on unknown kid"
    )
    registry_url: str | None = Field(default=None, description="registry base URL for origin reads")
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "p2pimage:tracker:"
    trust_query_ip: bool = Field(default=False, description="use the announce 'ip' parameter")
    proof_window_s: float = Field(
        default=DEFAULT_PROOF_WINDOW_S,
        gt=0,
        le=300,
        description="DPoP proofs are accepted while |now - iat| is at most this",
    )
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#]+$",
        description="scheme://host[:port] nodes use, when a proxy terminates TLS or "
        "rewrites Host (proofs name it); none: the request's own",
    )
    interval_s: int = Field(default=_POLICY.interval_s, ge=1, le=86400)
    min_interval_s: int = Field(default=_POLICY.min_interval_s, ge=1, le=86400)
    fetcher_interval_s: int = Field(default=_POLICY.fetcher_interval_s, ge=1, le=86400)
    peer_timeout_s: float = Field(default=_POLICY.peer_timeout_s, gt=0)
    origin_ratio: float = Field(default=_POLICY.origin_ratio, gt=0, le=1)
    max_origin_fetchers: int = Field(default=_POLICY.max_origin_fetchers, ge=1, le=10_000)
    origin_stall_s: float = Field(default=_POLICY.origin_stall_s, gt=0)
    seeder_stall_s: float = Field(
        default=_POLICY.seeder_stall_s,
        gt=0,
        description="a leecher without progress this long contradicts a claimed seeder",
    )
    release_min_seeders: int = Field(default=_POLICY.release_min_seeders, ge=0)
    release_seeder_ratio: float = Field(default=_POLICY.release_seeder_ratio, ge=0)
    linger_s: float = Field(default=_POLICY.linger_s, ge=0)
    origin_lease_pieces: int | None = Field(
        default=_POLICY.origin_lease_pieces,
        ge=0,
        description="pieces read per origin lease (none: max(4, pieces/8); 0: off)",
    )
    sweep_interval_s: float = Field(default=30.0, gt=0)
    preheat_job_ttl_s: float = Field(
        default=DEFAULT_JOB_TTL_S, gt=0, description="a preheat job is handed out this long"
    )
    preheat_max_jobs: int = Field(
        default=MAX_JOBS_PER_CLUSTER, ge=1, le=10_000, description="live preheat jobs per cluster"
    )
    tls_cert_file: Path | None = Field(default=None, description="serve HTTPS: certificate (PEM)")
    tls_key_file: Path | None = Field(default=None, description="serve HTTPS: its key (PEM)")
    http_server: Literal["lean", "hypercorn"] = Field(
        default="lean",
        description="HTTP/1.1 server: lean (daemons/_asgi_server.py, ~0.3 ms less CPU a "
        "request) or hypercorn",
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle the sidecar is verified against (default: system)"
    )
    log_level: LogLevel = "info"
    log_json: LogJson = None

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            interval_s=self.interval_s,
            min_interval_s=self.min_interval_s,
            fetcher_interval_s=self.fetcher_interval_s,
            peer_timeout_s=self.peer_timeout_s,
            origin_ratio=self.origin_ratio,
            max_origin_fetchers=self.max_origin_fetchers,
            origin_stall_s=self.origin_stall_s,
            seeder_stall_s=self.seeder_stall_s,
            release_min_seeders=self.release_min_seeders,
            release_seeder_ratio=self.release_seeder_ratio,
            linger_s=self.linger_s,
            origin_lease_pieces=self.origin_lease_pieces,
        )


def check_settings(settings: TrackerSettings) -> None:
    """Cross-field checks pydantic cannot name a key for."""
    if not settings.open_mode and settings.sidecar_url is None and settings.jwks_file is None:
        raise ConfigError("config key 'sidecar_url': set sidecar_url or jwks_file (or open_mode)")
    if settings.peer_timeout_s <= settings.interval_s:
        raise ConfigError(
            "config key 'peer_timeout_s': must exceed interval_s (a peer gets one missed "
            "announce before it expires)"
        )
    if settings.jwks_file is not None and not settings.jwks_file.is_file():
        raise ConfigError(f"config key 'jwks_file': no such file {str(settings.jwks_file)!r}")
    TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file)
    client_tls(settings.ca_file)


# ------------------------------------------------------------------------- token checks


@dataclass
class TokenGate:
    """Verifies bearer tokens, caching verified ones by raw string until they expire.

    Verification costs ~0.1 ms (an Ed25519 check); a node re-announces with the same token
    for its whole lifetime, so the cache turns nearly every announce into a dict lookup.
    The cache is dropped whenever the key set changes (rotation, revocation).
    """

    jwks: JwksSource
    issuer: str | None
    leeway_s: float = DEFAULT_LEEWAY_S
    _cache: dict[str, NodeToken] = field(default_factory=dict)
    _generation: int = -1
    _verifier: TokenVerifier | None = None

    def _current(self) -> TokenVerifier:
        if self._verifier is None or self._generation != self.jwks.generation:
            self._verifier = TokenVerifier(
                self.jwks.keys, issuer=self.issuer, leeway_s=self.leeway_s
            )
            self._generation = self.jwks.generation
            self._cache.clear()
        return self._verifier

    async def check(self, raw: str, now: float) -> NodeToken:
        verifier = self._current()
        token = self._cache.get(raw)
        if token is not None:
            if token.not_before - self.leeway_s <= now <= token.expires_at + self.leeway_s:
                return token
            del self._cache[raw]
        try:
            token = verifier.verify(raw, now=now)
        except AuthError as exc:
            if exc.reason != "unknown_kid" or not await self.jwks.refresh_for_unknown_kid():
                raise
            token = self._current().verify(raw, now=now)
        if len(self._cache) >= _TOKEN_CACHE_MAX:
            self._cache.clear()
        self._cache[raw] = token
        return token


# ------------------------------------------------------------------------------ metrics


class TrackerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.announces = Counter(
            "p2pimage_tracker_announces", "Announces by result", ["result"], registry=r
        )
        self.batches = Counter(
            "p2pimage_tracker_announce_batches",
            "Batched announce requests by result (their swarms count in announces)",
            ["result"],
            registry=r,
        )
        self.scrapes = Counter(
            "p2pimage_tracker_scrapes", "Scrapes by result", ["result"], registry=r
        )
        self.auth_failures = Counter(
            "p2pimage_tracker_auth_failures", "Token rejections by reason", ["reason"], registry=r
        )
        self.origin_assignments = Counter(
            "p2pimage_tracker_origin_assignments",
            "Announce responses carrying an origin range",
            registry=r,
        )
        self.release_orders = Counter(
            "p2pimage_tracker_release_orders",
            "Announce responses carrying a release order",
            registry=r,
        )
        self.announce_seconds = Histogram(
            "p2pimage_tracker_announce_duration_seconds",
            "Time to answer an announce",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.swarms = Gauge("p2pimage_tracker_swarms", "Live swarms", registry=r)
        self.preheat_requests = Counter(
            "p2pimage_tracker_preheat_requests",
            "Preheat requests by kind (submit, poll, report, read) and result",
            ["kind", "result"],
            registry=r,
        )
        self.preheat_jobs = Gauge(
            "p2pimage_tracker_preheat_jobs", "Live preheat jobs (all clusters)", registry=r
        )
        self.preheat_nodes = Gauge(
            "p2pimage_tracker_preheat_nodes",
            "Nodes that reported on a live preheat job, by result",
            ["result"],
            registry=r,
        )
        self.peers = Gauge("p2pimage_tracker_peers", "Live peers by state", ["state"], registry=r)
        self.largest_swarm = Gauge(
            "p2pimage_tracker_largest_swarm_peers", "Peers in the largest live swarm", registry=r
        )


# ------------------------------------------------------------------------------ the app


@dataclass
class Tracker:
    settings: TrackerSettings
    policy: TrackerPolicy
    state: TrackerState
    gate: TokenGate | None
    metrics: TrackerMetrics = field(default_factory=TrackerMetrics)
    clock: Callable[[], float] = time.time
    preheat: PreheatBoard = field(default_factory=lambda: PreheatBoard(secrets.token_hex(8)))


def _bencoded(status: int, body: bytes, **headers: str) -> Response:
    return Response(body, status_code=status, media_type=_BENCODE_TYPE, headers=headers or None)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _unauthorized(tracker: Tracker, reason: str, message: str) -> _Refused:
    tracker.metrics.auth_failures.labels(reason).inc()
    return _Refused(_bencoded(401, encode_failure(message, reason), **_CHALLENGE))


async def _authenticate(tracker: Tracker, request: Request, now: float) -> NodeToken | None:
    if tracker.gate is None:
        return None
    authorizations = request.headers.getlist("authorization")
    scheme, _, raw = (authorizations[0] if len(authorizations) == 1 else "").partition(" ")
    raw = raw.strip()
    if scheme.lower() == "bearer":
        raise _unauthorized(
            tracker,
            "dpop_required",
            "bearer tokens are refused: send 'Authorization: DPoP <token>' with a DPoP "
            "proof header signed by the token's key (docs/protocol.md)",
        )
    if scheme.lower() != "dpop" or not raw:
        raise _unauthorized(tracker, "missing", "missing 'Authorization: DPoP <token>'")
    proofs = request.headers.getlist("dpop")
    if len(proofs) > 1:
        raise _unauthorized(tracker, "bad_proof", "exactly one DPoP proof header is allowed")
    try:
        token = await tracker.gate.check(raw, now)
        proof = verify_proof(
            proofs[0] if proofs else None,
            token=token,
            method=request.method,
            url=request_url(
                request.scope, request.headers.get("host", ""), tracker.settings.public_url
            ),
            now=now,
            window_s=tracker.settings.proof_window_s,
        )
    except AuthError as exc:
        log.info(
            "token rejected",
            extra={"fields": {"reason": exc.reason, "remote": _remote(request)}},
        )
        if exc.reason in _FORBIDDEN_REASONS:
            tracker.metrics.auth_failures.labels(exc.reason).inc()
            raise _Refused(
                _bencoded(403, encode_failure(f"token rejected: {exc.reason}", exc.reason))
            ) from None
        raise _unauthorized(tracker, exc.reason, f"token rejected: {exc}") from None
    try:
        fresh = await tracker.state.claim_nonce(proof.replay_key, proof.expires_at, now)
    except (StateUnavailableError, OSError, trio.TooSlowError) as exc:
        log.warning("state unavailable", extra={"fields": {"error": str(exc)}})
        raise _Refused(
            _bencoded(503, encode_failure("tracker state unavailable", "unavailable"))
        ) from None
    if fresh is None:
        log.warning("proof replay cache full")
        raise _Refused(_bencoded(503, encode_failure("replay cache full", "unavailable")))
    if not fresh:
        log.info(
            "proof replayed",
            extra={"fields": {"subject": token.subject, "remote": _remote(request)}},
        )
        raise _unauthorized(tracker, "replayed_proof", "DPoP proof already used (jti)")
    return token


_BATCH_PATH: Final = "/announce/batch"
# The headers Starlette's Response(media_type="text/plain") sends, as bare endpoints send them.
_BENCODE_CONTENT_TYPE: Final = (b"content-type", b"text/plain; charset=utf-8")


async def _send_bencoded(send: Send, status: int, body: bytes) -> None:
    """A bare endpoint's answer: one start, one body, the headers of :func:`_bencoded`."""
    headers = [(b"content-length", str(len(body)).encode()), _BENCODE_CONTENT_TYPE]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_refusal(send: Send, response: Response) -> None:
    """A refusal made for Starlette (:class:`_Refused`), sent by a bare endpoint."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": bytes(response.body)})


class _Bare:
    """An ASGI endpoint that Starlette routes to as is (a plain function would be wrapped
    as Request -> Response)."""

    def __init__(self, endpoint: ASGIApp) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


def _refused_403(reason: str, message: str) -> _Refused:
    return _Refused(_bencoded(403, encode_failure(message, reason)))


def _json_refusal(response: Response) -> JSONResponse:
    """A bencoded refusal (``_authenticate``'s) as the JSON the preheat endpoints speak."""
    try:
        failure = bencodepy.decode(bytes(response.body))
        message = failure[b"failure reason"].decode(errors="replace")
        reason = failure.get(b"p2pimage", {}).get(b"error", b"").decode(errors="replace")
    except (bencodepy.BencodeDecodeError, AttributeError, KeyError, TypeError):
        message, reason = "refused", ""
    headers = {k: v for k, v in response.headers.items() if k.lower() == "www-authenticate"}
    return JSONResponse(
        {"error": message, "reason": reason or None},
        status_code=response.status_code,
        headers=headers or None,
    )


def _remote(request: Request) -> str:
    return request.client.host if request.client is not None else "0.0.0.0"


def _scope_check(token: NodeToken | None, info_hash: bytes) -> None:
    if token is not None and not token.covers(info_hash):
        raise _Refused(
            _bencoded(403, encode_failure("token rejected: out_of_scope", "out_of_scope"))
        )


def create_app(tracker: Tracker) -> ASGIApp:
    metrics = tracker.metrics
    settings = tracker.settings

    async def announce(request: Request) -> Response:
        started = time.perf_counter()
        now = tracker.clock()
        try:
            token = await _authenticate(tracker, request, now)
            try:
                req = parse_announce(request.scope["query_string"])
            except TrackerRequestError as exc:
                metrics.announces.labels("bad_request").inc()
                return _bencoded(400, encode_failure(str(exc), "bad_request"))
            _scope_check(token, req.info_hash)
            if token is not None and not token.binds_peer_id(req.peer_id):
                metrics.auth_failures.labels("peer_id_mismatch").inc()
                raise _refused_403(
                    "peer_id_mismatch", "peer_id does not carry the token subject's tag"
                )
        except _Refused as refused:
            status = refused.response.status_code
            metrics.announces.labels(
                {403: "forbidden", 503: "unavailable"}.get(status, "unauthorized")
            ).inc()
            return refused.response
        status, body = await apply(req, token, request, now)
        if status == 200:
            metrics.announce_seconds.observe(time.perf_counter() - started)
        return _bencoded(status, body)

    async def apply(
        req: AnnounceRequest, token: NodeToken | None, request: Request, now: float
    ) -> tuple[int, bytes]:
        """One swarm's announce, authenticated and in scope: (status, encoded answer)."""
        cluster = token.cluster if token is not None else OPEN_CLUSTER
        key = SwarmKey(cluster, req.info_hash)
        outcome: AnnounceOutcome | P2PImageError
        try:
            outcome = await tracker.state.update(key, rule(req, token, _remote(request), now))
        except (P2PImageError, OSError, trio.TooSlowError) as exc:
            outcome = exc if isinstance(exc, P2PImageError) else StateUnavailableError(str(exc))
        result, body = answer(outcome)
        metrics.announces.labels(result).inc()
        return _STATUS[result], body

    def rule(
        req: AnnounceRequest, token: NodeToken | None, remote: str, now: float
    ) -> Callable[[SwarmRecord], AnnounceOutcome]:
        """The policy's announce for one swarm, as the state backend runs it."""
        return functools.partial(
            tracker.policy.announce,
            req=req,
            host=req.ip if settings.trust_query_ip and req.ip else remote,
            now=now,
            zone=token.zone if token is not None else None,
            registry_url=settings.registry_url,
            subject=token.subject if token is not None else None,
        )

    def answer(outcome: AnnounceOutcome | P2PImageError) -> tuple[str, bytes]:
        """One swarm's outcome (or its error): (its metrics result, its encoded answer)."""
        if isinstance(outcome, PeerIdTakenError):
            metrics.auth_failures.labels("peer_id_taken").inc()
            return "forbidden", encode_failure(str(outcome), "peer_id_taken")
        if isinstance(outcome, StateUnavailableError):
            log.warning("state unavailable", extra={"fields": {"error": str(outcome)}})
            return "unavailable", encode_failure("tracker state unavailable", "unavailable")
        if isinstance(outcome, P2PImageError):
            raise outcome
        if outcome.origin is not None:
            metrics.origin_assignments.inc()
        if outcome.release:
            metrics.release_orders.inc()
        if outcome.compact is None:  # a host that is no IP literal: the general encoder
            body = encode_announce_response(
                AnnounceResponse(
                    interval=outcome.interval,
                    min_interval=outcome.min_interval,
                    complete=outcome.complete,
                    incomplete=outcome.incomplete,
                    peers=outcome.peers,
                    origin=outcome.origin,
                    release=outcome.release,
                )
            )
        else:
            body = encode_announce_answer(
                outcome.complete,
                outcome.incomplete,
                outcome.interval,
                outcome.min_interval,
                outcome.compact,
                outcome.origin,
                outcome.release,
            )
        return "ok", body

    async def announce_batch(scope: Scope, receive: Receive, send: Send) -> None:
        """A p2pimage extension: every swarm of one node in one request
        (docs/protocol.md, "Batched announces"); the same authentication as /announce,
        each swarm checked against the token's scope and answered on its own.

        A bare ASGI endpoint: the body comes from ``receive`` and the answer goes out as
        one ``http.response.start`` and one ``http.response.body``, without Starlette's
        middleware, router and Request/Response objects: sending the answer through them
        took about 12 % of the tracker's CPU at 20 swarms a request, 7 % now (one py-spy
        profile each; docs/benchmarks.md, "Batched announces")."""
        started = time.perf_counter()
        now = tracker.clock()
        # A view of the headers for the checks /announce shares; nothing reads the body
        # through it.
        request = Request(scope)
        try:
            token = await _authenticate(tracker, request, now)
        except _Refused as refused:
            metrics.batches.labels(
                "forbidden" if refused.response.status_code == 403 else "unauthorized"
            ).inc()
            await _send_refusal(send, refused.response)
            return
        try:
            raw = await receive_body(
                receive, request.headers.get("content-length"), MAX_BATCH_BYTES
            )
        except ClientGone:
            return  # nobody to answer
        try:
            if raw is None:
                raise TrackerRequestError(f"batch body over {MAX_BATCH_BYTES} bytes")
            # The body's digest is in the URL, which the DPoP proof signs (htu): the
            # proof covers the announces as a single announce's covers its query.
            check_batch_digest(scope["query_string"], raw)
            reqs = parse_announce_batch(raw)
        except TrackerRequestError as exc:
            metrics.batches.labels("bad_request").inc()
            await _send_bencoded(send, 400, encode_failure(str(exc), "bad_request"))
            return
        # What every swarm of the batch shares is worked out once (the caller, its
        # address, its peer id tag); the swarms in scope go to the state backend together
        # (one Redis pipeline); results are counted once per kind at the end.
        cluster = token.cluster if token is not None else OPEN_CLUSTER
        remote = _remote(request)
        answers: list[tuple[str, bytes] | None] = []
        updates = []
        for req in reqs:
            if token is not None and not token.covers(req.info_hash):
                answers.append(
                    ("forbidden", encode_failure("token rejected: out_of_scope", "out_of_scope"))
                )
            elif token is not None and not token.binds_peer_id(req.peer_id):
                metrics.auth_failures.labels("peer_id_mismatch").inc()
                message = "peer_id does not carry the token subject's tag"
                answers.append(("forbidden", encode_failure(message, "peer_id_mismatch")))
            else:
                answers.append(None)
                updates.append((SwarmKey(cluster, req.info_hash), rule(req, token, remote, now)))
        outcomes: list[AnnounceOutcome | P2PImageError]
        try:
            outcomes = await tracker.state.update_many(updates) if updates else []
        except (OSError, trio.TooSlowError) as exc:
            outcomes = [StateUnavailableError(str(exc))] * len(updates)
        decided = iter(outcomes)
        counts: dict[str, int] = {}
        bodies = []
        for done in answers:
            result, body = done if done is not None else answer(next(decided))
            counts[result] = counts.get(result, 0) + 1
            bodies.append(body)
        for result, n in counts.items():
            metrics.announces.labels(result).inc(n)
        metrics.batches.labels("ok").inc()
        metrics.announce_seconds.observe((time.perf_counter() - started) / len(reqs))
        await _send_bencoded(send, 200, encode_announce_batch_response(bodies))

    async def scrape(request: Request) -> Response:
        now = tracker.clock()
        try:
            token = await _authenticate(tracker, request, now)
            try:
                req = parse_scrape(request.scope["query_string"])
            except TrackerRequestError as exc:
                metrics.scrapes.labels("bad_request").inc()
                return _bencoded(400, encode_failure(str(exc), "bad_request"))
            for info_hash in req.info_hashes:
                _scope_check(token, info_hash)
        except _Refused as refused:
            metrics.scrapes.labels("refused").inc()
            return refused.response
        cluster = token.cluster if token is not None else OPEN_CLUSTER
        try:
            swarms = await tracker.state.read(SwarmKey(cluster, h) for h in req.info_hashes)
        except StateUnavailableError:
            metrics.scrapes.labels("unavailable").inc()
            return _bencoded(503, encode_failure("tracker state unavailable", "unavailable"))
        files: dict[bytes, ScrapeStats] = {
            h: tracker.policy.scrape(s, now) for h, s in zip(req.info_hashes, swarms, strict=True)
        }
        metrics.scrapes.labels("ok").inc()
        return _bencoded(200, encode_scrape_response(files))

    async def healthz(request: Request) -> Response:
        return Response(b"ok\n", media_type="text/plain")

    async def preheat_caller(request: Request, kind: str, now: float) -> tuple[str, str]:
        """(cluster, subject) of an authenticated preheat request; refusals as JSON."""
        try:
            token = await _authenticate(tracker, request, now)
        except _Refused as refused:
            metrics.preheat_requests.labels(kind, "refused").inc()
            raise _Refused(_json_refusal(refused.response)) from None
        if token is None:
            return OPEN_CLUSTER, OPEN_CLUSTER
        return token.cluster, token.subject

    def preheat_error(kind: str, status: int, message: str) -> JSONResponse:
        metrics.preheat_requests.labels(kind, "bad_request" if status == 400 else "refused").inc()
        return JSONResponse({"error": message}, status_code=status)

    async def preheat_submit(request: Request) -> Response:
        now = tracker.clock()
        try:
            cluster, subject = await preheat_caller(request, "submit", now)
        except _Refused as refused:
            return refused.response
        body = await read_body(request, MAX_PREHEAT_BODY)
        if body is None:
            return preheat_error("submit", 413, f"body exceeds {MAX_PREHEAT_BODY} bytes")
        try:
            job = tracker.preheat.submit(cluster, parse_preheat_request(body), subject, now)
        except PreheatError as exc:
            status = 429 if isinstance(exc, PreheatBoardFull) else 400
            return preheat_error("submit", status, str(exc))
        log.info(
            "preheat job submitted",
            extra={
                "fields": {
                    "job": job.id,
                    "cluster": cluster,
                    "by": subject,
                    "repository": job.spec.repository,
                    "layers": len(job.spec.layers),
                    "nodes": job.spec.nodes,
                }
            },
        )
        metrics.preheat_requests.labels("submit", "ok").inc()
        return JSONResponse({"epoch": tracker.preheat.epoch, "job": job.to_json()}, status_code=201)

    async def preheat_poll(request: Request) -> Response:
        now = tracker.clock()
        try:
            cluster, subject = await preheat_caller(request, "poll", now)
        except _Refused as refused:
            return refused.response
        since_text = request.query_params.get("since", "0")
        if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 18:
            return preheat_error("poll", 400, "'since' must be a job id (0 for all)")
        jobs = tracker.preheat.pending(cluster, subject, int(since_text), now)
        metrics.preheat_requests.labels("poll", "ok").inc()
        return JSONResponse(
            {
                "epoch": tracker.preheat.epoch,
                "cursor": tracker.preheat.cursor(),
                "jobs": [j.to_json(progress=False) for j in jobs],
            }
        )

    async def preheat_jobs(request: Request) -> Response:
        now = tracker.clock()
        try:
            cluster, _ = await preheat_caller(request, "read", now)
        except _Refused as refused:
            return refused.response
        metrics.preheat_requests.labels("read", "ok").inc()
        jobs = tracker.preheat.jobs(cluster, now)
        return JSONResponse({"epoch": tracker.preheat.epoch, "jobs": [j.to_json() for j in jobs]})

    async def preheat_job(request: Request) -> Response:
        now = tracker.clock()
        try:
            cluster, _ = await preheat_caller(request, "read", now)
        except _Refused as refused:
            return refused.response
        text = request.path_params["job"]
        job = (
            tracker.preheat.job(cluster, int(text), now)
            if text.isascii() and text.isdigit() and len(text) < 19
            else None
        )
        if job is None:
            return preheat_error("read", 404, f"no live preheat job {text!r} in this cluster")
        metrics.preheat_requests.labels("read", "ok").inc()
        return JSONResponse({"epoch": tracker.preheat.epoch, "job": job.to_json()})

    async def preheat_report(request: Request) -> Response:
        now = tracker.clock()
        try:
            cluster, subject = await preheat_caller(request, "report", now)
        except _Refused as refused:
            return refused.response
        body = await read_body(request, MAX_PREHEAT_BODY)
        if body is None:
            return preheat_error("report", 413, f"body exceeds {MAX_PREHEAT_BODY} bytes")
        try:
            report = parse_preheat_report(body)
            job = tracker.preheat.report(cluster, subject, report, now)
        except PreheatError as exc:
            return preheat_error("report", 400, str(exc))
        log.info(
            "preheat report",
            extra={
                "fields": {
                    "job": job.id,
                    "node": subject,
                    "result": report.result,
                    "error": report.error,
                }
            },
        )
        metrics.preheat_requests.labels("report", "ok").inc()
        return JSONResponse({"epoch": tracker.preheat.epoch, "job": job.to_json(progress=False)})

    async def prometheus(request: Request) -> Response:
        with contextlib.suppress(StateUnavailableError):
            stats = await tracker.state.stats(tracker.clock(), settings.peer_timeout_s)
            metrics.swarms.set(stats.swarms)
            metrics.peers.labels("seeder").set(stats.seeders)
            metrics.peers.labels("leecher").set(stats.leechers)
            metrics.largest_swarm.set(stats.largest_swarm)
        jobs, done, failed = tracker.preheat.stats(tracker.clock())
        metrics.preheat_jobs.set(jobs)
        metrics.preheat_nodes.labels("done").set(done)
        metrics.preheat_nodes.labels("failed").set(failed)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/announce", announce),
            # Reached only by other methods (405): POST never gets this far (below).
            Route("/announce/batch", _Bare(announce_batch), methods=["POST"]),
            Route("/scrape", scrape),
            Route("/preheat", preheat_submit, methods=["POST"]),
            Route("/preheat", preheat_poll, methods=["GET"]),
            Route("/preheat/jobs", preheat_jobs, methods=["GET"]),
            Route("/preheat/report", preheat_report, methods=["POST"]),
            Route("/preheat/{job}", preheat_job, methods=["GET"]),
            Route("/healthz", healthz),
            Route("/metrics", prometheus),
        ]
    )

    async def tracker_app(scope: Scope, receive: Receive, send: Send) -> None:
        # The batched announce, the one request whose fixed cost decides how many swarm
        # announces a core serves, goes straight to its endpoint.
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == _BATCH_PATH:
            await announce_batch(scope, receive, send)
        else:
            await app(scope, receive, send)

    return tracker_app


async def _sweep(tracker: Tracker) -> None:
    while True:
        await trio.sleep(tracker.settings.sweep_interval_s)
        await tracker.state.sweep(tracker.clock(), tracker.settings.peer_timeout_s)


async def run_tracker(
    settings: TrackerSettings,
    *,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled; reports the bound base URL through ``task_status``."""
    from daemons._http import serve_app

    async with contextlib.AsyncExitStack() as stack:
        state: TrackerState
        if settings.backend == "redis":
            import coredis

            client = coredis.Redis.from_url(settings.redis_url, decode_responses=False)
            await stack.enter_async_context(client)
            state = RedisState(
                client, prefix=settings.redis_prefix, ttl_s=2 * settings.peer_timeout_s
            )
        else:
            state = MemoryState()
        gate = jwks = None
        if not settings.open_mode:
            jwks_file = settings.jwks_file
            if jwks_file is None:
                assert settings.sidecar_url is not None
                http = await stack.enter_async_context(
                    httpx.AsyncClient(verify=client_tls(settings.ca_file))
                )
                load = SidecarClient(settings.sidecar_url, http=http).jwks
            else:
                load = functools.partial(load_jwks_file, jwks_file)
            jwks = JwksSource(
                load,
                refresh_s=settings.jwks_refresh_s,
                min_refresh_s=settings.jwks_min_refresh_s,
            )
            gate = TokenGate(jwks, settings.issuer)
        tracker = Tracker(
            settings,
            TrackerPolicy(settings.policy_config(), rng=rng),
            state,
            gate,
            preheat=PreheatBoard(
                secrets.token_hex(8),
                ttl_s=settings.preheat_job_ttl_s,
                max_jobs=settings.preheat_max_jobs,
            ),
        )
        async with trio.open_nursery() as nursery:
            if jwks is not None:
                await nursery.start(jwks.run)
            nursery.start_soon(_sweep, tracker)
            url = await nursery.start(
                functools.partial(
                    serve_app,
                    keep_alive_max_requests=100_000,
                    tls=TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file),
                    server=settings.http_server,
                ),
                create_app(tracker),
                settings.listen,
            )
            log.info(
                "tracker serving",
                extra={
                    "fields": {
                        "url": url,
                        "backend": settings.backend,
                        "open_mode": settings.open_mode,
                    }
                },
            )
            task_status.started(url)


@click.command("tracker")
@config_options("tracker")
def tracker(config_path: Path | None, print_config: bool) -> None:
    """Run the cluster-aware BitTorrent tracker."""

    settings = settings_for_command(
        TrackerSettings,
        daemon="tracker",
        config_path=config_path,
        print_config=print_config,
        check=check_settings,
    )
    if settings is None:
        return
    setup_logging(settings.log_level, json_lines=settings.log_json)
    # Swarms are many small long-lived objects; the default thresholds (700 allocations)
    # run young-generation collections every few announces. Collect less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    run_until_signalled(run_tracker, settings)
    exit_after_shutdown()


if __name__ == "__main__":
    tracker()
