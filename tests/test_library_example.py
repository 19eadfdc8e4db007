"""docs/library.md's example, run exactly as printed: a seeder and a leecher, each its own
program, meeting through the real tracker daemon with real node tokens."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import trio

from daemons.tracker import TrackerSettings, run_tracker
from p2pimage.auth.tokens import NodeKey, SigningKey, TokenIssuer

from .test_transfer import make_blob, sha256_file

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/library.md has no python example"
    return blocks[0]


async def test_library_example_seeds_and_fetches(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example_source())
    blob, meta = make_blob(tmp_path, 3 * 1024 * 1024)
    torrent = tmp_path / "layer.torrent"
    torrent.write_bytes(meta.to_bytes())
    seed_dir = tmp_path / "seeder"
    seed_dir.mkdir()
    blob.rename(seed_dir / meta.digest_hex)  # a complete blob, named by its digest
    issuer = TokenIssuer([SigningKey.generate()], issuer="sidecar")
    jwks = issuer.jwks()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))

    def config(name: str, directory: Path, tracker_url: str, seed_seconds: float) -> Path:
        key = NodeKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(key.to_pem())
        token = issuer.issue(
            subject=name, cluster="prod", node_jwk=key.public_jwk(), now=time.time()
        )
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "torrent": str(torrent),
                    "directory": str(directory),
                    "tracker_url": tracker_url,
                    "node": name,
                    "token": token,
                    "node_key": str(tmp_path / f"{name}.pem"),
                    "jwks": jwks,
                    "cluster": "prod",
                    "seed_seconds": seed_seconds,
                }
            )
        )
        return path

    settings = TrackerSettings(
        listen="127.0.0.1:0", jwks_file=jwks_file, interval_s=5, min_interval_s=1, log_json=True
    )
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_tracker, settings)
        announce = f"{base}/announce"
        outputs: dict[str, str] = {}

        async def run(name: str, cfg: Path) -> None:
            proc = await trio.run_process(
                [sys.executable, str(script), str(cfg)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr.decode()[-2000:]
            outputs[name] = proc.stdout.decode()

        with trio.fail_after(120):
            async with trio.open_nursery() as peers:
                peers.start_soon(run, "seeder", config("seeder", seed_dir, announce, 5.0))
                peers.start_soon(
                    run, "leecher", config("leecher", tmp_path / "leecher", announce, 0.0)
                )
        nursery.cancel_scope.cancel()
    leeched = tmp_path / "leecher" / meta.digest_hex
    assert sha256_file(leeched) == meta.sha256
    assert f"{meta.length} bytes from peers" in outputs["leecher"]
    assert outputs["leecher"].strip().endswith(str(leeched))
