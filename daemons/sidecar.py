"""The registry sidecar daemon: wiring only.

Config in (TOML ``--config`` + ``P2PIMAGE_SIDECAR_*``), library objects constructed
(:class:`~p2pimage.oci.registry.RegistryClient`, :class:`~p2pimage.sidecar.indexer.TorrentStore`,
:class:`~p2pimage.sidecar.indexer.Indexer`, :class:`~p2pimage.auth.tokens.TokenIssuer`,
:class:`~p2pimage.auth.join.JoinCredentials`), endpoints mounted. The HTTP API is documented
in docs/protocol.md ("Sidecar API"):

- ``POST /events``: the registry's notification webhook;
- ``GET /torrents/{digest}?repository=<name>``: the torrent, generated on demand, only
  for a node token with its DPoP proof or registry credentials that may pull the blob
  from that repository (an authorised ``HEAD`` at the registry);
- ``POST /token``: a node token for a join credential and a node public key;
- ``GET /.well-known/jwks.json``, ``GET /healthz``, ``GET /metrics``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

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
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemons._config import ConfigError, config_options, settings_for_command
from daemons._http import JsonLimitError, TlsFiles, load_json, read_body, request_url
from daemons._logging import LogJson, LogLevel, setup_logging
from daemons._run import exit_after_shutdown, run_until_signalled
from p2pimage.auth.join import JoinCredentials
from p2pimage.auth.tokens import (
    DEFAULT_ISSUER,
    DEFAULT_PROOF_WINDOW_S,
    DEFAULT_TOKEN_LIFETIME_S,
    ProofReplayCache,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    verify_proof,
)
from p2pimage.errors import AuthError, DigestMismatchError, LocalProtocolError, P2PImageError
from p2pimage.oci.notifications import MAX_ENVELOPE_SIZE, NotificationError, parse_envelope
from p2pimage.oci.registry import RegistryClient, RegistryError, is_digest, is_repository
from p2pimage.sidecar.indexer import (
    BlobUnavailableError,
    Indexer,
    IndexerHooks,
    IndexerSettings,
    RetryPolicy,
    TorrentStore,
)

log = logging.getLogger("p2pimage.sidecar")

TORRENT_MEDIA_TYPE: Final = "application/x-bittorrent"
#: Largest /token body: a JWK, a name and a credential fit in 4 KiB many times over.
MAX_TOKEN_REQUEST: Final = 16 * 1024
# RFC 1123 subdomain, as Kubernetes node names are.
_NODE_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ZONE_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


# The library's defaults, which the settings below take as theirs.
_INDEXER: Final = IndexerSettings()
_RETRY: Final = RetryPolicy()


class SidecarSettings(BaseModel):
    """Sidecar configuration (TOML keys; env ``P2PIMAGE_SIDECAR_<KEY>``)."""

    model_config = ConfigDict(extra="forbid")

    listen: str = Field("127.0.0.1:8090", description="host:port to serve the HTTP API on")
    registry_url: str = Field("http://127.0.0.1:5000", description="registry base URL")
    registry_username: str | None = Field(None, description="registry user (basic or token)")
    registry_password: SecretStr | None = Field(None, description="registry password")
    registry_password_file: Path | None = Field(
        None, description="file holding the password (a mounted Secret); wins over the value"
    )
    registry_tls_verify: bool = Field(True, description="verify the registry's certificate")
    registry_ca_file: Path | None = Field(None, description="CA bundle for a private CA")
    store_dir: Path = Field(Path("/var/lib/p2pimage/torrents"), description="torrent store")
    issuer: str = Field(DEFAULT_ISSUER, description="token 'iss' claim")
    signing_keys: list[Path] = Field(
        default_factory=list, description="PEM private keys; the first signs, all published"
    )
    token_lifetime_s: int = Field(DEFAULT_TOKEN_LIFETIME_S, gt=0, le=86400)
    clusters: dict[str, list[str]] = Field(
        default_factory=dict, description="cluster -> join credential hashes (sha256$/scrypt$)"
    )
    webhook_token: SecretStr | None = Field(
        None, description="if set, POST /events needs 'Authorization: Bearer <token>'"
    )
    manifest_workers: int = Field(_INDEXER.manifest_workers, ge=1, le=64)
    blob_workers: int = Field(_INDEXER.blob_workers, ge=1, le=256)
    max_generations: int = Field(
        _INDEXER.max_generations, ge=1, le=64, description="blobs hashed at once"
    )
    queue_size: int = Field(_INDEXER.queue_size, ge=1)
    retry_initial_s: float = Field(_RETRY.initial_s, gt=0)
    retry_max_s: float = Field(_RETRY.max_s, gt=0)
    backfill_on_start: bool = Field(False, description="walk _catalog and tags at start")
    reconcile_interval_s: float = Field(
        3600.0,
        ge=0,
        description="drop torrents of blobs the registry no longer has (a HEAD per torrent) "
        "this often; 0: never",
    )
    piece_length: int | None = Field(
        _INDEXER.piece_length, description="fixed piece length (default: auto)"
    )
    tls_cert_file: Path | None = Field(None, description="serve HTTPS: certificate chain (PEM)")
    tls_key_file: Path | None = Field(None, description="serve HTTPS: its private key (PEM)")
    allow_plain_http_join: bool = Field(
        False, description="accept join credentials at POST /token over plain HTTP (insecure)"
    )
    proof_window_s: float = Field(
        DEFAULT_PROOF_WINDOW_S, gt=0, le=300, description="DPoP proof freshness window"
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#]+$",
        description="scheme://host[:port] nodes use, when a proxy terminates TLS or "
        "rewrites Host (proofs name it); none: the request's own",
    )
    pull_check_cache_s: float = Field(
        30.0, ge=0, le=3600, description="how long a registry's yes to a pull-rights check stands"
    )
    log_level: LogLevel = "info"
    log_json: LogJson = None

    def indexer_settings(self) -> IndexerSettings:
        return IndexerSettings(
            manifest_workers=self.manifest_workers,
            blob_workers=self.blob_workers,
            max_generations=self.max_generations,
            queue_size=self.queue_size,
            piece_length=self.piece_length,
        )


# Metrics -------------------------------------------------------------------------------


@dataclass
class SidecarMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        p = "p2pimage_sidecar_"
        self.torrents_generated = Counter(
            p + "torrents_generated", "Torrents generated", registry=r
        )
        self.generated_bytes = Counter(p + "generated_bytes", "Blob bytes hashed", registry=r)
        self.generation_seconds = Histogram(
            p + "generation_seconds",
            "Time to stream, hash and store one torrent",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.torrents_deleted = Counter(
            p + "torrents_deleted", "Torrents dropped for blobs the registry deleted", registry=r
        )
        self.digest_mismatches = Counter(
            p + "digest_mismatches", "Blobs whose bytes do not match their digest", registry=r
        )
        self.tokens = Counter(p + "tokens", "Token requests by result", ["result"], registry=r)
        self.torrent_requests = Counter(
            p + "torrent_requests",
            "Torrent requests by caller kind or refusal",
            ["result"],
            registry=r,
        )
        self.webhook_events = Counter(
            p + "webhook_events", "Webhook events by result", ["result"], registry=r
        )
        self.index_failures = Counter(
            p + "index_failures", "Work given up", ["kind", "reason"], registry=r
        )
        self.index_retries = Counter(p + "index_retries", "Work retried", ["kind"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Work items waiting", registry=r)
        self.in_flight = Gauge(
            p + "generations_in_flight", "Torrent generations running or waiting", registry=r
        )

    def hooks(self) -> IndexerHooks:
        def generated(digest: str, size: int, seconds: float) -> None:
            self.torrents_generated.inc()
            self.generated_bytes.inc(size)
            self.generation_seconds.observe(seconds)

        return IndexerHooks(
            generated=generated,
            mismatch=lambda repository, digest: self.digest_mismatches.inc(),
            failed=lambda kind, reason: self.index_failures.labels(kind, reason).inc(),
            retried=lambda kind: self.index_retries.labels(kind).inc(),
        )

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (for tests and the health endpoint)."""
        v = self.registry.get_sample_value(name, labels or None)
        return v or 0.0


