"""PieceStorage: verify-before-write, resume, streaming readers, atomic completion."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pimage.errors import (
    DigestMismatchError,
    LocalProtocolError,
    PieceHashError,
    StorageBusyError,
    StorageError,
)
from p2pimage.metainfo.torrent import MIN_PIECE_LENGTH, Metainfo, MetainfoBuilder
from p2pimage.storage.pieces import PieceStorage, _Assembly

PL = MIN_PIECE_LENGTH
BLOCK = 4096


def make_blob(length: int, seed: int = 1) -> tuple[bytes, Metainfo]:
    data = random.Random(seed).randbytes(length)
    builder = MetainfoBuilder(length, "layer", PL)
    builder.update(data)
    return data, builder.finish()


@pytest.fixture
def blob() -> tuple[bytes, Metainfo]:
    return make_blob(10 * PL + 1234)  # 11 pieces, a short last one


def piece(data: bytes, meta: Metainfo, i: int) -> bytes:
    off = meta.piece_offset(i)
    return data[off : off + meta.piece_size(i)]


def blocks(data: bytes, meta: Metainfo) -> list[tuple[int, int, bytes]]:
    out = []
    for i in range(meta.num_pieces):
        p = piece(data, meta, i)
        out += [(i, b, p[b : b + BLOCK]) for b in range(0, len(p), BLOCK)]
    return out


def test_out_of_order_blocks_complete(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    todo = blocks(data, meta)
    random.Random(7).shuffle(todo)
    completed = []
    with PieceStorage.open(tmp_path, meta) as store:
        for i, b, chunk in todo:
            if store.write_block(i, b, chunk):
                completed.append(i)
        assert sorted(completed) == list(range(meta.num_pieces))
        assert store.all_pieces_verified and not store.complete
        assert store.have == b"\xff\xe0" and store.num_have == 11
        assert store.bytes_have == len(data)
        assert store.read_block(3, 100, 50) == piece(data, meta, 3)[100:150]
        path = store.finalize_sync()
        assert store.complete and store.path == path == tmp_path / meta.digest_hex
        # Still readable after the rename (same open file).
        assert store.read_block(10, 0, 1234) == piece(data, meta, 10)
        # Late duplicate after completion: ignored.
        assert store.write_block(0, 0, data[:BLOCK]) is False
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta.digest_hex
    assert sorted(os.listdir(tmp_path)) == [meta.digest_hex]
    # Reopening finds the complete blob (and removes a stale state from a crash after
    # the rename).
    (tmp_path / f"{meta.digest_hex}.state").write_bytes(b"stale")
    with PieceStorage.open(tmp_path, meta) as again:
        assert again.complete and again.num_have == meta.num_pieces
    assert sorted(os.listdir(tmp_path)) == [meta.digest_hex]


def test_bad_piece_never_lands(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        good = piece(data, meta, 2)
        bad = bytes([good[0] ^ 1]) + good[1:]
        assert store.write_block(2, BLOCK, bad[BLOCK:]) is False
        assert store.in_progress == {2}
        with pytest.raises(PieceHashError) as info:
            store.write_block(2, 0, bad[:BLOCK])
        assert info.value.index == 2
        assert not store.has_piece(2) and store.num_have == 0 and store.in_progress == set()
        with pytest.raises(PieceHashError):
            store.write_piece(2, bad)
        with pytest.raises(LocalProtocolError):
            store.read_block(2, 0, 1)
        fd = os.open(tmp_path / f"{meta.digest_hex}.partial", os.O_RDONLY)
        try:
            assert os.pread(fd, PL, 2 * PL) == bytes(PL)  # nothing written
        finally:
            os.close(fd)
        # The buffer was dropped: the good piece now assembles from scratch.
        assert store.write_piece(2, good) is True
        assert store.write_piece(2, good) is False  # duplicate
        assert store.write_block(2, 0, good[:10]) is False  # late block


def test_out_of_range_is_local_error(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    _, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        for args in [
            (11, 0, b"x"),
            (-1, 0, b"x"),
            (10, 1234, b"x"),
            (0, PL - 1, b"xy"),
            (0, -1, b"x"),
            (0, 0, b""),
        ]:
            with pytest.raises(LocalProtocolError):
                store.write_block(*args)
        with pytest.raises(LocalProtocolError):
            store.write_piece(0, b"short")
        with pytest.raises(LocalProtocolError):
            store.read_block(0, PL - 1, 2)
        with pytest.raises(LocalProtocolError):
            store.finalize_sync()
        with pytest.raises(LocalProtocolError):
            _ = store.path


def test_pieces_in_progress_bounded(tmp_path: Path) -> None:
    data, meta = make_blob(8 * PL)
    with PieceStorage.open(tmp_path, meta, max_buffered_bytes=3 * PL) as store:
        assert store.max_pieces_in_progress == 3
        for i in range(3):
            store.write_block(i, 0, piece(data, meta, i)[:BLOCK])
        with pytest.raises(StorageBusyError, match="in progress"):
            store.write_block(3, 0, piece(data, meta, 3)[:BLOCK])
        store.discard_piece(0)
        assert store.write_block(3, 0, piece(data, meta, 3)[:BLOCK]) is False
        assert store.write_piece(4, piece(data, meta, 4)) is True  # whole pieces bypass it


def test_resume_keeps_verified_pieces(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        for i in (0, 5, 10):
            store.write_piece(i, piece(data, meta, i))
        store.write_block(3, 0, piece(data, meta, 3)[:BLOCK])  # in memory only: lost
    assert (tmp_path / f"{meta.digest_hex}.state").exists()
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.missing_pieces() == [1, 2, 3, 4, 6, 7, 8, 9]
        assert store.bytes_have == 2 * PL + 1234
        assert store.read_block(5, 0, 100) == piece(data, meta, 5)[:100]
        for i in store.missing_pieces():
            store.write_piece(i, piece(data, meta, i))
        store.finalize_sync()
    assert (tmp_path / meta.digest_hex).read_bytes() == data
    assert not (tmp_path / f"{meta.digest_hex}.state").exists()


def test_resume_rehashes_claimed_pieces(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        for i in (1, 2):
            store.write_piece(i, piece(data, meta, i))
    # Bytes that never reached the disk (or rotted) are not trusted on resume.
    partial = tmp_path / f"{meta.digest_hex}.partial"
    fd = os.open(partial, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x00" * 10, meta.piece_offset(2) + 7)
    finally:
        os.close(fd)
    with PieceStorage.open(tmp_path, meta) as store:
        assert [i for i in range(meta.num_pieces) if store.has_piece(i)] == [1]


def test_batched_flush(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    state = tmp_path / f"{meta.digest_hex}.state"
    store = PieceStorage.open(tmp_path, meta, flush_every_bytes=2 * PL)
    store.write_piece(0, piece(data, meta, 0))
    assert not state.exists()  # batched
    store.write_piece(1, piece(data, meta, 1))
    assert state.exists()  # the batch filled
    store.write_piece(2, piece(data, meta, 2))
    # Simulated crash: the state describes pieces 0 and 1 only.
    os.close(store._fd)  # type: ignore[arg-type]
    store._fd = None
    with PieceStorage.open(tmp_path, meta) as again:
        assert again.missing_pieces() == list(range(2, 11))


@pytest.mark.parametrize(
    "state_bytes",
    [
        b"garbage",
        b"",
        b"d4:havei1ee",
        b"d4:have2:\xff\xe09:info_hash20:" + b"\x00" * 20 + b"7:versioni1ee",  # foreign
    ],
)
def test_bad_or_foreign_state_starts_clean(
    tmp_path: Path, blob: tuple[bytes, Metainfo], state_bytes: bytes
) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
    (tmp_path / f"{meta.digest_hex}.state").write_bytes(state_bytes)
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 0
        assert not (tmp_path / f"{meta.digest_hex}.state").exists()


def test_state_with_spare_bits_or_wrong_partial_size_starts_clean(
    tmp_path: Path, blob: tuple[bytes, Metainfo]
) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
    state = tmp_path / f"{meta.digest_hex}.state"
    good = state.read_bytes()
    state.write_bytes(good.replace(b"4:have2:\x80\x00", b"4:have2:\x80\x01"))
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 0
        store.write_piece(0, piece(data, meta, 0))
    os.truncate(tmp_path / f"{meta.digest_hex}.partial", 5)
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 0


def test_a_whole_piece_in_one_block_frees_its_assembly(tmp_path: Path) -> None:
    """A piece that was being assembled and then arrives whole in one block is stored,
    and its assembly buffer no longer counts against max_pieces_in_progress."""
    data, meta = make_blob(8 * PL)
    with PieceStorage.open(tmp_path, meta, max_buffered_bytes=2 * PL) as store:
        assert store.write_block(0, 0, piece(data, meta, 0)[:BLOCK]) is False
        assert store.write_block(1, 0, piece(data, meta, 1)[:BLOCK]) is False
        assert store.write_block(0, 0, piece(data, meta, 0)) is True
        assert store.has_piece(0)
        assert store.write_block(2, 0, piece(data, meta, 2)[:BLOCK]) is False  # room again


def _padded_state(good: bytes, size: int) -> bytes:
    """``good`` (a bencoded dict) with an unknown trailing key that makes it ``size`` bytes."""
    for n in range(size):
        out = good[:-1] + b"2:zz" + str(n).encode() + b":" + b"x" * n + b"e"
        if len(out) == size:
            return out
    raise AssertionError(f"no padding makes {size} bytes")


def test_state_size_cap_edges(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    """The resume state is read up to 64 + 2 * (bytes of the bitfield) + 100 bytes, and
    refused (a clean start) one byte beyond."""
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
    state = tmp_path / f"{meta.digest_hex}.state"
    good = state.read_bytes()
    cap = 64 + 2 * ((meta.num_pieces + 7) // 8) + 100
    state.write_bytes(_padded_state(good, cap))
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 1
    state.write_bytes(_padded_state(good, cap + 1))
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 0
        assert not state.exists()


def test_state_counts_only_the_pieces_it_claims(
    tmp_path: Path, blob: tuple[bytes, Metainfo]
) -> None:
    """Good bytes on disk for a piece the state does not claim are not taken."""
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        for i in (0, 7, 8):
            store.write_piece(i, piece(data, meta, i))
    state = tmp_path / f"{meta.digest_hex}.state"
    good = state.read_bytes()
    assert b"4:have2:\x81\x80" in good
    state.write_bytes(good.replace(b"4:have2:\x81\x80", b"4:have2:\x01\x00"))
    with PieceStorage.open(tmp_path, meta) as store:
        assert [i for i in range(meta.num_pieces) if store.has_piece(i)] == [7]


def test_state_with_one_spare_bit_set_starts_clean(tmp_path: Path) -> None:
    data, meta = make_blob(22 * PL + 5)  # 23 pieces: a 3-byte bitfield, one spare bit
    assert meta.num_pieces == 23
    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
    state = tmp_path / f"{meta.digest_hex}.state"
    good = state.read_bytes()
    assert b"4:have3:\x80\x00\x00" in good
    state.write_bytes(good.replace(b"4:have3:\x80\x00\x00", b"4:have3:\x80\x00\x01"))
    with PieceStorage.open(tmp_path, meta) as store:
        assert store.num_have == 0


def test_finalize_a_blob_longer_than_one_read(tmp_path: Path) -> None:
    """finalize hashes the blob in 4 MiB reads; the last one is short."""
    data = random.Random(5).randbytes(4 * 1024 * 1024 + 1234)
    builder = MetainfoBuilder(len(data), "layer", 1024 * 1024)
    builder.update(data)
    meta = builder.finish()
    with PieceStorage.open(tmp_path, meta) as store:
        for i in range(meta.num_pieces):
            store.write_piece(i, piece(data, meta, i))
        assert store.finalize_sync().read_bytes() == data


def test_finalize_survives_a_directory_that_cannot_be_synced(
    tmp_path: Path, blob: tuple[bytes, Metainfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync of the directory after the rename is best effort: its failure is not
    the blob's."""
    data, meta = blob
    real_open = os.open

    def no_directories(path: object, flags: int, *args: object) -> int:
        if Path(str(path)) == tmp_path:
            raise OSError(errno.EIO, "simulated")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    with PieceStorage.open(tmp_path, meta) as store:
        for i in range(meta.num_pieces):
            store.write_piece(i, piece(data, meta, i))
        monkeypatch.setattr(os, "open", no_directories)
        assert store.finalize_sync().read_bytes() == data


