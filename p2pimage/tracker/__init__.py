"""The p2pimage tracker as a library: messages (sans-I/O), policy (pure), state backends.

The daemon (``daemons/tracker.py``) and the simulator drive these; see docs/protocol.md
for the wire format of the ``p2pimage`` extras.
"""

from __future__ import annotations

from ._policy import (
    AnnounceOutcome,
    FetcherRange,
    PeerIdTakenError,
    PeerRecord,
    PolicyConfig,
    SwarmRecord,
    TrackerPolicy,
    origin_blob_url,
)
from ._protocol import (
    DEFAULT_NUMWANT,
    MAX_NUMWANT,
    MAX_PIECES,
    MAX_QUERY_BYTES,
    MAX_SCRAPE_HASHES,
    AnnounceRequest,
    AnnounceResponse,
    Event,
    OriginAssignment,
    ScrapeRequest,
    ScrapeStats,
    TrackerRequestError,
    encode_announce_response,
    encode_failure,
    encode_scrape_response,
    parse_announce,
    parse_announce_response,
    parse_scrape,
)
from ._state import (
    MemoryState,
    RedisState,
    StateConflictError,
    StateStats,
    StateUnavailableError,
    SwarmKey,
    TrackerState,
)

__all__ = [
    "DEFAULT_NUMWANT",
    "MAX_NUMWANT",
    "MAX_PIECES",
    "MAX_QUERY_BYTES",
    "MAX_SCRAPE_HASHES",
    "AnnounceOutcome",
    "AnnounceRequest",
    "AnnounceResponse",
    "Event",
    "FetcherRange",
    "MemoryState",
    "OriginAssignment",
    "PeerIdTakenError",
    "PeerRecord",
    "PolicyConfig",
    "RedisState",
    "ScrapeRequest",
    "ScrapeStats",
    "StateConflictError",
    "StateStats",
    "StateUnavailableError",
    "SwarmRecord",
    "SwarmKey",
    "TrackerPolicy",
    "TrackerRequestError",
    "TrackerState",
    "encode_announce_response",
    "encode_failure",
    "encode_scrape_response",
    "origin_blob_url",
    "parse_announce",
    "parse_announce_response",
    "parse_scrape",
]
