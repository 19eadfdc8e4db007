"""Start Debian's ``opentracker`` on a loopback port (interop tests and benchmarks).

opentracker only serves whitelisted info-hashes when built with ``WANT_ACCESSLIST_WHITE``
(Debian's build is): the whitelist holds one hex info-hash per line, and its path is
relative to the ``-d`` directory it chroots into.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from daemons.testbed.process import free_port, listeners, stop_process

__all__ = ["OpenTracker", "opentracker_binary", "run_opentracker"]


def opentracker_binary() -> str | None:
    return shutil.which("opentracker")


@dataclass
class OpenTracker:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def announce_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/announce"


@contextmanager
def run_opentracker(info_hashes: Iterable[bytes]) -> Iterator[OpenTracker]:
    """Run opentracker for ``info_hashes`` until the block exits."""
    binary = opentracker_binary()
    if binary is None:
        raise FileNotFoundError("opentracker is not installed (Debian package opentracker)")
    with tempfile.TemporaryDirectory(prefix="opentracker-") as tmp:
        root = Path(tmp)
        # opentracker chroots here and drops root for "nobody", who must read the list.
        root.chmod(0o755)
        hashes = list(info_hashes)
        (root / "whitelist").write_text("".join(h.hex() + "\n" for h in hashes))
        for _attempt in range(3):
            port = free_port()
            proc = subprocess.Popen(
                [
                    binary,
                    "-i",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-P",
                    str(port),
                    "-d",
                    tmp,
                    "-w",
                    "/whitelist",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                ready = _wait_ready(proc, port, hashes[0] if hashes else None)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if ready:
                break
            proc.kill()
            proc.wait()
        else:
            raise RuntimeError("opentracker could not bind a free port (3 attempts)")
        try:
            yield OpenTracker(port, proc)
        finally:
            stop_process(proc, grace=5)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, probe: bytes | None) -> bool:
    """Wait until opentracker answers, and has loaded its whitelist (it reads the list in
    a background thread after start-up, refusing every hash until then). False when it
    could not bind the port (taken since free_port() chose it) or shares it with another
    process: start it on another. Only an answer from a port this process alone listens
    on counts."""
    query = (
        "info_hash="
        + urllib.parse.quote(probe or bytes(20))
        + "&peer_id="
        + "-PROBE-"
        + "0" * 13
        + "&port=1&uploaded=0&downloaded=0&left=0&compact=1&event=stopped"
    )
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if "in use" in err.lower():
                return False
            raise RuntimeError(f"opentracker exited: {err.strip()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/announce?{query}", timeout=1
            ) as response:
                body = response.read()
            total, ours = listeners(proc.pid, port)
            if ours and ours < total:
                return False  # sharing the port with another process's listener
            if ours and (probe is None or b"not authorized" not in body):
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("opentracker did not become ready")
        time.sleep(0.05)
