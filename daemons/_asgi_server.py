"""A lean ASGI server: HTTP/1.1 over trio and h11, one task per connection.

What :func:`daemons._http.serve_app` runs for the tracker, whose requests are small and
many: hypercorn's trio worker costs ~0.3 ms of CPU per request more than a bare h11
loop (docs/benchmarks.md, "Batched announces"), spent in a task per request, an idle
timer restarted as a task per request and three socket writes per answer. Here the app
runs in the connection's own task, the request body is read from the socket only when
the app asks for it (``receive``: back-pressure without a queue), and an answer whose
body comes in one message goes out in one write.

Limits as hypercorn's defaults, which the daemons relied on: a request head of at most
:data:`MAX_HEAD_BYTES`; :data:`KEEP_ALIVE_TIMEOUT_S` to send a whole request head after
the connection opens or the previous answer ends (an idle keep-alive connection, or a
slowloris head, is closed); :data:`TLS_HANDSHAKE_TIMEOUT_S` for a TLS handshake; at most
``keep_alive_max_requests`` requests per connection. Neither hypercorn nor this server
caps the number of connections; a body that pauses longer than :data:`BODY_TIMEOUT_S`
ends the request (hypercorn had no bound there).

ASGI: HTTP only (none of our apps uses lifespan or websockets), spec 2.1 as hypercorn
declared it: a ``send`` after the client has gone is a no-op, and ``receive`` returns
``http.disconnect`` once the client has gone or the answer is complete.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote
from wsgiref.handlers import format_date_time

import h11
import trio

__all__ = [
    "BODY_TIMEOUT_S",
    "KEEP_ALIVE_TIMEOUT_S",
    "MAX_HEAD_BYTES",
    "TLS_HANDSHAKE_TIMEOUT_S",
    "ServerLimits",
    "serve_asgi",
    "server_tls_context",
]

_Message = dict[str, Any]
_App = Callable[
    [dict[str, Any], Callable[[], Awaitable[_Message]], Callable[[_Message], Awaitable[None]]],
    Awaitable[None],
]

log = logging.getLogger("p2pimage.http.server")

#: The largest request head (request line and headers): hypercorn's
#: ``h11_max_incomplete_size`` default, h11's own default (nginx 8 KiB, Apache 8 KiB a line).
MAX_HEAD_BYTES: Final = 16 * 1024
#: hypercorn's ``keep_alive_timeout`` default: an idle connection, or one whose request
#: head is not complete this long after it opened or its previous answer ended, is closed.
KEEP_ALIVE_TIMEOUT_S: Final = 5.0
#: How long a request body may pause (no byte at all) before the client counts as gone
#: (``http.disconnect``). hypercorn had no such bound (``read_timeout`` None): a client
#: trickling a body could hold a connection and a request task without end.
BODY_TIMEOUT_S: Final = 30.0
#: hypercorn's ``ssl_handshake_timeout`` default.
TLS_HANDSHAKE_TIMEOUT_S: Final = 60.0
#: hypercorn's ``backlog`` default.
BACKLOG: Final = 100
# One socket read: hypercorn's MAX_RECV.
_RECV_BYTES: Final = 64 * 1024
# After an error answer, how long the close waits for the client's unread bytes (closing
# with unread data resets the connection, and the client may lose the answer).
_LINGER_S: Final = 1.0
_SPEC: Final = {"version": "3.0", "spec_version": "2.1"}
# Answers that carry no body, so no Content-Length is added to them.
_NO_BODY_STATUS: Final = frozenset({204, 304})


@dataclass(frozen=True)
class ServerLimits:
    """The bounds one connection is held to (defaults: hypercorn's)."""

    max_head_bytes: int = MAX_HEAD_BYTES
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S
    keep_alive_max_requests: int = 1000
    body_timeout_s: float = BODY_TIMEOUT_S
    tls_handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A listener's TLS context, as hypercorn made it for HTTP/1.1: TLS 1.2 or later,
    ECDHE with AES-GCM (TLS 1.3's suites are not affected), no compression."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_ciphers("ECDHE+AESGCM")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file)
    return context


class _DateHeader:
    """The ``Date`` header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = format_date_time(now).encode("ascii")
        return self._value


_date = _DateHeader()


def _address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return (str(address[0]), int(address[1]))
    return None


class _ClientGone(Exception):
    """The client closed, reset or garbled the connection while we read it."""


class _Connection:
    """One client connection: h11's state machine, the stream, the app's request cycles."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: _App,
        limits: ServerLimits,
        *,
        scheme: str,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
    ) -> None:
        self.stream = stream
        self.app = app
        self.limits = limits
        self.scheme = scheme
        self.client = client
        self.server = server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        # False once a read was cancelled mid-way on a TLS stream (which leaves it
        # unusable) or the client went: the connection ends after this cycle.
        self.reusable = True
        self.gone = False

    async def _next_event(self) -> Any:
        """h11's next event, reading the socket as it needs; :class:`_ClientGone` when
        the client closed or sent bytes h11 rejects mid-message."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(_RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.gone = True
                raise _ClientGone from None
            self.h11.receive_data(bytes(data))

    async def _write(self, data: bytes) -> None:
        """Send ``data``; a client that has gone makes it a no-op (ASGI spec 2.1)."""
        if self.gone:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone = True

    async def run(self) -> None:
        served = 0
        while True:
            with trio.move_on_after(self.limits.keep_alive_timeout_s) as timer:
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(exc.error_status_hint, str(exc))
                    return
                except _ClientGone:
                    return
            if timer.cancelled_caught:
                return  # idle too long, or the request head came too slowly
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed: the client is done
            if event.http_version not in (b"1.1", b"1.0"):
                await self._refuse(505, "HTTP/1.0 or HTTP/1.1 only")
                return
            # h11 bounds a head that arrives in pieces; one that came in a single read
            # is measured here (the headers as h11 keeps them, a little under the wire's).
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.limits.max_head_bytes:
                await self._refuse(431, "request head too large")
                return
            served += 1
            await self._cycle(event, last=served >= self.limits.keep_alive_max_requests)
            if not self.reusable or self.gone or self.h11.our_state is not h11.DONE:
                return
            if self.h11.their_state is not h11.DONE and not self._skip_body():
                await self._linger()
                return
            self.h11.start_next_cycle()

    def _skip_body(self) -> bool:
        """Drop the rest of a request body the app did not read (most often the empty
        body of a GET) if h11 already holds all of it; whether the connection may go on
        to the next request (otherwise the client may still be sending it: close)."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.EndOfMessage):
                return True
            if not isinstance(event, h11.Data):
                return False

    async def _refuse(self, status: int, reason: str) -> None:
        """Answer a malformed request with ``status`` (400, 431...) and end the connection."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{reason}\n".encode("utf-8", "replace")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"date", _date.value()),
        ]
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        await self._write(data)
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends, for a moment, so the
        close does not reset the connection under the answer just written."""
        if self.gone or not isinstance(self.stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(_LINGER_S):
            try:
                await self.stream.send_eof()
                for _ in range(16):
                    if not await self.stream.receive_some(_RECV_BYTES):
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _cycle(self, request: h11.Request, *, last: bool) -> None:
        """Run the app for one request."""
        target = bytes(request.target)
        path, _, query = target.partition(b"?")
        method = request.method.decode("ascii")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _SPEC,
            "http_version": request.http_version.decode("ascii"),
            "method": method,
            "scheme": self.scheme,
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self.client,
            "server": self.server,
        }
        head = method == "HEAD"
        h = self.h11
        # The answer: None until the app starts it, then its status and headers until
        # the first body message sends them with it.
        start: _Message | None = None
        started = complete = body_done = False
        # A body message taken from h11 when the answer started, for the next receive.
        unread: _Message | None = None

        async def receive() -> _Message:
            nonlocal body_done, unread
            if unread is not None:
                message, unread = unread, None
                return message
            if body_done or self.gone:
                return await wait_disconnect()
            if h.they_are_waiting_for_100_continue and not started:
                await self._write(
                    h.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            # Most bodies came in the head's read: no timer, no socket read for them.
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                event = None
            else:
                if event is h11.NEED_DATA:
                    event = None
                    with trio.move_on_after(self.limits.body_timeout_s):
                        with contextlib.suppress(h11.RemoteProtocolError, _ClientGone):
                            event = await self._next_event()
            if event is None:  # gone, garbled, or silent too long
                self.gone = True
                return {"type": "http.disconnect"}
            if isinstance(event, h11.EndOfMessage):
                body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if not isinstance(event, h11.Data):
                self.gone = True
                return {"type": "http.disconnect"}
            body = bytes(event.data)
            # What is already buffered goes with it, so a body that came in one read is
            # one message with more_body False.
            while True:
                try:
                    following = h.next_event()
                except h11.RemoteProtocolError:
                    break  # reported on the next receive
                if isinstance(following, h11.Data):
                    body += following.data
                    continue
                if isinstance(following, h11.EndOfMessage):
                    body_done = True
                break
            return {"type": "http.request", "body": body, "more_body": not body_done}

        async def wait_disconnect() -> _Message:
            # After the body: "http.disconnect" when the answer is complete or the client
            # goes; until then, watch the socket (bytes of a pipelined next request go to
            # h11's buffer, which keeps them for the next cycle).
            while not (complete or self.gone):
                if len(h.trailing_data[0]) > self.limits.max_head_bytes:
                    await trio.sleep_forever()  # enough buffered; the cycle's end cancels us
                try:
                    data = await self.stream.receive_some(_RECV_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.gone = True
                    break
                except trio.Cancelled:
                    if isinstance(self.stream, trio.SSLStream):
                        self.reusable = False
                    raise
                if not data:
                    self.gone = True
                    break
                h.receive_data(bytes(data))
            return {"type": "http.disconnect"}

        def body_complete() -> bool:
            # Whether the whole request body has arrived (consumed by the app or not), so
            # the connection can go on after this answer. Most often the app did not read
            # an empty body (a GET), whose end h11 gives without reading the socket.
            nonlocal body_done, unread
            if body_done or unread is not None or self.gone:
                return body_done
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.EndOfMessage):
                body_done = True
                unread = {"type": "http.request", "body": b"", "more_body": False}
            elif isinstance(event, h11.Data):
                unread = {"type": "http.request", "body": bytes(event.data), "more_body": True}
            return body_done

        async def send(message: _Message) -> None:
            nonlocal start, started, complete
            kind = message["type"]
            if kind == "http.response.start":
                if start is not None:
                    raise RuntimeError("http.response.start sent twice")
                start = message
                return
            if kind != "http.response.body":
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            if start is None:
                raise RuntimeError("http.response.body before http.response.start")
            if complete:
                raise RuntimeError("http.response.body after the answer was complete")
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            data = b""
            if not started:
                started = True
                status = int(start["status"])
                headers = [(bytes(k).lower(), bytes(v)) for k, v in start.get("headers", ())]
                names = {k for k, _ in headers}
                if (
                    not more
                    and not head
                    and b"content-length" not in names
                    and b"transfer-encoding" not in names
                    and status not in _NO_BODY_STATUS
                    and status >= 200
                ):
                    # A whole answer in one message: its length, not chunked framing.
                    headers.append((b"content-length", str(len(body)).encode()))
                if b"date" not in names:
                    headers.append((b"date", _date.value()))
                if last or not body_complete():
                    # The last request, or one whose body is still coming (an answer
                    # before it was read): close after this answer, and say so.
                    headers.append((b"connection", b"close"))
                data = h.send(h11.Response(status_code=status, headers=headers)) or b""
            if body and not head:
                data += h.send(h11.Data(data=body)) or b""
            if not more:
                complete = True
                data += h.send(h11.EndOfMessage()) or b""
            if data:
                await self._write(data)

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception(
                "unhandled error in the ASGI app", extra={"fields": {"path": scope["path"]}}
            )
        if not complete:
            self.reusable = False
            if not started and h.our_state is h11.SEND_RESPONSE:
                # The app ended without answering (LogServerErrors answers for errors).
                await self._refuse(500, "internal server error")


async def _handle(
    stream: trio.abc.Stream,
    app: _App,
    limits: ServerLimits,
    tls: ssl.SSLContext | None,
) -> None:
    """Serve one accepted connection; nothing it does escapes to the listener."""
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    client = server = None
    if sock is not None:
        client, server = _address(sock, peer=True), _address(sock, peer=False)
    try:
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True)
            try:
                with trio.fail_after(limits.tls_handshake_timeout_s):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                # hypercorn dropped these silently: scanners and health probes cause them.
                log.debug("TLS handshake failed: %s", exc)
                return
        connection = _Connection(
            stream,
            app,
            limits,
            scheme="https" if tls is not None else "http",
            client=client,
            server=server,
        )
        await connection.run()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("error serving a connection")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await stream.aclose()


def _split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _url(scheme: str, address: tuple[Any, ...]) -> str:
    host = str(address[0])
    return f"{scheme}://[{host}]:{address[1]}" if ":" in host else f"{scheme}://{host}:{address[1]}"


async def serve_asgi(
    app: _App,
    listen: str,
    *,
    limits: ServerLimits = ServerLimits(),
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``, ``[v6]:port``; port 0 picks a free one)
    until cancelled; reports the bound base URLs (one a listening socket) through
    ``task_status``. Binding errors raise :class:`OSError` (or ValueError for a
    malformed ``listen``). On cancellation every connection is closed."""
    host, port = _split_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=BACKLOG)
    scheme = "https" if tls is not None else "http"
    urls = [_url(scheme, listener.socket.getsockname()) for listener in listeners]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, app, limits, tls)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(urls)
