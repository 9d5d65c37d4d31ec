"""Writes the git revision into kap's wheel; everything else is in pyproject.toml.

The wheel carries ``kap/_revision.txt`` (read by ``kap.build``): ``$KAP_REVISION``
when set (the image build sets it from ``--build-arg REVISION``, since the
Docker build context has no ``.git``), else the commit of the checkout being
built (``-dirty`` when tracked files differ from it), else ``unknown``. An
editable install writes nothing: kap then asks git itself at run time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def checkout_revision() -> str | None:
    if not (HERE / ".git").exists():
        return None  # an unpacked sdist or a build context: no history here
    try:
        head = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--verify", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "diff", "--quiet", "HEAD", "--"], check=False
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if dirty else head


class BuildPyWithRevision(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        revision = os.environ.get("KAP_REVISION", "").strip() or checkout_revision() or "unknown"
        target = Path(self.build_lib) / "kap" / "_revision.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(revision + "\n")


setup(cmdclass={"build_py": BuildPyWithRevision})
