"""Tests of the tit-for-tat choker."""

from __future__ import annotations

import collections
import contextlib
import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.auth.tokens import SigningKey, TokenIssuer
from p2pimage.errors import LocalProtocolError
from p2pimage.storage.pieces import PieceStorage
from p2pimage.swarm.choker import Choker, PeerStats
from p2pimage.swarm.engine import Swarm, SwarmSettings
from p2pimage.swarm.node import PeerNode


def stats(n: int, interested: bool = True, **kw: float) -> list[PeerStats[str]]:
    return [
        PeerStats(
            f"p{i}",
            interested,
            download_rate=kw.get("down", 1000.0 * i),
            upload_rate=kw.get("up", 500.0 * (n - i)),
        )
        for i in range(n)
    ]


def test_slot_counts_leeching() -> None:
    ch = Choker[str](upload_slots=4, optimistic_slots=1, rng=random.Random(1))
    got = ch.rechoke(stats(10), seeding=False, now=0.0)
    assert len(got) == 5
    assert {"p9", "p8", "p7", "p6"} <= got  # fastest to us
    assert len(ch.optimistic) == 1 and ch.optimistic[0] in got
    assert ch.optimistic[0] not in {"p9", "p8", "p7", "p6"}
    assert ch.unchoked == got


def test_seeding_uses_upload_rate() -> None:
    ch = Choker[str](upload_slots=3, optimistic_slots=0, rng=random.Random(1))
    assert ch.rechoke(stats(10), seeding=True, now=0.0) == {"p0", "p1", "p2"}


def test_interest_matters_only_with_limited_slots() -> None:
    # With unlimited slots every connected peer is unchoked whatever its interest, so
    # the engine need not rechoke on each interested / not interested.
    unlimited: Choker[str] = Choker(upload_slots=None)
    assert not unlimited.interest_matters
    assert unlimited.rechoke(stats(3, interested=False), False, 0.0) == unlimited.rechoke(
        stats(3, interested=True), False, 1.0
    )
    assert Choker[str](upload_slots=0).interest_matters
    assert Choker[str](upload_slots=4).interest_matters


def test_uninterested_never_take_a_slot() -> None:
    peers = [*stats(6), PeerStats("idle", False, download_rate=1e9, upload_rate=1e9)]
    ch = Choker[str](upload_slots=2, optimistic_slots=1, rng=random.Random(3))
    for t in range(0, 300, 10):
        got = ch.rechoke(peers, seeding=bool(t % 20), now=float(t))
        assert "idle" not in got and len(got) == 3
    only_idle = [PeerStats("x", False, 5.0, 5.0)]
    assert ch.rechoke(only_idle, seeding=False, now=400.0) == set()


def test_snubbed_peers_come_last_while_leeching() -> None:
    peers = [PeerStats(f"p{i}", True, download_rate=100.0 * i) for i in range(6)]
    peers[5] = PeerStats("p5", True, download_rate=1e6, snubbed=True)
    ch = Choker[str](upload_slots=2, optimistic_slots=0, rng=random.Random(0))
    assert ch.rechoke(peers, seeding=False, now=0.0) == {"p4", "p3"}
    peers[5] = PeerStats("p5", True, upload_rate=1e6, snubbed=True)
    assert "p5" in ch.rechoke(peers, seeding=True, now=10.0)  # seeding: rates we send
    few = [PeerStats("a", True, 5.0), PeerStats("b", True, 9.0, snubbed=True)]
    few.append(PeerStats("c", True, 1.0, snubbed=True))
    ch1 = Choker[str](upload_slots=2, optimistic_slots=0, rng=random.Random(0))
    assert ch1.rechoke(few, seeding=False, now=0.0) == {"a", "b"}  # no slot left idle


def test_all_interested_unchoked_when_slots_suffice() -> None:
    ch = Choker[str](upload_slots=4, optimistic_slots=1, rng=random.Random(0))
    peers = [*stats(5), PeerStats("u", False, download_rate=1e9)]
    assert ch.rechoke(peers, seeding=False, now=0.0) == {f"p{i}" for i in range(5)}


def test_unlimited_slots_unchoke_every_connected_peer() -> None:
    """``upload_slots=None`` is unlimited: nobody waits for a slot, interested or not
    (so a peer can request the moment it becomes interested), however many there are,
    with no optimistic rotation; rates and snubbing do not matter."""
    coop = Choker[str](upload_slots=None, rng=random.Random(0))
    many = [*stats(200), PeerStats("u", False), PeerStats("s", True, snubbed=True)]
    everyone = {p.key for p in many}
    for t in (0.0, 10.0, 45.0):
        assert coop.rechoke(many, seeding=False, now=t) == everyone
        assert coop.rechoke(many, seeding=True, now=t) == everyone
        assert coop.optimistic == ()
    assert coop.unchoked == everyone
    assert coop.rechoke(many[:3], seeding=False, now=50.0) == {"p0", "p1", "p2"}  # gone: out
    assert coop.rechoke([], seeding=False, now=60.0) == set()


