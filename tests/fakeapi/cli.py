"""The fake apiserver as a process: ``python -m tests.fakeapi --help``.

Run by ``process.fake_api_process`` (tests, the demo) and by hand. It prints
one JSON ready line (``{"ready": true, "name": ..., "host": ..., "port": ...}``)
once it listens, and serves until killed. ``--slices-file`` makes several
processes share EndpointSlices, as apiservers share etcd: each follows the
file, and a writer replaces it atomically (:func:`write_slices_file`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from .pki import CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, PkiFiles
from .server import READYZ_MODES, FakeApiServer
from .store import SliceStore

DESCRIPTION = "A fake kube-apiserver: the upstream every kap test talks to."
SLICES_FILE_POLL = 0.1  # seconds between checks of --slices-file


def _read_slices_file(path: Path) -> list[dict[str, Any]] | None:
    """Slices from a JSON array (or a list object with ``items``); None if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    items = data.get("items") if isinstance(data, dict) else data
    return items if isinstance(items, list) else None


def write_slices_file(path: Path, slices: Iterable[dict[str, Any]]) -> None:
    """Write a ``--slices-file`` atomically, so the fake never reads half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(slices)))
    os.replace(tmp, path)


async def _follow_slices_file(path: Path, store: SliceStore) -> None:
    """Make the store mirror ``path``, re-reading it whenever it changes."""
    seen: tuple[int, int, int] | None = None
    while True:
        try:
            st = path.stat()  # noqa: ASYNC240 -- a local file; no worker thread wanted
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            slices = _read_slices_file(path)
            if slices is None:
                print(f"fakeapi: ignoring unreadable slices file {path}", file=sys.stderr)
            else:
                store.replace_all(slices)
        await trio.sleep(SLICES_FILE_POLL)


async def _main(args: argparse.Namespace) -> None:
    fake = FakeApiServer(
        name=args.name,
        pki=PkiFiles(Path(args.ca_dir)),
        host=args.host,
        port=args.port,
        readyz=args.readyz,
        readyz_delay=args.readyz_delay,
        require_client_cert=args.require_client_cert,
        require_token=args.require_token,
    )
    async with trio.open_nursery() as nursery:
        if args.slices_file:
            path = Path(args.slices_file)
            slices = _read_slices_file(path)
            if slices is not None:
                fake.store.replace_all(slices)
            nursery.start_soon(_follow_slices_file, path, fake.store)
        host, port = await nursery.start(fake.run)
        print(
            json.dumps({"ready": True, "name": args.name, "host": host, "port": port}), flush=True
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakeapi", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True, help="answered to WHO in raw mode")
    parser.add_argument(
        "--ca-dir", required=True, help=f"holds {CA_FILE}, {SERVER_CERT_FILE}, {SERVER_KEY_FILE}"
    )
    parser.add_argument("--readyz", choices=READYZ_MODES, default="200")
    parser.add_argument(
        "--readyz-delay", type=float, default=1.0, help="seconds, for --readyz slow"
    )
    parser.add_argument("--require-client-cert", action="store_true")
    parser.add_argument("--require-token", default=None, metavar="TOKEN")
    parser.add_argument(
        "--slices-file", default=None, help="JSON array of EndpointSlices, followed"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)
