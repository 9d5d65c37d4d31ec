"""A renewed client certificate reaches the running static-pod kap, without a restart.

End to end, the way the node runs it: hack/issue-client-cert.sh (against the
fake kubectl of tests/stubkubectl.py, signing with the test CA) writes into a
host directory; kap runs in a private mount namespace (``unshare --mount``)
where that directory is bind-mounted the way deploy/static-pod.yaml mounts it
(read-only, at ``--static-pod-dir``, with the fallback file mounted writable
inside it), with the manifest's own arguments, against a fake apiserver that
requires a client certificate and records the serial each connection
presented. The script then renews the certificate; kap's next connection must
present the new serial, from the same kap process.

The same test runs with the mounts the manifest used before: each file bind-
mounted on its own. There the mount pins the old inode, so kap keeps
presenting the old serial: the failure this layout fixes.

Needs root (mount namespaces, bind mounts); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import yaml
from fakeapi import PkiFiles
from kaptest import StartFake, kap_process
from stubkubectl import REPO, Cluster, make_cluster

MANIFEST = REPO / "deploy" / "static-pod.yaml"
HOST_DIR = "/etc/kubernetes/kap"  # where the script writes by default
STATIC_POD_DIR = "/var/run/kubernetes.io/kap"  # where kap reads, inside the container
FILES = ("ca.crt", "cl.crt", "cl.key")
FIRST_SERIAL, RENEWED_SERIAL = 4242, 4243  # the fake cluster numbers its certificates
USER = "system:kubernetes-api-proxy"  # the script's default CN


@attrs.frozen
class Mount:
    """One hostPath volume mount: ``host`` on the node at ``path`` in the container."""

    host: str
    path: str
    read_only: bool


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())  # type: ignore[no-any-return]


def manifest_mounts() -> list[Mount]:
    spec = manifest()["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    return [
        Mount(volumes[m["name"]], m["mountPath"], bool(m.get("readOnly", False)))
        for m in container["volumeMounts"]
    ]


def per_file_mounts() -> list[Mount]:
    """The manifest's mounts before: each file kap reads bind-mounted on its own."""
    return [
        *(Mount(f"{HOST_DIR}/{name}", f"{STATIC_POD_DIR}/{name}", True) for name in FILES),
        Mount(f"{HOST_DIR}/upstreams.json", f"{STATIC_POD_DIR}/upstreams.json", False),
    ]


LAYOUTS = {"manifest": manifest_mounts, "per-file": per_file_mounts}


@attrs.frozen
class Node:
    """A node's and a container's filesystem, as two directories under the test's tmp."""

    host: Path
    container: Path

    def on_host(self, path: str) -> Path:
        return self.host / path.lstrip("/")

    def in_container(self, path: str) -> Path:
        return self.container / path.lstrip("/")

    def namespace(self, mounts: list[Mount]) -> tuple[str, ...]:
        """A command that makes a private mount namespace with ``mounts``, then execs its args.

        Parents are mounted before what they contain, as container runtimes
        do; a read-only mount is a bind mount remounted ``ro``.
        """
        steps = ["mount --make-rprivate /"]
        for m in sorted(mounts, key=lambda m: m.path.rstrip("/").count("/")):
            source, target = shlex.quote(str(self.on_host(m.host))), self.in_container(m.path)
            if self.on_host(m.host).is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif not target.exists():  # a mount point the runtime would create
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            steps.append(f"mount --bind {source} {shlex.quote(str(target))}")
            if m.read_only:
                steps.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
        return ("unshare", "--mount", "--", "sh", "-c", " && ".join(steps) + ' && exec "$@"', "sh")


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: kap runs in a private mount namespace with bind mounts")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    root = tmp_path_factory.mktemp("mount-check")
    (root / "a").mkdir()
    (root / "b").mkdir()
    bind = 'mount --make-rprivate / && mount --bind "$0" "$1"'
    done = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", bind, str(root / "a"), str(root / "b")],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot make a mount namespace with bind mounts here: {done.stderr.strip()}")


