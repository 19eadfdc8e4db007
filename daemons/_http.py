"""Serve a Starlette (any ASGI) app under trio: with hypercorn's trio worker, or with the
lean HTTP/1.1 server of :mod:`daemons._asgi_server` (the tracker's).

Shared by the three daemons: TLS for a listener (:class:`TlsFiles`) and for a client
(:func:`client_tls`), bounded JSON (:func:`load_json`), and :class:`LogServerErrors`,
which logs every 5xx answer and every unhandled error (with its traceback).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import click
import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemons._asgi_server import ServerLimits, serve_asgi, server_tls_context
from daemons._config import ConfigError
from p2pimage.errors import leaf_exceptions

__all__ = [
    "MAX_JSON_DEPTH",
    "ClientGone",
    "ClosingStreamingResponse",
    "JsonLimitError",
    "ListenError",
    "LogServerErrors",
    "TlsFiles",
    "client_tls",
    "load_json",
    "read_body",
    "receive_body",
    "request_url",
    "serve_app",
    "system_tls",
]

#: Which HTTP server :func:`serve_app` runs: ``hypercorn`` or ``lean``
#: (:mod:`daemons._asgi_server`).
HttpServer = Literal["hypercorn", "lean"]

log = logging.getLogger("p2pimage.http")
# hypercorn's own error log (TLS handshakes, protocol errors, its own failures); its
# info lines ("Running on ...") repeat what each daemon logs itself.
_server_log = logging.getLogger("p2pimage.http.server")
_server_log.setLevel(logging.WARNING)

# How long a cancelled response may spend in its body generator's clean-up.
_ACLOSE_GRACE_S = 5.0
#: Deepest JSON nesting a daemon parses. Our documents nest 4 levels (a token request's
#: JWK, a notification envelope's events[].target); Python's decoder recurses per level
#: and fails near 1,000 with RecursionError, so the bound is checked before decoding.
MAX_JSON_DEPTH: Final = 32


class JsonLimitError(ValueError):
    """A JSON document over the size or depth bound (or not JSON at all)."""


def load_json(body: bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode ``body`` as JSON within bounds; any bad input raises :class:`JsonLimitError`.

    The depth is counted over brackets outside strings in one linear pass, so a
    15,000-deep document costs a scan, not a recursion.
    """
    if len(body) > max_bytes:
        raise JsonLimitError(f"JSON body over {max_bytes} bytes")
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JsonLimitError(f"not JSON: {exc}") from None


@dataclass(frozen=True)
class TlsFiles:
    """A listener's certificate chain and private key (PEM files)."""

    cert_file: Path
    key_file: Path

    @classmethod
    def from_settings(cls, cert_file: Path | None, key_file: Path | None) -> TlsFiles | None:
        """The pair from ``tls_cert_file``/``tls_key_file``; None when neither is set;
        :class:`ConfigError` when only one is, or a file cannot be loaded."""
        if cert_file is None and key_file is None:
            return None
        if cert_file is None or key_file is None:
            missing = "tls_cert_file" if cert_file is None else "tls_key_file"
            raise ConfigError(f"config key {missing!r}: set tls_cert_file and tls_key_file")
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"config key 'tls_cert_file': cannot load it: {exc}") from None
        return cls(cert_file, key_file)


def client_tls(ca_file: Path | None) -> ssl.SSLContext:
    """What a daemon's control-plane client verifies servers against: ``ca_file`` (a PEM
    bundle, and only it) when set, else the system's trust store (:func:`system_tls`)."""
    if ca_file is None:
        return system_tls()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config key 'ca_file': cannot load {ca_file}: {exc}") from None


