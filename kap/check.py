"""``kap check``: will kap work here, with these settings, before the kubelet points at it?

A preflight run once by a person (or a script): the same flags and
environment as ``kap``, none of kap's ports bound. Two ways to run it:

* on the node, before kap is installed, with the flags the manifest will use;
* inside a running kap's container (``kubectl -n kube-system exec <kap pod>
  -- kap check``): given no flag, it takes PID 1's arguments and environment
  when PID 1 is kap (``kap.invocation``), so it checks what the running kap
  uses, never the operator's shell (a ``KUBECONFIG=admin.conf`` there must not
  make the check pass with credentials kap lacks).

It resolves the upstreams as kap does at start (``--fallback-upstreams``,
the fallback file, the kubeconfig's server; the ``kubernetes`` Service only
when those give none, as discovery's bootstrap), checks them all at once in
one nursery, lists the ``default/kubernetes`` EndpointSlices through the
first that answers, as discovery would, and checks the addresses found too.
The verdicts and the output are ``kap.check_report``'s.

Time: each step waits under its own cancel scope (the connect under
``--dial-timeout``, the TLS handshake and ``GET /readyz`` under
``request_deadline``), and everything under ``TOTAL_DEADLINE``, so a
black-holed apiserver (no SYN-ACK, or a handshake that never ends) costs its
deadlines and delays no other row.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from kap import fallback
from kap.address import Address, loops_back
from kap.certinfo import CertificateError, read_certificate
from kap.check_report import (
    Credentials,
    DiscoveryFacts,
    Row,
    UpstreamFacts,
    certificate_row,
    discovery_row,
    exit_status,
    render,
    upstream_row,
)
from kap.check_run import Findings, Reach, check_all
from kap.config import OPTIONS, Config, ConfigError, parse_config
from kap.credentials import CredentialFiles, check_files, read_token
from kap.discovery import NAMESPACE
from kap.invocation import running_kap
from kap.pool import SOURCE_FILE, SOURCE_FLAG, SOURCE_KUBECONFIG
from kap.probe import describe_error
from kap.sockets import is_local_ip

# The bound for the whole command is 30 s; Python's start and the
# imports take well under a second of the rest.
TOTAL_DEADLINE = 25.0
# The TLS handshake and one GET share a deadline of at least this much: a
# check run once from a shell may wait for a slow but alive apiserver longer
# than kap's probes do, and then shows its latency against --health-timeout
# rather than a bare timeout.
REQUEST_FLOOR = 1.0
RESOURCE = "endpointslices.discovery.k8s.io"
PID1 = "PID 1's arguments and environment (the running kap's)"
OWN = "this command's flags and environment"
OUT_OF_TIME = "the check ran out of time"


# ---- settings ---------------------------------------------------------------------


def readable(path: str) -> str | None:
    # The balancer's own rule (imported here: kap.cli imports this module for its command).
    from kap.cli import readable as cli_readable

    return cli_readable(path)


@attrs.frozen
class Settings:
    config: Config
    origin: str  # PID1 or OWN


def settings(
    values: Mapping[str, str | None],
    *,
    no_discovery: bool,
    flags_given: bool,
    environ: Mapping[str, str],
    proc: Path,
    cwd: str,
) -> Settings:
    """The Config kap would run with: PID 1's when no flag is given and PID 1 is kap.

    Raises:
      ConfigError: bad values, one line each (exit 2).
    """
    origin = OWN
    # (click has read the environment already; a caller that passes only flags gets it here)
    raw = {o.name: _first(values.get(o.name), environ.get(o.env)) for o in OPTIONS}
    if not flags_given and (pid1 := running_kap(proc)) is not None:
        origin, environ = PID1, pid1.environ
        raw = {o.name: pid1.setting(o) for o in OPTIONS}
        no_discovery = "--no-discovery" in pid1.args[: _end(pid1.args)]
        try:
            cwd = os.readlink(proc / "1" / "cwd")
        except OSError:
            cwd = "/"
    if no_discovery:
        raw["discovery"] = "false"
    config = parse_config(
        raw, environ=environ, readable=readable, check=check_files, is_dir=os.path.isdir, cwd=cwd
    )
    return Settings(config, origin)


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v is not None), None)


def _end(args: tuple[str, ...]) -> int:
    return args.index("--") if "--" in args else len(args)


# ---- the files (synchronous: a few small reads) ----------------------------------


def credentials_of(files: CredentialFiles) -> Credentials:
    f = files.files
    kinds = [k for k, on in (("token", f.token_file), ("client certificate", f.cert_file)) if on]
    return Credentials(
        origin=f.origin,
        presented=files.authenticated,
        kind=" and ".join(kinds) if kinds and files.verifies else "none",
        verifies=files.verifies,
    )


def credential_rows(config: Config, now_unix: float) -> list[Row]:
    c = config.credentials
    rows: list[Row] = []
    problems = check_files(c)
    for what, path, fix in (
        ("ca", c.ca_file, "give the cluster's CA bundle, PEM (--ca-file)"),
        ("cert", c.cert_file, "renew kap's client certificate (hack/issue-client-cert.sh)"),
    ):
        if path is None:
            continue
        try:
            info = read_certificate(path)
        except (OSError, CertificateError) as e:
            error: str | None = describe_error(e)
            subject = after = None
            count = 0
        else:
            subject, after, count = info.subject, info.not_after_unix, info.count
            error = problems.get(f"{what}_file")
        rows.append(
            certificate_row(
                what,
                path,
                subject=subject,
                not_after_unix=after,
                count=count,
                error=error,
                now_unix=now_unix,
                fix=fix,
            )
        )
    if c.token_file is not None:
        try:
            token = read_token(c.token_file)
        except (OSError, ValueError) as e:
            fix = "give a readable bearer token file (--token-file)"
            rows.append(Row("credentials", f"token {c.token_file}", False, describe_error(e), fix))
        else:
            rows.append(
                Row("credentials", f"token {c.token_file}", True, f"{len(token)} characters")
            )
    return rows  # no CA or no credentials at all: the discovery row says so


def fallback_row(path: str | None) -> tuple[Row, list[Address]]:
    """The fallback file: readable, writable (kap rewrites it in place); its entries."""
    if path is None:
        return Row("fallback-file", "<none>", True, "not set (--fallback-file)"), []
    fix = f"kap reads and rewrites {path}: make it (and its directory) readable and writable"
    exists = os.path.exists(path)
    try:
        addresses, skipped = fallback.read(path)
    except fallback.FallbackFileError as e:
        empty = exists and os.path.getsize(path) == 0
        if not empty:
            return Row("fallback-file", path, False, f"unreadable: {e}", fix), []
        addresses, skipped = [], []
    writable = os.access(path if exists else os.path.dirname(path) or ".", os.W_OK)
    found = f"{len(addresses)} entries" if exists else "not there yet (kap creates it)"
    if skipped:
        found += f", {len(skipped)} skipped ({skipped[0]})"
    if not writable:
        return Row("fallback-file", path, False, f"{found}; not writable", fix), addresses
    return Row("fallback-file", path, True, f"{found}; readable and writable"), addresses


# ---- the run -------------------------------------------------------------------------


def starting_upstreams(config: Config, file_entries: list[Address]) -> dict[Address, list[str]]:
    """What kap puts in its pool at start, with each address's sources (as ``App``)."""
    out: dict[Address, list[str]] = {}
    for source, addresses in (
        (SOURCE_FLAG, config.fallback_upstreams),
        (SOURCE_KUBECONFIG, [config.kubeconfig_seed] if config.kubeconfig_seed else []),
        (SOURCE_FILE, file_entries),
    ):
        for address in addresses:
            out.setdefault(address, []).append(source)
    return out


