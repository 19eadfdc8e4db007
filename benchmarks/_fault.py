"""What one fault scenario reports, and the tools every scenario shares.

A scenario is an async function taking a :class:`FaultBed` (a scratch directory) and
returning a :class:`FaultResult`. It starts a real cluster on loopback (the CNCF
registry, the sidecar, trackers, node daemons: :mod:`daemons.testbed.localcluster` and
the helpers here), pushes a small image, injects its fault while clients pull through the
node mirrors, and ends by checking that every surviving node holds the layers with the
right digests. It counts:

* ``pulls_failed``: client pulls (through a surviving node's mirror) that did not answer
  200 with the right bytes;
* ``wrong_bytes_served``: bytes of answers whose SHA-256 did not match the digest asked;
* ``bytes_lost``: verified bytes a node had to fetch again after a fault it should have
  survived (a restart, a tracker or Redis outage).

Each family of scenarios lives in its own module (``benchmarks._faults_*``) with a list
``FAULTS``; ``tests/test_reliability.py`` runs every one of them as a test and
``python -m benchmarks.reliability`` tabulates them into docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from daemons.node import NodeDaemon, NodeSettings, run_node
from daemons.testbed.localcluster import LocalCluster
from daemons.tracker import TrackerSettings, run_tracker
from p2pimage.oci.image import BuiltImage, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.storage.cache import blob_key, registry_namespace

REPO = "demo/app"


@dataclass(frozen=True)
class FaultBed:
    """Where a scenario may put its files (a fresh directory per scenario)."""

    tmp: Path


@dataclass(frozen=True)
class FaultResult:
    pulls: int
    """Client pulls made through surviving nodes (each one checked against its digest)."""
    pulls_failed: int = 0
    bytes_lost: int = 0
    wrong_bytes_served: int = 0
    nodes_surviving: int = 0
    nodes_holding: int = 0
    """Surviving nodes whose cache holds every layer, complete, with the right SHA-256."""
    detail: str = ""

    @property
    def passed(self) -> bool:
        return (
            self.pulls > 0
            and self.pulls_failed == 0
            and self.bytes_lost == 0
            and self.wrong_bytes_served == 0
            and self.nodes_holding == self.nodes_surviving
        )


@dataclass(frozen=True)
class Fault:
    name: str
    """Short, unique, stable: the row of the table in docs/reliability.md."""
    what: str
    """What the scenario does to the cluster."""
    run: Callable[[FaultBed], Awaitable[FaultResult]]
    quick: bool = True
    """Part of ``--quick`` (one case of each kind)."""
    slow: bool = False
    """Marked ``slow`` in the tests (not in the default run)."""


# --- client pulls ----------------------------------------------------------------------


@dataclass
class Pulls:
    """Every client pull of a scenario, and what it got."""

    registry_host: str
    made: int = 0
    failed: int = 0
    wrong_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    async def pull(self, mirror_url: str, digest: str, *, repo: str = REPO) -> bool:
        """GET the blob through the mirror like a runtime; True when it matched."""
        self.made += 1
        try:
            async with httpx.AsyncClient(timeout=120) as http:
                r = await http.get(
                    f"{mirror_url}/v2/{repo}/blobs/{digest}", params={"ns": self.registry_host}
                )
        except httpx.HTTPError as exc:
            self.failed += 1
            self.errors.append(f"{digest[:15]}: {exc!r}")
            return False
        if r.status_code != 200:
            self.failed += 1
            self.errors.append(f"{digest[:15]}: HTTP {r.status_code}")
            return False
        if "sha256:" + hashlib.sha256(r.content).hexdigest() != digest:
            self.failed += 1
            self.wrong_bytes += len(r.content)
            self.errors.append(f"{digest[:15]}: wrong bytes")
            return False
        return True

    async def doomed(self, mirror_url: str, digest: str) -> None:
        """A pull through a node about to be killed: not counted (its runtime dies with it,
        or falls back to the registry by itself)."""
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=120) as http:
                await http.get(
                    f"{mirror_url}/v2/{REPO}/blobs/{digest}", params={"ns": self.registry_host}
                )

    def result(self, **kwargs: Any) -> FaultResult:
        detail = kwargs.pop("detail", "")
        if self.errors:
            detail = (detail + "; " if detail else "") + "; ".join(self.errors[:3])
        return FaultResult(
            pulls=self.made,
            pulls_failed=self.failed,
            wrong_bytes_served=self.wrong_bytes,
            detail=detail,
            **kwargs,
        )


# --- nodes and trackers started by a scenario (so it can kill and restart them) ---------


def node_settings(
    cluster: LocalCluster, name: str, tracker_url: str | None = None, **overrides: Any
) -> NodeSettings:
    """Settings of a node of ``cluster`` (as local_cluster makes them), with overrides."""
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "node_name": name,
        "peer_host": "127.0.0.1",
        "peer_port": 0,
        "sidecar_url": cluster.sidecar_url,
        "tracker_url": tracker_url or cluster.tracker_url,
        "credential": cluster.credential,
        "upstreams": {cluster.registry_host: cluster.relay_url},
        "default_upstream": cluster.relay_url,
        "cache_dir": cluster.workdir / name / "cache",
        "allow_plain_http_join": True,
        "log_json": True,
        "stall_timeout_s": 5.0,
    }
    return NodeSettings.model_validate({**fields, **overrides})


@dataclass
class RunningNode:
    settings: NodeSettings
    mirror_url: str
    daemon: NodeDaemon
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self) -> None:
        """Kill the node (its mirror, peer and swarms) and wait until it is gone."""
        self.scope.cancel()
        await self.stopped.wait()

    async def wait_p2p(self, timeout_s: float = 15.0) -> None:
        """Until the node holds a token and its peer runs (else pulls go direct)."""
        with trio.fail_after(timeout_s):
            while self.daemon.layers.node is None:
                await trio.sleep(0.05)

    def verified_bytes(self) -> int:
        """Layer bytes this node holds verified in its live swarms."""
        peer = self.daemon.layers.node
        return sum(s.storage.bytes_have for s in peer.swarms.values()) if peer else 0

    def fetched_bytes(self) -> int:
        """Layer bytes this node run took from anywhere: peers, origin reads, fallback."""
        layers = self.daemon.layers
        return layers.peer_bytes() + layers.origin_bytes() + layers.stats.bytes_served["registry"]


async def start_node(
    nursery: trio.Nursery, settings: NodeSettings, **run_kwargs: Any
) -> RunningNode:
    """Run ``run_node(settings)`` in ``nursery``; the node stops with ``.stop()``."""
    scope = trio.CancelScope()
    stopped = trio.Event()
    daemons: list[NodeDaemon] = []

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await run_node(
                    settings, task_status=task_status, daemon_ready=daemons.append, **run_kwargs
                )
        finally:
            stopped.set()

    url = await nursery.start(run)
    return RunningNode(settings, url, daemons[0], scope, stopped)


@dataclass
class RunningTracker:
    settings: TrackerSettings
    url: str
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def tracker_settings(cluster: LocalCluster, port: int, **overrides: Any) -> TrackerSettings:
    """A tracker of ``cluster`` on a fixed loopback port (so it can come back on it)."""
    fields: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "sidecar_url": cluster.sidecar_url,
        "registry_url": cluster.relay_url,
        "interval_s": 2,
        "min_interval_s": 1,
        "fetcher_interval_s": 1,
        "log_json": True,
    }
    return TrackerSettings.model_validate({**fields, **overrides})


async def start_tracker(nursery: trio.Nursery, settings: TrackerSettings) -> RunningTracker:
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await run_tracker(settings, task_status=task_status)
        finally:
            stopped.set()

    base = await nursery.start(run)
    return RunningTracker(settings, f"{base}/announce", scope, stopped)


# --- the image and the end state --------------------------------------------------------


async def push(cluster: LocalCluster, image: BuiltImage, repo: str = REPO) -> str:
    async with RegistryClient(cluster.registry.url) as client:
        return await push_image(client, repo, "v1", image)


def big_layers(image: BuiltImage, threshold: int) -> list[str]:
    """Digests of the layers that go through the swarm (and the cache)."""
    return [layer.digest for layer in image.layers if len(layer.data) >= threshold]


def holds(daemon: NodeDaemon, cluster: LocalCluster, digest: str) -> bool:
    """The node's cache holds ``digest`` complete, and its bytes hash to it."""
    key = blob_key(registry_namespace(cluster.relay_url), digest.removeprefix("sha256:"))
    cache = daemon.layers.cache
    if not cache.is_complete(key):
        return False
    sha = hashlib.sha256()
    with open(cache.blob_path(key), "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest() == digest


async def count_holding(
    daemons: list[NodeDaemon], cluster: LocalCluster, digests: list[str], timeout_s: float = 20
) -> int:
    """How many of ``daemons`` hold every one of ``digests`` (waiting up to ``timeout_s``
    for the last completions to be recorded)."""
    with trio.move_on_after(timeout_s):
        while not all(holds(d, cluster, g) for d in daemons for g in digests):
            await trio.sleep(0.1)
    return sum(all(holds(d, cluster, g) for g in digests) for d in daemons)


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (an event in the system, not a delay) until it holds."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


@contextlib.asynccontextmanager
async def nodes_of(
    nursery: trio.Nursery, cluster: LocalCluster, count: int, **overrides: Any
) -> AsyncIterator[list[RunningNode]]:
    """``count`` nodes of ``cluster`` started by the scenario, with p2p ready."""
    nodes = [
        await start_node(nursery, node_settings(cluster, f"node-{i}", **overrides))
        for i in range(count)
    ]
    for node in nodes:
        await node.wait_p2p()
    yield nodes
