"""What kind of value an option takes: how its text becomes a typed value.

Pure logic. Each row of the option table (``kap.options.OPTIONS``) names one
``Kind``; ``Kind.parse`` turns the flag's (or env var's, or default's) text
into the value of the ``Config`` field of the same name, or raises
``ValueError`` whose message is the rest of the one line kap prints
("invalid --flag (env VAR): <message>"). The kinds of file options ask the
disk through a ``Disk`` of functions handed in, so these parsers are tested
without touching it.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

from kap.address import Address, AddressError, parse_list, parse_port
from kap.durations import parse_duration

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warn", "error")
_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


@attrs.frozen
class Disk:
    """What the file kinds need to know about the disk (functions, so tests fake them).

    ``readable(path)`` is None when the file can be read, else the reason;
    ``is_dir(path)`` says whether a directory exists; relative paths are taken
    against ``cwd`` (None: the process's working directory).
    """

    readable: Callable[[str], str | None] = lambda path: None
    is_dir: Callable[[str], bool] = lambda path: True
    cwd: str | None = None

    def absolute(self, path: str) -> str:
        """Relative to the working directory, as in any CLI (made absolute once, here)."""
        if self.cwd is None:
            return posixpath.abspath(path.strip())
        return posixpath.normpath(posixpath.join(self.cwd, path.strip()))


@attrs.frozen
class Kind(Generic[T]):
    """A kind of option value.

    ``metavar`` names it in ``kap --help``. ``is_flag``: given alone
    (``--discovery``) it means true. ``blank_is_default``: an empty or blank
    value means the option's default (for paths: unset).
    """

    name: str
    parse: Callable[[str, Disk], T]
    metavar: str
    is_flag: bool = False
    blank_is_default: bool = False


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")


def parse_ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        raise AddressError(f"{text!r} is not an IP address") from None


def parse_listen_port(text: str, whole: str | None = None) -> int:
    """A port to listen on: 1..65535, or 0 for one the kernel chooses."""
    if text.strip() == "0":
        return 0
    return parse_port(text.strip(), what=repr(text if whole is None else whole))


def parse_host_port(text: str) -> tuple[str, int]:
    """``[host]:port`` / ``host:port`` / ``:port`` for a listener; host '' = all."""
    raw = text.strip()
    if raw.startswith(":"):
        return "", parse_listen_port(raw[1:], text)
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise AddressError(f"{text!r}: expected [IPv6]:port")
        return parse_ip(raw[1:end]), parse_listen_port(raw[end + 2 :], text)
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise AddressError(f"{text!r}: expected host:port or :port")
    return parse_ip(host), parse_listen_port(port, text)


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    level = "warn" if level == "warning" else level
    if level not in LOG_LEVELS:
        raise ValueError(f"{text!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level


def parse_positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r}: must be greater than 0")
    return seconds


def parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r}: must be between 0 and 1")
    return value


def parse_addresses(text: str) -> tuple[Address, ...]:
    return tuple(parse_list(text))


def readable_file(text: str, disk: Disk) -> str:
    """A file given explicitly must be readable now: a typo fails fast, not at the first probe."""
    path = disk.absolute(text)
    why = disk.readable(path)
    if why is not None:
        raise ValueError(f"{text!r}: {why}")
    return path


def file_to_write(text: str, disk: Disk) -> str:
    """A file kap creates and repairs: it need not exist, its directory must."""
    path = disk.absolute(text)
    parent = posixpath.dirname(path)
    if not disk.is_dir(parent):
        raise ValueError(f"{text!r}: directory {parent} does not exist")
    return path


# RFC 1123 host name labels (what a certificate's DNS SAN can match); the
# whole name at most 253 characters.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def parse_server_name(text: str) -> str:
    """A TLS server name: a DNS name or an IP address; empty = the dialed address.

    Anything else (spaces, slashes, a NUL, non-ASCII) can match no
    certificate, so it is refused at start instead of failing every probe.
    """
    name = text.strip().lower().rstrip(".")
    if not name:
        return ""
    try:
        return ipaddress.ip_address(name.strip("[]")).compressed
    except ValueError:
        pass
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not a DNS name or an IP address")
    return name


def _pure(parse: Callable[[str], T]) -> Callable[[str, Disk], T]:
    """A parser that does not ask the disk."""
    return lambda text, _disk: parse(text)


IP = Kind("ip", _pure(parse_ip), "IP")
LISTEN_PORT = Kind("port", _pure(parse_listen_port), "PORT")
LISTEN = Kind("[host]:port", _pure(parse_host_port), "[HOST]:PORT")
LOG_LEVEL = Kind("log level", _pure(parse_log_level), "LEVEL")
DURATION = Kind("duration", _pure(parse_duration), "DURATION")
POSITIVE_DURATION = Kind("positive duration", _pure(parse_positive_duration), "DURATION")
FRACTION = Kind("fraction", _pure(parse_fraction), "0..1")
ADDRESSES = Kind("address list", _pure(parse_addresses), "HOST:PORT,...")
BOOL = Kind("bool", _pure(parse_bool), "[=BOOL]", is_flag=True)
TEXT = Kind("text", _pure(str.strip), "NAME")
SERVER_NAME = Kind("server name", _pure(parse_server_name), "NAME")
FILE = Kind("readable file", readable_file, "FILE", blank_is_default=True)
NEW_FILE = Kind("file in an existing directory", file_to_write, "FILE", blank_is_default=True)
DIRECTORY = Kind("directory", lambda text, disk: disk.absolute(text), "DIR", blank_is_default=True)
# Kept as given: the kubeconfig is read (and its paths split) with the credentials.
PATH_LIST = Kind("path list", lambda text, _disk: text, "PATH[:PATH...]", blank_is_default=True)
