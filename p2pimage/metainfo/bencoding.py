"""Strict, bounded bencoding (BEP 3) over bencode.py's bytes-preserving ``bencodepy`` API.

``bdecode`` accepts only the canonical encoding of a value: dictionary keys are byte
strings in strictly ascending order (so no duplicates), integers and string lengths carry
no leading zeros (and there is no ``-0``), and nothing follows the value. Every other
spelling of the same value is rejected with :class:`~p2pimage.errors.BencodeError`, so a
hash over re-encoded bytes (the info-hash) can never depend on how a file was written.

Input is bounded before any object is built: total size, nesting depth and token count.
The defaults are libtorrent's ``load_torrent_limits`` (``max_buffer_size`` 10 MB,
``max_decode_depth`` 100, ``max_decode_tokens`` 3,000,000), the limits the most widely
deployed client applies to torrent files; callers decoding small messages (tracker
responses, BEP 10 handshakes) pass tighter ones.
"""

from __future__ import annotations

from typing import TypeAlias

import bencodepy

from p2pimage.errors import BencodeError, LocalProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_SIZE",
    "MAX_TOKENS",
    "Bencodable",
    "bdecode",
    "bencode",
]

# libtorrent load_torrent_limits::max_buffer_size (10 MB): larger torrents are refused there too.
MAX_SIZE = 10_000_000
# libtorrent load_torrent_limits::max_decode_depth; real torrents nest 3-4 levels.
MAX_DEPTH = 100
# libtorrent load_torrent_limits::max_decode_tokens.
MAX_TOKENS = 3_000_000

Bencodable: TypeAlias = int | bytes | list["Bencodable"] | dict[bytes, "Bencodable"]

_DIGITS = frozenset(b"0123456789")
# Integers are signed 64-bit, libtorrent's range: both directions enforce it, so whatever
# bencode() writes, bdecode() reads back.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1


def bencode(value: Bencodable) -> bytes:
    """Encode ``value`` canonically.

    Only ``int`` (not ``bool``), ``bytes``, ``list`` and ``dict`` with ``bytes`` keys are
    accepted; anything else is our caller's mistake (:class:`LocalProtocolError`).
    """
    _check_encodable(value, 0)
    out: bytes = bencodepy.encode(value)
    return out


def _check_encodable(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LocalProtocolError("value nests deeper than MAX_DEPTH")
    if isinstance(value, bool) or not isinstance(value, int | bytes | list | dict):
        raise LocalProtocolError(f"cannot bencode {type(value).__name__}")
    if isinstance(value, list):
        for item in value:
            _check_encodable(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, bytes):
                raise LocalProtocolError(f"dictionary key must be bytes, not {type(key).__name__}")
            _check_encodable(item, depth + 1)
    elif isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
        raise LocalProtocolError("integer outside the signed 64-bit range")


def bdecode(
    data: bytes,
    *,
    max_size: int = MAX_SIZE,
    max_depth: int = MAX_DEPTH,
    max_tokens: int = MAX_TOKENS,
) -> Bencodable:
    """Decode exactly one canonical bencoded value that fills all of ``data``.

    Raises :class:`BencodeError` (a ``RemoteProtocolError``) for anything else.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError("bdecode takes bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise BencodeError(f"input is {len(data)} bytes, limit {max_size}")
    _scan_canonical(data, max_depth, max_tokens)
    try:
        value: Bencodable = bencodepy.decode(data)
    except Exception as exc:  # bencode.py raises several types; the scan makes this unlikely
        raise BencodeError(f"invalid bencoding: {exc}") from None
    if bencodepy.encode(value) != data:
        raise BencodeError("input is not in canonical form")
    return value


def _scan_canonical(data: bytes, max_depth: int, max_tokens: int) -> None:
    """Walk ``data`` once without building objects; reject any non-canonical spelling.

    Iterative, so hostile nesting cannot exhaust the interpreter's stack.
    """
    n = len(data)
    if n == 0:
        raise BencodeError("empty input")
    pos = 0
    tokens = 0
    # One frame per open container: [is_dict, expecting_key, previous_key or None].
    stack: list[list[object]] = []
    while True:
        if pos >= n:
            raise BencodeError("truncated input")
        tokens += 1
        if tokens > max_tokens:
            raise BencodeError(f"more than {max_tokens} tokens")
        c = data[pos]
        frame = stack[-1] if stack else None
        if c == 0x65:  # 'e' closes a container
            if frame is None:
                raise BencodeError(f"unexpected 'e' at offset {pos}")
            if frame[0] and not frame[1]:
                raise BencodeError(f"dictionary key without value at offset {pos}")
            stack.pop()
            pos += 1
            value_done = True
        else:
            if frame is not None and frame[0] and frame[1] and c not in _DIGITS:
                raise BencodeError(f"dictionary key must be a string at offset {pos}")
            if c == 0x69:  # 'i'
                end = data.find(b"e", pos + 1)
                if end < 0:
                    raise BencodeError("unterminated integer")
                digits = data[pos + 1 : end]
                # 20 characters hold any signed 64-bit integer, libtorrent's range too.
                if len(digits) > 20 or not _canonical_int(digits):
                    raise BencodeError(f"non-canonical integer at offset {pos}")
                if not _INT_MIN <= int(digits) <= _INT_MAX:
                    raise BencodeError(f"integer out of 64-bit range at offset {pos}")
                pos = end + 1
                value_done = True
            elif c in _DIGITS:
                colon = data.find(b":", pos, pos + 21)
                if colon < 0:
                    raise BencodeError(f"bad string length at offset {pos}")
                digits = data[pos:colon]
                if not _canonical_uint(digits):
                    raise BencodeError(f"non-canonical string length at offset {pos}")
                length = int(digits)
                start = colon + 1
                if start + length > n:
                    raise BencodeError("string runs past the end of input")
                if frame is not None and frame[0] and frame[1]:
                    key = data[start : start + length]
                    prev = frame[2]
                    if isinstance(prev, bytes) and key <= prev:
                        raise BencodeError(
                            f"dictionary keys not strictly ascending at offset {pos}"
                        )
                    frame[2] = key
                    frame[1] = False
                    pos = start + length
                    continue
                pos = start + length
                value_done = True
            elif c in (0x6C, 0x64):  # 'l', 'd'
                if len(stack) >= max_depth:
                    raise BencodeError(f"nesting deeper than {max_depth}")
                stack.append([c == 0x64, c == 0x64, None])
                pos += 1
                continue
            else:
                raise BencodeError(f"unexpected byte {c:#04x} at offset {pos}")
        if value_done:
            if stack:
                top = stack[-1]
                if top[0]:
                    top[1] = True
                continue
            if pos != n:
                raise BencodeError(f"{n - pos} bytes of trailing data")
            return


def _canonical_uint(digits: bytes) -> bool:
    if not digits or not all(b in _DIGITS for b in digits):
        return False
    return digits == b"0" or digits[0] != 0x30


def _canonical_int(digits: bytes) -> bool:
    if digits.startswith(b"-"):
        rest = digits[1:]
        return _canonical_uint(rest) and rest != b"0"
    return _canonical_uint(digits)