def loops(config: Config, starting: Mapping[Address, list[str]]) -> list[Address]:
    """The starting upstreams that are kap's own listen address (kap leaves them out)."""
    host, port = config.listen_addr, config.listen_port
    return [a for a in starting if loops_back(a, host, port, is_local_ip)]


def loop_row(address: Address, sources: list[str]) -> Row:
    return Row(
        "upstream",
        str(address),
        False,
        "kap's own listen address: kap leaves it out (clients sent there would loop through kap)",
        f"remove {address} from {', '.join(sources)}: it is kap, not an apiserver",
    )


def off_reasons(files: CredentialFiles) -> tuple[tuple[str, str], ...]:
    """Why kap would turn discovery off, each with what to give (kap's own words)."""
    from kap.discovery import EndpointSliceWatcher
    from kap.pool import Pool

    watcher = EndpointSliceWatcher(
        pool=Pool(), credentials=files, server_name="", period=1.0, on_update=lambda _: None
    )
    return tuple(watcher.off_reasons())


def rows_for(
    config: Config, found: Findings, creds: Credentials, off: tuple[tuple[str, str], ...]
) -> list[Row]:
    """The network rows, in the order: starting upstreams, Service, discovery, discovered."""
    rows: list[Row] = []
    timeout = config.health_timeout
    name = config.tls_server_name
    for address, sources in found.sources.items():
        facts = found.upstreams.get(address) or UpstreamFacts(
            str(address), tuple(sources), name or address.host, connect_error=OUT_OF_TIME
        )
        facts = attrs.evolve(facts, sources=tuple(sources))
        rows.append(upstream_row(facts, creds, health_timeout=timeout))
    if found.service is not None:
        rows.insert(0, upstream_row(found.service, creds, health_timeout=timeout, check="service"))
    if not config.discovery:
        dfacts = DiscoveryFacts(on_purpose_off=True)
    elif off:
        dfacts = DiscoveryFacts(off_reasons=off)
    elif not found.sources and config.default_service is None:
        dfacts = DiscoveryFacts(error="no upstream to ask: nothing to start from and no Service")
    else:
        dfacts = found.discovery or DiscoveryFacts(error=OUT_OF_TIME)
    rows.append(discovery_row(dfacts, creds, namespace=NAMESPACE, resource=RESOURCE))
    if not found.sources and found.service is None:
        fix = (
            "give --fallback-upstreams host:port,..., a --fallback-file with entries, or "
            "--kubeconfig, or run in a pod (KUBERNETES_SERVICE_HOST/PORT) with discovery"
        )
        rows.insert(0, Row("upstream", "<none>", False, "kap has no upstream to start from", fix))
    return rows