def test_assembly_does_not_take_a_range_from_byte_1_for_a_leading_one() -> None:
    """A piece whose byte 0 is missing is not complete, however the rest arrived."""
    asm = _Assembly(10)
    assert asm.add(1, memoryview(b"x" * 3)) is False  # [1, 4)
    assert asm.add(4, memoryview(b"x" * 6)) is False  # [1, 10): byte 0 still missing
    assert asm.ranges == [[1, 10]]
    assert asm.add(0, memoryview(b"x")) is True


async def test_stream_in_order_while_writing(tmp_path: Path) -> None:
    data, meta = make_blob(40 * PL + 77)
    order = list(range(meta.num_pieces))
    random.Random(3).shuffle(order)
    received: list[bytes] = []
    first_chunk_at_have: list[int] = []

    with PieceStorage.open(tmp_path, meta) as store:

        async def writer() -> None:
            for i in order:
                store.write_piece(i, piece(data, meta, i))
                await trio.sleep(0)
                await trio.sleep(0)

        async def reader() -> None:
            async for chunk in store.stream(chunk_size=3 * PL):
                if not received:
                    first_chunk_at_have.append(store.num_have)
                received.append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert b"".join(received) == data
        assert all(len(c) <= 3 * PL for c in received)
        assert first_chunk_at_have[0] < meta.num_pieces  # before the blob was complete
        await store.finalize()
        assert store.complete


