"""A node announces all its swarms on one tracker in one batched request per interval
(docs/protocol.md §4.3), keeps each swarm's own answers and errors, and announces singly
to a tracker without the extension (opentracker)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest
import trio

from daemons.testbed.opentracker import opentracker_binary, run_opentracker
from daemons.tracker import TrackerSettings
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.node import PeerNode, open_peer_node
from p2pimage.tracker import AnnounceRequest, AnnounceResponse, Event
from p2pimage.tracker.client import AnnounceSettings, TrackerClient, TrackerError

from .test_tracker_daemon import issuer, jwks_file, pid, running, token
from .test_transfer import make_blob

__all__ = ["issuer", "jwks_file"]

# Announce at the tracker's interval, not faster while short of peers (each node here is
# alone in its swarms).
STEADY = AnnounceSettings(want_peers=0)


def _blobs(tmp_path: Path, n: int) -> list[tuple[Path, Metainfo]]:
    return [make_blob(tmp_path, 64 * 1024 + i, name=f"layer{i}") for i in range(n)]


async def _seed(node: PeerNode, blob: tuple[Path, Metainfo], client: TrackerClient) -> None:
    path, meta = blob
    storage = PieceStorage.open_complete(path, meta)
    await node.add_swarm(
        meta, path.parent, storage=storage, tracker=client, announce_settings=STEADY
    )


async def _metrics(http: httpx.AsyncClient, base: str) -> dict[str, float]:
    text = (await http.get(f"{base}/metrics")).text
    out: dict[str, float] = {}
    for name, labels, value in re.findall(
        r"^(p2pimage_tracker_announce(?:s|_batches)_total)\{result=\"(\w+)\"\} (\S+)$",
        text,
        re.M,
    ):
        out[f"{name}:{labels}"] = float(value)
    return out


async def test_a_nodes_swarms_announce_in_one_request_each_with_its_own_answer(
    tmp_path: Path, jwks_file: Path, issuer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Four swarms of one node start together: one request reaches the tracker (its
    metrics count one batch and four swarm announces); the swarm the token's scope does
    not cover gets its own refusal, the other three are announced."""
    blobs = _blobs(tmp_path, 4)
    covered = [meta.info_hash.hex() for _, meta in blobs[:3]]
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    caplog.set_level(logging.WARNING, logger="p2pimage.tracker.client")
    async with (
        running(settings) as base,
        httpx.AsyncClient() as http,
        open_peer_node(authenticator=None, open_mode=True, peer_id=pid(1)) as node,
    ):
        auth = token(issuer, "c", scope=covered)  # type: ignore[arg-type]
        client = TrackerClient(f"{base}/announce", http=http, auth=auth)
        with trio.fail_after(20):
            for blob in blobs:
                await _seed(node, blob, client)
            while client.requests_sent["batch"] == 0:
                await trio.sleep(0.01)
            await trio.sleep(0.2)
        assert client.requests_sent == {"single": 0, "batch": 1}
        metrics = await _metrics(http, base)
        assert metrics["p2pimage_tracker_announce_batches_total:ok"] == 1
        assert metrics["p2pimage_tracker_announces_total:ok"] == 3
        assert metrics["p2pimage_tracker_announces_total:forbidden"] == 1
        # Each covered swarm holds the node; the fourth swarm's announcer got its own error.
        other = TrackerClient(f"{base}/announce", http=http, auth=token(issuer, "c", "node-2"))
        for _, meta in blobs[:3]:
            req = AnnounceRequest(meta.info_hash, pid(2, "node-2"), 6002, left=5)
            seen = await other.announce(req)
            assert seen.complete == 1 and seen.peers == [node.listen_address]
        refused = [r for r in caplog.records if "out_of_scope" in r.getMessage()]
        assert [blobs[3][1].sha256[:19] in r.getMessage() for r in refused] == [True]


