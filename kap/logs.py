"""One JSON object per log line on stderr, as Kubernetes log pipelines expect.

Fields: ``ts`` (RFC 3339, UTC, microseconds), ``level``, ``msg``, then the
structured fields bound with ``logger.bind(...)`` or passed as keyword
arguments (``upstream``, ``error``, ...). An exception is rendered into the
``exception`` field, so it stays on one line. Configured once, by the entry
point; modules only import ``loguru.logger``.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import UTC
from typing import Any, TextIO

from loguru import logger

# loguru level names -> the names operators grep for.
_LEVELS = {"WARNING": "warn", "CRITICAL": "error", "SUCCESS": "info", "TRACE": "debug"}
_LOGURU_LEVEL = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "error": "ERROR"}


def render(record: Any) -> str:
    """The JSON line for a loguru record."""
    level = record["level"].name
    out: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "level": _LEVELS.get(level, level.lower()),
        "msg": record["message"],
    }
    for key, value in record["extra"].items():
        out.setdefault(key, value)
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        out["exception"] = "".join(
            traceback.format_exception(exc.type, exc.value, exc.traceback)
        ).strip()
    return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str, stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) as JSON lines."""
    target = stream if stream is not None else sys.stderr

    def sink(message: Any) -> None:
        target.write(render(message.record) + "\n")
        target.flush()

    logger.remove()
    logger.add(
        sink,
        level=_LOGURU_LEVEL[level],
        format="{message}",
        backtrace=False,
        diagnose=False,
        catch=True,
    )
