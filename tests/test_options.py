"""The option table: every option complete, and the docs' table generated from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kap.options import BEGIN, END, OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_every_option_has_a_flag_an_env_var_and_help() -> None:
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    for o in OPTIONS:
        assert o.flags[0].startswith("--") and o.env.isupper() and o.help


def page_table() -> str:
    page = (ROOT / "docs" / "configuration.md").read_text()
    return page.split(BEGIN + "\n", 1)[1].split(END, 1)[0]


def test_the_configuration_page_has_the_generated_table() -> None:
    assert page_table() == markdown_table(), (
        "run: python -m kap.options --update docs/configuration.md"
    )


def test_python_m_kap_options_markdown_prints_the_pages_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kap.options", "--markdown"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout == page_table()
    assert out.stdout.count("\n") == len(OPTIONS) + 2
