"""Clients of the fake apiserver, for the fake's own tests (``tests/test_fakeapi_*.py``).

An HTTPS client trusting the test CA, a raw-mode ``WHO``, and a short wait
for state the fake changes by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import trio
from fakeapi import FakeApiServer, PkiFiles

SLICES_URL = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
KUBERNETES_SELECTOR = "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes"


def client(pki: PkiFiles, fake: FakeApiServer, **kwargs: Any) -> httpx2.AsyncClient:
    ssl_context = pki.client_ssl_context(client_cert=kwargs.pop("client_cert", False))
    kwargs.setdefault("timeout", 5.0)
    return httpx2.AsyncClient(base_url=fake.url, verify=ssl_context, trust_env=False, **kwargs)


async def who(host: str, port: int, payload: bytes = b"") -> bytes:
    """Ask a fake in raw mode who it is, send ``payload``, half-close, read all."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"WHO\n" + payload)
        await stream.send_eof()
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        return received


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (2 s at most) until ``condition()`` holds: for state the fake changes itself."""
    with trio.fail_after(2):
        while True:
            if condition():
                return
            await trio.sleep(0.01)
