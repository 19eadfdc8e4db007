"""``p2pimage torrent create`` / ``inspect`` through the real click entry point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from daemons.cli import main
from p2pimage.metainfo.torrent import Metainfo


def test_create_then_inspect_json(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    blob = tmp_path / "layer.tar"
    blob.write_bytes(data)
    out = tmp_path / "layer.torrent"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "torrent",
            "create",
            str(blob),
            "-o",
            str(out),
            "--name",
            "my-layer",
            "--piece-length",
            "32768",
            "--announce",
            "http://127.0.0.1:6969/announce",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = Metainfo.from_bytes(out.read_bytes())
    assert result.output.strip() == meta.info_hash.hex()

    result = runner.invoke(main, ["torrent", "inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "info_hash": meta.info_hash.hex(),
        "name": "my-layer",
        "length": len(data),
        "piece_length": 32768,
        "num_pieces": 8,
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
        "announce": "http://127.0.0.1:6969/announce",
    }

    result = runner.invoke(main, ["torrent", "inspect", str(out)])
    assert result.exit_code == 0
    assert meta.info_hash.hex() in result.output and "my-layer" in result.output


def test_garbage_torrent_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(b"d4:infod5:filesleee")
    result = CliRunner().invoke(main, ["torrent", "inspect", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Error:" in result.stderr
    assert "Traceback" not in result.output


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["torrent", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2


def test_bad_piece_length_exits_1(tmp_path: Path) -> None:
    blob = tmp_path / "b"
    blob.write_bytes(b"x" * 100)
    out = tmp_path / "b.torrent"
    result = CliRunner().invoke(
        main, ["torrent", "create", str(blob), "-o", str(out), "--piece-length", "1000"]
    )
    assert result.exit_code == 1 and "power of two" in result.stderr
    assert not out.exists()
