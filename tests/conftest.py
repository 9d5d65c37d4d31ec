"""Fixtures shared by every kap test: a test PKI, free ports, fake apiservers.

The fake apiserver itself is the package ``fakeapi/`` (importable as
``fakeapi`` from any test, since pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeapi import (
    FakeApiServer,
    PkiFiles,
    SliceStore,
    create_pki,
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    """A trustme CA, its server and client certificates and a token, as files.

    Returns a ``PkiFiles`` over a directory holding ``ca.crt``,
    ``server.crt``/``server.key``, ``cl.crt``/``cl.key`` (CN ``system:kap``,
    O ``kap:nodes``, as a node's static pod would hold) and ``token``.
    """
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def free_port() -> int:
    """A TCP port free on every IPv4 address at the time of asking.

    Bound on 0.0.0.0 so 127.0.0.2:P, 127.0.0.3:P, ... are all free too.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def slice_store() -> SliceStore:
    """An empty EndpointSlice store, to share between the fakes of one test."""
    return SliceStore()


StartFake = Callable[..., Awaitable[FakeApiServer]]


@pytest.fixture
async def start_fake(nursery: trio.Nursery, pki: PkiFiles, slice_store: SliceStore) -> StartFake:
    """Start in-process fake apiservers in the test's nursery.

    ``await start_fake("a", host="127.0.0.2", port=free_port, readyz="500")``
    returns the running ``FakeApiServer``; keyword arguments are its
    attributes. Fakes share ``slice_store`` unless given ``store=``. They stop
    when the test ends (the nursery is cancelled).
    """

    async def start(name: str, **kwargs: Any) -> FakeApiServer:
        kwargs.setdefault("store", slice_store)
        fake = FakeApiServer(name=name, pki=pki, **kwargs)
        await nursery.start(fake.run)
        return fake

    return start


@pytest.fixture
def kubectl() -> Path:
    """The kubectl binary; the test is skipped (with the reason shown) without one."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed on this machine")
    return Path(found)


# ---- the fault-injection suite's figures (tests/faults) ----------------------

# Each fault test records what it measured; printed as one table at the end of
# the run and, when KAP_FAULTS_REPORT names a file, written there as JSON.
FIGURES: list[dict[str, Any]] = []


@pytest.fixture
def figure() -> Any:
    """``figure(promise, what, value, unit)`` records one measured figure."""

    def record(promise: str, what: str, value: float, unit: str = "") -> None:
        FIGURES.append({"promise": promise, "what": what, "value": value, "unit": unit})

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section("kap failure modes: measured")
    for f in sorted(FIGURES, key=lambda f: f["promise"]):
        value = f["value"]
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        tr.write_line(f"{f['promise']:<32} {f['what']:<58} {text:>10} {f['unit']}")
    path = os.environ.get("KAP_FAULTS_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(FIGURES, fh, indent=2)