# Who may read a torrent ------------------------------------------------------------------

# Pull-rights answers remembered (credential hash, repository, digest); beyond it the
# cache is emptied, not grown: rebuilding costs one HEAD per caller and blob.
_PULL_CACHE_MAX = 10_000
_TORRENT_CHALLENGE = {"WWW-Authenticate": 'DPoP algs="EdDSA", Basic realm="registry"'}


@dataclass
class PullRights:
    """Asks the registry whether a credential may pull a blob: an authorised ``HEAD`` of
    ``/v2/<repository>/blobs/<digest>`` with the caller's own ``Authorization``. A yes
    stands for ``cache_s`` per (credential, repository, digest)."""

    registry_url: str
    http: httpx.AsyncClient
    cache_s: float = 30.0
    _cache: dict[tuple[bytes, str, str], float] = field(default_factory=dict)

    async def allows(self, authorization: str, repository: str, digest: str, now: float) -> bool:
        """True if the registry lets ``authorization`` read the blob; raises
        :class:`RegistryError` (transient) when the registry cannot be asked."""
        key = (hashlib.sha256(authorization.encode()).digest(), repository, digest)
        until = self._cache.get(key)
        if until is not None and now < until:
            return True
        url = f"{self.registry_url.rstrip('/')}/v2/{repository}/blobs/{digest}"
        try:
            response = await self.http.head(
                url, headers={"Authorization": authorization}, follow_redirects=True
            )
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry unreachable: {exc}") from None
        if response.status_code >= 500:
            raise RegistryError(f"registry answered {response.status_code}", status=503)
        if response.status_code != 200:
            return False
        if len(self._cache) >= _PULL_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = now + self.cache_s
        return True


