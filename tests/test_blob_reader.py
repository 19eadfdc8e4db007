"""The bulk blob path of torrent generation: ``RegistryClient.open_blob_reader`` (a blocking
``http.client`` GET read from a worker thread) under auth, redirects, failures and
cancellation, against small HTTP servers on loopback."""

from __future__ import annotations

import base64
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from p2pimage.errors import LocalProtocolError
from p2pimage.metainfo.torrent import MetainfoBuilder
from p2pimage.oci.registry import (
    ByteRange,
    RegistryClient,
    RegistryError,
    open_blob_range,
    sha256_digest,
)
from p2pimage.sidecar.indexer import generate_metainfo

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

BLOB = bytes(range(256)) * 12_289  # ~3 MiB: several buffers when read in 1 MiB chunks
DIGEST = sha256_digest(BLOB)
BLOB_PATH = f"/v2/team/app/blobs/{DIGEST}"
BASIC = "Basic " + base64.b64encode(b"alice:pw").decode()


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[str]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            await app(scope, receive, send)

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(asgi, config, task_status=task_status)  # type: ignore[arg-type]
        )
        yield urls[0] if isinstance(urls, list) else urls
        nursery.cancel_scope.cancel()


async def respond(send: Send, status: int, headers: dict[str, str], body: bytes = b"") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_part_of_blob(scope: Scope, send: Send, length: int) -> bool:
    """Answer HEAD whole (True), or start a 200 GET and send only ``length`` bytes."""
    if scope["method"] == "HEAD":
        await respond(send, 200, {"content-length": str(len(BLOB))})
        return True
    start = {"content-length": str(len(BLOB))}
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.encode(), v.encode()) for k, v in start.items()],
        }
    )
    await send({"type": "http.response.body", "body": BLOB[:length], "more_body": True})
    return False


