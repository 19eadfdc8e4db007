"""The Kumar–Ross lower bound on the time to give a file to every node of a swarm.

For a file of ``F`` bytes, one origin uploading at ``u_s`` bytes/s and ``N`` nodes with
upload rates ``u_i`` and download rates ``d_i`` (Kumar and Ross, "Peer-assisted file
distribution: the minimum distribution time", 2006)::

    T_min = max(F / u_s, F / d_min, N·F / (u_s + Σu_i))

Each term is one way the distribution can be limited: the origin must send every byte at
least once, the slowest node must receive every byte, and the N·F bytes the nodes receive
must all be uploaded by someone. No schedule beats the largest of the three; the fluid
model reaches it. The benchmarks, the simulator and the local cluster report their times
against this one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["DistributionBound", "direct_pull_time", "kumar_ross", "kumar_ross_bound"]

#: Which term of the bound is the largest.
Limit = Literal["origin", "download", "upload"]


@dataclass(frozen=True, slots=True)
class DistributionBound:
    """The three terms of the Kumar–Ross bound, in seconds."""

    #: F / u_s: the origin sends every byte once.
    origin_s: float
    #: F / d_min: the slowest node receives every byte.
    download_s: float
    #: N·F / (u_s + Σu_i): every node's copy is uploaded by the origin or a node.
    upload_s: float

    @property
    def seconds(self) -> float:
        """T_min, the largest term."""
        return max(self.origin_s, self.download_s, self.upload_s)

    @property
    def limit(self) -> Limit:
        """The term that sets the bound; on a tie the first of origin, download, upload."""
        if self.origin_s == self.seconds:
            return "origin"
        if self.download_s == self.seconds:
            return "download"
        return "upload"


def _positive(name: str, value: float) -> None:
    # "not > 0" also refuses NaN.
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def kumar_ross(
    size: float, origin_upload: float, uploads: Sequence[float], downloads: Sequence[float]
) -> DistributionBound:
    """The bound's terms for ``size`` bytes, an origin uploading ``origin_upload`` bytes/s
    and one node per entry of ``uploads`` and ``downloads`` (bytes/s, same length).

    A node that uploads nothing has rate 0; download rates and the origin's upload must be
    positive (a node that cannot download never finishes). Raises :class:`ValueError` on
    anything else.
    """
    if not size >= 0:
        raise ValueError(f"size must be >= 0, got {size!r}")
    _positive("origin_upload", origin_upload)
    if len(uploads) != len(downloads):
        raise ValueError(f"{len(uploads)} upload rates for {len(downloads)} download rates")
    if not downloads:
        raise ValueError("no nodes")
    for rate in uploads:
        if not rate >= 0:
            raise ValueError(f"upload rates must be >= 0, got {rate!r}")
    for rate in downloads:
        _positive("download rate", rate)
    nodes = len(downloads)
    return DistributionBound(
        origin_s=size / origin_upload,
        download_s=size / min(downloads),
        upload_s=nodes * size / (origin_upload + sum(uploads)),
    )


def kumar_ross_bound(size: float, nodes: int, origin: float, up: float, down: float) -> float:
    """T_min in seconds for ``nodes`` nodes that all upload ``up`` and download ``down``
    bytes/s, from an origin uploading ``origin`` bytes/s: :func:`kumar_ross` with equal
    links."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes!r}")
    return kumar_ross(size, origin, [up] * nodes, [down] * nodes).seconds


def direct_pull_time(size: float, nodes: int, origin: float) -> float:
    """N·F / u_s: the time for ``nodes`` nodes to each read the file from the origin, the
    baseline the swarm is measured against."""
    if not size >= 0:
        raise ValueError(f"size must be >= 0, got {size!r}")
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes!r}")
    _positive("origin", origin)
    return nodes * size / origin
