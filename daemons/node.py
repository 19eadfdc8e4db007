"""The node peer daemon: a registry mirror for the runtime, and the node's swarm peer.

Wiring only: configuration in, library objects constructed, endpoints mounted.

- ``/v2/`` and manifests pass through to the upstream registry with the client's headers
  (every repeated header kept), so the token flow and private repositories behave as
  without p2pimage.
- Blob ``GET`` goes through :class:`~p2pimage.mirror.blobs.LayerService` (access check as the
  client, cache, swarm, registry fallback); blob ``HEAD`` passes through.
- The upstream comes from containerd's ``ns=`` query parameter, else the default; an
  ``ns=`` naming a registry this node is not configured for is answered 404
  ``NAME_UNKNOWN`` (containerd then goes to that registry itself), never from the
  swarm or the cache, and never proxied (docs/operations.md, "Trust model").
- Only the layers of swarm registries are cached and shared: ``swarm_registry`` (the
  registry ``sidecar_url`` indexes) and each key of ``swarm_upstreams`` (its own sidecar,
  optionally its own tracker), one :class:`~p2pimage.mirror.blobs.LayerService` each over
  the same peer; other configured upstreams pass through.
- The node's identity (key, token, JWKS) comes from the sidecar; until it has one, and
  whenever p2p cannot serve, pulls go straight to the registry.
- With ``preheat_poll_s``, the node asks the tracker for preheat jobs of its cluster
  (``GET /preheat``, with its token and a DPoP proof) and reads each job's layers through
  the same :class:`~p2pimage.mirror.blobs.LayerService` path a runtime pull takes (access
  check with the node's own ``preheat_registry_auth_file``, swarm, cache), then reports.
- With ``proxy_listen``, a forward proxy (:mod:`p2pimage.mirror.proxy`) for runtimes set up
  through ``HTTP_PROXY``/``HTTPS_PROXY`` hands the registries' requests to this same app.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import logging
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Any, Final, Literal

import click
import httpx
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field, SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemons._config import ConfigError, config_options, settings_for_command
from daemons._http import (
    ClosingStreamingResponse,
    ListenError,
    TlsFiles,
    client_tls,
    serve_app,
    system_tls,
)
from daemons._logging import LogJson, LogLevel, setup_logging
from daemons._run import exit_after_shutdown, run_until_signalled
from p2pimage.auth.tokens import NodeKey
from p2pimage.errors import LocalProtocolError, P2PImageError
from p2pimage.metainfo.torrent import is_digest
from p2pimage.mirror.blobs import LayerService, LayerSettings
from p2pimage.mirror.credentials import CredentialWatch, carries_credentials
from p2pimage.mirror.kubernetes import InClusterConfig, KubernetesError, node_zone
from p2pimage.mirror.proxy import ForwardProxy, HostCertificates, describe_upstream_error
from p2pimage.sidecar.client import SidecarClient, TokenKeeper
from p2pimage.storage.cache import BlobCache
from p2pimage.swarm.node import open_peer_node
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.tracker import PreheatError, PreheatSpec, parse_preheat_poll
from p2pimage.tracker.client import TrackerClient

__all__ = ["NodeSettings", "create_app", "run_node"]

log = logging.getLogger("p2pimage.node")

_PATH = re.compile(
    r"^/v2/(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"/(?P<kind>manifests|blobs)/(?P<ref>[A-Za-z0-9_.:+=-]{1,128})$"
)
_DOCKER_HUB = "https://registry-1.docker.io"
_RANGE = re.compile(r"^bytes=([0-9]+)-([0-9]*)$")
# Digits of a Range position parsed at most: 10**18 bytes is beyond any blob, and longer
# strings would reach Python's int-conversion limit (4,300 digits) and its quadratic cost.
_RANGE_DIGITS = 18
# Hop-by-hop headers (RFC 9110 §7.6.1) and ones the proxy sets itself.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


# The library's defaults, which the settings below take as theirs.
_LAYERS: Final = LayerSettings()


class SwarmUpstream(BaseModel):
    """One more registry whose layers go through swarms (a ``swarm_upstreams`` entry)."""

    sidecar_url: str = Field(description="base URL of the sidecar fronting this registry")
    tracker_url: str | None = Field(
        None,
        description="tracker announce URL for this registry's swarms (default: the node's "
        "tracker_url); it must trust the node's identity sidecar (sidecar_url)'s keys",
    )
    credential_file: Path | None = Field(
        None, description="join credential for this sidecar (default: the node's credential)"
    )


class NodeSettings(BaseModel):
    """Configuration of the node peer (TOML file and ``P2PIMAGE_NODE_*`` environment)."""

    listen: str = Field("127.0.0.1:65001", description="host:port of the registry mirror")
    metrics_listen: str | None = Field(
        None, description="host:port serving /metrics, /healthz and /swarms alone"
    )
    node_name: str = Field(default_factory=socket.gethostname, description="this node's name")
    zone: str | None = Field(None, description="topology label for peer preference")
    zone_from_kubernetes: bool = Field(
        False,
        description="unless zone is set: read this node's topology.kubernetes.io/zone "
        "label from the in-cluster API (service account; node_name is the Node)",
    )
    peer_host: str = Field("0.0.0.0", description="address peers connect to us on")
    peer_port: int = Field(6881, ge=0, le=65535, description="peer port (0: any free)")
    peer_encryption: bool = Field(
        True, description="encrypt peer traffic and refuse peers that do not (cluster-wide)"
    )
    sidecar_url: str | None = Field(None, description="sidecar base URL (none: p2p off)")
    tracker_url: str | None = Field(None, description="tracker announce URL (none: p2p off)")
    credential: SecretStr | None = Field(None, description="the cluster's join credential")
    credential_file: Path | None = Field(None, description="file holding the credential")
    node_key_file: Path | None = Field(None, description="node Ed25519 key (PEM); generated")
    default_upstream: str = Field(_DOCKER_HUB, description="upstream when the client names none")
    upstreams: dict[str, str] = Field(
        default_factory=dict,
        description='ns → base URL, e.g. {"127.0.0.1:5000" = "http://127.0.0.1:5000"}; '
        "with default_upstream (and docker.io for Docker Hub) the only registries served",
    )
    swarm_registry: str | None = Field(
        None,
        description="the ns (key of upstreams) whose layers the sidecar indexes and swarms "
        "share; default: the only key of upstreams, else default_upstream",
    )
    swarm_upstreams: dict[str, SwarmUpstream] = Field(
        default_factory=dict,
        description="more swarm registries: ns (key of upstreams) → {sidecar_url, "
        "tracker_url, credential_file}; each registry's swarms are its own",
    )
    proxy_listen: str | None = Field(
        None, description="host:port of the forward proxy (HTTP_PROXY/HTTPS_PROXY); none: off"
    )
    proxy_intercept_hosts: list[str] = Field(
        default_factory=list,
        description="registry hosts (host or host:port) whose CONNECT tunnels are decrypted",
    )
    proxy_ca_cert_file: Path | None = Field(
        None, description="CA certificate (PEM) that signs intercepted hosts' certificates"
    )
    proxy_ca_key_file: Path | None = Field(None, description="that CA's private key (PEM)")
    cache_dir: Path = Field(Path("/var/lib/p2pimage/cache"), description="layer cache")
    cache_quota_bytes: int = Field(20 * 1024**3, gt=0, description="cache size limit")
    upload_rate: float | None = Field(None, gt=0, description="peer upload cap, bytes/s")
    download_rate: float | None = Field(None, gt=0, description="peer download cap, bytes/s")
    origin_rate: float | None = Field(None, gt=0, description="registry read cap, bytes/s")
    swarm_threshold_bytes: int = Field(
        _LAYERS.swarm_threshold_bytes, ge=0, description="smaller blobs: direct"
    )
    stall_timeout_s: float = Field(
        _LAYERS.stall_timeout_s, gt=0, description="no swarm progress → registry"
    )
    setup_timeout_s: float = Field(
        _LAYERS.setup_timeout_s, gt=0, description="torrent+swarm start limit"
    )
    tls_cert_file: Path | None = Field(None, description="mirror serves HTTPS: certificate (PEM)")
    tls_key_file: Path | None = Field(None, description="mirror serves HTTPS: its key (PEM)")
    http_server: Literal["hypercorn", "lean"] = Field(
        "hypercorn",
        description="the mirror's HTTP/1.1 server: hypercorn, or lean (daemons/_asgi_server.py, "
        "the tracker's; not yet measured on a node's streams)",
    )
    ca_file: Path | None = Field(
        None, description="CA bundle the sidecar and tracker are verified against (default: system)"
    )
    registry_ca_file: Path | None = Field(
        None,
        description="CA bundle trusted for registries, beside the system's (a private CA)",
    )
    allow_plain_http_join: bool = Field(
        False, description="send the join credential to an http:// sidecar_url (insecure)"
    )
    preheat_poll_s: float | None = Field(
        30.0, gt=0, description="poll the tracker for preheat jobs this often (none: off)"
    )
    preheat_registry_auth_file: Path | None = Field(
        None,
        description="'user:password' this node's preheats present to the swarm registry "
        "(HTTP Basic); none: anonymous. Runtime pulls always use the runtime's own",
    )
    log_level: LogLevel = "info"
    log_json: LogJson = None

    def credential_value(self) -> str | None:
        if self.credential is not None:
            return self.credential.get_secret_value()
        if self.credential_file is not None:
            try:
                return self.credential_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"config key 'credential_file': {exc.strerror}") from None
        return None

    def preheat_authorization(self) -> str | None:
        """The ``Authorization`` header value preheats send to the swarm registry."""
        if self.preheat_registry_auth_file is None:
            return None
        try:
            text = self.preheat_registry_auth_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"config key 'preheat_registry_auth_file': {exc.strerror}") from None
        if ":" not in text or not text.isascii():
            raise ConfigError(
                "config key 'preheat_registry_auth_file': want one ASCII line user:password"
            )
        return "Basic " + base64.b64encode(text.encode()).decode("ascii")

    def upstream_for(self, ns: str | None) -> str | None:
        """The base URL of the configured registry ``ns`` names, or None when this node
        is not configured for it (never a registry the request merely names)."""
        if not ns:
            return self.default_upstream.rstrip("/")
        if ns in self.upstreams:
            return self.upstreams[ns].rstrip("/")
        default = self.default_upstream.rstrip("/")
        if ns in ("docker.io", "index.docker.io") and default == _DOCKER_HUB:
            return default
        if ns == urllib.parse.urlsplit(default).netloc:
            return default
        return None

    def swarm_upstream(self) -> str:
        """Base URL of the registry whose layers go through swarms and the cache."""
        if self.swarm_registry is not None:
            url = self.upstream_for(self.swarm_registry)
            if url is None:
                raise ConfigError(
                    f"config key 'swarm_registry': {self.swarm_registry!r} is not a key "
                    "of upstreams (nor the default upstream's host)"
                )
            return url
        if len(self.upstreams) == 1:
            return next(iter(self.upstreams.values())).rstrip("/")
        return self.default_upstream.rstrip("/")

    def swarm_upstream_urls(self) -> dict[str, str]:
        """Base URL of each ``swarm_upstreams`` registry, by its key (checked: configured
        in upstreams, not the swarm_registry, no two keys for one URL)."""
        primary = self.swarm_upstream()
        urls: dict[str, str] = {}
        for ns in self.swarm_upstreams:
            url = self.upstream_for(ns)
            where = f"config key 'swarm_upstreams.{ns}'"
            if "/" in ns or "@" in ns or not ns:
                raise ConfigError(f"{where}: want a registry host[:port]")
            if url is None:
                raise ConfigError(f"{where}: not a key of upstreams (nor the default's host)")
            if url == primary or url in urls.values():
                raise ConfigError(f"{where}: {url} already has a swarm (swarm_registry?)")
            urls[ns] = url
        return urls

    def swarm_credential(self, ns: str) -> str | None:
        """The join credential for ``swarm_upstreams[ns]``'s sidecar."""
        path = self.swarm_upstreams[ns].credential_file
        if path is None:
            return self.credential_value()
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"config key 'swarm_upstreams.{ns}.credential_file': {exc.strerror}"
            ) from None

    def proxy_certificates(self) -> HostCertificates | None:
        """The interception CA, when hosts are to be intercepted (checked at start-up)."""
        if not self.proxy_intercept_hosts:
            return None
        if self.proxy_ca_cert_file is None or self.proxy_ca_key_file is None:
            raise ConfigError(
                "config key 'proxy_intercept_hosts' needs proxy_ca_cert_file and proxy_ca_key_file"
            )
        try:
            return HostCertificates(
                self.proxy_ca_cert_file.read_bytes(), self.proxy_ca_key_file.read_bytes()
            )
        except OSError as exc:
            raise ConfigError(f"config key 'proxy_ca_cert_file': {exc}") from None
        except LocalProtocolError as exc:
            raise ConfigError(f"config key 'proxy_ca_key_file': {exc}") from None


