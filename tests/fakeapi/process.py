"""A fake apiserver in its own process: the one tests can SIGKILL or SIGSTOP.

A stopped process is the "hung apiserver whose kernel still accepts TCP";
a killed one is the apiserver whose kernel resets its connections. The
process is the CLI (``cli.py``), started as ``python -m fakeapi``; its first
line on stdout is a JSON ready line with the address it bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import attrs
import trio

from .pki import PkiFiles

# The directory holding this package (tests/), put on the child's PYTHONPATH.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


@attrs.define
class FakeApiProcess:
    """A fake apiserver in its own process, for SIGKILL and SIGSTOP tests."""

    process: trio.Process
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return (
            f"https://[{self.host}]:{self.port}"
            if ":" in self.host
            else f"https://{self.host}:{self.port}"
        )

    def kill(self) -> None:
        """SIGKILL: the kernel resets its connections and refuses new ones."""
        self.process.kill()

    def pause(self) -> None:
        """SIGSTOP: hung; the kernel still completes TCP handshakes into the backlog."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@contextlib.asynccontextmanager
async def fake_api_process(
    name: str,
    pki: PkiFiles,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    readyz: str = "200",
    extra_args: Iterable[str] = (),
    start_timeout: float = 15.0,
    wrapper: Iterable[str] = (),
) -> AsyncIterator[FakeApiProcess]:
    """Run ``python -m fakeapi`` until its ready line; SIGKILL it on exit.

    ``wrapper`` prefixes the command (``("ip", "netns", "exec", NS)`` runs the
    fake inside a network namespace). The child finds this package through
    ``PYTHONPATH`` (the directory holding it), whatever its working directory
    and whichever name the parent imported the package under.
    """
    command = [
        *wrapper,
        sys.executable,
        "-m",
        "fakeapi",
        *("--name", name, "--host", host, "--port", str(port)),
        *("--ca-dir", str(pki.dir), "--readyz", readyz),
        *extra_args,
    ]
    path = [str(_PACKAGE_PARENT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    try:
        with trio.fail_after(start_timeout):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"fake apiserver {name} exited before it was ready")
                line += chunk
        ready = json.loads(line)
        yield FakeApiProcess(process, name, ready["host"], ready["port"])
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(5):
                await process.wait()
            await process.stdout.aclose()
