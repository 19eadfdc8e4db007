"""Forward-proxy front of the node's mirror, for runtimes configured through
``HTTP_PROXY``/``HTTPS_PROXY`` (dockerd, podman, skopeo, CRI-O).

A request is one of:

- **absolute form** (``GET http://registry:5000/v2/...``): a pull (``GET``/``HEAD`` of
  ``/v2/``, a manifest or a blob) from a registry the node serves (``serves``) goes to
  the mirror itself (an ASGI app) with ``ns=<authority>``, so manifests, the access check
  with the client's own ``Authorization``, the swarm and the fallback are exactly the
  mirror's; anything else (pushes, tag lists, other hosts) is forwarded unchanged;
- **CONNECT** ``host:port``: a blind TCP tunnel, unless the host is on the operator's
  interception list; then the proxy answers the TLS handshake itself with a certificate
  minted for that host by the operator's CA (:class:`HostCertificates`), and serves the
  decrypted requests as above, reading the upstream over TLS verified against the node's
  trust store. No other host is ever decrypted;
- anything else (origin form, a bad target, garbage): a ``400`` that says what was wrong,
  and the connection closes.

Parsing the target is pure (:func:`parse_target`); the trio part is a short loop of
``h11`` events.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlsplit

import h11
import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pimage.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ForwardProxy",
    "describe_upstream_error",
    "HostCertificates",
    "ProxyTarget",
    "parse_target",
]

log = logging.getLogger("p2pimage.mirror.proxy")

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

# Bytes per read from a client socket (request heads and bodies are small).
_READ = 64 * 1024
# Bytes per read in a blind tunnel: layers pass here, and larger reads mean fewer
# wake-ups per MiB (benchmarks.proxy).
_TUNNEL_READ = 1024 * 1024
# h11's own bound on a request head (16 KiB, as nginx's large_client_header_buffers
# and Apache's LimitRequestFieldSize sit around 8-16 KiB); registry requests are far
# smaller, Authorization headers with a bearer JWT included.
MAX_HEAD_BYTES: Final = 16 * 1024
# Client connections served at once (tunnels included); one more gets a 503. One node's
# runtime opens a few per pull (dockerd: 3 layer downloads at a time, containerd and
# containers/image a handful), so this only stops a runaway local client.
MAX_CONNECTIONS: Final = 1024
_TOO_MANY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 47\r\nconnection: close\r\n\r\n"
    b"too many connections to this proxy; try again\r\n"
)
# Hop-by-hop headers (RFC 9110 §7.6.1), and ones the relay sets itself.
_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# Minted certificates live this long (or until the CA's own end, if sooner).
_CERT_LIFETIME: Final = datetime.timedelta(days=7)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class ProxyTarget:
    """Where a proxied request goes: ``scheme://host:port`` + ``path`` (with its query)."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"


_DEFAULT_PORT: Final = {"http": 80, "https": 443}
# The pull paths the mirror serves (the API root, manifests, blobs); anything else of a
# registry (pushes, tag lists, the catalog) is forwarded unchanged.
_MIRRORED: Final = re.compile(r"^/v2/(?:[^?]*/(?:manifests|blobs)/[^/?]+)?(?:\?.*)?$")


def _host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    try:
        parts = urlsplit("//" + authority)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise RemoteProtocolError(f"bad authority {authority!r}") from None
    if not host or parts.username is not None or parts.path or parts.query:
        raise RemoteProtocolError(f"bad authority {authority!r}")
    if port is None:
        if default_port is None:
            raise RemoteProtocolError(f"CONNECT target {authority!r} names no port")
        port = default_port
    if port == 0:
        raise RemoteProtocolError(f"bad port in {authority!r}")
    return host, port


