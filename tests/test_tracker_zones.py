"""Origin fetchers spread across zones (TrackerPolicy._zone_may_fetch), against both state
backends: the zone each node reads from its Node object (p2pimage.mirror.kubernetes) rides
in its token and decides which nodes read the registry."""

from __future__ import annotations

from collections import Counter

from p2pimage.tracker import SwarmRecord, TrackerState
from tests._tracker_fixtures import redis_port, state
from tests.test_tracker_policy import Harness, _assert_cover, harness, pid

__all__ = ["redis_port", "state"]


async def _join(h: Harness, zones: list[str | None]) -> None:
    """Every node announces once without a registry (nobody can be named a fetcher yet):
    the swarm knows every node's zone before the slots are handed out."""
    for n, zone in enumerate(zones):
        await h.announce(n, 0, zone=zone, pieces=1000, registry=None)


def _fetcher_zones(swarm: SwarmRecord) -> Counter[str | None]:
    return Counter(swarm.peers[p].zone for p in swarm.fetchers)


async def test_fetchers_are_spread_over_the_zones_present(state: TrackerState) -> None:
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=4)
    zones: list[str | None] = ["a"] * 6 + ["b"] * 2
    await _join(h, zones)
    named = []
    for n, zone in enumerate(zones):  # zone a asks first: it must leave room for b
        if (await h.announce(n, 1, zone=zone, pieces=1000)).origin is not None:
            named.append(n)
    assert named == [0, 1, 6, 7]
    swarm = await h.swarm()
    assert swarm is not None
    assert _fetcher_zones(swarm) == {"a": 2, "b": 2}
    _assert_cover(swarm, 0, 1000)


async def test_a_zone_too_small_for_its_share_leaves_no_slot_unused(state: TrackerState) -> None:
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=4)
    zones: list[str | None] = ["a"] * 7 + ["b"]
    await _join(h, zones)
    assert (await h.announce(0, 1, zone="a", pieces=1000)).origin is not None
    assert (await h.announce(1, 1, zone="a", pieces=1000)).origin is not None
    assert (await h.announce(2, 1, zone="a", pieces=1000)).origin is None  # b's turn
    assert (await h.announce(7, 1, zone="b", pieces=1000)).origin is not None
    # b has no node left to fetch: its unused share goes back to a.
    assert (await h.announce(2, 2, zone="a", pieces=1000)).origin is not None
    assert (await h.announce(3, 2, zone="a", pieces=1000)).origin is None  # k = 4
    swarm = await h.swarm()
    assert swarm is not None
    assert _fetcher_zones(swarm) == {"a": 3, "b": 1}
    _assert_cover(swarm, 0, 1000)


async def test_nodes_without_a_zone_count_as_one_zone_of_their_own(state: TrackerState) -> None:
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=2)
    zones: list[str | None] = [None, None, None, "a"]
    await _join(h, zones)
    assert (await h.announce(0, 1, zone=None, pieces=1000)).origin is not None
    assert (await h.announce(1, 1, zone=None, pieces=1000)).origin is None
    assert (await h.announce(3, 1, zone="a", pieces=1000)).origin is not None
    swarm = await h.swarm()
    assert swarm is not None and _fetcher_zones(swarm) == {None: 1, "a": 1}
    assert set(swarm.fetchers) == {pid(0), pid(3)}


async def test_one_zone_is_unchanged(state: TrackerState) -> None:
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=4)
    await _join(h, ["a"] * 8)
    named = [n for n in range(8) if (await h.announce(n, 1, zone="a", pieces=1000)).origin]
    assert named == [0, 1, 2, 3]


async def test_a_node_with_one_byte_left_gives_its_zone_a_share(state: TrackerState) -> None:
    """Zone b's only node has 1 byte left: it can still fetch, so b keeps its share of
    the slots and zone a gets only its own (k = 4, two zones: 2 each)."""
    h = harness(state, origin_ratio=0.5, max_origin_fetchers=4)
    for n in range(7):
        await h.announce(n, 0, zone="a", pieces=1000, registry=None)
    await h.announce(7, 0, zone="b", left=1, pieces=1000, registry=None)
    named = [n for n in range(7) if (await h.announce(n, 1, zone="a", pieces=1000)).origin]
    assert named == [0, 1]
