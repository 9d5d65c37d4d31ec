"""What ``nox -s fleet`` concludes from what the fake apiservers saw: no I/O here.

The rules this module is held to:

* a request is classified by its method and target alone, as kube-apiserver
  would serve it: ``/readyz`` (``/livez``, ``/healthz``) is a probe; an
  EndpointSlice request with ``watch=true`` starts a WATCH; a LIST with a
  ``resourceVersion`` (``0`` or a version with ``NotOlderThan``) is served from
  the watch cache, one without (or with ``Exact``) is a consistent read;
* PINGs are HTTP/2 frames, not requests: counted, shown, never added to the
  requests/s a budget is about;
* rates are per node (one kap) and per apiserver, over the measured window;
* the projection multiplies per-node rates, so it is only as good as the
  window was steady (no fault inside it).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

HEALTH_PATHS = ("/readyz", "/livez", "/healthz")
SLICES_PATH_PART = "/apis/discovery.k8s.io/v1/"

PROBE, PING, LIST_CACHE, LIST_CONSISTENT, WATCH, OTHER = (
    "probe",
    "ping",
    "list_cache",
    "list_consistent",
    "watch",
    "other",
)
KINDS = (PROBE, PING, LIST_CACHE, LIST_CONSISTENT, WATCH, OTHER)
REQUEST_KINDS = tuple(k for k in KINDS if k != PING)
DISCOVERY_KINDS = (LIST_CACHE, LIST_CONSISTENT, WATCH)

# The budgets of issue 11, per node with 3 upstreams in steady state.
BUDGETS = {
    # the original 3 probes a second, plus at most 0.05 for discovery
    "default": 3.05,
    # /readyz every 30 s to 3 upstreams (0.1) plus discovery; PINGs are frames
    "fleet": 0.11,
}

# The projection's cluster: the size kube-apiserver's scalability SLOs are stated for.
NODES = 5000
APISERVERS = 3
# kube-apiserver answers /readyz's etcd checks ("etcd", "etcd-readiness") from
# the last result when asked more often than once per half the check's timeout
# (2 s by default; kubernetes/kubernetes#112046): at most one etcd read per
# check per second, per apiserver, however many probes arrive.
ETCD_CHECK_READS_PER_S = 2.0


def classify(method: str, target: str) -> str:
    """The kind of one request, from its method and target."""
    split = urlsplit(target)
    path = split.path.rstrip("/") or "/"
    if path in HEALTH_PATHS or path.startswith(tuple(p + "/" for p in HEALTH_PATHS)):
        return PROBE
    if method != "GET" or SLICES_PATH_PART not in path or not path.endswith("endpointslices"):
        return OTHER
    query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
    if query.get("watch") in ("true", "1"):
        return WATCH
    if query.get("resourceVersion", "") == "" or query.get("resourceVersionMatch") == "Exact":
        return LIST_CONSISTENT
    return LIST_CACHE


def rates(counts: Mapping[str, int], seconds: float, nodes: int = 1) -> dict[str, float]:
    """Counts per kind as requests/s per node, plus ``requests`` (all but PINGs)."""
    out = {k: counts.get(k, 0) / seconds / nodes for k in KINDS}
    out["requests"] = sum(out[k] for k in REQUEST_KINDS)
    return out


def per_node(
    records: Iterable[tuple[str, str]], nodes: Sequence[str], seconds: float
) -> dict[str, dict[str, float]]:
    """``(node, kind)`` pairs as requests/s per kind for each node (zero if silent)."""
    counts: dict[str, Counter[str]] = {n: Counter() for n in nodes}
    for node, kind in records:
        if node in counts:
            counts[node][kind] += 1
    return {n: rates(c, seconds) for n, c in counts.items()}


def node_summary(by_node: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and max over the nodes, per kind."""
    keys = (*KINDS, "requests")
    rows = list(by_node.values())
    if not rows:
        return {"mean": dict.fromkeys(keys, 0.0), "max": dict.fromkeys(keys, 0.0)}
    return {
        "mean": {k: statistics.fmean(r[k] for r in rows) for k in keys},
        "max": {k: max(r[k] for r in rows) for k in keys},
    }


