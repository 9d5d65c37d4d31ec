"""Credential files on disk, followed as they rotate, and never presented unverified.

The rules this module keeps (tests/test_credentials.py holds it to them):

* A bearer token or a client certificate is presented only on a connection
  whose server certificate verifies against a CA (and the name kap expects,
  ``--tls-server-name``, which the callers send as SNI with hostname checks
  on). Without a CA file kap cannot tell an apiserver from anything that
  answers on its address, so it presents nothing: the context carries no
  client certificate and ``headers()`` is empty. Probes still work (a 401 or
  403 means alive); discovery, which needs credentials, is off.
* kubelet rotates bound ServiceAccount tokens (about hourly) and operators
  rotate client certificates, so nothing is cached for kap's whole life: the
  token and the TLS context are rebuilt when any of their files changes
  (checked with one ``stat`` per file per use; a few microseconds).
* A file that turns unreadable or invalid keeps the last good context and
  token in use, logged once per change: a half-written rotation never takes
  the probes down and never weakens what kap checks. When a file was never
  good, kap goes without it: without the client certificate (the CA still
  verifies; a static pod whose ``cl.crt`` is not there yet), or, for a CA
  file, with a context that trusts nothing (every handshake fails) rather
  than one that verifies nothing.

``check_files`` is the same loading done once at start, for the CLI to turn
a bad explicit file into an exit-2 line before anything runs.
"""

from __future__ import annotations

import os
import re
import ssl

import attrs
from loguru import logger

from kap.certinfo import CertificateError, pem_not_after, read_pem
from kap.files import read_regular, require_regular
from kap.sources import Credentials

# A token file larger than this is not a token (bound tokens are about 1 KiB).
MAX_TOKEN_BYTES = 64 * 1024
NO_CA = "no CA file: kap cannot verify the apiservers, so it presents no credentials"
NO_CREDENTIALS = "no token or client certificate"

_LOAD_ERRORS = (OSError, ssl.SSLError, ValueError)


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_pem(path: str | None) -> bytes | None:
    """A certificate file's bytes, for its expiry; None when there is none or it is unreadable."""
    if path is None:
        return None
    try:
        return read_pem(path)
    except (OSError, CertificateError):
        return None