def system_tls() -> ssl.SSLContext:
    """The TLS context of a client that trusts the system's CAs (or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR``), built once per process and trust store: building one loads the CA
    bundle, ~22 ms of CPU. Shared, so never to be modified: a client that trusts more
    builds its own (``httpx.create_ssl_context()``)."""
    return _system_tls(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _system_tls(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()


class LogServerErrors:
    """ASGI middleware: logs every 5xx answer (method, path, status) and every unhandled
    exception with its traceback; an exception before the response started becomes a
    500, so the client gets an answer and hypercorn logs nothing twice."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        fields = {"method": scope.get("method"), "path": scope.get("path")}
        try:
            await self.app(scope, receive, record)
        except Exception:
            log.exception("unhandled error serving a request", extra={"fields": fields})
            if not status:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"21")],
                    }
                )
                await send({"type": "http.response.body", "body": b"internal server error"})
            return
        if status and status[0] >= 500:
            log.warning("answered %d", status[0], extra={"fields": {**fields, "status": status[0]}})


class ListenError(click.ClickException):
    """A listener could not be opened (address in use, not an address of this host,
    a privileged port): one line and exit code 1 from the daemon's command."""


class _Started:
    """Passes ``started`` on, remembering that it happened."""

    def __init__(self, inner: trio.TaskStatus[list[str]]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


class ClosingStreamingResponse(StreamingResponse):
    """A :class:`StreamingResponse` that always closes its body generator.

    Starlette iterates the body and stops when the client goes or the server is
    cancelled, but does not ``aclose()`` it: a generator suspended at ``yield`` runs its
    ``finally`` blocks only when garbage-collected, which may be after the daemon has
    stopped. Ours hold files, pins and swarm readers, so they are closed here, shielded
    for a bounded grace.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(_ACLOSE_GRACE_S, shield=True):
                    await aclose()


async def serve_app(
    app: ASGIApp,
    listen: str,
    *,
    keep_alive_max_requests: int = 1000,
    tls: TlsFiles | None = None,
    server: HttpServer = "hypercorn",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``; port 0 picks a free one) until cancelled,
    over HTTPS when ``tls`` is given.

    Reports the bound base URL (``http://host:port`` or ``https://...``) through
    ``task_status``; raises :class:`ListenError` when the address cannot be bound.
    Access logs are off: daemons log the events that matter themselves. hypercorn's
    warnings and errors go to the ``p2pimage.http.server`` logger, and the app is
    wrapped in :class:`LogServerErrors`. ``server`` picks hypercorn or the lean server
    (same limits, same loggers).
    """
    if server == "lean":
        await _serve_lean(
            LogServerErrors(app), listen, keep_alive_max_requests, tls, task_status=task_status
        )
        return
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = _server_log
    config.keep_alive_max_requests = keep_alive_max_requests
    if tls is not None:
        config.certfile = str(tls.cert_file)
        config.keyfile = str(tls.key_file)
    app = LogServerErrors(app)

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        status = _Started(task_status)
        try:
            await serve(app, config, task_status=status)  # type: ignore[arg-type]
        except (OSError, BaseExceptionGroup) as exc:
            # hypercorn binds inside a nursery of its own: the error may come grouped.
            leaves = leaf_exceptions(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
            if status.done or not all(isinstance(e, OSError) for e in leaves):
                raise
            error = leaves[0]
            assert isinstance(error, OSError)
            raise ListenError(f"cannot listen on {listen}: {error.strerror or error}") from None

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        task_status.started(binds[0])


async def _serve_lean(
    app: ASGIApp,
    listen: str,
    keep_alive_max_requests: int,
    tls: TlsFiles | None,
    *,
    task_status: trio.TaskStatus[str],
) -> None:
    context = None if tls is None else server_tls_context(str(tls.cert_file), str(tls.key_file))
    limits = ServerLimits(keep_alive_max_requests=keep_alive_max_requests)
    status = _FirstUrl(task_status)
    try:
        await serve_asgi(app, listen, limits=limits, tls=context, task_status=status)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        if status.done:
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ListenError(f"cannot listen on {listen}: {reason}") from None


class _FirstUrl:
    """Reports the first of a server's URLs on, remembering that it happened."""

    def __init__(self, inner: trio.TaskStatus[str]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: list[str]) -> None:
        self.done = True
        self.inner.started(value[0])


def _declared_over(declared: str | None, limit: int) -> bool:
    """Whether a ``Content-Length`` value already says the body exceeds ``limit``."""
    return (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        # (a length with more digits than the limit is over it: no int() of it)
        and (len(declared) > len(str(limit)) or int(declared) > limit)
    )


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` when it exceeds ``limit`` (read no further than that)."""
    if _declared_over(request.headers.get("content-length"), limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def receive_body(receive: Receive, content_length: str | None, limit: int) -> bytes | None:
    """:func:`read_body` for a bare ASGI endpoint: the body from ``receive`` (no Starlette
    :class:`Request`), or ``None`` when it exceeds ``limit`` (declared in
    ``content_length`` or as read: no further than that); :class:`ClientGone` when the
    client disconnected first."""
    if _declared_over(content_length, limit):
        return None
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        if chunk:
            body += chunk
            if len(body) > limit:
                return None
        if not message.get("more_body", False):
            return bytes(body)


def request_url(scope: Scope, host: str, public_url: str | None = None) -> str:
    """The URL a request was sent to, as a DPoP proof's ``htu`` names it: the scheme, the
    ``Host`` header, and the path and query exactly as they arrived (no re-encoding).
    Behind a TLS-terminating proxy, ``public_url`` (the scheme and host clients use)
    replaces the first two."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    target: str = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    if public_url is not None:
        return public_url.rstrip("/") + target
    return f"{scope.get('scheme', 'http')}://{host}{target}"
