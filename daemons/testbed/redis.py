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


def _answer_pid(port: int) -> int | None:
    """The ``process_id`` of the redis-server answering on ``port``, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk or len(data) > 65536:
                    return None
                data += chunk
    except OSError:
        return None
    return int(data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])


@contextmanager
def run_redis(port: int | None = None) -> Iterator[int]:
    """Run redis-server (no persistence) until the block exits; yields its port.

    Ready means *this* process answers (its ``INFO`` process id), not just anything on the
    port; one that lost its free_port() to another process before binding it is started
    again on a new port. With ``port`` (a Redis started again where clients expect it),
    that port only."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian package redis-server)")
    fixed = port
    for _attempt in range(3 if fixed is None else 1):
        port = fixed or free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while _answer_pid(port) != proc.pid:
            if proc.poll() is not None:
                break  # it could not bind: the port was taken meanwhile
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        raise RuntimeError(f"redis-server could not bind port {port}")
    try:
        yield port
    finally:
        stop_process(proc, grace=10)
