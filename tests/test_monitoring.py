"""deploy/monitoring/, kap's monitoring mixin, checked offline.

- The rules: ``promtool check rules`` and ``promtool test rules`` with
  deploy/monitoring/tests/kap.rules.test.yaml, which must have, for every
  alert, a case where it fires and one where it stays quiet. Every alert has a
  severity, summary, description, a ``for:`` whose comment says why, and a
  runbook_url pointing at its own section of docs/runbooks.md in the
  repository named by pyproject's [project.urls] Source.
- The generated files (prometheusrule.yaml, kap-dashboard.json,
  tests/dashboard-queries.yaml) are what hack/gen-monitoring.py writes.
- prometheusrule.yaml and podmonitor.yaml validate against prometheus-operator's
  schemas (tests/data/prometheus-operator, from a PyPI package, see
  hack/vendor-prometheus-operator-schemas.py) with no unknown field allowed,
  as tests/test_deploy.py does for the other manifests; the PodMonitor selects
  the pods of deploy/daemonset.yaml and deploy/static-pod.yaml on their health
  port and names the job the rules select.
- The dashboard: every panel filters on the dashboard's variables, every query
  passes promtool's parser, and every metric the rules and the dashboard read is
  one kap documents (the /metrics table) or one issue 12 adds (PENDING below).

promtool is Debian's, unpacked by hack/install-prometheus.sh (.ci/run runs it;
so does the fixture here when promtool is missing). The tests that need it
skip, saying why, only when it cannot be installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "kap.rules.yaml"
RULES_TEST = MONITORING / "tests" / "kap.rules.test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
PODMONITOR = MONITORING / "podmonitor.yaml"
DASHBOARD = MONITORING / "kap-dashboard.json"
QUERIES = MONITORING / "tests" / "dashboard-queries.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
SCHEMAS = Path(__file__).resolve().parent / "data" / "prometheus-operator"
INSTALL = REPO / "hack" / "install-prometheus.sh"
GENERATE = REPO / "hack" / "gen-monitoring.py"

# The alerts issue 12 asks for, with their severity where it names one.
REQUIRED_ALERTS = {
    "KapNoHealthyUpstream": "critical",
    "KapClientsRefused": None,
    "KapUpstreamDown": None,
    "KapDegradedRedundancy": None,
    "KapDiscoveryFailing": None,
    "KapCredentialsRefused": None,
    "KapClientCertificateExpiringSoon": "warning",
    "KapClientCertificateExpiring": "critical",
    "KapUpstreamFlapping": None,
    "KapDown": None,
    "KapFileDescriptorsNearLimit": None,
}

# Metrics issue 12 adds to kap (section 3) that kap does not export yet; the
# rules and the dashboard use them by these names. Remove each from here when
# kap exports it and the /metrics table (README.md or docs/) lists it.
PENDING: set[str] = set()

# What the dashboard must show (issue 12: health, tiers, latency, connections,
# bytes, probe results, discovery, certificate expiry, process memory/fds).
DASHBOARD_MUST_SHOW = {
    "kap_upstream_healthy",
    "kap_upstream_tier",
    "kap_upstream_probe_duration_seconds_bucket",
    "kap_upstream_active_connections",
    "kap_connections_accepted_total",
    "kap_bytes_total",
    "kap_upstream_probe_results_total",
    "kap_discovery_up",
    "kap_client_certificate_expiry_timestamp_seconds",
    "process_resident_memory_bytes",
    "process_open_fds",
}

Obj = dict[str, Any]


# --- promtool --------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    on_path = shutil.which("promtool")
    if on_path is not None:
        return on_path
    done = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"promtool is not installable here (hack/install-prometheus.sh: {reason})")
    return str(Path(done.stdout.strip()) / "promtool")


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_rules_pass_promtool_check(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_rules_unit_tests_pass(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in out


def test_the_operator_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    plain = tmp_path / "rules.yaml"
    plain.write_text(yaml.safe_dump(spec))
    run_promtool(promtool, "check", "rules", str(plain))


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    queries = yaml.safe_load(QUERIES.read_text())
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": q["query"]} for i, q in enumerate(queries)
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_install_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(
        [shellcheck, "--severity=style", str(INSTALL)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


# --- the rule file -------------------------------------------------------------------


def rules() -> list[Obj]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, Obj]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def source_url() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Source"])


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> list[str]:
    headings = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.MULTILINE)
    return [github_anchor(h) for h in headings]


def test_the_required_alerts_exist_with_their_severity() -> None:
    found = alerts()
    assert set(REQUIRED_ALERTS) <= set(found)
    for name, severity in REQUIRED_ALERTS.items():
        if severity is not None:
            assert found[name]["labels"]["severity"] == severity, name


@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_is_complete(name: str) -> None:
    alert = alerts()[name]
    assert alert["labels"]["severity"] in ("critical", "warning")
    annotations = alert["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert all(value.strip() for value in annotations.values())
    assert re.fullmatch(r"\d+[smhd]", alert["for"]), f"{name}: for: {alert.get('for')}"


@pytest.mark.parametrize("name", sorted(alerts()))
def test_runbook_url_points_at_the_alerts_section(name: str) -> None:
    url = alerts()[name]["annotations"]["runbook_url"]
    anchor = github_anchor(name)
    assert url == f"{source_url()}/blob/main/docs/runbooks.md#{anchor}"
    assert anchor in runbook_anchors(), f"docs/runbooks.md has no section ## {name}"


def test_every_runbook_section_is_an_alert() -> None:
    assert sorted(runbook_anchors()) == sorted(github_anchor(a) for a in alerts())


def test_every_for_says_why() -> None:
    """Each ``for:`` is preceded by a comment that opens with its duration: the reason."""
    lines = RULES.read_text().splitlines()
    fors = [(i, line) for i, line in enumerate(lines) if line.strip().startswith("for:")]
    assert len(fors) == len(alerts())
    for i, line in fors:
        duration = line.split(":", 1)[1].strip()
        j = i - 1
        while lines[j].strip().startswith("#") and lines[j - 1].strip().startswith("#"):
            j -= 1
        assert lines[j].strip().startswith(f"# {duration}:"), f"line {i + 1}: {line.strip()}"


def test_credentials_alert_never_reads_unauthenticated() -> None:
    expr = alerts()["KapCredentialsRefused"]["expr"]
    record = next(r for r in rules() if r.get("record") and r["record"] in expr)
    assert 'result="refused"' in expr
    assert "unauthenticated" not in expr + record["expr"]


def test_down_alert_selects_the_job_the_podmonitor_sets() -> None:
    expr = alerts()["KapDown"]["expr"]
    assert expr == f"up{{{job_selector()}}} == 0 or absent(up{{{job_selector()}}})"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing >= set(alerts()), f"never fires: {set(alerts()) - firing}"
    assert quiet >= set(alerts()), f"never checked quiet: {set(alerts()) - quiet}"


# --- generated files --------------------------------------------------------------


def test_generated_files_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_prometheus_rule_holds_the_same_rules() -> None:
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]
    assert spec == yaml.safe_load(RULES.read_text())


# --- prometheus-operator schemas ---------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever an object lists its fields.

    The API server prunes unknown fields of a custom resource (and
    ``kubectl --validate=strict`` rejects them); a JSON schema allows them
    unless told otherwise. Maps (``additionalProperties`` given) stay maps.
    """
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if isinstance(out.get("pattern"), str) and out["pattern"].startswith("^(?i)"):
            # Go's inline flag after ^; Python wants flags first.
            out["pattern"] = "(?i)^" + out["pattern"][len("^(?i)") :]
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    return jsonschema.Draft202012Validator(strict(schema))


