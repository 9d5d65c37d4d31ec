"""Credential files on disk, followed as they rotate.

kubelet rotates bound ServiceAccount tokens (about hourly) and operators rotate
client certificates, so kap never caches a credential for its whole life: the
token and the TLS context are rebuilt when any of their files changes (checked
with one ``stat`` per file per use; a few microseconds). A file that turns
unreadable or invalid keeps the last good version in use and is logged once
per change, so a half-written rotation never takes the probes down.
"""

from __future__ import annotations

import os
import ssl

import attrs
from loguru import logger

from kap.config import Credentials

# A token file larger than this is not a token (bound tokens are about 1 KiB).
MAX_TOKEN_BYTES = 64 * 1024


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@attrs.define
class CredentialFiles:
    """The TLS context and bearer token built from ``Credentials``, kept current."""

    files: Credentials
    _context: ssl.SSLContext | None = attrs.field(default=None, alias="_context")
    _context_stamp: object = attrs.field(default=None, alias="_context_stamp")
    _token: str | None = attrs.field(default=None, alias="_token")
    _token_stamp: object = attrs.field(default=None, alias="_token_stamp")
    generation: int = 0  # bumped whenever the TLS context is rebuilt

    @property
    def verifies(self) -> bool:
        return self.files.ca_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context; rebuilt when the CA or client cert files change."""
        f = self.files
        stamp = (_stamp(f.ca_file), _stamp(f.cert_file), _stamp(f.key_file))
        if self._context is not None and stamp == self._context_stamp:
            return self._context
        try:
            ctx = build_ssl_context(f)
        except (OSError, ssl.SSLError, ValueError) as e:
            if self._context_stamp != stamp:
                logger.bind(error=str(e)).error(
                    "cannot load TLS credentials; keeping the previous ones"
                )
                self._context_stamp = stamp
            if self._context is None:
                self._context = build_ssl_context(Credentials(ca_file=None))
                self.generation += 1
            return self._context
        if self._context is not None:
            logger.info("TLS credentials reloaded")
        self._context, self._context_stamp = ctx, stamp
        self.generation += 1
        return ctx

    def token(self) -> str | None:
        """The bearer token, re-read when the file changes; None when there is none."""
        path = self.files.token_file
        if path is None:
            return None
        stamp = _stamp(path)
        if stamp == self._token_stamp:
            return self._token
        self._token_stamp = stamp
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_TOKEN_BYTES + 1)
            if len(data) > MAX_TOKEN_BYTES:
                raise ValueError(f"larger than {MAX_TOKEN_BYTES} bytes")
            token = data.decode("ascii").strip()
            if not token or any(c.isspace() for c in token):
                raise ValueError("empty or not a single token")
        except (OSError, ValueError) as e:
            logger.bind(error=str(e), path=path).error(
                "cannot read token file; keeping the last one"
            )
            return self._token
        self._token = token
        return token

    def headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}


def build_ssl_context(files: Credentials) -> ssl.SSLContext:
    """A TLS client context: verify against the CA when there is one, present the client cert.

    Without a CA file kap cannot verify the apiserver, so it does not try
    (probes still tell a live apiserver from a dead one); the start-up log says
    so. Hostname checks are done against ``--tls-server-name`` (sent as SNI).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.ca_file is not None:
        ctx.load_verify_locations(cafile=files.ca_file)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if files.cert_file is not None and files.key_file is not None:
        ctx.load_cert_chain(files.cert_file, files.key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
