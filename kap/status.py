"""``kap status``: what a running kap is doing, read from its ``/upstreams``.

The operator's view of one node: a kubectl-style table of the upstreams, one
line about discovery and one per problem (``kap.problems``), or the document
itself with ``-o json``. Exit status: 0 when kap answers and reports no
problem, 1 when it reports problems, 2 when nothing answers (one line on
stderr) or the command line is wrong.

Where to ask, first that applies: ``--address``; the health address from the
flags and environment given (``--health-listen``, ``HEALTH_LISTEN``); PID 1's
when PID 1 is kap (inside kap's container, ``kubectl exec ... -- kap status``
needs no flag: ``kap.invocation``); else kap's default, 127.0.0.1:8080.

The request has one deadline for everything (connect, send, read), so a
health port that accepts and never answers cannot hang the command. The
formatting functions are pure and tested with tables.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import click
import h11
import trio

from kap.config import OPTIONS, parse_host_port
from kap.durations import DurationError, parse_duration
from kap.invocation import Invocation, running_kap
from kap.problems import utc

# kap's own default --health-listen (":8080"), asked on loopback.
DEFAULT_ADDRESS = ("127.0.0.1", 8080)
# The whole request: loopback answers in milliseconds; a kap whose event loop
# is stuck for seconds is itself the finding.
DEFAULT_TIMEOUT = "3s"
# /upstreams of a pool of hundreds of upstreams is well under 1 MiB.
MAX_BODY = 16 * 1024 * 1024
LAST_ERROR_WIDTH = 60  # the table's; -o wide prints it whole
HEALTH_LISTEN = next(o for o in OPTIONS if o.name == "health_listen")


class Unanswered(Exception):
    """Nothing (or nothing like kap's health server) answered: exit 2, one line."""


@attrs.frozen
class Target:
    host: str
    port: int
    origin: str  # where the address came from, for the error line

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---- where to ask ------------------------------------------------------------


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (a name is fine: the resolver is asked)."""
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
    else:
        host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected host:port")
    return host, int(port)


def loopback_for(listen: str) -> tuple[str, int]:
    """Where to reach a health server listening on ``listen`` (``:8080`` -> 127.0.0.1:8080)."""
    host, port = parse_host_port(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def target(
    address: str | None, health_listen: str | None, pid1: Callable[[], Invocation | None]
) -> Target:
    """Where to ask (rules in the module docstring). Raises ValueError on a bad address.

    ``pid1`` is called only when neither an address nor a health address was given.
    """
    if address is not None:
        return Target(*split_host_port(address), origin="--address")
    if health_listen is not None:
        return Target(*loopback_for(health_listen), origin="--health-listen")
    running = pid1()
    if running is not None:
        listen = running.setting(HEALTH_LISTEN)
        if listen is not None:
            return Target(*loopback_for(listen), origin="PID 1's --health-listen")
        return Target(*DEFAULT_ADDRESS, origin="PID 1's default")
    return Target(*DEFAULT_ADDRESS, origin="the default")


# ---- asking --------------------------------------------------------------------


async def fetch(where: Target) -> dict[str, Any]:
    """GET ``/upstreams`` from ``where``; the caller bounds it with a cancel scope.

    Raises:
      Unanswered: refused, unreachable, or not kap's answer.
    """
    try:
        status, body = await _get(where, "/upstreams")
    except OSError as e:
        raise Unanswered(f"nothing answers at {where}: {_why(e)}") from None
    except (h11.ProtocolError, trio.BrokenResourceError) as e:
        raise Unanswered(f"{where} does not speak HTTP like kap: {e}") from None
    if status != 200:
        raise Unanswered(f"{where} answered /upstreams with HTTP {status}: not kap?")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("upstreams"), list):
        raise Unanswered(f"{where} answered /upstreams with something else than kap's JSON")
    return doc


async def _get(where: Target, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(where.host, where.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", str(where)), ("Accept", "application/json"), ("Connection", "close")],
        )
        await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError(f"answer larger than {MAX_BODY} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(body)


def _why(e: OSError) -> str:
    """The reason in an error of trio's happy eyeballs ("Connection refused", not "all
    attempts failed"): the first attempt's."""
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup) and isinstance(cause.exceptions[0], OSError):
        e = cause.exceptions[0]
    if isinstance(e.errno, int) and e.errno > 0:  # not a resolver error (those are < 0)
        return os.strerror(e.errno)
    return e.strerror or str(e)


# ---- formatting (pure) ---------------------------------------------------------

Column = tuple[str, Callable[[Mapping[str, Any]], str]]

COLUMNS: tuple[Column, ...] = (
    ("ADDRESS", lambda u: str(u["address"])),
    ("HEALTHY", lambda u: _bool(u["healthy"])),
    ("SCORE", lambda u: str(u["score"])),
    ("TIER", lambda u: _or_none(u["tier"])),
    ("LATENCY", lambda u: latency(u["latency_ms"])),
    ("ACTIVE", lambda u: str(u["active_connections"])),
    ("TOTAL", lambda u: str(u["connections_total"])),
    ("SOURCES", lambda u: ",".join(u["sources"]) or "<none>"),
)
LAST_ERROR: Column = ("LAST ERROR", lambda u: u["last_error"] or "<none>")
WIDE: tuple[Column, ...] = (
    ("PROBED", lambda u: _bool(u["probed"])),
    ("SUSPECT", lambda u: _bool(u["suspect"])),
    ("AUTH REFUSED", lambda u: _bool(u["auth_refused"])),
    ("PROBES", lambda u: str(u["probes_total"])),
    ("PROBE FAILURES", lambda u: str(u["probe_failures_total"])),
    ("DIAL FAILURES", lambda u: str(u["dial_failures_total"])),
    ("TRANSITIONS", lambda u: str(u["transitions_total"])),
    ("UNHEALTHY FOR", lambda u: _seconds(u["unhealthy_for_s"])),
    ("HELD DOWN", lambda u: _seconds(u["held_down_for_s"])),
    ("REMOVAL IN", lambda u: _seconds(u["removal_in_s"])),
)


