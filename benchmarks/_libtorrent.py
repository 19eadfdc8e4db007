"""libtorrent reference runs for side-by-side benchmarks (TCP only, uTP off).

libtorrent puts 127/8 peers in its unthrottled "local" peer class; ``session(...,
throttle_local=True)`` maps every address to the global class so rate limits apply.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt


def make_session(
    *, upload_rate: int = 0, download_rate: int = 0, throttle_local: bool = False
) -> Any:
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "allow_multiple_connections_per_ip": True,
        "upload_rate_limit": upload_rate,
        "download_rate_limit": download_rate,
        "alert_mask": 0,
        "announce_to_all_tiers": True,
        "stop_tracker_timeout": 1,
    }
    ses = lt.session(settings)
    if throttle_local:
        # Put every address into the global peer class so the rate limits apply on loopback.
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
        ses.set_peer_class_filter(f)
    return ses


def add(
    ses: Any, torrent: bytes, save_path: Path, *, seed: bool, trackers: list[str] | None = None
) -> Any:
    params = lt.add_torrent_params()
    if trackers:
        params.trackers = trackers
    params.ti = lt.torrent_info(lt.bdecode(torrent))
    params.save_path = str(save_path)
    if seed:
        params.flags |= lt.torrent_flags.seed_mode
    return ses.add_torrent(params)


@dataclass
class PairResult:
    seconds: float
    ok: bool
    # CPU of libtorrent's threads over the transfer (this process; the polling thread's
    # own time taken out): both sessions, seeder and leecher.
    cpu_s: float = 0.0


def pair_transfer(torrent: bytes, blob_path: Path, *, timeout: float = 300.0) -> PairResult:
    """libtorrent seeder → libtorrent leecher on loopback; time from connect to finished."""
    with tempfile.TemporaryDirectory(prefix="lt-pair-") as tmp:
        seeder = make_session()
        leecher = make_session()
        seed_handle = add(seeder, torrent, blob_path.parent, seed=True)
        info = lt.torrent_info(lt.bdecode(torrent))
        if info.files().file_path(0) != blob_path.name:
            raise ValueError("torrent name must match the blob's file name")
        leech_handle = add(leecher, torrent, Path(tmp), seed=False)
        while not seed_handle.status().is_seeding:
            time.sleep(0.01)
        port = seeder.listen_port()
        start = time.perf_counter()
        cpu0, poll0 = time.process_time(), time.thread_time()
        leech_handle.connect_peer(("127.0.0.1", port))
        deadline = start + timeout
        while True:
            st = leech_handle.status()
            if st.is_seeding or st.is_finished:
                break
            if time.perf_counter() > deadline:
                return PairResult(time.perf_counter() - start, False)
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
        cpu_s = (time.process_time() - cpu0) - (time.thread_time() - poll0)
        out = Path(tmp) / blob_path.name
        ok = out.exists() and os.path.getsize(out) == os.path.getsize(blob_path)
        seeder.remove_torrent(seed_handle)
        leecher.remove_torrent(leech_handle)
        del seeder, leecher
        return PairResult(elapsed, ok, cpu_s)
