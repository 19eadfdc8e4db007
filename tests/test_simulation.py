"""The simulator runs the real picker and tracker policy; pin what it must show."""

from __future__ import annotations

from benchmarks._sim import SimParams, simulate


def test_small_cluster_completes_with_about_one_registry_copy() -> None:
    result = simulate(SimParams(nodes=30, size=32 * 1024 * 1024, pieces=64, seed=3))
    assert result.t_all_s < result.t_direct_s  # every node finished, faster than direct
    assert result.t_all_s >= result.t_bound_s  # nothing beats the physical bound
    assert 0.99 <= result.registry_copies <= 1.3
    assert result.fetchers >= 1


def test_cold_start_does_not_partition_the_swarm() -> None:
    """200 nodes announcing at once: early nodes must not fill up as a clique that
    refuses everyone after them (every node must finish)."""
    result = simulate(
        SimParams(nodes=200, size=16 * 1024 * 1024, pieces=32, seed=5, max_time_s=300)
    )
    assert result.t_all_s < 300


def test_slow_links_with_queued_requests_drop_no_peer() -> None:
    """The calibration's slowest links (0.5 MiB/s, 16 KiB pieces, every node requesting
    from every other): each node has seconds of requests queued, so the engine's
    timeouts (PeerTimeouts, scaled by that drain time) must drop nobody."""
    mib = 1024 * 1024
    result = simulate(
        SimParams(
            nodes=16,
            size=4 * mib,
            pieces=256,
            origin_rate=1 * mib,
            up=mib / 2,
            down=mib / 2,
            tracker=False,
            seed=2,
        )
    )
    assert result.t_all_s < result.t_direct_s
    assert result.stalls == 0
