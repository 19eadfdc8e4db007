"""Node processes forked from one pre-imported launcher, for clusters on one machine.

A node process spends most of its start-up importing: ~0.6 CPU-seconds of Python
imports against ~0.1 for everything else up to ready (docs/benchmarks.md, "Where the
cluster demo's CPU goes"). A real cluster pays that once per node and machine; the local
cluster, with N nodes on one machine, paid it N times. The launcher is a process
(``python -m daemons.testbed.nodefork``) that imports :mod:`daemons.node` once and then
forks one child per node, each running the same ``p2pimage node`` command line as
``python -m daemons.node`` would: its own process, its own trio loop, its own log, sharing
only the imported modules (copy on write). The launcher starts no thread and no event
loop before it forks.

The launcher speaks JSON lines: on stdin ``{"argv": [...], "log": PATH}`` asks for a
node; on stdout ``{"ready": true}`` once imported, ``{"pid": N}`` per node started and
``{"exit": N, "returncode": C}`` per node ended (C as :mod:`subprocess` has it: negative
for a signal). On SIGTERM it gives the nodes ``STOP_GRACE_S`` to end (their owners stop
them) before it terminates, then kills, what is left; on stdin's end (its owner is gone)
it terminates them at once. It exits once every node has been reaped, so a node's CPU
time reaches the launcher's owner through the launcher (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

__all__ = ["ForkedNode", "NodeLauncher", "STOP_GRACE_S"]

#: How long the launcher, told to stop, waits for its nodes to end on their own (their
#: owners send each its SIGTERM; a node shuts down in well under a second) before it
#: sends SIGTERM itself; and then again before SIGKILL.
STOP_GRACE_S = 2.0

# The signals the launcher handles itself, and a node process for itself.
_HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


# --------------------------------------------------------------------------- the launcher


class _Launcher:
    """The launcher process's state: its nodes, and the line protocol with its owner."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        self.inbox = b""

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the owner is gone: nothing to tell
            os.write(1, json.dumps(message).encode() + b"\n")

    def reap(self) -> None:
        """Report every node that has ended."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send({"exit": pid, "returncode": os.waitstatus_to_exitcode(status)})

    def wait_children(self, seconds: float) -> None:
        """Reap until no node is left or ``seconds`` have passed (woken by SIGCHLD)."""
        deadline = time.monotonic() + seconds
        self.reap()
        while self.children:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if select.select([self.wake_r], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 512)
            self.reap()

    def stop(self, grace: float) -> NoReturn:
        """End every node (after ``grace`` seconds of waiting for them), then exit."""
        self.wait_children(grace)
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 0.5)):
            for pid in list(self.children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            self.wait_children(wait)
        sys.stdout.flush()
        os._exit(0)

    def start_node(self, request: dict[str, Any]) -> None:
        argv = [str(a) for a in request["argv"]]
        log_path = str(request["log"])
        sys.stdout.flush()
        sys.stderr.flush()
        # Until the child has its own handlers, a signal for it stays pending: the
        # launcher's handlers, inherited, would swallow it (and wake the launcher).
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                self._run_child(argv, log_path)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        self.children.add(pid)
        self.send({"pid": pid})

    def _run_child(self, argv: list[str], log_path: str) -> NoReturn:
        """In the forked child: become ``p2pimage node ARGV`` with output to the log."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            os.close(self.wake_r)
            os.close(self.wake_w)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            os.close(null_fd)
            from daemons.node import node

            node.main(args=argv, prog_name="p2pimage node")
            code = 0
        except SystemExit as exc:  # click's way out, with the command's exit code
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def serve(self) -> NoReturn:
        stop_requested = False
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        # Python-level handlers that do nothing: the signal numbers arrive on wake_r.
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        # A terminal's Ctrl-C reaches the whole process group: the owner and the nodes
        # stop on it themselves; the launcher then stops when told (SIGTERM, stdin's end).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # What every node imports or builds first, done once here. anyio's trio backend
        # is imported on httpx's first request, the IDNA codec on its first name lookup;
        # the trust store is loaded once per process.
        import encodings.idna  # noqa: F401

        import anyio._backends._trio  # noqa: F401

        import daemons.node  # noqa: F401
        from daemons._http import system_tls

        system_tls()

        self.send({"ready": True})
        while True:
            readable = select.select([0, self.wake_r], [], [])[0]
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    stop_requested |= signal.SIGTERM in os.read(self.wake_r, 512)
                self.reap()
                if stop_requested:
                    self.stop(STOP_GRACE_S)
            if 0 in readable:
                data = os.read(0, 65536)
                if not data:
                    self.stop(0.0)
                self.inbox += data
                while b"\n" in self.inbox:
                    line, _, self.inbox = self.inbox.partition(b"\n")
                    try:
                        self.start_node(json.loads(line))
                    except (ValueError, KeyError, TypeError) as exc:
                        self.send({"error": f"bad request: {exc}"})
                    except OSError as exc:  # fork failed (EAGAIN, ENOMEM)
                        self.send({"error": f"cannot start a node: {exc}"})


