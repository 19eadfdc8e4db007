"""The Kumar–Ross bound against values worked out by hand, in each regime and on the
boundaries between them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pimage.bound import DistributionBound, direct_pull_time, kumar_ross, kumar_ross_bound


@pytest.mark.parametrize(
    ("size", "nodes", "origin", "up", "down", "terms", "limit"),
    [
        # origin-bound: 120 B at 10 B/s is 12 s; the nodes could take it in 1.2 s and
        # upload 4·120 B at 10 + 4·100 B/s in 480/410 s.
        (120, 4, 10, 100, 100, (12.0, 1.2, 480 / 410), "origin"),
        # download-bound: the nodes take 120 B at 10 B/s, 12 s; the origin needs 1.2 s
        # and the 2·120 B to upload go at 100 + 2·100 B/s, 0.8 s.
        (120, 2, 100, 100, 10, (1.2, 12.0, 0.8), "download"),
        # aggregate-upload-bound: 10·120 B through 20 + 10·4 B/s is 20 s, against 6 s
        # for the origin and 1.2 s for a download.
        (120, 10, 20, 4, 100, (6.0, 1.2, 20.0), "upload"),
        # nodes that upload nothing: every copy comes from the origin, N·F/u_s.
        (100, 5, 10, 0, 1000, (10.0, 0.1, 50.0), "upload"),
        # nothing to send
        (0, 3, 10, 10, 10, (0.0, 0.0, 0.0), "origin"),
    ],
)
def test_each_regime(
    size: float,
    nodes: int,
    origin: float,
    up: float,
    down: float,
    terms: tuple[float, float, float],
    limit: str,
) -> None:
    bound = kumar_ross(size, origin, [up] * nodes, [down] * nodes)
    assert (bound.origin_s, bound.download_s, bound.upload_s) == pytest.approx(terms)
    assert bound.seconds == pytest.approx(max(terms))
    assert bound.limit == limit
    assert kumar_ross_bound(size, nodes, origin, up, down) == pytest.approx(max(terms))


@pytest.mark.parametrize(
    ("size", "nodes", "origin", "up", "down", "seconds", "limit"),
    [
        # origin = upload: N·u_s = u_s + N·u at u = u_s·(N-1)/N: 2 nodes, u_s 20, u 10
        # give 100/20 = 2·100/(20 + 20) = 5 s.
        (100, 2, 20, 10, 100, 5.0, "origin"),
        # download = upload: 4·100/(50 + 4·12.5) = 4 s = 100/25 (origin: 2 s).
        (100, 4, 50, 12.5, 25, 4.0, "download"),
        # origin = download > upload: 100/10 both, 3·100/(10 + 3·40) ≈ 2.3 s.
        (100, 3, 10, 40, 10, 10.0, "origin"),
        # all three: one node that uploads nothing, downloading as fast as the origin.
        (10, 1, 5, 0, 5, 2.0, "origin"),
    ],
)
def test_boundaries(
    size: float, nodes: int, origin: float, up: float, down: float, seconds: float, limit: str
) -> None:
    bound = kumar_ross(size, origin, [up] * nodes, [down] * nodes)
    assert bound.seconds == pytest.approx(seconds)
    tied = [t for t in (bound.origin_s, bound.download_s, bound.upload_s) if t == seconds]
    assert len(tied) >= 2, bound  # the case sits on a boundary, exactly
    assert bound.limit == limit


def test_unequal_nodes_use_the_slowest_download_and_the_sum_of_uploads() -> None:
    # F = 60, u_s = 30; uploads 0 + 10 + 20 = 30; downloads: slowest 15.
    bound = kumar_ross(60, 30, [0, 10, 20], [30, 60, 15])
    assert bound == DistributionBound(origin_s=2.0, download_s=4.0, upload_s=3.0)
    assert (bound.seconds, bound.limit) == (4.0, "download")


def test_one_node_is_a_swarm_of_one() -> None:
    # F = 60, u_s = 30, one node uploading 10 and downloading 20: origin 2 s, download 3 s,
    # upload 60 / 40 = 1.5 s. One node is the smallest swarm, not bad input.
    assert kumar_ross_bound(60, 1, 30, 10, 20) == 3.0


def test_direct_pulls() -> None:
    assert direct_pull_time(120, 10, 20) == 60.0
    assert direct_pull_time(0, 1, 1) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kumar_ross(-1, 1, [1], [1]), "^size must be >= 0, got -1$"),
        (lambda: kumar_ross(1, 0, [1], [1]), "^origin_upload must be positive, got 0$"),
        (lambda: kumar_ross(1, math.nan, [1], [1]), "^origin_upload must be positive, got nan$"),
        (lambda: kumar_ross(1, 1, [1, 1], [1]), "^2 upload rates for 1 download rates$"),
        (lambda: kumar_ross(1, 1, [], []), "^no nodes$"),
        (lambda: kumar_ross(1, 1, [-1], [1]), "^upload rates must be >= 0, got -1$"),
        (lambda: kumar_ross(1, 1, [1], [0]), "^download rate must be positive, got 0$"),
        (lambda: kumar_ross_bound(1, 0, 1, 1, 1), "^nodes must be >= 1, got 0$"),
        (lambda: direct_pull_time(1, 0, 1), "^nodes must be >= 1, got 0$"),
        (lambda: direct_pull_time(1, 1, 0), "^origin must be positive, got 0$"),
        (lambda: direct_pull_time(-1, 1, 1), "^size must be >= 0, got -1$"),
    ],
)
def test_bad_input_is_a_value_error(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


rates = st.floats(min_value=1e-3, max_value=1e9)


@given(
    size=st.floats(min_value=0, max_value=1e12),
    origin=rates,
    links=st.lists(st.tuples(st.floats(min_value=0, max_value=1e9), rates), min_size=1),
)
def test_the_bound_is_its_largest_term_and_never_beats_one_copy(
    size: float, origin: float, links: list[tuple[float, float]]
) -> None:
    uploads, downloads = [u for u, _ in links], [d for _, d in links]
    bound = kumar_ross(size, origin, uploads, downloads)
    assert bound.seconds == max(bound.origin_s, bound.download_s, bound.upload_s)
    assert bound.seconds == getattr(bound, f"{bound.limit}_s")
    # The origin sends at least one copy, whatever the nodes do.
    assert bound.seconds >= size / origin
    # Faster node uploads never make the bound larger.
    faster = kumar_ross(size, origin, [u * 2 for u in uploads], downloads)
    assert faster.seconds <= bound.seconds