def _why(e: BaseException, what: str = "") -> str:
    """One line: the OS's reason, or what the file is not and OpenSSL's reason."""
    if isinstance(e, ssl.SSLError):
        reason = re.sub(r"\s*\(_ssl\.c:\d+\)", "", " ".join(str(e).split()))
        return f"not {what}: {reason}" if what else reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def read_token(path: str) -> str:
    """The bearer token in ``path``: one word of ASCII, at most MAX_TOKEN_BYTES.

    Raises:
      OSError: unreadable. ValueError: not a token.
    """
    data = read_regular(path, MAX_TOKEN_BYTES + 1)
    if len(data) > MAX_TOKEN_BYTES:
        raise ValueError(f"larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("not ASCII text") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError("empty or not a single token")
    return token


# What each use offers over ALPN. Discovery's HTTP client (httpx2, http2
# off) sets its own list on the context it is given at every connection, so
# the probes, which speak HTTP/2 when the apiserver offers it, get a context
# of their own built from the same files at the same time.
HTTP11_ALPN = ("http/1.1",)
PROBE_ALPN = ("h2", "http/1.1")


def _base_context(alpn: tuple[str, ...] = HTTP11_ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def unverified_context(alpn: tuple[str, ...] = HTTP11_ALPN) -> ssl.SSLContext:
    """No CA: verify nothing, present nothing (probes only tell alive from dead)."""
    ctx = _base_context(alpn)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verifying_context(ca_file: str | None, alpn: tuple[str, ...] = HTTP11_ALPN) -> ssl.SSLContext:
    """Verify the server's certificate and name; ``None`` trusts no CA at all.

    Hostname checks are done against ``--tls-server-name`` (sent as SNI).
    """
    ctx = _base_context(alpn)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        require_regular(ca_file)  # OpenSSL's open of a FIFO would stop the loop
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def build_ssl_context(files: Credentials, alpn: tuple[str, ...] = HTTP11_ALPN) -> ssl.SSLContext:
    """The full context for ``files``: the CA, and the client certificate only with a CA.

    Raises:
      OSError, ssl.SSLError, ValueError: a file is unreadable or invalid.
    """
    if files.ca_file is None:
        return unverified_context(alpn)
    ctx = verifying_context(files.ca_file, alpn)
    if files.cert_file is not None and files.key_file is not None:
        _load_cert_chain(ctx, files.cert_file, files.key_file)
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """``load_cert_chain`` of regular files only (a FIFO would stop the loop)."""
    require_regular(cert_file)
    require_regular(key_file)
    ctx.load_cert_chain(cert_file, key_file)


def check_files(files: Credentials) -> dict[str, str]:
    """Load every file of ``files`` once: field name -> why it cannot be used.

    The field of a bad client certificate or key is ``cert_file`` (they are
    loaded together). An empty result means all load.
    """
    problems: dict[str, str] = {}
    if files.ca_file is not None:
        try:
            verifying_context(files.ca_file)
        except _LOAD_ERRORS as e:
            problems["ca_file"] = _why(e, "a PEM CA bundle")
    if files.cert_file is not None and files.key_file is not None:
        try:
            _load_cert_chain(_base_context(), files.cert_file, files.key_file)
        except _LOAD_ERRORS as e:
            problems["cert_file"] = _why(e, "a PEM certificate and its key")
    if files.token_file is not None:
        try:
            read_token(files.token_file)
        except _LOAD_ERRORS as e:
            problems["token_file"] = _why(e)
    return problems


@attrs.define
class CredentialFiles:
    """The TLS context and bearer token built from ``Credentials``, kept current."""

    files: Credentials
    _context: ssl.SSLContext | None = attrs.field(default=None, alias="_context")
    # The same, offering h2 as well: built with _context, from the same files.
    _probe_context: ssl.SSLContext | None = attrs.field(default=None, alias="_probe_context")
    _context_stamp: object = attrs.field(default=None, alias="_context_stamp")
    # The context in use was built from every file (not a stand-in for a bad one).
    _complete: bool = attrs.field(default=False, alias="_complete")
    _token: str | None = attrs.field(default=None, alias="_token")
    _token_stamp: object = attrs.field(default=None, alias="_token_stamp")
    generation: int = 0  # bumped whenever the TLS context is rebuilt
    # The PEM bytes of the CA and client certificate files the current context
    # was built from (None: not loaded, or unreadable), read with the context;
    # parsed for their expiry at the first ask, so that cryptography (22 ms of
    # imports, docs/performance.md "Start-up") stays out of kap's start.
    _pems: tuple[bytes | None, bytes | None] = attrs.field(default=(None, None), alias="_pems")
    _not_after: tuple[float | None, float | None] | None = attrs.field(
        default=(None, None), alias="_not_after"
    )

    @property
    def ca_not_after(self) -> float | None:
        """Unix time the earliest certificate of the CA bundle in use expires (None: no CA)."""
        return self._expiries()[0]

    @property
    def client_cert_not_after(self) -> float | None:
        """Unix time the client certificate presented expires (None: none, or unknown)."""
        return self._expiries()[1]

    def _expiries(self) -> tuple[float | None, float | None]:
        if self._not_after is None:
            ca, cert = self._pems
            try:
                self._not_after = (
                    pem_not_after(ca, earliest=True),
                    pem_not_after(cert, earliest=False),
                )
            except (OSError, ImportError) as e:
                # The parser is imported at the first ask; out of file descriptors
                # that import fails. Unknown for now, asked again next time.
                logger.bind(error=str(e)).debug("certificate expiry unknown for now")
                return (None, None)
        return self._not_after

    @property
    def verifies(self) -> bool:
        """The apiservers' certificates are verified (there is a CA file)."""
        return self.files.ca_file is not None

    @property
    def unverified_reason(self) -> str | None:
        """Why kap presents no credentials (None when it presents them)."""
        f = self.files
        if f.token_file is None and (f.cert_file is None or f.key_file is None):
            return NO_CREDENTIALS
        if not self.verifies:
            return NO_CA
        return None

    @property
    def authenticated(self) -> bool:
        """kap presents a token or a client certificate, to verified servers only."""
        return self.unverified_reason is None

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context; rebuilt when the CA or client cert files change."""
        f = self.files
        stamp = (_stamp(f.ca_file), _stamp(f.cert_file), _stamp(f.key_file))
        if self._context is not None and stamp == self._context_stamp:
            return self._context
        self._context_stamp = stamp
        try:
            ctx = build_ssl_context(f)
            probe_ctx = build_ssl_context(f, PROBE_ALPN)
        except _LOAD_ERRORS as e:
            self._not_loaded(e)
            return self._context  # type: ignore[return-value]  # set by _not_loaded
        if self._context is not None:
            logger.bind(generation=self.generation + 1).info("TLS credentials reloaded")
        # As build_ssl_context: the client certificate only with a CA, and with its key.
        presents_cert = f.ca_file is not None and f.key_file is not None
        cert = f.cert_file if presents_cert else None
        self._use(ctx, probe_ctx, complete=True, ca=f.ca_file, cert=cert)
        return ctx

    def probe_ssl_context(self) -> ssl.SSLContext:
        """The probes' context: ``ssl_context()``'s twin that also offers ``h2`` over ALPN."""
        self.ssl_context()
        assert self._probe_context is not None  # set with _context
        return self._probe_context

    def _use(
        self,
        ctx: ssl.SSLContext,
        probe_ctx: ssl.SSLContext,
        *,
        complete: bool,
        ca: str | None,
        cert: str | None,
    ) -> None:
        """Put the contexts in use, built from the CA file ``ca`` and client cert ``cert``."""
        self._context, self._probe_context, self._complete = ctx, probe_ctx, complete
        self.generation += 1
        self._pems = (_read_pem(ca), _read_pem(cert))
        self._not_after = None  # parsed at the first ask

    def _not_loaded(self, e: BaseException) -> None:
        """A file failed: keep the last good context, else the strongest stand-in."""
        log = logger.bind(error=_why(e), origin=self.files.origin)
        if self._complete:
            log.error("cannot load TLS credentials; keeping the previous ones")
            return
        # Never loaded in full: keep verifying what can be verified.
        ca_loads = True
        try:
            ctx = verifying_context(self.files.ca_file)
            probe_ctx = verifying_context(self.files.ca_file, PROBE_ALPN)
        except _LOAD_ERRORS:
            ca_loads = False
        ca = self.files.ca_file if ca_loads else None
        if ca_loads:
            log.error("cannot load the client certificate; kap goes without it until it loads")
        elif self._context is not None:
            log.error("cannot load the CA file; keeping the previous TLS context")
            return
        else:
            ctx = verifying_context(None)
            probe_ctx = verifying_context(None, PROBE_ALPN)
            log.error("cannot load the CA file; no apiserver verifies until it can be loaded")
        self._use(ctx, probe_ctx, complete=False, ca=ca, cert=None)

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
            token = read_token(path)
        except _LOAD_ERRORS as e:
            logger.bind(error=_why(e), path=path).error(
                "cannot read token file; keeping the last one"
            )
            return self._token
        self._token = token
        return token

    def headers(self) -> dict[str, str]:
        """The Authorization header, only when the server is verified against a CA."""
        if not self.verifies:
            return {}
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}
