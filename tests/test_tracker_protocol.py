"""Tracker messages: query parsing (garbage raises only TrackerRequestError), round trips."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.errors import LocalProtocolError, RemoteProtocolError
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.tracker import (
    MAX_BATCH_BYTES,
    MAX_BATCH_SWARMS,
    MAX_NUMWANT,
    AnnounceRequest,
    AnnounceResponse,
    Event,
    OriginAssignment,
    ScrapeStats,
    TrackerRequestError,
    _protocol,
    encode_announce_answer,
    encode_announce_batch,
    encode_announce_batch_response,
    encode_announce_response,
    encode_failure,
    encode_scrape_response,
    parse_announce,
    parse_announce_batch,
    parse_announce_batch_response,
    parse_announce_response,
    parse_scrape,
)

IH = b"\x00\x01%&=+ \xff" + bytes(range(12))
PEER = b"-PI0001-" + b"\x80" * 12
BASE = AnnounceRequest(info_hash=IH, peer_id=PEER, port=6881, left=10)


def q(**overrides: str) -> bytes:
    params = {
        "info_hash": "%00%01%25%26%3D%2B%20%FF" + "".join(f"%{i:02X}" for i in range(12)),
        "peer_id": "-PI0001-" + "%80" * 12,
        "port": "6881",
        "left": "10",
    }
    params.update(overrides)
    return "&".join(f"{k}={v}" for k, v in params.items() if v is not None).encode()


def test_parses_a_stock_announce() -> None:
    req = parse_announce(q(event="started", compact="1", numwant="30", key="abc"))
    assert req.info_hash == IH and req.peer_id == PEER
    assert (req.port, req.left, req.event, req.numwant, req.key) == (
        6881, 10, Event.STARTED, 30, b"abc",
    )  # fmt: skip


def test_plus_is_not_a_space_in_binary_values() -> None:
    raw = parse_announce(q(info_hash="+" * 20)).info_hash
    assert raw == b"+" * 20


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"info_hash": "abc"}, "info_hash"),
        ({"info_hash": None}, "missing info_hash"),
        ({"peer_id": "x" * 21}, "peer_id"),
        ({"port": "0"}, "port"),
        ({"port": "65536"}, "port"),
        ({"port": "-1"}, "port"),
        ({"port": "80x"}, "port"),
        ({"left": "-5"}, "left"),
        ({"uploaded": "9" * 30}, "uploaded"),
        ({"downloaded": str(2**63)}, "downloaded"),
        ({"event": "exploded"}, "event"),
        ({"ip": "example.com"}, "ip"),
        ({"p2pimage_pieces": "0"}, "p2pimage_pieces"),
        ({"p2pimage_digest": "sha256:xyz"}, "p2pimage_digest"),
        ({"p2pimage_repo": "../etc"}, "p2pimage_repo"),
        ({"p2pimage_origin_next": "-1"}, "p2pimage_origin_next"),
        ({"numwant": "lots"}, "numwant"),
    ],
)
def test_bad_announces_get_a_reason(overrides: dict[str, str], reason: str) -> None:
    with pytest.raises(TrackerRequestError, match=reason):
        parse_announce(q(**overrides))


def test_repeated_keys_rejected() -> None:
    with pytest.raises(TrackerRequestError, match="repeated"):
        parse_announce(q() + b"&port=1")
    with pytest.raises(TrackerRequestError, match="repeated"):
        parse_announce(q() + b"&x=1&x=2")


def test_huge_numwant_is_clamped() -> None:
    assert parse_announce(q(numwant="100000")).numwant == MAX_NUMWANT


def test_oversized_query_rejected() -> None:
    with pytest.raises(TrackerRequestError, match="longer"):
        parse_announce(q(junk="a" * 5000))


def test_scrape_takes_repeated_info_hashes() -> None:
    req = parse_scrape(b"info_hash=" + b"a" * 20 + b"&info_hash=" + b"b" * 20)
    assert req.info_hashes == (b"a" * 20, b"b" * 20)
    with pytest.raises(TrackerRequestError, match="full scrape"):
        parse_scrape(b"")
    with pytest.raises(TrackerRequestError, match="repeated"):
        parse_scrape(b"info_hash=" + b"a" * 20 + b"&x=1&x=1")


requests = st.builds(
    AnnounceRequest,
    info_hash=st.binary(min_size=20, max_size=20),
    peer_id=st.binary(min_size=20, max_size=20),
    port=st.integers(1, 65535),
    uploaded=st.integers(0, 2**63 - 1),
    downloaded=st.integers(0, 2**63 - 1),
    left=st.integers(0, 2**63 - 1),
    event=st.sampled_from(list(Event)),
    numwant=st.integers(0, MAX_NUMWANT),
    ip=st.one_of(st.none(), st.ip_addresses().map(str)),
    key=st.one_of(st.none(), st.binary(max_size=16)),
    pieces=st.one_of(st.none(), st.integers(1, 2**24)),
    digest=st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
    repo=st.one_of(
        st.none(), st.from_regex(r"[a-z0-9]{1,10}(/[a-z0-9]{1,10}){0,2}", fullmatch=True)
    ),
    origin_next=st.one_of(st.none(), st.integers(0, 2**24)),
)


@given(requests)
def test_announce_round_trip(req: AnnounceRequest) -> None:
    assert parse_announce(req.to_query()) == req


_query_alphabet = st.sampled_from(
    [b"&", b"=", b"%", b"%zz", b"%00", b"+", b"info_hash", b"peer_id", b"port", b"event",
     b"left", b"numwant", b"ip", b"p2pimage_pieces", b"p2pimage_digest", b"p2pimage_repo",
     b"p2pimage_origin_next", b"1", b"-", b"65535", b"x" * 20, b"started", b"\xff", b"sha256:"]
)  # fmt: skip


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=300), st.lists(_query_alphabet, max_size=40).map(b"".join)))
def test_garbage_query_raises_only_our_error(query: bytes) -> None:
    for parse in (parse_announce, parse_scrape):
        with contextlib.suppress(TrackerRequestError):
            parse(query)


@settings(max_examples=200)
@given(requests, st.binary(max_size=6))
def test_mutated_valid_query_raises_only_our_error(req: AnnounceRequest, junk: bytes) -> None:
    query = req.to_query()
    for cut in (len(query) // 3, len(query) // 2):
        with contextlib.suppress(TrackerRequestError):
            parse_announce(query[:cut] + junk + query[cut:])


peers = st.lists(
    st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), max_size=30, unique=True
)


@given(
    peers,
    st.integers(0, 10**6),
    st.booleans(),
    st.one_of(
        st.none(),
        st.builds(OriginAssignment, st.just("http://r:5000/v2/a/blobs/sha256:00"),
                  st.integers(0, 100), st.integers(101, 200)),
    ),
)  # fmt: skip
def test_announce_response_round_trip(
    peer_list: list[tuple[str, int]], interval: int, release: bool, origin: OriginAssignment | None
) -> None:
    resp = AnnounceResponse(
        interval=interval, min_interval=5, complete=3, incomplete=4, peers=peer_list,
        origin=origin, release=release,
    )  # fmt: skip
    back = parse_announce_response(encode_announce_response(resp))
    assert sorted(back.peers) == sorted(_normalise(p) for p in peer_list)
    assert (back.interval, back.min_interval, back.complete, back.incomplete) == (interval, 5, 3, 4)
    assert (back.origin, back.release) == (origin, release)


def _normalise(peer: tuple[str, int]) -> tuple[str, int]:
    import ipaddress

    addr = ipaddress.ip_address(peer[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return (str(addr.ipv4_mapped), peer[1])
    return peer


def test_response_layout_is_plain_bep23_without_extras() -> None:
    body = encode_announce_response(
        AnnounceResponse(interval=30, peers=[("127.0.0.1", 6881), ("::1", 6882)])
    )
    doc = bdecode(body)
    assert isinstance(doc, dict)
    assert doc[b"peers"] == bytes([127, 0, 0, 1, 0x1A, 0xE1])
    assert doc[b"peers6"] == bytes(15) + b"\x01" + (6882).to_bytes(2, "big")
    assert b"p2pimage" not in doc


def test_extras_layout() -> None:
    body = encode_announce_response(
        AnnounceResponse(interval=5, origin=OriginAssignment("http://r/x", 3, 9), release=True)
    )
    doc = bdecode(body)
    assert isinstance(doc, dict)
    assert doc[b"p2pimage"] == {
        b"origin": {b"url": b"http://r/x", b"first_piece": 3, b"end_piece": 9},
        b"release": 1,
    }


def test_failure_round_trip() -> None:
    back = parse_announce_response(encode_failure("token rejected: expired", "expired"))
    assert (back.failure, back.error) == ("token rejected: expired", "expired")


def test_parses_stock_dictionary_peers() -> None:
    body = bencode(
        {b"interval": 1800, b"peers": [{b"ip": b"10.0.0.1", b"peer id": b"x" * 20, b"port": 1}]}
    )
    assert parse_announce_response(body).peers == [("10.0.0.1", 1)]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_response_raises_only_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_announce_response(data)


def test_scrape_response_layout() -> None:
    doc = bdecode(encode_scrape_response({b"a" * 20: ScrapeStats(1, 2, 3)}))
    assert doc == {b"files": {b"a" * 20: {b"complete": 1, b"incomplete": 2, b"downloaded": 3}}}


def test_origin_lease_round_trips_and_is_checked() -> None:
    from p2pimage.tracker import (
        AnnounceResponse,
        OriginAssignment,
        TrackerRequestError,
        encode_announce_response,
        parse_announce_response,
    )

    sent = AnnounceResponse(interval=5, origin=OriginAssignment("http://r/x", 3, 90, 20))
    got = parse_announce_response(encode_announce_response(sent))
    assert got.origin == OriginAssignment("http://r/x", 3, 90, 20)
    assert got.origin.read_end == 20
    bad = encode_announce_response(
        AnnounceResponse(interval=5, origin=OriginAssignment("http://r/x", 3, 90, 95))
    )
    import pytest

    with pytest.raises(TrackerRequestError):
        parse_announce_response(bad)


# --------------------------------------------------------------------- batched announces


@given(st.lists(requests, min_size=1, max_size=5, unique_by=lambda r: r.info_hash))
def test_announce_batch_round_trip(reqs: list[AnnounceRequest]) -> None:
    assert parse_announce_batch(encode_announce_batch(reqs)) == reqs


def test_announce_batch_entries_are_checked_like_queries() -> None:
    good = encode_announce_batch([BASE])
    assert parse_announce_batch(good) == [BASE]
    entry = bdecode(good)[b"announces"][0]  # type: ignore[index]
    bad_entries = [
        {**entry, b"port": 0},
        {**entry, b"left": -1},
        {**entry, b"info_hash": b"short"},
        {**entry, b"event": b"bogus"},
        {**entry, b"p2pimage_repo": b"UPPER"},
        {**entry, b"numwant": [1]},
    ]
    for bad in bad_entries:
        with pytest.raises(TrackerRequestError):
            parse_announce_batch(bencode({b"announces": [bad]}))
    for body in (
        b"",
        b"le",
        bencode({b"announces": []}),
        bencode({b"announces": [entry, entry]}),  # one swarm twice
        bencode({b"announces": [entry] * (MAX_BATCH_SWARMS + 1)}),
        bencode({b"other": [entry]}),
        b"x" * (MAX_BATCH_BYTES + 1),
    ):
        with pytest.raises(TrackerRequestError):
            parse_announce_batch(body)
    with pytest.raises(LocalProtocolError):
        encode_announce_batch([])


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_batch_raises_only_our_error(body: bytes) -> None:
    with contextlib.suppress(TrackerRequestError):
        parse_announce_batch(body)
    with contextlib.suppress(TrackerRequestError):
        parse_announce_batch(b"d9:announcesl" + body + b"ee")


def test_announce_batch_response_round_trip_and_whole_failure() -> None:
    ok = AnnounceResponse(interval=30, min_interval=5, peers=[("10.0.0.1", 6881)])
    refused = AnnounceResponse(failure="token rejected: out_of_scope", error="out_of_scope")
    body = encode_announce_batch_response(
        [
            encode_announce_response(ok),
            encode_failure("token rejected: out_of_scope", "out_of_scope"),
        ]
    )
    assert parse_announce_batch_response(body, 2) == [ok, refused]
    with pytest.raises(TrackerRequestError):
        parse_announce_batch_response(body, 3)
    whole = parse_announce_batch_response(encode_failure("missing bearer token", "missing"), 2)
    assert [r.error for r in whole] == ["missing", "missing"]
    with pytest.raises(TrackerRequestError):
        parse_announce_batch_response(b"d9:responsesli1eee", 1)


# The batch body's one shape, with arbitrary names and values: what the one-pass parser
# must read exactly as the general (canonical) decoder does.
_entry_values = st.one_of(st.binary(max_size=30), st.integers(-(2**63), 2**63 - 1))
_entries = st.dictionaries(st.binary(max_size=12), _entry_values, max_size=8)
_bencodable = st.recursive(
    st.one_of(st.binary(max_size=8), st.integers(-(2**63), 2**63 - 1)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.binary(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(st.lists(_entries, min_size=1, max_size=4))
def test_batch_body_parser_reads_what_the_general_decoder_reads(entries: list[dict]) -> None:
    from p2pimage.tracker._protocol import _batch_entries

    body = bencode({b"announces": entries})
    assert _batch_entries(body) == bdecode(body)[b"announces"]  # type: ignore[index]


@settings(max_examples=300)
@given(st.one_of(_bencodable, st.lists(_bencodable, max_size=3)))
def test_batch_body_parser_refuses_every_other_shape(value: object) -> None:
    from p2pimage.tracker._protocol import _batch_entries

    body = bencode({b"announces": value})  # type: ignore[dict-item]
    shaped = (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_BATCH_SWARMS
        and all(
            isinstance(e, dict) and all(isinstance(v, int | bytes) for v in e.values())
            for e in value
        )
    )
    if shaped:
        assert _batch_entries(body) == value
    else:
        with pytest.raises(TrackerRequestError):
            _batch_entries(body)


# Entries in (and near) the shape every node sends, which the parser reads in one match
# (_FAST_ENTRY): its parameter names and the values they take, and values just beside
# them (lengths off by one, negative and huge integers, other names among them).
_node_names = st.sampled_from([*_protocol._FAST_NAMES, b"ip", b"key", b"pee", b"zz"])
_node_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 70_000),
    st.binary(min_size=19, max_size=21),
    st.binary(max_size=8),
    st.sampled_from(
        [
            *(b"", b"started", b"completed", b"stopped", b"paused", b"a" * 255, b"a" * 256),
            *(b"sha256:" + b"ab" * 32, b"sha256:" + b"AB" * 32, b"library/python:1"),
        ]
    ),
    st.from_regex(rb"\A[a-z0-9._/-]{1,12}\Z"),
)
_node_entries = st.dictionaries(_node_names, _node_values, max_size=14)


@settings(max_examples=300)
@given(st.lists(_node_entries, min_size=1, max_size=4))
def test_batch_body_parser_reads_node_entries_as_the_general_decoder(entries: list[dict]) -> None:
    body = bencode({b"announces": entries})
    assert _protocol._batch_entries(body) == bdecode(body)[b"announces"]  # type: ignore[index]


def _batch_outcome(body: bytes) -> object:
    try:
        return parse_announce_batch(body)
    except TrackerRequestError as exc:
        return ("refused", str(exc))


@settings(max_examples=500)
@given(
    st.lists(_node_entries, min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=3),
)
def test_one_match_entries_and_general_steps_agree_even_on_damaged_bodies(
    entries: list[dict], damage: list[tuple[int, bytes]]
) -> None:
    """Whatever the body, reading node entries in one match changes no outcome: the same
    announces, or the same refusal, as the general steps alone."""
    body = bytearray(bencode({b"announces": entries}))
    for at, replacement in damage:
        at %= len(body)
        body[at : at + len(replacement)] = replacement
    fast = _batch_outcome(bytes(body))
    with mock.patch.object(_protocol, "_fast_entry", lambda body, pos: None):
        general = _batch_outcome(bytes(body))
    assert fast == general


def test_node_entries_take_the_one_match_path() -> None:
    """The shape nodes send (every p2pimage extra set) is read by the match, not by the
    general steps; another parameter (``key``) by the general steps."""
    req = AnnounceRequest(
        info_hash=b"\x01" * 20,
        peer_id=b"-P20001-" + b"\x00" * 12,
        port=6881,
        uploaded=5,
        downloaded=7,
        left=9,
        event=Event.STARTED,
        pieces=64,
        digest="sha256:" + "ab" * 32,
        repo="library/python",
        origin_next=3,
    )
    body = encode_announce_batch([req])
    pos = len(_protocol._BATCH_HEAD)
    assert _protocol._fast_entry(body, pos) is not None
    assert parse_announce_batch(body) == [req]
    keyed = encode_announce_batch([AnnounceRequest(b"\x01" * 20, b"\x02" * 20, 1, key=b"k")])
    assert _protocol._fast_entry(keyed, pos) is None
    assert parse_announce_batch(keyed)[0].key == b"k"


@pytest.mark.parametrize(
    "body",
    [
        b"d9:announcesld4:porti01eeee",  # a leading zero
        b"d9:announcesld4:porti-0eeee",
        b"d9:announcesld04:porti1eeee",  # a length with a leading zero
        b"d9:announcesld4:porti1e4:leftie0eeee",  # keys out of order
        b"d9:announcesld4:porti1e4:porti1eeee",  # a key twice
        b"d9:announcesld4:porti1eeeex",  # trailing bytes
        b"d9:announcesld4:porti1eee",  # truncated
        b"d9:announcesld4:portl1eeeee",  # a list value
        b"d9:announcesld4:porti" + b"9" * 30 + b"eeee",  # an integer too long
        b"d9:announcesld4:port99999999999:xeeee",  # a string past the end
    ],
)
def test_batch_body_parser_refuses_non_canonical_and_broken_bodies(body: bytes) -> None:
    with pytest.raises(TrackerRequestError):
        parse_announce_batch(body)


_addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)).flatmap(
    lambda h: st.tuples(st.just(h), st.integers(1, 65535))
)


@given(
    st.builds(
        AnnounceResponse,
        interval=st.integers(0, 10**6),
        min_interval=st.none() | st.integers(0, 10**6),
        complete=st.integers(0, 10**6),
        incomplete=st.integers(0, 10**6),
        peers=st.lists(_addresses, max_size=6),
        origin=st.none()
        | st.builds(
            OriginAssignment,
            url=st.text(max_size=20),
            first_piece=st.integers(0, 10),
            end_piece=st.integers(11, 20),
            lease_end=st.none() | st.integers(11, 20),
        ),
        release=st.booleans(),
    ),
    st.booleans(),
)
def test_hand_written_response_encoding_is_the_canonical_bencoding(
    response: AnnounceResponse, precompacted: bool
) -> None:
    """encode_announce_response writes the dictionary by hand: byte for byte what the
    general encoder writes for it, with peers given as addresses or already packed."""
    from dataclasses import replace

    from p2pimage.tracker import pack_peer

    packed = [pack_peer(h, p) for h, p in response.peers]  # IPv4-mapped IPv6 packs as IPv4
    v4 = b"".join(p for p in packed if len(p) == 6)
    v6 = b"".join(p for p in packed if len(p) == 18)
    expected: dict[bytes, object] = {
        b"complete": response.complete,
        b"incomplete": response.incomplete,
        b"interval": response.interval,
        b"peers": v4,
    }
    if response.min_interval is not None:
        expected[b"min interval"] = response.min_interval
    if v6:
        expected[b"peers6"] = v6
    extras: dict[bytes, object] = {}
    if response.origin is not None:
        o = response.origin
        extras[b"origin"] = {
            b"end_piece": o.end_piece,
            b"first_piece": o.first_piece,
            b"url": o.url.encode(),
            **({b"lease_end": o.lease_end} if o.lease_end is not None else {}),
        }
    if response.release:
        extras[b"release"] = 1
    if extras:
        expected[b"p2pimage"] = extras
    if precompacted:
        response = replace(response, compact=(v4, v6))
    assert encode_announce_response(response) == bencode(expected)  # type: ignore[arg-type]
    # The tracker's path: the same answer from its parts, without the AnnounceResponse.
    parts = (response.complete, response.incomplete, response.interval, response.min_interval)
    answer = encode_announce_answer(*parts, (v4, v6), response.origin, response.release)
    assert answer == bencode(expected)  # type: ignore[arg-type]
