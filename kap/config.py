"""kap's configuration: the option table, and parsing it into a frozen Config.

Pure logic: the only outside facts it needs (is a file readable? does a
credential file load? what is in the environment, the working directory, a
kubeconfig?) come in as arguments, so every row of the table is tested
without touching the disk. The CLI (``kap.cli``) builds its flags from
``OPTIONS`` and hands the raw strings here; every problem found becomes one
line naming the flag and its environment variable, and kap exits with status
2 before anything is bound.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from kap.address import Address, AddressError, parse_list, parse_port
from kap.durations import DurationError, parse_duration
from kap.sources import FLAGS, load_kubeconfig_option, resolve_files

# Re-exported: where the credential files are, and what they are, were defined here.
from kap.sources import SERVICEACCOUNT_DIR as SERVICEACCOUNT_DIR
from kap.sources import STATIC_POD_DIR as STATIC_POD_DIR
from kap.sources import Credentials as Credentials

if TYPE_CHECKING:
    from kap.kubeconfig import KubeconfigCredentials

LOG_LEVELS = ("debug", "info", "warn", "error")


@attrs.frozen
class Option:
    """One flag: its names, environment variable, default and help text."""

    name: str  # the Config field / click parameter name
    flags: tuple[str, ...]
    env: str
    default: str | None
    help: str
    kind: str = "value"  # "value" | "bool" (accepts --flag, --flag=true/false)


# kube-apiserver closes an HTTP/2 connection that has had no stream for 90 s,
# and a PING does not count: a /readyz at least every 60 s keeps the probe
# connection open, with a margin for jitter.
MAX_READINESS_INTERVAL = 60.0

OPTIONS: tuple[Option, ...] = (
    Option(
        "listen_addr",
        ("--listen-addr", "--listen-address"),
        "LISTEN_ADDRESS",
        "0.0.0.0",
        "IP address the data port listens on (IPv4 or IPv6; '::' is dual-stack).",
    ),
    Option(
        "listen_port",
        ("--listen-port",),
        "LISTEN_PORT",
        "7443",
        "TCP port clients connect to (0 = kernel-chosen, logged at start).",
    ),
    Option(
        "health_listen",
        ("--health-listen",),
        "HEALTH_LISTEN",
        ":8080",
        "[host]:port of the health server (/healthz /readyz /upstreams /metrics).",
    ),
    Option("log_level", ("--log-level",), "LOG_LEVEL", "info", "debug, info, warn or error."),
    Option(
        "dial_timeout",
        ("--dial-timeout",),
        "DIAL_TIMEOUT",
        "5s",
        "Deadline for one upstream dial; then the next candidate is tried.",
    ),
    Option(
        "keepalive_period",
        ("--keepalive-period",),
        "KEEPALIVE_PERIOD",
        "1s",
        "TCP keepalive idle time and interval on both sockets.",
    ),
    Option(
        "tcp_user_timeout",
        ("--tcp-user-timeout",),
        "TCP_USER_TIMEOUT",
        "5s",
        "TCP_USER_TIMEOUT on both sockets: unacknowledged data kills the connection.",
    ),
    Option(
        "health_interval",
        ("--health-interval",),
        "HEALTH_INTERVAL",
        "1s",
        "Time between two /readyz probes of one upstream.",
    ),
    Option(
        "health_timeout",
        ("--health-timeout",),
        "HEALTH_TIMEOUT",
        "100ms",
        "Deadline for one /readyz request on the kept-alive probe connection (opening it "
        "has its own budget: a fifth of --health-interval or two timeouts, at most one interval).",
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
    ),
    Option(
        "health_jitter",
        ("--health-jitter",),
        "HEALTH_JITTER",
        "0.2",
        "Probe interval jitter, 0..1: next probe at interval*(1+jitter*U(-1,1)).",
    ),
    Option(
        "fallback_upstreams",
        ("--fallback-upstreams",),
        "FALLBACK_UPSTREAMS",
        "",
        "Comma-separated host:port upstreams, always in the pool ([v6]:port).",
    ),
    Option(
        "fallback_file",
        ("--fallback-file",),
        "FALLBACK_FILE",
        None,
        'JSON array of "host:port": read at start, rewritten with the discovered set.',
    ),
    Option(
        "ca_file",
        ("--ca-file",),
        "CA_FILE",
        None,
        "CA bundle the apiserver certificate is verified against; without one kap "
        "presents no credentials (default: kubeconfig, static-pod, ServiceAccount CA).",
    ),
    Option(
        "cert_file",
        ("--cert-file",),
        "CERT_FILE",
        None,
        "Client certificate presented to the apiservers.",
    ),
    Option("key_file", ("--key-file",), "KEY_FILE", None, "Key of --cert-file."),
    Option(
        "token_file",
        ("--token-file",),
        "TOKEN_FILE",
        None,
        "Bearer token file, re-read when it changes "
        "(default: the ServiceAccount token when present).",
    ),
    Option(
        "tls_server_name",
        ("--tls-server-name",),
        "TLS_SERVER_NAME",
        "kubernetes.default.svc",
        "Name the apiserver certificate is verified against; empty = the dialed address.",
    ),
    Option(
        "shutdown_grace",
        ("--shutdown-grace",),
        "SHUTDOWN_GRACE",
        "10s",
        "On SIGTERM/SIGINT, how long open connections may finish.",
    ),
    Option(
        "discover_period",
        ("--discover-period",),
        "DISCOVER_PERIOD",
        "5s",
        "Re-list the default/kubernetes EndpointSlices at least this often.",
    ),
    Option(
        "removal_grace",
        ("--removal-grace",),
        "REMOVAL_GRACE",
        "30s",
        "How long an upstream missing from discovery is kept before removal.",
    ),
    Option(
        "kubeconfig",
        ("--kubeconfig",),
        "KUBECONFIG",
        None,
        "Kubeconfig with credentials for probes and discovery, below the explicit flags "
        "(its server is one more starting upstream; KUBECONFIG may list files, a:b, first wins).",
    ),
    Option(
        "as_static_pod",
        ("--as-static-pod",),
        "AS_STATIC_POD",
        "false",
        "Use the CA and client certificate in --static-pod-dir.",
        kind="bool",
    ),
    Option(
        "static_pod_dir",
        ("--static-pod-dir",),
        "STATIC_POD_DIR",
        STATIC_POD_DIR,
        "Directory with ca.crt, cl.crt, cl.key in static-pod mode.",
    ),
    Option(
        "discovery",
        ("--discovery",),
        "DISCOVERY",
        "true",
        "Follow the default/kubernetes EndpointSlices (--discovery=false: static only).",
        kind="bool",
    ),
    Option(
        "drain_after",
        ("--drain-after",),
        "DRAIN_AFTER",
        "10s",
        "Close the open connections of an upstream unhealthy for this long (0 = never).",
    ),
)

OPTION_BY_NAME = {o.name: o for o in OPTIONS}

_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


@attrs.frozen
class Config:
    listen_addr: str = "0.0.0.0"
    listen_port: int = 7443
    health_host: str = ""
    health_port: int = 8080
    log_level: str = "info"
    dial_timeout: float = 5.0
    keepalive_period: float = 1.0
    tcp_user_timeout: float = 5.0
    health_interval: float = 1.0
    health_timeout: float = 0.1
    readiness_interval: float = 1.0  # the resolved default: health_interval
    health_jitter: float = 0.2
    fallback_upstreams: tuple[Address, ...] = ()
    fallback_file: str | None = None
    credentials: Credentials = attrs.field(factory=Credentials)
    tls_server_name: str = "kubernetes.default.svc"
    shutdown_grace: float = 10.0
    discover_period: float = 5.0
    removal_grace: float = 30.0
    kubeconfig: str | None = None
    # The kubeconfig's server (one more starting upstream) and context; ``kubeconfig_files``
    # keeps its inline data's temporary files open as long as kap runs.
    kubeconfig_seed: Address | None = None
    kubeconfig_context: str | None = None
    kubeconfig_files: tuple[Any, ...] = attrs.field(default=(), eq=False, repr=False)
    as_static_pod: bool = False
    static_pod_dir: str = STATIC_POD_DIR
    discovery: bool = True
    drain_after: float = 10.0
    # KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, the last resort when no
    # upstream is usable (set by kubelet in every pod's environment).
    default_service: Address | None = None
    # Problems that do not stop kap (missing default credentials): logged at start.
    warnings: tuple[str, ...] = ()


class ConfigError(Exception):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")


def parse_host_port(text: str) -> tuple[str, int]:
    """``[host]:port`` / ``host:port`` / ``:port`` for a listener; host '' = all."""
    raw = text.strip()
    if raw.startswith(":"):
        return "", _listen_port(raw[1:], text)
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise AddressError(f"{text!r}: expected [IPv6]:port")
        return parse_ip(raw[1:end]), _listen_port(raw[end + 2 :], text)
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise AddressError(f"{text!r}: expected host:port or :port")
    return parse_ip(host), _listen_port(port, text)


def _listen_port(text: str, whole: str) -> int:
    if text == "0":
        return 0
    return parse_port(text, what=repr(whole))


def parse_ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        raise AddressError(f"{text!r} is not an IP address") from None


def parse_config(
    values: Mapping[str, str | None],
    *,
    environ: Mapping[str, str],
    readable: Callable[[str], str | None],
    check: Callable[[Credentials], Mapping[str, str]] | None = None,
    is_dir: Callable[[str], bool] = lambda path: True,
    load_kubeconfig: Callable[[list[str]], KubeconfigCredentials] | None = None,
    cwd: str | None = None,
) -> Config:
    """Build a Config from the raw option strings (flag or env or default).

    Args:
      values: option name -> raw string (``None`` for an unset option).
      environ: the process environment (for KUBERNETES_SERVICE_HOST/PORT).
      readable: path -> ``None`` when the file can be read, else the reason.
      check: the resolved credentials -> field -> why it does not load
        (``kap.credentials.check_files``); None checks nothing.
      is_dir: whether a directory exists (for the fallback file's).
      load_kubeconfig: reads and merges kubeconfig files (default
        ``kap.kubeconfig.load_paths``).
      cwd: what relative paths are relative to (default: the working directory).

    Raises:
      ConfigError: with one line per invalid option.
    """
    problems: list[str] = []
    warnings: list[str] = []
    out: dict[str, object] = {}

    def raw(name: str) -> str | None:
        v = values.get(name)
        return OPTION_BY_NAME[name].default if v is None else v

    def bad(name: str, why: str) -> None:
        opt = OPTION_BY_NAME[name]
        problems.append(f"invalid {opt.flags[0]} (env {opt.env}): {why}")

    def duration(name: str, *, positive: bool = True) -> None:
        text = raw(name) or ""
        try:
            secs = parse_duration(text)
        except DurationError as e:
            bad(name, str(e))
            return
        if positive and secs <= 0:
            bad(name, f"{text!r}: must be greater than 0")
            return
        out[name] = secs

    def boolean(name: str) -> None:
        try:
            out[name] = parse_bool(raw(name) or "")
        except ValueError as e:
            bad(name, str(e))

    try:
        out["listen_addr"] = parse_ip(raw("listen_addr") or "")
    except AddressError as e:
        bad("listen_addr", str(e))
    try:
        out["listen_port"] = _listen_port(
            (raw("listen_port") or "").strip(), raw("listen_port") or ""
        )
    except AddressError as e:
        bad("listen_port", str(e))
    try:
        out["health_host"], out["health_port"] = parse_host_port(raw("health_listen") or "")
    except AddressError as e:
        bad("health_listen", str(e))

    level = (raw("log_level") or "").strip().lower()
    level = "warn" if level == "warning" else level
    if level in LOG_LEVELS:
        out["log_level"] = level
    else:
        bad("log_level", f"{raw('log_level')!r}: expected one of {', '.join(LOG_LEVELS)}")

    for name in (
        "dial_timeout",
        "keepalive_period",
        "tcp_user_timeout",
        "health_interval",
        "health_timeout",
        "discover_period",
    ):
        duration(name)
    for name in ("shutdown_grace", "removal_grace", "drain_after"):
        duration(name, positive=False)
    if raw("readiness_interval") is None:
        out["readiness_interval"] = out.get("health_interval", 1.0)
    else:
        duration("readiness_interval")
        readiness, interval = out.get("readiness_interval"), out.get("health_interval")
        if isinstance(readiness, float) and readiness > MAX_READINESS_INTERVAL:
            bad("readiness_interval", f"{raw('readiness_interval')!r}: at most 60s")
        elif isinstance(readiness, float) and isinstance(interval, float) and readiness < interval:
            bad("readiness_interval", f"{raw('readiness_interval')!r}: below --health-interval")

    jitter_text = raw("health_jitter") or ""
    try:
        jitter = float(jitter_text)
    except ValueError:
        bad("health_jitter", f"{jitter_text!r} is not a number")
    else:
        if not 0.0 <= jitter <= 1.0:
            bad("health_jitter", f"{jitter_text!r}: must be between 0 and 1")
        else:
            out["health_jitter"] = jitter

    try:
        out["fallback_upstreams"] = tuple(parse_list(raw("fallback_upstreams") or ""))
    except AddressError as e:
        bad("fallback_upstreams", str(e))

    tls_server_name = values.get("tls_server_name")
    out["tls_server_name"] = (raw("tls_server_name") or "").strip()
    boolean("as_static_pod")
    boolean("discovery")
    here = os.getcwd() if cwd is None else cwd

    def absolute(path: str) -> str:
        """Relative to the working directory, as in any CLI (made absolute once, here)."""
        return posixpath.normpath(posixpath.join(here, path.strip()))

    out["static_pod_dir"] = absolute(raw("static_pod_dir") or STATIC_POD_DIR)

    # Files given explicitly must be readable now: a typo fails fast, not at
    # the first probe. The fallback file is exempt (kap creates and repairs it),
    # but not its directory.
    given: dict[str, str] = {}
    for name in ("ca_file", "cert_file", "key_file", "token_file"):
        path = values.get(name)
        if path is not None and path.strip():
            why = readable(absolute(path))
            if why is not None:
                bad(name, f"{path!r}: {why}")
            given[name] = path
    fallback_file = values.get("fallback_file")
    out["fallback_file"] = None
    if fallback_file and fallback_file.strip():
        out["fallback_file"] = absolute(fallback_file)
        parent = posixpath.dirname(str(out["fallback_file"]))
        if not is_dir(parent):
            bad("fallback_file", f"{fallback_file!r}: directory {parent} does not exist")

    if bool(given.get("cert_file")) != bool(given.get("key_file")):
        missing = "key_file" if given.get("cert_file") else "cert_file"
        other = "--cert-file" if missing == "key_file" else "--key-file"
        bad(missing, f"required together with {other}")

    kubeconfig = load_kubeconfig_option(values.get("kubeconfig"), absolute, load_kubeconfig, bad)
    if problems:
        raise ConfigError(problems)

    explicit = Credentials(origin=FLAGS, **{n: absolute(p) for n, p in given.items()})
    out["credentials"] = resolve_files(
        explicit,
        kubeconfig,
        as_static_pod=bool(out["as_static_pod"]),
        static_pod_dir=str(out["static_pod_dir"]),
        kubeconfig_text=values.get("kubeconfig"),
        readable=readable,
        check=check,
        bad=bad,
        warnings=warnings,
    )
    if problems:
        raise ConfigError(problems)
    if kubeconfig is not None:
        warnings.extend(kubeconfig.warnings)
        out["kubeconfig"] = values.get("kubeconfig")
        out["kubeconfig_seed"] = kubeconfig.seed
        out["kubeconfig_context"] = kubeconfig.context
        out["kubeconfig_files"] = kubeconfig.files
        if tls_server_name is None and kubeconfig.tls_server_name:
            out["tls_server_name"] = kubeconfig.tls_server_name
    out["default_service"] = _default_service(environ, warnings)
    if out["health_timeout"] >= out["health_interval"]:  # type: ignore[operator]
        warnings.append("--health-timeout is not shorter than --health-interval: probes overlap")
    out["warnings"] = tuple(warnings)
    return Config(**out)  # type: ignore[arg-type]


def _default_service(environ: Mapping[str, str], warnings: list[str]) -> Address | None:
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "443").strip() or "443"
    if not host:
        return None
    try:
        return Address.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except AddressError as e:
        warnings.append(f"ignoring KUBERNETES_SERVICE_HOST/PORT: {e}")
        return None
