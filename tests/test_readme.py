"""The README is kap's front door: short, the Quick start as CI runs it, a way into docs/.

What the README used to hold in full (design, configuration, discovery,
deploying, monitoring, ...) lives in ``docs/``; ``tests/test_docs.py`` holds
those pages to the code.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# The issue that made the README a front door asks for about 250 lines at most.
MAX_README_LINES = 250


def test_quick_start_has_two_command_lines_and_ci_runs_the_second() -> None:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```\w*\n(.*?)```", section, re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2
    assert "demo" in lines[0] and "tests" in lines[1]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_stays_a_front_door() -> None:
    assert len(README.splitlines()) <= MAX_README_LINES


def test_the_readme_links_to_every_page_in_docs() -> None:
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)(?:#[\w-]*)?\)", README))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages, "docs/ has no pages"
    assert pages - linked == set()
