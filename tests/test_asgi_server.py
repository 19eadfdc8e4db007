"""The lean HTTP/1.1 server (daemons/_asgi_server.py) that serves the tracker: framing,
keep-alive, pipelining, limits and timeouts, bad input, clients that vanish, TLS, IPv6,
cancellation. Driven by raw sockets (every byte on the wire is ours) and by httpx."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemons._asgi_server import MAX_HEAD_BYTES, ServerLimits, serve_asgi
from daemons._http import (
    ClientGone,
    ListenError,
    LogServerErrors,
    TlsFiles,
    client_tls,
    receive_body,
    serve_app,
)
from daemons.node import NodeSettings, run_node
from daemons.testbed.tls import make_tls
from p2pimage.oci.registry import RegistryClient

Scope = dict[str, Any]


class EchoApp:
    """Answers every request with a JSON view of its scope and body; ``/stream`` streams
    three chunks, ``/limited`` reads at most 100 bytes of body (413 over it), ``/boom``
    raises, ``/silent`` returns without answering, ``/slow`` sleeps until cancelled."""

    def __init__(self) -> None:
        self.gone: list[str] = []
        self.started = trio.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/silent":
            return
        if path == "/slow":
            self.started.set()
            await trio.sleep_forever()
        if path == "/limited":
            headers = dict(scope["headers"])
            try:
                body = await receive_body(
                    receive, headers.get(b"content-length", b"").decode(), 100
                )
            except ClientGone:
                self.gone.append(path)
                return
            status = 413 if body is None else 200
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"limited"})
            return
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for chunk in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.append(path)
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        view = {
            key: scope[key]
            for key in ("type", "http_version", "method", "scheme", "path", "root_path")
        }
        view["raw_path"] = scope["raw_path"].decode()
        view["query_string"] = scope["query_string"].decode()
        view["headers"] = [[k.decode(), v.decode()] for k, v in scope["headers"]]
        view["client"] = list(scope["client"])
        view["server"] = list(scope["server"])
        view["body"] = body.decode()
        answer = json.dumps(view).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


async def start(
    nursery: trio.Nursery, app: Any, listen: str = "127.0.0.1:0", **limits: Any
) -> tuple[str, int]:
    """The lean server on ``listen``: (host, port)."""
    urls = await nursery.start(
        lambda task_status: serve_asgi(
            LogServerErrors(app),
            listen,
            limits=ServerLimits(**limits),
            task_status=task_status,
        )
    )
    host, _, port = urls[0].rpartition(":")
    return host.split("//")[1].strip("[]"), int(port)


def get(path: str, *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + path.encode() + b" HTTP/" + version + b"\r\nHost: t\r\n" + extra + b"\r\n"


class Answer:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """A socket and a minimal HTTP/1.x answer reader (Content-Length, chunked, or to EOF)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
        self.buffer += data

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if self.eof:
                raise EOFError(self.buffer)
            await self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    async def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if self.eof:
                raise EOFError(self.buffer)
            await self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def answer(self) -> Answer:
        head = await self._until(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status < 200:
            return Answer(status, headers, b"")
        if b"content-length" in headers:
            body = await self._exactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size = int(await self._until(b"\r\n"), 16)
                body += await self._exactly(size)
                await self._exactly(2)
                if size == 0:
                    break
        else:
            while not self.eof:
                await self._fill()
            body, self.buffer = self.buffer, b""
        return Answer(status, headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF or reset) within 3 s."""
        with trio.move_on_after(3):
            try:
                while not self.eof:
                    await self._fill()
            except trio.BrokenResourceError:
                return True
            return True
        return False


async def connect(host: str, port: int) -> RawClient:
    return RawClient(await trio.open_tcp_stream(host, port))


async def test_keep_alive_serves_requests_on_one_connection_with_the_scope_apps_read() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        seen = []
        for n in range(3):
            await client.stream.send_all(
                get(f"/a%20b/c{n}?x=1&y=%2F", extra=b"X-Mixed-Case: Yes\r\n")
            )
            answer = await client.answer()
            assert answer.status == 200
            assert answer.headers[b"content-length"] == str(len(answer.body)).encode()
            assert b"date" in answer.headers
            seen.append(answer.json())
        first = seen[0]
        assert first["type"] == "http" and first["http_version"] == "1.1"
        assert first["method"] == "GET" and first["scheme"] == "http"
        assert first["path"] == "/a b/c0" and first["raw_path"] == "/a%20b/c0"
        assert first["query_string"] == "x=1&y=%2F" and first["root_path"] == ""
        assert ["x-mixed-case", "Yes"] in first["headers"]
        assert first["server"] == ["127.0.0.1", port]
        # One connection: the same client port every time.
        assert {tuple(view["client"]) for view in seen} == {tuple(first["client"])}
        assert [view["path"] for view in seen] == ["/a b/c0", "/a b/c1", "/a b/c2"]
        nursery.cancel_scope.cancel()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        post = b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        await client.stream.send_all(get("/one") + post + get("/three"))
        answers = [await client.answer() for _ in range(3)]
        assert [a.json()["path"] for a in answers] == ["/one", "/p", "/three"]
        assert answers[1].json()["body"] == "hello"
        nursery.cancel_scope.cancel()


async def test_request_bodies_in_pieces_and_chunked() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01")
        await trio.sleep(0.05)
        await client.stream.send_all(b"234")
        await trio.sleep(0.05)
        await client.stream.send_all(b"56789")
        assert (await client.answer()).json()["body"] == "0123456789"
        chunked = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        await client.stream.send_all(chunked + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert (await client.answer()).json()["body"] == "abcde"
        nursery.cancel_scope.cancel()


async def test_a_body_over_the_apps_limit_is_refused_and_the_connection_closed() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        # Declared over the limit: refused before any of it is read.
        client = await connect(host, port)
        head = b"POST /limited HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
        await client.stream.send_all(head + b"x" * 1000)
        answer = await client.answer()
        assert answer.status == 413
        # The rest of that body was never read, so the connection cannot go on.
        assert await client.closed()
        # Within the limit, on a connection that then serves another request.
        client = await connect(host, port)
        await client.stream.send_all(
            b"POST /limited HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc" + get("/next")
        )
        assert (await client.answer()).status == 200
        assert (await client.answer()).json()["path"] == "/next"
        nursery.cancel_scope.cancel()


async def test_a_request_head_over_the_limit_is_refused() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(get("/", extra=b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n"))
        answer = await client.answer()
        assert answer.status == 431
        assert await client.closed()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET /\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
    ],
)
async def test_malformed_requests_get_a_400_and_a_closed_connection(request_bytes: bytes) -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(request_bytes)
        answer = await client.answer()
        assert answer.status == 400
        assert answer.headers[b"connection"] == b"close"
        assert await client.closed()
        # The server is still there.
        client = await connect(host, port)
        await client.stream.send_all(get("/ok"))
        assert (await client.answer()).status == 200
        nursery.cancel_scope.cancel()


async def test_a_slow_request_head_and_an_idle_connection_are_cut_by_the_timeout() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp(), keep_alive_timeout_s=0.5)
        slow = await connect(host, port)
        idle = await connect(host, port)
        await idle.stream.send_all(get("/first"))
        assert (await idle.answer()).status == 200
        t0 = trio.current_time()
        # A slowloris: a byte every 0.1 s never completes its head in time.
        with trio.move_on_after(2):
            try:
                for byte in get("/slow-head", extra=b"X-Pad: " + b"p" * 100 + b"\r\n"):
                    await slow.stream.send_all(bytes([byte]))
                    await trio.sleep(0.1)
            except trio.BrokenResourceError:
                pass
        assert await slow.closed()
        assert await idle.closed()
        assert trio.current_time() - t0 < 3
        assert not slow.buffer  # closed without an answer
        nursery.cancel_scope.cancel()


async def test_a_client_gone_mid_body_is_a_disconnect_for_the_app() -> None:
    app = EchoApp()
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, app)
        client = await connect(host, port)
        await client.stream.send_all(
            b"POST /limited HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nonly ten b"
        )
        await trio.sleep(0.1)
        await client.stream.aclose()
        with trio.fail_after(3):
            while not app.gone:
                await trio.sleep(0.02)
        assert app.gone == ["/limited"]
        nursery.cancel_scope.cancel()


async def test_a_send_after_the_client_has_gone_is_a_no_op() -> None:
    done = trio.Event()
    results: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            for _ in range(200):
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            # The (empty) body the app had not read, then the client's departure.
            while not results or results[-1] != "http.disconnect":
                results.append((await receive())["type"])
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, app)
        client = await connect(host, port)
        await client.stream.send_all(get("/big"))
        await client.stream.receive_some(1000)
        await client.stream.aclose()
        with trio.fail_after(5):
            await done.wait()
        assert results == ["http.request", "http.disconnect"]
        nursery.cancel_scope.cancel()


async def test_streaming_answers_are_chunked_for_http11_and_close_delimited_for_http10() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(get("/stream") + get("/after"))
        answer = await client.answer()
        assert answer.headers[b"transfer-encoding"] == b"chunked"
        assert answer.body == b"one,two,three"
        assert (await client.answer()).json()["path"] == "/after"
        old = await connect(host, port)
        await old.stream.send_all(b"GET /stream HTTP/1.0\r\n\r\n")
        answer = await old.answer()
        assert b"transfer-encoding" not in answer.headers
        assert answer.body == b"one,two,three"
        assert old.eof
        nursery.cancel_scope.cancel()


async def test_http10_clients_get_one_answer_and_a_close() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(b"GET /old HTTP/1.0\r\n\r\n")
        answer = await client.answer()
        assert answer.json()["http_version"] == "1.0"
        assert answer.json()["server"][1] == port
        assert await client.closed()
        nursery.cancel_scope.cancel()


async def test_expect_100_continue_is_answered_when_the_app_reads() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(
            b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.answer()
        assert interim.status == 100
        await client.stream.send_all(b"body")
        assert (await client.answer()).json()["body"] == "body"
        nursery.cancel_scope.cancel()


async def test_head_answers_carry_no_body() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/after"))
        head = await client._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert (await client.answer()).json()["path"] == "/after"
        nursery.cancel_scope.cancel()


async def test_app_errors_become_500_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp())
        client = await connect(host, port)
        await client.stream.send_all(get("/boom"))
        answer = await client.answer()
        assert answer.status == 500 and answer.body == b"internal server error"
        # LogServerErrors answered with a length: the connection goes on.
        await client.stream.send_all(get("/silent"))
        assert (await client.answer()).status == 500
        assert await client.closed()
        nursery.cancel_scope.cancel()
    errors = [r for r in caplog.records if r.name == "p2pimage.http"]
    assert any("unhandled error" in r.getMessage() and r.exc_info for r in errors)


async def test_keep_alive_max_requests_closes_after_the_last() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp(), keep_alive_max_requests=2)
        client = await connect(host, port)
        await client.stream.send_all(get("/1"))
        assert b"connection" not in (await client.answer()).headers
        await client.stream.send_all(get("/2"))
        assert (await client.answer()).headers[b"connection"] == b"close"
        assert await client.closed()
        nursery.cancel_scope.cancel()


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_app(
                EchoApp(), "[::1]:0", server="lean", task_status=task_status
            )
        )
        assert url.startswith("http://[::1]:")
        async with httpx.AsyncClient() as http:
            view = (await http.get(url + "/six")).json()
        assert view["client"][0] == "::1" and view["server"][0] == "::1"
        nursery.cancel_scope.cancel()


async def test_listen_errors_are_reported() -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_app(
                EchoApp(), "127.0.0.1:0", server="lean", task_status=task_status
            )
        )
        port = url.rpartition(":")[2]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            await nursery.start(
                lambda task_status: serve_app(
                    EchoApp(), f"127.0.0.1:{port}", server="lean", task_status=task_status
                )
            )
        with pytest.raises(ListenError, match=r"cannot listen on 192\.0\.2\.1:0"):
            await nursery.start(
                lambda task_status: serve_app(
                    EchoApp(), "192.0.2.1:0", server="lean", task_status=task_status
                )
            )
        nursery.cancel_scope.cancel()


async def test_tls_keep_alive_and_a_failed_handshake_that_harms_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = make_tls(tmp_path / "tls")
    caplog.set_level(logging.WARNING)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_app(
                EchoApp(),
                "127.0.0.1:0",
                tls=TlsFiles(tls.cert_file, tls.key_file),
                server="lean",
                task_status=task_status,
            )
        )
        assert url.startswith("https://127.0.0.1:")
        host, port = "127.0.0.1", int(url.rpartition(":")[2])
        # Plain HTTP at a TLS port, and a client that hangs up mid-handshake.
        plain = await connect(host, port)
        await plain.stream.send_all(get("/plain"))
        assert await plain.closed()
        quitter = await connect(host, port)
        await quitter.stream.aclose()
        async with httpx.AsyncClient(verify=client_tls(tls.ca_file)) as http:
            views = [(await http.post(url + f"/s{n}", content=b"secret")).json() for n in range(3)]
        assert {v["scheme"] for v in views} == {"https"}
        assert {v["body"] for v in views} == {"secret"}
        assert len({tuple(v["client"]) for v in views}) == 1  # one kept-alive connection
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("p2pimage.http")] == []


async def test_cancellation_closes_every_connection_and_leaves_no_task() -> None:
    app = EchoApp()
    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run_server(task_status: Any) -> None:
                with server_scope:
                    await serve_asgi(LogServerErrors(app), "127.0.0.1:0", task_status=task_status)

            urls = await outer.start(run_server)
            host, port = "127.0.0.1", int(urls[0].rpartition(":")[2])
            idle = await connect(host, port)
            await idle.stream.send_all(get("/kept"))
            await idle.answer()
            busy = await connect(host, port)
            await busy.stream.send_all(get("/slow"))
            await app.started.wait()
            server_scope.cancel()
        # The server's nursery has exited (the outer one could not otherwise), and both
        # clients see their connections closed.
        assert await idle.closed()
        assert await busy.closed()
        assert not busy.buffer
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_garbage_never_breaks_the_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pimage.http.server")
    rng = random.Random(17)
    valid = get("/x") + b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, EchoApp(), keep_alive_timeout_s=0.3, body_timeout_s=0.3)
        payloads = []
        for _ in range(60):
            # Random bytes, or a valid start with bytes flipped and cut anywhere.
            if rng.random() < 0.5:
                payloads.append(rng.randbytes(rng.randrange(1, 300)))
            else:
                mutated = bytearray(valid[: rng.randrange(1, len(valid))])
                for _ in range(rng.randrange(0, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                payloads.append(bytes(mutated))
        closed: list[bool] = []

        async def one(payload: bytes) -> None:
            client = await connect(host, port)
            try:
                await client.stream.send_all(payload)
                closed.append(await client.closed())
            except trio.BrokenResourceError:
                closed.append(True)
            await client.stream.aclose()

        async with trio.open_nursery() as clients:
            for payload in payloads:
                clients.start_soon(one, payload)
        assert closed == [True] * len(payloads)
        client = await connect(host, port)
        await client.stream.send_all(get("/still-here"))
        assert (await client.answer()).json()["path"] == "/still-here"
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_body_that_stops_coming_is_a_disconnect_after_the_body_timeout() -> None:
    app = EchoApp()
    async with trio.open_nursery() as nursery:
        host, port = await start(nursery, app, body_timeout_s=0.3)
        client = await connect(host, port)
        await client.stream.send_all(
            b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nten bytes."
        )
        with trio.fail_after(3):
            while not app.gone:
                await trio.sleep(0.02)
        assert app.gone == ["/p"]
        assert await client.closed()
        nursery.cancel_scope.cancel()


async def test_a_node_mirror_on_the_lean_server_streams_blobs_whole_and_in_ranges(
    registry: Any, tmp_path: Path
) -> None:
    """The node's opt-in (``http_server = "lean"``): its mirror's streaming answers (a
    blob read through from the real registry, then from its cache) whole and in ranges,
    on one kept-alive connection, the same bytes as the registry's."""
    data = os.urandom(3 * 1024 * 1024 + 4321)
    async with RegistryClient(registry.url) as client:
        digest = await client.push_blob("team/app", data)
    host = registry.url.removeprefix("http://")
    settings = NodeSettings(
        listen="127.0.0.1:0",
        node_name="lean",
        upstreams={host: registry.url},
        default_upstream=registry.url,
        cache_dir=tmp_path / "cache",
        http_server="lean",
    )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_node, settings)
        blob = f"{url}/v2/team/app/blobs/{digest}"
        async with httpx.AsyncClient() as http:
            for _ in range(2):  # read through, then (cached) again
                r = await http.get(blob, params={"ns": host})
                assert r.status_code == 200 and r.content == data
                assert "server" not in r.headers  # hypercorn's would name itself
            r = await http.get(blob, params={"ns": host}, headers={"Range": "bytes=1000-2000999"})
            assert r.status_code == 206 and r.content == data[1000:2001000]
            r = await http.head(blob, params={"ns": host})
            assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
        nursery.cancel_scope.cancel()
