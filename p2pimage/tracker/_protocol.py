"""Tracker messages, sans-I/O: announce/scrape query parsing, bencoded responses.

Requests arrive as the raw query string of ``GET /announce?...`` (bytes, before any
decoding), because ``info_hash`` and ``peer_id`` are percent-encoded raw 20-byte strings
that no text decoding may touch. Anything malformed raises :class:`TrackerRequestError`
(a :class:`~p2pimage.errors.RemoteProtocolError`) whose message is the ``failure reason``
to send back; garbage never raises anything else.

Responses are always compact (BEP 23): ``peers`` holds 6 bytes per IPv4 peer, ``peers6``
18 bytes per IPv6 peer. p2pimage's own keys sit under one namespaced key, ``p2pimage``
(see docs/protocol.md and :func:`encode_announce_response`).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from p2pimage.errors import BencodeError, LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import Bencodable, bdecode, bencode
from p2pimage.metainfo.torrent import is_digest

__all__ = [
    "DEFAULT_NUMWANT",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_SWARMS",
    "MAX_NUMWANT",
    "MAX_PIECES",
    "MAX_QUERY_BYTES",
    "MAX_SCRAPE_HASHES",
    "AnnounceRequest",
    "AnnounceResponse",
    "Event",
    "OriginAssignment",
    "ScrapeRequest",
    "ScrapeStats",
    "TrackerRequestError",
    "batch_query",
    "check_batch_digest",
    "encode_announce_batch",
    "encode_announce_answer",
    "encode_announce_batch_response",
    "encode_announce_response",
    "encode_failure",
    "encode_scrape_response",
    "pack_peer",
    "parse_announce",
    "parse_announce_batch",
    "parse_announce_batch_response",
    "parse_announce_response",
    "parse_scrape",
]

# A real announce is ~300 bytes; libtorrent's longest (with key, trackerid, ipv6) stays
# under 1 KiB. 4 KiB leaves room for p2pimage's extras and refuses nothing legitimate.
MAX_QUERY_BYTES = 4096
# The BitTorrent spec wiki's customary default when a client sends no numwant.
DEFAULT_NUMWANT = 50
# Our cap (clamped, not refused): 200 compact peers are 1.2 KB, and more peers than a
# client's connection limit (libtorrent's default connections_limit is 200) is wasted work.
MAX_NUMWANT = 200
# Scrapes with more hashes are refused: a node scrapes the few layers it is pulling.
MAX_SCRAPE_HASHES = 64
# A 1 TiB layer in 64 KiB pieces; anything above is a bug or an attack.
MAX_PIECES = 2**24
# bencode's (and libtorrent's) integer range: whatever we accept we can write back.
_MAX_INT = 2**63 - 1
_MAX_INT_DIGITS = len(str(_MAX_INT))
# Tracker responses we parse as a client: a 200-peer compact response is ~1.5 KB; a
# non-compact one ~15 KB. 256 KiB refuses nothing real and bounds a hostile tracker.
_MAX_RESPONSE_BYTES = 256 * 1024

# Announces in one ``POST /announce/batch``: one per layer a node holds or pulls in one
# cluster. 256 is a node with a very large image cache; a client with more sends several
# batches. Each entry is bounded like a query string (MAX_QUERY_BYTES).
MAX_BATCH_SWARMS = 256
MAX_BATCH_BYTES = MAX_BATCH_SWARMS * MAX_QUERY_BYTES
# The batch entries' integer parameters (the others are byte strings).
_BATCH_INTS = frozenset(
    {
        b"port",
        b"uploaded",
        b"downloaded",
        b"left",
        b"compact",
        b"numwant",
        b"p2pimage_pieces",
        b"p2pimage_origin_next",
    }
)

# Parameters a batch entry leaves out at these values, the tracker's defaults (answers
# to a batch are always compact); the counters stay, as a real node's are rarely zero.
_BATCH_DEFAULTS = {b"compact": b"1", b"numwant": b"%d" % DEFAULT_NUMWANT}

# OCI distribution spec repository name grammar, with its 255-character limit.
_REPO_RE = re.compile(
    rb"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*\Z"
)
_MAX_REPO_BYTES = 255


class TrackerRequestError(RemoteProtocolError):
    """A request the tracker refuses; ``str(error)`` is the ``failure reason`` to send."""


class Event(enum.Enum):
    """The announce ``event`` parameter. ``paused`` (BEP 21) behaves like no event."""

    NONE = b""
    STARTED = b"started"
    COMPLETED = b"completed"
    STOPPED = b"stopped"
    PAUSED = b"paused"


# Event by its query value: a dict lookup is a fifth of Enum's own lookup by value.
_EVENTS: dict[bytes, Event] = {e.value: e for e in Event}


@dataclass(slots=True)
class AnnounceRequest:
    """A validated announce; a value, never changed once made (not frozen: a frozen
    dataclass's constructor costs ~4 µs for these 14 fields, ~0.4 µs here, and the
    tracker makes one per swarm of every batched announce).

    p2pimage extras (all optional; stock clients send none of them):

    * ``pieces`` (``p2pimage_pieces``): the layer's piece count, from the torrent.
    * ``digest`` / ``repo`` (``p2pimage_digest``, ``p2pimage_repo``): the layer's OCI
      digest and the repository the peer's client pulls it from; with the tracker's
      registry URL they make the origin blob URL. A peer that sends all three may be named
      an origin fetcher.
    * ``origin_next`` (``p2pimage_origin_next``): origin progress of a fetcher: every
      piece of its assigned range below this index has been read from the registry.
    """

    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int = 0
    downloaded: int = 0
    left: int = 0
    event: Event = Event.NONE
    numwant: int = DEFAULT_NUMWANT
    ip: str | None = None
    key: bytes | None = None
    pieces: int | None = None
    digest: str | None = None
    repo: str | None = None
    origin_next: int | None = None

    def to_query(self) -> bytes:
        """The query string a client sends for this request (the inverse of parsing)."""
        parts = [
            b"info_hash=" + _quote(self.info_hash),
            b"peer_id=" + _quote(self.peer_id),
            b"port=%d" % self.port,
            b"uploaded=%d" % self.uploaded,
            b"downloaded=%d" % self.downloaded,
            b"left=%d" % self.left,
            b"compact=1",
            b"numwant=%d" % self.numwant,
        ]
        if self.event is not Event.NONE:
            parts.append(b"event=" + self.event.value)
        if self.ip is not None:
            parts.append(b"ip=" + _quote(self.ip.encode()))
        if self.key is not None:
            parts.append(b"key=" + _quote(self.key))
        if self.pieces is not None:
            parts.append(b"p2pimage_pieces=%d" % self.pieces)
        if self.digest is not None:
            parts.append(b"p2pimage_digest=" + _quote(self.digest.encode()))
        if self.repo is not None:
            parts.append(b"p2pimage_repo=" + _quote(self.repo.encode()))
        if self.origin_next is not None:
            parts.append(b"p2pimage_origin_next=%d" % self.origin_next)
        return b"&".join(parts)


@dataclass(frozen=True, slots=True)
class ScrapeRequest:
    info_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ScrapeStats:
    complete: int
    incomplete: int
    downloaded: int


@dataclass(frozen=True, slots=True)
class OriginAssignment:
    """Read pieces ``[first_piece, end_piece)`` of the layer from ``url`` (HTTP Range).

    ``lease_end`` (when set, ``first_piece < lease_end <= end_piece``): the fetcher may
    read only up to it, then must announce its progress to extend the lease. The tracker
    never steals leased pieces, so a fetcher that has not yet heard of a steal never reads
    a piece someone else was given.
    """

    url: str
    first_piece: int
    end_piece: int
    lease_end: int | None = None

    @property
    def read_end(self) -> int:
        """Where the fetcher may read up to now."""
        return self.end_piece if self.lease_end is None else self.lease_end


@dataclass(frozen=True, slots=True)
class AnnounceResponse:
    """What a tracker told us (client side), or what we tell a peer (server side)."""

    interval: int = 0
    min_interval: int | None = None
    complete: int = 0
    incomplete: int = 0
    peers: Sequence[tuple[str, int]] = field(default_factory=tuple)
    origin: OriginAssignment | None = None
    release: bool = False
    failure: str | None = None
    # Machine-readable failure code under p2pimage.error (e.g. an AuthError reason).
    error: str | None = None
    # Server side: ``peers`` already in compact form (IPv4, IPv6), to encode as is.
    compact: tuple[bytes, bytes] | None = None


_QUOTE_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _quote(raw: bytes) -> bytes:
    return b"".join(bytes([c]) if c in _QUOTE_SAFE else b"%%%02X" % c for c in raw)


def _pairs(query: bytes, repeatable: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    if not isinstance(query, bytes | bytearray):
        raise TrackerRequestError("query must be bytes")
    if len(query) > MAX_QUERY_BYTES:
        raise TrackerRequestError(f"query longer than {MAX_QUERY_BYTES} bytes")
    out: dict[bytes, list[bytes]] = {}
    for part in bytes(query).split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        key = unquote_to_bytes(name)
        values = out.setdefault(key, [])
        if values and key not in repeatable:
            raise TrackerRequestError(f"repeated parameter {key.decode('latin-1')!r}")
        values.append(unquote_to_bytes(value))
    return out


# One announce's parameters by name: a query's values (bytes), or a batch entry's
# (integers as integers).
_Params = dict[bytes, bytes | int]


def _one(params: _Params, name: bytes) -> bytes | None:
    value = params.get(name)
    if isinstance(value, int):
        raise TrackerRequestError(f"invalid {name.decode()}")
    return value


def _uint(params: _Params, name: bytes, *, default: int | None = None) -> int:
    raw = params.get(name)
    if raw is None:
        if default is None:
            raise TrackerRequestError(f"missing {name.decode()}")
        return default
    if isinstance(raw, int):
        value = raw
    elif not raw.isdigit() or not raw.isascii() or len(raw) > _MAX_INT_DIGITS:
        raise TrackerRequestError(f"invalid {name.decode()}")
    else:
        value = int(raw)
    if not 0 <= value <= _MAX_INT:
        raise TrackerRequestError(f"invalid {name.decode()}")
    return value


def _hash20(raw: bytes | None, name: str) -> bytes:
    if raw is None:
        raise TrackerRequestError(f"missing {name}")
    if len(raw) != 20:
        raise TrackerRequestError(f"invalid {name}: {len(raw)} bytes, expected 20")
    return raw


def _ip(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return str(ipaddress.ip_address(raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise TrackerRequestError("invalid ip: an IP literal is required") from None


def parse_announce(query: bytes) -> AnnounceRequest:
    """Parse the raw query string of an announce; raise :class:`TrackerRequestError`."""
    return _announce_from_pairs({k: v[0] for k, v in _pairs(query, frozenset()).items()})


def _announce_from_pairs(pairs: _Params) -> AnnounceRequest:
    port = _uint(pairs, b"port")
    if not 1 <= port <= 65535:
        raise TrackerRequestError("invalid port")
    # Parameters most announces leave out are looked up only when present (a call
    # fewer each: a microsecond per swarm of a batch).
    event = _EVENTS.get(_one(pairs, b"event") or b"") if b"event" in pairs else Event.NONE
    if event is None:
        raise TrackerRequestError("unknown event")
    pieces: int | None = None
    if b"p2pimage_pieces" in pairs:
        pieces = _uint(pairs, b"p2pimage_pieces")
        if not 1 <= pieces <= MAX_PIECES:
            raise TrackerRequestError("invalid p2pimage_pieces")
    digest = _one(pairs, b"p2pimage_digest") if b"p2pimage_digest" in pairs else None
    if digest is not None and not (digest.isascii() and is_digest(digest.decode("ascii"))):
        raise TrackerRequestError("invalid p2pimage_digest")
    repo = _one(pairs, b"p2pimage_repo") if b"p2pimage_repo" in pairs else None
    if repo is not None and (len(repo) > _MAX_REPO_BYTES or not _REPO_RE.match(repo)):
        raise TrackerRequestError("invalid p2pimage_repo")
    origin_next = None
    if b"p2pimage_origin_next" in pairs:
        origin_next = _uint(pairs, b"p2pimage_origin_next")
        if origin_next > MAX_PIECES:
            raise TrackerRequestError("invalid p2pimage_origin_next")
    key = _one(pairs, b"key") if b"key" in pairs else None
    if key is not None and len(key) > 64:
        raise TrackerRequestError("invalid key")
    # Positional, in field order: keywords cost a microsecond per request here.
    return AnnounceRequest(
        _hash20(_one(pairs, b"info_hash"), "info_hash"),
        _hash20(_one(pairs, b"peer_id"), "peer_id"),
        port,
        _uint(pairs, b"uploaded", default=0),
        _uint(pairs, b"downloaded", default=0),
        _uint(pairs, b"left", default=0),
        event,
        min(_uint(pairs, b"numwant"), MAX_NUMWANT) if b"numwant" in pairs else DEFAULT_NUMWANT,
        _ip(_one(pairs, b"ip")) if b"ip" in pairs else None,
        key,
        pieces,
        digest.decode("ascii") if digest is not None else None,
        repo.decode("ascii") if repo is not None else None,
        origin_next,
    )


def encode_announce_batch(requests: Sequence[AnnounceRequest]) -> bytes:
    """The body of ``POST /announce/batch``: ``{"announces": [entry, ...]}``, each entry a
    dictionary of one announce's query parameters (integers as integers)."""
    if not 1 <= len(requests) <= MAX_BATCH_SWARMS:
        raise LocalProtocolError(f"a batch holds 1 to {MAX_BATCH_SWARMS} announces")
    entries: list[Bencodable] = []
    for req in requests:
        entry: dict[bytes, Bencodable] = {}
        for part in req.to_query().split(b"&"):
            name, _, value = part.partition(b"=")
            raw = unquote_to_bytes(value)
            if _BATCH_DEFAULTS.get(name) == raw:
                continue  # what the tracker assumes anyway: fewer bytes to read per swarm
            entry[name] = int(raw) if name in _BATCH_INTS else raw
        entries.append(entry)
    return bencode({b"announces": entries})