def parse_target(method: str, target: str, tunnel: ProxyTarget | None = None) -> ProxyTarget:
    """The destination of a request as a forward proxy sees it.

    ``CONNECT`` takes ``host:port``; other methods take the absolute form
    (``http://host[:port]/path``), or, inside an intercepted tunnel (``tunnel``), the
    origin form (``/path``), which then goes to the tunnel's host over TLS. Raises
    :class:`RemoteProtocolError` for anything else.
    """
    if method == "CONNECT":
        if tunnel is not None:
            raise RemoteProtocolError("CONNECT inside a tunnel")
        host, port = _host_port(target, None)
        return ProxyTarget("https", host, port, "")
    if target.startswith("/"):
        if tunnel is None:
            raise RemoteProtocolError(
                "origin-form request to a forward proxy (send http://host/path, or CONNECT)"
            )
        return ProxyTarget("https", tunnel.host, tunnel.port, target)
    parts = urlsplit(target)
    schemes = ("https",) if tunnel is not None else ("http",)
    if parts.scheme not in schemes:
        raise RemoteProtocolError(f"unsupported request target {target[:100]!r}")
    host, port = _host_port(parts.netloc, _DEFAULT_PORT[parts.scheme])
    if tunnel is not None and (host.lower(), port) != (tunnel.host.lower(), tunnel.port):
        raise RemoteProtocolError("request inside a tunnel names another host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return ProxyTarget(parts.scheme, host, port, path)


# --------------------------------------------------------------------------- certificates


class HostCertificates:
    """Server certificates for intercepted hosts, minted by the operator's CA.

    One EC P-256 key for all minted certificates; one certificate per host (DNS name or
    IP address in its subjectAltName), valid for a week (at most until the CA ends) and
    cached until two thirds of that have passed, so a handshake costs one signature the
    first time and none after. ``clock`` is passed in.
    """

    def __init__(
        self,
        ca_cert_pem: bytes,
        ca_key_pem: bytes,
        *,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        try:
            self.ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
            ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
        except ValueError as exc:
            raise LocalProtocolError(f"cannot read the interception CA: {exc}") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise LocalProtocolError("the interception CA key must be EC or RSA")
        if _spki(ca_key.public_key()) != _spki(self.ca_cert.public_key()):
            raise LocalProtocolError("the interception CA key does not match its certificate")
        self._ca_key = ca_key
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, tuple[datetime.datetime, ssl.SSLContext]] = {}

    def certificate(self, host: str) -> x509.Certificate:
        """A fresh certificate for ``host``, signed by the CA."""
        now = self._clock()
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.ca_cert.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + _CERT_LIFETIME, self.ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting ``host``'s certificate (cached)."""
        now = self._clock()
        cached = self._contexts.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        cert = self.certificate(host)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        key = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The ssl module loads chains from files only: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="p2pimage-mint-") as tmp:
            path = os.path.join(tmp, "host.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key + chain)
            context.load_cert_chain(path)
        if len(self._contexts) > 1000:
            self._contexts.clear()
        # Re-minted once two thirds of its validity have passed (the tokens' rule too),
        # so a certificate cut short by the CA's own end is not minted on every handshake.
        renew_at = now + (cert.not_valid_after_utc - now) * 2 / 3
        self._contexts[host] = (renew_at, context)
        return context


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# --------------------------------------------------------------------------- the proxy


@dataclass
class ProxyStats:
    requests: Counter[str] = field(default_factory=Counter)  # mirror, forward, tunnel, ...
    errors: Counter[str] = field(default_factory=Counter)  # reason


class _ClientGone(Exception):
    pass


class _Client:
    """One client connection: a trio stream and its h11 state."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_READ)
            self.conn.receive_data(bytes(data))

    async def send(self, *events: Any) -> None:
        # Body chunks pass through uncopied (h11's passthrough); framing bytes are joined.
        parts: list[bytes] = []
        for event in events:
            parts.extend(self.conn.send_with_data_passthrough(event) or ())
        try:
            if sum(map(len, parts)) <= _READ:
                await self.stream.send_all(b"".join(parts))
            else:
                for part in parts:
                    await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def error(self, status: int, message: str) -> None:
        """Answer with ``status`` and a one-line text body, then close the connection."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response already started: closing is all that is left
        body = (message + "\n").encode()
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError, _ClientGone):
            await self.send(
                h11.Response(status_code=status, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )


class ForwardProxy:
    """An HTTP/1.1 forward proxy in front of the node's mirror (``mirror``, an ASGI app).

    ``serves(ns)`` says whether the mirror serves the registry named ``ns`` (``host:port``,
    or ``host`` on the scheme's default port); pulls from it go to the mirror with
    ``ns=``. ``intercept_hosts`` (host names or ``host:port``) are decrypted with
    certificates from ``certificates``; every other CONNECT is a blind tunnel. ``http``
    forwards everything else and verifies the upstream's certificate for intercepted
    hosts. At most ``max_connections`` clients are served at once.
    """

    def __init__(
        self,
        *,
        mirror: ASGIApp,
        serves: Callable[[str], bool],
        http: httpx.AsyncClient,
        intercept_hosts: Collection[str] = (),
        certificates: HostCertificates | None = None,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 300.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if intercept_hosts and certificates is None:
            raise LocalProtocolError("intercepting hosts needs a CA (certificates)")
        self.mirror = mirror
        self.serves = serves
        self.http = http
        self.intercept_hosts = frozenset(h.lower() for h in intercept_hosts)
        self.certificates = certificates
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._slots = trio.Semaphore(max_connections)
        self.stats = ProxyStats()

    def registry_of(self, target: ProxyTarget) -> str | None:
        """The name (``ns``) under which the mirror serves ``target``'s registry, if it does."""
        if self.serves(target.authority):
            return target.authority
        if target.port == _DEFAULT_PORT[target.scheme] and self.serves(target.host):
            return target.host
        return None

    def intercepts(self, target: ProxyTarget) -> bool:
        return (
            target.host.lower() in self.intercept_hosts
            or target.authority.lower() in self.intercept_hosts
        )

    async def serve(
        self, listen: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (port 0: any free) until cancelled; reports
        ``http://host:port`` through ``task_status``."""
        host, _, port = listen.rpartition(":")
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]") or None)
        sockname = listeners[0].socket.getsockname()
        bound = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(f"http://{bound}:{sockname[1]}")

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection; never raises for anything the client did."""
        try:
            async with stream:
                client = _Client(stream)
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    # Answered before reading the request: h11 would not send it yet.
                    self.stats.errors["too_many_connections"] += 1
                    await stream.send_all(_TOO_MANY)
                    return
                try:
                    await self._serve_connection(client, tunnel=None)
                finally:
                    self._slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone):
            pass
        except OSError as exc:
            log.info("proxy connection ended: %s", exc)
        except Exception:
            # One connection's failure (a mirror error mid-body, an upstream that broke
            # HTTP) ends that connection only, as in any HTTP server.
            self.stats.errors["internal"] += 1
            log.exception("proxy connection failed")

    async def _serve_connection(self, client: _Client, tunnel: ProxyTarget | None) -> None:
        while True:
            try:
                with trio.fail_after(self.idle_timeout_s):
                    event = await client.next_event()
            except trio.TooSlowError:
                return
            except h11.RemoteProtocolError as exc:
                self.stats.errors["malformed"] += 1
                await client.error(exc.error_status_hint, f"malformed request: {exc}")
                return
            if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
                return
            method = event.method.decode("latin-1")
            try:
                target = parse_target(method, event.target.decode("latin-1"), tunnel)
            except RemoteProtocolError as exc:
                self.stats.errors["bad_target"] += 1
                await client.error(400, str(exc))
                return
            if method == "CONNECT":
                await self._connect(client, target)
                return
            try:
                await self._request(client, event, method, target)
            except h11.RemoteProtocolError as exc:
                self.stats.errors["malformed"] += 1
                await client.error(400, f"malformed request: {exc}")
                return
            except RemoteProtocolError as exc:
                self.stats.errors["malformed"] += 1
                await client.error(400, str(exc))
                return
            except h11.LocalProtocolError as exc:
                # The answer we relay cannot be framed for this client (an upstream
                # that broke HTTP): end the connection.
                self.stats.errors["upstream_protocol"] += 1
                log.warning("proxy: cannot relay the answer from %s: %s", target.authority, exc)
                await client.error(502, f"bad answer from {target.authority}")
                return
            if client.conn.our_state is h11.MUST_CLOSE or client.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                client.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return  # the request body was not read to its end: close

    # --- requests -----------------------------------------------------------------------

    async def _request(
        self, client: _Client, request: h11.Request, method: str, target: ProxyTarget
    ) -> None:
        ns = self.registry_of(target)
        if ns is not None and method in ("GET", "HEAD") and _MIRRORED.match(target.path):
            self.stats.requests["mirror"] += 1
            await self._to_mirror(client, request, method, target, ns)
        else:
            self.stats.requests["forward"] += 1
            await self._forward(client, request, method, target)

    async def _to_mirror(
        self, client: _Client, request: h11.Request, method: str, target: ProxyTarget, ns: str
    ) -> None:
        async for _ in client.body():
            pass  # registry reads have no body; a stray one is dropped
        path, _, query = target.path.partition("?")
        # The registry is the one the client connected to, whatever its query says.
        kept = [p for p in query.split("&") if p and not p.startswith("ns=")]
        query = "&".join([*kept, f"ns={quote(ns, safe='')}"])
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": target.scheme,
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": [
                (bytes(k), bytes(v))
                for k, v in request.headers
                if k not in (b"proxy-authorization", b"proxy-connection")
            ],
            "client": None,
            "server": (target.host, target.port),
        }
        sent_request = False
        head: h11.Response | None = None

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await trio.sleep_forever()  # a disconnect shows as a failed send
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal head
            if message["type"] == "http.response.start":
                head = h11.Response(
                    status_code=message["status"],
                    headers=[(k, v) for k, v in message.get("headers", [])],
                )
            elif message["type"] == "http.response.body":
                events: list[Any] = []
                if head is not None:
                    events.append(head)
                    head = None
                if message.get("body"):
                    events.append(h11.Data(data=message["body"]))
                if not message.get("more_body", False):
                    events.append(h11.EndOfMessage())
                await client.send(*events)

        await self.mirror(scope, receive, send)

    async def _forward(
        self, client: _Client, request: h11.Request, method: str, target: ProxyTarget
    ) -> None:
        # Bytes as received: a header value outside ASCII is the upstream's to judge.
        headers = [(bytes(k), bytes(v)) for k, v in request.headers if k.lower() not in _HOP]
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in request.headers)
        body = client.body()
        if not has_body:
            async for _ in body:
                pass
        upstream = self.http.build_request(
            method, target.url, headers=headers, content=body if has_body else None
        )
        try:
            response = await self.http.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            what = describe_upstream_error(exc)
            self.stats.errors[
                "upstream_unreachable" if what.startswith("unr") else "upstream_tls"
            ] += 1
            log.warning("proxy: upstream %s %s", target.authority, what)
            await client.error(502, f"upstream {target.authority}: {what}")
            return
        try:
            out = [
                (k, v)
                for k, v in response.headers.raw
                if k.lower() not in _HOP or k.lower() == b"content-length"
            ]
            await client.send(h11.Response(status_code=response.status_code, headers=out))
            async for chunk in response.aiter_raw():
                await client.send(h11.Data(data=chunk))
            await client.send(h11.EndOfMessage())
        finally:
            await response.aclose()

    # --- CONNECT ------------------------------------------------------------------------

    async def _connect(self, client: _Client, target: ProxyTarget) -> None:
        if self.intercepts(target):
            self.stats.requests["intercept"] += 1
            await self._intercept(client, target)
            return
        self.stats.requests["tunnel"] += 1
        try:
            with trio.fail_after(self.connect_timeout_s):
                upstream = await trio.open_tcp_stream(target.host, target.port)
        except (OSError, trio.TooSlowError) as exc:
            self.stats.errors["connect_failed"] += 1
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            await client.error(502, f"cannot connect to {target.authority}: {reason}")
            return
        async with upstream:
            await client.send(h11.Response(status_code=200, headers=[]))
            # Bytes the client sent after its CONNECT head belong to the tunnel.
            leftover, _ = client.conn.trailing_data
            if leftover:
                await upstream.send_all(bytes(leftover))
            await _splice(client.stream, upstream)

    async def _intercept(self, client: _Client, target: ProxyTarget) -> None:
        assert self.certificates is not None
        context = self.certificates.server_context(target.host)
        await client.send(h11.Response(status_code=200, headers=[]))
        leftover, _ = client.conn.trailing_data
        raw: trio.abc.Stream = client.stream
        if leftover:
            raw = _Prefixed(client.stream, bytes(leftover))
        tls = trio.SSLStream(raw, context, server_side=True)
        try:
            with trio.fail_after(self.connect_timeout_s):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.stats.errors["client_tls"] += 1
            log.info("proxy: TLS handshake for %s failed: %r", target.authority, exc)
            return
        await self._serve_connection(_Client(tls), tunnel=target)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.aclose()


def describe_upstream_error(exc: BaseException) -> str:
    """One line on why an upstream could not be reached: an untrusted certificate says so
    (httpx's own message is often empty for TLS failures)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted ({seen.verify_message or seen})"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed ({seen})"
        seen = seen.__cause__ or seen.__context__
    return f"unreachable ({exc or type(exc).__name__})"


class _Prefixed(trio.abc.Stream):
    """A stream that first yields ``prefix`` (bytes read past a CONNECT head)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _splice(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Copy bytes both ways; an end of stream is passed on as a half-close, and the
    tunnel ends when both directions have ended (or either breaks)."""

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(_TUNNEL_READ):
                await dst.send_all(data)
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, nursery.cancel_scope)
