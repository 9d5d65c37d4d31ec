"""The manifests in deploy/, checked against Kubernetes and against kap itself.

- Every document validates against the Kubernetes JSON schemas offline
  (kubernetes-validate, strict: unknown fields are errors), for the oldest
  Kubernetes minor we claim and the newest the package knows.
- Cross-checks against ``kap --help``: every flag and environment variable a
  container passes exists; the probe ports are the port ``--health-listen``
  binds; the data port is ``--listen-port``; in static-pod mode every file kap
  reads is mounted (and the fallback file writable); the grace period outlasts
  ``--shutdown-grace``.
- Cross-checks between files: the ServiceAccount, the role and its binding,
  the user and group hack/issue-client-cert.sh puts in its CSR, the host paths
  the script writes, the image tag and the package version.
- Rollout and placement: maxUnavailable never takes every node's proxy down,
  no surge onto taken host ports, tolerations cover the control-plane taints.
- Each container, started for real with its manifest's arguments (files at
  their mount paths under a temporary root, ports moved to free ones), serves
  its probe paths and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import kubernetes_validate
import pytest
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SCRIPT = REPO / "hack" / "issue-client-cert.sh"

# The oldest Kubernetes minor the manifests promise to work with (DaemonSet
# maxSurge is GA since 1.25; 1.30 is the oldest minor with vendor support in
# 2025), and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())

CONTROL_PLANE_TAINTS = (
    ("node-role.kubernetes.io/control-plane", "NoSchedule"),
    ("node-role.kubernetes.io/master", "NoSchedule"),
)

Obj = dict[str, Any]


def documents() -> list[tuple[str, Obj]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def find(kind: str, name: str | None = None) -> Obj:
    found = [d for _, d in documents() if d["kind"] == kind]
    if name is not None:
        found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs() -> list[tuple[str, Obj]]:
    """(id, pod spec) for every workload: the DaemonSet's template and the static Pod."""
    specs = []
    for filename, doc in documents():
        if doc["kind"] == "Pod":
            specs.append((filename, doc["spec"]))
        elif doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            specs.append((filename, doc["spec"]["template"]["spec"]))
    return specs


def the_container(spec: Obj) -> Obj:
    (container,) = spec["containers"]
    return container


# --- kap's own description of its command line -----------------------------


@attrs.frozen
class Option:
    names: tuple[str, ...]  # "--listen-addr", "--listen-address"
    env: str | None
    default: str | None
    takes_bool: bool  # "--flag[=BOOL]"


@attrs.frozen
class KapCli:
    options: tuple[Option, ...]

    @classmethod
    def from_help(cls, text: str) -> KapCli:
        blocks: list[str] = []
        for line in text.splitlines():
            if re.match(r"^\s{1,4}-", line):
                blocks.append(line)
            elif blocks and line.startswith(" " * 6):
                blocks[-1] += " " + line.strip()
        options = []
        for block in blocks:
            head = block.strip().split("  ")[0]
            names = tuple(re.findall(r"--[a-z0-9][a-z0-9-]*", head))
            env = re.search(r"\[env (\w+)", block)
            default = re.search(r"default ([^\]]*)\]", block)
            options.append(
                Option(
                    names=names,
                    env=env.group(1) if env else None,
                    default=default.group(1).strip() if default else None,
                    takes_bool="[=BOOL]" in head,
                )
            )
        return cls(tuple(options))

    def option(self, flag: str) -> Option:
        for option in self.options:
            if flag in option.names:
                return option
        raise KeyError(f"kap has no flag {flag}")

    @property
    def env_vars(self) -> set[str]:
        return {o.env for o in self.options if o.env}

    def setting(self, container: Obj, flag: str) -> str | None:
        """What kap would use for ``flag`` in this container: args, then env, then default."""
        option = self.option(flag)
        value = None
        for arg in container.get("args", []):
            name, eq, given = arg.partition("=")
            if name in option.names:
                value = given if eq else "true"
            elif option.takes_bool and name == "--no-" + option.names[0][2:]:
                value = "false"
        if value is not None:
            return value
        for var in container.get("env", []):
            if var["name"] == option.env and "value" in var:
                return str(var["value"])
        if option.default in (None, "(unset)", '""'):
            return None
        return option.default


