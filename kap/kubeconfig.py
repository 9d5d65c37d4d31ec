"""A kubeconfig file -> discovery's credentials and one more seed address.

``--kubeconfig`` (env KUBECONFIG) is the first credential mode of discovery.
The file is parsed with lightkube's ``KubeConfig`` (the contexts, clusters
and users models, and paths relative to the file), with what lightkube does
not give added here:

* ``tls-server-name``: lightkube's cluster model drops it, so it is read from
  the YAML itself; discovery then sends it as SNI and verifies the
  certificate against it.
* inline ``certificate-authority-data``, ``client-certificate-data``,
  ``client-key-data`` and ``token``: kap's credentials are files (so that
  rotation is a file change, see ``kap.credentials``), so inline data is
  written to private temporary files that live as long as the returned
  ``KubeconfigCredentials``.
* the server: only a seed. kap never sends discovery to it directly (it may
  be the ClusterIP Service or a VIP that itself needs kap); it joins the
  pool as source ``kubeconfig`` and is probed like any other upstream.

Exec plugins, auth providers and basic auth are not supported: a node-local
proxy starting before the network must not run programs to log in.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import attrs
import msgspec
import yaml  # type: ignore[import-untyped]
from lightkube import ConfigError, KubeConfig

from kap.address import Address, AddressError
from kap.config import Credentials

# A kubeconfig is a few KiB (a few more with inline certificates).
MAX_FILE_BYTES = 1024 * 1024
HTTPS_PORT = 443  # the port of an https:// server URL without one


class KubeconfigError(ValueError):
    """The file cannot be used; the message says why, in one line."""


@attrs.frozen
class KubeconfigCredentials:
    """What discovery takes from a kubeconfig.

    ``seed`` is None when the server URL is not usable as an upstream (the
    reason is in ``warnings``). ``files`` keeps the temporary files of
    inline data open (they are removed when it is garbage collected).
    """

    credentials: Credentials
    seed: Address | None
    tls_server_name: str | None
    context: str
    warnings: tuple[str, ...] = ()
    files: tuple[IO[bytes], ...] = ()


def server_address(url: str) -> Address:
    """The ``host:port`` of an ``https://`` server URL (port 443 when absent)."""
    try:
        split = urlsplit(url.strip())
        port = split.port
    except ValueError as e:
        raise AddressError(f"server {url!r}: {e}") from None
    if split.scheme != "https" or not split.hostname:
        raise AddressError(f"server {url!r} is not an https:// URL")
    host = split.hostname
    text = f"[{host}]" if ":" in host else host
    return Address.parse(f"{text}:{port or HTTPS_PORT}")


def _inline(data: bytes, what: str) -> IO[bytes]:
    fh = tempfile.NamedTemporaryFile(prefix=f"kap-kubeconfig-{what}-")  # noqa: SIM115 -- kept open on purpose
    fh.write(data)
    fh.flush()
    return fh


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KubeconfigError(f"{what} is not base64") from None


def _named(doc: dict[str, Any], section: str, name: str | None, key: str) -> dict[str, Any]:
    """The raw ``section[name].key`` mapping (for the fields lightkube drops)."""
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            inner = entry.get(key)
            return inner if isinstance(inner, dict) else {}
    return {}


def load(path: str) -> KubeconfigCredentials:
    """Parse the kubeconfig at ``path`` (its current context, else its only one).

    Raises:
      KubeconfigError: unreadable, not YAML, not a kubeconfig, no usable
        context, or no credentials kap can use.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise KubeconfigError(f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KubeconfigError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise KubeconfigError(f"not YAML: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError("not a kubeconfig (expected a mapping)")
    try:
        kc = KubeConfig.from_dict(doc, fname=Path(path).resolve())
        context = kc.current_context
        if context is None and len(kc.contexts) == 1:
            context = next(iter(kc.contexts))
        single = kc.get(context)
    except (ConfigError, KeyError, TypeError, ValueError, msgspec.MsgspecError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise KubeconfigError(f"not a usable kubeconfig: {' '.join(why.split())[:200]}") from None
    assert single is not None
    cluster, user = single.cluster, single.user
    raw_cluster = _named(doc, "clusters", single.context.cluster, "cluster")
    tls_server_name = raw_cluster.get("tls-server-name")
    warnings: list[str] = []
    files: list[IO[bytes]] = []

    def path_of(value: str) -> str:
        return str(single.abs_file(value))

    ca_file: str | None = None
    if cluster.certificate_auth_data:
        ca_data = _b64(cluster.certificate_auth_data, "certificate-authority-data")
        files.append(_inline(ca_data, "ca"))
        ca_file = files[-1].name
    elif cluster.certificate_auth:
        ca_file = path_of(cluster.certificate_auth)
    elif cluster.insecure:
        warnings.append("kubeconfig sets insecure-skip-tls-verify: the apiserver is not verified")

    cert_file = key_file = token_file = None
    if user is not None:
        if user.client_cert_data:
            files.append(_inline(_b64(user.client_cert_data, "client-certificate-data"), "cert"))
            cert_file = files[-1].name
        elif user.client_cert:
            cert_file = path_of(user.client_cert)
        if user.client_key_data:
            files.append(_inline(_b64(user.client_key_data, "client-key-data"), "key"))
            key_file = files[-1].name
        elif user.client_key:
            key_file = path_of(user.client_key)
        if user.token_file:
            token_file = path_of(user.token_file)
        elif user.token:
            files.append(_inline(user.token.strip().encode(), "token"))
            token_file = files[-1].name
        unsupported = [
            what
            for what, present in (
                ("exec", user.exec),
                ("auth-provider", user.auth_provider),
                ("username/password", user.username or user.password),
            )
            if present
        ]
        if unsupported:
            warnings.append(f"kubeconfig user {', '.join(unsupported)} is not supported; ignored")
    if (cert_file is None) != (key_file is None):
        raise KubeconfigError("a client certificate needs its key (and a key its certificate)")
    if cert_file is None and token_file is None:
        raise KubeconfigError(
            f"context {single.context_name!r} has no client certificate or token kap can use"
        )
    seed: Address | None = None
    try:
        seed = server_address(cluster.server)
    except AddressError as e:
        warnings.append(f"kubeconfig server not used as a seed: {e}")
    return KubeconfigCredentials(
        credentials=Credentials(
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token_file=token_file,
            origin="kubeconfig",
        ),
        seed=seed,
        tls_server_name=tls_server_name if isinstance(tls_server_name, str) else None,
        context=single.context_name,
        warnings=tuple(warnings),
        files=tuple(files),
    )