async def test_two_readers_and_ranges(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    results: dict[str, bytes] = {}
    with PieceStorage.open(tmp_path, meta) as store:

        async def read(name: str, start: int, end: int | None) -> None:
            parts = [c async for c in store.stream(start, end, chunk_size=5000)]
            results[name] = b"".join(parts)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "all", 0, None)
            nursery.start_soon(read, "mid", PL - 10, 3 * PL + 10)
            nursery.start_soon(read, "empty", 5, 5)
            await trio.sleep(0.01)
            assert results == {"empty": b""}
            for i in reversed(range(meta.num_pieces)):
                store.write_piece(i, piece(data, meta, i))
                await trio.sleep(0)
        assert results["all"] == data
        assert results["mid"] == data[PL - 10 : 3 * PL + 10]
        with pytest.raises(LocalProtocolError):
            async for _ in store.stream(5, 4):
                pass


async def test_wait_piece_from_worker_thread_write(
    tmp_path: Path, blob: tuple[bytes, Metainfo]
) -> None:
    data, meta = blob
    with PieceStorage.open(tmp_path, meta) as store:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def waiter() -> None:
                await store.wait_piece(4)
                done.set()

            nursery.start_soon(waiter)
            await trio.sleep(0.01)
            # Hashing a piece may be pushed to a worker thread; the wakeup still arrives.
            await trio.to_thread.run_sync(store.write_piece, 4, piece(data, meta, 4))
            with trio.fail_after(5):
                await done.wait()