def schema_errors(doc: Obj) -> list[str]:
    """Every error, including those under an anyOf (a field that may also be null)."""

    def flat(errors: Iterable[jsonschema.ValidationError]) -> Iterator[str]:
        for e in errors:
            yield f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            yield from flat(e.context or [])

    return list(flat(validator(doc["kind"]).iter_errors(doc)))


def manifests() -> Iterator[tuple[str, Obj]]:
    for path in (PROMETHEUS_RULE, PODMONITOR):
        yield path.name, yaml.safe_load(path.read_text())


@pytest.mark.parametrize(("filename", "doc"), list(manifests()), ids=[f for f, _ in manifests()])
def test_manifest_validates_strictly_against_the_operator_schema(filename: str, doc: Obj) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert schema_errors(doc) == []
    assert doc["metadata"]["namespace"] == "kube-system"


def misspell(doc: Obj, path: tuple[str | int, ...], wrong: str) -> Obj:
    broken = copy.deepcopy(doc)
    node: Any = broken
    for key in path[:-1]:
        node = node[key]
    node[wrong] = node.pop(path[-1])
    return broken


@pytest.mark.parametrize(
    ("filename", "path", "wrong"),
    [
        ("podmonitor.yaml", ("spec", "podMetricsEndpoints", 0, "path"), "paht"),
        ("podmonitor.yaml", ("spec", "selector"), "selecter"),
        ("prometheusrule.yaml", ("spec", "groups", 1, "rules", 0, "annotations"), "annotation"),
        ("prometheusrule.yaml", ("spec", "groups", 1, "rules", 0, "for"), "for_"),
        ("prometheusrule.yaml", ("metadata", "labels"), "label"),
    ],
)
def test_strict_validation_rejects_a_misspelled_field(
    filename: str, path: tuple[str | int, ...], wrong: str
) -> None:
    doc = yaml.safe_load((MONITORING / filename).read_text())
    errors = schema_errors(misspell(doc, path, wrong))
    assert any(f"'{wrong}' was unexpected" in e for e in errors), errors


