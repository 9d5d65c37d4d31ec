"""kap's Grafana dashboard, as a table of rows and panels (hack/gen-monitoring.py writes it).

Written as code so the panels stay laid out on Grafana's grid, every query
filters on the dashboard's variables (data source, kap = node, apiserver),
and the list of queries a test runs can be derived from it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

# The label podmonitor.yaml gives kap's targets; the rules select on it too.
JOB = 'job="kap"'
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide


@attrs.frozen
class Target:
    expr: str
    legend: str


@attrs.frozen
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8


@attrs.frozen
class Row:
    title: str
    panels: tuple[Panel, ...]


def one(title: str, description: str, expr: str, legend: str, **kw: Any) -> Panel:
    return Panel(title, description, (Target(expr, legend),), **kw)


NODE = f'{JOB}, instance=~"$instance"'
UPSTREAM = f'{JOB}, instance=~"$instance", upstream=~"$upstream"'
PER_UPSTREAM = "{{instance}} → {{upstream}}"
PER_NODE = "{{instance}}"


def rate(metric: str, selector: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval]))"


def quantile(q: float) -> Target:
    expr = (
        f"histogram_quantile({q}, sum by (instance, upstream, le) "
        f"(rate(kap_upstream_probe_duration_seconds_bucket{{{UPSTREAM}}}[$__rate_interval])))"
    )
    return Target(expr, f"p{round(q * 100)} {PER_UPSTREAM}")


ROWS = (
    Row(
        "Overview",
        (
            Panel(
                "kaps scraped",
                "kap targets Prometheus scrapes, and how many of them answer (KapDown).",
                (
                    Target(f"count(up{{{NODE}}})", "targets"),
                    Target(f"sum(up{{{NODE}}})", "up"),
                ),
                kind="stat",
                width=4,
                height=6,
            ),
            one(
                "Apiservers usable, fraction of kaps",
                "For each apiserver, the share of kaps that can use it "
                "(recording rule upstream:kap_upstream_healthy:avg; KapUpstreamDown below 0.5).",
                'upstream:kap_upstream_healthy:avg{upstream=~"$upstream"}',
                "{{upstream}}",
                unit="percentunit",
                width=10,
                height=6,
            ),
            one(
                "Usable apiservers per kap",
                "kap_upstreams_healthy: 0 is KapNoHealthyUpstream, 1 of several "
                "KapDegradedRedundancy.",
                f"kap_upstreams_healthy{{{NODE}}}",
                PER_NODE,
                width=10,
                height=6,
            ),
        ),
    ),
    Row(
        "Upstreams: health and latency (per node and apiserver)",
        (
            one(
                "Usable",
                "1 when the apiserver is usable for new connections from that node's kap.",
                f"kap_upstream_healthy{{{UPSTREAM}}}",
                PER_UPSTREAM,
                width=8,
            ),
            one(
                "Score",
                "Health score -3..3; usable at 0 and above.",
                f"kap_upstream_score{{{UPSTREAM}}}",
                PER_UPSTREAM,
                width=8,
            ),
            one(
                "Latency tier",
                "0..5 by decade of probe latency (100us, 1ms, 10ms, 100ms, 1s); "
                "-1 before the first successful probe. Clients go to the lowest tier.",
                f"kap_upstream_tier{{{UPSTREAM}}}",
                PER_UPSTREAM,
                width=8,
            ),
            Panel(
                "Probe duration",
                "Whole /readyz probe, median and 99th percentile.",
                (quantile(0.5), quantile(0.99)),
                unit="s",
            ),
            one(
                "Probe results",
                "Probe answers per second by result: ok, refused (401/403 to "
                "kap's credentials: KapCredentialsRefused), unauthenticated (kap "
                "presented none on purpose), not_ready, timeout, error.",
                rate(
                    "kap_upstream_probe_results_total",
                    UPSTREAM,
                    "instance, upstream, result",
                ),
                PER_UPSTREAM + " {{result}}",
                unit="reqps",
            ),
            one(
                "HTTP/2 PINGs",
                "PINGs per second by result (ok, timeout, error): the checks between two "
                "/readyz with --readiness-interval longer than --health-interval.",
                rate("kap_upstream_pings_total", UPSTREAM, "instance, upstream, result"),
                PER_UPSTREAM + " {{result}}",
                unit="reqps",
            ),
            one(
                "Transitions in 30 minutes",
                "Changes between usable and unusable; above 6 is KapUpstreamFlapping.",
                "sum by (instance, upstream) "
                f"(increase(kap_upstream_transitions_total{{{UPSTREAM}}}[30m]))",
                PER_UPSTREAM,
            ),
            one(
                "Probe failures",
                "Failed /readyz probes per second.",
                rate("kap_upstream_probe_failures_total", UPSTREAM, "instance, upstream"),
                PER_UPSTREAM,
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Connections and bytes",
        (
            one(
                "Open connections per apiserver",
                "Client connections open to each apiserver.",
                f"kap_upstream_active_connections{{{UPSTREAM}}}",
                PER_UPSTREAM,
            ),
            one(
                "Connections relayed per apiserver",
                "New client connections per second relayed to each apiserver.",
                rate("kap_upstream_connections_total", UPSTREAM, "instance, upstream"),
                PER_UPSTREAM,
                unit="cps",
            ),
            Panel(
                "Clients per kap",
                "Accepted, served after a failover, closed unanswered by an "
                "upstream (passive failures), and refused because no candidate "
                "answered (KapClientsRefused), per second.",
                (
                    Target(
                        rate("kap_connections_accepted_total", NODE, "instance"),
                        "accepted {{instance}}",
                    ),
                    Target(
                        rate("kap_connections_failover_total", NODE, "instance"),
                        "failover {{instance}}",
                    ),
                    Target(
                        rate("kap_connections_passive_failures_total", NODE, "instance"),
                        "passive failure {{instance}}",
                    ),
                    Target(
                        rate("kap_connections_no_upstream_total", NODE, "instance"),
                        "refused {{instance}}",
                    ),
                ),
                unit="cps",
            ),
            one(
                "Open connections per kap",
                "Client connections open on each node's kap.",
                f"kap_connections_active{{{NODE}}}",
                PER_NODE,
            ),
            one(
                "Dial failures",
                "Failed client dials per second to each apiserver (kap then tries the next).",
                rate("kap_upstream_dial_failures_total", UPSTREAM, "instance, upstream"),
                PER_UPSTREAM,
                unit="cps",
            ),
            one(
                "Bytes relayed",
                "Bytes per second, up = client to apiserver.",
                rate("kap_bytes_total", NODE, "instance, direction"),
                "{{direction}} {{instance}}",
                unit="Bps",
            ),
        ),
    ),
    Row(
        "Discovery and credentials",
        (
            one(
                "Discovery up",
                "1 while the last EndpointSlice list or watch succeeded "
                "(KapDiscoveryFailing at 0); no series when discovery is off.",
                f"kap_discovery_up{{{NODE}}}",
                PER_NODE,
                width=8,
            ),
            one(
                "Since the last successful discovery",
                "Seconds since the last successful list or watch event.",
                f"time() - kap_discovery_last_success_timestamp_seconds{{{NODE}}}",
                PER_NODE,
                unit="s",
                width=8,
            ),
            one(
                "Discovery errors",
                "Failed EndpointSlice lists and watches per second.",
                rate("kap_discovery_errors_total", NODE, "instance"),
                PER_NODE,
                unit="reqps",
                width=8,
            ),
            one(
                "Client certificate expires in",
                "Of the certificate the running kap presents "
                "(KapClientCertificateExpiringSoon under 7 days, KapClientCertificateExpiring "
                "under 1).",
                f"kap_client_certificate_expiry_timestamp_seconds{{{NODE}}} - time()",
                PER_NODE,
                unit="s",
            ),
            one(
                "CA certificate expires in",
                "Of the CA kap verifies the apiservers against.",
                f"kap_ca_certificate_expiry_timestamp_seconds{{{NODE}}} - time()",
                PER_NODE,
                unit="s",
            ),
        ),
    ),
    Row(
        "Process",
        (
            one(
                "Resident memory",
                "kap's resident set size.",
                f"process_resident_memory_bytes{{{NODE}}}",
                PER_NODE,
                unit="bytes",
                width=8,
            ),
            one(
                "File descriptors used",
                "Open descriptors over the limit (KapFileDescriptorsNearLimit above 80%).",
                f"process_open_fds{{{NODE}}} / process_max_fds{{{NODE}}}",
                PER_NODE,
                unit="percentunit",
                width=8,
            ),
            one(
                "CPU",
                "CPU seconds per second.",
                rate("process_cpu_seconds_total", NODE, "instance"),
                PER_NODE,
                width=8,
            ),
            one(
                "Versions",
                "kap_build_info: version, revision and Python of each kap.",
                f"kap_build_info{{{NODE}}}",
                "{{instance}} {{version}} {{revision}} {{python}}",
                kind="table",
                width=24,
                height=6,
            ),
        ),
    ),
)


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time range change: nodes come and go
        "includeAll": True,
        "multi": True,
        "allValue": ".+",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


TEMPLATING = [
    {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    },
    variable("instance", "kap (node)", f"label_values(kap_upstreams{{{JOB}}}, instance)"),
    variable(
        "upstream",
        "Apiserver",
        f'label_values(kap_upstream_healthy{{{JOB}, instance=~"$instance"}}, upstream)',
    ),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": t.expr,
            "legendFormat": t.legend,
            "refId": chr(ord("A") + i),
            **({"format": "table", "instant": True} if panel.kind == "table" else {}),
        }
        for i, t in enumerate(panel.targets)
    ]
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "table":
        out["transformations"] = [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ]
    return out


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y = panel_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "title": "kap",
        "uid": "kap-mixin",
        "description": "kap, the node-local load balancer for the Kubernetes API servers: "
        "each node's kap and each apiserver as kap sees it.",
        "tags": ["kap", "kubernetes"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": TEMPLATING},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"
