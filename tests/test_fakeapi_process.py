"""The fake as a process (tests/fakeapi/process.py and cli.py): ready line, signals, files.

Every test is bounded by ``trio.fail_after``: a fake that hangs fails the
test, it never stalls the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio
from fakeapi import PkiFiles, endpoint_slice, fake_api_process, write_slices_file
from fakeapitest import SLICES_URL, who

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ subprocess mode


async def test_subprocess_prints_its_ready_line_and_dies_on_sigkill(
    pki: PkiFiles, free_port: int
) -> None:
    with trio.fail_after(20):
        async with fake_api_process("p", pki, host="127.0.0.2", port=free_port) as proc:
            assert (proc.host, proc.port) == ("127.0.0.2", free_port)
            assert await who(proc.host, proc.port) == b"p\n"
            ssl_context = pki.client_ssl_context()
            async with httpx2.AsyncClient(verify=ssl_context, trust_env=False) as http:
                assert (await http.get(f"{proc.url}/readyz")).text == "ok"
            proc.kill()
            assert await proc.process.wait() == -signal.SIGKILL
            with pytest.raises(OSError):
                await trio.open_tcp_stream(proc.host, proc.port)


async def test_stopped_subprocess_accepts_tcp_but_never_answers(pki: PkiFiles) -> None:
    with trio.fail_after(20):
        async with fake_api_process("p", pki) as proc:
            proc.pause()
            stream = await trio.open_tcp_stream(proc.host, proc.port)  # the kernel accepts
            async with stream:
                await stream.send_all(b"WHO\n")
                with trio.move_on_after(0.3) as silent:
                    await stream.receive_some(100)
                assert silent.cancelled_caught
                proc.resume()
                assert await stream.receive_some(100) == b"p\n"


async def test_subprocess_serves_and_follows_a_slices_file(pki: PkiFiles, tmp_path: Path) -> None:
    path = tmp_path / "slices.json"
    write_slices_file(path, [endpoint_slice("kubernetes", [("127.0.0.2", True)])])
    args = ["--slices-file", str(path), "--readyz", "500"]
    with trio.fail_after(20):
        async with (
            fake_api_process("p", pki, extra_args=args) as proc,
            httpx2.AsyncClient(verify=pki.client_ssl_context(), trust_env=False) as http,
        ):
            assert (await http.get(f"{proc.url}/readyz")).status_code == 500
            listed = (await http.get(f"{proc.url}{SLICES_URL}")).json()
            assert [s["metadata"]["name"] for s in listed["items"]] == ["kubernetes"]
            write_slices_file(path, [endpoint_slice("k2", [("127.0.0.3", True)])])
            while True:
                listed = (await http.get(f"{proc.url}{SLICES_URL}")).json()
                if [s["metadata"]["name"] for s in listed["items"]] == ["k2"]:
                    break
                await trio.sleep(0.05)


def test_cli_runs_as_a_module_from_the_repository(pki: PkiFiles) -> None:
    """``python -m tests.fakeapi`` (what other tests and the demo may call)."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fakeapi", "--name", "m", "--ca-dir", str(pki.dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""},
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["ready"] is True
            assert ready["host"] == "127.0.0.1"
            assert ready["port"] > 0
        finally:
            proc.kill()
            proc.wait(timeout=5)