def test_vendored_schemas_say_where_they_come_from() -> None:
    for kind in ("PodMonitor", "PrometheusRule"):
        comment = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())["$comment"]
        assert "cloudcoil-models-prometheus-operator" in comment


# --- the PodMonitor against the workloads -------------------------------------------


def workloads() -> list[tuple[str, Obj, Obj]]:
    """(file, pod labels, pod spec) of every kap workload in deploy/."""
    out = []
    for path in sorted((REPO / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Pod":
                out.append((path.name, doc["metadata"], doc["spec"]))
            elif doc and doc["kind"] == "DaemonSet":
                out.append((path.name, doc["spec"]["template"]["metadata"], doc["spec"]))
    return out


def job_selector() -> str:
    """The job label the PodMonitor gives kap's targets, as a PromQL matcher."""
    endpoint = yaml.safe_load(PODMONITOR.read_text())["spec"]["podMetricsEndpoints"][0]
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    assert relabel.get("action", "replace") == "replace"
    assert "sourceLabels" not in relabel, "a fixed job name, whatever the pod"
    return f'job="{relabel["replacement"]}"'


def test_podmonitor_selects_every_kap_workload_on_its_health_port() -> None:
    monitor = yaml.safe_load(PODMONITOR.read_text())["spec"]
    selector = monitor["selector"]["matchLabels"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    found = workloads()
    assert {f for f, _, _ in found} == {"daemonset.yaml", "static-pod.yaml"}
    for filename, metadata, spec in found:
        pod_spec = spec.get("template", {}).get("spec", spec)
        namespace = metadata.get("namespace", "kube-system")
        assert namespace in monitor["namespaceSelector"]["matchNames"], filename
        assert selector.items() <= metadata["labels"].items(), filename
        (container,) = pod_spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert endpoint["port"] in ports, f"{filename} has no port {endpoint['port']}"
        # The port that answers the kubelet's probes is kap's health server.
        assert container["livenessProbe"]["httpGet"]["port"] == endpoint["port"], filename
    for label in monitor["podTargetLabels"]:
        assert all(label in m["labels"] for _, m, _ in found), label


def test_every_rule_selects_the_podmonitors_job() -> None:
    selector = job_selector()
    for rule in rules():
        for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", rule["expr"]):
            if ":" not in name:  # a recording rule's output is selected already
                assert selector in matchers, f"{rule.get('alert', rule.get('record'))}: {name}"


# --- the dashboard ------------------------------------------------------------------


def dashboard() -> Obj:
    board: Obj = json.loads(DASHBOARD.read_text())
    return board


def panels() -> list[Obj]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_has_its_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "upstream"}
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "upstream"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_reads_the_chosen_datasource_and_nodes() -> None:
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "$instance" in target["expr"] or "$upstream" in target["expr"], (
                f"{panel['title']}: {target['expr']} ignores the node and apiserver choice"
            )


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_query_list_has_every_panel_query() -> None:
    listed = {(q["panel"], q["refId"]): q["expr"] for q in yaml.safe_load(QUERIES.read_text())}
    in_board = {(p["title"], t["refId"]): t["expr"] for p in panels() for t in p["targets"]}
    assert listed == in_board
    for q in yaml.safe_load(QUERIES.read_text()):
        assert "$" not in q["query"], q


# --- metric names ------------------------------------------------------------------


def documented_metrics() -> set[str]:
    """The metric names in the /metrics table (README.md, or the docs/ page it moved to)."""
    names = set()
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in page.read_text().splitlines():
            if line.startswith(("| `kap_", "| `process_")):
                names |= set(re.findall(r"`((?:kap|process)_[a-z0-9_]+)", line.split("|")[1]))
    return names


def metric_names(expr: str) -> set[str]:
    """kap_* and process_* metric names an expression reads (recording rules left out)."""
    without_records = re.sub(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", "", expr)
    return set(re.findall(r"\b(?:kap|process)_[a-z0-9_]+\b", without_records))


def read_by_mixin() -> dict[str, set[str]]:
    read: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            read.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    for panel in panels():
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                read.setdefault(name, set()).add(f"panel {panel['title']}")
    return read


def known(name: str, exported: set[str]) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name in exported or base in exported


def test_every_metric_read_is_documented_or_pending() -> None:
    exported = documented_metrics() | PENDING
    assert "kap_upstream_healthy" in exported, "could not find the /metrics table in the docs"
    unknown = {n: users for n, users in read_by_mixin().items() if not known(n, exported)}
    assert not unknown, f"not exported by kap nor listed in PENDING: {unknown}"


def test_pending_metrics_are_not_yet_documented() -> None:
    """When kap exports a PENDING metric and documents it, take it off the list."""
    documented = documented_metrics()
    assert not {n for n in PENDING if n.startswith("kap_")} & documented


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    shown = {n for p in panels() for t in p["targets"] for n in metric_names(t["expr"])}
    assert shown >= DASHBOARD_MUST_SHOW, DASHBOARD_MUST_SHOW - shown


def test_recording_rules_used_are_defined() -> None:
    defined = {r["record"] for r in rules() if "record" in r}
    used = set()
    for expr in [r["expr"] for r in rules()] + [t["expr"] for p in panels() for t in p["targets"]]:
        used |= set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", expr))
    assert used <= defined, used - defined
    assert defined <= used, f"recorded but never read: {defined - used}"


def test_docs_alerts_table_matches_the_rules() -> None:
    """docs/monitoring.md's alerts table: every alert, with its severity and ``for:``."""
    rows = {}
    for line in (REPO / "docs" / "monitoring.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `Kap") and len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    want = {name: (r["labels"]["severity"], r["for"]) for name, r in alerts().items()}
    assert rows == want
