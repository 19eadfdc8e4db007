"""Strict bencoding: round trips, garbage, mutations and the non-canonical spellings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.errors import BencodeError, LocalProtocolError
from p2pimage.metainfo.bencoding import MAX_DEPTH, Bencodable, bdecode, bencode

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

values: st.SearchStrategy[Bencodable] = st.recursive(
    INT64 | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.binary(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


@given(values)
@settings(max_examples=500)
def test_round_trip(value: Bencodable) -> None:
    encoded = bencode(value)
    assert bdecode(encoded) == value
    assert bencode(bdecode(encoded)) == encoded


@given(st.binary(max_size=200))
@settings(max_examples=3000)
def test_garbage_raises_only_bencode_error(data: bytes) -> None:
    try:
        value = bdecode(data)
    except BencodeError:
        return
    # Whatever decodes must be the canonical spelling of its value.
    assert bencode(value) == data


small_values: st.SearchStrategy[Bencodable] = st.recursive(
    INT64 | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.binary(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(bencode(draw(small_values)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@given(mutated())
@settings(max_examples=2000)
def test_mutations_raise_only_bencode_error_or_stay_canonical(data: bytes) -> None:
    try:
        value = bdecode(data)
    except BencodeError:
        return
    assert bencode(value) == data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"d1:bi1e1:ai2ee", "unsorted keys"),
        (b"d1:ai1e1:ai2ee", "duplicate keys"),
        (b"i01e", "leading zero"),
        (b"i-01e", "leading zero after minus"),
        (b"i-0e", "negative zero"),
        (b"ie", "empty integer"),
        (b"i1.5e", "not an integer"),
        (b"i+1e", "plus sign"),
        (b"01:a", "leading zero in string length"),
        (b"i1ei2e", "trailing data"),
        (b"1:ax", "trailing byte"),
        (b"", "empty input"),
        (b"l", "truncated list"),
        (b"d1:ae", "key without value"),
        (b"di1ei1ee", "integer key"),
        (b"5:abc", "string past end"),
        (b"e", "stray end"),
        (b"i" + b"9" * 21 + b"e", "integer too long"),
    ],
)
def test_non_canonical_rejected(data: bytes, why: str) -> None:
    with pytest.raises(BencodeError):
        bdecode(data)


def test_canonical_accepted() -> None:
    assert bdecode(b"d1:ai1e1:bl0:i-3eee") == {b"a": 1, b"b": [b"", -3]}
    assert bdecode(b"i0e") == 0
    assert bdecode(bytearray(b"3:abc")) == b"abc"


def test_depth_bomb_rejected() -> None:
    with pytest.raises(BencodeError, match="deeper"):
        bdecode(b"l" * 1_000_000 + b"e" * 1_000_000, max_size=3_000_000)
    nested = b"l" * MAX_DEPTH + b"e" * MAX_DEPTH
    assert bdecode(nested) is not None
    with pytest.raises(BencodeError):
        bdecode(b"l" + nested + b"e")


def test_size_limit() -> None:
    with pytest.raises(BencodeError, match="limit"):
        bdecode(b"4:abcd", max_size=5)
    assert bdecode(b"4:abcd", max_size=6) == b"abcd"


def test_token_limit() -> None:
    data = b"l" + b"i1e" * 10 + b"e"
    with pytest.raises(BencodeError, match="tokens"):
        bdecode(data, max_tokens=5)
    assert bdecode(data) == [1] * 10


def test_encode_rejects_non_bencodable() -> None:
    for bad in (True, "str", 1.5, {"k": 1}, [None]):
        with pytest.raises(LocalProtocolError):
            bencode(bad)  # type: ignore[arg-type]


def test_bdecode_rejects_non_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        bdecode("i1e")  # type: ignore[arg-type]


def test_integers_are_signed_64_bit_both_ways() -> None:
    # Before the fix bencode() wrote integers that bdecode() then refused (or, up to 20
    # digits, accepted beyond libtorrent's range): the two directions now agree.
    for edge in (2**63 - 1, -(2**63)):
        assert bdecode(bencode(edge)) == edge
    for outside in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(LocalProtocolError):
            bencode(outside)
    with pytest.raises(BencodeError, match="64-bit"):
        bdecode(b"i99999999999999999999e")
    with pytest.raises(BencodeError, match="64-bit"):
        bdecode(b"i9223372036854775808e")
