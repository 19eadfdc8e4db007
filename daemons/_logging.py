"""Logging for daemons: one JSON object per line, or plain text when stderr is a TTY.

Structured fields go in ``extra={"fields": {...}}``; they become keys of the JSON object
(and ``key=value`` pairs in text mode).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Annotated, Any, Literal

from pydantic import Field

__all__ = ["JsonFormatter", "LogJson", "LogLevel", "setup_logging"]

# The two logging settings every daemon's settings model declares (same names, same
# meaning): ``log_level: LogLevel = "info"`` and ``log_json: LogJson = None``.
LogLevel = Literal["debug", "info", "warning", "error"]
LogJson = Annotated[bool | None, Field(description="JSON lines (default: unless a TTY)")]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(level: str = "info", *, json_lines: bool | None = None) -> None:
    """Configure the root logger on stderr; JSON lines unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO (each announce, each range read): noise at scale.
    for chatty in ("httpx", "httpcore", "hpack"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
