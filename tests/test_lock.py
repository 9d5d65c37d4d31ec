"""The hashed locks in requirements/: current, complete, hashed, and what the tests run.

Offline: staleness is a digest of pyproject.toml's requirement strings that
``nox -s lock`` records in each lock's header (``hack/lock.py``), never a new
resolution against the package index.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import re
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def load_lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kap_hack_lock", REPO / "hack" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = load_lock_module()
LOCKS = [(path.relative_to(REPO).as_posix(), extras) for path, extras in lock.LOCKS.items()]


def read(relpath: str) -> str:
    return (REPO / relpath).read_text()


@pytest.mark.parametrize(("relpath", "extras"), LOCKS)
def test_lock_was_made_from_the_current_pyproject(relpath: str, extras: tuple[str, ...]) -> None:
    recorded = lock.recorded_digest(read(relpath))
    assert recorded is not None, f"{relpath} records no digest: run `nox -s lock`"
    assert recorded == lock.requirements_digest(PYPROJECT, extras), (
        f"pyproject.toml's requirements changed since {relpath} was made: run `nox -s lock`"
    )


def _edited(edit: Any) -> dict[str, Any]:
    pyproject = copy.deepcopy(PYPROJECT)
    edit(pyproject["project"])
    return pyproject


DIGEST_CHANGES = [
    ("a dependency added", lambda p: p["dependencies"].append("six>=1"), True),
    ("a range changed", lambda p: p["dependencies"].__setitem__(0, "trio>=0.1"), True),
    ("requires-python changed", lambda p: p.__setitem__("requires-python", ">=3.12"), True),
    ("a test tool added", lambda p: p["optional-dependencies"]["test"].append("six"), True),
    ("dependencies reordered", lambda p: p["dependencies"].reverse(), False),
    ("the description changed", lambda p: p.__setitem__("description", "x"), False),
]


@pytest.mark.parametrize(
    ("what", "edit", "changes"), DIGEST_CHANGES, ids=[row[0] for row in DIGEST_CHANGES]
)
def test_digest_follows_the_requirements_only(what: str, edit: Any, changes: bool) -> None:
    extras = ("test", "lint")
    before = lock.requirements_digest(PYPROJECT, extras)
    after = lock.requirements_digest(_edited(edit), extras)
    assert (after != before) == changes, what


def test_a_test_tool_does_not_make_the_runtime_lock_stale() -> None:
    edited = _edited(lambda p: p["optional-dependencies"]["test"].append("six"))
    assert lock.requirements_digest(edited, ()) == lock.requirements_digest(PYPROJECT, ())


@pytest.mark.parametrize(("relpath", "extras"), LOCKS)
def test_every_locked_requirement_is_pinned_and_hashed(
    relpath: str, extras: tuple[str, ...]
) -> None:
    text = read(relpath)
    requirement_lines = [
        ln for ln in text.splitlines() if ln and not ln.startswith(("#", " ", "\t"))
    ]
    pins = lock.pins(text)
    assert pins and len(pins) == len(requirement_lines), "a requirement line without =="
    hashes = lock.hashes(text)
    for name in pins:
        assert hashes[name], f"{name} has no hash"
        for h in hashes[name]:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", h), f"{name}: {h}"


def _declared(requirements: list[str]) -> set[str]:
    return {lock.normalise(Requirement(r).name) for r in requirements}


@pytest.mark.parametrize(("relpath", "extras"), LOCKS)
def test_lock_holds_every_declared_requirement(relpath: str, extras: tuple[str, ...]) -> None:
    project = PYPROJECT["project"]
    declared = _declared(project["dependencies"])
    for extra in extras:
        declared |= _declared(project["optional-dependencies"][extra])
    missing = declared - set(lock.pins(read(relpath)))
    assert not missing, f"{relpath} lacks {sorted(missing)}: run `nox -s lock`"


def test_dev_lock_repeats_the_runtime_pins_and_hashes() -> None:
    runtime, dev = read("requirements/runtime.txt"), read("requirements/dev.txt")
    dev_pins, dev_hashes = lock.pins(dev), lock.hashes(dev)
    for name, version in lock.pins(runtime).items():
        assert dev_pins.get(name) == version, f"{name}: runtime {version}, dev {dev_pins.get(name)}"
        assert dev_hashes[name] == lock.hashes(runtime)[name], name


@pytest.mark.skipif(
    "NOX_CURRENT_SESSION" not in os.environ, reason="only nox sessions install from the lock"
)
def test_this_session_runs_the_locked_runtime_versions() -> None:
    installed = {
        lock.normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    for name, version in lock.pins(read("requirements/runtime.txt")).items():
        running = installed.get(name)
        assert running == version, f"{name}: locked {version}, running {running}"
