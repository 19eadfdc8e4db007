"""Tests of the piece picker: unit behaviour, hypothesis properties, whole downloads."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.swarm.picker import BlockRequest, PickerSettings, PiecePicker, _nth_set_bit

BS = 16 * 1024


def bitfield(num_pieces: int, pieces: Iterable[int]) -> bytes:
    out = bytearray(-(-num_pieces // 8))
    for i in pieces:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def make(
    num_pieces: int = 16,
    blocks_per_piece: int = 4,
    seed: int = 0,
    short_tail: int = 0,
    **kw: Any,
) -> PiecePicker[str]:
    plen = blocks_per_piece * BS
    total = num_pieces * plen - short_tail
    return PiecePicker(
        num_pieces, plen, total, rng=random.Random(seed), settings=PickerSettings(**kw)
    )


def drain(pp: PiecePicker[str], peer: str, now: float = 0.0) -> list[BlockRequest]:
    return pp.pick(peer, 10_000, now)


# ---------------------------------------------------------------- geometry & availability


def test_geometry_and_short_last_piece() -> None:
    pp = make(num_pieces=3, blocks_per_piece=4, short_tail=BS + 100)
    pp.peer_have_all("a")
    got = drain(pp, "a")
    assert sum(b.length for b in got) == pp.total_length
    assert len(got) == 4 + 4 + 3
    last = [b for b in got if b.index == 2]
    assert max(b.begin + b.length for b in last) == pp.piece_size(2) == 2 * BS + BS - 100
    with pytest.raises(LocalProtocolError):
        PiecePicker(4, BS, 10 * BS)


def test_bitfield_validation_and_availability() -> None:
    pp = make(num_pieces=10)
    with pytest.raises(RemoteProtocolError):
        pp.peer_bitfield("a", b"\x00")  # 10 pieces need 2 bytes
    with pytest.raises(RemoteProtocolError):
        pp.peer_bitfield("a", b"\x00\x01")  # spare bit set
    pp.peer_bitfield("a", bitfield(10, [0, 3, 9]))
    pp.peer_bitfield("b", bitfield(10, [3, 9]))
    pp.peer_have("c", 9)
    pp.peer_have("c", 9)  # repeated HAVE
    pp.peer_have_all("d")
    assert [pp.availability(i) for i in range(10)] == [2, 1, 1, 3, 1, 1, 1, 1, 1, 4]
    pp.peer_lost("d")
    pp.peer_bitfield("a", bitfield(10, [1]))  # replaces what we knew
    assert [pp.availability(i) for i in range(10)] == [0, 1, 0, 1, 0, 0, 0, 0, 0, 2]
    pp.check_invariants()


def test_many_peers_availability_counts() -> None:
    rng = random.Random(5)
    n = 50
    pp = make(num_pieces=n)
    truth = [0] * n
    sets = {}
    for p in range(300):  # enough peers for several bit-planes
        s = {i for i in range(n) if rng.random() < 0.3}
        sets[p] = s
        pp.peer_bitfield(str(p), bitfield(n, s))
        for i in s:
            truth[i] += 1
    for p in range(0, 300, 3):
        pp.peer_lost(str(p))
        for i in sets[p]:
            truth[i] -= 1
    assert [pp.availability(i) for i in range(n)] == truth


# ---------------------------------------------------------------- picking rules


def test_never_requests_piece_peer_lacks_nor_held_nor_twice() -> None:
    pp = make(num_pieces=8)
    pp.peer_bitfield("a", bitfield(8, [1, 2, 5]))
    pp.we_have(2)
    got = drain(pp, "a")
    assert {b.index for b in got} == {1, 5}
    assert len(set(got)) == len(got) == 8
    pp.peer_bitfield("b", bitfield(8, [1, 5]))
    assert drain(pp, "b") == []  # all requested, but no endgame while 0,3,4,6,7 are missing


def test_blocked_piece_first_when_peer_has_it() -> None:
    pp = make(num_pieces=32, blocks_per_piece=4)
    pp.peer_have_all("a")
    pp.peer_bitfield("b", bitfield(32, [1, 2]))
    pp.set_cursor(0, 8, now=0.0, deadline_spacing=1.0)
    pp.set_blocked(20)
    first = pp.pick("a", 6, 0.0)
    assert [b.index for b in first[:4]] == [20] * 4
    assert [b.index for b in first[4:]] == [0, 0]  # then the window, earliest deadline
    # b lacks piece 20: blocked priority does not apply, it takes its window piece
    assert {b.index for b in pp.pick("b", 4, 0.0)} == {1}


def test_deadline_order_earliest_first() -> None:
    pp = make(num_pieces=32, blocks_per_piece=2)
    pp.peer_have_all("a")
    pp.set_deadline(30, 5.0)
    pp.set_deadline(10, 2.0)
    pp.set_cursor(4, 3, now=0.0, deadline_spacing=2.0)  # 4@0, 5@2, 6@4
    order = [b.index for b in pp.pick("a", 12, 1.0)]
    assert order[:10] == [4, 4, 5, 5, 10, 10, 6, 6, 30, 30]
    assert set(order[10:]).isdisjoint({4, 5, 6, 10, 30})


def test_rarest_first_after_random_first_phase() -> None:
    n = 40
    for seed in range(20):
        pp = make(num_pieces=n, blocks_per_piece=1, seed=seed)
        for i in range(4):  # leave the random-first phase
            pp.we_have(i)
        rng = random.Random(seed)
        rare = rng.sample(range(4, n), 3)
        for p in range(6):
            pp.peer_bitfield(f"p{p}", bitfield(n, [i for i in range(4, n) if i not in rare]))
        pp.peer_have_all("seed")  # rare pieces: availability 1, the rest 7
        got = pp.pick("seed", 3, 0.0)
        assert sorted(b.index for b in got) == sorted(rare)


def test_rarest_ties_broken_at_random() -> None:
    chosen = set()
    for seed in range(40):
        pp = make(num_pieces=20, blocks_per_piece=1, seed=seed)
        for i in range(4):
            pp.we_have(i)
        pp.peer_have_all("a")
        chosen.add(pp.pick("a", 1, 0.0)[0].index)
    assert len(chosen) >= 8  # 16 equally rare pieces


def test_random_first_phase_ignores_rarity() -> None:
    picks = []
    for seed in range(40):
        pp = make(num_pieces=20, blocks_per_piece=1, seed=seed)
        pp.peer_bitfield("x", bitfield(20, range(10, 20)))
        pp.peer_have_all("seed")  # pieces 0..9 rarer
        picks.append(pp.pick("seed", 1, 0.0)[0].index)
    assert any(i >= 10 for i in picks) and any(i < 10 for i in picks)


def test_partial_pieces_continued_first() -> None:
    pp = make(num_pieces=30, blocks_per_piece=8)
    for i in range(4):
        pp.we_have(i)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    first = pp.pick("a", 3, 0.0)
    assert len({b.index for b in first}) == 1
    second = pp.pick("b", 5, 0.0)
    assert {b.index for b in second} == {first[0].index}  # b finishes a's piece
    assert pp.is_endgame is False


def test_priority_zero_never_requested_and_restorable() -> None:
    pp = make(num_pieces=12, blocks_per_piece=2)
    pp.peer_have_all("a")
    pp.set_range_priority(0, 6, 0)
    pp.set_priority(9, 0)
    got = drain(pp, "a")
    assert {b.index for b in got} == {6, 7, 8, 10, 11}
    assert pp.priority(9) == 0 and pp.priority(6) == 1
    for b in got:
        pp.block_received("a", b.index, b.begin)
    assert not pp.is_endgame  # nothing outstanding, nothing to duplicate
    assert drain(pp, "a") == []
    pp.set_range_priority(3, 6, 1)  # the origin read of 3..5 failed
    assert {b.index for b in drain(pp, "a")} == {3, 4, 5}
    with pytest.raises(LocalProtocolError):
        pp.set_priority(1, 7)


def test_peer_lost_returns_requests_to_pool() -> None:
    pp = make(num_pieces=6)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    taken = pp.pick("a", 10, 0.0)
    assert pp.outstanding("a") == taken
    pp.peer_lost("a")
    assert pp.outstanding("a") == [] and pp.num_outstanding == 0
    assert pp.availability(0) == 1
    again = drain(pp, "b")
    assert set(taken) <= set(again)
    assert len(again) == 6 * 4
    pp.check_invariants()


def test_choke_and_timeout_return_requests() -> None:
    pp = make(num_pieces=4)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    got = pp.pick("a", 5, 0.0)
    pp.request_timed_out("a", got[0])
    pp.request_timed_out("a", got[0])  # unknown now: ignored
    assert got[0] not in pp.outstanding("a")
    assert got[0] in pp.pick("b", 4, 0.0)  # it went back to a partial piece, picked first
    pp.peer_choked("a")
    assert pp.outstanding("a") == []
    assert set(got[1:]) <= set(pp.pick("b", 20, 0.0))
    pp.check_invariants()


def test_endgame_duplicates_cancelled_on_receipt() -> None:
    pp = make(num_pieces=2, blocks_per_piece=2, max_duplicates=1)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    pp.peer_have_all("c")
    a = drain(pp, "a")
    assert len(a) == 4 and pp.is_endgame
    assert drain(pp, "b") == []  # nothing is late yet: no duplicates
    b = drain(pp, "b", now=100.0)
    assert sorted(b) == sorted(a)  # late: every block once more
    assert drain(pp, "c", now=100.0) == []  # max_duplicates=1: at most 2 requesters
    cancels = pp.block_received("b", a[0].index, a[0].begin)
    assert cancels == [("a", a[0])]
    assert a[0] not in pp.outstanding("a") and a[0] not in pp.outstanding("b")
    assert pp.block_received("a", a[0].index, a[0].begin) == []  # late duplicate
    assert drain(pp, "c", now=100.0) == []
    pp.check_invariants()


def test_endgame_only_once_every_wanted_block_is_requested() -> None:
    pp = make(num_pieces=5, blocks_per_piece=2)
    pp.peer_bitfield("a", bitfield(5, [0, 1]))
    pp.peer_bitfield("b", bitfield(5, [0, 1, 2]))
    pp.set_priority(4, 0)  # comes from the origin: does not hold endgame back
    drain(pp, "a")
    assert not pp.is_endgame  # piece 2 is available from b and unrequested
    assert {r.index for r in drain(pp, "b")} == {2}
    assert not pp.is_endgame  # piece 3: nobody has it yet
    assert drain(pp, "b") == []
    pp.peer_have("b", 3)
    assert {r.index for r in drain(pp, "b")} == {3}  # endgame, but a is not late yet
    assert {r.index for r in drain(pp, "b", 100.0)} == {0, 1}  # late at a: duplicated
    assert pp.is_endgame


def test_piece_failed_makes_blocks_requestable_and_names_sources() -> None:
    pp = make(num_pieces=2, blocks_per_piece=2)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    ra = pp.pick("a", 1, 0.0)
    rb = pp.pick("b", 1, 0.0)
    for peer, r in (("a", ra[0]), ("b", rb[0])):
        pp.block_received(peer, r.index, r.begin)
    assert ra[0].index == rb[0].index and pp.is_finished(ra[0].index)
    assert pp.piece_failed(ra[0].index) == frozenset({"a", "b"})
    assert not pp.is_finished(ra[0].index)
    again = pp.pick("a", 2, 0.0)
    assert sorted(again) == sorted([ra[0], rb[0]])
    pp.check_invariants()


def test_we_have_cancels_outstanding_and_is_final() -> None:
    pp = make(num_pieces=3)
    pp.peer_have_all("a")
    pp.set_blocked(1)
    got = pp.pick("a", 2, 0.0)
    assert {b.index for b in got} == {1}
    cancels = pp.we_have(1)  # arrived from the origin
    assert sorted(cancels) == sorted(("a", b) for b in got)
    assert pp.outstanding("a") == [] and pp.have(1)
    assert 1 not in {b.index for b in drain(pp, "a")}
    assert pp.block_received("a", 1, 0) == []
    with pytest.raises(RemoteProtocolError):
        pp.block_received("a", 0, 5)


def test_peer_is_interesting() -> None:
    pp = make(num_pieces=4)
    assert not pp.peer_is_interesting("a")
    pp.peer_have("a", 2)
    assert pp.peer_is_interesting("a")
    pp.set_priority(2, 0)
    assert not pp.peer_is_interesting("a")
    pp.set_priority(2, 1)
    pp.we_have(2)
    assert not pp.peer_is_interesting("a")


def test_peer_missing_counts_what_the_peer_announced() -> None:
    pp = make(num_pieces=12)
    assert pp.peer_missing("never heard of") == 12
    pp.peer_bitfield("a", bytes([0b1010_0000, 0b0001_0000]))  # pieces 0, 2, 11
    assert pp.peer_missing("a") == 9
    pp.peer_have("a", 5)
    pp.peer_have("a", 5)  # a repeat changes nothing
    assert pp.peer_missing("a") == 8
    pp.peer_have_all("b")
    assert pp.peer_missing("b") == 0
    pp.peer_lost("a")
    assert pp.peer_missing("a") == 12


def test_pipeline_depth_from_rate() -> None:
    pp = make()
    assert pp.pipeline_depth("new") == 8
    pp.update_rate("p", 1_000_000)  # 1 s of 1 MB/s = 62 blocks
    assert pp.pipeline_depth("p") == 62
    pp.update_rate("p", 10e9)
    assert pp.pipeline_depth("p") == 500
    pp.update_rate("p", 100)
    assert pp.pipeline_depth("p") == 8


def test_urgent_pieces_prefer_fast_peers() -> None:
    pp = make(num_pieces=40, blocks_per_piece=4)
    for i in range(4):
        pp.we_have(i)
    pp.peer_have_all("fast")
    pp.peer_have_all("slow")
    pp.update_rate("fast", 10_000_000)
    pp.update_rate("slow", 50_000)  # a block takes 0.33 s
    pp.set_cursor(4, 4, now=0.0, deadline_spacing=0.1)
    slow = pp.pick("slow", 8, 0.0)
    # slow cannot meet 0.1..0.3 s; piece 4 (due now) is fair game for anyone
    assert [b.index for b in slow[:4]] == [4] * 4
    assert {b.index for b in slow[4:]} & {5, 6, 7} == set()
    fast = pp.pick("fast", 12, 0.0)
    # piece 4 is due, but not late at slow yet: no duplicates, fast takes the window
    assert [b.index for b in fast] == [5] * 4 + [6] * 4 + [7] * 4
    for b in fast:
        pp.block_received("fast", b.index, b.begin)
    # 1.5 s on, slow's first blocks of piece 4 are late (expected twice 0.33 s per block
    # behind its queue): an idle fast peer duplicates those, not the ones still on time
    dup = [b for b in pp.pick("fast", 8, 1.5) if b.index == 4]
    assert dup and dup == slow[: len(dup)] and len(dup) < 4
    pp.check_invariants()


def test_time_critical_duplicate_of_late_block() -> None:
    pp = make(num_pieces=10, blocks_per_piece=2)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    pp.update_rate("a", 16 * 1024)  # one block a second
    pp.update_rate("b", 16 * 1024)
    pp.set_blocked(5)
    got = pp.pick("a", 2, 0.0)  # expected by 1 s and 2 s, late after 2 s and 4 s
    assert {b.index for b in got} == {5}
    assert all(b.index != 5 for b in pp.pick("b", 2, 1.0))
    pp.peer_choked("b")
    dup = pp.pick("b", 2, 2.5)
    assert dup[0] == got[0] and all(b.index != 5 for b in dup[1:])
    assert sorted(pp.requesters(got[0])) == ["a", "b"]
    assert pp.block_received("b", got[0].index, got[0].begin) == [("a", got[0])]
    pp.check_invariants()


def test_no_time_critical_duplicates_from_a_peer_with_a_full_queue() -> None:
    """Lateness while every queue is full is congestion: duplicating only adds to it."""
    pp = make(num_pieces=10, blocks_per_piece=2, min_pipeline=4)
    pp.peer_have_all("a")
    pp.peer_have_all("b")
    pp.update_rate("a", 16 * 1024)
    pp.update_rate("b", 16 * 1024)
    pp.set_blocked(5)
    late = pp.pick("a", 2, 0.0)  # piece 5, late after 2 s and 4 s
    busy = pp.pick("b", 4, 0.5)  # b's queue is full with other pieces
    assert {r.index for r in late} == {5} and all(r.index != 5 for r in busy)
    # Both of a's blocks are late by now, but b's queue is full: free blocks only.
    more = pp.pick("b", 2, 5.0)
    assert more and all(r.index != 5 for r in more)
    assert pp.requesters(late[0]) == ["a"] and pp.requesters(late[1]) == ["a"]
    queued = busy + more
    for r in queued[:-3]:  # b delivers all but three: room for one duplicate
        pp.block_received("b", r.index, r.begin)
    dup = [r for r in pp.pick("b", 4, 5.0) if r.index == 5]
    assert len(dup) == 1 and sorted(pp.requesters(dup[0])) == ["a", "b"]
    pp.check_invariants()


def test_deterministic_given_seed() -> None:
    def run(seed: int) -> list[BlockRequest]:
        pp = make(num_pieces=64, seed=seed)
        for p in range(5):
            pp.peer_bitfield(f"p{p}", bitfield(64, random.Random(p).sample(range(64), 30)))
        out = []
        for p in range(5):
            out += pp.pick(f"p{p}", 9, 0.0)
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)


# ---------------------------------------------------------------- properties


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, int, list[list[int]], int]:
    n = draw(st.integers(1, 40))
    bpp = draw(st.integers(1, 5))
    peers = draw(st.lists(st.lists(st.integers(0, n - 1), max_size=n), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**32))
    return n, bpp, peers, seed


@settings(max_examples=150)
@given(swarms(), st.data())
def test_property_random_operations_keep_rules(
    swarm: tuple[int, int, list[list[int]], int], data: st.DataObject
) -> None:
    """Random interleavings of picks, receipts, timeouts, chokes, losses, hash failures,
    exclusions and HAVEs: a pick only names pieces the peer has, we lack and want; a
    block already outstanding is asked again only in endgame; the incremental state
    always equals a recomputation from scratch."""
    n, bpp, peer_sets, seed = swarm
    pp = PiecePicker[str](n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    names = [f"p{i}" for i in range(len(peer_sets))]
    for name, s in zip(names, peer_sets, strict=True):
        pp.peer_bitfield(name, bitfield(n, s))
    excluded: set[int] = set()
    kinds = "pick pick pick recv recv timeout choke lost have fail exclude include peerhave"
    ops = st.sampled_from(kinds.split())
    for _ in range(data.draw(st.integers(1, 60))):
        op = data.draw(ops)
        peer = data.draw(st.sampled_from(names))
        if op == "pick":
            before = {(b.index, b.begin) for p in names for b in pp.outstanding(p)}
            got = pp.pick(peer, data.draw(st.integers(0, 12)), 0.0)
            assert len(set(got)) == len(got)
            for b in got:
                assert pp.peer_has(peer, b.index)
                assert not pp.have(b.index)
                assert b.index not in excluded
                if (b.index, b.begin) in before:  # a duplicate: endgame only
                    assert pp.is_endgame
                    assert len(pp.requesters(b)) <= 3
        elif op == "recv":
            mine = pp.outstanding(peer)
            if mine:
                b = data.draw(st.sampled_from(mine))
                others = set(pp.requesters(b)) - {peer}
                cancels = pp.block_received(peer, b.index, b.begin)
                assert {c[0] for c in cancels} == others and all(c[1] == b for c in cancels)
                if pp.is_finished(b.index):
                    if data.draw(st.booleans()):
                        pp.we_have(b.index)
                    else:
                        assert peer in pp.piece_failed(b.index)
        elif op == "timeout":
            mine = pp.outstanding(peer)
            if mine:
                pp.request_timed_out(peer, data.draw(st.sampled_from(mine)))
        elif op == "choke":
            pp.peer_choked(peer)
            assert pp.outstanding(peer) == []
        elif op == "lost":
            held = pp.outstanding(peer)
            pp.peer_lost(peer)
            for b in held:
                assert peer not in pp.requesters(b)
            pp.peer_bitfield(peer, bitfield(n, data.draw(st.lists(st.integers(0, n - 1)))))
        elif op == "have":
            pp.we_have(data.draw(st.integers(0, n - 1)))
        elif op == "fail":
            pp.piece_failed(data.draw(st.integers(0, n - 1)))
        elif op == "exclude":
            i = data.draw(st.integers(0, n - 1))
            pp.set_priority(i, 0)
            excluded.add(i)
        elif op == "include":
            i = data.draw(st.integers(0, n - 1))
            pp.set_priority(i, 1)
            excluded.discard(i)
        else:
            pp.peer_have(peer, data.draw(st.integers(0, n - 1)))
        pp.check_invariants()


@settings(max_examples=150)
@given(swarms(), st.data())
def test_property_rarest_first_and_blocked_first(
    swarm: tuple[int, int, list[list[int]], int], data: st.DataObject
) -> None:
    n, bpp, peer_sets, seed = swarm
    pp = PiecePicker[str](n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    for i, s in enumerate(peer_sets):
        pp.peer_bitfield(f"p{i}", bitfield(n, s))
    for i in data.draw(st.lists(st.integers(0, n - 1), min_size=min(4, n), max_size=n)):
        pp.we_have(i)
    peer = data.draw(st.sampled_from([f"p{i}" for i in range(len(peer_sets))]))
    lacking = [i for i in range(n) if pp.peer_has(peer, i) and not pp.have(i)]
    if data.draw(st.booleans()) and lacking:
        blocked = data.draw(st.sampled_from(lacking))
        pp.set_blocked(blocked)
        got = pp.pick(peer, data.draw(st.integers(1, 8)), 0.0)
        assert got[0].index == blocked
    elif pp.num_have >= 4:
        got = pp.pick(peer, 1, 0.0)
        assert bool(got) == bool(lacking)
        if got:
            rarest = min(pp.availability(i) for i in lacking)
            assert pp.availability(got[0].index) == rarest


@settings(max_examples=60)
@given(swarms())
def test_property_after_peer_lost_everything_requestable(
    swarm: tuple[int, int, list[list[int]], int],
) -> None:
    n, bpp, peer_sets, seed = swarm
    pp = PiecePicker[str](n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    for i, s in enumerate(peer_sets):
        pp.peer_bitfield(f"p{i}", bitfield(n, s))
        pp.pick(f"p{i}", 7, 0.0)
    pp.peer_have_all("seed")
    for i in range(len(peer_sets)):
        pp.peer_lost(f"p{i}")
    assert pp.num_outstanding == 0
    got = drain(pp, "seed")
    assert len(got) == n * bpp and len(set(got)) == len(got)


class _ScanningPicker(PiecePicker[str]):
    """The endgame as it was before the late-request heap: every busy piece the peer
    has is scanned for late requests. The reference the faster picker must agree with."""

    def _take_endgame(
        self, ps: Any, cand_bits: int, want: int, now: float, out: list[BlockRequest]
    ) -> None:
        limit = 1 + self.settings.max_duplicates
        n1 = self.num_pieces - 1
        single: list[tuple[int, int]] = []
        others: list[tuple[int, float, int, int]] = []
        m = self._busy & cand_bits
        while m and len(single) < want:
            top = m.bit_length() - 1
            m ^= 1 << top
            index = n1 - top
            for block, reqs in self._pieces[index].requests.items():
                if (
                    len(reqs) < limit
                    and (index, block) not in ps.requests
                    and now > min(r.expected_by for r in reqs)
                ):
                    if len(reqs) == 1:
                        single.append((index, block))
                        if len(single) == want:
                            break
                    else:
                        others.append((len(reqs), reqs[0].requested_at, index, block))
        options = single
        if len(single) < want and others:
            others.sort()
            options += [(index, block) for _, _, index, block in others[: want - len(single)]]
        for index, block in options:
            dl = self._pieces[index]
            dl.requests[block].append(self._new_request(ps, index, block, now))
            out.append(self._piece_block(index, dl, block))


@settings(max_examples=150)
@given(swarms(), st.data())
def test_property_endgame_same_as_scanning_every_busy_piece(
    swarm: tuple[int, int, list[list[int]], int], data: st.DataObject
) -> None:
    """The endgame finds late requests through a heap of expiries and a bitset of pieces
    that may hold one; in lockstep with a picker that scans every busy piece, under
    random picks, receipts, timeouts, chokes, losses, rates and a clock moving on, both
    ask for exactly the same blocks."""
    n, bpp, peer_sets, seed = swarm
    fast = PiecePicker[str](n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    ref = _ScanningPicker(n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    names = [f"p{i}" for i in range(len(peer_sets))]
    for pp in (fast, ref):
        for name, s in zip(names, peer_sets, strict=True):
            pp.peer_bitfield(name, bitfield(n, s))
    now = 0.0
    kinds = "pick pick pick pick recv recv timeout choke lost have rate"
    for _ in range(data.draw(st.integers(1, 80))):
        op = data.draw(st.sampled_from(kinds.split()))
        peer = data.draw(st.sampled_from(names))
        now += data.draw(st.sampled_from([0.0, 0.01, 0.5, 3.0]))
        if op == "pick":
            want = data.draw(st.integers(0, 12))
            assert fast.pick(peer, want, now) == ref.pick(peer, want, now)
        elif op in ("recv", "timeout"):
            mine = fast.outstanding(peer)
            assert mine == ref.outstanding(peer)
            if mine:
                b = data.draw(st.sampled_from(mine))
                for pp in (fast, ref):
                    if op == "timeout":
                        pp.request_timed_out(peer, b)
                    else:
                        pp.block_received(peer, b.index, b.begin)
                        if pp.is_finished(b.index):
                            pp.we_have(b.index)
        elif op == "choke":
            fast.peer_choked(peer)
            ref.peer_choked(peer)
        elif op == "lost":
            bits = bitfield(n, data.draw(st.lists(st.integers(0, n - 1))))
            for pp in (fast, ref):
                pp.peer_lost(peer)
                pp.peer_bitfield(peer, bits)
        elif op == "have":
            i = data.draw(st.integers(0, n - 1))
            assert fast.we_have(i) == ref.we_have(i)
        else:
            rate = data.draw(st.sampled_from([0.0, 1e3, 1e5, 1e7]))
            fast.update_rate(peer, rate)
            ref.update_rate(peer, rate)
    fast.check_invariants()


@given(st.integers(1, 2**1100), st.data())
def test_nth_set_bit_matches_a_count(mask: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, mask.bit_count() - 1))
    positions = [i for i in range(mask.bit_length()) if mask >> i & 1]
    assert _nth_set_bit(mask, n) == positions[n]


@given(swarms(), st.data())
def test_peers_without_is_peer_has_for_each(
    swarm: tuple[int, int, list[list[int]], int], data: st.DataObject
) -> None:
    n, bpp, peer_sets, seed = swarm
    pp = PiecePicker[str](n, bpp * BS, n * bpp * BS, rng=random.Random(seed))
    for i, s in enumerate(peer_sets):
        pp.peer_bitfield(f"p{i}", bitfield(n, s))
    index = data.draw(st.integers(0, n - 1))
    asked = data.draw(st.lists(st.sampled_from([f"p{i}" for i in range(8)] + ["stranger"])))
    assert pp.peers_without(index, asked) == [k for k in asked if not pp.peer_has(k, index)]
    with pytest.raises(LocalProtocolError):
        pp.peers_without(n, asked)


# ---------------------------------------------------------------- whole downloads


def simulate(seed: int, streaming: bool) -> int:
    """Fake peers with random bitfields (plus late joiners) feed blocks back in random
    order, with timeouts, chokes, disconnects, hash failures and an origin exclusion.
    Returns the number of rounds to completion; fails if the download stalls."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    bpp = rng.randint(1, 6)
    tail = rng.randint(0, bpp * BS - 1)
    pp = PiecePicker[str](n, bpp * BS, n * bpp * BS - tail, rng=random.Random(seed))
    peers = [f"p{i}" for i in range(rng.randint(1, 8))]
    holdings = {p: {i for i in range(n) if rng.random() < 0.4} for p in peers}
    holdings[peers[-1]] |= set(range(n))  # somebody can supply every piece, eventually
    connected: set[str] = set()
    received: dict[int, set[int]] = {}
    corrupt = {i for i in range(n) if rng.random() < 0.1}  # fails its first hash check
    origin = set(range(n // 3, n // 2))
    pp.set_range_priority(n // 3, n // 2, 0)
    cursor = 0
    for rnd in range(10_000):
        now = rnd * 0.1
        for p in peers:
            if p not in connected and rng.random() < 0.5:
                connected.add(p)
                pp.peer_bitfield(p, bitfield(n, holdings[p]))
                pp.update_rate(p, rng.choice([0, 20_000, 2_000_000]))
        if streaming:
            while cursor < n and pp.have(cursor):
                cursor += 1
            pp.set_cursor(cursor, 4, now, 0.2)
            pp.set_blocked(cursor if cursor < n else None)
        if origin and rng.random() < 0.2:  # the origin read lands, or fails and returns
            i = origin.pop()
            if rng.random() < 0.5:
                pp.we_have(i)
            else:
                pp.set_priority(i, 1)
        for p in sorted(connected):
            want = pp.pipeline_depth(p) - len(pp.outstanding(p))
            for b in pp.pick(p, want, now):
                assert b.index in holdings[p] and not pp.have(b.index)
                if len(pp.requesters(b)) > 1:  # duplicates: endgame or time-critical only
                    assert pp.is_endgame or streaming
                    assert len(pp.requesters(b)) <= 3
            out = pp.outstanding(p)
            rng.shuffle(out)
            for b in out[: rng.randint(0, len(out))]:
                pp.block_received(p, b.index, b.begin)
                received.setdefault(b.index, set()).add(b.begin)
                if pp.is_finished(b.index):
                    if b.index in corrupt:
                        corrupt.discard(b.index)
                        pp.piece_failed(b.index)
                    else:
                        pp.we_have(b.index)
            roll = rng.random()
            if roll < 0.03 and out:
                pp.request_timed_out(p, out[-1])
            elif roll < 0.05:
                pp.peer_choked(p)
            elif roll < 0.07:
                pp.peer_lost(p)
                connected.discard(p)
            elif roll < 0.1:
                extra = rng.randrange(n)
                holdings[p].add(extra)
                pp.peer_have(p, extra)
        if pp.is_complete:
            pp.check_invariants()
            assert pp.num_outstanding == 0
            return rnd
    raise AssertionError(f"download {seed} did not complete")


@settings(max_examples=300)
@given(st.integers(0, 2**32), st.booleans())
def test_whole_download_always_completes(seed: int, streaming: bool) -> None:
    simulate(seed, streaming)


@pytest.mark.parametrize("seed", range(3))
def test_larger_download_completes_with_endgame(seed: int) -> None:
    """A 600-piece torrent, 24 peers: all phases, endgame included, in one run."""
    rng = random.Random(seed)
    n, peers = 600, [f"p{i}" for i in range(24)]
    pp = PiecePicker[str](n, 4 * BS, n * 4 * BS, rng=random.Random(seed))
    for p in peers:
        pp.peer_bitfield(p, bitfield(n, [i for i in range(n) if rng.random() < 0.5]))
        pp.update_rate(p, rng.choice([50_000, 500_000]))
    pp.peer_have_all("seed")
    peers.append("seed")
    saw_endgame = False
    cancelled = 0
    for rnd in range(2_000):
        for p in peers:
            pp.pick(p, pp.pipeline_depth(p) - len(pp.outstanding(p)), float(rnd))
            out = pp.outstanding(p)
            for b in out[: rng.randint(0, 6)]:
                cancelled += len(pp.block_received(p, b.index, b.begin))
                if pp.is_finished(b.index):
                    pp.we_have(b.index)
            saw_endgame |= pp.is_endgame
        if pp.is_complete:
            break
    assert pp.is_complete and pp.num_outstanding == 0
    assert saw_endgame and cancelled > 0
    pp.check_invariants()


def test_pipeline_floor_keeps_the_bytes_in_flight_of_16_kib_blocks() -> None:
    """The floors count 16 KiB blocks: with larger blocks they shrink in proportion, down
    to one block, so the bytes asked of a slow peer stay ~min_pipeline x 16 KiB (8 x 16
    KiB = 128 KiB: one 256 KiB block, not two)."""

    def floor(block: int) -> int:
        picker: PiecePicker[str] = PiecePicker(
            16, 256 * 1024, 16 * 256 * 1024, block_size=block, rng=random.Random(0)
        )
        return picker.pipeline_depth("slow")

    assert [floor(kib * 1024) for kib in (16, 32, 64, 128, 256)] == [8, 4, 2, 1, 1]
    # Its rate still deepens it: 1 s of 1 MiB/s in 256 KiB blocks.
    picker: PiecePicker[str] = PiecePicker(
        16, 256 * 1024, 16 * 256 * 1024, block_size=256 * 1024, rng=random.Random(0)
    )
    picker.update_rate("fast", 1024 * 1024)
    assert picker.pipeline_depth("fast") == 4


@given(st.sets(st.integers(0, 63)), st.sets(st.integers(0, 63)))
def test_peer_piece_count_is_what_the_peer_announced(first: set[int], later: set[int]) -> None:
    """The count the uploader orders requesters by (UploadOrder): a bitfield, then haves
    (repeats counted once); 0 for a peer never heard of or lost."""
    pp = make(num_pieces=64)
    assert pp.peer_piece_count("a") == 0
    pp.peer_bitfield("a", bitfield(64, first))
    assert pp.peer_piece_count("a") == len(first)
    for index in later:
        pp.peer_have("a", index)
    assert pp.peer_piece_count("a") == len(first | later)
    pp.peer_lost("a")
    assert pp.peer_piece_count("a") == 0
