"""Talking to the tracker: the HTTP announce client and a swarm's announce loop.

:class:`TrackerClient` sends BEP 3 announces (compact peers, BEP 23) signed with the
node token and a fresh proof of possession per request (``auth``, a
:class:`~p2pimage.sidecar.client.DPoPAuth`), and works against stock trackers
(opentracker) too.
:func:`run_announcer` keeps a swarm announced: ``started`` at once, re-announces quickly
while the swarm is short of peers, ``completed`` the moment the blob completes, and
``stopped`` on the way out. The swarms of one node that share a :class:`TrackerClient`
announce together, in one batched request per interval, where the tracker supports it.
It acts on the tracker's p2pimage extras: an origin assignment starts (or shrinks) an
:class:`~p2pimage.swarm.origin.OriginReader`; a release order closes the swarm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import httpx
import trio

from p2pimage.errors import P2PImageError
from p2pimage.swarm.origin import OriginCredentials, OriginReader
from p2pimage.swarm.policy import AnnounceSchedule, follow_origin
from p2pimage.swarm.ratelimit import RateLimiter
from p2pimage.tracker import (
    MAX_BATCH_SWARMS,
    AnnounceRequest,
    AnnounceResponse,
    Event,
    batch_query,
    encode_announce_batch,
    parse_announce_batch_response,
    parse_announce_response,
)

if TYPE_CHECKING:
    from p2pimage.swarm.engine import Swarm

__all__ = ["AnnounceSettings", "TrackerClient", "TrackerError", "run_announcer"]

log = logging.getLogger("p2pimage.tracker.client")


class TrackerError(P2PImageError):
    """The tracker could not be reached, refused us, or answered garbage."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


# How long the first announce of a batch waits for the node's other swarms to join it.
# Announcers pulled forward (see TrackerClient.wait_due) join within microseconds; the
# rest is slack for a busy event loop. It delays a lone swarm's announce by as much.
DEFAULT_BATCH_WINDOW_S = 0.05
# After a tracker showed it has no batch endpoint, announce singly this long before
# asking again (it may be upgraded in place).
_BATCH_REPROBE_S = 600.0
# Answers to a batch that mean "no such endpoint": a stock tracker, or an older one.
_NO_BATCH_STATUS = frozenset({404, 405, 501})


class _Due(Protocol):
    async def wait_announce_due(self, interval_s: float) -> None: ...


@dataclass(eq=False)
class _Pending:
    """One swarm's announce waiting for its batch."""

    request: AnnounceRequest
    done: trio.Event = field(default_factory=trio.Event)
    # lead: collect and send the batch (the first in line); retry: announce again (the
    # batch was abandoned or the tracker has no batch endpoint); answered: see below.
    state: Literal["queued", "lead", "retry", "answered"] = "queued"
    response: AnnounceResponse | None = None
    error: TrackerError | None = None


@dataclass(eq=False)
class _Waiter:
    """A swarm waiting for its next announce (:meth:`TrackerClient.wait_due`)."""

    not_before: float
    scope: trio.CancelScope


class _NoBatchEndpoint(TrackerError):
    """The tracker has no ``POST /announce/batch`` (a stock or older tracker)."""


