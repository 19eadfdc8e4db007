"""The picker's pipeline depth: the floor, the rate, and slow start before the first rate.

A model of the rule, kept apart from the picker's own bookkeeping: before a peer's rate is
first measured (``update_rate`` above zero) its depth is the floor plus one per block it
delivered after its first, up to the cap; from then on ``request_queue_time`` seconds at
its rate within [floor, cap]. Per peer, and a peer that reconnects starts again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.swarm.picker import PickerSettings, PiecePicker
from p2pimage.wire import BLOCK_LENGTH

KIB = 1024
PEERS = ("a", "b", "c")


def picker(block_kib: int, pieces: int = 64, slow_start: bool = True) -> PiecePicker[str]:
    block = block_kib * KIB
    return PiecePicker(
        pieces,
        block,
        pieces * block,
        block_size=block,
        rng=random.Random(0),
        settings=PickerSettings(slow_start=slow_start),
    )


@dataclass
class Model:
    """The depth rule, computed from the settings alone."""

    block: int
    slow_start: bool
    s: PickerSettings = field(default_factory=PickerSettings)
    delivered: dict[str, int] = field(default_factory=dict)  # absent: measured
    rate: dict[str, float] = field(default_factory=dict)

    @property
    def floor(self) -> int:
        return max(1, math.ceil(self.s.min_pipeline * min(1.0, BLOCK_LENGTH / self.block)))

    @property
    def cap(self) -> int:
        scale = min(1.0, BLOCK_LENGTH / self.block)
        return max(self.floor, math.ceil(self.s.max_pipeline * scale))

    def meet(self, peer: str) -> None:
        if peer not in self.rate:
            self.rate[peer] = 0.0
            if self.slow_start:
                self.delivered[peer] = 0

    def depth(self, peer: str) -> int:
        if peer in self.delivered:
            return min(self.cap, self.floor + max(0, self.delivered[peer] - 1))
        wanted = math.ceil(self.rate.get(peer, 0.0) * self.s.request_queue_time / self.block)
        return max(self.floor, min(self.cap, wanted))


actions = st.lists(
    st.tuples(
        st.sampled_from(["deliver", "rate", "zero_rate", "lost", "choked"]),
        st.sampled_from(PEERS),
        st.integers(0, 40),  # blocks to deliver, or a rate in units of 64 KiB/s
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([16, 32, 64, 128, 256]), st.booleans(), actions)
def test_property_depth_follows_slow_start_then_the_rate(
    block_kib: int, slow_start: bool, steps: list[tuple[str, str, int]]
) -> None:
    pp = picker(block_kib, slow_start=slow_start)
    model = Model(block_kib * KIB, slow_start)
    now = 0.0
    for action, peer, n in steps:
        now += 0.01
        if action == "deliver":
            # Blocks it was asked for, as the engine delivers them: pick, then receive.
            pp.peer_have_all(peer)
            model.meet(peer)
            for _ in range(n):
                want = pp.pipeline_depth(peer) - len(pp.outstanding(peer))
                pp.pick(peer, want, now)
                asked = pp.outstanding(peer)
                if not asked:
                    break
                pp.block_received(peer, asked[0].index, asked[0].begin)
                if peer in model.delivered:
                    model.delivered[peer] += 1
                if pp.is_finished(asked[0].index):
                    pp.we_have(asked[0].index)
        elif action in ("rate", "zero_rate"):
            rate = 64.0 * KIB * n if action == "rate" else 0.0
            pp.update_rate(peer, rate)
            model.meet(peer)
            model.rate[peer] = rate
            if rate > 0:
                model.delivered.pop(peer, None)
        elif action == "lost":
            pp.peer_lost(peer)
            model.rate.pop(peer, None)
            model.delivered.pop(peer, None)
        else:
            pp.peer_choked(peer)  # its requests return; its slow start goes on
        for p in PEERS:
            assert pp.pipeline_depth(p) == model.depth(p), (p, model)
            assert model.floor <= pp.pipeline_depth(p) <= model.cap
    pp.check_invariants()


def test_slow_start_fills_a_fast_pair_and_spares_a_peer_slower_than_two_blocks_a_tick() -> None:
    """256 KiB blocks: the floor is one block. A fast peer's depth reaches the cap (32,
    the 8 MiB of 500 x 16 KiB) within its first 33 blocks, before the engine's first
    rate; a slow peer that delivers one block before its rate is measured stays at one."""
    pp = picker(256, pieces=128)
    pp.peer_have_all("fast")
    pp.peer_have_all("slow")
    depths = []
    for _ in range(40):
        pp.pick("fast", pp.pipeline_depth("fast") - len(pp.outstanding("fast")), 0.0)
        block = pp.outstanding("fast")[0]
        pp.block_received("fast", block.index, block.begin)
        pp.we_have(block.index)
        depths.append(pp.pipeline_depth("fast"))
    assert depths[:4] == [1, 2, 3, 4] and depths[32:] == [32] * 8

    assert pp.pick("slow", pp.pipeline_depth("slow"), 0.0)
    block = pp.outstanding("slow")[0]
    pp.block_received("slow", block.index, block.begin)
    assert pp.pipeline_depth("slow") == 1  # one block before its rate: no growth
    # Its first rate (the engine's EWMA after one tick: a quarter of 1 block per 0.5 s)
    # ends slow start; later blocks no longer deepen the pipeline, only the rate does.
    pp.update_rate("slow", 0.25 * 256 * KIB / 0.5)
    for _ in range(5):
        pp.pick("slow", 1, 0.0)
        for b in pp.outstanding("slow"):
            pp.block_received("slow", b.index, b.begin)
    assert pp.pipeline_depth("slow") == 1
    pp.update_rate("slow", 4 * 1024 * KIB)  # 4 MiB/s: 1 s of it is 16 blocks
    assert pp.pipeline_depth("slow") == 16


def test_without_slow_start_the_floor_holds_until_the_rate() -> None:
    pp = picker(256, slow_start=False)
    pp.peer_have_all("p")
    for _ in range(10):
        pp.pick("p", pp.pipeline_depth("p") - len(pp.outstanding("p")), 0.0)
        block = pp.outstanding("p")[0]
        pp.block_received("p", block.index, block.begin)
    assert pp.pipeline_depth("p") == 1


def test_a_zero_rate_does_not_end_slow_start_and_a_reconnect_restarts_it() -> None:
    """The engine reports every peer's rate at every tick, zero for one that has sent
    nothing yet: that is no measurement."""
    pp = picker(64)  # floor 2, cap 125
    pp.peer_have_all("p")
    for _ in range(6):
        pp.pick("p", pp.pipeline_depth("p") - len(pp.outstanding("p")), 0.0)
        block = pp.outstanding("p")[0]
        pp.block_received("p", block.index, block.begin)
        pp.update_rate("p", 0.0)
    assert pp.pipeline_depth("p") == 2 + 5
    pp.peer_lost("p")
    assert pp.pipeline_depth("p") == 2
    pp.peer_have_all("p")
    assert pp.pipeline_depth("p") == 2