def check_settings(settings: NodeSettings) -> None:
    """Cross-field checks (exit 2 from the command; raised by :func:`run_node` too)."""
    credential = settings.credential_value()
    settings.swarm_upstream()
    settings.swarm_upstream_urls()
    TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file)
    client_tls(settings.ca_file)
    settings.proxy_certificates()
    settings.preheat_authorization()
    _registry_tls(settings.registry_ca_file)
    sidecars = {"sidecar_url": (settings.sidecar_url, credential)}
    for ns, entry in settings.swarm_upstreams.items():
        sidecars[f"swarm_upstreams.{ns}.sidecar_url"] = (
            entry.sidecar_url,
            settings.swarm_credential(ns),
        )
    for key, (url, secret) in sidecars.items():
        plain = (url or "").lower().startswith("http://")
        if plain and secret and not settings.allow_plain_http_join:
            raise ConfigError(
                f"config key '{key}': an http:// sidecar would receive the join credential "
                "in clear text; use https:// (with ca_file) or set allow_plain_http_join = true"
            )


class NodeMetrics:
    """Prometheus view of the node, read from the library's counters at scrape time."""

    def __init__(self, node: NodeDaemon) -> None:
        self.node = node
        # A counter must not go down when a swarm closes: remember each swarm's last
        # count and keep it after the swarm is gone.
        self._failures_seen: dict[Any, int] = {}  # swarm object (not id(): ids are reused)
        self._failures_closed = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _hash_failures(self, live: Iterable[Any]) -> int:
        current: dict[Any, int] = {s: s.stats.hash_failures for s in live}
        for swarm, n in self._failures_seen.items():
            if swarm not in current:
                self._failures_closed += n
        self._failures_seen = current
        return self._failures_closed + sum(current.values())

    def collect(self) -> Iterable[Any]:
        layers = self.node.layers
        served = CounterMetricFamily(
            "p2pimage_node_served_bytes",
            "Blob bytes served to the runtime by source",
            labels=["source"],
        )
        for source in ("cache", "swarm", "registry"):
            served.add_metric([source], layers.stats.bytes_served[source])
        yield served
        fetched = CounterMetricFamily(
            "p2pimage_node_fetched_bytes",
            "Layer bytes this node fetched, by source",
            labels=["source"],
        )
        fetched.add_metric(["peer"], layers.peer_bytes())
        fetched.add_metric(["origin"], layers.origin_bytes())
        fetched.add_metric(["registry_fallback"], layers.stats.bytes_served["registry"])
        yield fetched
        uploaded = CounterMetricFamily(
            "p2pimage_node_uploaded_bytes", "Layer bytes this node uploaded to peers"
        )
        uploaded.add_metric([], layers.uploaded_bytes())
        yield uploaded
        wasted = CounterMetricFamily(
            "p2pimage_node_wasted_bytes",
            "Layer bytes received from peers and thrown away (cancelled or duplicate blocks)",
        )
        wasted.add_metric([], layers.wasted_bytes())
        yield wasted
        pulls = CounterMetricFamily(
            "p2pimage_node_blob_pulls", "Blob GETs by result", labels=["result"]
        )
        for result, n in sorted(layers.stats.pulls.items()):
            pulls.add_metric([result], n)
        yield pulls
        fallbacks = CounterMetricFamily(
            "p2pimage_node_fallbacks",
            "Reads that went to the registry, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(layers.stats.fallbacks.items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
        peers = GaugeMetricFamily("p2pimage_node_connected_peers", "Peer connections")
        swarms = GaugeMetricFamily("p2pimage_node_swarms", "Live swarms")
        failures = CounterMetricFamily(
            "p2pimage_node_piece_hash_failures", "Pieces that failed their hash check"
        )
        node = layers.node
        peers.add_metric([], sum(len(s.peers) for s in node.swarms.values()) if node else 0)
        swarms.add_metric([], len(node.swarms) if node else 0)
        failures.add_metric([], self._hash_failures(node.swarms.values() if node else ()))
        yield peers
        yield swarms
        yield failures
        bypassed = CounterMetricFamily(
            "p2pimage_node_bypassed_pulls",
            "Pulls the runtime took to the registry directly, by reason",
            labels=["reason"],
        )
        bypassed.add_metric(["no_credentials"], self.node.credentials.settle(time.monotonic()))
        yield bypassed
        preheat = CounterMetricFamily(
            "p2pimage_node_preheat_layers",
            "Layers fetched for preheat jobs, by result",
            labels=["result"],
        )
        for result, n in sorted(self.node.preheat_layers.items()):
            preheat.add_metric([result], n)
        yield preheat
        cache = GaugeMetricFamily("p2pimage_node_cache_bytes", "Bytes held in the layer cache")
        cache.add_metric([], layers.cache.used_bytes)
        yield cache
        proxy = self.node.proxy
        if proxy is not None:
            requests = CounterMetricFamily(
                "p2pimage_node_proxy_requests",
                "Forward-proxy requests by how they were served",
                labels=["kind"],
            )
            for kind in ("mirror", "forward", "tunnel", "intercept"):
                requests.add_metric([kind], proxy.stats.requests[kind])
            yield requests
            errors = CounterMetricFamily(
                "p2pimage_node_proxy_errors", "Forward-proxy failures by reason", labels=["reason"]
            )
            for reason, n in sorted(proxy.stats.errors.items()):
                errors.add_metric([reason], n)
            yield errors


class NodeDaemon:
    def __init__(
        self,
        settings: NodeSettings,
        http: httpx.AsyncClient,
        layers: LayerService,
        more_layers: Iterable[LayerService] = (),
    ):
        self.settings = settings
        self.http = http
        self.layers = layers  # the swarm_registry's; its stats are every service's
        # Every swarm registry's service, by base URL (the swarm_registry's first).
        self.services = {s.registry: s for s in (layers, *more_layers)}
        self.metrics = NodeMetrics(self)
        self.status_url: str | None = None  # the metrics_listen server's base URL, if any
        self.credentials = CredentialWatch()  # pulls that bypass us: no credentials sent
        self.proxy: ForwardProxy | None = None
        self.proxy_url: str | None = None  # the forward proxy's URL, if any
        self.preheat_layers: collections.Counter[str] = collections.Counter()  # by result

    def layers_for(self, upstream: str) -> LayerService:
        """The service of swarm registry ``upstream``; for any other registry the
        swarm_registry's, which reads it directly (no cache, no swarm)."""
        return self.services.get(upstream.rstrip("/"), self.layers)


# --------------------------------------------------------------------------- the app


def _forward_headers(request: Request) -> list[tuple[bytes, bytes]]:
    # Raw pairs keep every repeated header (skopeo sends several Accept headers); bytes,
    # so a value outside ASCII goes to the registry to judge instead of failing here.
    return [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _HOP]


def _response_headers(headers: httpx.Headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.multi_items() if k.lower() not in _HOP]


async def _proxy(daemon: NodeDaemon, request: Request, upstream: str, path: str) -> Response:
    """Relay one request to the upstream registry as is, streaming the answer."""
    url = f"{upstream}{path}"
    req = daemon.http.build_request(request.method, url, headers=_forward_headers(request))
    try:
        response = await daemon.http.send(req, stream=True)
    except httpx.HTTPError as exc:
        return JSONResponse(
            {
                "errors": [
                    {"code": "UNAVAILABLE", "message": f"upstream {describe_upstream_error(exc)}"}
                ]
            },
            status_code=502,
        )
    headers = _response_headers(response.headers)
    if request.method == "HEAD":
        await response.aclose()
        length = response.headers.get("content-length")
        resp = Response(status_code=response.status_code, headers=dict(headers))
        if length is not None:
            resp.headers["content-length"] = length
        return resp

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    resp = ClosingStreamingResponse(body(), status_code=response.status_code)
    resp.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
    length = response.headers.get("content-length")
    if length is not None and "content-encoding" not in response.headers:
        resp.raw_headers.append((b"content-length", length.encode()))
    return resp


def parse_range(header: str | None, size: int) -> tuple[int, int, int] | None:
    """``(start, end, status)`` for a blob of ``size`` bytes and a ``Range`` header: the
    whole blob (200) when there is none or it is not a single ``bytes=a-[b]`` range
    (RFC 9110 §14.2 lets a server ignore it), bytes ``[start, end)`` (206), or None when
    the range cannot be satisfied (416). Any string is accepted; none raises."""
    m = _RANGE.match(header.strip()) if header else None
    if m is None:
        return 0, size, 200
    first, last = (g.lstrip("0") or ("0" if g else "") for g in m.groups())
    if len(first) > _RANGE_DIGITS:
        return None  # starts beyond any blob
    start = int(first)
    end = size if not last or len(last) > _RANGE_DIGITS else min(int(last) + 1, size)
    if start >= size or start >= end:
        return None
    return start, end, 206


def _registry_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "message": message}]}, status_code=status)


