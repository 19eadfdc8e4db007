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
