"""Writing HTTP/1.1 responses with h11, and noticing a client that went away.

Shared by the server's handlers and the list/watch handlers. Every body an
error carries is a ``meta/v1`` Status (``objects.status``) sent as exactly
``application/json``.
"""

from __future__ import annotations

import contextlib
import json
from http import HTTPStatus
from typing import Any

import h11
import trio

RECEIVE_SIZE = 65536


async def conn_send(conn: h11.Connection, tls: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await tls.send_all(data)


async def send(
    conn: h11.Connection, tls: trio.abc.Stream, code: int, body: bytes, content_type: str
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
    ]
    reason = HTTPStatus(code).phrase.encode()
    await conn_send(conn, tls, h11.Response(status_code=code, headers=headers, reason=reason))
    await conn_send(conn, tls, h11.Data(data=body))
    await conn_send(conn, tls, h11.EndOfMessage())


async def send_json(conn: h11.Connection, tls: trio.abc.Stream, code: int, obj: Any) -> None:
    # Exactly "application/json": lightkube turns errors into ApiError only then.
    await send(conn, tls, code, json.dumps(obj).encode(), "application/json")


async def until_client_closes(stream: trio.abc.ReceiveStream) -> None:
    """Discard input until EOF: how a hung handler notices the client gave up."""
    while await stream.receive_some(RECEIVE_SIZE):
        pass


async def watch_for_close(
    stream: trio.abc.ReceiveStream, gone: trio.Event, scope: trio.CancelScope
) -> None:
    """Cancel ``scope`` when the client closes (or resets) its side."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await until_client_closes(stream)
    gone.set()
    scope.cancel()
