"""A kubeconfig -> kap's credentials, tls-server-name and one more seed address.

``--kubeconfig`` (env KUBECONFIG) gives kap's probes and discovery their
credentials, field by field below the explicit flags (see
``kap.config.resolve_credentials``); it is read once at start. As kubectl
does, ``KUBECONFIG`` may list several files separated by ``:``: they are
merged with the first file winning (the first ``current-context``, the first
cluster, user or context of each name); listed files that do not exist are
skipped, as long as one does. Each file's relative paths are taken against
that file's own directory. The merged document is parsed with lightkube's
``KubeConfig`` (the contexts, clusters and users models), with what lightkube
does not give added here:

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
import os
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import attrs
import msgspec
import yaml  # type: ignore[import-untyped]
from lightkube import ConfigError, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.config.models import User

from kap.address import Address, AddressError
from kap.files import read_regular
from kap.sources import Credentials

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


# The fields of a kubeconfig that hold file paths (relative = to the file's directory).
_PATH_FIELDS = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
}
_NAMED_LISTS = ("clusters", "users", "contexts")


def _read_doc(path: str) -> dict[str, Any]:
    try:
        data = read_regular(path, MAX_FILE_BYTES + 1)
    except OSError as e:
        raise KubeconfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise KubeconfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise KubeconfigError(f"{path}: not YAML: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig (expected a mapping)")
    _absolute_paths(doc, Path(os.path.abspath(path)).parent)
    return doc


def _absolute_paths(doc: dict[str, Any], base: Path) -> None:
    """Make the file's relative paths absolute against ``base``, in place (as kubectl)."""
    for section, (inner, keys) in _PATH_FIELDS.items():
        entries = doc.get(section)
        for entry in entries if isinstance(entries, list) else ():
            fields = entry.get(inner) if isinstance(entry, dict) else None
            if not isinstance(fields, dict):
                continue
            for key in keys:
                value = fields.get(key)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    fields[key] = str(base / value)


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """kubectl's merge of several kubeconfigs: the first file to set a key wins.

    Named lists (clusters, users, contexts) are merged by name, the first
    entry of a name winning; every other key is taken from the first file
    that has it.
    """
    merged: dict[str, Any] = {}
    for doc in docs:
        for key, value in doc.items():
            if key in _NAMED_LISTS:
                have = merged.setdefault(key, [])
                if not isinstance(have, list) or not isinstance(value, list):
                    continue
                names = {e.get("name") for e in have if isinstance(e, dict)}
                for entry in value:
                    if isinstance(entry, dict) and entry.get("name") not in names:
                        have.append(entry)
                        names.add(entry.get("name"))
            elif key not in merged or merged[key] in (None, ""):
                merged[key] = value
    return merged


def split_paths(text: str) -> list[str]:
    """The files of a ``KUBECONFIG``-style list (``:``-separated; empty items skipped)."""
    return [p for p in text.split(":") if p.strip()]


def load_paths(paths: list[str]) -> KubeconfigCredentials:
    """Merge and parse the kubeconfigs at ``paths`` (absolute, in precedence order).

    One path must exist; of several, missing ones are skipped (as kubectl).

    Raises:
      KubeconfigError: as ``load``.
    """
    if not paths:
        raise KubeconfigError("no file given")
    docs: list[dict[str, Any]] = []
    missing: list[str] = []
    for path in paths:
        if len(paths) > 1 and not os.path.exists(path):
            missing.append(path)
            continue
        docs.append(_read_doc(path))
    if not docs:
        raise KubeconfigError(f"none of the files exists: {', '.join(missing)}")
    return _parse(merge(docs), paths[0])


def load(path: str) -> KubeconfigCredentials:
    """Parse the kubeconfig at ``path`` (its current context, else its only one).

    Raises:
      KubeconfigError: unreadable, not YAML, not a kubeconfig, no usable
        context, or no credentials kap can use.
    """
    return _parse(_read_doc(path), path)


def _parse(doc: dict[str, Any], path: str) -> KubeconfigCredentials:
    """The credentials of ``doc``'s current context (else its only one); see ``load``."""
    single = _context(doc, path)
    cluster, user = single.cluster, single.user
    raw_cluster = _named(doc, "clusters", single.context.cluster, "cluster")
    tls_server_name = raw_cluster.get("tls-server-name")
    warnings: list[str] = []
    where = _Files(single)
    ca_file = where.either(
        cluster.certificate_auth_data, cluster.certificate_auth, "certificate-authority-data"
    )
    if ca_file is None and cluster.insecure:
        warnings.append("kubeconfig sets insecure-skip-tls-verify: the apiserver is not verified")
    cert_file = key_file = token_file = None
    if user is not None:
        cert_file, key_file, token_file = _user_files(user, where, warnings)
    if (cert_file is None) != (key_file is None):
        raise KubeconfigError("a client certificate needs its key (and a key its certificate)")
    if cert_file is None and token_file is None:
        raise KubeconfigError(
            f"context {single.context_name!r} has no client certificate or token kap can use"
        )
    return KubeconfigCredentials(
        credentials=Credentials(
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token_file=token_file,
            origin="kubeconfig",
        ),
        seed=_seed(cluster.server, warnings),
        tls_server_name=tls_server_name if isinstance(tls_server_name, str) else None,
        context=single.context_name,
        warnings=tuple(warnings),
        files=tuple(where.files),
    )


def _context(doc: dict[str, Any], path: str) -> SingleConfig:
    """lightkube's view of the current context, or the only one; one line when unusable."""
    try:
        kc = KubeConfig.from_dict(doc, fname=Path(path).resolve())
        context = kc.current_context
        if context is None and len(kc.contexts) == 1:
            context = next(iter(kc.contexts))
        single = kc.get(context)
    except (ConfigError, KeyError, TypeError, ValueError, msgspec.MsgspecError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else str(e)
        why = " ".join(why.split())[:200]
        raise KubeconfigError(f"{path}: not a usable kubeconfig: {why}") from None
    assert single is not None
    return single


@attrs.define
class _Files:
    """Where a context's credentials are: paths made absolute, inline data in kept temp files."""

    single: SingleConfig
    files: list[IO[bytes]] = attrs.field(factory=list)

    def inline(self, content: bytes, field: str) -> str:
        self.files.append(_inline(content, field))
        return self.files[-1].name

    def path(self, file: str) -> str:
        return str(self.single.abs_file(file))

    def either(self, data: str | None, file: str | None, field: str) -> str | None:
        """Inline base64 ``data`` if given, else ``file``, else None."""
        if data:
            return self.inline(_b64(data, field), field)
        return self.path(file) if file else None


def _user_files(user: User, where: _Files, warnings: list[str]) -> tuple[str | None, ...]:
    """The user's client certificate, key and token files; what kap cannot use, warned."""
    cert_file = where.either(user.client_cert_data, user.client_cert, "client-certificate-data")
    key_file = where.either(user.client_key_data, user.client_key, "client-key-data")
    token_file = None
    if user.token_file:
        token_file = where.path(user.token_file)
    elif user.token:
        token_file = where.inline(user.token.strip().encode(), "token")
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
    return cert_file, key_file, token_file


def _seed(server: str, warnings: list[str]) -> Address | None:
    """The cluster's server as a starting upstream, or None with a warning why not."""
    try:
        return server_address(server)
    except AddressError as e:
        warnings.append(f"kubeconfig server not used as a seed: {e}")
        return None
