"""The node's layer cache: quota, LRU order (kept across a restart), pins; and end to end,
a node whose cache cannot hold a layer still serves it, and a full cache evicts the least
recently used blob the swarm has released."""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import pytest
import trio

from daemons.testbed.localcluster import local_cluster
from daemons.tracker import TrackerSettings, run_tracker
from p2pimage.errors import LocalProtocolError
from p2pimage.metainfo.torrent import MIN_PIECE_LENGTH, MetainfoBuilder
from p2pimage.oci.image import build_image
from p2pimage.storage.cache import BlobCache, blob_key, registry_namespace
from p2pimage.storage.layout import BlobFiles, parse_blob_file_name
from p2pimage.storage.pieces import PieceStorage
from tests.test_node_restart import node_settings, pull_blob, push, start_node

MIB = 1024 * 1024
T0 = time.time() - 10_000  # a past "now": LRU times are mtimes, and mtimes must be sane

requires_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


def hexof(name: str) -> str:
    return (name * 64)[:64]


A, B, C, D = (hexof(c) for c in "abcd")


def put_complete(cache: BlobCache, hex_: str, size: int, now: float) -> None:
    """A blob as a finished download leaves it: reserved, written, marked complete."""
    assert cache.reserve(hex_, size, now)
    cache.blob_path(hex_).write_bytes(b"x" * size)
    cache.mark_complete(hex_, size, now)
    cache.touch(hex_, now)  # the file's mtime carries its recency


def on_disk(cache: BlobCache) -> set[str]:
    return {p.name for p in cache.root.iterdir()}


# --- unit -------------------------------------------------------------------------------


def test_blobs_are_keyed_by_registry_and_digest(tmp_path: Path) -> None:
    """The same digest from two registries is two entries; a restart finds each under
    its registry; a blob a former version left at the top level (digest alone) is
    counted and evictable, but no registry's key finds it."""
    mine = registry_namespace("http://127.0.0.1:5000")
    theirs = registry_namespace("https://attacker.example")
    assert mine != theirs and mine == registry_namespace("http://127.0.0.1:5000/")
    assert mine.startswith("http_127.0.0.1_5000-")
    assert registry_namespace("https://127.0.0.1:5000") != mine  # the scheme counts
    for bad in (("../x", A), (mine, "../" + A), (mine, A.upper()), ("", A)):
        with pytest.raises(LocalProtocolError):
            blob_key(*bad)
    cache = BlobCache(tmp_path, 10_000)
    cache.directory(mine).mkdir()
    put_complete(cache, blob_key(mine, A), 300, T0)
    put_complete(cache, A, 200, T0 - 1)  # the legacy layout: <root>/<hex>
    assert cache.is_complete(blob_key(mine, A))
    assert not cache.is_complete(blob_key(theirs, A))
    assert (tmp_path / mine / A).is_file()
    restarted = BlobCache(tmp_path, 10_000)
    assert restarted.is_complete(blob_key(mine, A)) and not restarted.is_complete(
        blob_key(theirs, A)
    )
    assert restarted.used_bytes == 500
    restarted.quota_bytes = 400  # the legacy blob is the least recently used: it goes
    assert restarted.reserve(blob_key(mine, B), 100, T0 + 1)
    assert restarted.entry(A) is None and not (tmp_path / A).exists()
    assert restarted.is_complete(blob_key(mine, A))


def test_torrents_are_kept_per_registry(tmp_path: Path) -> None:
    import hashlib

    from p2pimage.metainfo.torrent import MetainfoBuilder

    data = b"layer bytes" * 1000
    hex_ = hashlib.sha256(data).hexdigest()
    builder = MetainfoBuilder(len(data), hex_)
    builder.update(data)
    meta = builder.finish()
    mine, theirs = registry_namespace("http://a:5000"), registry_namespace("http://b:5000")
    cache = BlobCache(tmp_path, 1 << 20)
    cache.save_torrent(meta, mine)
    cache.directory(theirs).mkdir()
    put_complete(cache, blob_key(mine, hex_), len(data), T0)
    put_complete(cache, blob_key(theirs, hex_), len(data), T0)  # no torrent kept there
    assert [m.info_hash for m in cache.complete_with_torrents(mine)] == [meta.info_hash]
    assert cache.complete_with_torrents(theirs) == []


def test_quota_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(LocalProtocolError):
        BlobCache(tmp_path, 0)


