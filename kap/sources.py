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
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

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
