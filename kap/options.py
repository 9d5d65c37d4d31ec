"""kap's options: one table that every other view of them is generated from.

Each ``Option`` row gives a flag's names, its environment variable, its
default (as text, parsed like any value given), its help and its ``Kind``
(``kap.kinds``: how the text becomes a typed value). From this table come:

- the click options of ``kap`` (``kap.cli.with_kap_options``) and ``kap --help``;
- the defaults: ``kap.config.Config`` has one field per row, of the same
  name, and no default of its own;
- the table in docs/configuration.md: ``python -m kap.options --markdown``
  prints it, ``python -m kap.options --update docs/configuration.md`` rewrites
  it there (tests/test_config.py fails while the page differs).

Adding an option is one row here and one field in ``Config``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import attrs

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
    LOG_LEVELS,
    NEW_FILE,
    PATH_LIST,
    POSITIVE_DURATION,
    SERVER_NAME,
    Kind,
)
from kap.sources import SERVICEACCOUNT_DIR, STATIC_POD_DIR

__all__ = ["LOG_LEVELS", "OPTIONS", "SERVICEACCOUNT_DIR", "STATIC_POD_DIR", "Option"]


@attrs.frozen
class Option:
    """One flag: its names, environment variable, default, help text and kind of value.

    ``default`` is text, parsed by ``kind`` like a value given by the user;
    None means unset (the ``Config`` field is None).
    """

    name: str  # the Config field / click parameter name
    flags: tuple[str, ...]
    env: str
    default: str | None
    help: str
    kind: Kind[Any] = attrs.field(kw_only=True)

    @property
    def shown_default(self) -> str:
        """The default as ``--help`` and the docs show it."""
        return "(unset)" if self.default is None else (self.default or '""')

    def problem(self, why: str) -> str:
        """The one line kap prints for a bad value of this option."""
        return f"invalid {self.flags[0]} (env {self.env}): {why}"


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen_addr",
        ("--listen-addr", "--listen-address"),
        "LISTEN_ADDRESS",
        "0.0.0.0",
        "IP address the data port listens on (IPv4 or IPv6; '::' is dual-stack).",
        kind=IP,
    ),
    Option(
        "listen_port",
        ("--listen-port",),
        "LISTEN_PORT",
        "7443",
        "TCP port clients connect to (0 = kernel-chosen, logged at start).",
        kind=LISTEN_PORT,
    ),
    Option(
        "health_listen",
        ("--health-listen",),
        "HEALTH_LISTEN",
        ":8080",
        "[host]:port of the health server (/healthz /readyz /upstreams /metrics).",
        kind=LISTEN,
    ),
    Option(
        "log_level",
        ("--log-level",),
        "LOG_LEVEL",
        "info",
        "debug, info, warn or error.",
        kind=LOG_LEVEL,
    ),
    Option(
        "dial_timeout",
        ("--dial-timeout",),
        "DIAL_TIMEOUT",
        "5s",
        "Deadline for one upstream dial; then the next candidate is tried.",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "keepalive_period",
        ("--keepalive-period",),
        "KEEPALIVE_PERIOD",
        "1s",
        "TCP keepalive idle time and interval on both sockets.",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "tcp_user_timeout",
        ("--tcp-user-timeout",),
        "TCP_USER_TIMEOUT",
        "5s",
        "TCP_USER_TIMEOUT on both sockets: unacknowledged data kills the connection.",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "health_interval",
        ("--health-interval",),
        "HEALTH_INTERVAL",
        "1s",
        "Time between two /readyz probes of one upstream.",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "health_timeout",
        ("--health-timeout",),
        "HEALTH_TIMEOUT",
        "100ms",
        "Deadline for one /readyz request on the kept-alive probe connection (opening it "
        "has its own budget: a fifth of --health-interval or two timeouts, at most one interval).",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "readiness_interval",
        ("--readiness-interval",),
        "READINESS_INTERVAL",
        None,
        "Time between two /readyz of an upstream whose probe connection speaks HTTP/2; "
        "the checks in between are PINGs. Default: --health-interval (every check a /readyz); "
        "at least --health-interval, at most 60s (kube-apiserver closes an HTTP/2 connection "
        "idle for 90s).",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "health_jitter",
        ("--health-jitter",),
        "HEALTH_JITTER",
        "0.2",
        "Probe interval jitter, 0..1: next probe at interval*(1+jitter*U(-1,1)).",
        kind=FRACTION,
    ),
    Option(
        "fallback_upstreams",
        ("--fallback-upstreams",),
        "FALLBACK_UPSTREAMS",
        "",
        "Comma-separated host:port upstreams, always in the pool ([v6]:port).",
        kind=ADDRESSES,
    ),
    Option(
        "fallback_file",
        ("--fallback-file",),
        "FALLBACK_FILE",
        None,
        'JSON array of "host:port": read at start, rewritten with the discovered set.',
        kind=NEW_FILE,
    ),
    Option(
        "ca_file",
        ("--ca-file",),
        "CA_FILE",
        None,
        "CA bundle the apiserver certificate is verified against; without one kap "
        "presents no credentials (default: kubeconfig, static-pod, ServiceAccount CA).",
        kind=FILE,
    ),
    Option(
        "cert_file",
        ("--cert-file",),
        "CERT_FILE",
        None,
        "Client certificate presented to the apiservers.",
        kind=FILE,
    ),
    Option("key_file", ("--key-file",), "KEY_FILE", None, "Key of --cert-file.", kind=FILE),
    Option(
        "token_file",
        ("--token-file",),
        "TOKEN_FILE",
        None,
        "Bearer token file, re-read when it changes "
        "(default: the ServiceAccount token when present).",
        kind=FILE,
    ),
    Option(
        "tls_server_name",
        ("--tls-server-name",),
        "TLS_SERVER_NAME",
        "kubernetes.default.svc",
        "Name the apiserver certificate is verified against; empty = the dialed address.",
        kind=SERVER_NAME,
    ),
    Option(
        "shutdown_grace",
        ("--shutdown-grace",),
        "SHUTDOWN_GRACE",
        "10s",
        "On SIGTERM/SIGINT, how long open connections may finish.",
        kind=DURATION,
    ),
    Option(
        "discover_period",
        ("--discover-period",),
        "DISCOVER_PERIOD",
        "5s",
        "Refresh interval: while a watch is live nothing is re-listed; when no watch can be "
        "kept, re-list the default/kubernetes EndpointSlices (from the watch cache) this often.",
        kind=POSITIVE_DURATION,
    ),
    Option(
        "removal_grace",
        ("--removal-grace",),
        "REMOVAL_GRACE",
        "30s",
        "How long an upstream missing from discovery is kept before removal.",
        kind=DURATION,
    ),
    Option(
        "kubeconfig",
        ("--kubeconfig",),
        "KUBECONFIG",
        None,
        "Kubeconfig with credentials for probes and discovery, below the explicit flags "
        "(its server is one more starting upstream; KUBECONFIG may list files, a:b, first wins).",
        kind=PATH_LIST,
    ),
    Option(
        "as_static_pod",
        ("--as-static-pod",),
        "AS_STATIC_POD",
        "false",
        "Use the CA and client certificate in --static-pod-dir.",
        kind=BOOL,
    ),
    Option(
        "static_pod_dir",
        ("--static-pod-dir",),
        "STATIC_POD_DIR",
        STATIC_POD_DIR,
        "Directory with ca.crt, cl.crt, cl.key in static-pod mode.",
        kind=DIRECTORY,
    ),
    Option(
        "discovery",
        ("--discovery",),
        "DISCOVERY",
        "true",
        "Follow the default/kubernetes EndpointSlices (--discovery=false: static only).",
        kind=BOOL,
    ),
    Option(
        "drain_after",
        ("--drain-after",),
        "DRAIN_AFTER",
        "10s",
        "Close the open connections of an upstream unhealthy for this long (0 = never).",
        kind=DURATION,
    ),
)


OPTION_BY_NAME = {o.name: o for o in OPTIONS}

# ---- the table in docs/configuration.md --------------------------------------

# The generated table stands between these two lines of the page.
BEGIN = "<!-- BEGIN options table: generated by `python -m kap.options --update` -->"
END = "<!-- END options table -->"


def markdown_table() -> str:
    """The configuration page's table of every option, one row each."""
    lines = ["| flag | env | default | what |", "|---|---|---|---|"]
    for o in OPTIONS:
        flags = ", ".join(f"`{f}`" for f in o.flags)
        if o.default is None:
            default = "(unset)"
        elif not o.default:
            default = "empty"
        else:
            default = f"`{o.default}`"
        lines.append(f"| {flags} | `{o.env}` | {default} | {o.help} |")
    return "\n".join(lines) + "\n"


def with_table(page: str) -> str:
    """``page`` with the text between BEGIN and END replaced by the generated table."""
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} lines")
    return f"{head}{BEGIN}\n{markdown_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kap.options", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the markdown table")
    what.add_argument("--update", metavar="PAGE", type=Path, help="rewrite the table in PAGE")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    try:
        args.update.write_text(with_table(args.update.read_text()))
    except (OSError, ValueError) as e:
        print(f"python -m kap.options: {args.update}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
