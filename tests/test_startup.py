"""What kap imports before it serves: the heavy stacks wait until they are needed.

The balancer's start (``kap.cli`` and ``kap.app``, what ``python -m kap``
imports before the listener is up) must not import the discovery stack,
prometheus-client or the subcommands' modules (docs/performance.md
"Start-up"); ``kap status`` and ``kap check`` still find their commands.
Each check runs in a fresh interpreter, since this one has imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from fakeapi import PkiFiles

from kap.cli import SUBCOMMANDS, main

# Imported later: at discovery's start, the first /metrics scrape, or by a subcommand.
LAZY = (
    "lightkube",
    "httpx2",
    "cattrs",
    "yaml",
    "msgspec",
    "prometheus_client",
    "kap.discovery",
    "kap.apiclient",
    "kap.check",
    "kap.check_run",
    "kap.status",
)


def imported_by(code: str) -> set[str]:
    """The top-level packages and kap modules a fresh interpreter holds after ``code``."""
    script = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted({m if m.startswith('kap.') else m.split('.')[0] "
        "for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def run_main(*argv: str) -> str:
    return (
        f"import sys\nsys.argv = ['kap', *{argv!r}]\n"
        "try:\n import kap.__main__\nexcept SystemExit as e:\n assert e.code == 0, e.code"
    )


@pytest.mark.parametrize(
    "code", ["import kap.cli", "import kap.app", run_main("--version"), run_main("--help")]
)
def test_balancer_start_imports_no_lazy_module(code: str) -> None:
    assert imported_by(code) & set(LAZY) == set()


def test_app_built_imports_no_lazy_module() -> None:
    code = (
        "from kap.app import App\n"
        "from kap.config import parse_config\n"
        "import os\n"
        "c = parse_config({'fallback_upstreams': '127.0.0.1:1'}, environ={},"
        " readable=lambda p: None, check=lambda f: {}, is_dir=os.path.isdir, cwd=os.getcwd())\n"
        "App(c)"
    )
    assert imported_by(code) & set(LAZY) == set()


@pytest.mark.parametrize(("sub", "module"), [("status", "kap.status"), ("check", "kap.check")])
def test_subcommands_load_when_named(sub: str, module: str) -> None:
    code = (
        "import sys\nfrom kap.cli import main\n"
        f"try:\n main(['{sub}', '--help'])\nexcept SystemExit as e:\n assert e.code == 0, e.code"
    )
    assert module in imported_by(code)


def test_help_lists_each_subcommand_with_its_own_short_help() -> None:
    group = main
    assert isinstance(group, click.Group)
    ctx = click.Context(group)
    for name, (_, short) in SUBCOMMANDS.items():
        command = group.get_command(ctx, name)
        assert command is not None and command.get_short_help_str(limit=100) == short
    assert group.list_commands(ctx) == sorted(SUBCOMMANDS)


def test_certificates_are_parsed_at_the_first_ask_for_their_expiry(pki: PkiFiles) -> None:
    """Loading the TLS context reads the files; cryptography waits for the expiry's reader."""
    files = (
        f"Credentials(ca_file={str(pki.ca_file)!r}, cert_file={str(pki.client_cert_file)!r},"
        f" key_file={str(pki.client_key_file)!r})"
    )
    code = (
        "import sys\n"
        "from kap.credentials import CredentialFiles\n"
        "from kap.sources import Credentials\n"
        f"c = CredentialFiles({files})\n"
        "c.probe_ssl_context()\n"
        "assert 'cryptography' not in sys.modules\n"
        "assert c.ca_not_after is not None and c.client_cert_not_after is not None\n"
    )
    assert "cryptography" in imported_by(code)
