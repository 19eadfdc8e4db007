"""The mirror's read paths at their cost discipline (issue #15 item 4): a cached blob read
without a thread hop when its pages are cached, and a whole read from the swarm that
leaves the whole-blob check to the store but holds its last chunk back until it passed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from p2pimage.auth.tokens import SigningKey, TokenIssuer
from p2pimage.errors import DigestMismatchError
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.mirror.blobs import CHUNK, LayerService, _in_page_cache
from p2pimage.oci.registry import RegistryClient
from p2pimage.sidecar.client import SidecarClient
from p2pimage.storage.cache import BlobCache, blob_key
from p2pimage.swarm.engine import Swarm
from p2pimage.tracker.client import TrackerClient

from .test_swarm import nodes

MIB = 1024 * 1024
# Never contacted: a read served from the cache or a live swarm reaches no registry,
# sidecar or tracker (a mistaken fallback fails on the closed port instead).
NOWHERE = "http://127.0.0.1:9"


def _service(
    tmp_path: Path, http: httpx.AsyncClient, node: object = None, registry: str = NOWHERE
) -> LayerService:
    """A service whose swarm registry is ``registry``; with ``node``, a sidecar and a
    tracker that must never be asked (the swarm is there already)."""
    return LayerService(
        registry=registry,
        node=node,  # type: ignore[arg-type]
        cache=BlobCache(tmp_path / "cache", 64 * MIB),
        http=http,
        sidecar=SidecarClient(NOWHERE, http=http) if node is not None else None,
        tracker=TrackerClient(NOWHERE, http=http) if node is not None else None,
    )


async def _read(layers: LayerService, digest: str, size: int, start: int, end: int) -> bytes:
    out = bytearray()
    async with aclosing(layers.read(NOWHERE, "team/app", digest, size, None, start, end)) as it:
        async for chunk in it:
            out += chunk
    return bytes(out)


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_a_cached_blob_reads_the_same_from_a_cold_and_a_warm_page_cache(
    tmp_path: Path,
) -> None:
    """A chunk whose pages are cached is read in the trio thread, one that would wait for
    the disk in a worker thread: both give the blob's bytes, whole and in ranges."""
    data = os.urandom(3 * CHUNK + 12_345)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with httpx.AsyncClient() as http:
        layers = _service(tmp_path, http)
        key = blob_key(layers.namespace, digest[7:])
        path = layers.cache.blob_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        layers.cache.scan()
        assert layers.cache.is_complete(key)
        ranges = [(0, len(data)), (1, 2), (CHUNK - 1, 2 * CHUNK + 1), (len(data) - 7, len(data))]
        for start, end in ranges:
            _drop_page_cache(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                assert not _in_page_cache(fd, start, end - start)  # the worker-thread read
                assert await _read(layers, digest, len(data), start, end) == data[start:end]
                assert _in_page_cache(fd, start, end - start)  # now the direct read
            finally:
                os.close(fd)
            assert await _read(layers, digest, len(data), start, end) == data[start:end]
        assert layers.stats.bytes_served["cache"] == 2 * sum(e - s for s, e in ranges)
        assert not layers.cache._pins  # every read let go of the blob


@asynccontextmanager
async def _swarm_reader(
    tmp_path: Path, meta: Metainfo, data: bytes
) -> AsyncIterator[tuple[LayerService, Swarm, bytearray, trio.Nursery]]:
    """A node with a swarm of ``meta`` holding every piece but the last, and a service
    whose whole read of the blob runs in the yielded nursery into the yielded buffer."""
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with httpx.AsyncClient() as http, nodes(1, issuer) as (node,):
        layers = _service(tmp_path, http, node)
        swarm = await node.add_swarm(meta, layers.cache.directory(layers.namespace))
        for index in range(meta.num_pieces - 1):
            offset = meta.piece_offset(index)
            swarm.storage.write_piece(index, data[offset : offset + meta.piece_size(index)])
        received = bytearray()

        async def whole_read() -> None:
            chunks = layers.read(NOWHERE, "team/app", meta.sha256, meta.length, None)
            async with aclosing(chunks):
                async for chunk in chunks:
                    received.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(whole_read)
            yield layers, swarm, received, nursery


def _last_piece(meta: Metainfo, data: bytes) -> tuple[int, bytes]:
    index = meta.num_pieces - 1
    return index, data[meta.piece_offset(index) :]


async def test_a_whole_read_from_the_swarm_ends_only_once_the_blob_verified(
    tmp_path: Path,
) -> None:
    """The mirror does not hash what the swarm serves (the store checks it): the last
    chunk of a whole read waits for the store's whole-blob check, then goes out."""
    data = os.urandom(3 * MIB + MIB // 2)
    (tmp_path / "blob").write_bytes(data)
    meta = create_metainfo_from_file(tmp_path / "blob", piece_length=256 * 1024)
    async with _swarm_reader(tmp_path, meta, data) as (layers, swarm, received, _):
        index, last = _last_piece(meta, data)
        with trio.fail_after(10):
            while len(received) < len(data) - len(last):
                await trio.sleep(0.01)
        swarm.storage.write_piece(index, last)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(received) == data[: len(data) - len(last)]  # held: not verified yet
        await swarm.finalize_if_done()
        assert swarm.complete.is_set()
    assert bytes(received) == data
    assert layers.stats.bytes_served["swarm"] == len(data)
    assert layers.stats.pulls["swarm"] == 1 and layers.stats.pulls["digest_mismatch"] == 0


async def test_a_whole_read_from_a_swarm_whose_blob_fails_its_digest_never_completes(
    tmp_path: Path,
) -> None:
    """Every piece matches the torrent but the blob is not the layer: the client never
    gets the last chunk (a short body it will not accept), and no registry byte is
    mixed in (the registry here is a closed port: a fallback would fail otherwise)."""
    data = os.urandom(3 * MIB + MIB // 2)
    (tmp_path / "blob").write_bytes(data)
    good = create_metainfo_from_file(tmp_path / "blob", piece_length=256 * 1024)
    meta = Metainfo(good.name, good.length, good.piece_length, good.pieces, "sha256:" + "0" * 64)
    with pytest.raises(BaseExceptionGroup) as caught:
        async with _swarm_reader(tmp_path, meta, data) as (layers, swarm, received, _):
            index, last = _last_piece(meta, data)
            with trio.fail_after(10):
                while len(received) < len(data) - len(last):
                    await trio.sleep(0.01)
            swarm.storage.write_piece(index, last)
            with pytest.raises(DigestMismatchError):
                await swarm.finalize_if_done()
    assert caught.group_contains(DigestMismatchError, match="not verified against its digest")
    assert bytes(received) == data[: len(data) - len(last)]
    assert layers.stats.pulls["digest_mismatch"] == 1
    assert layers.stats.bytes_served["registry"] == 0


async def test_a_whole_read_from_the_registry_stops_before_the_last_chunk_of_wrong_bytes(
    tmp_path: Path, registry: Any
) -> None:
    """A whole blob read from the registry is hashed on the way, and the check comes
    before its last chunk goes out: bytes that are not the digest (a corrupted registry
    store here) never reach the client whole."""
    data = os.urandom(2 * CHUNK + 1000)
    async with httpx.AsyncClient(timeout=10) as http:
        async with RegistryClient(registry.url) as client:
            digest = await client.push_blob("team/app", data)
        stored = registry.blob_path(digest)
        stored.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        layers = _service(tmp_path, http, registry=registry.url)  # no node: a direct read
        received = bytearray()
        chunks = layers.read(registry.url, "team/app", digest, len(data), None)
        with pytest.raises(DigestMismatchError):
            async with aclosing(chunks):
                async for chunk in chunks:
                    received += chunk
    assert bytes(received) == data[: 2 * CHUNK]
    assert layers.stats.pulls["digest_mismatch"] == 1
