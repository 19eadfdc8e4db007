"""Helper processes the local cluster, the benchmarks and the tests start (the registry,
containerd): one spawn / wait-until-ready / stop life cycle, and free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import trio

__all__ = ["ManagedProcess", "cpu_seconds", "free_port", "stop_process"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bind to port 0, read it back)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far, its exited threads
    included (``/proc/<pid>/stat``, in clock ticks: 10 ms here). Raises
    :class:`OSError` when the process is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; nothing if it has exited."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# A process that lost its free_port() to another one before binding it starts again on
# a new port, this many times in all (two losses in a row are already rare).
_PORT_ATTEMPTS = 3


def listeners(pid: int, port: int) -> tuple[int, int]:
    """(sockets listening on TCP ``port``, how many of them process ``pid`` holds), IPv4
    in this network namespace, from /proc. Tells our server from another one that took
    the port first, or shares it (SO_REUSEPORT: opentracker binds so, and two of them on
    one port would split the connections between them)."""
    inodes = set()
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    owned = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                owned += os.readlink(fd) in inodes
    return len(inodes), owned


class ManagedProcess:
    """The life cycle shared by the process wrappers (dataclasses that declare
    ``log_path`` and ``_proc`` as fields): a subclass writes its configuration and calls
    :meth:`_popen` in ``_spawn``, answers ``_ready`` with one probe, and may finish
    setting up in ``_started`` once the process answers."""

    name: ClassVar[str]
    poll_s: ClassVar[float] = 0.05
    start_timeout_s: ClassVar[float] = 15.0
    stop_grace_s: ClassVar[float] = 5.0
    log_path: Path
    _proc: subprocess.Popen[bytes] | None

    def _spawn(self) -> None:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _started(self) -> None:
        """Blocking set-up after the process answers (runs in a thread under trio)."""

    def _popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` in its own session, output appended to ``log_path`` (with
        ``env`` added to this process's environment)."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **env} if env else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self._proc.returncode}:\n{self.log_text()[-3000:]}"
            )

    def _timed_out(self, timeout: float) -> TimeoutError:
        self.stop()
        return TimeoutError(f"{self.name} did not answer within {timeout}s")

    def _repick_port(self) -> bool:
        """The process lost its port to another one (taken between :func:`free_port`
        and its bind): choose a new port and return True to start again, or False when
        the port was the caller's choice. Subclasses that pick their own port override."""
        return False

    def _lost_port(self) -> bool:
        return "address already in use" in self.log_text().lower() and self._repick_port()

    def start_sync(self, timeout: float | None = None) -> None:
        """Spawn and wait until ready (``timeout`` defaults to ``start_timeout_s``)."""
        timeout = self.start_timeout_s if timeout is None else timeout
        for attempt in range(_PORT_ATTEMPTS):
            self._spawn()
            deadline = time.monotonic() + timeout
            try:
                while not self._ready():
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise self._timed_out(timeout)
                    time.sleep(self.poll_s)
            except RuntimeError:
                if attempt + 1 < _PORT_ATTEMPTS and self._lost_port():
                    continue
                raise
            break
        self._started()

    async def start(self, timeout: float | None = None) -> None:
        """:meth:`start_sync` for trio: the probes run in a thread."""
        timeout = self.start_timeout_s if timeout is None else timeout
        for attempt in range(_PORT_ATTEMPTS):
            self._spawn()
            with trio.move_on_after(timeout) as scope:
                try:
                    while not await trio.to_thread.run_sync(self._ready):
                        self._check_alive()
                        await trio.sleep(self.poll_s)
                except RuntimeError:
                    if attempt + 1 < _PORT_ATTEMPTS and self._lost_port():
                        continue
                    raise
            if scope.cancelled_caught:
                raise self._timed_out(timeout)
            break
        await trio.to_thread.run_sync(self._started)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM, wait up to ``grace`` seconds (``stop_grace_s``), then SIGKILL.
        Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, self.stop_grace_s if grace is None else grace)