async def cancel_generation_once(client: RegistryClient, stalled: trio.Event) -> None:
    """Generate the blob's torrent, cancel it once the registry has ``stalled``, and check
    that the cancellation returned at once (the client's timeout is 60 s)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(generate_metainfo, client, "team/app", DIGEST)
        await stalled.wait()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
        cancelled_at = trio.current_time()
    assert trio.current_time() - cancelled_at < 5


def header(scope: Scope, name: str) -> str | None:
    for k, v in scope["headers"]:
        if k.decode().lower() == name:
            return str(v.decode())
    return None


async def test_auth_then_cross_origin_redirect_drops_credentials() -> None:
    """Like a registry on S3: the blob GET (authenticated) redirects to storage, which
    must never see the registry's credentials."""
    storage_saw: list[str | None] = []

    async def storage(scope: Scope, receive: Receive, send: Send) -> None:
        storage_saw.append(header(scope, "authorization"))
        assert scope["query_string"] == b"sig=abc"
        await respond(send, 200, {"content-length": str(len(BLOB))}, BLOB)

    async with serving(storage) as storage_url:
        registry_saw: list[tuple[str, str | None]] = []

        async def registry(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            auth = header(scope, "authorization")
            registry_saw.append((scope["method"], auth))
            if auth != BASIC:
                await respond(send, 401, {"www-authenticate": 'Basic realm="r"'})
            elif scope["method"] == "HEAD":
                await respond(send, 200, {"content-length": str(len(BLOB))})
            else:
                await respond(send, 307, {"location": f"{storage_url}/blob?sig=abc"})

        async with (
            serving(registry) as registry_url,
            RegistryClient(registry_url, username="alice", password="pw") as client,
        ):
            meta = await generate_metainfo(client, "team/app", DIGEST, chunk_size=1 << 20)
    expected = MetainfoBuilder(len(BLOB), DIGEST[7:])
    expected.update(BLOB)
    assert meta.info_hash == expected.finish(expected_digest=DIGEST).info_hash
    assert registry_saw == [("HEAD", None), ("HEAD", BASIC), ("GET", BASIC)]
    assert storage_saw == [None]


@pytest.mark.parametrize(
    "status, transient", [(404, False), (403, False), (503, True)], ids=["404", "403", "503"]
)
async def test_error_status_on_get_is_a_registry_error(status: int, transient: bool) -> None:
    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await respond(send, 200, {"content-length": str(len(BLOB))})
        else:
            await respond(send, status, {"content-type": "text/plain"}, b"no blob for you")

    async with serving(registry) as url, RegistryClient(url) as client:
        with pytest.raises(RegistryError, match=f"HTTP {status} no blob for you") as err:
            await generate_metainfo(client, "team/app", DIGEST)
    assert err.value.status == status and err.value.transient is transient


async def test_redirect_loop_is_refused() -> None:
    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await respond(send, 200, {"content-length": str(len(BLOB))})
        else:
            await respond(send, 302, {"location": scope["path"]})

    async with serving(registry) as url, RegistryClient(url) as client:
        with pytest.raises(RegistryError, match="redirects"):
            await generate_metainfo(client, "team/app", DIGEST)


async def test_connection_cut_mid_blob_is_a_transient_error() -> None:
    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if not await send_part_of_blob(scope, send, 100_000):
            raise RuntimeError("registry died mid-blob")

    async with serving(registry) as url, RegistryClient(url) as client:
        with pytest.raises(RegistryError) as err:
            await generate_metainfo(client, "team/app", DIGEST)
    assert err.value.transient


async def test_cancel_mid_blob_stops_the_reading_threads_promptly() -> None:
    sent = trio.Event()

    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if not await send_part_of_blob(scope, send, 1000):
            sent.set()
            await trio.sleep_forever()  # a registry that stalls mid-blob

    async with serving(registry) as url, RegistryClient(url, timeout=60) as client:
        await cancel_generation_once(client, sent)
        # The abandoned reader thread saw its socket shut down and left _hash_blob, which
        # stops the SHA-1 thread on its way out (trio caches idle workers: hence the name).
        with trio.fail_after(5):
            while any(t.name == "p2pimage-sha1" for t in threading.enumerate()):
                await trio.sleep(0.02)


async def test_cancel_while_the_get_waits_for_its_response_head() -> None:
    """A registry that takes the GET and never answers: a cancelled generation returns at
    once, and the abandoned thread's connection is shut down (the registry sees it go)."""
    asked = trio.Event()
    gone = trio.Event()

    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await respond(send, 200, {"content-length": str(len(BLOB))})
            return
        asked.set()
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    async with serving(registry) as url, RegistryClient(url, timeout=60) as client:
        await cancel_generation_once(client, asked)
        with trio.fail_after(5):
            await gone.wait()


# --- ranged reads: one rule for open_blob, the mirror and the origin reader ------------


def range_app(*, honour_range: bool, cut: int = 0) -> App:
    """A blob server that honours ``Range`` (206) or ignores it (the whole blob, 200),
    and ends every body ``cut`` bytes early (a short body)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        wanted = header(scope, "range")
        start, end = 0, len(BLOB)
        status = 200
        if wanted is not None and honour_range:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start, end, status = int(first), int(last) + 1 if last else len(BLOB), 206
        body = BLOB[start : end - cut]  # framed as sent: short, not cut off mid-body
        await respond(send, status, {"content-length": str(len(body))}, body)

    return app


@pytest.mark.parametrize("honour_range", [True, False])
async def test_open_blob_range_reads_exactly_the_range(honour_range: bool) -> None:
    """206 gives the range; a registry that ignores Range (200, whole blob) gives it too
    when the reader allows dropping the prefix, and from byte 0 always (tail cut)."""
    async with serving(range_app(honour_range=honour_range)) as url, httpx.AsyncClient() as http:
        for start, end in [(0, 10), (1000, 70_000), (5, len(BLOB)), (len(BLOB) - 1, len(BLOB))]:
            async with open_blob_range(
                http, url + BLOB_PATH, ByteRange(start, end), skip_ignored=True, chunk_size=4096
            ) as chunks:
                got = b"".join([c async for c in chunks])
            assert got == BLOB[start:end]
        async with open_blob_range(http, url + BLOB_PATH, ByteRange(0, 300)) as chunks:
            assert b"".join([c async for c in chunks]) == BLOB[:300]


async def test_an_ignored_range_is_refused_where_the_prefix_would_be_read_again() -> None:
    """The origin reader's rule: a 200 to a range that does not start at 0 is an error,
    not a second copy of the layer's prefix from the registry."""
    async with serving(range_app(honour_range=False)) as url, httpx.AsyncClient() as http:
        with pytest.raises(RegistryError, match="ignored Range"):
            async with open_blob_range(http, url + BLOB_PATH, ByteRange(100, 200)):
                pass


@pytest.mark.parametrize("honour_range", [True, False])
async def test_a_short_body_is_a_registry_error(honour_range: bool) -> None:
    async with serving(range_app(honour_range=honour_range, cut=7)) as url:
        async with httpx.AsyncClient() as http:
            with pytest.raises(RegistryError, match="short body"):
                async with open_blob_range(
                    http, url + BLOB_PATH, ByteRange(0, len(BLOB)), skip_ignored=True
                ) as chunks:
                    async for _ in chunks:
                        pass
        async with RegistryClient(url) as client:
            with pytest.raises(RegistryError, match="short body"):
                async with client.open_blob("team/app", DIGEST, start=0, end=len(BLOB)) as blob:
                    async for _ in blob.chunks():
                        pass


async def test_error_status_and_bad_ranges() -> None:
    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 404, {"content-length": "0"})

    async with serving(not_found) as url, httpx.AsyncClient() as http:
        with pytest.raises(RegistryError, match="404") as caught:
            async with open_blob_range(http, url + BLOB_PATH, ByteRange(0, 10)):
                pass
        assert caught.value.status == 404
    with pytest.raises(LocalProtocolError):
        ByteRange(-1, 10)
    with pytest.raises(LocalProtocolError):
        ByteRange(10, 9)
    assert ByteRange().headers() == {}
    assert ByteRange(5).headers() == {"Range": "bytes=5-"}
    assert ByteRange(0, 1).headers() == {"Range": "bytes=0-0"}


