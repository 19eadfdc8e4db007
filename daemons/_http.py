"""Serve a Starlette (any ASGI) app under trio with hypercorn's trio worker."""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.types import ASGIApp

__all__ = ["serve_app"]


async def serve_app(
    app: ASGIApp,
    listen: str,
    *,
    keep_alive_max_requests: int = 1000,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``; port 0 picks a free one) until cancelled.

    Reports the bound base URL (``http://host:port``) through ``task_status``.
    Access logs are off: daemons log the events that matter themselves.
    """
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_max_requests = keep_alive_max_requests

    async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve)
        task_status.started(binds[0])