def test_quota_is_respected(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    assert not cache.reserve(A, 1001, T0)  # never fits: refused, nothing recorded
    assert cache.entry(A) is None
    for i, hex_ in enumerate((A, B, C, D)):
        put_complete(cache, hex_, 300, T0 + i)
        assert cache.used_bytes <= cache.quota_bytes
    assert cache.used_bytes == 900  # D took A's place: three of 300 fit in 1000
    assert cache.entry(A) is None and cache.evictions == 1
    assert on_disk(cache) == {B, C, D}


def test_reserving_again_does_not_count_twice(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    assert cache.reserve(A, 600, T0)
    assert cache.reserve(A, 600, T0 + 1)  # a second pull of the same blob
    assert cache.used_bytes == 600
    assert cache.reserve(B, 600, T0 + 2)  # A, not pinned, makes room
    assert cache.entry(A) is None and cache.used_bytes == 600


def test_lru_order_and_touch(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    put_complete(cache, A, 300, T0)
    put_complete(cache, B, 300, T0 + 1)
    put_complete(cache, C, 300, T0 + 2)
    cache.touch(A, T0 + 3)  # A served again: B is now the least recently used
    assert cache.reserve(D, 300, T0 + 4)
    assert cache.entry(B) is None and B not in on_disk(cache)
    assert all(cache.entry(h) is not None for h in (A, C, D))
    assert cache.evictions == 1


def test_lru_order_survives_a_restart(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    put_complete(cache, A, 300, T0)
    put_complete(cache, B, 300, T0 + 1)
    put_complete(cache, C, 300, T0 + 2)
    cache.touch(A, T0 + 3)
    del cache
    restarted = BlobCache(tmp_path, 1000)  # the index is rebuilt from the directory
    assert restarted.used_bytes == 900
    assert all(restarted.is_complete(h) for h in (A, B, C))
    assert restarted.reserve(D, 300, T0 + 4)
    assert restarted.entry(B) is None and B not in on_disk(restarted)
    assert restarted.entry(A) is not None and restarted.entry(C) is not None


def test_partial_blobs_count_and_are_evictable(tmp_path: Path) -> None:
    (tmp_path / f"{A}.partial").write_bytes(b"\0" * 400)
    (tmp_path / f"{A}.state").write_bytes(b"d")
    (tmp_path / f"{A}.torrent").write_bytes(b"d")
    cache = BlobCache(tmp_path, 1000)
    entry = cache.entry(A)
    assert entry is not None and not entry.complete and entry.size == 400
    assert not cache.is_complete(A)
    assert cache.reserve(B, 700, T0 + 10**6)  # evicts the partial A with all its files
    assert on_disk(cache) == set()


def test_pinned_blob_is_never_evicted(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    put_complete(cache, A, 300, T0)  # oldest, but pinned (being served)
    put_complete(cache, B, 300, T0 + 1)
    put_complete(cache, C, 300, T0 + 2)
    cache.pin(A)
    assert cache.reserve(D, 300, T0 + 3)
    assert cache.entry(A) is not None and A in on_disk(cache)
    assert cache.entry(B) is None
    # Pins count: two pins need two unpins.
    cache.pin(A)
    cache.unpin(A)
    assert cache.is_pinned(A)
    cache.unpin(A)
    assert not cache.is_pinned(A)


def test_reserve_refuses_when_only_pinned_blobs_could_make_room(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    put_complete(cache, A, 400, T0)
    put_complete(cache, B, 400, T0 + 1)
    put_complete(cache, C, 100, T0 + 2)
    cache.pin(A)
    cache.pin(B)
    # 500 needed: C's 100 is all an eviction could free. Refuse, and evict nothing.
    assert not cache.reserve(D, 500, T0 + 3)
    assert cache.evictions == 0
    assert on_disk(cache) == {A, B, C}
    assert cache.entry(D) is None
    cache.unpin(B)
    assert cache.reserve(D, 500, T0 + 4)  # B is free to go now
    assert cache.entry(B) is None and cache.entry(A) is not None


def test_evicting_a_pinned_blob_raises(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1000)
    put_complete(cache, A, 300, T0)
    cache.pin(A)
    with pytest.raises(LocalProtocolError):
        cache.evict(A)
    assert cache.is_complete(A) and A in on_disk(cache)


def test_scan_ignores_foreign_files(tmp_path: Path) -> None:
    foreign = {
        "notes.txt": 5000,
        "ABC" + A[3:]: 5000,  # upper case: not one of ours
        A[:63]: 5000,  # 63 hex digits
        f"{A}.tmp": 5000,
        f"{A}.torrent.tmp": 5000,
        f"{B}.partial.old": 5000,
    }
    for name, size in foreign.items():
        (tmp_path / name).write_bytes(b"y" * size)
    (tmp_path / "subdir").mkdir()
    (tmp_path / C).write_bytes(b"z" * 100)
    cache = BlobCache(tmp_path, 1000)
    assert cache.used_bytes == 100
    assert cache.entry(A) is None and cache.entry(B) is None
    assert cache.is_complete(C)
    cache.evict(C)
    assert on_disk(cache) == {*foreign, "subdir"}  # evicting ours leaves theirs alone


# --- end to end ---------------------------------------------------------------------------


@requires_registry
async def test_layer_larger_than_the_quota_is_served_from_the_registry(tmp_path: Path) -> None:
    image = build_image([4 * MIB], seed=31)
    layer = image.layers[0]
    async with local_cluster(tmp_path, nodes=0) as cluster, trio.open_nursery() as nursery:
        await push(cluster, image)
        node = await start_node(nursery, node_settings(cluster, "small", cache_quota_bytes=1 * MIB))
        await node.wait_p2p()  # p2p is on: only the cache stands in the way
        with trio.fail_after(60):
            status, body = await pull_blob(node, cluster, layer.digest)
        assert status == 200 and body == layer.data
        stats = node.daemon.layers.stats
        assert stats.fallbacks == {"cache_full": 1}
        assert stats.bytes_served["registry"] == len(layer.data)
        assert stats.bytes_served["swarm"] == 0
        cache = node.daemon.layers.cache
        assert cache.used_bytes == 0 and not list(cache.root.iterdir())
        nursery.cancel_scope.cancel()


@requires_registry
async def test_full_cache_evicts_the_least_recently_used_released_layer(
    tmp_path: Path,
) -> None:
    image = build_image([3 * MIB, 3 * MIB, 3 * MIB], seed=32)
    first, second, third = image.layers
    size = max(len(layer.data) for layer in image.layers)
    quota = 2 * size + 256 * 1024  # two layers, not three
    async with local_cluster(tmp_path, nodes=0) as cluster, trio.open_nursery() as nursery:
        # A tracker that releases a seeder as soon as nobody needs it (the cluster's keeps
        # two seeders per swarm), so finished layers become unpinned and evictable.
        tracker_url = await nursery.start(
            functools.partial(
                run_tracker,
                TrackerSettings(
                    listen="127.0.0.1:0",
                    sidecar_url=cluster.sidecar_url,
                    registry_url=cluster.proxy.url,
                    interval_s=10,
                    min_interval_s=1,
                    fetcher_interval_s=1,
                    release_min_seeders=0,
                    log_json=True,
                ),
            )
        )
        await push(cluster, image)
        node = await start_node(
            nursery,
            node_settings(
                cluster,
                "node-q",
                tracker_url=f"{tracker_url}/announce",
                cache_quota_bytes=quota,
            ),
        )
        await node.wait_p2p()
        layers = node.daemon.layers
        cache = layers.cache

        async def pull_and_release(digest: str, expect: bytes) -> None:
            with trio.fail_after(60):
                status, body = await pull_blob(node, cluster, digest)
                assert status == 200 and body == expect
                key = blob_key(layers.namespace, digest.removeprefix("sha256:"))
                while not cache.is_complete(key) or cache.is_pinned(key):
                    await trio.sleep(0.05)  # complete, and the tracker released it

        await pull_and_release(first.digest, first.data)
        await pull_and_release(second.digest, second.data)
        # The first layer is read again (from the cache): now the second is the LRU one.
        status, body = await pull_blob(node, cluster, first.digest)
        assert status == 200 and body == first.data
        assert layers.stats.pulls["cache"] == 1
        await pull_and_release(third.digest, third.data)

        hexes = [blob_key(layers.namespace, x.digest.removeprefix("sha256:")) for x in image.layers]
        assert cache.evictions == 1
        assert cache.is_complete(hexes[0]) and cache.is_complete(hexes[2])
        assert cache.entry(hexes[1]) is None
        namespace_dir = cache.directory(layers.namespace)
        assert not any(p.name.startswith(hexes[1][-64:]) for p in namespace_dir.iterdir())
        assert cache.used_bytes <= quota
        assert not layers.stats.fallbacks  # every layer came through the swarm
        assert layers.stats.bytes_served["swarm"] == sum(len(x.data) for x in image.layers)
        nursery.cancel_scope.cancel()


def test_the_store_and_the_cache_share_one_layout(tmp_path: Path) -> None:
    """A blob the piece store is assembling (``.partial``, ``.state``) and its kept
    torrent are one cache entry of the partial's size; evicting it removes every file the
    store and the cache wrote, and nothing else."""
    data = bytes(range(256)) * 4 * 1024  # 1 MiB
    builder = MetainfoBuilder(len(data), "layer", MIN_PIECE_LENGTH)
    builder.update(data)
    meta = builder.finish()
    hex_ = meta.digest_hex
    namespace = registry_namespace("http://127.0.0.1:5000")
    key = blob_key(namespace, hex_)
    (tmp_path / "notes.txt").write_bytes(b"theirs")
    cache = BlobCache(tmp_path, 10 * MIB)
    with PieceStorage.open(cache.directory(namespace), meta) as store:
        store.write_piece(0, data[: meta.piece_size(0)])
    cache.save_torrent(meta, namespace)
    files = BlobFiles(tmp_path / namespace, hex_)
    assert cache.files(key) == files

    def every_file() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}

    assert every_file() == {
        f"{namespace}/{files.partial.name}",
        f"{namespace}/{files.state.name}",
        f"{namespace}/{files.torrent.name}",
        "notes.txt",
    }
    cache.scan()
    entry = cache.entry(key)
    assert entry is not None and not entry.complete and entry.size == meta.length
    cache.evict(key)
    assert every_file() == {"notes.txt"}


def test_blob_file_names() -> None:
    assert parse_blob_file_name(A) == (A, "blob")
    assert [parse_blob_file_name(p.name) for p in BlobFiles(Path("/x"), A).all()] == [
        (A, "blob"),
        (A, "partial"),
        (A, "state"),
        (A, "torrent"),
    ]
    for foreign in (f"{A}.state.tmp", f"{A}.torrent.tmp", A.upper(), A[:63], f"{A}.", "x"):
        assert parse_blob_file_name(foreign) is None