def batch_query(body: bytes) -> str:
    """The query string of the ``POST /announce/batch`` that carries ``body``: its
    SHA-256, so that a proof of possession over the URL covers the body too."""
    return "body_sha256=" + hashlib.sha256(body).hexdigest()


def check_batch_digest(query: bytes, body: bytes) -> None:
    """Raise :class:`TrackerRequestError` unless ``query`` is :func:`batch_query` of
    ``body``."""
    if query.decode("latin-1") != batch_query(body):
        raise TrackerRequestError("batch: body_sha256 in the URL does not match the body")


def parse_announce_batch(body: bytes) -> list[AnnounceRequest]:
    """Parse the body of ``POST /announce/batch``: 1 to :data:`MAX_BATCH_SWARMS` announces
    of distinct swarms, each validated exactly as a single announce's query string;
    raise :class:`TrackerRequestError` for anything else."""
    if not isinstance(body, bytes | bytearray) or len(body) > MAX_BATCH_BYTES:
        raise TrackerRequestError(f"batch body over {MAX_BATCH_BYTES} bytes")
    out: list[AnnounceRequest] = []
    seen: set[bytes] = set()
    for pairs in _batch_entries(bytes(body)):
        req = _announce_from_pairs(pairs)
        if req.info_hash in seen:
            raise TrackerRequestError("batch: a swarm announced twice")
        seen.add(req.info_hash)
        out.append(req)
    return out


