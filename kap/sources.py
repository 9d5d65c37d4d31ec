"""Where kap's credentials come from: one resolved set for the probes and discovery.

Pure logic. Each credential field is taken from the first source that has it,
in kubectl's order of precedence:

1. explicit flags: ``--ca-file``, ``--cert-file``/``--key-file``, ``--token-file``;
2. the kubeconfig (``--kubeconfig``, env ``KUBECONFIG``);
3. the static-pod files in ``--static-pod-dir`` (``--as-static-pod``):
   ``ca.crt``, ``cl.crt``, ``cl.key``;
4. the Pod's ServiceAccount files: ``ca.crt`` and ``token``.

The fields are the CA file, the client certificate with its key (a pair: both
come from one source), and the token file. ``Credentials.origin`` names the
source of each (``kubeconfig`` when one source gave everything, else
``ca=flags,token=serviceaccount``), for the start-up log and /upstreams.

What the disk says (is a file readable, does it load, what is in a
kubeconfig) comes in as functions, from ``kap.cli`` through ``kap.config``;
only the kubeconfig reader has a default, ``kap.kubeconfig.load_paths``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from kap.kubeconfig import KubeconfigCredentials

# Where kubelet mounts a Pod's ServiceAccount credentials.
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where the seed's static pod manifest mounts kap's CA and client certificate.
STATIC_POD_DIR = "/var/run/kubernetes.io/kap"

FLAGS = "flags"
KUBECONFIG = "kubeconfig"
STATIC_POD = "static-pod"
SERVICEACCOUNT = "serviceaccount"

# field -> the Credentials attributes it is made of (taken together)
FIELDS: dict[str, tuple[str, ...]] = {
    "ca": ("ca_file",),
    "cert": ("cert_file", "key_file"),
    "token": ("token_file",),
}


@attrs.frozen
class Credentials:
    """Files that authenticate kap to the apiservers (probes and discovery).

    ``origin`` says where they came from, for the start-up log line.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None
    origin: str = "none"


def static_pod_files(directory: str) -> Credentials:
    return Credentials(
        ca_file=f"{directory}/ca.crt",
        cert_file=f"{directory}/cl.crt",
        key_file=f"{directory}/cl.key",
        origin=STATIC_POD,
    )


def serviceaccount_files(directory: str = SERVICEACCOUNT_DIR) -> Credentials:
    return Credentials(
        ca_file=f"{directory}/ca.crt", token_file=f"{directory}/token", origin=SERVICEACCOUNT
    )


def resolve(layers: Sequence[Credentials]) -> tuple[Credentials, dict[str, str]]:
    """Each field from the first layer that has it (layers in precedence order).

    Returns the resolved credentials and field -> source (each layer's ``origin``).
    """
    chosen: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for field, attributes in FIELDS.items():
        for layer in layers:
            values = [getattr(layer, a) for a in attributes]
            if all(v is not None for v in values):
                chosen.update(zip(attributes, values, strict=True))
                sources[field] = layer.origin
                break
    return Credentials(origin=describe(sources), **chosen), sources


def describe(sources: dict[str, str]) -> str:
    """``none``, the one source, or ``field=source`` for each field."""
    names = set(sources.values())
    if not names:
        return "none"
    if len(names) == 1:
        return names.pop()
    return ",".join(f"{field}={source}" for field, source in sources.items())


def load_kubeconfig_option(
    text: str | None,
    absolute: Callable[[str], str],
    load: Callable[[list[str]], KubeconfigCredentials] | None,
    bad: Callable[[str, str], None],
) -> KubeconfigCredentials | None:
    """The kubeconfig(s) named by ``--kubeconfig``/``KUBECONFIG`` (a:b, first wins)."""
    if text is None or not text.strip():
        return None
    from kap.kubeconfig import KubeconfigError, load_paths, split_paths

    paths = [absolute(p) for p in split_paths(text)]
    try:
        return (load or load_paths)(paths)
    except KubeconfigError as e:
        bad("kubeconfig", str(e))
        return None