# The application -----------------------------------------------------------------------


@dataclass
class Sidecar:
    indexer: Indexer
    store: TorrentStore
    issuer: TokenIssuer
    credentials: JoinCredentials
    metrics: SidecarMetrics
    webhook_token: str | None = None
    clock: Callable[[], float] = time.time
    # POST /token over plain HTTP carries the join credential in clear text: refused
    # unless the operator opts in (allow_plain_http_join).
    allow_plain_http_join: bool = False
    # Who may read torrents: node tokens (verified against our own keys, with a DPoP
    # proof), or registry credentials with pull rights (None: that path is closed).
    pull_rights: PullRights | None = None
    proof_window_s: float = DEFAULT_PROOF_WINDOW_S
    public_url: str | None = None
    nonces: ProofReplayCache = field(default_factory=ProofReplayCache)

    def __post_init__(self) -> None:
        self.verifier = TokenVerifier(self.issuer.key_set(), issuer=self.issuer.issuer)


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status, headers=headers or None)


async def _torrent_refusal(
    sidecar: Sidecar, request: Request, digest: str, repository: str | None
) -> Response | None:
    """None if the caller may read the torrent of ``digest``, else the refusal.

    A node token must come as ``Authorization: DPoP`` with its proof (docs/protocol.md,
    "Sidecar API"); any other credential is checked for pull rights on ``repository``
    at the registry. Anonymous callers learn nothing, not even whether the digest exists.
    """
    m = sidecar.metrics
    authorizations = request.headers.getlist("authorization")
    if not authorizations:
        m.torrent_requests.labels("anonymous").inc()
        return _error(
            401,
            "unauthorized",
            "a node token with its DPoP proof, or registry credentials that may pull the "
            "blob (with ?repository=), is required",
            **_TORRENT_CHALLENGE,
        )
    if len(authorizations) > 1:
        m.torrent_requests.labels("bad_credentials").inc()
        return _error(401, "unauthorized", "one Authorization header", **_TORRENT_CHALLENGE)
    authorization = authorizations[0]
    if not (authorization.isascii() and authorization.isprintable()):
        # Never forwarded to the registry: an HTTP client refuses such a header.
        m.torrent_requests.labels("bad_credentials").inc()
        return _error(401, "unauthorized", "malformed Authorization", **_TORRENT_CHALLENGE)
    scheme, _, raw = authorization.partition(" ")
    now = sidecar.clock()
    if scheme.lower() == "dpop":
        proofs = request.headers.getlist("dpop")
        try:
            token = sidecar.verifier.verify(raw.strip(), now=now)
            proof = verify_proof(
                proofs[0] if len(proofs) == 1 else None,
                token=token,
                method=request.method,
                url=request_url(request.scope, request.headers.get("host", ""), sidecar.public_url),
                now=now,
                window_s=sidecar.proof_window_s,
            )
        except AuthError as exc:
            m.torrent_requests.labels("bad_token").inc()
            log.info("torrent refused: %s", exc.reason)
            return _error(401, exc.reason, f"token rejected: {exc}", **_TORRENT_CHALLENGE)
        fresh = sidecar.nonces.claim(proof.replay_key, proof.expires_at, now)
        if fresh is None:
            return _error(503, "busy", "replay cache full", **{"Retry-After": "5"})
        if not fresh:
            m.torrent_requests.labels("bad_token").inc()
            return _error(401, "replayed_proof", "DPoP proof already used", **_TORRENT_CHALLENGE)
        m.torrent_requests.labels("node").inc()
        return None
    if repository is None or sidecar.pull_rights is None:
        m.torrent_requests.labels("bad_credentials").inc()
        return _error(
            401 if sidecar.pull_rights is None else 400,
            "unauthorized" if sidecar.pull_rights is None else "repository_required",
            "pull rights are checked per repository: pass ?repository=<name>"
            if sidecar.pull_rights is not None
            else "registry credentials are not accepted here; use a node token",
            **_TORRENT_CHALLENGE,
        )
    try:
        allowed = await sidecar.pull_rights.allows(authorization, repository, digest, now)
    except RegistryError as exc:
        return _error(503, "registry_unavailable", str(exc), **{"Retry-After": "5"})
    if not allowed:
        m.torrent_requests.labels("no_pull_rights").inc()
        log.info("torrent refused: no pull rights on %s for %s", repository, digest)
        return _error(403, "forbidden", "these credentials may not pull that blob")
    m.torrent_requests.labels("pull_rights").inc()
    return None


