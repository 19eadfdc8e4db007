"""Interop: stock libtorrent peers find each other through our tracker (open mode)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from benchmarks._libtorrent import make_session
from daemons.testbed.process import free_port
from daemons.tracker import TrackerSettings, run_tracker
from p2pimage.metainfo.bencoding import bdecode
from p2pimage.tracker import AnnounceRequest, parse_announce_response

lt = pytest.importorskip("libtorrent")

SIZE = 4 * 1024 * 1024 + 12345


def _session() -> Any:
    """A TCP-only libtorrent session on loopback (the benchmarks' settings)."""
    return make_session()


def _torrent(path: Path, announce: str) -> Any:
    fs = lt.file_storage()
    fs.add_file(path.name, path.stat().st_size)
    ct = lt.create_torrent(fs, 64 * 1024, flags=lt.create_torrent.v1_only)
    ct.add_tracker(announce)
    lt.set_piece_hashes(ct, str(path.parent))
    return lt.torrent_info(ct.generate())


def _pct(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


# libtorrent 2.x deprecates its Python torrent-creation helpers; they still work.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_libtorrent_downloads_via_our_tracker(tmp_path: Path) -> None:
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    blob = seed_dir / "layer.tar"
    blob.write_bytes(os.urandom(SIZE))
    settings = TrackerSettings(listen="127.0.0.1:0", open_mode=True, interval_s=2, min_interval_s=1)
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_tracker, settings)
        info = _torrent(blob, f"{base}/announce")
        seeder, leecher = _session(), _session()
        seed = seeder.add_torrent(
            {"ti": info, "save_path": str(seed_dir), "flags": lt.torrent_flags.seed_mode}
        )
        leech = leecher.add_torrent({"ti": lt.torrent_info(info), "save_path": str(leech_dir)})
        with trio.fail_after(60):
            while not leech.status().is_seeding:
                await trio.sleep(0.1)
        assert (leech_dir / "layer.tar").read_bytes() == blob.read_bytes()
        # The tracker knows both sessions by their real listen ports.
        ih = bytes.fromhex(str(info.info_hashes().v1))
        probe = AnnounceRequest(info_hash=ih, peer_id=b"-XX0001-" + b"p" * 12, port=1, left=1)
        async with httpx.AsyncClient() as http:
            got = await http.get(f"{base}/announce?{probe.to_query().decode()}")
            doc = bdecode((await http.get(f"{base}/scrape?info_hash={_pct(ih)}")).content)
        peers = set(parse_announce_response(got.content).peers)
        assert {("127.0.0.1", seeder.listen_port()), ("127.0.0.1", leecher.listen_port())} <= peers
        assert doc == {b"files": {ih: {b"complete": 2, b"downloaded": 1, b"incomplete": 1}}}
        # Closing a session sends "stopped" announces and waits for the answers: close
        # them off the event loop so the tracker (on this loop) can answer.
        sessions = [seeder, leecher]
        del seeder, leecher, seed, leech
        await trio.to_thread.run_sync(sessions.clear)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c (Debian package) not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_aria2c_downloads_from_libtorrent_via_our_tracker(tmp_path: Path) -> None:
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    blob = seed_dir / "layer.tar"
    blob.write_bytes(os.urandom(SIZE))
    settings = TrackerSettings(listen="127.0.0.1:0", open_mode=True, interval_s=2, min_interval_s=1)
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_tracker, settings)
        info = _torrent(blob, f"{base}/announce")
        torrent_file = tmp_path / "layer.torrent"
        torrent_file.write_bytes(lt.bencode(lt.create_torrent(info).generate()))
        seeder = _session()
        seeder.add_torrent(
            {"ti": info, "save_path": str(seed_dir), "flags": lt.torrent_flags.seed_mode}
        )
        port = free_port()
        with trio.fail_after(60):
            done = await trio.run_process(
                [
                    "aria2c",
                    "--dir",
                    str(leech_dir),
                    "--seed-time=0",
                    "--enable-dht=false",
                    "--enable-dht6=false",
                    "--bt-enable-lpd=false",
                    "--enable-peer-exchange=false",
                    f"--listen-port={port}",
                    "--bt-stop-timeout=50",
                    "--quiet=true",
                    "--summary-interval=0",
                    "--console-log-level=error",
                    str(torrent_file),
                ],
                check=False,
            )
        assert done.returncode == 0
        assert (leech_dir / "layer.tar").read_bytes() == blob.read_bytes()
        sessions = [seeder]
        del seeder
        await trio.to_thread.run_sync(sessions.clear)
        nursery.cancel_scope.cancel()
