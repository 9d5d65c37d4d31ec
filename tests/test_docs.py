"""The docs stay true to the code and to the repository.

- every flag and environment variable is in the configuration page;
- the nursery tree names modules that exist;
- the ``/upstreams`` example has exactly the fields kap reports;
- every relative link in README.md and docs/*.md reaches a file of the
  repository, and a heading there when it names one;
- every command block is one CI runs, or is marked as needing a cluster or
  the benchmark machine: a reader can tell what was checked here;
- nothing in the repository points outside it (the notes its authors keep next
  to the repository are not shipped with it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kap.config import OPTIONS
from kap.report import UpstreamReport

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# Assembled, so that this file does not itself name what it looks for.
OUTSIDE = ("../" + "shared", "perf" + "-facts")

# What may stand in the paragraph before a command block.
MARKERS = ("(cluster-only", "(benchmark-only", "(CI runs this)")
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def page(name: str) -> str:
    return (DOCS / name).read_text()


def blocks(text: str) -> Iterator[tuple[str, str, str]]:
    """Each fenced block as (language, body, the paragraph just before it)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        before = []
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        while j >= 0 and lines[j].strip():
            before.insert(0, lines[j].strip())
            j -= 1
        end = i + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        yield m.group(2), "\n".join(lines[i + 1 : end]), " ".join(before)
        i = end + 1


def prose(text: str) -> str:
    """The text without its fenced blocks (a `# comment` in a block is no heading)."""
    out, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a page (dupes get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_flag_and_env_var_is_in_the_configuration_page() -> None:
    text = page("configuration.md")
    for opt in OPTIONS:
        for flag in opt.flags:
            assert f"`{flag}`" in text, flag
        assert f"`{opt.env}`" in text, opt.env


def test_the_nursery_tree_names_modules_that_exist() -> None:
    tree = page("design.md").split("## The nursery tree", 1)[1].split("```")[1]
    modules = re.findall(r"\(kap/(\w+)\.py\)", tree)
    assert modules
    for module in modules:
        assert (ROOT / "kap" / f"{module}.py").exists(), module


def test_the_module_map_lists_every_module_once() -> None:
    """docs/development.md's "Layout of the code": one line per module of kap/, none stale."""
    block = page("development.md").split("```text\n", 1)[1].split("```", 1)[0]
    listed: list[str] = []
    folder = ""
    for line in block.splitlines():
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        if indent == 0:
            folder = name
        elif name.endswith("/"):
            folder = "kap/" + name
        elif name.endswith(".py") and folder.startswith("kap/"):
            listed.append(("kap/" if indent == 2 else folder) + name)
    actual = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "kap").rglob("*.py") if p.name != "__init__.py"
    )
    assert sorted(listed) == actual


def test_the_upstreams_example_has_exactly_the_reported_fields() -> None:
    section = page("monitoring.md").split("`/upstreams`:", 1)[1]
    example = re.search(r"```json\n(.*?)```", section, re.S)
    assert example is not None
    text = example.group(1).replace('"discovery": {"...": "see Discovery"}', '"discovery": {}')
    doc = json.loads(text)
    assert set(doc["upstreams"][0]) == {f.name for f in attrs.fields(UpstreamReport)}


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    text = prose(path.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        reached = dest.is_relative_to(ROOT) and dest.exists()
        if not reached or (
            anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text())
        ):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_block_is_run_by_ci_or_marked(path: Path) -> None:
    text = path.read_text()
    if path.name == "README.md":
        # The Quick start is held to .ci/run by tests/test_readme.py.
        head, _, rest = text.partition("## Quick start")
        text = head + rest.split("```", 2)[2]
    ci = (ROOT / ".ci" / "run").read_text()
    unmarked = []
    for language, body, before in blocks(text):
        if language not in COMMAND_LANGUAGES:
            continue
        if "(CI runs this)" in before:
            commands = [line.strip() for line in body.splitlines() if line.strip()]
            assert all(c in ci for c in commands), body
        elif not any(m in before for m in MARKERS):
            unmarked.append(body.splitlines()[0])
    assert unmarked == []


# Not shipped: what nox, git and the bench leave in a working tree.
UNTRACKED_DIRS = {
    ".git",
    ".nox",
    ".venv",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    "dist",
    "results",
    "bin",
}


def tracked_files() -> list[str]:
    """The repository's files: git's list, or a walk when this is no git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        return [name for name in out.stdout.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        pass
    names = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in UNTRACKED_DIRS]
        names += [str(Path(directory, f).relative_to(ROOT)) for f in files]
    return names


def pointing_outside() -> list[str]:
    found = []
    for name in tracked_files():
        try:
            text = (ROOT / name).read_text(errors="replace")
        except (IsADirectoryError, FileNotFoundError):
            continue
        if any(needle in text for needle in OUTSIDE):
            found.append(name)
    return found


def test_nothing_outside_kap_points_outside_the_repository() -> None:
    assert [name for name in pointing_outside() if not name.startswith("kap/")] == []


def test_no_kap_module_points_outside_the_repository() -> None:
    assert [name for name in pointing_outside() if name.startswith("kap/")] == []
