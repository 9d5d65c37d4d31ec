"""kap's sessions: ``nox -s tests``, ``lint``, ``faults``, ``demo``, ``bench``, ``fleet``.

Each session installs kap and what it needs into its own virtualenv (with the
interpreter nox runs on), so a fresh machine needs only python3 with pip.
Dependencies come from the hashed locks in ``requirements/`` (the image installs
the same runtime lock), kap itself is installed editable without dependencies.
Release chores: ``nox -s lock`` (regenerate the locks), ``sbom``, ``audit``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

LINTED = ("kap", "tests", "bench", "hack", "noxfile.py", "setup.py")
RUNTIME_LOCK = "requirements/runtime.txt"
DEV_LOCK = "requirements/dev.txt"
# The release tools, pinned so that ``nox -s lock`` gives the same lock for
# the same index state (uv's output format is part of its version).
UV = "uv==0.13.9"
CYCLONEDX_BOM = "cyclonedx-bom==7.5.0"
PIP_AUDIT = "pip-audit==2.10.1"
SBOM = "dist/kap-sbom.cdx.json"


def install_locked(session: nox.Session) -> None:
    """kap's runtime lock, then the test and lint tools' lock, then kap itself.

    Hash-checked and without dependency resolution, so the session runs the
    exact versions the image ships; ``--no-deps`` for kap keeps pip from
    resolving its open ranges again.
    """
    session.install("-q", "--require-hashes", "--no-deps", "-r", RUNTIME_LOCK)
    session.install("-q", "--require-hashes", "--no-deps", "-r", DEV_LOCK)
    session.install("-q", "--no-deps", "-e", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite; extra arguments go to pytest."""
    install_locked(session)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) on everything, mypy (strict) on kap/."""
    install_locked(session)
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)
    session.run("mypy", "kap")


@nox.session
def faults(session: nox.Session) -> None:
    """The fault-injection suite alone (tests/faults; ``tests`` runs it too).

    Needs root and iproute2 + iptables for the black-hole test (skipped with
    the reason otherwise). ``KAP_FAULTS_REPORT=path.json`` writes the figures.
    """
    install_locked(session)
    session.run("pytest", "tests/faults", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Three fake apiservers, kap in front, one killed mid-run; stops by itself."""
    install_locked(session)
    # A module from the repository's root (nox's working directory), so that
    # the fake apiserver imports as the package tests.fakeapi.
    session.run("python", "-m", "hack.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """kap side by side with no proxy and haproxy on loopback (bench/run.py; --quick: < 2 min).

    Needs go (Debian golang-go) to build the load generator and haproxy for
    the comparison column; says what is missing and runs what it can without.
    """
    install_locked(session)
    # The chart's plotting library (the bench extra): benchmark-only, not in
    # the image, so not in the hash-checked locks.
    session.install("-q", "-e", ".[bench]")
    session.run("python", "bench/chart.py", "--check")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def fleet(session: nox.Session) -> None:
    """Real kaps against three fake apiservers: what they cost the control plane (bench/fleet.py).

    Per node and kind requests/s in each setting, the herd after one
    apiserver restarts, the projection to 5,000 nodes and the budgets
    (fails when one does not hold). ``-- --kaps N --seconds S``; about
    5 minutes with the defaults.
    """
    install_locked(session)
    session.run("python", "bench/fleet.py", *session.posargs)


@nox.session
def lock(session: nox.Session) -> None:
    """Regenerate requirements/runtime.txt and dev.txt from pyproject.toml (hack/lock.py)."""
    session.install("-q", UV)
    session.run("python", "hack/lock.py")


@nox.session
def sbom(session: nox.Session) -> None:
    """CycloneDX JSON of the runtime lock (what the image installs) into dist/."""
    session.install("-q", CYCLONEDX_BOM)
    Path(SBOM).parent.mkdir(exist_ok=True)
    session.run(
        "cyclonedx-py",
        "requirements",
        "--pyproject",
        "pyproject.toml",
        "--output-reproducible",
        "--output-format",
        "JSON",
        "--output-file",
        SBOM,
        RUNTIME_LOCK,
    )
    session.log(f"wrote {SBOM}")


@nox.session
def audit(session: nox.Session) -> None:
    """Known vulnerabilities in the runtime lock (pip-audit; asks the network, not in tests).

    ``--strict``: a package the vulnerability service could not answer for
    fails the session instead of passing unaudited. Extra arguments go to
    pip-audit (``-- -s osv`` asks OSV instead of PyPI).
    """
    session.install("-q", PIP_AUDIT)
    argv = ["--strict", "--require-hashes", "--disable-pip", "-r", RUNTIME_LOCK]
    session.run("pip-audit", *argv, *session.posargs)
