"""kap's configuration: the options' raw text parsed into a frozen, typed Config.

Pure logic: the only outside facts it needs (is a file readable? does a
credential file load? what is in the environment, the working directory, a
kubeconfig?) come in as arguments, so every row of the table is tested
without touching the disk. The CLI (``kap.cli``) builds its flags from
``kap.options.OPTIONS`` and hands the raw strings here. Parsing goes in two
steps:

1. each option on its own, by its row's kind (``kap.kinds``), into the
   ``Config`` field of the same name;
2. what takes several options together: the client certificate and its key,
   the kubeconfig, the one resolved set of credentials (``kap.sources``),
   the default Service from the environment, a probe timeout not shorter
   than its interval.

Every problem found becomes one line naming the flag and its environment
variable, all of them at once, and kap exits with status 2 before anything
is bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

# ``name as name``: re-exported, defined here before the option table moved to kap.options.
from kap.address import Address, AddressError
from kap.kinds import Disk
from kap.kinds import parse_host_port as parse_host_port
from kap.options import OPTION_BY_NAME
from kap.options import OPTIONS as OPTIONS
from kap.options import Option as Option
from kap.sources import FLAGS, load_kubeconfig_option, resolve_files
from kap.sources import SERVICEACCOUNT_DIR as SERVICEACCOUNT_DIR
from kap.sources import STATIC_POD_DIR as STATIC_POD_DIR
from kap.sources import Credentials as Credentials

if TYPE_CHECKING:
    from kap.kubeconfig import KubeconfigCredentials


@attrs.frozen
class Config:
    """What kap runs with. Built by ``parse_config`` only.

    The first fields are the options, one per row of ``kap.options.OPTIONS``,
    of the same name and of the type its kind parses to; their defaults are
    the table's (none is written here). The rest are resolved from several
    options and the environment.
    """

    listen_addr: str
    listen_port: int
    health_listen: tuple[str, int]  # host ('' = all), port
    log_level: str
    dial_timeout: float
    keepalive_period: float
    tcp_user_timeout: float
    health_interval: float
    health_timeout: float
    # None until parse_config resolves it: then --health-interval when not given.
    readiness_interval: float | None
    health_jitter: float
    fallback_upstreams: tuple[Address, ...]
    fallback_file: str | None
    # The credential files as given by the flags (absolute); ``credentials`` is what is used.
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token_file: str | None
    tls_server_name: str
    shutdown_grace: float
    discover_period: float
    removal_grace: float
    kubeconfig: str | None  # as given (a:b lists files)
    as_static_pod: bool
    static_pod_dir: str
    discovery: bool
    drain_after: float

    credentials: Credentials = attrs.field(factory=Credentials)
    # The kubeconfig's server (one more starting upstream) and context; ``kubeconfig_files``
    # keeps its inline data's temporary files open as long as kap runs.
    kubeconfig_seed: Address | None = None
    kubeconfig_context: str | None = None
    kubeconfig_files: tuple[Any, ...] = attrs.field(default=(), eq=False, repr=False)
    # KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, the last resort when no
    # upstream is usable (set by kubelet in every pod's environment).
    default_service: Address | None = None
    # Problems that do not stop kap (missing default credentials): logged at start.
    warnings: tuple[str, ...] = ()

    @property
    def health_host(self) -> str:
        return self.health_listen[0]

    @property
    def health_port(self) -> int:
        return self.health_listen[1]


class ConfigError(Exception):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.define
class _Problems:
    """The lines collected so far; ``bad(option name, why)`` adds one."""

    lines: list[str] = attrs.field(factory=list)

    def bad(self, name: str, why: str) -> None:
        self.lines.append(OPTION_BY_NAME[name].problem(why))

    def raise_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


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
    disk = Disk(readable=readable, is_dir=is_dir, cwd=cwd)
    problems = _Problems()
    config = parse_options(values, disk, problems.bad)
    _check_cert_and_key(values, problems.bad)
    if config is not None:
        config = _resolve_readiness_interval(config, problems.bad)
    kubeconfig = load_kubeconfig_option(
        values.get("kubeconfig"), disk.absolute, load_kubeconfig, problems.bad
    )
    if problems.lines or config is None:
        raise ConfigError(problems.lines)
    warnings: list[str] = []
    credentials = _credentials(config, kubeconfig, readable, check, problems, warnings)
    problems.raise_any()
    config = attrs.evolve(config, credentials=credentials)
    if kubeconfig is not None:
        config = _with_kubeconfig(config, kubeconfig, values.get("tls_server_name") is None)
        warnings.extend(kubeconfig.warnings)
    default_service = _default_service(environ, warnings)
    if config.health_timeout >= config.health_interval:
        warnings.append("--health-timeout is not shorter than --health-interval: probes overlap")
    return attrs.evolve(config, default_service=default_service, warnings=tuple(warnings))


def _credentials(
    config: Config,
    kubeconfig: KubeconfigCredentials | None,
    readable: Callable[[str], str | None],
    check: Callable[[Credentials], Mapping[str, str]] | None,
    problems: _Problems,
    warnings: list[str],
) -> Credentials:
    """The credentials kap presents: the flags' files first, then ``kap.sources``' order."""
    return resolve_files(
        Credentials(
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            token_file=config.token_file,
            origin=FLAGS,
        ),
        kubeconfig,
        as_static_pod=config.as_static_pod,
        static_pod_dir=config.static_pod_dir,
        kubeconfig_text=config.kubeconfig,
        readable=readable,
        check=check,
        bad=problems.bad,
        warnings=warnings,
    )


def parse_option(option: Option, text: str | None, disk: Disk) -> Any:
    """The typed value of one option given ``text`` (None: not given, the default).

    Raises:
      ValueError: the reason, for ``option.problem``.
    """
    if text is None or (option.kind.blank_is_default and not text.strip()):
        text = option.default
    if text is None:
        return None
    return option.kind.parse(text, disk)


def parse_options(
    values: Mapping[str, str | None], disk: Disk, bad: Callable[[str, str], None]
) -> Config | None:
    """Every option on its own, by its kind: a Config, or None after ``bad`` for each problem.

    The fields are typed by their kinds (tests/test_config.py holds each
    kind to its field's type), which is why building the Config from the
    parsed values by name is safe.
    """
    fields: dict[str, Any] = {}
    for option in OPTIONS:
        try:
            fields[option.name] = parse_option(option, values.get(option.name), disk)
        except ValueError as e:
            bad(option.name, str(e))
    if len(fields) < len(OPTIONS):
        return None
    return Config(**fields)


# kube-apiserver closes an HTTP/2 connection that has had no stream for 90 s,
# and a PING does not count: a /readyz at least every 60 s keeps the probe
# connection open, with a margin for jitter.
MAX_READINESS_INTERVAL = 60.0


def _resolve_readiness_interval(config: Config, bad: Callable[[str, str], None]) -> Config:
    """--readiness-interval: --health-interval when not given; between it and 60 s."""
    readiness = config.readiness_interval
    if readiness is None:
        return attrs.evolve(config, readiness_interval=config.health_interval)
    if readiness > MAX_READINESS_INTERVAL:
        bad("readiness_interval", f"{readiness:g}s: at most 60s")
    elif readiness < config.health_interval:
        bad("readiness_interval", f"{readiness:g}s: below --health-interval")
    return config


def _check_cert_and_key(values: Mapping[str, str | None], bad: Callable[[str, str], None]) -> None:
    """A client certificate is given with its key, or neither is."""
    cert, key = (bool((values.get(n) or "").strip()) for n in ("cert_file", "key_file"))
    if cert and not key:
        bad("key_file", "required together with --cert-file")
    elif key and not cert:
        bad("cert_file", "required together with --key-file")


def _with_kubeconfig(
    config: Config, kubeconfig: KubeconfigCredentials, take_tls_server_name: bool
) -> Config:
    """The kubeconfig's seed and context; its tls-server-name unless the flag was given."""
    server_name = config.tls_server_name
    if take_tls_server_name and kubeconfig.tls_server_name:
        server_name = kubeconfig.tls_server_name
    return attrs.evolve(
        config,
        kubeconfig_seed=kubeconfig.seed,
        kubeconfig_context=kubeconfig.context,
        kubeconfig_files=kubeconfig.files,
        tls_server_name=server_name,
    )


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