_BATCH_HEAD = b"d9:announcesl"
# Parameters one batch entry may carry: every name a query may hold, with room to spare.
_MAX_ENTRY_PARAMS = 32

# The entry every p2pimage node sends, read in one C-level match rather than a dozen
# Python steps a parameter (2.5-3x less CPU an entry): these parameters, each at most
# once, in ascending order, integers canonical (no leading zero, no "-0", at most 19
# digits), info_hash and peer_id of 20 bytes, a sha256 digest, a repository of the
# characters its grammar allows (so the match cannot run past it: ":" ends it) whose
# length is then checked against the one declared. An entry that does not match
# (another parameter, another spelling, a bad value) goes through the general steps,
# which accept or refuse it exactly as before; the match accepts nothing they refuse.
_FAST_INT = rb"i(0|-?[1-9][0-9]{0,18})e"
_FAST_ENTRY = re.compile(
    rb"d(?:7:compact" + _FAST_INT + rb")?"
    rb"(?:10:downloaded" + _FAST_INT + rb")?"
    rb"(?:5:event(0:|7:started|9:completed|7:stopped|6:paused))?"
    rb"(?:9:info_hash20:(.{20}))?"
    rb"(?:4:left" + _FAST_INT + rb")?"
    rb"(?:7:numwant" + _FAST_INT + rb")?"
    rb"(?:15:p2pimage_digest71:(sha256:[0-9a-f]{64}))?"
    rb"(?:20:p2pimage_origin_next" + _FAST_INT + rb")?"
    rb"(?:15:p2pimage_pieces" + _FAST_INT + rb")?"
    rb"(?:13:p2pimage_repo([1-9][0-9]{0,2}):([a-z0-9._/-]{1,255}))?"
    rb"(?:7:peer_id20:(.{20}))?"
    rb"(?:4:port" + _FAST_INT + rb")?"
    rb"(?:8:uploaded" + _FAST_INT + rb")?"
    rb"e",
    re.DOTALL,
)
# The parameter of each value group of _FAST_ENTRY, in order (integers as integers, as
# the general steps keep them); the repository's declared length (group 10) is checked,
# not kept.
_FAST_NAMES = (
    b"compact",
    b"downloaded",
    b"event",
    b"info_hash",
    b"left",
    b"numwant",
    b"p2pimage_digest",
    b"p2pimage_origin_next",
    b"p2pimage_pieces",
    b"p2pimage_repo",
    b"peer_id",
    b"port",
    b"uploaded",
)
_FAST_INTS = tuple(name in _BATCH_INTS for name in _FAST_NAMES)
_FAST_VALUES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)
_FAST_REPO_LENGTH = 10