async def test_a_blob_deleted_while_its_torrent_is_generated_gets_none(tmp_path: Path) -> None:
    """The registry's delete event arrives while the sidecar is still hashing the blob:
    the generation finishes, but stores no torrent and tells its waiters the blob is
    gone, so no torrent outlives the bytes it describes."""
    from p2pimage.sidecar.indexer import BlobUnavailableError, Indexer, TorrentStore

    half_sent, go_on = trio.Event(), trio.Event()

    async def registry(scope: Scope, receive: Receive, send: Send) -> None:
        if await send_part_of_blob(scope, send, len(BLOB) // 2):
            return
        half_sent.set()
        await go_on.wait()
        await send({"type": "http.response.body", "body": BLOB[len(BLOB) // 2 :]})

    store = TorrentStore(tmp_path / "torrents")
    async with serving(registry) as url, RegistryClient(url) as client:
        indexer = Indexer(client, store)
        async with trio.open_nursery() as nursery:
            await nursery.start(indexer.run)
            outcome: list[BaseException] = []

            async def ask() -> None:
                try:
                    await indexer.torrent("team/app", DIGEST)
                except BlobUnavailableError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as asking:
                asking.start_soon(ask)
                with trio.fail_after(30):
                    await half_sent.wait()
                assert indexer.forget(DIGEST) is False  # nothing stored yet
                go_on.set()
            nursery.cancel_scope.cancel()
    assert len(outcome) == 1 and "deleted" in str(outcome[0])
    assert DIGEST not in store and not store.path(DIGEST).exists()
    assert indexer.generations_started == 1
