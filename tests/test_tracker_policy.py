"""Tracker policy rules, each run against both state backends (memory and Redis)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.tracker import (
    AnnounceOutcome,
    AnnounceRequest,
    Event,
    MemoryState,
    PeerIdTakenError,
    PolicyConfig,
    SwarmKey,
    SwarmRecord,
    TrackerPolicy,
    TrackerState,
    origin_blob_url,
    pack_peer,
)
from p2pimage.tracker._policy import _pick, _pick_without, _sample
from p2pimage.tracker._state import swarm_from_json, swarm_to_json
from tests._tracker_fixtures import redis_port, state

__all__ = ["redis_port", "state"]

IH = bytes(range(20))
REGISTRY = "http://registry.test:5000"
DIGEST = "sha256:" + "ab" * 32
SIZE = 1000


def pid(n: int) -> bytes:
    return b"-PI0001-" + n.to_bytes(12, "big")


def addr(n: int) -> tuple[str, int]:
    return (f"10.0.{n // 250}.{n % 250 + 1}", 6000 + n)


@dataclass
class Harness:
    state: TrackerState
    policy: TrackerPolicy

    async def announce(
        self,
        n: int,
        now: float,
        *,
        left: int = SIZE,
        event: Event = Event.NONE,
        cluster: str = "c1",
        info_hash: bytes = IH,
        zone: str | None = None,
        numwant: int = 50,
        pieces: int | None = None,
        origin_next: int | None = None,
        registry: str | None = REGISTRY,
        subject: str | None = None,
        uploaded: int = 0,
        peer_id: bytes | None = None,
    ) -> AnnounceOutcome:
        host, port = addr(n)
        req = AnnounceRequest(
            info_hash=info_hash,
            peer_id=peer_id or pid(n),
            port=port,
            uploaded=uploaded,
            left=left,
            event=event,
            numwant=numwant,
            pieces=pieces,
            digest=DIGEST if pieces else None,
            repo="library/app" if pieces else None,
            origin_next=origin_next,
        )

        def decide(swarm: SwarmRecord) -> AnnounceOutcome:
            return self.policy.announce(
                swarm, req, host=host, now=now, zone=zone, registry_url=registry, subject=subject
            )

        return await self.state.update(SwarmKey(cluster, info_hash), decide)

    async def swarm(self, cluster: str = "c1", info_hash: bytes = IH) -> SwarmRecord | None:
        return (await self.state.read([SwarmKey(cluster, info_hash)]))[0]


def harness(state: TrackerState, **config: object) -> Harness:
    config.setdefault("origin_lease_pieces", 0)  # leases have their own tests below
    return Harness(state, TrackerPolicy(PolicyConfig(**config), rng=random.Random(7)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- membership


async def test_clusters_are_separate_swarms(state: TrackerState) -> None:
    h = harness(state)
    for n in range(3):
        await h.announce(n, 0, cluster="a")
    for n in range(3, 6):
        await h.announce(n, 0, cluster="b")
    got_a = await h.announce(0, 1, cluster="a")
    got_b = await h.announce(3, 1, cluster="b")
    assert set(got_a.peers) == {addr(1), addr(2)}
    assert set(got_b.peers) == {addr(4), addr(5)}
    assert (got_a.incomplete, got_b.incomplete) == (3, 3)


async def test_never_the_asker_and_numwant(state: TrackerState) -> None:
    h = harness(state)
    for n in range(30):
        await h.announce(n, 0)
    out = await h.announce(5, 1, numwant=10)
    assert len(out.peers) == 10 and addr(5) not in out.peers
    assert len(set(out.peers)) == 10
    assert (await h.announce(5, 1, numwant=0)).peers == []
    everyone = await h.announce(5, 1, numwant=200)
    assert set(everyone.peers) == {addr(n) for n in range(30) if n != 5}


async def test_silent_peers_expire(state: TrackerState) -> None:
    h = harness(state, peer_timeout_s=60.0)
    await h.announce(1, 0)
    await h.announce(2, 30)
    out = await h.announce(3, 61)  # peer 1 silent for 61 s: gone; peer 2 (31 s) stays
    assert out.peers == [addr(2)]
    assert out.incomplete == 2


async def test_stopped_leaves_and_completed_counts(state: TrackerState) -> None:
    h = harness(state)
    await h.announce(1, 0)
    await h.announce(2, 0)
    out = await h.announce(1, 1, event=Event.STOPPED)
    assert out.peers == []
    assert (await h.announce(3, 2)).peers == [addr(2)]
    out = await h.announce(2, 3, left=0, event=Event.COMPLETED)
    assert (out.complete, out.incomplete) == (1, 1)
    swarm = await h.swarm()
    assert swarm is not None and swarm.downloads == 1
    stats = h.policy.scrape(swarm, 3)
    assert (stats.complete, stats.incomplete, stats.downloaded) == (1, 1, 1)


async def test_last_peer_stopping_removes_the_swarm(state: TrackerState) -> None:
    h = harness(state)
    await h.announce(1, 0)
    await h.announce(1, 1, event=Event.STOPPED)
    assert await h.swarm() is None


# ---------------------------------------------------------------------- peer selection


async def test_leechers_get_seeders_first_then_well_supplied(state: TrackerState) -> None:
    h = harness(state, release_min_seeders=100)
    for n in range(5):
        await h.announce(n, 0, left=0)  # seeders
    for n in range(5, 10):
        await h.announce(n, 0, left=100)  # well supplied (10% left)
    for n in range(10, 40):
        await h.announce(n, 0, left=SIZE)  # just started
    out = await h.announce(40, 1, numwant=12)
    assert set(out.peers[:5]) == {addr(n) for n in range(5)}
    assert set(out.peers[5:10]) == {addr(n) for n in range(5, 10)}
    assert all(p in {addr(n) for n in range(10, 40)} for p in out.peers[10:])


async def test_seeders_get_leechers_only(state: TrackerState) -> None:
    h = harness(state, release_min_seeders=100)
    for n in range(5):
        await h.announce(n, 0, left=0)
    for n in range(5, 8):
        await h.announce(n, 0)
    out = await h.announce(0, 1, left=0)
    assert set(out.peers) == {addr(5), addr(6), addr(7)}


async def test_selection_is_random_within_a_tier(state: TrackerState) -> None:
    h = harness(state)
    for n in range(60):
        await h.announce(n, 0)
    seen: set[tuple[str, int]] = set()
    for t in range(10):
        seen |= set((await h.announce(60, 1 + t, numwant=5)).peers)
    assert len(seen) > 20  # not always the same five


@pytest.mark.parametrize("numwant", [3, 8, 9])
def test_selection_in_the_askers_own_tier_is_uniform_and_never_the_asker(numwant: int) -> None:
    """The asker's own tier is sampled without copying it: a sample one larger with the
    asker dropped (numwant 3), or the whole tier but the asker (8 and 9 of 9 others).
    Every other peer must still be equally likely."""
    policy = TrackerPolicy(rng=random.Random(5))
    swarm = SwarmRecord()

    def announce(n: int, now: float) -> list[tuple[str, int]]:
        host, port = addr(n)
        req = AnnounceRequest(info_hash=IH, peer_id=pid(n), port=port, left=500, numwant=numwant)
        return policy.announce(swarm, req, host=host, now=now).peers

    for n in range(10):  # ten leechers, one tier
        announce(n, 0.0)
    counts = dict.fromkeys((addr(n) for n in range(1, 10)), 0)
    rounds = 3_000
    for t in range(rounds):
        peers = announce(0, 1.0 + t * 1e-3)
        assert addr(0) not in peers and len(set(peers)) == len(peers) == min(numwant, 9)
        for p in peers:
            counts[p] += 1
    expected = rounds * min(numwant, 9) / 9
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts


def test_sample_draws_distinct_entries_uniformly() -> None:
    rng = random.Random(11)
    group = [(bytes([i]) * 20, ("10.0.0.1", 1000 + i), None) for i in range(7)]
    seen = dict.fromkeys(range(7), 0)
    for _ in range(7_000):
        picked = _sample(rng, group, 3)
        assert len(picked) == 3 and len(set(picked)) == 3
        for entry in picked:
            seen[entry[1][1] - 1000] += 1
    assert group == [(bytes([i]) * 20, ("10.0.0.1", 1000 + i), None) for i in range(7)]
    assert all(2_700 < c < 3_300 for c in seen.values()), seen  # 3,000 each expected


@pytest.mark.parametrize("size", [9, 400])  # filtered and shuffled; indices drawn
def test_pick_draws_distinct_entries_uniformly_never_a_skipped_one(size: int) -> None:
    """Selection samples the shared tier lists in place: uniform among the entries not
    skipped, distinct, the list unchanged, in both of ``_pick``'s ways."""
    rng = random.Random(5)
    group = [(i.to_bytes(20, "big"), ("10.0.0.1", 1000 + i), None) for i in range(size)]
    before = list(group)
    skip = {group[0][0], group[size // 2][0]}
    seen = dict.fromkeys(range(size), 0)
    rounds = 300 * size // 3
    for _ in range(rounds):
        picked = _pick(rng, group, 3, set(skip))
        assert len(picked) == 3 and len({e[0] for e in picked}) == 3
        for entry in picked:
            seen[entry[1][1] - 1000] += 1
    assert group == before
    assert seen[0] == seen[size // 2] == 0
    expected = rounds * 3 / (size - 2)
    assert all(
        0.8 * expected < c < 1.2 * expected for i, c in seen.items() if i not in (0, size // 2)
    ), seen
    # Fewer entries than asked: every one not skipped.
    assert sorted(_pick(rng, group[:4], 10, {group[0][0]})) == sorted(group[1:4])


@pytest.mark.parametrize("size", [9, 400])  # a shuffled copy; indices drawn
@pytest.mark.parametrize("where", ["first", "middle", "last", "stale"])
def test_pick_without_leaves_out_the_asker_and_draws_the_rest_uniformly(
    size: int, where: str
) -> None:
    """The asker's own tier is sampled without it, by the index the view keeps (or, when
    that index does not hold the asker, by its peer id): never the asker, distinct,
    uniform over the others, the shared list unchanged."""
    rng = random.Random(7)
    group = [(i.to_bytes(20, "big"), ("10.0.0.1", 1000 + i), None) for i in range(size)]
    before = list(group)
    asker = {"first": 0, "middle": size // 2, "last": size - 1, "stale": 3}[where]
    index = size - 2 if where == "stale" else asker
    seen = dict.fromkeys(range(size), 0)
    rounds = 300 * size // 3
    for _ in range(rounds):
        picked = _pick_without(rng, group, 3, index, group[asker][0])
        assert len(picked) == 3 and len({e[0] for e in picked}) == 3
        for entry in picked:
            seen[entry[1][1] - 1000] += 1
    assert group == before
    assert seen[asker] == 0
    expected = rounds * 3 / (size - 1)
    assert all(0.8 * expected < c < 1.2 * expected for i, c in seen.items() if i != asker), seen
    # As many entries as asked, or fewer: every one but the asker's.
    small = group[:4]
    assert sorted(_pick_without(rng, small, 3, 1, small[1][0])) == sorted([small[0], *small[2:]])
    assert sorted(_sample(rng, small, 3, 3)) == small[:3]


async def test_same_zone_preferred(state: TrackerState) -> None:
    h = harness(state)
    for n in range(40):
        await h.announce(n, 0, zone="a" if n % 2 else "b")
    out = await h.announce(100, 1, zone="a", numwant=8)
    zone_a = {addr(n) for n in range(40) if n % 2}
    same = [p for p in out.peers if p in zone_a]
    assert len(out.peers) == 8 and len(same) == 6  # zone_share 0.75 of 8
    # Too few same-zone peers: the rest come from other zones.
    out = await h.announce(101, 1, zone="c", numwant=8)
    assert len(out.peers) == 8


# ---------------------------------------------------------------------- release orders


async def test_surplus_seeders_released_least_needed_first(state: TrackerState) -> None:
    # keep = max(2, ceil(0.25 * 8 leechers)) = 2 seeders; 6 finished -> 4 surplus.
    h = harness(state, release_min_seeders=2, release_seeder_ratio=0.25)
    for n in range(8):
        await h.announce(n, 0, zone="a")  # leechers, all in zone a
    # Seeders 100..102 in zone b (no leechers there), 103..105 in zone a.
    for i, n in enumerate(range(100, 106)):
        await h.announce(n, 1 + i, left=0, zone="b" if n < 103 else "a")
    released = set()
    for n in range(100, 106):
        out = await h.announce(n, 10, left=0, zone="b" if n < 103 else "a")
        if out.release:
            released.add(n)
            assert out.peers == []
    assert len(released) == 4
    assert {100, 101, 102} <= released  # zone b's seeders serve no one nearby
    # Released peers are not handed out any more.
    out = await h.announce(0, 11, zone="a", numwant=200)
    assert not {addr(n) for n in released} & set(out.peers)
    # A released peer that announces again is told again.
    assert (await h.announce(100, 12, left=0, zone="b")).release


async def test_no_release_while_seeders_are_needed(state: TrackerState) -> None:
    h = harness(state, release_min_seeders=2, release_seeder_ratio=0.5)
    for n in range(10):
        await h.announce(n, 0)
    for n in range(100, 105):  # 5 seeders, keep = max(2, ceil(0.5 * 10)) = 5
        await h.announce(n, 1, left=0)
    for n in range(100, 105):
        assert not (await h.announce(n, 2, left=0)).release


async def test_linger_then_release_all(state: TrackerState) -> None:
    h = harness(state, release_min_seeders=5, linger_s=100.0, peer_timeout_s=1000.0)
    await h.announce(1, 0)
    await h.announce(2, 0)
    await h.announce(1, 10, left=0, event=Event.COMPLETED)
    await h.announce(2, 20, left=0, event=Event.COMPLETED)  # last leecher seen at 20
    assert not (await h.announce(1, 100, left=0)).release
    assert not (await h.announce(2, 119, left=0)).release
    assert (await h.announce(1, 121, left=0)).release
    assert (await h.announce(2, 122, left=0)).release


async def test_new_leecher_resets_linger(state: TrackerState) -> None:
    h = harness(state, release_min_seeders=5, linger_s=100.0, peer_timeout_s=1000.0)
    await h.announce(1, 0, left=0)
    await h.announce(2, 90)  # a leecher arrives
    await h.announce(2, 95, left=0, event=Event.COMPLETED)
    assert not (await h.announce(1, 150, left=0)).release
    assert (await h.announce(1, 196, left=0)).release


# ---------------------------------------------------------------------- origin fetchers


def _ranges(swarm: SwarmRecord) -> list[tuple[int, int]]:
    return sorted([(f.next, f.end) for f in swarm.fetchers.values()] + swarm.unassigned)


def _assert_cover(swarm: SwarmRecord, first: int, end: int) -> None:
    ranges = _ranges(swarm)
    pos = first
    for a, b in ranges:
        assert a == pos and b > a, ranges
        pos = b
    assert pos == end, ranges


async def test_first_fetcher_gets_the_whole_layer(state: TrackerState) -> None:
    h = harness(state)
    out = await h.announce(1, 0, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (0, 100)
    assert out.origin.url == f"{REGISTRY}/v2/library/app/blobs/{DIGEST}"
    assert out.interval == h.policy.config.fetcher_interval_s
    # It keeps its assignment on later announces; others are not fetchers (k = 1).
    assert (await h.announce(1, 1, pieces=100)).origin == out.origin
    assert (await h.announce(2, 1, pieces=100)).origin is None


async def test_fetchers_grow_with_the_swarm_and_split_disjointly(state: TrackerState) -> None:
    h = harness(state, origin_ratio=0.1, max_origin_fetchers=4)
    ranges = []
    for n in range(60):
        out = await h.announce(n, 0, pieces=1000)
        if out.origin is not None:
            ranges.append((n, out.origin.first_piece, out.origin.end_piece))
    # k = ceil(0.1 * size): fetchers join at sizes 1, 11, 21, 31; the cap is 4.
    assert [n for n, _, _ in ranges] == [0, 10, 20, 30]
    assert ranges[1][1:] == (500, 1000)  # half of the first fetcher's [0, 1000)
    swarm = await h.swarm()
    assert swarm is not None and len(swarm.fetchers) == 4
    _assert_cover(swarm, 0, 1000)
    # The first fetcher learns its shrunken range on its next announce.
    again = await h.announce(0, 1, pieces=1000)
    assert again.origin is not None and again.origin.end_piece == 250


async def test_progress_then_work_stealing_takes_the_largest_remainder(
    state: TrackerState,
) -> None:
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=3)
    await h.announce(0, 0, pieces=100)  # [0, 100)
    await h.announce(0, 1, pieces=100, origin_next=80)  # fetched 0..79
    out = await h.announce(1, 2, pieces=100)  # k = ceil(0.5 * 2) = 1: no
    assert out.origin is None
    out = await h.announce(2, 3, pieces=100)  # k = 2: steals half of [80, 100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (90, 100)
    swarm = await h.swarm()
    assert swarm is not None
    _assert_cover(swarm, 80, 100)


async def test_finished_range_frees_the_fetcher_for_more_work(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=2)
    await h.announce(0, 0, pieces=10)
    out = await h.announce(1, 0, pieces=10)
    assert out.origin is not None and (out.origin.first_piece, out.origin.end_piece) == (5, 10)
    # Fetcher 1 is done with [5, 10): it takes half of fetcher 0's remainder [0, 5).
    out = await h.announce(1, 1, pieces=10, origin_next=10)
    assert out.origin is not None and (out.origin.first_piece, out.origin.end_piece) == (3, 5)


async def test_leaving_fetcher_range_is_reassigned(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=2)
    await h.announce(0, 0, pieces=100)
    await h.announce(1, 0, pieces=100)  # steals [50, 100)
    await h.announce(1, 1, pieces=100, origin_next=60)
    await h.announce(1, 2, event=Event.STOPPED)
    out = await h.announce(2, 3, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (60, 100)


async def test_expired_fetcher_range_is_reassigned(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=1, peer_timeout_s=30.0)
    await h.announce(0, 0, pieces=100)
    await h.announce(0, 5, pieces=100, origin_next=40)
    await h.announce(1, 6, pieces=100)
    out = await h.announce(1, 36, pieces=100)  # peer 0 silent for 31 s
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (40, 100)


async def test_stalled_fetcher_loses_its_range(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=1, origin_stall_s=20.0)
    await h.announce(0, 0, pieces=100)
    await h.announce(1, 0, pieces=100)
    # Peer 0 keeps announcing but reports no progress beyond 10.
    await h.announce(0, 5, pieces=100, origin_next=10)
    await h.announce(0, 15, pieces=100, origin_next=10)
    assert (await h.announce(1, 20, pieces=100)).origin is None  # 15 s: not stalled yet
    assert (await h.announce(1, 25, pieces=100)).origin is None  # exactly 20 s: not yet
    stalled = await h.announce(0, 26, pieces=100, origin_next=10)
    assert stalled.origin is None  # 21 s without progress: dropped, not re-named
    out = await h.announce(1, 27, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (10, 100)


async def test_origin_ends_when_a_seeder_appears(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0)
    await h.announce(0, 0, pieces=100)
    await h.announce(1, 1, left=0, pieces=100)
    assert (await h.announce(0, 2, pieces=100)).origin is None
    assert (await h.announce(2, 2, pieces=100)).origin is None


async def test_no_origin_without_registry_or_layer_info(state: TrackerState) -> None:
    h = harness(state)
    assert (await h.announce(0, 0, pieces=100, registry=None)).origin is None
    assert (await h.announce(1, 0)).origin is None  # a stock client: no p2pimage extras


def test_a_peer_without_repo_or_digest_is_never_a_fetcher() -> None:
    """The origin URL needs the registry, the repository and the digest: a request
    lacking either of the last two is never named a fetcher (no URL with "None" in it)."""
    policy = TrackerPolicy(PolicyConfig(origin_lease_pieces=0), rng=random.Random(7))
    extras = [("library/app", None), (None, DIGEST), ("library/app", DIGEST)]
    origins = []
    for n, (repo, digest) in enumerate(extras):
        req = AnnounceRequest(IH, pid(n), 6000, left=SIZE, pieces=100, repo=repo, digest=digest)
        outcome = policy.announce(SwarmRecord(), req, host="10.0.0.1", now=0, registry_url=REGISTRY)
        origins.append(outcome.origin)
    assert origins[:2] == [None, None]
    assert origins[2] is not None
    assert origins[2].url == f"{REGISTRY}/v2/library/app/blobs/{DIGEST}"


async def test_a_remainder_of_two_pieces_is_split_one_of_one_is_not(state: TrackerState) -> None:
    """Without leases, a fetcher with two pieces left gives the second to a new fetcher;
    with one piece left there is nothing to split."""
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=4)
    await h.announce(0, 0, pieces=100)
    await h.announce(0, 1, pieces=100, origin_next=98)
    out = await h.announce(1, 2, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece) == (99, 100)
    other = b"\x03" * 20
    await h.announce(0, 0, pieces=100, info_hash=other)
    await h.announce(0, 1, pieces=100, origin_next=99, info_hash=other)
    assert (await h.announce(1, 2, pieces=100, info_hash=other)).origin is None


async def test_progress_beyond_the_range_is_clamped(state: TrackerState) -> None:
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=2)
    await h.announce(0, 0, pieces=100)
    await h.announce(1, 0, pieces=100)  # [50, 100); peer 0 now [0, 50)
    out = await h.announce(0, 1, pieces=100, origin_next=70)  # fetched past its new end
    assert out.origin is None or out.origin.first_piece >= 50
    swarm = await h.swarm()
    assert swarm is not None
    assert all(0 <= f.next <= f.end <= 100 for f in swarm.fetchers.values())


# ---------------------------------------------------------------------- invariants

_steps = st.lists(
    st.tuples(
        st.integers(0, 15),  # peer
        st.sampled_from(["announce", "progress", "stop", "finish", "wait"]),
        st.integers(0, 100),  # progress / wait amount
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(_steps)
def test_origin_ranges_stay_disjoint_and_within_the_layer(
    steps: list[tuple[int, str, int]],
) -> None:
    """Whatever peers do, fetcher remainders and unowned ranges never overlap."""
    policy = TrackerPolicy(
        PolicyConfig(origin_ratio=0.3, max_origin_fetchers=4), rng=random.Random(1)
    )
    swarm = SwarmRecord()
    now = 0.0
    nexts: dict[int, int] = {}
    for peer, action, amount in steps:
        if action == "wait":
            now += amount
            continue
        event, left, origin_next = Event.NONE, SIZE, None
        if action == "stop":
            event = Event.STOPPED
        elif action == "finish":
            left = 0
        elif action == "progress":
            origin_next = nexts.get(peer, 0) + amount
        req = AnnounceRequest(
            info_hash=IH, peer_id=pid(peer), port=7000 + peer, left=left, event=event,
            pieces=100, digest=DIGEST, repo="r", origin_next=origin_next,
        )  # fmt: skip
        out = policy.announce(swarm, req, host="10.1.1.1", now=now, registry_url=REGISTRY)
        if out.origin is not None:
            nexts[peer] = out.origin.first_piece
        ranges = _ranges(swarm)
        for (_, b), (c, _) in itertools.pairwise(ranges):
            assert b <= c, ranges
        assert all(0 <= a < b <= 100 for a, b in ranges), ranges
        assert len(swarm.fetchers) <= 4
        assert 0 <= swarm.seeders <= len(swarm.peers)
        assert swarm.released == sum(p.released for p in swarm.peers.values())


async def test_memory_state_drops_empty_swarms_on_sweep() -> None:
    state = MemoryState()
    h = harness(state, peer_timeout_s=10.0)
    await h.announce(1, 0)
    assert len(state.swarms) == 1
    await state.sweep(11.0, 10.0)
    assert state.swarms == {}


@pytest.mark.parametrize("n", [1, 200])
async def test_stats_count_live_peers(state: TrackerState, n: int) -> None:
    h = harness(state)
    for i in range(n):
        await h.announce(i, 0, left=0 if i % 4 == 0 else SIZE, info_hash=bytes([i % 3]) * 20)
    stats = await state.stats(1.0, 60.0)
    assert stats.swarms == min(n, 3)
    assert stats.seeders + stats.leechers == n
    assert stats.largest_swarm == (n + 2) // 3
    assert (await state.stats(100.0, 60.0)).swarms == 0


async def test_two_redis_replicas_interleave_without_losing_announces(redis_port: int) -> None:
    """Each replica starts from its own cached copy; lost compare-and-sets are retried
    against the current document, so no announce is lost."""
    import coredis
    import trio

    from p2pimage.tracker import RedisState

    client = coredis.Redis("127.0.0.1", redis_port, decode_responses=False)
    async with client:
        a = harness(RedisState(client, prefix="interleave:"))
        b = harness(RedisState(client, prefix="interleave:"))
        for n in range(20):
            await (a if n % 2 else b).announce(n, 0)
        out = await a.announce(100, 1, numwant=200)
        assert len(out.peers) == 20 and out.incomplete == 21

        async def burst(h: Harness, base: int) -> None:
            for n in range(base, base + 30):
                await h.announce(n, 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, a, 200)
            nursery.start_soon(burst, b, 300)
        out = await b.announce(100, 3, numwant=200)
        assert out.incomplete == 81
        assert isinstance(a.state, RedisState)
        await a.state.clear()


@pytest.mark.slow
@settings(max_examples=3000)
@given(_steps)
def test_origin_ranges_invariant_soak(steps: list[tuple[int, str, int]]) -> None:
    test_origin_ranges_stay_disjoint_and_within_the_layer.hypothesis.inner_test(steps)  # type: ignore[attr-defined]


# --- origin leases --------------------------------------------------------------------


async def test_fetcher_reads_under_a_lease_and_extends_it_by_announcing(
    state: TrackerState,
) -> None:
    h = harness(state, origin_lease_pieces=10)
    out = await h.announce(0, 0, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece, out.origin.lease_end) == (0, 100, 10)
    assert out.origin.url == f"{REGISTRY}/v2/library/app/blobs/{DIGEST}"
    out = await h.announce(0, 1, pieces=100, origin_next=10)  # lease used up: report
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.lease_end) == (10, 20)
    out = await h.announce(0, 2, pieces=100, origin_next=95)
    assert out.origin is not None and out.origin.lease_end is None  # the tail: no lease


async def test_steals_never_take_leased_pieces(state: TrackerState) -> None:
    """A fetcher that has not heard of a steal reads on up to its lease end: whatever a
    thief is given must start at or after it, so no piece is read from the registry
    twice."""
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=4, origin_lease_pieces=10)
    await h.announce(0, 0, pieces=100)  # [0, 100), lease to 10
    await h.announce(0, 1, pieces=100, origin_next=30)  # progress: lease to 40
    out = await h.announce(1, 2, pieces=100)
    assert out.origin is not None
    assert out.origin.first_piece >= 40  # 30 + lease
    assert (out.origin.first_piece, out.origin.end_piece) == (70, 100)
    swarm = await h.swarm()
    assert swarm is not None
    _assert_cover(swarm, 30, 100)
    # A remainder no longer than the lease cannot be stolen at all.
    h2 = harness(
        state,
        origin_ratio=1.0,
        max_origin_fetchers=4,
        origin_lease_pieces=10,
    )
    await h2.announce(0, 0, pieces=100, info_hash=b"\x02" * 20)
    await h2.announce(0, 1, pieces=100, origin_next=91, info_hash=b"\x02" * 20)
    assert (await h2.announce(1, 2, pieces=100, info_hash=b"\x02" * 20)).origin is None


async def test_a_lease_of_one_piece_and_no_lease(state: TrackerState) -> None:
    """A lease of one piece is a lease (not the whole range); a lease of 0 is none."""
    out = await harness(state, origin_lease_pieces=1).announce(0, 0, pieces=100)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece, out.origin.lease_end) == (0, 100, 1)
    out = await harness(state, origin_lease_pieces=0).announce(0, 0, pieces=100, cluster="c2")
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece, out.origin.lease_end) == (0, 100, None)


async def test_a_remainder_of_exactly_one_lease_is_read_without_one(state: TrackerState) -> None:
    """A lease that would end exactly at the range's end is no lease: the fetcher reads
    the tail as a whole, as it does any remainder shorter than a lease."""
    h = harness(state, origin_lease_pieces=10)
    await h.announce(0, 0, pieces=100)
    out = await h.announce(0, 1, pieces=100, origin_next=89)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece, out.origin.lease_end) == (89, 100, 99)
    out = await h.announce(0, 2, pieces=100, origin_next=90)
    assert out.origin is not None
    assert (out.origin.first_piece, out.origin.end_piece, out.origin.lease_end) == (90, 100, None)


async def test_steals_skip_the_default_lease_of_the_layer_size(state: TrackerState) -> None:
    """With the default lease (max(4, pieces / 8): 13 of 100 pieces) a thief's range
    starts after the victim's lease as the layer's size sets it, not after 4 pieces."""
    h = harness(state, origin_ratio=1.0, max_origin_fetchers=4, origin_lease_pieces=None)
    first = await h.announce(0, 0, pieces=100)
    assert first.origin is not None and first.origin.lease_end == 13
    out = await h.announce(1, 1, pieces=100)
    assert out.origin is not None
    # The tail half of [13, 100): 13 + ceil(87 / 2).
    assert (out.origin.first_piece, out.origin.end_piece) == (57, 100)
    swarm = await h.swarm()
    assert swarm is not None
    _assert_cover(swarm, 0, 100)


def test_unowned_work_is_taken_largest_range_first() -> None:
    policy = TrackerPolicy(PolicyConfig(origin_lease_pieces=0), rng=random.Random(7))
    swarm = SwarmRecord(pieces=100, unassigned=[(0, 10), (10, 60), (60, 70), (90, 100)])
    assert policy._take_work(swarm) == (10, 60)
    assert swarm.unassigned == [(0, 10), (60, 70), (90, 100)]


def test_default_lease_scales_with_the_layer() -> None:
    config = PolicyConfig()
    assert config.lease(16) == 4
    assert config.lease(1024) == 128
    assert PolicyConfig(origin_lease_pieces=0).lease(1024) == 0


# ------------------------------------------------------------------ identity and liars


async def test_a_peer_id_is_held_by_one_subject(state: TrackerState) -> None:
    h = harness(state)
    await h.announce(1, 0.0, subject="node-1", left=5)
    with pytest.raises(PeerIdTakenError):
        await h.announce(1, 1.0, subject="mallory", left=0, event=Event.STOPPED)
    swarm = await h.swarm()
    assert swarm is not None and swarm.peers[pid(1)].subject == "node-1"
    assert swarm.peers[pid(1)].left == 5
    # The holder itself may go on announcing, and leave.
    await h.announce(1, 2.0, subject="node-1", left=0, event=Event.STOPPED)
    assert await h.swarm() is None


async def test_a_lying_seeder_slows_a_swarm_never_stalls_it(state: TrackerState) -> None:
    h = harness(state)
    stall = h.policy.config.seeder_stall_s
    # The liar claims the whole layer before anyone holds it: no origin work for now.
    liar = await h.announce(9, 0.0, subject="liar", left=0, pieces=10)
    assert liar.origin is None
    first = await h.announce(1, 1.0, subject="node-1", pieces=10)
    assert first.origin is None and first.peers == [addr(9)]
    # Leechers of a seeded swarm announce at the fetcher interval, to be caught early.
    assert first.interval == h.policy.config.fetcher_interval_s
    still = await h.announce(1, 1.0 + stall - 0.5, subject="node-1", pieces=10)
    assert still.origin is None
    # No progress for seeder_stall_s: origin work reopens, and the liar, which reported
    # no upload, is distrusted and no longer handed out.
    late = await h.announce(1, 1.0 + stall, subject="node-1", pieces=10)
    assert late.origin is not None
    assert (late.origin.first_piece, late.origin.end_piece) == (0, 10)
    assert addr(9) not in late.peers
    swarm = await h.swarm()
    assert swarm is not None and swarm.distrusted == {"liar"}
    # Its claims no longer close origin work, under this peer id or a fresh one.
    await h.announce(9, 10.0, subject="liar", left=0, pieces=10)
    await h.announce(8, 10.0, subject="liar", left=0, pieces=10, event=Event.STARTED)
    second = await h.announce(2, 10.5, subject="node-2", pieces=10)
    # One fetcher is enough for four peers: the next leecher is sent to it, not the liar.
    assert second.peers == [addr(1)]
    swarm = await h.swarm()
    assert swarm is not None and not swarm.origin_done and pid(1) in swarm.fetchers


async def test_an_uploading_seeder_is_not_distrusted(state: TrackerState) -> None:
    h = harness(state)
    stall = h.policy.config.seeder_stall_s
    await h.announce(9, 0.0, subject="seed", left=0, pieces=10)
    await h.announce(1, 0.0, subject="node-1", pieces=10)
    await h.announce(2, 0.0, subject="node-2", pieces=10)
    # node-1 gets pieces from the seeder; node-2 is stuck (its own network, say).
    await h.announce(9, stall - 1, subject="seed", left=0, uploaded=400)
    assert (await h.announce(1, stall - 1, subject="node-1", left=600, pieces=10)).origin is None
    stuck = await h.announce(2, stall, subject="node-2", pieces=10)
    assert stuck.origin is not None  # the stuck leecher still gets the registry
    swarm = await h.swarm()
    assert swarm is not None and swarm.distrusted == set()
    assert addr(9) in (await h.announce(1, stall + 1, subject="node-1", left=500)).peers


async def test_progressing_leechers_never_reopen_origin_work(state: TrackerState) -> None:
    h = harness(state)
    await h.announce(9, 0.0, subject="seed", left=0, pieces=10)
    for step in range(1, 10):
        out = await h.announce(1, step * 3.0, subject="node-1", left=SIZE - step * 100, pieces=10)
        assert out.origin is None
    swarm = await h.swarm()
    assert swarm is not None and swarm.origin_done and not swarm.distrusted


async def test_proof_nonces_are_claimed_once_until_they_expire(state: TrackerState) -> None:
    """Both backends: a nonce is accepted once; after its expiry it is forgotten (the
    proof itself is stale by then). Redis expires by TTL, so this waits in real time."""
    import time

    now = time.time()
    assert await state.claim_nonce(b"n" * 16, now + 0.3, now) is True
    assert await state.claim_nonce(b"n" * 16, now + 0.3, now + 0.1) is False
    assert await state.claim_nonce(b"m" * 16, now + 0.3, now + 0.1) is True
    await trio.sleep(0.5)
    later = time.time()
    assert await state.claim_nonce(b"n" * 16, later + 0.3, later) is True


async def test_a_liar_claiming_uploads_and_rejoining_still_never_stalls(
    state: TrackerState,
) -> None:
    """A liar that also lies about its uploads is not distrusted, but every time it
    (re)claims the layer, a stalled leecher gets its origin range back within
    seeder_stall_s: the liar costs time, never the pull."""
    h = harness(state)
    stall = h.policy.config.seeder_stall_s
    now, left, uploaded = 0.0, SIZE, 0
    for round_ in range(3):
        uploaded += 1000
        await h.announce(9, now, subject="liar", left=0, pieces=10, event=Event.STARTED)
        out = await h.announce(1, now, subject="node-1", left=left, pieces=10)
        assert out.origin is None, round_  # its claim holds, for now
        now += stall
        await h.announce(9, now, subject="liar", left=0, uploaded=uploaded)
        out = await h.announce(1, now, subject="node-1", left=left, pieces=10)
        assert out.origin is not None, round_  # contradicted: the leecher reads the origin
        # Its re-announces as a seeder do not close origin work again; the leecher
        # progresses through its range.
        left -= 100
        await h.announce(9, now + 1, subject="liar", left=0, uploaded=uploaded + 1)
        out = await h.announce(1, now + 1, subject="node-1", left=left, pieces=10)
        assert out.origin is not None, round_
        # It leaves and rejoins (a fresh record) to claim the layer once more.
        await h.announce(9, now + 1, subject="liar", left=0, event=Event.STOPPED)
        now += 1
    swarm = await h.swarm()
    assert swarm is not None and "liar" not in swarm.distrusted


def test_origin_url_from_a_registry_url_with_a_trailing_slash() -> None:
    want = "http://registry:5000/v2/team/app/blobs/sha256:ab"
    assert origin_blob_url("http://registry:5000/", "team/app", "sha256:ab") == want
    assert origin_blob_url("http://registry:5000", "team/app", "sha256:ab") == want


_walk_steps = st.lists(
    st.tuples(
        st.integers(0, 7),  # peer
        st.sampled_from([0, 10, 400, 600, 1000, 2000]),  # left
        st.sampled_from([None, "a", "b"]),  # zone
        st.sampled_from([Event.NONE, Event.NONE, Event.STOPPED, Event.COMPLETED]),
        st.sampled_from([0.0, 1.0, 7.0, 40.0]),  # time since the previous step
        st.integers(1, 2),  # port variant: a peer that comes back on another port
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_walk_steps, st.booleans())
def test_peer_selection_view_is_what_a_fresh_walk_of_the_swarm_gives(
    steps: list, origin: bool
) -> None:
    """Selection keeps its tier lists across announces, updating them in place (append,
    swap-remove) on every join, leave, tier change and expiry; after any sequence of
    announces (joins, leaves, progress, zones, fetchers, releases, expiry, stalls) the
    kept lists equal a from-scratch classification of the swarm."""
    policy = TrackerPolicy(
        PolicyConfig(release_min_seeders=1, release_seeder_ratio=0.0, seeder_stall_s=5.0),
        rng=random.Random(7),
    )
    swarm = SwarmRecord()
    now = 1000.0
    for peer, left, zone, event, dt, variant in steps:
        now += dt
        req = AnnounceRequest(
            IH, pid(peer), 6000 + peer * 2 + variant, left=left, event=event, numwant=5,
            pieces=8, digest=DIGEST, repo="library/app" if origin else None,
        )  # fmt: skip
        host = f"10.0.0.{peer + 1}" if peer % 3 else f"fd00::{peer + 1}"
        out = policy.announce(swarm, req, host=host, now=now, zone=zone, registry_url=REGISTRY)
        assert (host, req.port) not in out.peers
        # The compact form handed to the encoder is the peers' own, IPv4 and IPv6 apart.
        packed = [pack_peer(h, p) for h, p in out.peers]
        assert out.compact == (
            b"".join(p for p in packed if len(p) == 6),
            b"".join(p for p in packed if len(p) == 18),
        )
        kept = _all_tiers(policy, swarm)  # every asker kind's lists, now kept current
        view, swarm.view = swarm.view, None
        assert _all_tiers(policy, swarm) == kept
        swarm.view = view  # the next steps update the kept lists, not fresh ones


def _all_tiers(policy: TrackerPolicy, swarm: SwarmRecord) -> list[object]:
    """Every kind of asker's tiers; order within a tier is not kept (a re-announce moves
    a peer to the end of the swarm's last-seen order) and does not matter (sampled)."""
    out: list[object] = []
    for zone, leecher in itertools.product([None, "a", "b"], [True, False]):
        built = policy._tiers(swarm, zone, leecher)
        # The index of each peer points at its entry, and every entry is indexed.
        for peer_id, (same, tier, index) in built.where.items():
            assert built.tiers[same][tier][index][0] == peer_id
        assert len(built.where) == sum(len(t) for side in built.tiers for t in side)
        tiers = [[sorted(t) for t in side] for side in built.tiers]
        out.append((tiers, {p: w[:2] for p, w in built.where.items()}))
    return out


async def test_update_many_is_update_for_each_swarm(state: TrackerState) -> None:
    """A batched announce's swarms go to the backend together (Redis: one pipeline):
    each result is its own swarm's, an error is that swarm's alone, and every swarm is
    stored as by update."""
    policy = TrackerPolicy(rng=random.Random(3))
    hashes = [bytes([i]) * 20 for i in range(1, 4)]
    for h in hashes:  # peer 1 of node "a" in each swarm
        req = AnnounceRequest(h, pid(1), 6001, left=5)
        await state.update(SwarmKey("c", h), lambda s, r=req: policy.announce(
            s, r, host="10.0.0.1", now=100.0, subject="a"
        ))  # fmt: skip

    def rule(h: bytes, subject: str) -> Callable[[SwarmRecord], AnnounceOutcome]:
        req = AnnounceRequest(h, pid(2 if subject == "b" else 1), 6002, left=5)
        return lambda s: policy.announce(s, req, host="10.0.0.2", now=101.0, subject=subject)

    out = await state.update_many(
        [
            (SwarmKey("c", hashes[0]), rule(hashes[0], "b")),
            (SwarmKey("c", hashes[1]), rule(hashes[1], "z")),  # peer 1 is node a's
            (SwarmKey("c", hashes[2]), rule(hashes[2], "b")),
        ]
    )
    assert isinstance(out[1], PeerIdTakenError)
    assert [o.peers for o in (out[0], out[2]) if isinstance(o, AnnounceOutcome)] == [
        [("10.0.0.1", 6001)]
    ] * 2
    stored = await state.read(SwarmKey("c", h) for h in hashes)
    assert [sorted(s.peers) if s else None for s in stored] == [
        sorted([pid(1), pid(2)]),
        [pid(1)],
        sorted([pid(1), pid(2)]),
    ]


async def test_update_many_redoes_a_swarm_another_replica_wrote(redis_port: int) -> None:
    """Replica a answers from its cached copy; when replica b wrote the swarm since,
    a's compare-and-set in the pipeline loses and that swarm is redone on b's write."""
    import coredis

    from p2pimage.tracker import RedisState

    policy = TrackerPolicy(rng=random.Random(3))
    client = coredis.Redis("127.0.0.1", redis_port, decode_responses=False)
    async with client:
        a = RedisState(client, prefix="many:")
        b = RedisState(client, prefix="many:")

        def rule(n: int) -> Callable[[SwarmRecord], AnnounceOutcome]:
            req = AnnounceRequest(IH, pid(n), 6000 + n, left=5, numwant=10)
            return lambda s: policy.announce(s, req, host="10.0.0.1", now=100.0 + n)

        key, other = SwarmKey("c", IH), SwarmKey("c", b"\x07" * 20)
        await a.update(key, rule(1))  # a caches the swarm
        await b.update(key, rule(2))  # b writes it: a's copy is stale
        out = await a.update_many([(key, rule(3)), (other, rule(4))])
        assert isinstance(out[0], AnnounceOutcome) and isinstance(out[1], AnnounceOutcome)
        assert sorted(p for _, p in out[0].peers) == [6001, 6002]
        (swarm,) = await b.read([key])
        assert swarm is not None and sorted(swarm.peers) == [pid(1), pid(2), pid(3)]
        await a.clear()


@settings(max_examples=100, deadline=None)
@given(_walk_steps)
def test_redis_document_with_kept_peer_parts_is_a_fresh_encoding(steps: list) -> None:
    """The Redis backend keeps each record's JSON and re-encodes only new records: after
    any sequence of announces on a swarm written before, its document decodes to what a
    fresh encoding (no kept parts) does, and round-trips."""
    policy = TrackerPolicy(PolicyConfig(release_min_seeders=1), rng=random.Random(3))
    swarm = SwarmRecord()
    now = 1000.0
    for peer, left, zone, event, dt, variant in steps:
        now += dt
        req = AnnounceRequest(
            IH, pid(peer), 6000 + peer * 2 + variant, left=left, event=event, pieces=8,
            digest=DIGEST, repo="library/app",
        )  # fmt: skip
        policy.announce(swarm, req, host=f"10.0.0.{peer + 1}", now=now, zone=zone,
                        registry_url=REGISTRY, subject=f"node-{peer}")  # fmt: skip
        kept = swarm_to_json(swarm)  # parts of earlier records come from their cache
        fresh = swarm_from_json(kept)
        assert json.loads(swarm_to_json(fresh)) == json.loads(kept)
        assert list(fresh.peers.values()) == list(swarm.peers.values())
        assert (fresh.seeders, fresh.released) == (swarm.seeders, swarm.released)
