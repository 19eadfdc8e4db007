"""Interoperability with stock BitTorrent clients, in open mode, over opentracker.

Our engine downloads from a libtorrent seeder; libtorrent and aria2c download from our
seeder. Torrents and data must match byte for byte.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from benchmarks._libtorrent import make_session
from daemons.testbed.opentracker import OpenTracker, opentracker_binary, run_opentracker
from daemons.testbed.registry import free_port
from p2pimage.metainfo.torrent import Metainfo, create_metainfo_from_file
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import open_peer_node
from p2pimage.tracker.client import AnnounceSettings, TrackerClient, run_announcer

from .test_transfer import make_blob, sha256_file

lt = pytest.importorskip("libtorrent", reason="libtorrent (pip libtorrent) is not installed")

MIB = 1024 * 1024
FAST = AnnounceSettings(hungry_interval_s=0.5)

pytestmark = pytest.mark.skipif(
    opentracker_binary() is None, reason="opentracker (Debian package opentracker) not installed"
)


def lt_session() -> Any:
    """A TCP-only libtorrent session on loopback (the benchmarks' settings)."""
    return make_session()


def lt_add(ses: object, meta: Metainfo, save: Path, tracker: str, *, seed: bool) -> object:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(lt.bdecode(meta.to_bytes()))
    params.save_path = str(save)
    params.trackers = [tracker]
    if seed:
        params.flags |= lt.torrent_flags.seed_mode
    return ses.add_torrent(params)  # type: ignore[attr-defined]


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, Metainfo]:
    return make_blob(tmp_path, 8 * MIB, name="layer.bin")


@pytest.fixture
def tracker(blob: tuple[Path, Metainfo]) -> Iterator[OpenTracker]:
    with run_opentracker([blob[1].info_hash]) as t:
        yield t


async def _seed_and_wait(meta: Metainfo, blob: Path, tracker: OpenTracker, done: trio.Event) -> int:
    """Our open-mode seeder, announced to opentracker until ``done``; returns bytes sent."""
    async with (
        open_peer_node(authenticator=None, open_mode=True) as node,
        httpx.AsyncClient() as http,
    ):
        swarm = await node.add_swarm(
            meta, blob.parent, storage=PieceStorage.open_complete(blob, meta)
        )
        client = TrackerClient(tracker.announce_url, http=http)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_announcer(swarm, client, settings=FAST))
            await done.wait()
            nursery.cancel_scope.cancel()
        return swarm.stats.uploaded


async def test_we_download_from_libtorrent(
    tmp_path: Path, blob: tuple[Path, Metainfo], tracker: OpenTracker
) -> None:
    path, meta = blob
    ses = lt_session()
    handle = lt_add(ses, meta, path.parent, tracker.announce_url, seed=True)
    async with (
        open_peer_node(authenticator=None, open_mode=True) as node,
        httpx.AsyncClient() as http,
    ):
        swarm = await node.add_swarm(meta, tmp_path / "ours")
        client = TrackerClient(tracker.announce_url, http=http)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_announcer(swarm, client, settings=FAST))
                await swarm.complete.wait()
                nursery.cancel_scope.cancel()
    assert swarm.stats.downloaded_from_peers == meta.length
    assert sha256_file(swarm.storage.path) == meta.sha256
    assert swarm.storage.path.read_bytes() == path.read_bytes()
    ses.remove_torrent(handle)  # type: ignore[attr-defined]


async def test_we_download_from_libtorrent_in_parts_of_our_large_blocks(tmp_path: Path) -> None:
    """With 256 KiB pieces our picker asks for whole pieces; libtorrent never offered
    large blocks (no p2pimage_block key), so each goes out as 16 KiB requests and the
    piece is put together from their answers."""
    path = tmp_path / "layer.bin"
    path.write_bytes(bytes(range(256)) * (4 * MIB // 256 + 3))  # 16 pieces, a short last one
    meta = create_metainfo_from_file(path, piece_length=256 * 1024)
    seen_parts = 0
    with run_opentracker([meta.info_hash]) as tracker:
        ses = lt_session()
        handle = lt_add(ses, meta, path.parent, tracker.announce_url, seed=True)
        async with (
            open_peer_node(authenticator=None, open_mode=True, download_rate=2 * MIB) as node,
            httpx.AsyncClient() as http,
        ):
            swarm = await node.add_swarm(meta, tmp_path / "ours")
            assert swarm.picker.block_size == 256 * 1024
            client = TrackerClient(tracker.announce_url, http=http)
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: run_announcer(swarm, client, settings=FAST))
                    while not swarm.complete.is_set():
                        for peer in swarm.peers.values():
                            assert peer.session.conn.peer_max_block_length == 16 * 1024
                            seen_parts = max(seen_parts, len(peer.parts))
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        ses.remove_torrent(handle)  # type: ignore[attr-defined]
    assert seen_parts > 0
    assert swarm.stats.downloaded_from_peers == meta.length
    assert swarm.storage.path.read_bytes() == path.read_bytes()


async def test_libtorrent_downloads_from_us(
    tmp_path: Path, blob: tuple[Path, Metainfo], tracker: OpenTracker
) -> None:
    path, meta = blob
    done = trio.Event()
    out = tmp_path / "lt"
    out.mkdir()

    async def leech() -> None:
        ses = lt_session()
        handle = lt_add(ses, meta, out, tracker.announce_url, seed=False)
        with trio.fail_after(60):
            while not handle.status().is_seeding:  # type: ignore[attr-defined]
                await trio.sleep(0.05)
        ses.remove_torrent(handle)  # type: ignore[attr-defined]
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leech)
        uploaded = await _seed_and_wait(meta, path, tracker, done)
    assert uploaded >= meta.length
    assert (out / "layer.bin").read_bytes() == path.read_bytes()


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c (Debian aria2) not installed")
async def test_aria2c_downloads_from_us(
    tmp_path: Path, blob: tuple[Path, Metainfo], tracker: OpenTracker
) -> None:
    path, meta = blob
    torrent = tmp_path / "layer.torrent"
    # aria2c finds the tracker in the torrent; the announce URL is outside the info dict,
    # so the info-hash is unchanged.
    with_tracker = dataclasses.replace(meta, announce=tracker.announce_url)
    assert with_tracker.info_hash == meta.info_hash
    torrent.write_bytes(with_tracker.to_bytes())
    out = tmp_path / "aria2"
    done = trio.Event()
    result: dict[str, object] = {}

    async def leech() -> None:
        proc = await trio.run_process(
            [
                "aria2c",
                "--seed-time=0",
                "--enable-dht=false",
                "--enable-dht6=false",
                "--bt-enable-lpd=false",
                "--enable-peer-exchange=false",
                f"--listen-port={free_port()}",
                "--bt-tracker-interval=1",
                "--file-allocation=none",
                "--check-integrity=true",
                "--console-log-level=warn",
                "--summary-interval=0",
                f"--dir={out}",
                str(torrent),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        result["rc"] = proc.returncode
        result["stderr"] = proc.stderr.decode(errors="replace")[-2000:]
        done.set()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leech)
            await _seed_and_wait(meta, path, tracker, done)
    assert result["rc"] == 0, result["stderr"]
    assert (out / "layer.bin").read_bytes() == path.read_bytes()