async def test_swarms_started_apart_fall_into_one_request_per_interval(
    tmp_path: Path,
) -> None:
    """Swarms that start at different moments are pulled forward into each other's
    batches (never before half their interval): after a few intervals the node sends
    one request per interval for all of them."""
    blobs = _blobs(tmp_path, 3)
    settings = TrackerSettings(listen="127.0.0.1:0", open_mode=True, interval_s=2, min_interval_s=1)
    async with (
        running(settings) as base,
        httpx.AsyncClient() as http,
        open_peer_node(authenticator=None, open_mode=True) as node,
    ):
        client = TrackerClient(f"{base}/announce", http=http)
        with trio.fail_after(30):
            for blob in blobs:
                await _seed(node, blob, client)
                await trio.sleep(0.7)
            await trio.sleep(4.0)  # two intervals to fall into step
            before = dict(client.requests_sent)
            await trio.sleep(6.1)  # three intervals
        sent = {k: client.requests_sent[k] - before[k] for k in before}
        # Nine swarm announces, in three batched requests (a fourth if the window
        # straddles one); never a single one.
        assert sent["single"] == 0 and 2 <= sent["batch"] <= 4, sent


async def test_one_swarms_cancelled_announce_leaves_the_others_answered(
    jwks_file: Path, issuer: object
) -> None:
    """The swarm that started a batch is cancelled while it collects: the others still
    get their answers (another of them sends the batch)."""
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        client = TrackerClient(
            f"{base}/announce", http=http, auth=token(issuer, "c"), batch_window_s=0.3
        )
        reqs = [
            AnnounceRequest(bytes([i]) * 20, pid(1), 6001, event=Event.STARTED) for i in range(1, 4)
        ]
        answers: dict[int, AnnounceResponse] = {}

        first = trio.CancelScope()

        async def one(i: int) -> None:
            with first if i == 0 else trio.CancelScope():
                answers[i] = await client.announce(reqs[i])

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                await trio.sleep(0.05)
                nursery.start_soon(one, 1)
                nursery.start_soon(one, 2)
                await trio.sleep(0.05)
                first.cancel()
        assert sorted(answers) == [1, 2]
        assert client.requests_sent == {"single": 0, "batch": 1}


@pytest.mark.skipif(opentracker_binary() is None, reason="opentracker is not installed")
async def test_a_stock_tracker_is_announced_to_singly() -> None:
    """opentracker has no batch endpoint: the first batch fails over to single
    announces, every swarm gets its answer, and later announces go out singly."""
    hashes = [bytes([i]) * 20 for i in range(1, 4)]
    reqs = [AnnounceRequest(h, b"-PI0001-" + bytes(12), 6001, left=5) for h in hashes]
    with run_opentracker(hashes) as ot:
        async with httpx.AsyncClient() as http:
            client = TrackerClient(ot.announce_url, http=http)
            answers: list[AnnounceResponse] = []

            async def one(req: AnnounceRequest) -> None:
                answers.append(await client.announce(req))

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for req in reqs:
                        nursery.start_soon(one, req)
                assert client.requests_sent == {"single": 3, "batch": 1}
                assert not client.batching
                assert [a.failure for a in answers] == [None] * 3
                async with trio.open_nursery() as nursery:
                    for req in reqs:
                        nursery.start_soon(one, req)
            assert client.requests_sent == {"single": 6, "batch": 1}
            assert all(a.interval > 0 for a in answers)


async def test_without_a_batch_window_every_announce_goes_alone(
    jwks_file: Path, issuer: object
) -> None:
    settings = TrackerSettings(listen="127.0.0.1:0", jwks_file=jwks_file)
    async with running(settings) as base, httpx.AsyncClient() as http:
        client = TrackerClient(
            f"{base}/announce", http=http, auth=token(issuer, "c"), batch_window_s=None
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(1, 4):
                    nursery.start_soon(
                        client.announce, AnnounceRequest(bytes([i]) * 20, pid(1), 6001)
                    )
        assert client.requests_sent == {"single": 3, "batch": 0}
        with pytest.raises(TrackerError):
            await client.announce(AnnounceRequest(b"\x01" * 20, pid(1, "node-9"), 6001))