@pytest.fixture(scope="module")
def kap() -> KapCli:
    done = subprocess.run(
        [sys.executable, "-m", "kap", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    cli = KapCli.from_help(done.stdout)
    assert len(cli.options) > 10, "could not read kap --help"
    return cli


def duration_seconds(text: str) -> float:
    """A Go duration (``1m30s``, ``100ms``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(h|ms|m|s|us|µs|ns)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def listen_port(value: str) -> tuple[str, int]:
    """``[host]:port`` as --health-listen takes it."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def script_defaults() -> dict[str, str]:
    """The defaults hack/issue-client-cert.sh --help prints, by option."""
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    return dict(re.findall(r"^\s+(--[a-z-]+) \S+\s.*?\(default: ([^)]*)\)", done.stdout, re.M))


# --- the schemas ---------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("filename", "doc"),
    documents(),
    ids=[f"{f}:{d['kind']}" for f, d in documents()],
)
def test_manifest_validates_against_kubernetes_schema(
    filename: str, doc: Obj, version: str
) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    # Guards the test above against validating nothing.
    daemonset = find("DaemonSet")
    broken = {**daemonset, "spec": {**daemonset["spec"], "maxUnavailable": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_deploy_holds_the_expected_objects() -> None:
    kinds = sorted((f, d["kind"]) for f, d in documents())
    assert kinds == [
        ("daemonset.yaml", "DaemonSet"),
        ("rbac.yaml", "ClusterRole"),
        ("rbac.yaml", "RoleBinding"),
        ("rbac.yaml", "ServiceAccount"),
        ("static-pod.yaml", "Pod"),
    ]


# --- the manifests against kap --help -------------------------------------------


@pytest.mark.parametrize(("filename", "spec"), pod_specs(), ids=[f for f, _ in pod_specs()])
class TestContainerAgainstKap:
    def test_every_flag_exists(self, kap: KapCli, filename: str, spec: Obj) -> None:
        container = the_container(spec)
        assert "command" not in container, "the image's ENTRYPOINT is kap; pass args only"
        for arg in container["args"]:
            assert arg.startswith("--"), f"{arg}: kap takes no positional arguments"
            name, eq, value = arg.partition("=")
            option = kap.option(name)
            if option.takes_bool:
                assert value in ("true", "false") if eq else True, arg

    def test_every_environment_variable_is_one_kap_reads(
        self, kap: KapCli, filename: str, spec: Obj
    ) -> None:
        for var in the_container(spec).get("env", []):
            assert var["name"] in kap.env_vars, f"kap does not read {var['name']}"

    def test_probes_target_the_health_port(self, kap: KapCli, filename: str, spec: Obj) -> None:
        container = the_container(spec)
        health_listen = kap.setting(container, "--health-listen")
        assert health_listen is not None
        host, port = listen_port(health_listen)
        ports = {p["name"]: p for p in container["ports"]}
        assert ports["health"]["containerPort"] == port
        probes = [container.get(k) for k in ("livenessProbe", "readinessProbe", "startupProbe")]
        probes = [p for p in probes if p]
        assert {p["httpGet"]["path"] for p in probes} == {"/healthz", "/readyz"}
        for probe in probes:
            target = probe["httpGet"]["port"]
            resolved = ports[target]["containerPort"] if isinstance(target, str) else target
            assert resolved == port, f"{probe}: kap's health server is on {port}"
            # The kubelet probes the pod IP (the node's, with hostNetwork)
            # unless told otherwise; a loopback-only health server needs host.
            if host not in ("", "0.0.0.0", "::"):
                assert probe["httpGet"].get("host") == host

    def test_data_port_is_the_listen_port(self, kap: KapCli, filename: str, spec: Obj) -> None:
        container = the_container(spec)
        ports = {p["name"]: p for p in container["ports"]}
        assert str(ports["https"]["containerPort"]) == kap.setting(container, "--listen-port")
        assert ports["https"]["containerPort"] == 6445, "the seed's port; kubeconfigs point at it"
        assert spec["hostNetwork"] is True
        for p in container["ports"]:
            assert p.get("hostPort", p["containerPort"]) == p["containerPort"]

    def test_grace_period_outlasts_shutdown_grace(
        self, kap: KapCli, filename: str, spec: Obj
    ) -> None:
        grace = kap.setting(the_container(spec), "--shutdown-grace")
        assert grace is not None
        assert spec["terminationGracePeriodSeconds"] > duration_seconds(grace)

    def test_container_is_locked_down(self, kap: KapCli, filename: str, spec: Obj) -> None:
        container = the_container(spec)
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert "privileged" not in sc or sc["privileged"] is False
        assert container["resources"] == {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        }
        # kap dials addresses; cluster DNS may itself depend on kap.
        assert spec["dnsPolicy"] == "Default"

    def test_image_is_this_version(self, kap: KapCli, filename: str, spec: Obj) -> None:
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        image = the_container(spec)["image"]
        assert image.endswith(f"/kap:{version}"), f"{image}: not kap {version}"


# --- static-pod mode ----------------------------------------------------------


@pytest.fixture(scope="module")
def static_pod() -> Obj:
    return find("Pod")


def mounted(spec: Obj, path: str) -> tuple[Obj, Obj] | None:
    """The (volumeMount, volume) that makes ``path`` visible in the container."""
    best = None
    for mount in the_container(spec).get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        covers = path == mount_path or path.startswith(mount_path + "/")
        if covers and (best is None or len(mount_path) > len(best["mountPath"])):
            best = mount
    if best is None:
        return None
    (volume,) = [v for v in spec["volumes"] if v["name"] == best["name"]]
    return best, volume


def test_static_pod_mounts_every_file_kap_reads(kap: KapCli, static_pod: Obj) -> None:
    spec = static_pod["spec"]
    container = the_container(spec)
    assert kap.setting(container, "--as-static-pod") == "true"
    static_dir = kap.setting(container, "--static-pod-dir")
    assert static_dir is not None
    for name in ("ca.crt", "cl.crt", "cl.key"):
        found = mounted(spec, f"{static_dir}/{name}")
        assert found is not None, f"kap reads {static_dir}/{name}; nothing mounts it"
        mount, volume = found
        assert mount.get("readOnly") is True
        # The script replaces the files (new inodes). A file mount would pin
        # the old inode until the container is recreated; a mount of their
        # directory shows the new ones to the running kap.
        assert mount["mountPath"].rstrip("/") == static_dir, (
            f"{static_dir}/{name} is mounted on its own: a renewal would not reach kap"
        )
        assert volume["hostPath"]["type"] == "Directory", "the script makes the directory first"


def test_static_pod_never_mounts_the_cluster_pki_directory(static_pod: Obj) -> None:
    """/etc/kubernetes/pki holds the cluster CA's private key on control-plane nodes."""
    for volume in static_pod["spec"]["volumes"]:
        path = Path(volume["hostPath"]["path"])
        covers_pki = (
            path == Path("/etc/kubernetes/pki") or path in Path("/etc/kubernetes/pki").parents
        )
        inside_pki = Path("/etc/kubernetes/pki") in path.parents
        assert not covers_pki, f"volume {volume['name']} mounts {path}"
        if inside_pki:
            assert volume["hostPath"]["type"] == "File", f"{path}: a single file only"


def test_static_pod_fallback_file_is_mounted_writable(kap: KapCli, static_pod: Obj) -> None:
    spec = static_pod["spec"]
    fallback = kap.setting(the_container(spec), "--fallback-file")
    assert fallback is not None, "a static pod without memory forgets the apiservers on reboot"
    found = mounted(spec, fallback)
    assert found is not None, f"{fallback} is not mounted"
    mount, volume = found
    assert not mount.get("readOnly", False), "kap rewrites the fallback file"
    # A file mount, created empty on a fresh node (kap tolerates an empty file).
    assert mount["mountPath"] == fallback
    assert volume["hostPath"]["type"] == "FileOrCreate"


def test_static_pod_has_a_seed_upstream(kap: KapCli, static_pod: Obj) -> None:
    # A fresh node has an empty fallback file; kap needs somewhere to start.
    seed = kap.setting(the_container(static_pod["spec"]), "--fallback-upstreams")
    assert seed


def test_static_pod_reads_what_the_script_writes(kap: KapCli, static_pod: Obj) -> None:
    out_dir = script_defaults()["--out-dir"]
    spec = static_pod["spec"]
    static_dir = kap.setting(the_container(spec), "--static-pod-dir")
    for name in ("ca.crt", "cl.crt", "cl.key"):
        mount, volume = mounted(spec, f"{static_dir}/{name}")  # type: ignore[misc]
        host = Path(volume["hostPath"]["path"]) / Path(f"{static_dir}/{name}").relative_to(
            mount["mountPath"]
        )
        assert host == Path(out_dir) / name, f"kap reads {name} from {host}; the script writes it"
    fallback = kap.setting(the_container(spec), "--fallback-file")
    assert fallback is not None
    _, volume = mounted(spec, fallback)  # type: ignore[misc]
    # FileOrCreate does not create directories; the script makes this one.
    assert Path(volume["hostPath"]["path"]).parent == Path(out_dir)


def test_static_pod_runs_as_root_at_node_critical_priority(static_pod: Obj) -> None:
    spec = static_pod["spec"]
    assert static_pod["metadata"]["namespace"] == "kube-system"
    # The key is root's, 0600; root with no capabilities reads it.
    assert the_container(spec)["securityContext"]["runAsUser"] == 0
    assert spec["priorityClassName"] == "system-node-critical"
    # The kubelet does not resolve priority classes for static pods.
    assert spec["priority"] == 2000001000
    assert "serviceAccountName" not in spec, "static pods cannot use ServiceAccounts"


# --- DaemonSet mode and RBAC --------------------------------------------------


@pytest.fixture(scope="module")
def daemonset() -> Obj:
    return find("DaemonSet")


def test_daemonset_service_account_exists_and_is_bound(daemonset: Obj) -> None:
    spec = daemonset["spec"]["template"]["spec"]
    namespace = daemonset["metadata"]["namespace"]
    assert namespace == "kube-system"
    account = find("ServiceAccount", spec["serviceAccountName"])
    assert account["metadata"]["namespace"] == namespace
    assert account["metadata"]["name"] == "kubernetes-api-proxy"
    binding = find("RoleBinding")
    assert {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": namespace,
    } in binding["subjects"]


def test_role_grants_reading_endpointslices_and_nothing_else() -> None:
    role = find("ClusterRole")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = find("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    # Only where the kubernetes Service's EndpointSlices live.
    assert binding["metadata"]["namespace"] == "default"


def test_role_binding_names_the_certificate_the_script_issues() -> None:
    defaults = script_defaults()
    subjects = find("RoleBinding")["subjects"]
    group = rbac_subject("Group", defaults["--group"])
    user = rbac_subject("User", defaults["--cn"])
    assert group in subjects, f"the script's group {defaults['--group']} is not bound"
    assert user in subjects, f"the script's user {defaults['--cn']} is not bound"


def rbac_subject(kind: str, name: str) -> Obj:
    return {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}


def daemonset_unavailable(value: int | str, nodes: int) -> int:
    """How many nodes' pods a DaemonSet rollout may take down (percentages round up)."""
    if isinstance(value, str):
        return math.ceil(int(value.rstrip("%")) * nodes / 100)
    return value


def test_rollout_never_takes_every_proxy_down(daemonset: Obj) -> None:
    update = daemonset["spec"]["updateStrategy"]
    assert update["type"] == "RollingUpdate"
    unavailable = update["rollingUpdate"]["maxUnavailable"]
    for nodes in range(2, 200):
        assert 1 <= daemonset_unavailable(unavailable, nodes) < nodes, (
            f"maxUnavailable {unavailable} takes all {nodes} nodes' proxies down"
        )
    # A surge pod would need the same host ports as the pod it replaces.
    assert update["rollingUpdate"].get("maxSurge", 0) in (0, "0%")
    assert daemonset["spec"].get("minReadySeconds", 0) > 0


def tolerates(tolerations: list[Obj], key: str, effect: str) -> bool:
    for t in tolerations:
        if t.get("effect") not in (None, "", effect):
            continue
        if t.get("operator", "Equal") == "Exists" and t.get("key") in (None, "", key):
            return True
        if t.get("operator", "Equal") == "Equal" and t.get("key") == key:
            return True
    return False


def test_daemonset_runs_on_every_node_including_control_plane(daemonset: Obj) -> None:
    spec = daemonset["spec"]["template"]["spec"]
    for key, effect in CONTROL_PLANE_TAINTS:
        assert tolerates(spec.get("tolerations", []), key, effect), f"{key}:{effect}"
    assert "nodeSelector" not in spec
    assert "affinity" not in spec
    assert spec["priorityClassName"] in ("system-node-critical", "system-cluster-critical")


def test_daemonset_selector_does_not_match_the_static_pod(daemonset: Obj, static_pod: Obj) -> None:
    selector = daemonset["spec"]["selector"]["matchLabels"]
    template = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template.items()
    assert not selector.items() <= static_pod["metadata"]["labels"].items()


def test_daemonset_runs_as_non_root(daemonset: Obj) -> None:
    sc = the_container(daemonset["spec"]["template"]["spec"])["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0


# --- the containers, started for real --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@attrs.frozen
class Relocated:
    argv: list[str]
    env: dict[str, str]
    health_port: int


def relocate(kap: KapCli, spec: Obj, root: Path, ca: trustme.CA) -> Relocated:
    """The container's command line with its mounts under ``root`` and free ports.

    Each hostPath directory mount becomes a directory at ``root/<mountPath>``
    holding what hack/issue-client-cert.sh writes (the cluster CA as ``ca.crt``,
    a client certificate as ``cl.crt``/``cl.key``); each file mount an empty
    file (FileOrCreate on a fresh node), or the CA for a mounted ``ca.crt``.
    """
    container = the_container(spec)
    client = ca.issue_cert(
        "kap.invalid",
        common_name="system:kubernetes-api-proxy",
        organization_name="system:kubernetes-api-proxies",
    )
    # Parents first, as container runtimes mount them.
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: m["mountPath"].count("/"))
    for mount in mounts:
        _, volume = mounted(spec, mount["mountPath"])  # type: ignore[misc]
        target = root / mount["mountPath"].lstrip("/")
        if volume["hostPath"].get("type") in ("Directory", "DirectoryOrCreate"):
            target.mkdir(parents=True, exist_ok=True)
            ca.cert_pem.write_to_path(str(target / "ca.crt"))
            client.cert_chain_pems[0].write_to_path(str(target / "cl.crt"))
            client.private_key_pem.write_to_path(str(target / "cl.key"))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(volume["hostPath"]["path"]).name == "ca.crt":
            ca.cert_pem.write_to_path(str(target))
        else:
            target.touch()

    health_port = free_port()
    health_host, _ = listen_port(kap.setting(container, "--health-listen") or ":")
    argv = [sys.executable, "-m", "kap"]
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        if name == "--listen-port":
            value = str(free_port())
        elif name == "--health-listen":
            value = f"{health_host}:{health_port}"
        elif value.startswith("/"):
            value = str(root / value.lstrip("/"))
        argv.append(f"{name}={value}")
    if kap.setting(container, "--as-static-pod") == "true":
        static_dir = kap.setting(container, "--static-pod-dir") or ""
        argv.append(f"--static-pod-dir={root / static_dir.lstrip('/')}")
    env = {"PATH": os.environ["PATH"], "HOME": str(root)}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return Relocated(argv, env, health_port)


@contextlib.contextmanager
def running(relocated: Relocated, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        relocated.argv,
        cwd=cwd,
        env=relocated.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(("filename", "spec"), pod_specs(), ids=[f for f, _ in pod_specs()])
def test_container_starts_with_its_manifest_arguments_and_answers_its_probes(
    kap: KapCli, filename: str, spec: Obj, tmp_path: Path
) -> None:
    relocated = relocate(kap, spec, tmp_path / "root", trustme.CA())
    container = the_container(spec)
    paths = [
        container[k]["httpGet"]["path"]
        for k in ("livenessProbe", "readinessProbe", "startupProbe")
        if k in container
    ]
    with running(relocated, tmp_path) as proc:
        deadline = time.monotonic() + 20
        statuses: dict[str, int] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                statuses = {p: http_status(relocated.health_port, p) for p in paths}
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"kap exited:\n{proc.communicate()[1]}"
        assert statuses == dict.fromkeys(paths, 200)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
