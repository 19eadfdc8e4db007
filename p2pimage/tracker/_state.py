"""Where swarms live: in this process (default) or in Redis, shared by tracker replicas.

Both backends expose the same small async interface, :class:`TrackerState`. The policy is
a pure function of one :class:`~._policy.SwarmRecord`; a backend's job is to run it atomically:

* :class:`MemoryState` passes the live swarm object (no ``await`` between read and
  write, so under trio the call is atomic) and drops swarms that emptied.
* :class:`RedisState` stores one JSON document per swarm, reads it, runs the function on
  the decoded swarm, and writes it back with a compare-and-set Lua script on a version
  stamp; on a lost race it re-reads and re-runs (optimistic concurrency, like WATCH/MULTI
  but in one round trip). SwarmRecord documents carry a TTL of twice the peer timeout, so
  abandoned swarms vanish without a sweeper. The document grows with the swarm (≈60
  bytes per peer): fine for hundreds of peers per swarm, the case it is built for. Each
  record's part is encoded once and kept, but every write still copies and sends the
  whole document: a join costs O(peers) bytes (a cold start of N peers into one swarm,
  O(N²) bytes; docs/benchmarks.md, "Tracker cold start").

A swarm is keyed by ``(cluster, info_hash)``; the cluster always comes from the verified
token, never from the request.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import trio

from p2pimage.auth.tokens import ProofReplayCache
from p2pimage.errors import P2PImageError, StateUnavailableError

from ._policy import FetcherRange, PeerRecord, SwarmRecord

__all__ = [
    "MemoryState",
    "RedisState",
    "StateConflictError",
    "StateStats",
    "StateUnavailableError",
    "SwarmKey",
    "TrackerState",
    "swarm_from_json",
    "swarm_to_json",
]

T = TypeVar("T")


class SwarmKey(NamedTuple):
    """A swarm's identity: the cluster (from a verified token) and the info-hash. A
    tuple, so that hashing and comparing it (a dict lookup per swarm of every announce)
    run in C."""

    cluster: str
    info_hash: bytes


@dataclass(frozen=True, slots=True)
class StateStats:
    swarms: int
    seeders: int
    leechers: int
    largest_swarm: int = 0


class TrackerState(Protocol):
    async def update(self, key: SwarmKey, fn: Callable[[SwarmRecord], T]) -> T:
        """Run ``fn`` on the swarm ``key`` (created empty if absent) and persist it.

        ``fn`` may run more than once (Redis retries); it must touch nothing but the swarm.
        """
        ...

    async def update_many(
        self, updates: Sequence[tuple[SwarmKey, Callable[[SwarmRecord], T]]]
    ) -> list[T | P2PImageError]:
        """:meth:`update` for several distinct swarms at once (a batched announce): one
        result per update, in order, each ``fn``'s value or the error (``fn``'s own, or
        the state's unavailability) of that update alone."""
        ...

    async def read(self, keys: Iterable[SwarmKey]) -> list[SwarmRecord | None]:
        """Snapshots of the given swarms (``None`` when absent). Read-only."""
        ...

    async def stats(self, now: float, timeout_s: float) -> StateStats:
        """Live swarms and peers (silent peers not counted)."""
        ...

    async def sweep(self, now: float, timeout_s: float) -> None:
        """Expire silent peers in every swarm and drop empty swarms."""
        ...

    async def claim_nonce(self, key: bytes, expires_at: float, now: float) -> bool | None:
        """Remember a proof nonce until ``expires_at``: True if it is new, False if it was
        claimed before (a replay), None if the replay cache is full."""
        ...


