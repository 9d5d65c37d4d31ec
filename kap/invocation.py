"""How the kap running as PID 1 was started: its arguments and environment.

Inside kap's container (``kubectl -n kube-system exec <kap pod> -- kap status``)
the operator's command knows none of the manifest's flags, but PID 1 does:
its ``cmdline`` and ``environ`` under ``/proc/1``. The commands that inspect
a running kap (``kap status``, ``kap check``) read them there, so that they
look at what the running kap uses and not at the operator's shell.

PID 1 is kap when its command line is ``kap ARGS`` (the image's entry point:
``/opt/kap/bin/python /opt/kap/bin/kap ARGS`` once the script's ``#!`` is
followed) or ``python -m kap ARGS``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from kap.config import Option


@attrs.frozen
class Invocation:
    """A kap's command-line arguments (after the program) and environment."""

    args: tuple[str, ...]
    environ: Mapping[str, str]

    def setting(self, option: Option) -> str | None:
        """What this kap was given for ``option``: the last flag, else its env var, else None.

        (Click's rules: a later flag beats an earlier one, any flag beats the
        environment.)
        """
        value: str | None = None
        args = list(self.args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            name, eq, given = arg.partition("=")
            if name not in option.flags:
                continue
            if eq:
                value = given
            elif option.kind.is_flag:
                value = "true"
            elif i + 1 < len(args):
                value = args[i + 1]
        if value is not None:
            return value
        return self.environ.get(option.env)


def kap_args(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The arguments of ``argv`` after kap's name, or None when ``argv`` is not kap."""
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) == "kap":
            return tuple(argv[i + 1 :])
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] == "kap":
            return tuple(argv[i + 2 :])
    return None


def running_kap(proc: Path = Path("/proc"), pid: int = 1) -> Invocation | None:
    """The invocation of process ``pid`` when it is kap, else None (not kap, or unreadable).

    Args:
      proc: where procfs is mounted (tests give a directory that looks like it).
      pid: the process; PID 1 is the container's main process.

    An unreadable environment (another user's process) counts as empty: the
    arguments alone are still worth using.
    """
    base = proc / str(pid)
    try:
        argv = _split((base / "cmdline").read_bytes())
    except OSError:
        return None
    args = kap_args(argv)
    if args is None:
        return None
    try:
        pairs = _split((base / "environ").read_bytes())
    except OSError:
        pairs = []
    environ = dict(p.split("=", 1) for p in pairs if "=" in p)
    return Invocation(args, environ)


def _split(raw: bytes) -> list[str]:
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
