"""The swarm engine's pure policies (p2pimage/swarm/policy.py), which the engine and the
simulator both call."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pimage.errors import LocalProtocolError
from p2pimage.swarm.policy import (
    ORIGIN_MIN_READ_BYTES,
    AnnounceSchedule,
    DialPolicy,
    HavePolicy,
    InterestPolicy,
    OriginRange,
    OriginShare,
    PeerTimeouts,
    RevealPolicy,
    UploadOrder,
    follow_origin,
)
from p2pimage.tracker import Event, OriginAssignment
from p2pimage.tracker.client import AnnounceSettings

URL = "http://registry/v2/r/blobs/sha256:" + "0" * 64


def test_dial_policy_stops_at_the_dial_target_and_skips_the_unwanted() -> None:
    policy = DialPolicy(dial_target=3, max_peers=5)
    got = policy.to_dial([1, 2, 2, 3, 4, 5], connected=1, dialing=0, skip=lambda a: a == 1)
    assert got == [2, 3]  # 1 skipped, 2 once, then the target (3) is met
    assert policy.to_dial([7], connected=2, dialing=1, skip=lambda a: False) == []
    assert policy.want_more(2, 0) and not policy.want_more(2, 1)
    assert policy.may_accept(4) and not policy.may_accept(5)


def test_of_two_nodes_only_the_higher_address_defers_its_dial() -> None:
    policy = DialPolicy(dial_target=3, max_peers=5, defer_s=0.2)
    low, high = ("127.0.0.1", 4000), ("127.0.0.1", 5000)
    rng = random.Random(1)
    delays = [policy.dial_delay_s(high, low, rng, mutual=True) for _ in range(200)]
    assert all(0.1 <= d <= 0.2 for d in delays) and len(set(delays)) > 100  # jittered
    assert policy.dial_delay_s(low, high, rng, mutual=True) == 0.0  # the other dials at once
    # Any total order will do, as long as both ends of a pair see the same one.
    assert policy.dial_delay_s(("10.0.0.2", 1), ("10.0.0.10", 1), rng, mutual=True) > 0
    assert policy.dial_delay_s(("10.0.0.10", 1), ("10.0.0.2", 1), rng, mutual=True) == 0.0
    assert DialPolicy(3, 5).dial_delay_s(high, low, rng, mutual=True) == 0.0  # off by default
    # A peer that was not given our address never dials us: nothing to wait for.
    assert policy.dial_delay_s(high, low, rng, mutual=False) == 0.0


def test_interest_is_kept_for_a_grace_toward_cooperative_peers_only() -> None:
    policy = InterestPolicy(grace_s=2.0)
    assert policy.keep_interest(idle_s=0.0, cooperative=True, complete=False)
    assert policy.keep_interest(idle_s=1.9, cooperative=True, complete=False)
    assert not policy.keep_interest(idle_s=2.0, cooperative=True, complete=False)
    # BEP 3 toward stock clients (they may give slots by interest), and once complete.
    assert not policy.keep_interest(idle_s=0.0, cooperative=False, complete=False)
    assert not policy.keep_interest(idle_s=0.0, cooperative=True, complete=True)
    assert not InterestPolicy(grace_s=0.0).keep_interest(
        idle_s=0.0, cooperative=True, complete=False
    )


def test_request_timeout_grows_with_the_drain_time_of_what_was_requested() -> None:
    timeouts = PeerTimeouts(request_timeout_s=15.0, stall_timeout_s=20.0, factor=3.0)
    # A fast link: 4 MiB requested at 100 MiB/s drains in 0.04 s, the floor holds.
    fast = timeouts.drain_s(4 << 20, 100 * 2**20)
    assert fast == pytest.approx(0.04)
    assert timeouts.request_timeout(fast) == 15.0
    # 30 peers x 8 blocks of 16 KiB at 0.5 MiB/s: 7.5 s to drain.
    slow = timeouts.drain_s(30 * 8 * 16384, 0.5 * 2**20)
    assert slow == pytest.approx(7.5)
    assert timeouts.request_timeout(slow) == pytest.approx(22.5)
    # Nothing requested, or nothing arriving from anyone: no rate to scale by.
    assert timeouts.drain_s(0, 1e6) == 0.0 and timeouts.drain_s(1 << 20, 0.0) == 0.0


def test_request_timeout_is_capped_when_nothing_arrives() -> None:
    timeouts = PeerTimeouts(request_timeout_s=15.0, stall_timeout_s=20.0, max_stall_s=120.0)
    # Nothing arrived for a while: the decayed rates put the drain time at hours, but a
    # request sat on for max_stall_s goes back to the pool (the liar of
    # docs/reliability.md kept 40 requests this way, and the swarm stuck behind it).
    decayed = timeouts.drain_s(40 * 16384, 1e-3)
    assert timeouts.request_timeout(decayed) == 120.0


def test_a_peer_is_stalled_only_while_the_others_deliver() -> None:
    timeouts = PeerTimeouts(request_timeout_s=15.0, stall_timeout_s=20.0, max_stall_s=120.0)
    requested = 4 << 20

    def stalled(
        silent_s: float, others: int, outstanding: int, swarm_silent_s: float = 0.5
    ) -> bool:
        return timeouts.stalled(
            silent_s=silent_s,
            others_bytes=others,
            outstanding_bytes=outstanding,
            swarm_silent_s=swarm_silent_s,
        )

    # Silent for 30 s, but our whole process or link was starved: the others sent less
    # than three times what we asked for. Not this peer's fault.
    assert not stalled(30.0, requested, requested)
    # The others delivered three times everything we asked for: it skipped its turn.
    assert stalled(30.0, 3 * requested, requested)
    # Never before the floor, however much the others sent.
    assert not stalled(19.0, 1 << 40, 1)
    assert not stalled(19.0, 0, requested, swarm_silent_s=19.0)
    # Nothing arrives from anyone: the swarm is stuck, the silent peer that holds our
    # requests (and keeps the origin readers off the pieces it claims) goes.
    assert stalled(21.0, 0, requested, swarm_silent_s=21.0)
    # The others sent a little after its last block, then nothing for stall_timeout_s:
    # stuck all the same (the liar's case: every other piece exchanged, the rest claimed
    # by it alone).
    assert stalled(30.0, 1, requested, swarm_silent_s=21.0)
    assert not stalled(30.0, 1, requested, swarm_silent_s=19.0)
    # Waiting its turn behind slow others, at most max_stall_s.
    assert not stalled(119.0, 1, requested)
    assert stalled(121.0, 1, requested)


def test_reveal_goes_to_the_least_loaded_peer_then_to_everyone() -> None:
    reveal: RevealPolicy[str] = RevealPolicy(enabled=True, timeout_s=2.0, rng=random.Random(1))
    first = reveal.reveal(0, ["a", "b"], now=0.0)
    second = reveal.reveal(1, ["a", "b"], now=0.5)
    assert {first, second} == {"a", "b"}  # one each: the second goes to the idle peer
    assert reveal.hidden == {0, 1}
    assert reveal.peer_has(0) == first  # someone relayed it: shown to all
    assert reveal.peer_has(0) is None  # only once
    assert reveal.expired(2.4) == []
    assert reveal.expired(2.6) == [(1, second)]
    assert reveal.hidden == frozenset()


def test_reveal_disabled_or_without_candidates_tells_everyone() -> None:
    off: RevealPolicy[str] = RevealPolicy(enabled=False, timeout_s=2.0, rng=random.Random(1))
    assert off.reveal(0, ["a"], now=0.0) is None
    on: RevealPolicy[str] = RevealPolicy(enabled=True, timeout_s=2.0, rng=random.Random(1))
    assert on.reveal(0, [], now=0.0) is None
    assert on.hidden == frozenset()


def test_reveal_to_a_peer_that_leaves_is_shown_to_everyone() -> None:
    reveal: RevealPolicy[str] = RevealPolicy(enabled=True, timeout_s=2.0, rng=random.Random(1))
    assert reveal.reveal(3, ["a"], now=0.0) == "a"
    assert reveal.peer_lost("a") == [3]
    assert not reveal.is_hidden(3)
    # Its load is gone too: the next reveal may go to it again once it returns.
    assert reveal.reveal(4, ["a", "b"], now=1.0) in {"a", "b"}


def test_announce_schedule_events_intervals_and_retries() -> None:
    s = AnnounceSchedule(hungry_interval_s=1.0, want_peers=8, retry_s=1.0, retry_max_s=4.0)
    assert s.event(complete=False) is Event.STARTED
    assert [s.failed(), s.failed(), s.failed(), s.failed()] == [1.0, 2.0, 4.0, 4.0]
    assert s.event(complete=False) is Event.STARTED  # not answered yet: still started
    # Short of peers: hungry (the tracker's min interval wins if larger).
    assert s.succeeded(Event.STARTED, interval=30, min_interval=5, complete=False, peers=2) == 5
    assert s.failed() == 1.0  # a success resets the back-off
    assert s.succeeded(Event.NONE, interval=30, min_interval=0, complete=False, peers=2) == 1.0
    assert s.succeeded(Event.NONE, interval=30, min_interval=5, complete=False, peers=9) == 30
    assert s.event(complete=False) is Event.NONE
    assert s.event(complete=True) is Event.COMPLETED
    s.succeeded(Event.COMPLETED, interval=30, min_interval=5, complete=True, peers=0)
    assert s.event(complete=True) is Event.NONE
    seeded = AnnounceSchedule(completed_sent=True)  # complete before the first announce
    seeded.succeeded(Event.STARTED, interval=30, min_interval=5, complete=True, peers=0)
    assert seeded.event(complete=True) is Event.NONE


def test_announce_schedule_stays_hungry_until_the_dial_target_while_members_remain() -> None:
    # A node whose dials were half refused (the first nodes of a cold start are full)
    # keeps asking the tracker for more peers until it has its dial target, not only
    # until 8: with 8, most of a 500-node swarm stopped at 12-15 peers.
    s = AnnounceSettings(hungry_interval_s=1.0).schedule(dial_target=20)
    assert s.want_peers == 20
    ask = {"interval": 30, "min_interval": 1, "complete": False}
    assert s.succeeded(Event.STARTED, peers=12, members=500, **ask) == 1.0
    assert s.succeeded(Event.NONE, peers=19, members=0, **ask) == 1.0  # not counted
    assert s.succeeded(Event.NONE, peers=20, members=500, **ask) == 30
    # Connected to every other member: nobody more to ask for, however small the swarm.
    assert s.succeeded(Event.NONE, peers=15, members=16, **ask) == 30
    assert s.succeeded(Event.NONE, peers=14, members=16, **ask) == 1.0
    # Complete: never hungry. A fixed want_peers still wins over the dial target.
    assert s.succeeded(Event.NONE, peers=2, members=500, **ask | {"complete": True}) == 30
    fixed = AnnounceSettings(want_peers=8).schedule(dial_target=20)
    assert fixed.succeeded(Event.NONE, peers=12, members=500, **ask) == 30


def test_origin_range_groups_requests_skips_held_and_stops_at_a_stolen_piece() -> None:
    r = OriginRange(0, 10)
    have = {0, 1}
    held = {6}
    step = r.next_request(have.__contains__, held.__contains__, lambda i: 4, 12)
    assert step.read == (2, 5) and step.give_back is None  # three pieces fit in 12 bytes
    for i in range(2, 5):
        assert r.piece_arrived(i, have=False, held_by_peer=False)
        r.advanced(i)
    step = r.next_request(have.__contains__, held.__contains__, lambda i: 4, 12)
    assert step.read == (5, 6)  # stops before the piece a peer holds
    r.advanced(5)
    step = r.next_request(have.__contains__, held.__contains__, lambda i: 4, 12)
    assert step.read is None and step.give_back == (6, 10)
    assert r.done and r.end == 6


def test_origin_range_renews_halfway_through_each_lease() -> None:
    r = OriginRange(0, 8)
    assert [r.advanced(i) for i in range(4)] == [False, False, False, True]
    assert r.extend(16) == (8, 16)
    renewals = [i for i in range(4, 16) if r.advanced(i)]
    assert renewals == [9]  # halfway from 4 to 16
    assert r.extend(10) is None  # never shrinks
    assert r.shrink(20) is None


def test_origin_range_a_piece_stolen_in_flight_is_not_stored() -> None:
    r = OriginRange(0, 8)
    assert r.shrink(4) == (4, 8)
    assert not r.piece_arrived(5, have=False, held_by_peer=False)  # past the new end
    assert not r.piece_arrived(2, have=False, held_by_peer=True)  # a peer has it
    assert r.piece_arrived(2, have=True, held_by_peer=True)  # ours already: harmless
    with pytest.raises(LocalProtocolError):
        OriginRange(5, 4)


@given(
    first=st.integers(0, 50),
    length=st.integers(0, 50),
    cut=st.integers(0, 120),
    read=st.integers(0, 50),
)
def test_origin_range_shrink_never_gives_back_read_pieces(
    first: int, length: int, cut: int, read: int
) -> None:
    r = OriginRange(first, first + length)
    for i in range(first, min(first + read, first + length)):
        r.advanced(i)
    old_end = r.end
    back = r.shrink(cut)
    assert r.next_index <= r.end or r.end == old_end
    if back is not None:
        assert r.next_index <= back[0] < back[1] == old_end
        assert back[0] == r.end


def test_follow_origin_rules() -> None:
    cur = OriginRange(10, 20)
    cur.advanced(10)
    cur.advanced(11)
    assert follow_origin(None, None, None).action == "none"
    assert follow_origin(cur, URL, None).action == "stop"
    shrink = follow_origin(cur, URL, OriginAssignment(URL, 12, 16))
    assert (shrink.action, shrink.end) == ("shrink", 16)
    extend = follow_origin(cur, URL, OriginAssignment(URL, 12, 40, 30))
    assert (extend.action, extend.end) == ("extend", 30)
    elsewhere = follow_origin(cur, URL, OriginAssignment(URL, 50, 60))
    assert (elsewhere.action, elsewhere.first, elsewhere.end) == ("start", 50, 60)
    other_blob = follow_origin(cur, URL, OriginAssignment(URL + "x", 12, 16))
    assert other_blob.action == "start"


_waiting = st.lists(
    st.tuples(st.integers(0, 1024), st.floats(0, 100, allow_nan=False)),
    min_size=0,
    max_size=30,
)


@given(_waiting, st.floats(0, 200, allow_nan=False))
def test_upload_order_serves_the_neediest_unless_someone_waited_too_long(
    waiting: list[tuple[int, float]], now: float
) -> None:
    """``need``: of the peers waiting under ``max_wait_s``, the one holding the fewest
    pieces (ties: the longest waiting); a peer waiting ``max_wait_s`` or more goes before
    all of them (the longest waiting first). ``arrival``: the longest waiting first."""
    peers = [(i, held, min(since, now)) for i, (held, since) in enumerate(waiting)]
    need, arrival = UploadOrder("need"), UploadOrder()
    chosen = need.next(peers, now)
    if not peers:
        assert chosen is None and arrival.next(peers, now) is None
        return
    _, held, since = peers[chosen]  # type: ignore[index]
    overdue = [p for p in peers if now - p[2] >= need.max_wait_s]
    if overdue:
        assert since == min(p[2] for p in overdue)
    else:
        assert (held, since) == min((p[1], p[2]) for p in peers)
    first = arrival.next(peers, now)
    assert peers[first][2] == min(p[2] for p in peers)  # type: ignore[index]


def test_upload_order_refuses_unknown_modes() -> None:
    with pytest.raises(LocalProtocolError):
        UploadOrder("rarest")
    with pytest.raises(LocalProtocolError):
        UploadOrder(max_wait_s=0)


@given(
    delay=st.sampled_from([0.0, 0.25]),
    rare_delay=st.sampled_from([0.0, 0.03, 0.5]),
    interested=st.booleans(),
    missing=st.integers(0, 600),
    holders=st.integers(0, 40),
    first=st.booleans(),
)
def test_a_have_waits_only_for_an_interested_peer_far_from_its_end_and_less_for_a_rare_piece(
    delay: float, rare_delay: float, interested: bool, missing: int, holders: int, first: bool
) -> None:
    policy = HavePolicy(delay, rare_delay_s=rare_delay)
    wait = policy.wait_s(interested=interested, missing=missing, holders=holders, first=first)
    if not (delay > 0 and interested and missing > 8):
        assert wait == 0.0
    elif holders > 1 or not first:
        assert wait == delay  # (not among a rare piece's first told: as a common piece)
    else:
        assert wait == min(rare_delay, delay)  # never longer than a common piece's


@given(
    fanout=st.one_of(st.none(), st.integers(1, 8)),
    peers=st.integers(0, 40),
    holders=st.integers(0, 5),
    seed=st.integers(0, 2**32),
)
def test_a_rare_piece_is_told_first_to_at_most_fanout_peers_and_a_common_one_to_all(
    fanout: int | None, peers: int, holders: int, seed: int
) -> None:
    policy = HavePolicy(0.25, rare_delay_s=0.03, rare_fanout=fanout)
    keys = [f"peer-{i}" for i in range(peers)]
    first = policy.first_told(keys, holders, random.Random(seed))
    if fanout is None or holders > 1 or peers <= fanout:
        assert list(first) == keys
    else:
        assert len(first) == fanout and len(set(first)) == fanout and set(first) <= set(keys)
        # Chosen at random: another draw picks others (over enough peers and draws).
        draws = {
            frozenset(policy.first_told(keys, holders, random.Random(seed + k))) for k in range(20)
        }
        assert len(draws) > 1 or math.comb(peers, fanout) == 1


def test_rare_fanout_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError):
        HavePolicy(0.25, rare_fanout=0)


def test_a_fresh_piece_is_told_at_once_or_soon_and_a_common_one_waits() -> None:
    policy = HavePolicy(0.25)
    assert policy.wait_s(interested=True, missing=200, holders=0) == 0.0  # ours alone
    assert policy.wait_s(interested=True, missing=200, holders=1) == 0.0  # one more holder
    assert policy.wait_s(interested=True, missing=200, holders=2) == 0.25
    assert policy.wait_s(interested=True, missing=8, holders=5) == 0.0  # its last pieces
    assert policy.wait_s(interested=False, missing=200, holders=5) == 0.0
    soon = HavePolicy(0.25, rare_delay_s=0.03)
    assert soon.wait_s(interested=True, missing=200, holders=1) == 0.03
    assert soon.wait_s(interested=True, missing=200, holders=2) == 0.25
    assert soon.wait_s(interested=True, missing=8, holders=0) == 0.0  # its last pieces
    # Not among a rare piece's first told: it waits as a common piece's have.
    assert soon.wait_s(interested=True, missing=200, holders=1, first=False) == 0.25
    assert soon.wait_s(interested=True, missing=8, holders=1, first=False) == 0.0
    assert soon.wait_s(interested=False, missing=200, holders=1, first=False) == 0.0


MIB = 1024 * 1024


def test_a_fetcher_whose_registry_reads_fill_its_downlink_asks_its_peers_for_nothing() -> None:
    share = OriginShare(1 * MIB)
    assert share.peer_budget(0.0, 1.0) is None  # no registry bytes yet: no limit
    now = 0.0
    for _ in range(12):  # 256 KiB every 0.25 s: 1 MiB/s, the whole link
        now += 0.25
        share.read(256 * 1024, now)
        assert share.peer_budget(now, 1.0) == 0.0
    # The reads ended: the peers get the link back as the window passes.
    assert share.peer_budget(now + 0.5, 1.0) == pytest.approx(0.5 * MIB)
    assert share.peer_budget(now + 1.0, 1.0) is None


def test_a_fetcher_keeps_what_its_registry_reads_leave_for_its_peers() -> None:
    share = OriginShare(1 * MIB, window_s=1.0)
    now = 0.0
    for _ in range(20):  # 64 KiB every 0.25 s: a quarter of the link
        now += 0.25
        share.read(64 * 1024, now)
    assert share.origin_rate(now) == pytest.approx(256 * 1024)
    assert share.peer_budget(now, 1.0) == pytest.approx(0.75 * MIB)
    assert share.peer_budget(now, 2.0) == pytest.approx(1.5 * MIB)


def test_the_first_reads_of_a_spell_count_high() -> None:
    """In its first window the rate is taken over the spell so far (the safe side: a
    fetcher starting to read asks its peers for less, never for more)."""
    share = OriginShare(4 * MIB)
    share.read(MIB, 10.0)
    assert share.origin_rate(10.0) >= 4 * MIB
    assert share.peer_budget(10.0, 1.0) == 0.0
    assert share.origin_rate(10.5) == pytest.approx(2 * MIB)


def test_an_uncapped_downlink_sets_no_budget() -> None:
    share = OriginShare(None)
    share.read(MIB, 1.0)
    assert share.peer_budget(1.0, 1.0) is None
    with pytest.raises(LocalProtocolError):
        OriginShare(MIB, window_s=0)


def test_registry_reads_on_a_slow_downlink_are_short() -> None:
    """A piece reaches the swarm once its bytes are here: 1/32 s of a capped link per
    read (32 KiB at 1 MiB/s, not 256 KiB: a quarter second), within the bounds."""
    assert OriginShare(1 * MIB).read_size(256 * 1024) == 32 * 1024
    assert OriginShare(64 * MIB).read_size(256 * 1024) == 256 * 1024
    assert OriginShare(64 * 1024).read_size(256 * 1024) == ORIGIN_MIN_READ_BYTES
    assert OriginShare(None).read_size(256 * 1024) == 256 * 1024