def create_app(sidecar: Sidecar) -> Starlette:
    m = sidecar.metrics

    async def events(request: Request) -> Response:
        if sidecar.webhook_token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {sidecar.webhook_token}".encode()):
                m.webhook_events.labels("unauthorized").inc()
                return _error(401, "unauthorized", "webhook token required")
        body = await read_body(request, MAX_ENVELOPE_SIZE)
        if body is None:
            m.webhook_events.labels("malformed").inc()
            # The registry retries a refused envelope and holds later events behind it.
            log.warning("webhook envelope over %d bytes refused", MAX_ENVELOPE_SIZE)
            return _error(413, "too_large", f"envelope exceeds {MAX_ENVELOPE_SIZE} bytes")
        try:
            parsed = parse_envelope(body, request.headers.get("content-type"))
        except NotificationError as exc:
            m.webhook_events.labels("malformed").inc()
            log.warning("malformed webhook body: %s", exc)
            return _error(400, "malformed", str(exc))
        counts = {"queued": 0, "deleted": 0, "ignored": 0, "invalid": 0}
        for ev in parsed:
            if not ev.valid:
                counts["invalid"] += 1
                log.warning("invalid event %s: %s", ev.id, ev.problem)
            elif (deleted := ev.deleted_digest) is not None:
                # A blob (or manifest) the registry deleted: its torrent goes.
                if sidecar.indexer.forget(deleted):
                    m.torrents_deleted.inc()
                    log.info("registry deleted %s@%s: torrent dropped", ev.repository, deleted)
                counts["deleted"] += 1
            elif not ev.is_manifest_push:
                counts["ignored"] += 1
            elif sidecar.indexer.submit_event(ev):
                counts["queued"] += 1
            else:
                # Queue full: refuse the whole envelope; the registry re-sends it later.
                m.webhook_events.labels("rejected_full").inc()
                m.queue_depth.set(sidecar.indexer.queued)
                return _error(503, "busy", "work queue full", **{"Retry-After": "5"})
        for result, n in counts.items():
            if n:
                m.webhook_events.labels(result).inc(n)
        m.queue_depth.set(sidecar.indexer.queued)
        return JSONResponse(counts, 202)

    async def torrent(request: Request) -> Response:
        digest = request.path_params["digest"]
        if not is_digest(digest):
            return _error(400, "bad_digest", "digest must be sha256:<64 lowercase hex>")
        repository = request.query_params.get("repository")
        if repository is not None and not is_repository(repository):
            return _error(400, "bad_repository", "not a repository name")
        refusal = await _torrent_refusal(sidecar, request, digest, repository)
        if refusal is not None:
            return refusal
        data = sidecar.store.load(digest)
        if data is not None and repository is not None:
            # The blob lives (also) there: reconciliation checks it in this repository.
            await trio.to_thread.run_sync(sidecar.store.note_repository, digest, repository)
        if data is None:
            if repository is None:
                return _error(404, "unknown", "not indexed; pass ?repository=<name> to generate")
            try:
                data = await sidecar.indexer.torrent(repository, digest)
            except DigestMismatchError:
                return _error(502, "digest_mismatch", "registry blob does not match its digest")
            except RegistryError as exc:
                if exc.status == 404:
                    return _error(404, "blob_unknown", f"registry has no {digest} in {repository}")
                if exc.transient:
                    return _error(503, "registry_unavailable", str(exc), **{"Retry-After": "5"})
                return _error(502, "registry_error", str(exc))
            except BlobUnavailableError as exc:
                return _error(422, "not_shareable", str(exc))
        return Response(
            data,
            media_type=TORRENT_MEDIA_TYPE,
            # Authenticated content: never kept by a shared cache.
            headers={
                "ETag": f'"{digest}"',
                "Cache-Control": "private, max-age=31536000, immutable",
            },
        )

    async def token(request: Request) -> Response:
        if request.url.scheme != "https" and not sidecar.allow_plain_http_join:
            m.tokens.labels("plain_http").inc()
            log.warning("token refused: join credential sent over plain HTTP")
            return _error(
                403,
                "tls_required",
                "join credentials are accepted over HTTPS only (sidecar: tls_cert_file and "
                "tls_key_file; or allow_plain_http_join = true)",
            )
        body = await read_body(request, MAX_TOKEN_REQUEST)
        try:
            doc = load_json(body, max_bytes=MAX_TOKEN_REQUEST) if body is not None else None
        except JsonLimitError:
            doc = None
        if not isinstance(doc, dict):
            m.tokens.labels("bad_request").inc()
            return _error(400, "bad_request", "body must be a JSON object under 16 KiB")
        node, jwk, credential, zone = (doc.get(k) for k in ("node", "jwk", "credential", "zone"))
        problem = None
        if not isinstance(node, str) or len(node) > 253 or not _NODE_RE.match(node):
            problem = "node must be a DNS-1123 name"
        elif not isinstance(jwk, dict):
            problem = "jwk must be a JWK object"
        elif "d" in jwk:
            problem = "jwk must be a public key (it carries a private part)"
        elif not isinstance(credential, str):
            problem = "credential must be a string"
        elif zone is not None and (not isinstance(zone, str) or not _ZONE_RE.match(zone)):
            problem = "zone must be a label of at most 63 characters"
        if problem is not None:
            m.tokens.labels("bad_request").inc()
            return _error(400, "bad_request", problem)
        assert isinstance(credential, str) and isinstance(node, str) and isinstance(jwk, dict)
        cluster = await trio.to_thread.run_sync(sidecar.credentials.cluster_for, credential)
        if cluster is None:
            m.tokens.labels("bad_credential").inc()
            log.warning("token refused for node %s: bad credential", node)
            return _error(401, "unauthorized", "invalid join credential")
        now = sidecar.clock()
        try:
            jwt = sidecar.issuer.issue(
                subject=node, cluster=cluster, node_jwk=jwk, now=now, zone=zone
            )
        except (AuthError, LocalProtocolError) as exc:
            m.tokens.labels("bad_request").inc()
            return _error(400, "bad_key", str(exc))
        m.tokens.labels("issued").inc()
        log.info("token issued: node %s cluster %s", node, cluster)
        return JSONResponse(
            {
                "token": jwt,
                "expires_at": int(now) + sidecar.issuer.lifetime_s,
                "kid": sidecar.issuer.active_key.kid,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def jwks(request: Request) -> Response:
        return JSONResponse(sidecar.issuer.jwks(), headers={"Cache-Control": "max-age=60"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": sidecar.indexer.queued})

    async def metrics(request: Request) -> Response:
        m.queue_depth.set(sidecar.indexer.queued)
        m.in_flight.set(sidecar.indexer.in_flight)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/events", events, methods=["POST"]),
            Route("/torrents/{digest}", torrent, methods=["GET"]),
            Route("/token", token, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


# Wiring --------------------------------------------------------------------------------


def load_signing_keys(paths: list[Path]) -> list[SigningKey]:
    if not paths:
        raise ValueError("signing_keys: at least one PEM private key file is needed")
    return [SigningKey.from_pem(p.read_bytes()) for p in paths]


def build_sidecar(
    settings: SidecarSettings, client: RegistryClient, pull_http: httpx.AsyncClient | None = None
) -> Sidecar:
    """``pull_http`` (an HTTP client the caller owns) opens the pull-rights path of
    ``GET /torrents``; without it only node tokens are served."""
    keys = load_signing_keys(settings.signing_keys)
    credentials = JoinCredentials(
        (cluster, h) for cluster, hashes in settings.clusters.items() for h in hashes
    )
    metrics = SidecarMetrics()
    store = TorrentStore(settings.store_dir)
    indexer = Indexer(
        client,
        store,
        settings=settings.indexer_settings(),
        retry=RetryPolicy(initial_s=settings.retry_initial_s, max_s=settings.retry_max_s),
        hooks=metrics.hooks(),
    )
    issuer = TokenIssuer(keys, issuer=settings.issuer, lifetime_s=settings.token_lifetime_s)
    token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
    pull_rights = None
    if pull_http is not None:
        pull_rights = PullRights(settings.registry_url, pull_http, settings.pull_check_cache_s)
    return Sidecar(
        indexer,
        store,
        issuer,
        credentials,
        metrics,
        token,
        allow_plain_http_join=settings.allow_plain_http_join,
        pull_rights=pull_rights,
        proof_window_s=settings.proof_window_s,
        public_url=settings.public_url,
    )


def pull_rights_http(settings: SidecarSettings) -> httpx.AsyncClient:
    """The HTTP client for pull-rights checks: the registry's TLS settings, short waits."""
    verify: bool | ssl.SSLContext = settings.registry_tls_verify
    if verify and settings.registry_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.registry_ca_file))
    return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(10.0))


def registry_client(settings: SidecarSettings) -> RegistryClient:
    password = settings.registry_password.get_secret_value() if settings.registry_password else None
    if settings.registry_password_file is not None:
        password = settings.registry_password_file.read_text().strip()
    verify: bool | ssl.SSLContext = settings.registry_tls_verify
    if verify and settings.registry_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.registry_ca_file))
    return RegistryClient(
        settings.registry_url,
        username=settings.registry_username,
        password=password,
        verify=verify,
    )