# What a credential field is called in an error line about a kubeconfig.
_FIELD_NAMES = {"ca": "CA", "cert": "client certificate/key", "token": "token"}
_FIELD_FLAGS = {"ca": "ca_file", "cert": "cert_file", "token": "token_file"}


def resolve_files(
    explicit: Credentials,
    kubeconfig: KubeconfigCredentials | None,
    *,
    as_static_pod: bool,
    static_pod_dir: str,
    kubeconfig_text: str | None,
    readable: Callable[[str], str | None],
    check: Callable[[Credentials], Mapping[str, str]] | None,
    bad: Callable[[str, str], None],
    warnings: list[str],
) -> Credentials:
    """One resolved set of credential files, in the precedence above.

    Problems with a file go to ``bad(option name, why)`` (a start-up error)
    or to ``warnings``.

    A file from the flags or the kubeconfig that does not load is a start-up
    error. The default files are used only when readable: a ServiceAccount
    file that is not there is skipped silently, a static-pod CA with a
    warning. The static-pod client certificate is kept even when it is not
    there yet: ``CredentialFiles`` logs it once and uses it when it appears.
    """
    layers = _layers(explicit, kubeconfig, as_static_pod, static_pod_dir, readable, warnings)
    creds, sources = resolve(layers)
    if check is None:
        return creds
    drop = _unloadable(
        creds, sources, check(creds), kubeconfig_text=kubeconfig_text, bad=bad, warnings=warnings
    )
    if drop:
        creds, _ = resolve([attrs.evolve(layer, **drop) for layer in layers])
    return creds


def _layers(
    explicit: Credentials,
    kubeconfig: KubeconfigCredentials | None,
    as_static_pod: bool,
    static_pod_dir: str,
    readable: Callable[[str], str | None],
    warnings: list[str],
) -> list[Credentials]:
    """The sources in precedence order, the default files only where readable."""
    layers = [explicit]
    if kubeconfig is not None:
        layers.append(kubeconfig.credentials)
    if as_static_pod:
        static = static_pod_files(static_pod_dir)
        ca = static.ca_file
        if ca is not None and (why := readable(ca)) is not None:
            warnings.append(f"static-pod mode: {ca} is not readable ({why}); going without it")
            static = attrs.evolve(static, ca_file=None)
        layers.append(static)
    account = serviceaccount_files(SERVICEACCOUNT_DIR)
    unreadable: dict[str, Any] = {
        n: None for n in ("ca_file", "token_file") if readable(getattr(account, n)) is not None
    }
    layers.append(attrs.evolve(account, **unreadable))
    return layers


def _unloadable(
    creds: Credentials,
    sources: dict[str, str],
    problems: Mapping[str, str],
    *,
    kubeconfig_text: str | None,
    bad: Callable[[str, str], None],
    warnings: list[str],
) -> dict[str, Any]:
    """Report the files that do not load, by source; return the attributes to go without."""
    drop: dict[str, Any] = {}
    for field, source in sources.items():
        why = problems.get(_FIELD_FLAGS[field])
        if why is None:
            continue
        attributes = ("cert_file", "key_file") if field == "cert" else (_FIELD_FLAGS[field],)
        paths = " ".join(repr(getattr(creds, a)) for a in attributes)
        if source == FLAGS:
            bad(_FIELD_FLAGS[field], f"{paths}: {why}")
        elif source == KUBECONFIG:
            bad("kubeconfig", f"{kubeconfig_text!r}: its {_FIELD_NAMES[field]} {paths}: {why}")
        elif source == STATIC_POD and field == "cert":
            pass  # CredentialFiles says it once, and picks the files up when they are good
        else:
            who = "static-pod mode" if source == STATIC_POD else "ServiceAccount"
            warnings.append(f"{who}: {paths} cannot be used ({why}); going without it")
            drop.update(dict.fromkeys(attributes))
    return drop
