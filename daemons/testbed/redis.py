"""Start Debian's ``redis-server`` on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from daemons.testbed.process import free_port, stop_process

__all__ = ["redis_binary", "run_redis"]


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@contextmanager
def run_redis() -> Iterator[int]:
    """Run redis-server (no persistence) until the block exits; yields its port."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        stop_process(proc, grace=10)