def _fast_entry(body: bytes, pos: int) -> tuple[_Params, int] | None:
    """The entry at ``pos`` and where it ends, when it has the usual shape
    (``_FAST_ENTRY``); None sends it through the general steps."""
    m = _FAST_ENTRY.match(body, pos)
    if m is None:
        return None
    length = m[_FAST_REPO_LENGTH]
    values = m.group(*_FAST_VALUES)
    if length is not None and int(length) != len(values[9]):
        return None
    entry: _Params = {}
    for name, number, value in zip(_FAST_NAMES, _FAST_INTS, values, strict=True):
        if value is not None:
            entry[name] = int(value) if number else value
    event = values[2]
    if event is not None:
        entry[b"event"] = event[event.index(b":") + 1 :]
    return entry, m.end()


def _batch_entries(body: bytes) -> list[_Params]:
    """The entries of a batch body, in one pass: exactly ``d9:announcesl`` + 1 to
    :data:`MAX_BATCH_SWARMS` dictionaries of byte strings and integers (keys in
    ascending order, canonical integers and lengths) + ``ee``. Built for the one shape
    the extension allows, it costs a fraction of a general decoder's three passes."""
    if not body.startswith(_BATCH_HEAD):
        raise TrackerRequestError("batch: the body must be {announces: [...]}")
    n = len(body)
    pos = len(_BATCH_HEAD)
    entries: list[_Params] = []
    try:
        while body[pos] != 0x65:  # e: the list ends
            if body[pos] != 0x64:  # d
                raise TrackerRequestError("batch: an announce is not a dictionary")
            if len(entries) == MAX_BATCH_SWARMS:
                raise TrackerRequestError(f"batch: more than {MAX_BATCH_SWARMS} announces")
            fast = _fast_entry(body, pos)
            if fast is not None:
                entries.append(fast[0])
                pos = fast[1]
                continue
            pos += 1
            entry: _Params = {}
            prev = b""
            while body[pos] != 0x65:
                colon = body.find(b":", pos, pos + 8)
                digits = body[pos:colon]
                if colon < 0 or not digits.isdigit() or (digits[0] == 0x30 and colon > pos + 1):
                    raise TrackerRequestError("batch: bad string")
                pos = colon + 1 + int(digits)
                key = body[colon + 1 : pos]
                if entry and key <= prev:
                    raise TrackerRequestError("batch: keys out of order")
                if len(entry) == _MAX_ENTRY_PARAMS:
                    raise TrackerRequestError("batch: too many parameters in an announce")
                if body[pos] == 0x69:  # i
                    end = body.find(b"e", pos + 1, pos + 3 + _MAX_INT_DIGITS)
                    digits = body[pos + 1 : end]
                    raw = digits[1:] if digits[:1] == b"-" else digits
                    if end < 0 or not raw.isdigit() or (raw[0] == 0x30 and digits != b"0"):
                        raise TrackerRequestError("batch: bad integer")
                    entry[key] = int(digits)
                    pos = end + 1
                else:
                    colon = body.find(b":", pos, pos + 8)
                    digits = body[pos:colon]
                    if colon < 0 or not digits.isdigit() or (digits[0] == 0x30 and colon > pos + 1):
                        raise TrackerRequestError("batch: bad value")
                    pos = colon + 1 + int(digits)
                    entry[key] = body[colon + 1 : pos]
                prev = key
            pos += 1
            entries.append(entry)
    except IndexError:
        raise TrackerRequestError("batch: truncated body") from None
    if pos != n - 2 or body[pos + 1] != 0x65:
        raise TrackerRequestError("batch: the body must be {announces: [...]} alone")
    if not entries:
        raise TrackerRequestError(f"batch: announces must list 1 to {MAX_BATCH_SWARMS} swarms")
    return entries