def spread(offsets: Sequence[float]) -> dict[str, Any]:
    """min/median/p90/max of seconds after an event, and max - min (and the offsets)."""
    if not offsets:
        return {
            "count": 0,
            "min": None,
            "median": None,
            "p90": None,
            "max": None,
            "spread": None,
            "offsets": [],
        }
    xs = sorted(offsets)
    p90 = xs[math.ceil(0.9 * len(xs)) - 1]  # nearest rank: a value that was seen
    return {
        "count": len(xs),
        "min": xs[0],
        "median": statistics.median(xs),
        "p90": p90,
        "max": xs[-1],
        "spread": xs[-1] - xs[0],
        "offsets": xs,
    }


def herd(records: Iterable[tuple[float, str, str]], since: float, until: float) -> dict[str, Any]:
    """The spread of each node's first discovery request after ``since``.

    ``records`` are ``(time, node, kind)``; a node that sent no LIST or WATCH
    in ``[since, until)`` was not in the herd (its watch was elsewhere).
    """
    first: dict[str, float] = {}
    kinds: Counter[str] = Counter()
    for at, node, kind in sorted(records):
        if not since <= at < until or kind not in DISCOVERY_KINDS:
            continue
        kinds[kind] += 1
        first.setdefault(node, at - since)
    return {**spread(list(first.values())), "requests": {k: kinds[k] for k in DISCOVERY_KINDS}}


def project(
    node_rates: Mapping[str, float], nodes: int = NODES, apiservers: int = APISERVERS
) -> dict[str, Any]:
    """Per-node rates scaled to ``nodes`` x ``apiservers`` (the model docs/cost.md states).

    Each node probes every apiserver and keeps its discovery on one, so every
    kind spreads evenly: per apiserver = per node x nodes / apiservers.
    etcd reads: a consistent LIST is one etcd read (a range read of the
    slices before Kubernetes 1.31; since, with ConsistentListFromCache, one
    linearizable read of the current revision); a LIST from the watch cache
    and a WATCH read nothing from etcd; probes cost at most
    ``ETCD_CHECK_READS_PER_S`` per apiserver (rate-limited checks), or, on an
    apiserver without that limit, one read per probe.
    """
    per_apiserver = {k: node_rates.get(k, 0.0) * nodes / apiservers for k in KINDS}
    per_apiserver["requests"] = sum(per_apiserver[k] for k in REQUEST_KINDS)
    probes = node_rates.get(PROBE, 0.0) * nodes
    lists = node_rates.get(LIST_CONSISTENT, 0.0) * nodes
    check_reads = min(probes, ETCD_CHECK_READS_PER_S * apiservers)
    return {
        "nodes": nodes,
        "apiservers": apiservers,
        "per_apiserver": per_apiserver,
        "watch_starts_per_s": node_rates.get(WATCH, 0.0) * nodes,
        "etcd_reads_per_s": lists + check_reads,
        "etcd_reads_per_s_one_per_probe": lists + probes,
    }


def budget(setting: str, mean: Mapping[str, float]) -> dict[str, Any]:
    """Whether a setting's steady-state budget holds, and why not."""
    limit = BUDGETS[setting]
    problems = []
    if mean["requests"] > limit:
        problems.append(f"{mean['requests']:.3f} requests/s per node > {limit}")
    if mean[LIST_CONSISTENT] > 0:
        problems.append("a LIST without a resourceVersion in steady state")
    return {"limit": limit, "holds": not problems, "problems": problems}


# The kap this issue started from, as a model (not measured): a /readyz per
# upstream per second, and every 5 s a consistent LIST and a new WATCH.
ORIGINAL = {PROBE: 3.0, LIST_CONSISTENT: 0.2, WATCH: 0.2}