async def _blob_get(
    daemon: NodeDaemon, request: Request, upstream: str, name: str, digest: str
) -> Response:
    if not is_digest(digest):
        # Not a digest we can verify: let the registry answer it.
        return await _proxy(daemon, request, upstream, f"/v2/{name}/blobs/{digest}")
    authorization = request.headers.get("authorization")
    layers = daemon.layers_for(upstream)
    access = await layers.check_access(upstream, name, digest, authorization)
    if access.status != 200 or access.size is None:
        layers.stats.pulls["denied" if access.status in (401, 403) else "upstream_error"] += 1
        return Response(access.body, status_code=access.status, headers=access.headers)
    size = access.size
    parsed = parse_range(request.headers.get("range"), size)
    if parsed is None:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, end, status = parsed
    headers = {
        "Content-Length": str(end - start),
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
    }
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    started = time.monotonic()

    async def body() -> AsyncIterator[bytes]:
        first: float | None = None
        sent = 0
        try:
            chunks = layers.read(upstream, name, digest, size, authorization, start, end)
            async with aclosing(chunks):
                async for chunk in chunks:
                    if first is None:
                        first = time.monotonic() - started
                    sent += len(chunk)
                    yield chunk
        finally:
            log.info(
                "blob served",
                extra={
                    "fields": {
                        "digest": digest,
                        "repository": name,
                        "bytes": sent,
                        "seconds": round(time.monotonic() - started, 3),
                        "ttfb_s": round(first, 3) if first is not None else None,
                        "complete": sent == end - start,
                    }
                },
            )

    return ClosingStreamingResponse(body(), status_code=status, headers=headers)


