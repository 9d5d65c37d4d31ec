"""kap's hashed requirement locks: how ``nox -s lock`` writes them and how a test reads them.

Two locks, both generated from ``pyproject.toml`` by uv (``uv pip compile
--generate-hashes``) and checked in:

- ``requirements/runtime.txt``: kap's runtime dependencies. The image installs
  exactly these (``pip install --require-hashes --no-deps --only-binary=:all:``),
  and so does every nox session, so the tests run what the image ships.
- ``requirements/dev.txt``: the test and lint tools (the ``test`` and ``lint``
  extras), resolved with the runtime lock as constraints, so it repeats the
  runtime pins unchanged.

Both are resolved for Linux (kap needs epoll) on the image's Python minor
version; the lock is written for x86_64 and must come out the same for
aarch64, the image's other architecture. uv records the hash of every file
published for each pinned version (each platform's wheels and the sdist), so
pip can install the same versions on any Linux machine and the image picks
the wheels.

A lock is stale when the requirements it was made from changed. Each lock
records a SHA-256 of those requirement strings in its header; the test
``tests/test_lock.py`` recomputes it from ``pyproject.toml`` offline, never by
resolving against the package index (which would turn main red whenever a
dependency publishes a release).

Run ``python hack/lock.py`` where uv is installed (``nox -s lock`` does this).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
RUNTIME = REPO / "requirements" / "runtime.txt"
DEV = REPO / "requirements" / "dev.txt"
# Each lock and the extras it adds to the runtime dependencies.
LOCKS: dict[Path, tuple[str, ...]] = {RUNTIME: (), DEV: ("test", "lint")}

# The Python minor version of the image's base (Dockerfile, PYTHON_IMAGE).
PYTHON_VERSION = "3.11"
# The image's architectures: the lock is written for the first and must not
# differ for the others (no platform-dependent dependency between them).
PLATFORMS = ("x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu")
DIGEST_PREFIX = "# pyproject-requirements-sha256: "
COMPILE_COMMAND = "nox -s lock"


def requirements_digest(pyproject: dict[str, Any], extras: tuple[str, ...]) -> str:
    """SHA-256 of what a lock is resolved from: requires-python, dependencies, the extras.

    Order inside a list does not matter (sorted); any added, removed or
    changed requirement string does.
    """
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    inputs = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "extras": {name: sorted(optional.get(name, [])) for name in extras},
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lock_text: str) -> str | None:
    """The digest a lock's header records, or None when it has none."""
    for line in lock_text.splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line[len(DIGEST_PREFIX) :].strip()
        if not line.startswith("#"):
            break
    return None


_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalise(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock_text: str) -> dict[str, str]:
    """``{normalised name: version}`` of every requirement line in a lock."""
    found = {}
    for line in lock_text.splitlines():
        match = _PIN.match(line)
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def hashes(lock_text: str) -> dict[str, list[str]]:
    """``{normalised name: [sha256:..., ...]}``: the hashes under each requirement line."""
    found: dict[str, list[str]] = {}
    current = None
    for line in lock_text.splitlines():
        match = _PIN.match(line)
        if match:
            current = normalise(match.group(1))
            found[current] = []
        elif current is not None and line.strip().startswith("--hash="):
            found[current].append(line.strip().removeprefix("--hash=").rstrip(" \\"))
        elif not line.startswith(" "):
            current = None
    return found


def compile_lock(extras: tuple[str, ...], platform: str, out: Path) -> str:
    """Run uv for one lock and platform; returns the file's text.

    Paths are relative to the repository, so the annotations uv writes
    (``# via -c requirements/runtime.txt``) do not depend on the checkout.
    """
    argv = ["uv", "pip", "compile", "pyproject.toml", "--quiet", "--generate-hashes"]
    argv += ["--python-version", PYTHON_VERSION, "--python-platform", platform]
    argv += ["--custom-compile-command", COMPILE_COMMAND, "--output-file", str(out)]
    for extra in extras:
        argv += ["--extra", extra]
    if extras:
        argv += ["--constraint", RUNTIME.relative_to(REPO).as_posix()]
    subprocess.run(argv, check=True, cwd=REPO)
    return out.read_text()


def with_digest(text: str, digest: str) -> str:
    """uv's header, then the digest line, then the rest."""
    lines = text.splitlines(keepends=True)
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    return "".join([*lines[:header], f"{DIGEST_PREFIX}{digest}\n", *lines[header:]])


def main() -> int:
    pyproject = tomllib.loads(PYPROJECT.read_text())
    RUNTIME.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for lock, extras in LOCKS.items():  # runtime first: dev is constrained by it
            texts = [compile_lock(extras, p, Path(tmp) / f"{p}.txt") for p in PLATFORMS]
            if any(t != texts[0] for t in texts):
                print(f"{lock.name}: the resolution differs between {PLATFORMS}", file=sys.stderr)
                return 1
            lock.write_text(with_digest(texts[0], requirements_digest(pyproject, extras)))
            print(f"wrote {lock.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