def encode_announce_batch_response(responses: Sequence[bytes]) -> bytes:
    """``{"responses": [...]}``: one encoded single-announce answer (or failure) per
    announce of the batch, in its order (:func:`encode_announce_response`,
    :func:`encode_failure`)."""
    return b"d9:responsesl" + b"".join(responses) + b"ee"


def parse_announce_batch_response(data: bytes, count: int) -> list[AnnounceResponse]:
    """Parse a batch answer (client side) into ``count`` responses. A failure of the whole
    request (``failure reason`` at the top) is that failure for every announce."""
    try:
        value = bdecode(
            data,
            max_size=_MAX_RESPONSE_BYTES * 4,
            max_depth=10,
            max_tokens=20_000 + 40 * MAX_BATCH_SWARMS,
        )
    except BencodeError as exc:
        raise TrackerRequestError(f"tracker response: {exc}") from None
    if isinstance(value, dict) and b"failure reason" in value:
        return [_announce_response(value)] * count
    responses = value.get(b"responses") if isinstance(value, dict) else None
    if not isinstance(responses, list) or len(responses) != count:
        raise TrackerRequestError(f"tracker response: expected {count} responses")
    return [_announce_response(r) for r in responses]


def parse_scrape(query: bytes) -> ScrapeRequest:
    """Parse a scrape query: one or more ``info_hash`` (repeatable); no full scrapes."""
    pairs = _pairs(query, frozenset({b"info_hash"}))
    hashes = pairs.get(b"info_hash", [])
    if not hashes:
        raise TrackerRequestError("full scrape not supported: give info_hash")
    if len(hashes) > MAX_SCRAPE_HASHES:
        raise TrackerRequestError(f"more than {MAX_SCRAPE_HASHES} info_hash values")
    return ScrapeRequest(tuple(dict.fromkeys(_hash20(h, "info_hash") for h in hashes)))


