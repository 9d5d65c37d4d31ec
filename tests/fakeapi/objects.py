"""What the fake serves, as kube-apiserver encodes it: EndpointSlices, Status, bookmarks.

Plain dicts built by pure functions; tests build their slices (and garbage)
with them, the store keeps them, and the list/watch handlers send them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

GROUP = "discovery.k8s.io"
GROUP_VERSION = "discovery.k8s.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def endpoint_slice(
    name: str,
    endpoints: Iterable[tuple[str, bool]],
    *,
    ports: Iterable[tuple[str | None, int]] = (("https", 6443),),
    service: str = "kubernetes",
    namespace: str = "default",
    address_type: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice dict as kube-apiserver serves it for ``default/kubernetes``.

    Args:
      endpoints: ``(ip, ready)`` pairs, one endpoint each.
      ports: ``(name, port)`` pairs; a ``None`` name leaves the port unnamed.
      address_type: ``IPv4``/``IPv6``; guessed from the first address when unset.
    """
    endpoints = list(endpoints)
    if address_type is None:
        first = endpoints[0][0] if endpoints else "0.0.0.0"
        address_type = f"IPv{ipaddress.ip_address(first).version}"
    port_list = []
    for port_name, port in ports:
        entry: dict[str, Any] = {"protocol": "TCP", "port": port}
        if port_name is not None:
            entry["name"] = port_name
        port_list.append(entry)
    return {
        "kind": "EndpointSlice",
        "apiVersion": GROUP_VERSION,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": address_type,
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints
        ],
        "ports": port_list,
    }


def garbage_slices(name_prefix: str = "bad") -> list[Any]:
    """Invalid items, each labelled so a label-selected list still returns it.

    Every one of them must be skipped (and logged) by kap's parser without
    losing the valid items around it.
    """
    labels = {SERVICE_NAME_LABEL: "kubernetes"}

    def meta(suffix: str) -> dict[str, Any]:
        return {"name": f"{name_prefix}-{suffix}", "namespace": "default", "labels": labels}

    return [
        {"kind": "EndpointSlice", "metadata": meta("no-fields")},
        {"metadata": meta("wrong-types"), "addressType": 4, "endpoints": "10.0.0.1", "ports": 6443},
        {
            "metadata": meta("bad-endpoint"),
            "addressType": "IPv4",
            "endpoints": [{"addresses": [12345]}, None, {"conditions": "yes"}],
            "ports": [{"name": "https", "port": "https"}],
        },
        {
            "metadata": meta("bad-address"),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["not-an-ip", "999.1.1.1"]}],
            "ports": [{"name": "https", "port": 70000}],
        },
        {
            "metadata": meta("huge"),
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"]}
                for i in range(20000)
            ],
            "ports": [{"name": "https", "port": 6443}],
        },
        "not an object",
        None,
    ]


def labels_of(obj: Any) -> dict[str, str] | None:
    """An object's labels, or None when the object is too broken to have any."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    labels = obj["metadata"].get("labels")
    return labels if isinstance(labels, dict) else {}


def name_of(obj: Any) -> tuple[str, str]:
    meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    return meta.get("namespace", "default"), meta.get("name", "")


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A ``meta/v1`` Status, the body kube-apiserver sends with every error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def bookmark(rv: int) -> dict[str, Any]:
    """A BOOKMARK object as kube-apiserver encodes an empty EndpointSlice."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": GROUP_VERSION,
        "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
        "addressType": "",
        "endpoints": None,
    }


def discovery_document(path: str, address: tuple[str, int] | None) -> dict[str, Any] | None:
    """Legacy (unaggregated) discovery, just enough for kubectl to find endpointslices."""
    assert address is not None
    host, port = address
    server_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    group_version = {"groupVersion": GROUP_VERSION, "version": "v1"}
    docs: dict[str, dict[str, Any]] = {
        "/version": {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0-fake",
            "platform": "linux/amd64",
        },
        "/api": {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
            ],
        },
        "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": []},
        "/apis": {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": GROUP,
                    "versions": [group_version],
                    "preferredVersion": group_version,
                }
            ],
        },
        f"/apis/{GROUP}": {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": GROUP,
            "versions": [group_version],
            "preferredVersion": group_version,
        },
        f"/apis/{GROUP_VERSION}": {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": GROUP_VERSION,
            "resources": [
                {
                    "name": "endpointslices",
                    "singularName": "endpointslice",
                    "namespaced": True,
                    "kind": "EndpointSlice",
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    }
    return docs.get(path)


# -- EndpointSlices --------------------------------------------------------