def render(doc: Mapping[str, Any], output: str, now_unix: float) -> str:
    """What ``kap status -o OUTPUT`` prints for ``doc`` (ends with a newline)."""
    if output == "json":
        return json.dumps(doc, indent=2) + "\n"
    wide = output == "wide"
    columns = COLUMNS + (WIDE if wide else ()) + (LAST_ERROR,)
    rows = [[get(u) for _, get in columns] for u in doc["upstreams"]]
    if not wide:
        for row in rows:
            row[-1] = shorten(row[-1], LAST_ERROR_WIDTH)
    lines = table([name for name, _ in columns], rows) if rows else ["No upstreams."]
    lines.append(discovery_line(doc.get("discovery"), now_unix))
    lines.extend(problem_lines(doc.get("problems", [])))
    return "\n".join(lines) + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """kubectl's layout: left-aligned columns three spaces apart, no trailing blanks."""
    widths = [max(len(cell) for cell in col) for col in zip(header, *rows, strict=False)]
    return [
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def discovery_line(discovery: Mapping[str, Any] | None, now_unix: float) -> str:
    if discovery is None:
        return "discovery: off (--discovery=false)"
    mode = discovery.get("mode", "?")
    if mode == "off":
        return f"discovery: off: {discovery.get('last_error') or 'unknown reason'}"
    parts = [f"discovery: {mode}"]
    if discovery.get("source_upstream"):
        parts[0] += f" via {discovery['source_upstream']}"
    addresses = discovery.get("addresses") or []
    parts.append(f"{len(addresses)} address{'es' * (len(addresses) != 1)}")
    last = discovery.get("last_success_unix")
    parts.append("no success yet" if last is None else f"last success {age(now_unix - last)} ago")
    since = discovery.get("failing_since_unix")
    if since is not None:
        parts.append(
            f"failing since {utc(since)} ({discovery.get('errors_total', 0)} errors in all): "
            f"{discovery.get('last_error')}"
        )
    return ", ".join(parts)


def problem_lines(problems: Sequence[str]) -> list[str]:
    return [f"problem: {p}" for p in problems] or ["problems: none"]


def latency(ms: float | None) -> str:
    if ms is None:
        return "<none>"
    if ms < 1:
        return f"{ms * 1e3:.0f}us"
    if ms < 1e3:
        return f"{ms:.1f}ms"
    return f"{ms / 1e3:.2f}s"


def age(seconds: float) -> str:
    """kubectl's AGE: two units at most (``45s``, ``3m20s``, ``2h5m``, ``3d4h``)."""
    s = max(0, int(seconds))
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = (s % size) // small_size
            return f"{s // size}{unit}" + (f"{rest}{small}" if rest else "")
    if s >= 60:
        return f"{s // 60}m" + (f"{s % 60}s" if s % 60 else "")
    return f"{s}s"


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _or_none(value: object) -> str:
    return "<none>" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "<none>" if value is None else age(value)


# ---- the command ------------------------------------------------------------------


def status(
    address: str | None,
    health_listen: str | None,
    output: str,
    timeout: str,
    *,
    proc: Path = Path("/proc"),
    now: Callable[[], float],
) -> int:
    """Run ``kap status``; returns the exit status (messages already printed)."""
    try:
        seconds = parse_duration(timeout)
        where = target(address, health_listen, lambda: running_kap(proc))
    except (DurationError, ValueError) as e:
        click.echo(f"kap status: {e}", err=True)
        return 2

    async def ask() -> dict[str, Any]:
        with trio.move_on_after(seconds):
            return await fetch(where)
        raise Unanswered(f"no answer from {where} within {seconds:g}s")

    try:
        doc = trio.run(ask)
    except Unanswered as e:
        click.echo(f"kap status: {e} (address from {where.origin})", err=True)
        return 2
    try:
        text = render(doc, output, now())
    except (KeyError, TypeError, AttributeError) as e:
        click.echo(f"kap status: {where} answered /upstreams without {e} (not kap?)", err=True)
        return 2
    click.echo(text, nl=False)
    return 1 if doc.get("problems") else 0


@click.command(
    "status",
    short_help="Show what a running kap is doing (its /upstreams).",
    epilog="Exit status: 0 no problem, 1 problems reported, 2 no answer or bad flags.",
)
@click.option(
    "--address",
    metavar="HOST:PORT",
    help="The health server to ask. Default: --health-listen's, else PID 1's when "
    "PID 1 is kap (inside kap's container), else 127.0.0.1:8080.",
)
@click.option(
    "--health-listen",
    envvar=HEALTH_LISTEN.env,
    metavar="[HOST]:PORT",
    help=f"The running kap's --health-listen (':6480' asks 127.0.0.1:6480).  "
    f"[env {HEALTH_LISTEN.env}]",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "json"]),
    default="table",
    show_default=True,
    help="table for people, wide with every field, json for scripts (the /upstreams document).",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="DURATION",
    help="Deadline for the whole request.",
)
@click.pass_context
def command(
    ctx: click.Context, address: str | None, health_listen: str | None, output: str, timeout: str
) -> None:
    """Show a running kap's upstreams, discovery and problems (its /upstreams)."""
    if health_listen is None and ctx.parent is not None:
        health_listen = ctx.parent.params.get("health_listen")  # kap --health-listen X status
    sys.exit(status(address, health_listen, output, timeout, now=time.time))
