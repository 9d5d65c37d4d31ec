"""The kinds of option value: each parser as a table of good and bad text (no I/O).

A bad value raises ``ValueError``: one line quoting the text given (or its bad part); kap
prints it after "invalid --flag (env VAR): ".
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from kap.address import Address
from kap.kinds import (
    ADDRESSES,
    BOOL,
    DIRECTORY,
    DURATION,
    FILE,
    FRACTION,
    IP,
    LISTEN,
    LISTEN_PORT,
    LOG_LEVEL,
    NEW_FILE,
    PATH_LIST,
    POSITIVE_DURATION,
    TEXT,
    Disk,
    Kind,
    parse_server_name,
)

HERE = Disk(cwd="/work")


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        (BOOL, "true", True),
        (BOOL, " YES ", True),
        (BOOL, "on", True),
        (BOOL, "1", True),
        (BOOL, "f", False),
        (BOOL, "Off", False),
        (BOOL, "0", False),
        (IP, "10.0.0.1", "10.0.0.1"),
        (IP, " FD00:0::1 ", "fd00::1"),
        (IP, "::", "::"),
        (LISTEN_PORT, "0", 0),
        (LISTEN_PORT, " 7443 ", 7443),
        (LISTEN_PORT, "65535", 65535),
        (LISTEN, ":8080", ("", 8080)),
        (LISTEN, "127.0.0.1:9", ("127.0.0.1", 9)),
        (LISTEN, "[::1]:80", ("::1", 80)),
        (LISTEN, ":0", ("", 0)),
        (LOG_LEVEL, "INFO", "info"),
        (LOG_LEVEL, "warning", "warn"),
        (LOG_LEVEL, " debug ", "debug"),
        (DURATION, "0", 0.0),
        (DURATION, "1m30s", 90.0),
        (POSITIVE_DURATION, "100ms", 0.1),
        (FRACTION, "0", 0.0),
        (FRACTION, "0.2", 0.2),
        (FRACTION, "1", 1.0),
        (ADDRESSES, "10.0.0.1:1,10.0.0.2:2", (Address("10.0.0.1", 1), Address("10.0.0.2", 2))),
        (ADDRESSES, "", ()),
        (TEXT, " kube-system ", "kube-system"),
        (FILE, "pki/ca.crt", "/work/pki/ca.crt"),
        (FILE, "/etc/ca.crt", "/etc/ca.crt"),
        (NEW_FILE, "state/../fallback.json", "/work/fallback.json"),
        (DIRECTORY, " sp ", "/work/sp"),
        (PATH_LIST, "a:b", "a:b"),  # split later, with the credentials
    ],
)
def test_good_text_parses_to_its_value(kind: Kind[Any], text: str, value: object) -> None:
    assert kind.parse(text, HERE) == value


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (BOOL, "maybe"),
        (BOOL, ""),
        (IP, "10.0.0"),
        (IP, "localhost"),
        (LISTEN_PORT, "65536"),
        (LISTEN_PORT, "-1"),
        (LISTEN_PORT, "0x10"),
        (LISTEN, "8080"),
        (LISTEN, "[::1]80"),
        (LISTEN, "[::1"),
        (LISTEN, "host:80"),
        (LISTEN, ":http"),
        (LOG_LEVEL, "loud"),
        (LOG_LEVEL, "trace"),
        (DURATION, "5"),
        (POSITIVE_DURATION, "0"),
        (POSITIVE_DURATION, "0s"),
        (FRACTION, "x"),
        (FRACTION, "1.5"),
        (FRACTION, "-0.1"),
        (ADDRESSES, "10.0.0.1"),
    ],
)
def test_bad_text_is_one_line_naming_what_was_given(kind: Kind[Any], text: str) -> None:
    with pytest.raises(ValueError) as err:
        kind.parse(text, HERE)
    message = str(err.value)
    assert message and "\n" not in message
    quoted = re.findall(r"'([^']*)'", message)
    assert any(q in text for q in quoted), message  # it names what was given, or its bad part


def test_a_file_to_read_must_be_readable_now() -> None:
    disk = Disk(readable=lambda path: "no such file", cwd="/work")
    with pytest.raises(ValueError, match=r"^'ca\.crt': no such file$"):
        FILE.parse("ca.crt", disk)


def test_a_file_to_write_needs_its_directory_not_itself() -> None:
    disk = Disk(readable=lambda path: "no such file", is_dir=lambda p: p == "/work/state")
    assert NEW_FILE.parse("/work/state/f.json", disk) == "/work/state/f.json"
    with pytest.raises(ValueError, match="directory /work/none does not exist"):
        NEW_FILE.parse("/work/none/f.json", disk)


def test_relative_paths_without_a_cwd_are_taken_against_the_process_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    assert DIRECTORY.parse("sp", Disk()) == f"{tmp_path}/sp"


def test_only_bool_is_a_flag_and_only_paths_take_blank_as_the_default() -> None:
    kinds = [IP, LISTEN_PORT, LISTEN, LOG_LEVEL, DURATION, POSITIVE_DURATION, FRACTION, ADDRESSES]
    kinds += [BOOL, TEXT, FILE, NEW_FILE, DIRECTORY, PATH_LIST]
    assert [k.name for k in kinds if k.is_flag] == ["bool"]
    assert {k.name for k in kinds if k.blank_is_default} == {
        FILE.name,
        NEW_FILE.name,
        DIRECTORY.name,
        PATH_LIST.name,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kubernetes.default.svc", "kubernetes.default.svc"),
        (" API.Example.COM. ", "api.example.com"),
        ("", ""),  # empty: verify the dialed address
        ("10.0.0.1", "10.0.0.1"),
        ("[fd00::1]", "fd00::1"),
        ("a-b.c", "a-b.c"),
    ],
)
def test_server_names(text: str, expected: str) -> None:
    assert parse_server_name(text) == expected


@pytest.mark.parametrize(
    "text", ["a b", "a/b", "a\x00b", "é.example", "-a.b", "a-.b", "a..b", "x" * 64 + ".b"]
)
def test_server_names_that_no_certificate_can_match_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a DNS name or an IP address"):
        parse_server_name(text)