async def test_close_wakes_waiters(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    _, meta = blob
    store = PieceStorage.open(tmp_path, meta)
    errors: list[Exception] = []

    async def waiter() -> None:
        try:
            await store.wait_piece(0)
        except StorageError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.01)
        store.close()
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_enospc_is_storage_error(
    tmp_path: Path, blob: tuple[bytes, Metainfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, meta = blob

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(StorageError) as info:
            store.write_piece(1, piece(data, meta, 1))
        message = str(info.value)
        assert f"{meta.digest_hex}.partial" in message
        assert "No space left on device" in message and "ENOSPC" in message
        assert not store.has_piece(1)
        monkeypatch.undo()
        for i in range(1, meta.num_pieces):
            store.write_piece(i, piece(data, meta, i))
        assert not (tmp_path / meta.digest_hex).exists()
        store.finalize_sync()
    assert (tmp_path / meta.digest_hex).read_bytes() == data


def test_unwritable_root_is_storage_error(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    _, meta = blob
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="file"):
        PieceStorage.open(blocker / "sub", meta)


async def test_digest_mismatch_at_finalize(tmp_path: Path) -> None:
    data, good = make_blob(3 * PL + 5)
    meta = Metainfo(good.name, good.length, good.piece_length, good.pieces, "sha256:" + "0" * 64)
    with PieceStorage.open(tmp_path, meta) as store:
        for i in range(meta.num_pieces):
            store.write_piece(i, piece(data, meta, i))
        store.flush()
        with pytest.raises(DigestMismatchError):
            await store.finalize()
        assert not store.complete and store.num_have == 0 and store.bytes_have == 0
        assert os.listdir(tmp_path) == [f"{'0' * 64}.partial"]
        # A reader that started before the reset learns it instead of mixing generations.
        store.write_piece(0, piece(data, meta, 0))
        stream = store.stream()
        assert await stream.__anext__() == piece(data, meta, 0)
        for i in range(meta.num_pieces):
            store.write_piece(i, piece(data, meta, i))
        with pytest.raises(DigestMismatchError):
            store.finalize_sync()
        with pytest.raises(DigestMismatchError):
            await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
    assert not (tmp_path / ("0" * 64)).exists()


async def test_cursor_tells_the_caller_what_is_missing_and_guards_the_generation(
    tmp_path: Path,
) -> None:
    """The caller drives a BlobCursor and learns everything from its answers (the store
    never calls out): where it is, whether the piece there is missing, the bytes once it
    is not; after a digest-mismatch reset every call raises."""
    data, good = make_blob(3 * PL + 5)
    meta = Metainfo(good.name, good.length, good.piece_length, good.pieces, "sha256:" + "0" * 64)
    with PieceStorage.open(tmp_path, meta) as store:
        cursor = store.cursor(PL - 10, 2 * PL + 3)
        assert (cursor.position, cursor.done, cursor.missing()) == (PL - 10, False, True)
        assert cursor.ready(1 << 20) == 0
        with pytest.raises(LocalProtocolError):
            cursor.read(100)  # its piece is not verified
        with trio.move_on_after(0.05) as waited:
            await cursor.wait()
        assert waited.cancelled_caught  # still missing: wait() waits
        store.write_piece(0, piece(data, meta, 0))
        await cursor.wait()
        assert (cursor.ready(1 << 20), cursor.ready(4)) == (10, 4)  # what read() would give
        assert cursor.read(1 << 20) == data[PL - 10 : PL]  # stops at the verified run's end
        assert cursor.position == PL and cursor.missing()
        store.write_piece(2, piece(data, meta, 2))
        with trio.move_on_after(0.05) as waited:
            await cursor.wait_at(2 * PL)
        assert not waited.cancelled_caught  # the piece under that offset is there
        with pytest.raises(LocalProtocolError):
            await cursor.wait_at(2 * PL + 3)  # beyond the cursor's end
        store.write_piece(1, piece(data, meta, 1))
        assert not cursor.missing()
        assert cursor.ready(1 << 20) == PL + 3  # up to the cursor's end
        assert cursor.read(PL) == data[PL : 2 * PL]
        store.write_piece(3, piece(data, meta, 3))
        with pytest.raises(DigestMismatchError):
            store.finalize_sync()  # the reset: a new generation
        with pytest.raises(DigestMismatchError):
            cursor.read(3)
        with pytest.raises(DigestMismatchError):
            await cursor.wait()
        with pytest.raises(LocalProtocolError):
            store.cursor(5, 4)


def test_open_complete(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    data, meta = blob
    path = tmp_path / "seed.bin"
    path.write_bytes(data)
    with PieceStorage.open_complete(path, meta, verify=True) as store:
        assert store.complete and store.path == path and store.have == b"\xff\xe0"
        assert store.read_block(10, 0, 1234) == piece(data, meta, 10)
        assert store.write_piece(0, piece(data, meta, 0)) is False
    assert path.read_bytes() == data
    path.write_bytes(data[:100] + b"!" + data[101:])
    with PieceStorage.open_complete(path, meta) as store:  # verify=False trusts it
        assert store.complete
    with pytest.raises(PieceHashError):
        PieceStorage.open_complete(path, meta, verify=True)
    path.write_bytes(data[:-1])
    with pytest.raises(StorageError, match="bytes"):
        PieceStorage.open_complete(path, meta)
    with pytest.raises(StorageError, match="No such file"):
        PieceStorage.open_complete(tmp_path / "missing", meta)


@given(
    seed=st.integers(0, 2**32),
    length=st.integers(1, 5 * PL),
    cuts=st.lists(st.integers(1, PL - 1), max_size=6),
)
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_permutation_and_chunking(
    tmp_path_factory: pytest.TempPathFactory, seed: int, length: int, cuts: list[int]
) -> None:
    data, meta = make_blob(length, seed)
    rng = random.Random(seed)
    todo = []
    for i in range(meta.num_pieces):
        p = piece(data, meta, i)
        bounds = sorted({0, len(p), *(c for c in cuts if c < len(p))})
        todo += [(i, a, p[a:b]) for a, b in itertools.pairwise(bounds)]
        if rng.random() < 0.3:  # an overlapping duplicate block, as in endgame
            a = rng.randrange(len(p))
            todo.append((i, a, p[a : a + BLOCK]))
    rng.shuffle(todo)
    root = tmp_path_factory.mktemp("perm")
    with PieceStorage.open(root, meta) as store:
        for i, b, chunk in todo:
            store.write_block(i, b, chunk)
        assert store.all_pieces_verified
        store.finalize_sync()
    assert (root / meta.digest_hex).read_bytes() == data


def test_read_verified_edges(tmp_path: Path) -> None:
    """Bounds of read_verified (survivors of mutation testing, docs/testing.md): no empty
    read, none at or past the end, one byte is a read, and a run of verified pieces that
    ends exactly at the end of a blob whose length is a multiple of the piece length."""
    data, meta = make_blob(2 * PL)
    with PieceStorage.open(tmp_path, meta) as store:
        store.write_piece(0, piece(data, meta, 0))
        store.write_piece(1, piece(data, meta, 1))
        for offset, max_bytes in [(0, 0), (0, -1), (2 * PL, 1), (-1, 1)]:
            with pytest.raises(LocalProtocolError):
                store.read_verified(offset, max_bytes)
        assert store.read_verified(0, 1) == data[:1]
        assert store.read_verified(PL - 1, 1) == data[PL - 1 : PL]
        assert store.read_verified(0, 2 * PL) == data
        assert store.read_verified(5, 10 * PL) == data[5:]


def test_sendfile_serves_a_complete_blob_only(tmp_path: Path, blob: tuple[bytes, Metainfo]) -> None:
    """The plaintext fast path: block_offset checks the block as read_block does, and
    sendfile writes the blob's own bytes to a socket, only from a complete store."""
    import socket

    data, meta = blob
    path = tmp_path / "seed.bin"
    path.write_bytes(data)
    a, b = socket.socketpair()
    with a, b, PieceStorage.open_complete(path, meta) as store:
        offset = store.block_offset(10, 100, 1000)
        assert offset == meta.piece_offset(10) + 100
        sent = 0
        while sent < 1000:
            sent += store.sendfile(a.fileno(), offset + sent, 1000 - sent)
        got = b""
        while len(got) < 1000:
            got += b.recv(1000 - len(got))
        assert got == piece(data, meta, 10)[100:1100]
        for bad in ((10, 0, 1235), (10, -1, 10), (11, 0, 1), (0, 0, 0)):
            with pytest.raises(LocalProtocolError):
                store.block_offset(*bad)
        with pytest.raises(LocalProtocolError):
            store.sendfile(a.fileno(), meta.length - 10, 11)
    with pytest.raises(StorageError, match="closed"):
        store.sendfile(a.fileno(), 0, 1)
    with PieceStorage.open(tmp_path / "partial", meta) as partial:
        partial.write_piece(0, piece(data, meta, 0))
        assert partial.block_offset(0, 0, 10) == 0
        with pytest.raises(LocalProtocolError, match="not verified"):
            partial.block_offset(1, 0, 10)
        with pytest.raises(StorageError, match="not complete"):
            partial.sendfile(a.fileno(), 0, 10)
    c, d = socket.socketpair()
    with c, d, PieceStorage.open_complete(path, meta) as store:
        os.truncate(path, 500)  # shortened behind the store's back
        with pytest.raises(StorageError, match="shorter"):
            store.sendfile(c.fileno(), 600, 10)