class TrackerClient:
    """Announces to one tracker URL over a shared ``httpx.AsyncClient``.

    With ``batch_window_s`` (the default), :meth:`announce` calls from the node's swarms
    that arrive within that window of each other go out as one batched request (a
    p2pimage tracker's ``POST /announce/batch``, docs/protocol.md §4.3), and each caller
    gets its own swarm's answer or error as from a single announce. A tracker without the
    extension (404, 405 or 501 to a batch, or an answer that is no batch answer) is then
    announced to singly; ``batch_window_s=None`` always announces singly.
    """

    def __init__(
        self,
        url: str,
        *,
        http: httpx.AsyncClient,
        auth: httpx.Auth | None = None,
        timeout_s: float = 10.0,
        batch_window_s: float | None = DEFAULT_BATCH_WINDOW_S,
    ) -> None:
        """``auth`` signs each announce (``TokenKeeper.request_auth()``); without it the
        announces carry no credentials (stock trackers, open mode)."""
        self.url = url
        self.http = http
        self.auth = auth
        self.timeout_s = timeout_s
        self.batch_window_s = batch_window_s
        # Requests sent, by kind (tests and metrics read them).
        self.requests_sent = {"single": 0, "batch": 0}
        self._queue: list[_Pending] = []
        self._waiters: set[_Waiter] = set()
        self._single_until = -math.inf

    @property
    def batching(self) -> bool:
        """Whether announces go out batched now."""
        return self.batch_window_s is not None and trio.current_time() >= self._single_until

    async def announce(self, request: AnnounceRequest) -> AnnounceResponse:
        """Announce one swarm (batched with the node's other swarms when the tracker
        supports it); raise :class:`TrackerError` for this swarm's failure."""
        while self.batching:
            if len(self._queue) >= MAX_BATCH_SWARMS or any(
                p.request.info_hash == request.info_hash for p in self._queue
            ):
                break  # a full batch, or this swarm already in it (a stop racing a
                # regular announce): this one goes alone
            slot = _Pending(request)
            self._queue.append(slot)
            try:
                if len(self._queue) == 1:
                    await self._lead(slot)
                else:
                    await self._follow(slot)
            except BaseException:
                self._abandon(slot)
                raise
            if slot.state == "retry":
                continue
            if slot.error is not None:
                raise slot.error
            assert slot.response is not None
            return slot.response
        return await self._announce_one(request)

    async def _lead(self, slot: _Pending) -> None:
        """Collect the batch ``slot`` heads for the window, send it, hand out answers."""
        assert self.batch_window_s is not None
        now = trio.current_time()
        for waiter in list(self._waiters):
            if now >= waiter.not_before:
                waiter.scope.cancel()  # its announce is due soon: ride in this batch
        await trio.sleep(self.batch_window_s)
        batch, self._queue = self._queue, []
        try:
            if len(batch) == 1:
                # Nobody joined: a single announce says the same in a smaller request.
                results: list[AnnounceResponse | TrackerError] = []
                try:
                    results.append(await self._announce_one(slot.request))
                except TrackerError as exc:
                    results.append(exc)
            else:
                results = await self._announce_batch_or_none([p.request for p in batch])
        except BaseException:
            for p in batch:
                if p is not slot:
                    p.state = "retry"
                    p.done.set()
            raise
        if not results:  # no batch endpoint: everyone announces singly
            self._single_until = trio.current_time() + _BATCH_REPROBE_S
            for p in batch:
                p.state = "retry"
                p.done.set()
            return
        for p, result in zip(batch, results, strict=True):
            p.state = "answered"
            if isinstance(result, TrackerError):
                p.error = result
            else:
                p.response = result
            p.done.set()

    async def _follow(self, slot: _Pending) -> None:
        await slot.done.wait()
        if slot.state == "lead":  # the first in line gave up: collect and send instead
            slot.state, slot.done = "queued", trio.Event()
            await self._lead(slot)

    def _abandon(self, slot: _Pending) -> None:
        """``slot``'s caller was cancelled: take it out of a batch still collecting, and
        hand the lead on if it had it."""
        if slot in self._queue:
            first = self._queue[0] is slot
            self._queue.remove(slot)
            if first and self._queue:
                self._queue[0].state = "lead"
                self._queue[0].done.set()

    async def wait_due(self, swarm: _Due, interval_s: float, *, earliest_s: float = 0.0) -> None:
        """Sleep until ``swarm``'s next announce is due (``swarm.wait_announce_due``), or
        until another swarm of this node starts a batch once at least ``earliest_s`` (the
        tracker's ``min interval``) and half of ``interval_s`` have passed: the swarm
        then announces in that batch, and the node's swarms fall into step, one request
        per interval for all of them."""
        if self.batch_window_s is None:
            await swarm.wait_announce_due(interval_s)
            return
        not_before = trio.current_time() + max(earliest_s, interval_s / 2)
        with trio.CancelScope() as scope:
            waiter = _Waiter(not_before, scope)
            self._waiters.add(waiter)
            try:
                await swarm.wait_announce_due(interval_s)
            finally:
                self._waiters.discard(waiter)

    async def _announce_batch_or_none(
        self, requests: list[AnnounceRequest]
    ) -> list[AnnounceResponse | TrackerError]:
        """One batch: per swarm its answer or its error; [] when the tracker has no batch
        endpoint."""
        try:
            answers = await self.announce_batch(requests)
        except _NoBatchEndpoint:
            log.info("tracker %s has no batch endpoint: announcing singly", self.url)
            return []
        except TrackerError as exc:
            return [exc] * len(requests)
        return [
            a
            if a.failure is None
            else TrackerError(f"tracker refused: {a.failure}", reason=a.error)
            for a in answers
        ]

    async def _announce_one(self, request: AnnounceRequest) -> AnnounceResponse:
        self.requests_sent["single"] += 1
        sep = "&" if "?" in self.url else "?"
        url = self.url + sep + request.to_query().decode("ascii")
        try:
            if self.auth is None:
                response = await self.http.get(url, timeout=self.timeout_s)
            else:
                response = await self.http.get(url, auth=self.auth, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise TrackerError(f"tracker {self.url} unreachable: {exc}") from None
        try:
            parsed = parse_announce_response(response.content)
        except P2PImageError as exc:
            raise TrackerError(
                f"tracker answered HTTP {response.status_code} with garbage: {exc}"
            ) from None
        if parsed.failure is not None:
            raise TrackerError(f"tracker refused: {parsed.failure}", reason=parsed.error)
        if response.status_code != 200:
            raise TrackerError(f"tracker answered HTTP {response.status_code}")
        return parsed

    @property
    def batch_url(self) -> str:
        """``POST`` here to announce several swarms at once (a p2pimage tracker only)."""
        return self.url.partition("?")[0].rstrip("/") + "/batch"

    async def announce_batch(self, requests: list[AnnounceRequest]) -> list[AnnounceResponse]:
        """Announce every swarm of ``requests`` in one request (p2pimage trackers; see
        docs/protocol.md, "Batched announces"). One answer per request, in order; a swarm
        the tracker refused has ``failure`` set, as from :meth:`announce`."""
        body = encode_announce_batch(requests)
        url = f"{self.batch_url}?{batch_query(body)}"  # the proof signs the body's digest
        headers = {"Content-Type": "application/x-bittorrent"}
        try:
            if self.auth is None:
                response = await self.http.post(
                    url, content=body, headers=headers, timeout=self.timeout_s
                )
            else:
                response = await self.http.post(
                    url, content=body, headers=headers, auth=self.auth, timeout=self.timeout_s
                )
        except httpx.HTTPError as exc:
            raise TrackerError(f"tracker {self.url} unreachable: {exc}") from None
        self.requests_sent["batch"] += 1
        if response.status_code in _NO_BATCH_STATUS:
            raise _NoBatchEndpoint(f"tracker answered HTTP {response.status_code}")
        try:
            parsed = parse_announce_batch_response(response.content, len(requests))
        except P2PImageError as exc:
            if not response.content.startswith(b"d"):
                raise _NoBatchEndpoint(f"not a bencoded answer: {exc}") from None
            raise TrackerError(
                f"tracker answered HTTP {response.status_code} with garbage: {exc}"
            ) from None
        if response.status_code != 200 and parsed and parsed[0].failure is not None:
            raise TrackerError(f"tracker refused: {parsed[0].failure}", reason=parsed[0].error)
        if response.status_code != 200:
            raise TrackerError(f"tracker answered HTTP {response.status_code}")
        return parsed


@dataclass
class AnnounceSettings:
    """How a swarm announces (the rules: :class:`~p2pimage.swarm.policy.AnnounceSchedule`)."""

    numwant: int = 50
    # Re-announce this soon while the swarm has fewer than ``want_peers`` peers and the
    # tracker knows of more members than we are connected to (a cold start: the first
    # nodes to announce find nobody, and later ones find the first full). The tracker's
    # ``min interval`` takes precedence when larger.
    hungry_interval_s: float = 1.0
    # None: the swarm's dial target (``SwarmSettings.dial_target``), the peers it dials
    # for. With 8, a node that got 8-19 of its dials accepted stopped asking for more: in
    # a cold start the first nodes fill up to ``max_peers`` and refuse the rest, and at
    # 500 simulated nodes most ended with 12-15 peers, some with 8, and the ones with
    # fewest peers, served in turn with 15-40 others at each, finished last (1.42x the
    # bound; 1.22x with 20, with a tracker ``min interval`` of 1-3 s, PolicyConfig's 2 s;
    # at 5 s neither helps: docs/benchmarks.md, "The tail at 500-5,000 nodes").
    want_peers: int | None = None
    # After a failed announce, wait this long (doubling up to the maximum).
    retry_s: float = 1.0
    retry_max_s: float = 30.0
    stop_timeout_s: float = 2.0
    min_gap_s: float = 0.1

    def schedule(self, *, dial_target: int, complete: bool = False) -> AnnounceSchedule:
        """A fresh schedule for a swarm that dials up to ``dial_target`` peers;
        ``complete``: the blob was here before the first announce (no ``completed``
        event is ever sent then)."""
        return AnnounceSchedule(
            hungry_interval_s=self.hungry_interval_s,
            want_peers=dial_target if self.want_peers is None else self.want_peers,
            retry_s=self.retry_s,
            retry_max_s=self.retry_max_s,
            min_gap_s=self.min_gap_s,
            completed_sent=complete,
        )


async def run_announcer(
    swarm: Swarm,
    tracker: TrackerClient,
    *,
    repository: str | None = None,
    origin_http: httpx.AsyncClient | None = None,
    origin_credentials: OriginCredentials | None = None,
    origin_limiter: RateLimiter | None = None,
    settings: AnnounceSettings | None = None,
) -> None:
    """Keep ``swarm`` announced until it closes; act on origin assignments and releases.

    ``repository`` (with the layer digest from the torrent) lets the tracker name this
    node an origin fetcher; origin reads use ``origin_credentials`` (the latest authorised
    client's, and only on their registry) through ``origin_limiter``.
    """
    cfg = settings or AnnounceSettings()
    schedule = cfg.schedule(
        dial_target=swarm.dial_policy.dial_target, complete=swarm.complete.is_set()
    )
    readers: list[OriginReader] = []
    last_announce = -math.inf

    def request(ev: Event) -> AnnounceRequest:
        # Progress of our latest origin range, finished or not: the tracker moves its
        # record (and our lease) forward only on what we report.
        reader = readers[-1] if readers else None
        snap = swarm.announce_snapshot()
        return AnnounceRequest(
            info_hash=snap.info_hash,
            peer_id=snap.peer_id,
            port=snap.port,
            uploaded=snap.uploaded,
            downloaded=snap.downloaded,
            left=snap.left,
            event=ev,
            numwant=cfg.numwant,
            pieces=snap.num_pieces if repository else None,
            digest=snap.digest if repository else None,
            repo=repository,
            origin_next=reader.next_index if reader is not None else None,
        )

    try:
        async with trio.open_nursery() as nursery:
            while not swarm.closed.is_set():
                # Never faster than min_gap_s, whatever wakes us (a lease that ends at once
                # must not turn into a tight loop against the tracker).
                await trio.sleep_until(last_announce + schedule.min_gap_s)
                last_announce = trio.current_time()
                event = schedule.event(swarm.complete.is_set())
                try:
                    response = await tracker.announce(request(event))
                except TrackerError as exc:
                    log.warning("announce %s: %s", swarm.metainfo.sha256[:19], exc)
                    with trio.move_on_after(schedule.failed()):
                        await swarm.closed.wait()
                    continue
                swarm.add_peers(response.peers, mutual=True)
                if origin_http is not None:
                    _apply_origin(
                        swarm,
                        response,
                        readers,
                        nursery,
                        origin_http,
                        origin_credentials,
                        origin_limiter,
                    )
                if response.release and swarm.complete.is_set():
                    log.info("tracker released %s", swarm.metainfo.sha256[:19])
                    swarm.release()
                    break
                interval = schedule.succeeded(
                    event,
                    interval=response.interval,
                    min_interval=response.min_interval,
                    complete=swarm.complete.is_set(),
                    peers=swarm.peer_count,
                    members=response.complete + response.incomplete,
                )
                # Completed, closed, or news: at once; another swarm's batch: early.
                await tracker.wait_due(swarm, interval, earliest_s=response.min_interval or 0)
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(cfg.stop_timeout_s) as scope:
            scope.shield = True
            try:
                await tracker.announce(request(Event.STOPPED))
            except TrackerError as exc:
                log.debug("stopped announce failed: %s", exc)


def _apply_origin(
    swarm: Swarm,
    response: AnnounceResponse,
    readers: list[OriginReader],
    nursery: trio.Nursery,
    http: httpx.AsyncClient,
    credentials: OriginCredentials | None,
    limiter: RateLimiter | None,
) -> None:
    """Follow the tracker's origin assignment (the rule: :func:`follow_origin`)."""
    current = readers[-1] if readers and not readers[-1].finished.is_set() else None
    follow = follow_origin(
        current.range if current is not None else None,
        current.url if current is not None else None,
        response.origin,
    )
    if current is not None:
        if follow.action == "shrink":
            current.shrink(follow.end)
            return
        if follow.action == "extend":
            current.extend(follow.end)  # a new lease on the range we are reading
            return
        current.shrink(current.next_index)  # stop, or start another range
    origin = response.origin
    if follow.action != "start" or origin is None:
        return
    reader = OriginReader(
        swarm,
        origin.url,
        follow.first,
        follow.end,
        client=http,
        credentials=credentials,
        limiter=limiter,
    )
    readers[:] = [reader]  # only the latest range matters for progress reports
    nursery.start_soon(reader.run)

    async def report_when_done() -> None:
        # A finished range (or lease) is reported at once: the tracker extends the lease
        # or hands out more work without waiting for the announce interval.
        await reader.finished.wait()
        swarm.announce_soon()

    nursery.start_soon(report_when_done)