def create_app(daemon: NodeDaemon) -> Starlette:
    settings = daemon.settings

    def unknown_registry(ns: str | None) -> Response:
        # 404: containerd then tries the next host (the registry itself) for this pull.
        daemon.layers.stats.pulls["unknown_registry"] += 1
        log.info("refused: not a registry of this mirror", extra={"fields": {"ns": ns}})
        return _registry_error(
            404, "NAME_UNKNOWN", f"this mirror does not serve registry {ns!r}; pull it directly"
        )

    async def v2_root(request: Request) -> Response:
        ns = request.query_params.get("ns")
        upstream = settings.upstream_for(ns)
        if upstream is None:
            return unknown_registry(ns)
        return await _proxy(daemon, request, upstream, "/v2/")

    async def v2(request: Request) -> Response:
        m = _PATH.match(request.url.path)
        if m is None:
            return _registry_error(404, "NAME_UNKNOWN", "not a registry path this mirror serves")
        ns = request.query_params.get("ns")
        upstream = settings.upstream_for(ns)
        if upstream is None:
            return unknown_registry(ns)
        name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
        if not request.headers.get("authorization", "").isascii():
            # No registry accepts it, and the access check could not even send it.
            return _registry_error(400, "UNAUTHORIZED", "the Authorization header is not ASCII")
        anonymous = not carries_credentials(request.headers.get("authorization"))
        if not anonymous:
            daemon.credentials.authenticated(upstream, name)
        if kind == "blobs" and request.method == "GET":
            response = await _blob_get(daemon, request, upstream, name, ref)
        else:
            response = await _proxy(daemon, request, upstream, f"/v2/{name}/{kind}/{ref}")
        if anonymous and response.status_code == 401:
            daemon.credentials.refused_anonymous(upstream, name, time.monotonic())
        return response

    return Starlette(
        routes=[
            Route("/v2/", v2_root, methods=["GET", "HEAD"]),
            Route("/v2/{rest:path}", v2, methods=["GET", "HEAD"]),
            *_status_routes(daemon),
        ]
    )


