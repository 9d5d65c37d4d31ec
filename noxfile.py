"""kap's sessions: ``nox -s tests``, ``lint``, ``faults``, ``demo``, ``bench``.

Each session installs kap and what it needs into its own virtualenv (with the
interpreter nox runs on), so a fresh machine needs only python3 with pip.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

LINTED = ("kap", "tests", "bench", "hack", "noxfile.py")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite; extra arguments go to pytest."""
    session.install("-q", "-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) on everything, mypy (strict) on kap/."""
    session.install("-q", "-e", ".[test,lint]")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)
    session.run("mypy", "kap")


@nox.session
def faults(session: nox.Session) -> None:
    """The fault-injection suite alone (tests/faults; ``tests`` runs it too).

    Needs root and iproute2 + iptables for the black-hole test (skipped with
    the reason otherwise). ``KAP_FAULTS_REPORT=path.json`` writes the figures.
    """
    session.install("-q", "-e", ".[test]")
    session.run("pytest", "tests/faults", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Three fake apiservers, kap in front, one killed mid-run; stops by itself."""
    session.install("-q", "-e", ".[test]")
    session.run("python", "hack/demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """kap side by side with no proxy and haproxy on loopback (bench/run.py; --quick: < 2 min).

    Needs go (Debian golang-go) to build the load generator and haproxy for
    the comparison column; says what is missing and runs what it can without.
    """
    session.install("-q", "-e", ".[test]")
    session.run("python", "bench/run.py", *session.posargs)