class MemoryState:
    """Swarms in a dict; the default, for one tracker replica."""

    def __init__(self, *, nonces: ProofReplayCache | None = None) -> None:
        self.swarms: dict[SwarmKey, SwarmRecord] = {}
        # Not `nonces or ...`: an empty cache is falsy (it has __len__).
        self.nonces = nonces if nonces is not None else ProofReplayCache()

    async def update(self, key: SwarmKey, fn: Callable[[SwarmRecord], T]) -> T:
        swarm = self.swarms.get(key)
        if swarm is None:
            swarm = self.swarms[key] = SwarmRecord()
        result = fn(swarm)
        if not swarm.peers:
            del self.swarms[key]
        return result

    async def update_many(
        self, updates: Sequence[tuple[SwarmKey, Callable[[SwarmRecord], T]]]
    ) -> list[T | P2PImageError]:
        out: list[T | P2PImageError] = []
        for key, fn in updates:
            swarm = self.swarms.get(key)
            if swarm is None:
                swarm = self.swarms[key] = SwarmRecord()
            try:
                out.append(fn(swarm))
            except P2PImageError as exc:
                out.append(exc)
            if not swarm.peers:
                del self.swarms[key]
        return out

    async def read(self, keys: Iterable[SwarmKey]) -> list[SwarmRecord | None]:
        return [self.swarms.get(k) for k in keys]

    async def stats(self, now: float, timeout_s: float) -> StateStats:
        await self.sweep(now, timeout_s)
        seeders = sum(s.seeders for s in self.swarms.values())
        peers = sum(len(s.peers) for s in self.swarms.values())
        largest = max((len(s.peers) for s in self.swarms.values()), default=0)
        return StateStats(len(self.swarms), seeders, peers - seeders, largest)

    async def sweep(self, now: float, timeout_s: float) -> None:
        for key in list(self.swarms):
            swarm = self.swarms[key]
            swarm.expire(now, timeout_s)
            if not swarm.peers:
                del self.swarms[key]

    async def claim_nonce(self, key: bytes, expires_at: float, now: float) -> bool | None:
        return self.nonces.claim(key, expires_at, now)


# ------------------------------------------------------------------------------ Redis