async def run_sidecar(
    settings: SidecarSettings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until cancelled; reports the bound base URL through ``task_status``."""
    from daemons._http import serve_app

    tls = TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file)
    if tls is None and not settings.allow_plain_http_join:
        log.warning(
            "serving plain HTTP: POST /token refuses join credentials (set tls_cert_file and "
            "tls_key_file, or allow_plain_http_join = true)"
        )
    async with registry_client(settings) as client, pull_rights_http(settings) as pull_http:
        sidecar = build_sidecar(settings, client, pull_http)
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.indexer.run)
            if settings.backfill_on_start:
                nursery.start_soon(_backfill, sidecar.indexer)
            if settings.reconcile_interval_s > 0:
                nursery.start_soon(
                    _reconcile, sidecar.indexer, settings.reconcile_interval_s, sidecar.metrics
                )
            url = await nursery.start(
                functools.partial(serve_app, create_app(sidecar), settings.listen, tls=tls)
            )
            log.info(
                "sidecar serving on %s (registry %s, store %s, signing kid %s)",
                url,
                settings.registry_url,
                settings.store_dir,
                sidecar.issuer.active_key.kid,
            )
            task_status.started(url)


async def _backfill(indexer: Indexer) -> None:
    delay = 1.0
    while True:
        try:
            await indexer.backfill()
            return
        except RegistryError as exc:
            log.warning("backfill: registry unavailable (%s); retrying in %.0fs", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def _reconcile(indexer: Indexer, interval_s: float, metrics: SidecarMetrics) -> None:
    """Every ``interval_s``: drop torrents of blobs the registry no longer has."""
    while True:
        await trio.sleep(interval_s)
        try:
            dropped = await indexer.reconcile()
        except Exception:
            # A bug here must not stop the sidecar: the next round tries again.
            log.exception("reconciliation failed")
            continue
        metrics.torrents_deleted.inc(dropped)
        log.info("reconciliation: %d torrents dropped", dropped)


def check_settings(settings: SidecarSettings) -> None:
    """Load what the settings point at now, so a bad key file or credential hash is a
    configuration error (exit 2) rather than a crash later."""
    try:
        load_signing_keys(settings.signing_keys)
    except OSError as exc:
        raise ConfigError(f"config key 'signing_keys': {exc}") from None
    except (ValueError, TypeError, P2PImageError) as exc:
        raise ConfigError(f"config key 'signing_keys': {exc}") from None
    try:
        JoinCredentials((c, h) for c, hashes in settings.clusters.items() for h in hashes)
    except LocalProtocolError as exc:
        raise ConfigError(f"config key 'clusters': {exc}") from None
    TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file)
    if not settings.clusters:
        raise ConfigError(
            "config key 'clusters': no cluster can join (see p2pimage keys join-credential)"
        )
    if (
        settings.registry_password_file is not None
        and not settings.registry_password_file.is_file()
    ):
        raise ConfigError(
            f"config key 'registry_password_file': {settings.registry_password_file} is not a file"
        )


@click.command("sidecar")
@config_options("sidecar")
def sidecar(config_path: Path | None, print_config: bool) -> None:
    """Run the registry sidecar: torrents per layer, node tokens, JWKS."""

    settings = settings_for_command(
        SidecarSettings,
        daemon="sidecar",
        config_path=config_path,
        print_config=print_config,
        check=check_settings,
    )
    if settings is None:
        return
    setup_logging(settings.log_level, json_lines=settings.log_json)
    run_until_signalled(run_sidecar, settings)
    exit_after_shutdown()


if __name__ == "__main__":
    sidecar()
