"""The p2pimage tracker as a library: messages (sans-I/O), policy (pure), state backends.

The daemon (``daemons/tracker.py``) and the simulator drive these; see docs/protocol.md
for the wire format of the ``p2pimage`` extras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pimage._lazy import lazy_names

from ._protocol import (
    DEFAULT_NUMWANT,
    MAX_BATCH_BYTES,
    MAX_BATCH_SWARMS,
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
    batch_query,
    check_batch_digest,
    encode_announce_answer,
    encode_announce_batch,
    encode_announce_batch_response,
    encode_announce_response,
    encode_failure,
    encode_scrape_response,
    pack_peer,
    parse_announce,
    parse_announce_batch,
    parse_announce_batch_response,
    parse_announce_response,
    parse_scrape,
)

if TYPE_CHECKING:
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
    from ._preheat import (
        PreheatBoard,
        PreheatError,
        PreheatJob,
        PreheatLayer,
        PreheatPoll,
        PreheatReport,
        PreheatSpec,
        parse_preheat_poll,
        parse_preheat_report,
        parse_preheat_request,
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

# The server side (policy, state backends, preheat board) is imported on first use
# (module ``__getattr__``, PEP 562): a node needs the messages, not the tracker.
_LAZY: dict[str, str] = {
    "AnnounceOutcome": "p2pimage.tracker._policy",
    "FetcherRange": "p2pimage.tracker._policy",
    "MemoryState": "p2pimage.tracker._state",
    "PeerIdTakenError": "p2pimage.tracker._policy",
    "PeerRecord": "p2pimage.tracker._policy",
    "PolicyConfig": "p2pimage.tracker._policy",
    "PreheatBoard": "p2pimage.tracker._preheat",
    "PreheatError": "p2pimage.tracker._preheat",
    "PreheatJob": "p2pimage.tracker._preheat",
    "PreheatLayer": "p2pimage.tracker._preheat",
    "PreheatPoll": "p2pimage.tracker._preheat",
    "PreheatReport": "p2pimage.tracker._preheat",
    "PreheatSpec": "p2pimage.tracker._preheat",
    "RedisState": "p2pimage.tracker._state",
    "StateConflictError": "p2pimage.tracker._state",
    "StateStats": "p2pimage.tracker._state",
    "StateUnavailableError": "p2pimage.tracker._state",
    "SwarmKey": "p2pimage.tracker._state",
    "SwarmRecord": "p2pimage.tracker._policy",
    "TrackerPolicy": "p2pimage.tracker._policy",
    "TrackerState": "p2pimage.tracker._state",
    "origin_blob_url": "p2pimage.tracker._policy",
    "parse_preheat_poll": "p2pimage.tracker._preheat",
    "parse_preheat_report": "p2pimage.tracker._preheat",
    "parse_preheat_request": "p2pimage.tracker._preheat",
}


__getattr__, __dir__ = lazy_names(globals(), _LAZY)


__all__ = [
    "DEFAULT_NUMWANT",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_SWARMS",
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
    "PreheatBoard",
    "PreheatError",
    "PreheatJob",
    "PreheatLayer",
    "PreheatPoll",
    "PreheatReport",
    "PreheatSpec",
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
    "batch_query",
    "check_batch_digest",
    "encode_announce_answer",
    "encode_announce_batch",
    "encode_announce_batch_response",
    "encode_announce_response",
    "encode_failure",
    "encode_scrape_response",
    "origin_blob_url",
    "pack_peer",
    "parse_announce",
    "parse_announce_batch",
    "parse_announce_batch_response",
    "parse_announce_response",
    "parse_preheat_poll",
    "parse_preheat_report",
    "parse_preheat_request",
    "parse_scrape",
]