def run(s: Settings, output: str, now_unix: float) -> tuple[int, str]:
    """Every check for the settings ``s``: the exit status and what to print."""
    config = s.config
    files = CredentialFiles(config.credentials)
    creds = credentials_of(files)
    rows = credential_rows(config, now_unix)
    file_row, entries = fallback_row(config.fallback_file)
    starting = starting_upstreams(config, entries)
    loop_rows = [loop_row(a, starting.pop(a)) for a in loops(config, starting)]
    off = off_reasons(files) if config.discovery else ()
    reach = Reach(
        files=files,
        server_name=config.tls_server_name,
        dial_timeout=min(config.dial_timeout, TOTAL_DEADLINE),
        request_deadline=max(config.health_timeout, REQUEST_FLOOR),
    )
    found = trio.run(
        lambda: check_all(
            starting,
            reach=reach,
            discover=config.discovery and not off,
            service=config.default_service,
            deadline=TOTAL_DEADLINE,
        )
    )
    rows = [*loop_rows, *rows_for(config, found, creds, off), *rows, file_row]
    return exit_status(rows), render(rows, config.warnings, output, s.origin, creds.origin)


def check(
    values: Mapping[str, str | None],
    *,
    no_discovery: bool = False,
    flags_given: bool,
    output: str = "table",
    environ: Mapping[str, str],
    proc: Path = Path("/proc"),
    cwd: str | None = None,
    now: Callable[[], float] = time.time,
) -> tuple[int, str, str]:
    """Run ``kap check``: the exit status, what goes to stdout, what goes to stderr."""
    try:
        s = settings(
            values,
            no_discovery=no_discovery,
            flags_given=flags_given,
            environ=environ,
            proc=proc,
            cwd=os.getcwd() if cwd is None else cwd,
        )
    except ConfigError as e:
        return 2, "", "".join(f"kap check: {line}\n" for line in e.problems)
    code, text = run(s, output, now())
    return code, text, ""


def command(kap_options: Callable[[Any], Any]) -> click.Command:
    """The ``kap check`` subcommand, with kap's own flags (``kap_options``, from ``kap.cli``)."""

    @click.pass_context
    def callback(
        ctx: click.Context, /, output: str, no_discovery: bool, **values: str | None
    ) -> None:
        from click.core import ParameterSource
        from loguru import logger

        logger.remove()  # kap's log lines are for a running kap; the rows say it all here

        def given_here(c: click.Context | None, name: str) -> bool:
            return c is not None and c.get_parameter_source(name) is ParameterSource.COMMANDLINE

        for name in values:  # ``kap --flag X check``: the group parsed it
            if given_here(ctx.parent, name) and not given_here(ctx, name):
                values[name] = ctx.parent.params[name]  # type: ignore[union-attr]
        no_discovery = no_discovery or given_here(ctx.parent, "no_discovery")
        given = any(
            given_here(ctx, name) or given_here(ctx.parent, name)
            for name in (*values, "no_discovery")
        )
        code, out, err = check(
            values, no_discovery=no_discovery, flags_given=given, output=output, environ=os.environ
        )
        click.echo(out, nl=False)
        click.echo(err, nl=False, err=True)
        sys.exit(code)

    func = kap_options(callback)
    func = click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "wide", "json"]),
        default="table",
        show_default=True,
        help="table for people, wide with every detail, json for scripts.",
    )(func)
    return click.command(
        "check",
        short_help="Check that kap would work here, with these flags (binds no port).",
        help="Check, before pointing the kubelet at kap, that kap would work with these flags "
        "and environment: every upstream (TCP, TLS, /readyz with kap's credentials), "
        "discovery (the default/kubernetes EndpointSlices), the credential files and the "
        "fallback file. Given no flag inside a kap container, it checks what PID 1 (the "
        "running kap) uses.",
        epilog="Exit status: 0 all good, 1 a check failed (each named, with what to fix), "
        "2 bad flags.",
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )(func)