def test_zero_slots_is_zero_not_unlimited() -> None:
    """0 regular slots means only the optimistic unchokes, never "everyone"."""
    peers = stats(6)
    assert Choker[str](upload_slots=0, optimistic_slots=0).rechoke(peers, False, 0.0) == set()
    got = Choker[str](upload_slots=0, optimistic_slots=1, rng=random.Random(1)).rechoke(
        peers, False, 0.0
    )
    assert len(got) == 1 and got <= {p.key for p in peers}


def test_swarm_settings_and_choker_share_one_meaning_of_unlimited() -> None:
    """The swarm's setting goes to the choker unchanged: the default, None, is the
    choker's unlimited (the engine once mapped its 0 to the choker's None)."""
    default = SwarmSettings()
    assert default.upload_slots is None
    ch = Choker[str](upload_slots=default.upload_slots, optimistic_slots=default.optimistic_slots)
    assert ch.rechoke(stats(50, interested=False), False, 0.0) == {f"p{i}" for i in range(50)}


def test_rate_ties_broken_by_rng_deterministically() -> None:
    peers = stats(10, down=7.0)

    def run(seed: int) -> set[str]:
        ch = Choker[str](upload_slots=3, optimistic_slots=0, rng=random.Random(seed))
        return ch.rechoke(peers, seeding=False, now=0.0)

    assert run(4) == run(4)
    assert len({frozenset(run(s)) for s in range(20)}) > 5


def test_optimistic_rotates_only_every_interval_and_covers_everyone() -> None:
    ch = Choker[str](
        upload_slots=2,
        optimistic_slots=1,
        rechoke_interval=10.0,
        optimistic_interval=30.0,
        rng=random.Random(7),
    )
    peers = stats(8)
    history = []
    for t in range(0, 3000, 10):
        assert ch.rechoke_due(float(t))
        got = ch.rechoke(peers, seeding=False, now=float(t))
        assert {"p7", "p6"} <= got and len(got) == 3
        history.append(ch.optimistic[0])
        assert not ch.rechoke_due(t + 9.0)
    # constant within each 30 s period
    for period in range(len(history) // 3):
        assert len(set(history[3 * period : 3 * period + 3])) == 1
    assert set(history) == {f"p{i}" for i in range(6)}


def test_optimistic_replaced_when_it_leaves_or_loses_interest() -> None:
    ch = Choker[str](upload_slots=1, optimistic_slots=1, rng=random.Random(2))
    peers = stats(5)
    ch.rechoke(peers, seeding=False, now=0.0)
    opt = ch.optimistic[0]
    rest = [p for p in peers if p.key != opt]
    got = ch.rechoke(rest, seeding=False, now=10.0)
    assert opt not in got and len(ch.optimistic) == 1
    opt2 = ch.optimistic[0]
    bored = [PeerStats(p.key, p.key != opt2, p.download_rate) for p in rest]
    got = ch.rechoke(bored, seeding=False, now=20.0)
    assert opt2 not in got and len(got) == 2


def test_new_peers_three_times_as_likely_to_be_optimistic() -> None:
    counts: collections.Counter[str] = collections.Counter()
    rng = random.Random(11)
    for _ in range(3000):
        ch = Choker[str](upload_slots=0, optimistic_slots=1, rng=rng)
        old = [PeerStats(f"old{i}", True) for i in range(4)]
        ch.rechoke(old, seeding=False, now=0.0)
        ch.rechoke([*old, PeerStats("new", True)], seeding=False, now=100.0)
        counts["new" if ch.optimistic[0] == "new" else "old"] += 1
    share = counts["new"] / 3000  # expect 3 / (3 + 4) = 0.43
    assert 0.39 < share < 0.47


def test_round_robin_seeding_visits_everyone() -> None:
    ch = Choker[str](upload_slots=3, optimistic_slots=0, seed_mode="round_robin")
    peers = stats(7)
    seen: set[str] = set()
    for t in range(3):
        got = ch.rechoke(peers, seeding=True, now=10.0 * t)
        assert len(got) == 3
        seen |= got
    assert seen == {f"p{i}" for i in range(7)}


def test_bad_configuration_and_duplicate_keys() -> None:
    with pytest.raises(LocalProtocolError):
        Choker[str](upload_slots=-1)
    with pytest.raises(LocalProtocolError):
        Choker[str](optimistic_interval=0)
    with pytest.raises(LocalProtocolError):
        Choker[str]().rechoke([PeerStats("a", True), PeerStats("a", False)], False, 0.0)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(0, 1e6), st.floats(0, 1e6), st.booleans()),
        max_size=30,
    ),
    st.integers(0, 8),
    st.integers(0, 3),
    st.integers(0, 2**32),
    st.booleans(),
)
def test_property_slots_and_interest(
    raw: list[tuple[bool, float, float, bool]],
    slots: int,
    optimistic: int,
    seed: int,
    seeding: bool,
) -> None:
    peers = [PeerStats(i, a, b, c, d) for i, (a, b, c, d) in enumerate(raw)]
    interested = {p.key for p in peers if p.interested}
    ch = Choker[int](upload_slots=slots, optimistic_slots=optimistic, rng=random.Random(seed))
    for t in (0.0, 10.0, 40.0):
        got = ch.rechoke(peers, seeding=seeding, now=t)
        assert got <= interested
        if len(interested) <= slots + optimistic:
            assert got == interested
        else:
            assert len(got) == slots + optimistic
            regular = got - set(ch.optimistic)

            def rank(p: PeerStats[int]) -> tuple[bool, float]:
                if seeding:
                    return (True, p.upload_rate)
                return (not p.snubbed, p.download_rate)

            if regular:
                # no interested peer left out of the regular slots ranks above one in them
                lowest = min(rank(p) for p in peers if p.key in regular)
                assert all(rank(p) <= lowest for p in peers if p.key in interested - regular)