def create_status_app(daemon: NodeDaemon) -> Starlette:
    """The status endpoints alone, for ``metrics_listen``."""
    return Starlette(routes=_status_routes(daemon))


def _status_routes(daemon: NodeDaemon) -> list[Route]:
    """``/healthz``, ``/swarms`` and ``/metrics``: on the mirror's listener, and on
    ``metrics_listen`` when set."""

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "p2p": daemon.layers.node is not None,
                "swarms": len(daemon.layers.node.swarms) if daemon.layers.node else 0,
            }
        )

    async def swarms(request: Request) -> Response:
        """One object per swarm this node runs (``SwarmSummary``), newest first."""
        node = daemon.layers.node
        now = trio.current_time()
        summaries = [swarm.summary(now) for swarm in (node.swarms.values() if node else ())]
        summaries.sort(key=lambda s: s.age_s)
        return JSONResponse({"swarms": [dataclasses.asdict(s) for s in summaries]})

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(daemon.metrics.registry), media_type="text/plain; version=0.0.4"
        )

    return [Route("/healthz", healthz), Route("/swarms", swarms), Route("/metrics", metrics)]


# --------------------------------------------------------------------------- running


async def _p2p(daemon: NodeDaemon, settings: NodeSettings, keeper: TokenKeeper) -> None:
    """Once the node has a token, start its peer and hand it to the layer service.

    If the peer cannot listen (port taken, address missing), the mirror keeps serving
    every pull from the registry and says so in its logs and ``/healthz``.
    """
    await keeper.ready.wait()
    try:
        async with open_peer_node(
            authenticator=keeper.authenticator(),
            peer_id=keeper.peer_id(),
            host=settings.peer_host,
            port=settings.peer_port,
            upload_rate=settings.upload_rate,
            download_rate=settings.download_rate,
            encrypt=settings.peer_encryption,
        ) as peer:
            for service in daemon.services.values():
                service.node = peer
            log.info(
                "p2p ready",
                extra={"fields": {"cluster": keeper.cluster, "peer_port": peer.port}},
            )
            for service in daemon.services.values():
                await service.resume_seeding()
            await trio.sleep_forever()
    except* OSError as group:
        for service in daemon.services.values():
            service.node = None
        log.error(
            "p2p disabled: cannot listen for peers on %s:%d (%s); every pull goes to the registry",
            settings.peer_host,
            settings.peer_port,
            group.exceptions[0],
        )