def kap_args(node: Node, fake_port: int) -> tuple[tuple[str, ...], dict[str, str]]:
    """The manifest's arguments and environment, with paths under the container root.

    Ports become kernel-chosen ones on 127.0.0.1, the seed is the fake, and
    discovery is off (the fake serves no EndpointSlices here): the probes
    are the connections this test watches, every 200 ms.
    """
    (container,) = manifest()["spec"]["containers"]
    args = []
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        if name == "--listen-port":
            value = "0"
        elif name == "--health-listen":
            value = "127.0.0.1:0"
        elif value.startswith("/"):
            value = str(node.in_container(value))
        args.append(f"{name}={value}")
    if not any(arg.startswith("--static-pod-dir=") for arg in args):  # kap's default
        args.append(f"--static-pod-dir={node.in_container(STATIC_POD_DIR)}")
    args += ["--discovery=false", "--health-interval=200ms", "--health-timeout=2s"]
    env = {v["name"]: str(v["value"]) for v in container.get("env", []) if "value" in v}
    env["FALLBACK_UPSTREAMS"] = f"127.0.0.1:{fake_port}"
    return tuple(args), env


def mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, as process ``pid`` sees them (the last wins)."""
    options = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        options[fields[4]] = set(fields[5].split(","))
    return options


async def run_script(cluster: Cluster) -> None:
    done = await trio.to_thread.run_sync(cluster.run)
    assert done.returncode == 0, done.stderr


async def until(condition: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


@pytest.mark.parametrize(
    ("layout", "renewal_seen"),
    [
        pytest.param("manifest", True, id="directory-mount-of-the-manifest"),
        pytest.param("per-file", False, id="per-file-mounts-keep-the-old-certificate"),
    ],
)
async def test_a_renewed_certificate_is_used_by_the_running_kap(
    can_mount: None,
    start_fake: StartFake,
    pki: PkiFiles,
    tmp_path: Path,
    layout: str,
    renewal_seen: bool,
) -> None:
    node = Node(tmp_path / "host", tmp_path / "container")
    cluster = make_cluster(tmp_path / "cluster", pki.ca_file, pki.dir / "ca.key")
    cluster = attrs.evolve(cluster, out=node.on_host(HOST_DIR), days=10)
    await run_script(cluster)
    node.on_host(f"{HOST_DIR}/upstreams.json").touch()  # the kubelet's FileOrCreate
    fake = await start_fake("apiserver", require_client_cert=True)
    args, env = kap_args(node, fake.address[1])
    mounts = LAYOUTS[layout]()

    async with kap_process(*args, env=env, wrap=node.namespace(mounts)) as kap:
        pid = kap.process.pid
        assert kap.find("kap started")[0]["credentials"] == "static-pod"
        # kap sees the files through the mounts, read-only, and the fallback file writable.
        mounted = mount_options(pid)
        for m in mounts:
            assert ("ro" in mounted[str(node.in_container(m.path))]) is m.read_only, m
        await until(lambda: FIRST_SERIAL in fake.client_cert_serials)
        await until(lambda: any(r.user == USER for r in fake.requests))

        # Renew: ten days left is within the default 30; the cluster issues 4243.
        serials = fake.client_cert_serials
        seen = len(serials)
        cluster.new_csr()
        cluster = attrs.evolve(cluster, days=365)
        await run_script(cluster)
        # kap's own next connection (maybe made while the script was still
        # printing): it re-reads its files at each probe and reconnects when
        # they changed. Ten probes are ample.
        probes = fake.probe_count()
        await until(lambda: RENEWED_SERIAL in serials[seen:] or fake.probe_count() >= probes + 10)
        on_its_own = serials[seen:]
        # And a next connection whatever kap did on its own: the apiserver
        # drops every connection (as on a GOAWAY); three probes on the new one.
        seen, probes = len(serials), fake.probe_count()
        fake.drop_connections()
        await until(lambda: len(serials) > seen and fake.probe_count() >= probes + 3)
        after_drop = serials[seen:]

        assert kap.process.poll() is None
        assert kap.process.pid == pid, "the same kap, never restarted"
        errors = [line for line in kap.lines if line.get("level") == "error"]

    if renewal_seen:
        assert RENEWED_SERIAL in on_its_own, f"kap's connections after the renewal: {on_its_own}"
        first_new = on_its_own.index(RENEWED_SERIAL)
        rest = on_its_own[first_new:] + after_drop
        assert set(rest) == {RENEWED_SERIAL}, f"back to the old one: {on_its_own}, {after_drop}"
        assert kap.find("TLS credentials reloaded")
        assert errors == [], "the switch never showed kap a mismatched or half-written pair"
    else:
        assert set(on_its_own) <= {FIRST_SERIAL}, on_its_own
        assert set(after_drop) == {FIRST_SERIAL}, after_drop
        assert not kap.find("TLS credentials reloaded")