# --------------------------------------------------------------------------- its owner


class ForkedNode:
    """A node process forked by a :class:`NodeLauncher`: ``pid``, and ``returncode`` once
    the launcher has reported its end (as :class:`trio.Process` has them)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._reported = trio.Event()
        self._gone = False
        # Not our child, so no waitpid: a pidfd turns readable when the process ends.
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    def _ended_with(self, returncode: int) -> None:
        self.returncode = returncode
        self._reported.set()

    async def wait_returncode(self) -> int:
        """Until the launcher has reported the process's end; its return code."""
        await self._reported.wait()
        assert self.returncode is not None
        return self.returncode

    async def wait(self) -> None:
        """Until the process has ended (its return code may still be on its way)."""
        if self._gone:
            return
        if self._pidfd is None:
            await self._reported.wait()
        else:
            await trio.lowlevel.wait_readable(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._gone = True

    def send_signal(self, sig: int) -> None:
        if self._gone or self._reported.is_set():
            return  # its pid may belong to another process by now
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the node stops at once, as on a power loss (fault injection)."""
        self.send_signal(signal.SIGKILL)

    async def run(self) -> None:
        """Wait for the process; cancelled, stop it as :func:`trio.run_process` would
        (SIGTERM, up to 5 seconds, SIGKILL) and wait until it has ended."""
        try:
            await self.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                self.terminate()
                with trio.move_on_after(5):
                    await self.wait()
                if not self._gone:
                    self.kill()
                    await self.wait()
            raise


class NodeLauncher:
    """The owner's side: run the launcher process (:meth:`run`, in a nursery), then
    :meth:`start` node processes from it (each waits until the launcher is ready)."""

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        self.ready = trio.Event()
        self._nodes: dict[int, ForkedNode] = {}
        self._send_reply, self._replies = trio.open_memory_channel[ForkedNode | str](1)
        self._lock = trio.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "daemons.testbed.nodefork"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            assert self.process.stdout is not None
            lines = _lines(self.process.stdout)
            first = await anext(lines, b"")
            if first != b'{"ready": true}':
                raise RuntimeError(f"node launcher did not start: {first!r}")
            self.ready.set()
            task_status.started()
            try:
                async for line in lines:
                    self._dispatch(json.loads(line))
            finally:
                self._send_reply.close()  # a start() waiting for its pid fails
                for node in self._nodes.values():  # no more news of them
                    if node.returncode is None:
                        node._ended_with(-signal.SIGKILL)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "pid" in message:
            node = self._nodes[int(message["pid"])] = ForkedNode(int(message["pid"]))
            self._send_reply.send_nowait(node)
        elif "exit" in message:
            ended = self._nodes.get(int(message["exit"]))
            if ended is not None:
                ended._ended_with(int(message["returncode"]))
        elif "error" in message:
            self._send_reply.send_nowait(str(message["error"]))

    async def start(self, argv: Sequence[str], log_path: Path) -> ForkedNode:
        """Fork a node process running ``p2pimage node ARGV``, its output appended to
        ``log_path``."""
        await self.ready.wait()
        assert self.process is not None and self.process.stdin is not None
        request = json.dumps({"argv": list(argv), "log": str(log_path)}).encode() + b"\n"
        async with self._lock:
            try:
                await self.process.stdin.send_all(request)
                reply = await self._replies.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
                raise RuntimeError("node launcher: it has exited") from None
        if isinstance(reply, str):
            raise RuntimeError(f"node launcher: {reply}")
        return reply


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            yield line


if __name__ == "__main__":
    _Launcher().serve()