# ---------------------------------------------------------------------------- responses


_V4_MAPPED = bytes(10) + b"\xff\xff"


def _pack_host(host: str) -> bytes:
    """4 or 16 address bytes (IPv4-mapped IPv6 as IPv4). inet_pton is a pure conversion,
    ~20x faster than ipaddress for the hot path of every response."""
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        raw = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise LocalProtocolError(f"peer host {host!r} is not an IP literal") from None
    return raw[12:] if raw.startswith(_V4_MAPPED) else raw


def pack_peer(host: str, port: int) -> bytes:
    """One peer in BEP 23 compact form: 6 bytes (IPv4) or 18 (IPv6); raise
    :class:`LocalProtocolError` for a host that is not an IP literal."""
    return _pack_host(host) + port.to_bytes(2, "big")


def _compact(peers: Iterable[tuple[str, int]]) -> tuple[bytes, bytes]:
    v4: list[bytes] = []
    v6: list[bytes] = []
    for host, port in peers:
        raw = pack_peer(host, port)
        (v4 if len(raw) == 6 else v6).append(raw)
    return b"".join(v4), b"".join(v6)


def encode_announce_response(response: AnnounceResponse) -> bytes:
    """Bencode an announce response (compact peers; the ``p2pimage`` dict when needed).

    ``p2pimage`` holds ``origin`` (``{url, first_piece, end_piece}``) for an origin
    fetcher and ``release: 1`` for a peer that should stop seeding; it is left out when
    neither applies, so stock clients see a plain BEP 3/23 response. ``compact``, when
    set, is ``peers`` already packed (the tracker policy's shared form).
    """
    if response.failure is not None:
        return encode_failure(response.failure, response.error)
    return encode_announce_answer(
        response.complete,
        response.incomplete,
        response.interval,
        response.min_interval,
        response.compact or _compact(response.peers),
        response.origin,
        response.release,
    )


