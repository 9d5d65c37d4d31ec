"""``kap``: the command line. Flags beat environment variables beat defaults.

Every flag is a plain string here; ``kap.config.parse_config`` checks them all
at once, so one run reports every bad value (one line each, naming the flag
and its env var) and exits with status 2 before binding anything. The facts
it needs from the disk come from here: whether a file is readable, whether
the credential files load (``kap.credentials.check_files``), the working
directory relative paths are taken against.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
import trio

from kap import logs
from kap.build import build_info
from kap.config import Config, ConfigError, parse_config
from kap.credentials import check_files
from kap.options import OPTIONS, Option


def readable(path: str) -> str | None:
    """None when ``path`` is a readable regular file, else why not."""
    try:
        if not os.path.isfile(path):
            return "no such file" if not os.path.exists(path) else "not a regular file"
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as e:
        return e.strerror or str(e)
    return None


F = TypeVar("F", bound=Callable[..., Any])


def _click_option(opt: Option) -> Callable[[F], F]:
    """The click option of one row: every value a plain string, checked by parse_config."""
    help_text = f"{opt.help}  [env {opt.env}; default {opt.shown_default}]"
    if opt.kind.is_flag:  # --flag alone means true; --flag=false too
        return click.option(
            *opt.flags,
            opt.name,
            envvar=opt.env,
            default=None,
            is_flag=False,
            flag_value="true",
            help=help_text,
            metavar=opt.kind.metavar,
        )
    return click.option(
        *opt.flags, opt.name, envvar=opt.env, default=None, help=help_text, metavar=opt.kind.metavar
    )


def with_kap_options(func: F) -> F:
    """Decorate a click command's function with every option of kap's table.

    ``func`` receives each option by its name (a string, or None when
    neither its flag nor its env var is given) and ``no_discovery`` (bool);
    ``config_from_flags`` turns them into a Config. ``kap`` and the commands
    that check a configuration take the same flags this way.
    """
    for opt in reversed(OPTIONS):
        func = _click_option(opt)(func)
    return click.option(
        "--no-discovery",
        "no_discovery",
        is_flag=True,
        default=False,
        help="Same as --discovery=false.",
    )(func)


def config_from_flags(values: Mapping[str, Any]) -> Config:
    """The Config of ``with_kap_options``'s values, the disk asked here; exit 2 when bad.

    One line per problem on stderr, naming the flag and its env var.
    """
    raw: dict[str, str | None] = {o.name: values.get(o.name) for o in OPTIONS}
    if values.get("no_discovery"):
        raw["discovery"] = "false"
    try:
        return parse_config(
            raw,
            environ=os.environ,
            readable=readable,
            check=check_files,
            is_dir=os.path.isdir,
            cwd=os.getcwd(),
        )
    except ConfigError as e:
        for line in e.problems:
            click.echo(f"kap: {line}", err=True)
        sys.exit(2)


def run(**values: Any) -> None:
    """Parse the flags, set up logging, run the nursery tree until a signal."""
    config = config_from_flags(values)
    logs.setup(config.log_level)
    build_info()  # may ask git (in a checkout): here, not on the event loop; cached
    from kap.app import App  # after the flags: a bad flag exits before the heavy imports

    app = App(config)
    failed: list[OSError] = []
    try:
        trio.run(app.run)
    except* OSError as group:
        failed.extend(e for e in group.exceptions if isinstance(e, OSError))
    if failed:
        from loguru import logger

        # Before "kap started" it is the bind (or a file) that failed; after,
        # a part of the running kap did: the words say which.
        what = "kap stopped on an error" if app.started else "kap cannot start"
        for err in failed:
            logger.bind(error=err.strerror or str(err)).error(what)
        sys.exit(1)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the version and the git revision (asked only when the flag is given)."""
    if not value or ctx.resilient_parsing:
        return
    click.echo(str(build_info()))
    ctx.exit()


def _command() -> click.Command:
    func = with_kap_options(run)
    func = click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Show the version and the git revision kap was built from, then exit.",
    )(func)
    return click.command(
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        help="Node-local TCP load balancer for Kubernetes API servers.",
    )(func)


def _status_command() -> click.Command:
    from kap.status import command

    return command


def _check_command() -> click.Command:
    from kap.check import command

    return command(with_kap_options)


# The subcommands, imported when named: ``kap check`` pulls in the discovery
# stack and ``kap status`` its own client, about 180 ms of imports a
# balancer's start does not need (docs/performance.md "Start-up"). Their
# one-line help is here so that ``kap --help`` imports neither
# (tests/test_startup.py checks it is each command's own).
SUBCOMMANDS: dict[str, tuple[Callable[[], click.Command], str]] = {
    "check": (_check_command, "Check that kap would work here, with these flags (binds no port)."),
    "status": (_status_command, "Show what a running kap is doing (its /upstreams)."),
}


class _LazyGroup(click.Group):
    """A group whose ``SUBCOMMANDS`` are imported when named."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SUBCOMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in SUBCOMMANDS and cmd_name not in self.commands:
            self.add_command(SUBCOMMANDS[cmd_name][0](), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short) for name, (_, short) in sorted(SUBCOMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _with_subcommands(balancer: click.Command) -> click.Group:
    """``kap FLAGS`` runs the balancer as ever; ``kap status ...`` and later commands are
    subcommands. The group takes the balancer's flags, help and callback unchanged, so
    ``kap --help`` still lists every flag, with its environment variable.
    """
    run_balancer = balancer.callback
    assert run_balancer is not None

    def callback(**values: Any) -> None:
        if click.get_current_context().invoked_subcommand is None:
            run_balancer(**values)

    return _LazyGroup(
        name=balancer.name,
        invoke_without_command=True,
        params=balancer.params,
        callback=callback,
        help=balancer.help,
        context_settings=balancer.context_settings,
    )


main = _with_subcommands(_command())
