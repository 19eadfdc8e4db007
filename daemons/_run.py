"""Running a daemon (or the demo) until it finishes or is told to stop.

Kubernetes stops a pod with SIGTERM and a terminal sends SIGINT: either cancels the whole
task tree, so every ``finally`` runs (swarms announce ``stopped``, child processes are
terminated, temporary directories removed) before the process exits.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
import trio

from p2pimage.errors import leaf_exceptions

__all__ = ["exit_after_shutdown", "run_until_signalled"]

log = logging.getLogger("p2pimage")

T = TypeVar("T")


def run_until_signalled(async_fn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
    """``trio.run(async_fn, *args)``, cancelled cleanly by SIGTERM or SIGINT.

    Returns the function's result, or None when a signal stopped it.
    """

    async def main() -> T | None:
        result: list[T] = []
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("stopping on %s", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            async def work() -> None:
                result.append(await async_fn(*args))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(work)
        return result[0] if result else None

    # Everything allocated so far (the imported modules, the settings) lives as long as
    # the process: moved out of the collector's reach, a full collection no longer walks
    # it, and a node forked from a pre-imported launcher no longer dirties the pages it
    # shares with it (docs/benchmarks.md, "The cluster demo by phase and kind").
    gc.freeze()
    try:
        try:
            return trio.run(main)
        except BaseExceptionGroup as group:
            # One failure inside the task tree: re-raise it as itself, so callers (and
            # click) see the ClickException or error they would see without the watcher.
            leaves = leaf_exceptions(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    except click.ClickException:
        raise  # a one-line error the command prints itself (a listener, a setting)
    except Exception:
        # Whatever brought the daemon down goes to its log, traceback included, not only
        # to a stderr that nobody collects.
        log.critical("stopped by an unhandled error", exc_info=True)
        raise


def exit_after_shutdown() -> NoReturn:
    """End a daemon process whose task tree has shut down cleanly (every ``finally`` has
    run): flush the log handlers and the standard streams, then ``os._exit(0)``.

    This skips the interpreter's own teardown — freeing every module and object, and
    joining idle worker threads — which a process about to vanish does not need: it cost
    a node process 0.15–0.25 CPU-seconds and about a second of wall time here (the local
    cluster's teardown, docs/benchmarks.md). ``atexit`` handlers do not run; the daemons
    register none."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
