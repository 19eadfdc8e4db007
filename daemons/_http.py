"""Serve a Starlette (any ASGI) app under trio with hypercorn's trio worker."""

from __future__ import annotations

from typing import Any

import click
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pimage.errors import leaf_exceptions

__all__ = ["ClosingStreamingResponse", "ListenError", "request_url", "serve_app"]

# How long a cancelled response may spend in its body generator's clean-up.
_ACLOSE_GRACE_S = 5.0


class ListenError(click.ClickException):
    """A listener could not be opened (address in use, not an address of this host,
    a privileged port): one line and exit code 1 from the daemon's command."""


class _Started:
    """Passes ``started`` on, remembering that it happened."""

    def __init__(self, inner: trio.TaskStatus[list[str]]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


class ClosingStreamingResponse(StreamingResponse):
    """A :class:`StreamingResponse` that always closes its body generator.

    Starlette iterates the body and stops when the client goes or the server is
    cancelled, but does not ``aclose()`` it: a generator suspended at ``yield`` runs its
    ``finally`` blocks only when garbage-collected, which may be after the daemon has
    stopped. Ours hold files, pins and swarm readers, so they are closed here, shielded
    for a bounded grace.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(_ACLOSE_GRACE_S, shield=True):
                    await aclose()


async def serve_app(
    app: ASGIApp,
    listen: str,
    *,
    keep_alive_max_requests: int = 1000,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``; port 0 picks a free one) until cancelled.

    Reports the bound base URL (``http://host:port``) through ``task_status``; raises
    :class:`ListenError` when the address cannot be bound.
    Access logs are off: daemons log the events that matter themselves.
    """
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_max_requests = keep_alive_max_requests

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        status = _Started(task_status)
        try:
            await serve(app, config, task_status=status)  # type: ignore[arg-type]
        except (OSError, BaseExceptionGroup) as exc:
            # hypercorn binds inside a nursery of its own: the error may come grouped.
            leaves = leaf_exceptions(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
            if status.done or not all(isinstance(e, OSError) for e in leaves):
                raise
            error = leaves[0]
            assert isinstance(error, OSError)
            raise ListenError(f"cannot listen on {listen}: {error.strerror or error}") from None

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        task_status.started(binds[0])


def request_url(scope: Scope, host: str, public_url: str | None = None) -> str:
    """The URL a request was sent to, as a DPoP proof's ``htu`` names it: the scheme, the
    ``Host`` header, and the path and query exactly as they arrived (no re-encoding).
    Behind a TLS-terminating proxy, ``public_url`` (the scheme and host clients use)
    replaces the first two."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    target: str = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    if public_url is not None:
        return public_url.rstrip("/") + target
    return f"{scope.get('scheme', 'http')}://{host}{target}"
