"""Which kap this is: ``kap --version`` and the start-up log name the version and revision.

The image's side (a wheel built with ``--build-arg REVISION``) is checked in
``test_image.py``; here, a kap running from this checkout, and the lookup order
on directories made to look like a checkout, an installed wheel, or neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from kaptest import kap_args, kap_process

import kap
from kap.build import REVISION_FILE, UNKNOWN, BuildInfo, build_info, find_revision, git_revision

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HAVE_GIT = shutil.which("git") is not None
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def this_checkout_head() -> str:
    if not HAVE_GIT or not (REPO / ".git").exists():
        pytest.skip("not running from a git checkout")
    return git(REPO, "rev-parse", "HEAD")


def test_package_version_is_pyprojects() -> None:
    assert kap.__version__ == PROJECT["version"]


def test_version_flag_prints_version_and_this_checkouts_commit() -> None:
    head = this_checkout_head()
    done = subprocess.run(
        [sys.executable, "-m", "kap", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line in (
        f"kap {PROJECT['version']} (revision {head})",
        f"kap {PROJECT['version']} (revision {head}-dirty)",
    )
    assert line == str(build_info())


async def test_start_up_log_line_carries_version_and_revision() -> None:
    async with kap_process(*kap_args("127.0.0.1:1")) as proc:
        started = proc.find("kap started")[0]
    info = build_info()
    assert (started["version"], started["revision"]) == (info.version, info.revision)
    assert info.revision != UNKNOWN or not (REPO / ".git").exists()


def make_package(root: Path, revision_file: str | None = None) -> Path:
    package = root / "kap"
    package.mkdir(parents=True)
    if revision_file is not None:
        (package / REVISION_FILE).write_text(revision_file)
    return package


@pytest.mark.skipif(not HAVE_GIT, reason="git is not installed")
def test_checkout_revision_is_the_commit_then_dirty_when_a_tracked_file_changes(
    tmp_path: Path,
) -> None:
    package = make_package(tmp_path / "checkout")
    checkout = package.parent
    git(checkout, "init", "-q")
    assert git_revision(checkout) is None  # no commit yet
    (package / "x.py").write_text("x = 1\n")
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", "one")
    head = git(checkout, "rev-parse", "HEAD")
    assert find_revision(package) == head
    (package / "untracked.py").write_text("")
    assert find_revision(package) == head  # untracked files do not make it dirty
    (package / "x.py").write_text("x = 2\n")
    assert find_revision(package) == f"{head}-dirty"


def test_installed_package_reads_the_revision_its_wheel_build_wrote(tmp_path: Path) -> None:
    package = make_package(tmp_path / "site-packages", "0123abcd\n")
    assert find_revision(package) == "0123abcd"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_revision_is_unknown_without_a_checkout_or_a_written_revision(
    tmp_path: Path, content: str | None
) -> None:
    package = make_package(tmp_path / "site-packages", content)
    assert find_revision(package) == UNKNOWN


def test_a_broken_checkout_falls_back_to_the_written_revision(tmp_path: Path) -> None:
    # ".git" exists but git cannot read it (or is not installed): the file decides.
    package = make_package(tmp_path / "checkout", "cafe1234")
    (package.parent / ".git").write_text("gitdir: /nowhere\n")
    assert find_revision(package) == "cafe1234"


def test_build_info_reads_as_one_line() -> None:
    assert str(BuildInfo("1.2.3", "abc")) == "kap 1.2.3 (revision abc)"