def encode_announce_answer(
    complete: int,
    incomplete: int,
    interval: int,
    min_interval: int | None,
    compact: tuple[bytes, bytes],
    origin: OriginAssignment | None = None,
    release: bool = False,
) -> bytes:
    """:func:`encode_announce_response` of a successful answer from its parts, the
    peers already in compact form (IPv4, IPv6): the tracker encodes one per swarm of
    every announce, and making the :class:`AnnounceResponse` first cost as much again."""
    peers, peers6 = compact
    # Written by hand, keys in bencoding's sorted order: this runs once per swarm of
    # every announce, and the general encoder's checks cost more than the answer.
    head = b"d8:completei%de10:incompletei%de8:intervali%de" % (complete, incomplete, interval)
    if min_interval is not None:
        head += b"12:min intervali%de" % min_interval
    if origin is not None or release:
        extras: dict[bytes, Bencodable] = {}
        if origin is not None:
            where: dict[bytes, Bencodable] = {
                b"end_piece": origin.end_piece,
                b"first_piece": origin.first_piece,
                b"url": origin.url.encode(),
            }
            if origin.lease_end is not None:
                where[b"lease_end"] = origin.lease_end
            extras[b"origin"] = where
        if release:
            extras[b"release"] = 1
        head += b"8:p2pimage" + bencode(extras)
    if peers6:
        return b"%b5:peers%d:%b6:peers6%d:%be" % (head, len(peers), peers, len(peers6), peers6)
    return b"%b5:peers%d:%be" % (head, len(peers), peers)


def encode_failure(reason: str, error: str | None = None) -> bytes:
    out: dict[bytes, Bencodable] = {b"failure reason": reason.encode()}
    if error is not None:
        out[b"p2pimage"] = {b"error": error.encode()}
    return bencode(out)


def encode_scrape_response(files: dict[bytes, ScrapeStats]) -> bytes:
    return bencode(
        {
            b"files": {
                h: {
                    b"complete": s.complete,
                    b"downloaded": s.downloaded,
                    b"incomplete": s.incomplete,
                }
                for h, s in files.items()
            }
        }
    )


def _int(d: dict[bytes, Bencodable], key: bytes, default: int | None = None) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or value < 0:
        raise TrackerRequestError(f"tracker response: bad {key.decode()}")
    return value