def test_decisions_do_not_depend_on_hash_seed() -> None:
    code = textwrap.dedent(
        """
        import random
        from p2pimage.swarm.choker import Choker, PeerStats
        ch = Choker(upload_slots=3, optimistic_slots=2, rng=random.Random(5))
        peers = [PeerStats(f"peer-{i}", True, float(i % 3)) for i in range(20)]
        for t in range(0, 200, 10):
            print(sorted(ch.rechoke(peers, seeding=False, now=float(t))))
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(h), "PYTHONPATH": "."},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2, 3)
    }
    assert len(outs) == 1


# --- what the engine calls: two real nodes on loopback ---------------------------------


@contextlib.asynccontextmanager
async def _seeder_and_leecher(
    tmp_path: Path, settings: SwarmSettings
) -> AsyncIterator[tuple[PeerNode, Swarm, PeerNode, Swarm]]:
    """A seeder (with ``settings``) of a 1 MiB blob and a leecher dialling it."""
    from .test_swarm import nodes
    from .test_transfer import make_blob

    blob, meta = make_blob(tmp_path, 1024 * 1024)
    issuer = TokenIssuer([SigningKey.generate()], issuer="test")
    async with nodes(2, issuer) as (seed_node, leech_node):
        seeder = await seed_node.add_swarm(
            meta,
            tmp_path / "seed",
            settings=settings,
            storage=PieceStorage.open_complete(blob, meta),
        )
        leecher = await leech_node.add_swarm(meta, tmp_path / "leech")
        leecher.add_peers([seed_node.listen_address])
        yield seed_node, seeder, leech_node, leecher


async def test_engine_rechokes_with_the_default_unlimited_choker(tmp_path: Path) -> None:
    """With the default settings the engine asks the choker (the tick's first rechoke
    saw no peer; the one that unchokes the leecher comes from its arrival or interest),
    and the choker's answer is what goes on the wire: the leecher downloads."""
    async with _seeder_and_leecher(tmp_path, SwarmSettings()) as (_, seeder, leech_node, leecher):
        assert seeder.choker.upload_slots is None
        with trio.fail_after(20):
            await leecher.complete.wait()
        assert leech_node.peer_id in seeder.choker.unchoked
        assert leecher.stats.downloaded_from_peers == leecher.metainfo.length


async def test_engine_chokes_whom_the_choker_chokes(tmp_path: Path) -> None:
    """No regular and no optimistic slot: the engine sends no unchoke, so an interested
    leecher gets nothing (the old engine unchoked everyone whenever the setting was 0)."""
    closed = SwarmSettings(upload_slots=0, optimistic_slots=0)
    async with _seeder_and_leecher(tmp_path, closed) as (_, seeder, _leech, leecher):
        assert seeder.choker.upload_slots == 0
        with trio.fail_after(10):
            while not any(p.peer_interested for p in seeder.peers.values()):
                await trio.sleep(0.02)
        await trio.sleep(1.0)  # loopback moves the whole blob in well under this
        assert seeder.choker.unchoked == frozenset()
        assert leecher.storage.num_have == 0 and leecher.stats.downloaded_from_peers == 0
        assert all(p.am_choking for p in seeder.peers.values())


async def test_engine_gives_a_limited_choker_slot_to_the_interested_leecher(
    tmp_path: Path,
) -> None:
    one = SwarmSettings(upload_slots=1, optimistic_slots=0)
    async with _seeder_and_leecher(tmp_path, one) as (_, seeder, leech_node, leecher):
        with trio.fail_after(20):
            await leecher.complete.wait()
        assert seeder.choker.unchoked <= {leech_node.peer_id}