# Layers of one preheat job read at once (a runtime pulls a few layers in parallel too).
_PREHEAT_PARALLEL = 4


async def _preheat_layer(
    daemon: NodeDaemon, repository: str, digest: str, authorization: str | None
) -> str | None:
    """Read one layer as a runtime pull would (access check, then swarm or cache);
    None on success, else why not. A blob below ``swarm_threshold_bytes`` is left alone:
    pulls read those from the registry, cached or not."""
    layers, upstream = daemon.layers, daemon.settings.swarm_upstream()
    access = await layers.check_access(upstream, repository, digest, authorization)
    if access.status != 200 or access.size is None:
        daemon.preheat_layers["denied" if access.status in (401, 403) else "error"] += 1
        return f"{digest}: registry answered {access.status}"
    if access.size < layers.settings.swarm_threshold_bytes:
        daemon.preheat_layers["small"] += 1
        return None
    try:
        async with aclosing(
            layers.read(upstream, repository, digest, access.size, authorization)
        ) as chunks:
            async for _ in chunks:
                pass
    except (P2PImageError, httpx.HTTPError, OSError) as exc:
        daemon.preheat_layers["error"] += 1
        return f"{digest}: {exc}"[:300]
    daemon.preheat_layers["done"] += 1
    return None


async def _preheat_job(
    daemon: NodeDaemon,
    http: httpx.AsyncClient,
    base: str,
    auth: httpx.Auth,
    job_id: int,
    spec: PreheatSpec,
) -> None:
    repository, errors = spec.repository, []
    limiter = trio.CapacityLimiter(_PREHEAT_PARALLEL)
    try:
        authorization = daemon.settings.preheat_authorization()
    except ConfigError as exc:  # the file changed since start-up
        errors.append(str(exc))
        spec = dataclasses.replace(spec, layers=())

    async def one(digest: str) -> None:
        async with limiter:
            error = await _preheat_layer(daemon, repository, digest, authorization)
        if error is not None:
            errors.append(error)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for layer in spec.layers:
            nursery.start_soon(one, layer.digest)
    result = "failed" if errors else "done"
    log.info(
        "preheat job finished",
        extra={
            "fields": {
                "job": job_id,
                "repository": repository,
                "result": result,
                "seconds": round(time.monotonic() - started, 3),
                "errors": errors[:3],
            }
        },
    )
    report = {"job": job_id, "result": result, "error": "; ".join(errors)[:300] or None}
    response = await http.post(f"{base}/preheat/report", json=report, auth=auth)
    if response.status_code != 200:
        log.warning("preheat report refused: HTTP %d %s", response.status_code, response.text[:200])


