"""Metainfo codec, piece-length policy, one-pass creation and libtorrent compatibility."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import libtorrent as lt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimage.errors import (
    DigestMismatchError,
    LocalProtocolError,
    MetainfoError,
    RemoteProtocolError,
)
from p2pimage.metainfo.bencoding import bdecode, bencode
from p2pimage.metainfo.torrent import (
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    MIN_PIECES,
    PREFERRED_PIECE_LENGTH,
    TARGET_MAX_PIECES,
    Metainfo,
    MetainfoBuilder,
    choose_piece_length,
    create_metainfo_from_file,
    is_digest,
)
from p2pimage.oci.registry import is_digest as registry_is_digest

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def reference(data: bytes, piece_length: int, name: str = "blob") -> Metainfo:
    """The torrent computed the obvious way, to check the builder against."""
    pieces = tuple(
        hashlib.sha1(data[i : i + piece_length]).digest() for i in range(0, len(data), piece_length)
    )
    return Metainfo(
        name=name,
        length=len(data),
        piece_length=piece_length,
        pieces=pieces,
        sha256="sha256:" + hashlib.sha256(data).hexdigest(),
    )


metainfos = st.builds(
    lambda length, exp, name, digest, announce, seed: Metainfo(
        name=name,
        length=length,
        piece_length=2**exp,
        pieces=tuple(
            hashlib.sha1(b"%d-%d" % (seed, i)).digest() for i in range(-(-length // 2**exp))
        ),
        sha256="sha256:" + digest.hex(),
        announce=announce,
    ),
    length=st.integers(1, 50 * MiB),
    exp=st.integers(14, 24),
    name=st.text(min_size=1, max_size=30).filter(
        lambda s: "/" not in s and "\\" not in s and "\x00" not in s and s not in (".", "..")
    ),
    digest=st.binary(min_size=32, max_size=32),
    announce=st.none() | st.just("http://tracker.example:6969/announce"),
    seed=st.integers(0, 1000),
)


@given(metainfos)
@settings(max_examples=300)
def test_round_trip(meta: Metainfo) -> None:
    data = meta.to_bytes()
    back = Metainfo.from_bytes(data)
    assert back == meta
    assert back.info_hash == meta.info_hash
    assert back.to_bytes() == data


@st.composite
def torrent_garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, mutated valid torrents, and well-formed bencoding with wrong fields."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        blob = b"x" * draw(st.integers(1, 40 * KiB))
        data = bytearray(reference(blob, MIN_PIECE_LENGTH).to_bytes())
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)
    leaf = st.integers(-5, 2**20) | st.binary(max_size=45)
    info = draw(
        st.dictionaries(
            st.sampled_from(
                [b"length", b"name", b"piece length", b"pieces", b"sha256", b"files", b"x"]
            ),
            leaf | st.lists(leaf, max_size=2),
            max_size=6,
        )
    )
    top = {b"info": info} if draw(st.booleans()) else info
    return bencode(top)  # type: ignore[arg-type]


@given(torrent_garbage())
@settings(max_examples=2500)
def test_garbage_raises_only_metainfo_error(data: bytes) -> None:
    try:
        meta = Metainfo.from_bytes(data)
    except MetainfoError:
        return
    # Whatever parses is a valid torrent that re-encodes to the same bytes.
    assert meta.to_bytes() == data


@pytest.mark.parametrize(
    ("size", "piece_length"),
    [
        (1, 16 * KiB),
        (16 * KiB, 16 * KiB),
        (100 * KiB, 16 * KiB),  # 7 pieces: the smallest pieces, however few
        (1 * MiB, 16 * KiB),  # 64 pieces: the smallest pieces
        (4 * MiB, 16 * KiB),  # 256 pieces: 32 KiB would give 128
        (510 * 16 * KiB, 16 * KiB),  # 510 pieces: 32 KiB would give 255
        (510 * 16 * KiB + 1, 32 * KiB),  # 256 pieces
        (15 * MiB, 32 * KiB),  # 480 pieces: 64 KiB would give 240
        (16 * MiB, 64 * KiB),  # 256 pieces
        (32 * MiB, 128 * KiB),  # 256 pieces
        (255 * 256 * KiB, 128 * KiB),  # 510 pieces
        (255 * 256 * KiB + 1, 256 * KiB),  # 256 pieces at the preferred length
        (64 * MiB, 256 * KiB),  # 256 pieces
        (100 * MiB, 256 * KiB),  # 400 pieces
        (2000 * 256 * KiB, 256 * KiB),  # exactly 2,000 pieces
        (2000 * 256 * KiB + 1, 512 * KiB),  # 1,001 pieces
        (1 * GiB, 1 * MiB),  # 1,024 pieces
        (1 * GiB + 1, 1 * MiB),  # 1,025 pieces
        (2 * GiB, 2 * MiB),
        (32000 * MiB, 16 * MiB),  # 2,000 pieces at the maximum
        (100 * GiB, 16 * MiB),  # clamped: 6,400 pieces
    ],
)
def test_choose_piece_length(size: int, piece_length: int) -> None:
    assert choose_piece_length(size) == piece_length


@given(st.integers(1, 1 << 45))
def test_choose_piece_length_prefers_256_kib_within_256_to_2000_pieces(size: int) -> None:
    pl = choose_piece_length(size)
    assert pl & (pl - 1) == 0 and MIN_PIECE_LENGTH <= pl <= MAX_PIECE_LENGTH
    count = -(-size // pl)
    if pl < PREFERRED_PIECE_LENGTH:
        # Shrunk below the preferred length only to keep MIN_PIECES, and no further.
        assert count <= 2 * MIN_PIECES - 2
        if pl > MIN_PIECE_LENGTH:
            assert count >= MIN_PIECES
    elif pl > PREFERRED_PIECE_LENGTH:
        # Grown past it only to keep TARGET_MAX_PIECES, and no further.
        assert count > TARGET_MAX_PIECES // 2
    else:
        assert count >= MIN_PIECES
    if pl < MAX_PIECE_LENGTH:
        assert count <= TARGET_MAX_PIECES


@given(st.integers(1, 1 << 45), st.integers(1, 1 << 45))
def test_choose_piece_length_never_shrinks_for_a_larger_blob(a: int, b: int) -> None:
    small, large = sorted((a, b))
    assert choose_piece_length(small) <= choose_piece_length(large)


def test_choose_piece_length_refuses_a_negative_size() -> None:
    with pytest.raises(LocalProtocolError):
        choose_piece_length(-1)


@given(
    data=st.binary(min_size=1, max_size=100 * KiB),
    cuts=st.lists(st.integers(0, 100 * KiB), max_size=10),
)
@settings(max_examples=100)
def test_builder_any_chunking_matches_reference(data: bytes, cuts: list[int]) -> None:
    builder = MetainfoBuilder(len(data), "blob", MIN_PIECE_LENGTH)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for a, b in itertools.pairwise(bounds):
        builder.update(memoryview(data)[a:b])
    expected = reference(data, MIN_PIECE_LENGTH)
    assert builder.finish(expected.sha256) == expected


def test_builder_digest_mismatch() -> None:
    data = b"hello" * 10000
    builder = MetainfoBuilder(len(data), "blob")
    builder.update(data)
    with pytest.raises(DigestMismatchError):
        builder.finish("sha256:" + "00" * 32)


def test_builder_wrong_byte_count() -> None:
    builder = MetainfoBuilder(10, "blob")
    builder.update(b"12345")
    with pytest.raises(LocalProtocolError):
        builder.finish()
    builder = MetainfoBuilder(10, "blob")
    with pytest.raises(LocalProtocolError):
        builder.update(b"x" * 11)
    with pytest.raises(LocalProtocolError):
        MetainfoBuilder(0, "blob")
    with pytest.raises(LocalProtocolError):
        MetainfoBuilder(10, "blob", piece_length=3 * MIN_PIECE_LENGTH)
    with pytest.raises(LocalProtocolError):
        MetainfoBuilder(10, "a/b")


def test_create_from_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # 2.25 MiB, spans several read chunks' worth of pieces
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    meta = create_metainfo_from_file(path)
    assert meta == reference(data, choose_piece_length(len(data)), name="layer.tar")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert create_metainfo_from_file(path, "x", expected_digest=digest).name == "x"
    with pytest.raises(DigestMismatchError):
        create_metainfo_from_file(path, expected_digest="sha256:" + "11" * 32)


def test_piece_geometry() -> None:
    meta = reference(b"a" * (3 * MIN_PIECE_LENGTH + 100), MIN_PIECE_LENGTH)
    assert meta.num_pieces == 4
    assert [meta.piece_size(i) for i in range(4)] == [MIN_PIECE_LENGTH] * 3 + [100]
    assert meta.piece_offset(3) == 3 * MIN_PIECE_LENGTH
    with pytest.raises(LocalProtocolError):
        meta.piece_size(4)
    with pytest.raises(LocalProtocolError):
        meta.piece_offset(-1)


def test_info_hash_binds_sha256() -> None:
    meta = reference(b"abc" * 1000, MIN_PIECE_LENGTH)
    info = bdecode(meta.to_bytes())[b"info"]  # type: ignore[index,call-overload]
    assert info[b"sha256"] == hashlib.sha256(b"abc" * 1000).digest()
    assert meta.info_hash == hashlib.sha1(bencode(info)).digest()
    other = Metainfo(meta.name, meta.length, meta.piece_length, meta.pieces, "sha256:" + "00" * 32)
    assert other.info_hash != meta.info_hash


def test_libtorrent_loads_with_same_info_hash(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "layer"
    path.write_bytes(data)
    meta = create_metainfo_from_file(path, announce="http://127.0.0.1:1/announce")
    ti = lt.torrent_info(lt.bdecode(meta.to_bytes()))
    assert ti.info_hashes().v1.to_bytes() == meta.info_hash
    assert ti.total_size() == len(data)
    assert ti.piece_length() == meta.piece_length
    assert ti.num_pieces() == meta.num_pieces
    assert ti.name() == "layer"
    assert ti.hash_for_piece(1) == meta.pieces[1]
    # And libtorrent's own torrent of the same file, with our sha256 key added to its info
    # dictionary, is accepted by our parser with libtorrent's info-hash.
    files = lt.list_files(str(path))
    ct = lt.create_torrent(files, meta.piece_length, flags=lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(tmp_path))
    generated = ct.generate()
    info = {
        b"length": generated[b"info"][b"length"],
        b"name": generated[b"info"][b"name"],
        b"piece length": generated[b"info"][b"piece length"],
        b"pieces": generated[b"info"][b"pieces"],
        b"sha256": meta.sha256_bytes,
    }
    ours = Metainfo.from_bytes(bencode({b"info": info}))
    assert ours == Metainfo(meta.name, meta.length, meta.piece_length, meta.pieces, meta.sha256)
    lt_ti = lt.torrent_info(lt.bdecode(bencode({b"info": info})))
    assert lt_ti.info_hashes().v1.to_bytes() == ours.info_hash


def _torrent(info_changes: dict[bytes, object], drop: tuple[bytes, ...] = ()) -> bytes:
    meta = reference(b"z" * (MIN_PIECE_LENGTH + 5), MIN_PIECE_LENGTH)
    info: dict[bytes, object] = dict(meta.info_dict())
    info.update(info_changes)
    for key in drop:
        del info[key]
    return bencode({b"info": info})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_torrent({b"files": [{b"length": 1, b"path": [b"a"]}]}, drop=(b"length",)), "multi"),
        (_torrent({}, drop=(b"sha256",)), "no sha256"),
        (_torrent({b"sha256": b"\x00" * 31}), "short sha256"),
        (_torrent({b"piece length": 3 * MIN_PIECE_LENGTH}), "not a power of two"),
        (_torrent({b"piece length": MIN_PIECE_LENGTH // 2}), "below 16 KiB"),
        (_torrent({b"piece length": 2 * MAX_PIECE_LENGTH}), "above 16 MiB"),
        (_torrent({b"length": 0}), "zero length"),
        (_torrent({b"length": -1}), "negative length"),
        (_torrent({b"length": MIN_PIECE_LENGTH * 5}), "piece count"),
        (_torrent({b"pieces": b"\x00" * 41}), "pieces not multiple of 20"),
        (_torrent({b"name": b"\xff"}), "name not UTF-8"),
        (_torrent({b"name": b"../etc"}), "path in name"),
        (_torrent({b"name": 5}), "name type"),
        (_torrent({b"private": 1}), "unknown info key"),
        (_torrent({}, drop=(b"length",)), "no length"),
        (bencode([b"info"]), "not a dict"),
        (bencode({b"announce": b"x"}), "no info"),
        (_torrent({})[:-1], "truncated"),
        (b"d4:infod6:lengthi1e4:name1:aee" + b"x", "trailing data"),
    ],
)
def test_invalid_torrents_rejected(data: bytes, why: str) -> None:
    with pytest.raises(MetainfoError):
        Metainfo.from_bytes(data)


def test_multi_file_rejected_message() -> None:
    data = _torrent({b"files": [{b"length": 1, b"path": [b"a"]}]}, drop=(b"length",))
    with pytest.raises(MetainfoError, match="multi-file"):
        Metainfo.from_bytes(data)


def test_error_hierarchy_and_non_canonical() -> None:
    data = _torrent({})
    assert Metainfo.from_bytes(data).length == MIN_PIECE_LENGTH + 5
    # Same torrent with its info keys out of order: a different spelling, refused.
    noncanon = data.replace(b"6:lengthi16389e", b"").replace(
        b"6:sha256", b"6:lengthi16389e6:sha256"
    )
    assert noncanon != data and len(noncanon) == len(data)
    with pytest.raises(MetainfoError) as info:
        Metainfo.from_bytes(noncanon)
    assert isinstance(info.value, RemoteProtocolError)


def test_direct_construction_validates() -> None:
    with pytest.raises(LocalProtocolError):
        Metainfo("a", 10, MIN_PIECE_LENGTH, (), "sha256:" + "00" * 32)
    with pytest.raises(LocalProtocolError):
        Metainfo("a", 10, MIN_PIECE_LENGTH, (b"\x00" * 20,), "sha256:XYZ")


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("sha256:" + "0a" * 32, True),
        ("sha256:" + "0a" * 32 + "\n", False),  # `$` would let this one through
        ("sha256:" + "0A" * 32, False),
        ("sha512:" + "0a" * 64, False),
        ("sha256:" + "0a" * 31, False),
        (b"sha256:" + b"0a" * 32, False),
        (None, False),
    ],
)
def test_is_digest_accepts_only_the_canonical_form(text: object, valid: bool) -> None:
    assert is_digest(text) is valid
    assert registry_is_digest(text) is valid  # the OCI client's check is this one
