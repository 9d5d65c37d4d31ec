"""Which kap this is: the version and the git revision it was built from.

``kap --version``, the ``kap started`` log line (and any metric that labels
the build) ask ``build_info()``, so they all say the same thing. The revision
comes from, in order:

1. git, when kap runs from a checkout (the package's parent directory holds
   ``.git``): the commit checked out, with ``-dirty`` when tracked files differ
   from it. Asked only there, so an installed kap never reports the commit of
   some unrelated repository it happens to sit in.
2. ``REVISION_FILE`` beside this module, which the wheel build writes
   (``setup.py``): the commit of the checkout it was built from, or
   ``$KAP_REVISION``, which the image build sets from ``--build-arg REVISION``
   because the Docker build context has no ``.git``.
3. ``"unknown"``.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import attrs

from kap import __version__

REVISION_FILE = "_revision.txt"
UNKNOWN = "unknown"
# git answers from local files in milliseconds; this only bounds a wedged one.
GIT_TIMEOUT = 5.0
# The commit on a "# branch.oid" line, one line per changed tracked file.
GIT_STATUS_FLAGS = ("--porcelain=v2", "--branch", "--untracked-files=no")
_REVISION = re.compile(r"[0-9a-f]{7,64}(-dirty)?")


@attrs.frozen
class BuildInfo:
    version: str
    revision: str

    def __str__(self) -> str:
        return f"kap {self.version} (revision {self.revision})"


def git_revision(worktree: Path) -> str | None:
    """The commit checked out in ``worktree`` (``-dirty`` if tracked files changed), or None.

    One ``git status`` gives both the commit and whether tracked files differ.
    None when git is missing, fails, or the repository has no commit yet.
    """
    argv = ["git", "-C", str(worktree), "status", *GIT_STATUS_FLAGS]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    lines = done.stdout.splitlines()
    oid = next((ln.split()[2] for ln in lines if ln.startswith("# branch.oid ")), None)
    if oid is None or _REVISION.fullmatch(oid) is None:
        return None  # "(initial)": no commit yet
    dirty = any(not ln.startswith("#") for ln in lines)
    return f"{oid}-dirty" if dirty else oid


def read_revision(package_dir: Path) -> str | None:
    """The revision the wheel build wrote into the package, or None."""
    try:
        text = (package_dir / REVISION_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def find_revision(package_dir: Path) -> str:
    """See the module docstring for the order."""
    checkout = package_dir.parent
    if (checkout / ".git").exists():
        revision = git_revision(checkout)
        if revision is not None:
            return revision
    return read_revision(package_dir) or UNKNOWN


@functools.cache
def build_info() -> BuildInfo:
    """This process's kap: asked once (the answer cannot change while it runs)."""
    return BuildInfo(__version__, find_revision(Path(__file__).resolve().parent))