async def _preheat_poll(
    daemon: NodeDaemon, http: httpx.AsyncClient, tracker_url: str, keeper: TokenKeeper
) -> None:
    """Every ``preheat_poll_s`` (±10 %), ask the tracker for this node's preheat jobs
    and run them one after the other. A tracker that restarted (new epoch) is asked from
    the start again; jobs this node reported on are not handed out twice."""
    interval = daemon.settings.preheat_poll_s
    assert interval is not None
    base = tracker_url.rstrip("/").removesuffix("/announce")
    auth = keeper.request_auth()
    rng = random.Random()
    epoch, since = None, 0
    await keeper.ready.wait()
    while True:
        pause = interval * rng.uniform(0.9, 1.1)
        if daemon.layers.node is None:
            # Without a peer (not yet, or it cannot listen) a read would go to the
            # registry and warm nothing: ask only once there is one.
            await trio.sleep(pause)
            continue
        try:
            response = await http.get(f"{base}/preheat", params={"since": since}, auth=auth)
            if response.status_code == 200:
                answer = parse_preheat_poll(response.content)
                if answer.epoch != epoch and epoch is not None:
                    epoch, since = answer.epoch, 0
                    continue
                epoch = answer.epoch
                for job_id, spec in answer.jobs:
                    await _preheat_job(daemon, http, base, auth, job_id, spec)
                    since = max(since, job_id)
            elif response.status_code != 404:  # 404: a tracker without preheat
                log.warning("preheat poll: HTTP %d %s", response.status_code, response.text[:200])
        except (httpx.HTTPError, PreheatError) as exc:
            log.warning("preheat poll failed: %s", exc)
        await trio.sleep(pause)