def _unpack(blob: bytes, size: int) -> list[tuple[str, int]]:
    if len(blob) % size:
        raise TrackerRequestError("tracker response: truncated compact peers")
    out = []
    for i in range(0, len(blob), size):
        addr = ipaddress.ip_address(blob[i : i + size - 2])
        out.append((str(addr), int.from_bytes(blob[i + size - 2 : i + size], "big")))
    return out


def parse_announce_response(data: bytes) -> AnnounceResponse:
    """Parse a tracker's announce response (client side).

    Accepts compact and dictionary-model peer lists, so stock trackers work too; raises
    :class:`TrackerRequestError` for anything malformed. A ``failure reason`` is returned
    as ``AnnounceResponse(failure=...)``, not raised.
    """
    try:
        value = bdecode(data, max_size=_MAX_RESPONSE_BYTES, max_depth=8, max_tokens=20_000)
    except BencodeError as exc:
        raise TrackerRequestError(f"tracker response: {exc}") from None
    return _announce_response(value)


def _announce_response(value: Bencodable) -> AnnounceResponse:
    if not isinstance(value, dict):
        raise TrackerRequestError("tracker response is not a dictionary")
    extras = value.get(b"p2pimage", {})
    if not isinstance(extras, dict):
        raise TrackerRequestError("tracker response: bad p2pimage")
    failure = value.get(b"failure reason")
    if failure is not None:
        if not isinstance(failure, bytes):
            raise TrackerRequestError("tracker response: bad failure reason")
        error = extras.get(b"error")
        return AnnounceResponse(
            failure=failure.decode("utf-8", "replace"),
            error=error.decode("ascii", "replace") if isinstance(error, bytes) else None,
        )
    peers: list[tuple[str, int]] = []
    raw = value.get(b"peers", b"")
    if isinstance(raw, bytes):
        peers += _unpack(raw, 6)
    elif isinstance(raw, list):
        for entry in raw:
            if not isinstance(entry, dict):
                raise TrackerRequestError("tracker response: bad peer entry")
            ip, port = entry.get(b"ip"), entry.get(b"port")
            if not isinstance(ip, bytes) or not isinstance(port, int) or not 0 < port < 65536:
                raise TrackerRequestError("tracker response: bad peer entry")
            try:
                peers.append((str(ipaddress.ip_address(ip.decode("ascii"))), port))
            except (UnicodeDecodeError, ValueError):
                continue  # hostnames: BEP 3 allows them, p2pimage never sends them
    else:
        raise TrackerRequestError("tracker response: bad peers")
    raw6 = value.get(b"peers6", b"")
    if not isinstance(raw6, bytes):
        raise TrackerRequestError("tracker response: bad peers6")
    peers += _unpack(raw6, 18)
    origin = None
    raw_origin = extras.get(b"origin")
    if raw_origin is not None:
        if not isinstance(raw_origin, dict) or not isinstance(raw_origin.get(b"url"), bytes):
            raise TrackerRequestError("tracker response: bad origin")
        url = raw_origin[b"url"]
        assert isinstance(url, bytes)
        first, end = _int(raw_origin, b"first_piece"), _int(raw_origin, b"end_piece")
        if first >= end:
            raise TrackerRequestError("tracker response: empty origin range")
        lease_end: int | None = None
        if b"lease_end" in raw_origin:
            lease_end = _int(raw_origin, b"lease_end")
            if not first < lease_end <= end:
                raise TrackerRequestError("tracker response: lease outside the origin range")
        origin = OriginAssignment(url.decode("utf-8", "replace"), first, end, lease_end)
    release = extras.get(b"release", 0)
    if not isinstance(release, int):
        raise TrackerRequestError("tracker response: bad release")
    min_interval = value.get(b"min interval")
    return AnnounceResponse(
        interval=_int(value, b"interval"),
        min_interval=_int(value, b"min interval") if min_interval is not None else None,
        complete=_int(value, b"complete", 0),
        incomplete=_int(value, b"incomplete", 0),
        peers=peers,
        origin=origin,
        release=bool(release),
    )
