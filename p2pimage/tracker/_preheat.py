"""Preheat jobs: "every node of this cluster, fetch these layers now" (pure, no I/O).

A job names one repository of the cluster's swarm registry and the layer digests an
image's manifest lists; the tracker keeps the jobs of each cluster apart from its
swarms (the announce policy never sees them), nodes poll for the jobs meant for them
and report when they hold the layers. The board takes ``now`` from its caller and its
epoch (a restart marker) from the caller's randomness. docs/protocol.md §4.2 is the
wire contract.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from p2pimage.errors import RemoteProtocolError

__all__ = [
    "DEFAULT_JOB_TTL_S",
    "MAX_JOBS_PER_CLUSTER",
    "MAX_PREHEAT_BODY",
    "MAX_PREHEAT_LAYERS",
    "PreheatBoard",
    "PreheatBoardFull",
    "PreheatError",
    "PreheatJob",
    "PreheatLayer",
    "PreheatPoll",
    "PreheatReport",
    "PreheatSpec",
    "parse_preheat_poll",
    "parse_preheat_report",
    "parse_preheat_request",
]

#: A job lives this long after submission; long enough for a node that restarts or
#: joins late in a rollout to pick it up, short enough that the board stays small.
DEFAULT_JOB_TTL_S = 3600.0
#: Live jobs per cluster. One per image of a rollout; beyond this a submission is refused
#: (the oldest jobs are not dropped silently: their progress is what a pipeline waits on).
MAX_JOBS_PER_CLUSTER = 64
#: Layers per job: images have tens of layers; an index over many platforms, hundreds.
MAX_PREHEAT_LAYERS = 512
#: Request bodies: 512 layers × ~120 bytes of JSON each, with room to spare.
MAX_PREHEAT_BODY = 128 * 1024
#: Nodes remembered per job (reports beyond it are refused).
MAX_NODES_PER_JOB = 10_000
_MAX_ERROR = 300

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The OCI distribution spec's repository name grammar.
_REPOSITORY = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
# Node selectors: shell globs over node names (Kubernetes node names are DNS labels).
_SELECTOR = re.compile(r"^[A-Za-z0-9.*?\[\]!_-]{1,253}(?:,[A-Za-z0-9.*?\[\]!_-]{1,253})*$")


class PreheatError(RemoteProtocolError):
    """A preheat request or report that is malformed, or names an unknown job."""


class PreheatBoardFull(PreheatError):
    """The cluster already has its limit of live jobs (HTTP 429)."""


@dataclass(frozen=True, slots=True)
class PreheatLayer:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class PreheatSpec:
    """What a submitter asks for: the layers of ``repository`` on the nodes ``nodes``
    selects (comma-separated shell globs over node names; None: every node)."""

    repository: str
    layers: tuple[PreheatLayer, ...]
    nodes: str | None = None
    image: str | None = None  # the reference the submitter resolved, for people

    def selects(self, node: str) -> bool:
        if self.nodes is None:
            return True
        return any(fnmatch.fnmatchcase(node, glob) for glob in self.nodes.split(","))


@dataclass(frozen=True, slots=True)
class PreheatReport:
    job: int
    result: Literal["done", "failed"]
    error: str | None = None


@dataclass
class PreheatJob:
    id: int
    cluster: str
    spec: PreheatSpec
    submitted_by: str
    created_at: float
    expires_at: float
    results: dict[str, str] = field(default_factory=dict)  # node → "done" | "failed"
    errors: dict[str, str] = field(default_factory=dict)  # node → why it failed

    def count(self, result: str) -> int:
        return sum(1 for r in self.results.values() if r == result)

    def to_json(self, *, progress: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "repository": self.spec.repository,
            "image": self.spec.image,
            "nodes": self.spec.nodes,
            "layers": [{"digest": la.digest, "size": la.size} for la in self.spec.layers],
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
        if progress:
            out["submitted_by"] = self.submitted_by
            out["nodes_done"] = self.count("done")
            out["nodes_failed"] = self.count("failed")
            out["results"] = dict(sorted(self.results.items()))
            out["errors"] = dict(sorted(self.errors.items()))
        return out


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_PREHEAT_BODY:
        raise PreheatError(f"{what} exceeds {MAX_PREHEAT_BODY} bytes")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise PreheatError(f"{what} is not JSON") from None
    except RecursionError:  # the size bound allows ~128 k levels; the decoder gives up first
        raise PreheatError(f"{what} nests too deeply") from None
    if not isinstance(value, dict):
        raise PreheatError(f"{what} is not a JSON object")
    return value


def parse_preheat_request(body: bytes) -> PreheatSpec:
    """``POST /preheat`` body → :class:`PreheatSpec`; anything else raises
    :class:`PreheatError` (never another exception)."""
    obj = _json_object(body, "preheat request")
    repository = obj.get("repository")
    if (
        not isinstance(repository, str)
        or len(repository) > 255
        or not _REPOSITORY.match(repository)
    ):
        raise PreheatError("'repository' must be a repository name (e.g. team/app)")
    layers = obj.get("layers")
    if not isinstance(layers, list) or not layers:
        raise PreheatError("'layers' must be a non-empty list of {digest, size}")
    if len(layers) > MAX_PREHEAT_LAYERS:
        raise PreheatError(f"at most {MAX_PREHEAT_LAYERS} layers per job")
    parsed: dict[str, PreheatLayer] = {}
    for item in layers:
        if not isinstance(item, dict):
            raise PreheatError("each layer must be an object {digest, size}")
        digest, size = item.get("digest"), item.get("size")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise PreheatError("a layer's 'digest' must be sha256:<64 lowercase hex>")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**53:
            raise PreheatError(f"layer {digest}: 'size' must be a non-negative integer")
        parsed.setdefault(digest, PreheatLayer(digest, size))
    nodes = obj.get("nodes")
    if nodes is not None and (not isinstance(nodes, str) or not _SELECTOR.match(nodes)):
        raise PreheatError("'nodes' must be comma-separated shell globs over node names")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or len(image) > 512):
        raise PreheatError("'image' must be a string of at most 512 characters")
    return PreheatSpec(repository, tuple(parsed.values()), nodes, image)


@dataclass(frozen=True, slots=True)
class PreheatPoll:
    """The tracker's answer to a node's ``GET /preheat``: the jobs to run, by id."""

    epoch: str
    cursor: int
    jobs: tuple[tuple[int, PreheatSpec], ...]


def parse_preheat_poll(body: bytes) -> PreheatPoll:
    """``GET /preheat`` answer → :class:`PreheatPoll`, each job checked as a submission
    is; anything else raises :class:`PreheatError`."""
    obj = _json_object(body, "preheat poll answer")
    epoch, cursor, jobs = obj.get("epoch"), obj.get("cursor"), obj.get("jobs")
    if not isinstance(epoch, str) or not isinstance(cursor, int) or not isinstance(jobs, list):
        raise PreheatError("a preheat poll answer has 'epoch', 'cursor' and 'jobs'")
    parsed: list[tuple[int, PreheatSpec]] = []
    for job in jobs:
        job_id = job.get("id") if isinstance(job, dict) else None
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
            raise PreheatError("each preheat job has an integer 'id'")
        parsed.append((job_id, parse_preheat_request(json.dumps(job).encode())))
    return PreheatPoll(epoch, cursor, tuple(parsed))


def parse_preheat_report(body: bytes) -> PreheatReport:
    """``POST /preheat/report`` body → :class:`PreheatReport` (or :class:`PreheatError`)."""
    obj = _json_object(body, "preheat report")
    job, result, error = obj.get("job"), obj.get("result"), obj.get("error")
    if not isinstance(job, int) or isinstance(job, bool) or job < 1:
        raise PreheatError("'job' must be a job id")
    if result not in ("done", "failed"):
        raise PreheatError("'result' must be 'done' or 'failed'")
    if error is not None and not isinstance(error, str):
        raise PreheatError("'error' must be a string")
    return PreheatReport(job, result, error[:_MAX_ERROR] if error else None)


class PreheatBoard:
    """The preheat jobs of every cluster, in the tracker's memory.

    Job ids grow from 1 for the life of the board; ``epoch`` changes when the board is
    new (a tracker restart), so a node polling with an old cursor starts over.
    """

    def __init__(
        self,
        epoch: str,
        *,
        ttl_s: float = DEFAULT_JOB_TTL_S,
        max_jobs: int = MAX_JOBS_PER_CLUSTER,
    ) -> None:
        self.epoch = epoch
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, dict[int, PreheatJob]] = {}
        self._next_id = 1

    def expire(self, now: float) -> None:
        for cluster in list(self._jobs):
            jobs = self._jobs[cluster]
            for job_id in [i for i, j in jobs.items() if j.expires_at <= now]:
                del jobs[job_id]
            if not jobs:
                del self._jobs[cluster]

    def submit(self, cluster: str, spec: PreheatSpec, submitted_by: str, now: float) -> PreheatJob:
        """A new job for ``cluster``; :class:`PreheatError` when the cluster has
        ``max_jobs`` live jobs."""
        self.expire(now)
        jobs = self._jobs.setdefault(cluster, {})
        if len(jobs) >= self.max_jobs:
            raise PreheatBoardFull(
                f"cluster {cluster!r} has {len(jobs)} live preheat jobs (the limit); "
                "wait for some to expire"
            )
        job = PreheatJob(self._next_id, cluster, spec, submitted_by, now, now + self.ttl_s)
        self._next_id += 1
        jobs[job.id] = job
        return job

    def job(self, cluster: str, job_id: int, now: float) -> PreheatJob | None:
        self.expire(now)
        return self._jobs.get(cluster, {}).get(job_id)

    def jobs(self, cluster: str, now: float) -> list[PreheatJob]:
        self.expire(now)
        return sorted(self._jobs.get(cluster, {}).values(), key=lambda j: j.id)

    def pending(self, cluster: str, node: str, since: int, now: float) -> list[PreheatJob]:
        """Jobs of ``cluster`` after ``since`` that select ``node`` and it has not
        reported on yet, oldest first."""
        return [
            j
            for j in self.jobs(cluster, now)
            if j.id > since and node not in j.results and j.spec.selects(node)
        ]

    def cursor(self) -> int:
        """The newest job id handed out so far (0: none)."""
        return self._next_id - 1

    def report(self, cluster: str, node: str, report: PreheatReport, now: float) -> PreheatJob:
        """Record ``node``'s result for a live job of its own cluster."""
        job = self.job(cluster, report.job, now)
        if job is None:
            raise PreheatError(f"no live preheat job {report.job} in this cluster")
        if not job.spec.selects(node):
            raise PreheatError(f"preheat job {report.job} does not select node {node!r}")
        if node not in job.results and len(job.results) >= MAX_NODES_PER_JOB:
            raise PreheatError(f"preheat job {report.job} has {MAX_NODES_PER_JOB} reports")
        job.results[node] = report.result
        if report.error:
            job.errors[node] = report.error
        else:
            job.errors.pop(node, None)
        return job

    def stats(self, now: float) -> tuple[int, int, int]:
        """(live jobs, node reports 'done', node reports 'failed') over all clusters."""
        self.expire(now)
        jobs = [j for js in self._jobs.values() for j in js.values()]
        return (
            len(jobs),
            sum(j.count("done") for j in jobs),
            sum(j.count("failed") for j in jobs),
        )