async def run_node(
    settings: NodeSettings,
    *,
    daemon_ready: Callable[[NodeDaemon], object] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node until cancelled; reports the mirror's base URL through ``task_status``
    (and the daemon object to ``daemon_ready``, for in-process tests and the demo).
    ``clock`` is the node's wall clock (token times, proofs): a seam for clock-skew tests."""
    check_settings(settings)
    credential = settings.credential_value()
    certificates = settings.proxy_certificates()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    timeout = httpx.Timeout(30.0, connect=5.0)
    registry_verify = _registry_tls(settings.registry_ca_file)
    # The control plane (sidecar, tracker) is verified against ca_file alone.
    control_verify = client_tls(settings.ca_file)
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits, verify=registry_verify) as http,
        httpx.AsyncClient(timeout=timeout, limits=limits, verify=control_verify) as control,
    ):
        cache = BlobCache(settings.cache_dir, settings.cache_quota_bytes)
        sidecar = (
            SidecarClient(settings.sidecar_url, http=control) if settings.sidecar_url else None
        )
        keeper: TokenKeeper | None = None
        tracker: TrackerClient | None = None
        if sidecar is not None and settings.tracker_url and credential:
            node_key = None
            if settings.node_key_file is not None:
                node_key = _load_or_create_key(settings.node_key_file)
            keeper = TokenKeeper(
                sidecar,
                node=settings.node_name,
                credential=credential,
                zone=await _zone(settings),
                node_key=node_key,
                clock=clock,
            )
            k = keeper
            tracker = TrackerClient(settings.tracker_url, http=control, auth=k.request_auth())
        layer_settings = LayerSettings(
            swarm_threshold_bytes=settings.swarm_threshold_bytes,
            stall_timeout_s=settings.stall_timeout_s,
            setup_timeout_s=settings.setup_timeout_s,
        )
        origin_limiter = RateLimiter(settings.origin_rate)
        layers = LayerService(
            registry=settings.swarm_upstream(),
            node=None,
            cache=cache,
            http=http,
            sidecar=sidecar,
            tracker=tracker,
            settings=layer_settings,
            origin_limiter=origin_limiter,
        )
        # One more service per swarm_upstreams entry: the same peer, cache and stats; its
        # own sidecar (and token from it, for the torrent endpoint) and salted swarms.
        more_layers, more_keepers = [], []
        for ns, url in settings.swarm_upstream_urls().items():
            entry = settings.swarm_upstreams[ns]
            their_sidecar, their_tracker = None, None
            if keeper is not None:
                their_sidecar = sidecar
                if entry.sidecar_url.rstrip("/") != (settings.sidecar_url or "").rstrip("/"):
                    their_sidecar = SidecarClient(entry.sidecar_url, http=control)
                    more_keepers.append(
                        TokenKeeper(
                            their_sidecar,
                            node=settings.node_name,
                            credential=settings.swarm_credential(ns) or credential or "",
                            zone=keeper.zone,
                            node_key=keeper.node_key,
                            clock=clock,
                        )
                    )
                their_tracker = tracker
                if entry.tracker_url is not None:
                    their_tracker = TrackerClient(
                        entry.tracker_url, http=control, auth=keeper.request_auth()
                    )
            more_layers.append(
                LayerService(
                    registry=url,
                    node=None,
                    cache=cache,
                    http=http,
                    sidecar=their_sidecar,
                    tracker=their_tracker,
                    settings=layer_settings,
                    origin_limiter=origin_limiter,
                    swarm_salt=ns,
                    stats=layers.stats,
                )
            )
        daemon = NodeDaemon(settings, http, layers, more_layers)
        if daemon_ready is not None:
            daemon_ready(daemon)
        async with trio.open_nursery() as nursery:
            for service in daemon.services.values():
                await nursery.start(service.run)
            for their_keeper in more_keepers:
                nursery.start_soon(their_keeper.run)
            if keeper is not None:
                nursery.start_soon(keeper.run)
                nursery.start_soon(_p2p, daemon, settings, keeper)
                if settings.preheat_poll_s is not None and settings.tracker_url:
                    nursery.start_soon(_preheat_poll, daemon, control, settings.tracker_url, keeper)
            else:
                log.warning(
                    "p2p is off (needs sidecar_url, tracker_url and a credential); "
                    "every pull goes to the registry"
                )
            url = await nursery.start(
                functools.partial(
                    serve_app,
                    keep_alive_max_requests=100_000,
                    tls=TlsFiles.from_settings(settings.tls_cert_file, settings.tls_key_file),
                    server=settings.http_server,
                ),
                create_app(daemon),
                settings.listen,
            )
            log.info("mirror serving", extra={"fields": {"url": url, "node": settings.node_name}})
            if settings.metrics_listen is not None:
                daemon.status_url = await nursery.start(
                    serve_app, create_status_app(daemon), settings.metrics_listen
                )
                log.info("status serving", extra={"fields": {"url": daemon.status_url}})
            if settings.proxy_listen is not None:
                daemon.proxy = ForwardProxy(
                    mirror=create_app(daemon),
                    serves=lambda ns: bool(ns) and settings.upstream_for(ns) is not None,
                    http=http,
                    intercept_hosts=settings.proxy_intercept_hosts,
                    certificates=certificates,
                )
                try:
                    daemon.proxy_url = await nursery.start(
                        daemon.proxy.serve, settings.proxy_listen
                    )
                except OSError as exc:
                    raise ListenError(
                        f"cannot listen on {settings.proxy_listen}: {exc.strerror or exc}"
                    ) from None
                log.info("proxy serving", extra={"fields": {"url": daemon.proxy_url}})
            task_status.started(url)


def _registry_tls(ca_file: Path | None) -> ssl.SSLContext:
    """Registries are verified against the system's CAs (or ``SSL_CERT_FILE``: the
    process's one context, :func:`~daemons._http.system_tls`), and ``ca_file`` too when
    given."""
    if ca_file is None:
        return system_tls()
    context = httpx.create_ssl_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config key 'registry_ca_file': {exc}") from None
    return context


async def _zone(settings: NodeSettings) -> str | None:
    """``zone``, else (with ``zone_from_kubernetes``) the Node's label; a failure to read
    it is logged and leaves the zone unset (zones only order peers)."""
    if settings.zone is not None or not settings.zone_from_kubernetes:
        return settings.zone
    config = InClusterConfig.from_environment()
    if config is None:
        log.warning("zone_from_kubernetes: not in a Kubernetes pod (no service account)")
        return None
    try:
        zone = await node_zone(config, settings.node_name)
    except KubernetesError as exc:
        log.warning("zone_from_kubernetes: %s; running without a zone", exc)
        return None
    log.info("zone from the Node object", extra={"fields": {"zone": zone}})
    return zone


def _load_or_create_key(path: Path) -> NodeKey:
    try:
        return NodeKey.from_pem(path.read_bytes())
    except FileNotFoundError:
        key = NodeKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.to_pem())
        path.chmod(0o600)
        return key
    except (OSError, LocalProtocolError) as exc:
        raise ConfigError(f"config key 'node_key_file': {exc}") from None


@click.command("node")
@config_options("node")
def node(config_path: Path | None, print_config: bool) -> None:
    """Run the node peer: registry mirror for the runtime, and swarm peer."""

    settings = settings_for_command(
        NodeSettings,
        daemon="node",
        config_path=config_path,
        print_config=print_config,
        check=check_settings,
    )
    if settings is None:
        return
    setup_logging(settings.log_level, json_lines=settings.log_json)
    run_until_signalled(run_node, settings)
    exit_after_shutdown()


if __name__ == "__main__":
    node()
