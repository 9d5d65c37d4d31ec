"""The log format: one JSON object per line, exceptions included, levels filtered."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from loguru import logger

from kap import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Where ``logs.setup`` writes for the test (it removes every sink); loguru's default after."""
    out = io.StringIO()
    yield out
    logger.remove()
    logger.add(sys.stderr)  # loguru's own default


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def test_each_record_is_one_json_object_with_ts_level_msg_and_bound_fields(
    stream: io.StringIO,
) -> None:
    logs.setup("info", stream)
    logger.bind(upstream="10.0.0.1:6443").info("upstream healthy", latency_ms=1.5)
    (line,) = lines(stream)
    assert list(line)[:3] == ["ts", "level", "msg"]
    assert (line["level"], line["msg"]) == ("info", "upstream healthy")
    assert (line["upstream"], line["latency_ms"]) == ("10.0.0.1:6443", 1.5)
    ts = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")  # RFC 3339, UTC
    assert ts.year >= 2024


def test_an_exception_stays_on_its_one_line(stream: io.StringIO) -> None:
    logs.setup("info", stream)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("it broke")
    assert stream.getvalue().count("\n") == 1
    (line,) = lines(stream)
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback")
    assert line["exception"].endswith("ValueError: bad\nthing")


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warn", "error"]),
        ("info", ["info", "warn", "error"]),
        ("warn", ["warn", "error"]),
        ("error", ["error"]),
    ],
)
def test_records_below_the_level_are_dropped_and_levels_have_operators_names(
    stream: io.StringIO, level: str, shown: list[str]
) -> None:
    logs.setup(level, stream)
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    assert [line["level"] for line in lines(stream)] == shown


def test_values_json_cannot_encode_are_strings_and_text_is_not_escaped(
    stream: io.StringIO,
) -> None:
    logs.setup("info", stream)
    logger.info("über", error=OSError(111, "Connection refused"), at=object)
    (line,) = lines(stream)
    assert line["msg"] == "über" and "über" in stream.getvalue()
    assert line["error"] == "[Errno 111] Connection refused"
    assert line["at"] == "<class 'object'>"


def test_a_field_named_like_a_core_one_does_not_replace_it(stream: io.StringIO) -> None:
    logs.setup("info", stream)
    logger.info("the message", msg="other", level="other")
    (line,) = lines(stream)
    assert (line["msg"], line["level"]) == ("the message", "info")