_VERSION_LEN = 16
# KEYS[1] swarm key, KEYS[2] index set; ARGV[1] expected version ('' = absent),
# ARGV[2] new document ('' = delete), ARGV[3] TTL in ms. Returns 1 when written, else the
# current document ('' when absent), so a lost race costs no extra round trip.
_CAS_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local ver = ''
if cur then ver = string.sub(cur, 1, 16) end
if ver ~= ARGV[1] then return cur or '' end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[2], KEYS[1])
end
return 1
"""
# Retries after lost compare-and-set races before giving up (each one means another
# replica wrote the same swarm in the ~0.3 ms window; 50 in a row means something is wrong).
_MAX_CAS_RETRIES = 50
# Swarms whose last write this replica remembers (a cache, bounded; ~6 KB per 100 peers).
_CACHE_MAX_SWARMS = 10_000


class StateConflictError(StateUnavailableError):
    """The Redis compare-and-set kept losing; the announce is answered with a failure."""


def _unavailable(exc: Exception) -> StateUnavailableError:
    return StateUnavailableError(f"redis: {type(exc).__name__}: {exc}")


def swarm_to_json(swarm: SwarmRecord) -> bytes:
    """The swarm's document. Each peer's part is encoded once and kept on its record, so
    a replica re-writing the swarm it wrote last (the common case) encodes only the
    records that announce made: a join costs a copy of the document, not its encoding."""
    doc = {
        "pieces": swarm.pieces,
        "origin_done": swarm.origin_done,
        "downloads": swarm.downloads,
        "largest_left": swarm.largest_left,
        "leecher_seen_at": swarm.leecher_seen_at,
        "unassigned": swarm.unassigned,
        "stalled": sorted(p.hex() for p in swarm.stalled),  # sorted: one document per state
        "distrusted": sorted(swarm.distrusted),
        "fetchers": [
            [f.peer_id.hex(), f.next, f.end, f.last_progress] for f in swarm.fetchers.values()
        ],
    }
    head = _ENCODE(doc).encode()
    peers = b",".join([p.doc or _peer_json(p) for p in swarm.peers.values()])
    return b"".join((head[:-1], b',"peers":[', peers, b"]}"))


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _peer_json(p: PeerRecord) -> bytes:
    p.doc = _ENCODE(
        [
            p.peer_id.hex(),
            p.host,
            p.port,
            p.left,
            p.last_seen,
            p.zone,
            p.finished_at,
            p.released,
            p.subject,
            p.progress_at,
            p.uploaded,
            p.upload_at,
        ]
    ).encode()
    return p.doc


def swarm_from_json(data: bytes) -> SwarmRecord:
    doc: dict[str, Any] = json.loads(data)
    swarm = SwarmRecord(
        pieces=doc["pieces"],
        origin_done=doc["origin_done"],
        downloads=doc["downloads"],
        largest_left=doc["largest_left"],
        leecher_seen_at=doc["leecher_seen_at"],
        unassigned=[(a, b) for a, b in doc["unassigned"]],
        stalled={bytes.fromhex(p) for p in doc["stalled"]},
        distrusted=set(doc.get("distrusted", ())),
    )
    for pid, nxt, end, progress in doc["fetchers"]:
        raw = bytes.fromhex(pid)
        swarm.fetchers[raw] = FetcherRange(raw, nxt, end, progress)
    for entry in doc["peers"]:
        # Documents written before protocol 3 have the first eight fields only.
        pid, host, port, left, seen, zone, finished, released, *more = entry
        subject, progress_at, uploaded, upload_at = more or (None, seen, 0, seen)
        swarm.add(
            PeerRecord(
                bytes.fromhex(pid),
                host,
                port,
                left,
                seen,
                zone,
                finished,
                released,
                subject,
                progress_at,
                uploaded,
                upload_at,
            )
        )
    return swarm


class RedisState:
    """Swarms in Redis (one JSON document per swarm), shared by tracker replicas.

    ``client`` is a connected ``coredis.Redis`` (``decode_responses=False``) whose
    lifetime the caller owns (``async with client:``).
    """

    def __init__(self, client: Any, *, prefix: str = "p2pimage:tracker:", ttl_s: float = 120.0):
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self._index = prefix + "swarms"
        self._cas = client.register_script(_CAS_SCRIPT)
        self._locks: dict[SwarmKey, list[Any]] = {}
        # Our last write of each swarm (version, swarm), least recently used first.
        self._cache: dict[SwarmKey, tuple[str, SwarmRecord]] = {}
        from coredis import PureToken
        from coredis.exceptions import RedisError

        self._errors = RedisError
        self._nx = PureToken.NX

    def _key(self, key: SwarmKey) -> str:
        # Cluster names are free text: hex keeps the Redis key unambiguous.
        return f"{self.prefix}swarm:{key.cluster.encode().hex()}:{key.info_hash.hex()}"

    @staticmethod
    def _decode(raw: bytes | None) -> tuple[str, SwarmRecord | None]:
        if not raw:
            return "", None
        return raw[:_VERSION_LEN].decode(), swarm_from_json(raw[_VERSION_LEN:])

    async def update(self, key: SwarmKey, fn: Callable[[SwarmRecord], T]) -> T:
        # Announces for one swarm queue here, so this replica never races itself; the
        # compare-and-set only has to settle races between replicas.
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [trio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                return await self._update(key, fn)
        except (self._errors, OSError) as exc:
            raise _unavailable(exc) from None
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    async def _update(
        self,
        key: SwarmKey,
        fn: Callable[[SwarmRecord], T],
        current: tuple[str, SwarmRecord | None] | None = None,
    ) -> T:
        rkey = self._key(key)
        # Optimistic: start from our own last write of this swarm, if any. When no other
        # replica wrote since, the compare-and-set succeeds and the announce costs one
        # round trip and no decoding; otherwise the script hands back the current document.
        cached = self._cache.pop(key, None) if current is None else current
        if cached is None:
            version, swarm = self._decode(await self.client.get(rkey))
        else:
            version, swarm = cached
        for _ in range(_MAX_CAS_RETRIES):
            if swarm is None:
                swarm = SwarmRecord()
            result = fn(swarm)
            new_version = secrets.token_hex(_VERSION_LEN // 2) if swarm.peers else ""
            doc = new_version.encode() + swarm_to_json(swarm) if swarm.peers else b""
            reply = await self._cas(keys=[rkey, self._index], args=[version, doc, str(self.ttl_ms)])
            if reply == 1:
                if swarm.peers:
                    self._remember(key, new_version, swarm)
                return result
            version, swarm = self._decode(reply)
        raise StateConflictError(f"swarm {key.info_hash.hex()} kept changing under us")

    def _remember(self, key: SwarmKey, version: str, swarm: SwarmRecord) -> None:
        if len(self._cache) >= _CACHE_MAX_SWARMS:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (version, swarm)

    async def update_many(
        self, updates: Sequence[tuple[SwarmKey, Callable[[SwarmRecord], T]]]
    ) -> list[T | P2PImageError]:
        """Every swarm's compare-and-set in one pipeline (and the documents this replica
        has not cached in one MGET): a batch costs about two round trips, not one per
        swarm. A swarm whose compare-and-set lost a race is redone alone."""
        keys = [key for key, _ in updates]
        entries = []
        for key in keys:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [trio.Lock(), 0]
            entry[1] += 1
            entries.append((key, entry))
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Batches share swarms: every replica task takes their locks in one order.
                for _, entry in sorted(entries, key=lambda e: e[0]):
                    await stack.enter_async_context(entry[0])
                try:
                    return await self._update_many(updates)
                except (self._errors, OSError) as exc:
                    return [_unavailable(exc)] * len(updates)
        finally:
            for key, entry in entries:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    async def _update_many(
        self, updates: Sequence[tuple[SwarmKey, Callable[[SwarmRecord], T]]]
    ) -> list[T | P2PImageError]:
        rkeys = [self._key(key) for key, _ in updates]
        current: list[tuple[str, SwarmRecord | None] | None] = [
            self._cache.pop(key, None) for key, _ in updates
        ]
        missing = [i for i, c in enumerate(current) if c is None]
        if missing:
            raws = await self.client.mget([rkeys[i] for i in missing])
            for i, raw in zip(missing, raws, strict=True):
                current[i] = self._decode(raw)
        results: list[T | P2PImageError] = []
        writes = []  # (index, new version, swarm, document)
        for i, ((_, fn), cur) in enumerate(zip(updates, current, strict=True)):
            assert cur is not None
            version, swarm = cur
            swarm = swarm if swarm is not None else SwarmRecord()
            try:
                results.append(fn(swarm))
            except P2PImageError as exc:
                results.append(exc)  # fn refused before changing anything: nothing to write
                continue
            new_version = secrets.token_hex(_VERSION_LEN // 2) if swarm.peers else ""
            doc = new_version.encode() + swarm_to_json(swarm) if swarm.peers else b""
            writes.append((i, version, new_version, swarm, doc))
        ttl = str(self.ttl_ms)
        async with self.client.pipeline(transaction=False) as pipe:
            pending = [
                self._cas(keys=[rkeys[i], self._index], args=[version, doc, ttl], client=pipe)
                for i, version, _, _, doc in writes
            ]
        for (i, _, new_version, swarm, _), request in zip(writes, pending, strict=True):
            reply = await request
            if reply == 1:
                if swarm.peers:
                    self._remember(updates[i][0], new_version, swarm)
                continue
            # Another replica wrote this swarm since: run its announce again on that.
            key, fn = updates[i]
            try:
                results[i] = await self._update(key, fn, current=self._decode(reply))
            except P2PImageError as exc:
                results[i] = exc
        return results

    async def read(self, keys: Iterable[SwarmKey]) -> list[SwarmRecord | None]:
        rkeys = [self._key(k) for k in keys]
        if not rkeys:
            return []
        try:
            raws = await self.client.mget(rkeys)
        except (self._errors, OSError) as exc:
            raise _unavailable(exc) from None
        return [None if r is None else swarm_from_json(r[_VERSION_LEN:]) for r in raws]

    async def stats(self, now: float, timeout_s: float) -> StateStats:
        try:
            return await self._stats(now, timeout_s)
        except (self._errors, OSError) as exc:
            raise _unavailable(exc) from None

    async def _stats(self, now: float, timeout_s: float) -> StateStats:
        members = sorted(await self.client.smembers(self._index))
        swarms = seeders = leechers = largest = 0
        gone = []
        for start in range(0, len(members), 500):
            chunk = members[start : start + 500]
            for rkey, raw in zip(chunk, await self.client.mget(chunk), strict=True):
                if raw is None:
                    gone.append(rkey)
                    continue
                swarm = swarm_from_json(raw[_VERSION_LEN:])
                swarm.expire(now, timeout_s)
                if not swarm.peers:
                    continue
                swarms += 1
                seeders += swarm.seeders
                leechers += swarm.leechers
                largest = max(largest, len(swarm.peers))
        if gone:
            await self.client.srem(self._index, gone)
        return StateStats(swarms, seeders, leechers, largest)

    async def sweep(self, now: float, timeout_s: float) -> None:
        # SwarmRecord documents expire by TTL; peers inside one expire at its next announce.
        return None

    async def claim_nonce(self, key: bytes, expires_at: float, now: float) -> bool | None:
        # SET NX with a TTL: one round trip, atomic across replicas; Redis expires it.
        ttl_ms = max(1, int((expires_at - now) * 1000))
        try:
            done = await self.client.set(
                f"{self.prefix}nonce:{key.hex()}", b"1", px=ttl_ms, condition=self._nx
            )
        except (self._errors, OSError) as exc:
            raise _unavailable(exc) from None
        return bool(done)

    async def clear(self) -> None:
        """Delete every key under the prefix (tests and benchmarks)."""
        members = list(await self.client.smembers(self._index))
        if members:
            await self.client.delete(members)
        await self.client.delete([self._index])
        nonces = [k async for k in self.client.scan_iter(match=f"{self.prefix}nonce:*")]
        if nonces:
            await self.client.delete(nonces)
