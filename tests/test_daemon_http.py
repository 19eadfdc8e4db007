"""The daemons' HTTP helpers (``daemons/_http.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio

from daemons._http import ClosingStreamingResponse


async def test_a_cancelled_response_closes_its_body_generator() -> None:
    """Starlette stops iterating a body when its send is cancelled but leaves the
    generator suspended at ``yield``, its ``finally`` deferred to garbage collection.
    The daemons' bodies hold swarm readers and cache pins, so ours closes it at once."""
    closed = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 1024
        finally:
            closed.set()

    generator = body()  # held here, so only an explicit aclose() can run its finally
    response = ClosingStreamingResponse(generator)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 3:  # headers and two chunks: then the client is too slow
            await trio.sleep_forever()

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with trio.move_on_after(0.2):
        await response(scope, receive, send)
    assert len(sent) == 3
    assert closed.is_set()
    assert generator.ag_frame is None  # finished, not suspended
