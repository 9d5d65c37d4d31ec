"""The monitoring mixin against a real Prometheus (issue 12, section 5).

One Prometheus (Debian's, from hack/install-prometheus.sh's cache) scrapes
several kaps, each a real process in front of its own fake apiserver, every
second as job "kap", with ``deploy/monitoring/kap.rules.yaml`` loaded. Each
kap is one scenario; they run side by side, and each asserts through
Prometheus's HTTP API that exactly its expected alerts fire (alert name,
severity, and the instance or upstream label), then resolve:

============  ==========================================  ==================================
scenario      what the test does                          alerts
============  ==========================================  ==================================
baseline      discovery, token and client cert, all well  none, ever
dead          stops the apiserver, a client connects      KapNoHealthyUpstream,
              then restarts the apiserver                 KapUpstreamDown, KapClientsRefused
refused       the apiserver rejects kap's token           KapCredentialsRefused
unauth        no CA, so kap presents nothing: 401s        none, ever (not KapCredentialsRefused)
discovery     lists fail with 500 and the watch drops     KapDiscoveryFailing
cert          client cert for 3 days, then 12 h, then     KapClientCertificateExpiringSoon,
              a year (rotated on disk; kap reloads)       then KapClientCertificateExpiring
down          kap killed, then restarted on its port      KapDown
============  ==========================================  ==================================

Afterwards every alert seen firing at any time must be one a scenario
expected, and every dashboard panel query (deploy/monitoring/tests/
dashboard-queries.yaml) must return data from this Prometheus.

What the test changes in its copy of the rules, so that it takes about a
minute and not hours: every ``for:`` becomes 1s (still two evaluations in a
row, so a single-scrape blip never fires), and every ``[5m]`` window 10s;
nothing else. Scrape and evaluation intervals are 1s. A kap joins the
scrape targets (file_sd) only once its upstream is usable, so start-up
(``kap_upstreams_healthy`` 0 before the first probe) is not seen as an outage.

Skipped, with the reason, only when Prometheus cannot be installed here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio
import yaml
from fakeapi import FakeApiServer, PkiFiles, SliceStore, create_pki, endpoint_slice
from kaptest import KapProcess, kap_process, who
from shortcert import issue_client_cert

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "monitoring" / "kap.rules.yaml"
QUERIES = REPO / "deploy" / "monitoring" / "tests" / "dashboard-queries.yaml"
INSTALL = REPO / "hack" / "install-prometheus.sh"

FOR = "1s"
WINDOW = ("[5m]", "[10s]")
ALERT_TIMEOUT = 45.0  # seconds for one expected change of the alerts (about 15 s needed)
TOTAL_TIMEOUT = 240.0  # the whole test
POLL = 0.25  # seconds between two reads of /api/v1/alerts

# Dashboard queries that may legitimately return nothing here, with why.
EMPTY_ALLOWED: dict[str, str] = {}

Key = tuple[str, str, str]  # alertname, severity, instance or upstream


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    found = shutil.which("prometheus")
    if found is not None and shutil.which("promtool") is not None:
        return Path(found)
    done = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"prometheus is not installable here (hack/install-prometheus.sh: {reason})")
    return Path(done.stdout.strip()) / "prometheus"


def free_port() -> int:
    """A port the kernel chose for 127.0.0.1 (Prometheus's flag needs a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shortened_rules(path: Path) -> None:
    """The rule file with every ``for:`` shortened and every 5m window 10s."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
            rule["expr"] = rule["expr"].replace(*WINDOW)
    path.write_text(yaml.safe_dump(doc))


def severities() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {
        r["alert"]: r["labels"]["severity"]
        for g in doc["groups"]
        for r in g["rules"]
        if "alert" in r
    }


@attrs.define
class Alerts:
    """What Prometheus says is firing, read every POLL seconds; every alert ever seen firing."""

    url: str
    firing: set[Key] = attrs.field(factory=set)
    seen: dict[Key, float] = attrs.field(factory=dict)  # first seen firing, test clock
    raw: list[dict[str, Any]] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, client: httpx2.AsyncClient) -> None:
        while True:
            r = await client.get(f"{self.url}/api/v1/alerts")
            r.raise_for_status()
            self.raw = r.json()["data"]["alerts"]
            now = set()
            for a in self.raw:
                if a["state"] != "firing":
                    continue
                labels = a["labels"]
                where = labels.get("instance") or labels.get("upstream") or ""
                now.add((labels["alertname"], labels.get("severity", ""), where))
            for key in now - self.firing:
                self.seen.setdefault(key, trio.current_time())
            self.firing = now
            self.changed.set()
            self.changed = trio.Event()
            await trio.sleep(POLL)


@attrs.define
class Scenario:
    name: str
    alerts: Alerts
    where: set[str] = attrs.field(factory=set)  # its instances and upstreams
    expected: set[Key] = attrs.field(factory=set)  # every alert it expects at some time
    timings: list[tuple[str, float]] = attrs.field(factory=list)

    def mine(self) -> set[Key]:
        return {k for k in self.alerts.firing if k[2] in self.where}

    async def until(self, what: str, want: set[Key], since: float) -> None:
        """Wait until exactly ``want`` of this scenario's alerts fire; note how long it took."""
        self.expected |= want
        with trio.fail_after(ALERT_TIMEOUT):
            while self.mine() != want:
                await self.alerts.changed.wait()
        self.timings.append((what, round(trio.current_time() - since, 1)))


@attrs.define
class Lab:
    pki: PkiFiles
    tmp: Path
    nursery: trio.Nursery
    targets: dict[str, str] = attrs.field(factory=dict)  # scenario -> health address

    async def fake(self, name: str, **knobs: Any) -> FakeApiServer:
        fake = FakeApiServer(name, self.pki, **knobs)
        await self.nursery.start(fake.run)
        return fake

    async def kap(self, name: str, fake: FakeApiServer, *flags: str) -> KapProcess:
        """A kap process in front of ``fake``, usable; killed when the lab's nursery ends."""
        kap: KapProcess = await self.nursery.start(self._hold, name, fake, flags)
        return kap

    async def _hold(
        self,
        name: str,
        fake: FakeApiServer,
        flags: tuple[str, ...],
        *,
        task_status: trio.TaskStatus[KapProcess] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = fake.address  # type: ignore[misc]
        args = (
            "--listen-addr", "127.0.0.1", "--listen-port", "0",
            "--fallback-upstreams", f"{host}:{port}",
            "--fallback-file", str(self.tmp / f"{name}.json"),
            "--health-interval", "200ms", "--health-timeout", "500ms",
            "--log-level", "info", *flags,
        )  # fmt: skip
        if "--health-listen" not in flags:
            args += ("--health-listen", "127.0.0.1:0")
        async with kap_process(*args) as kap:
            await usable(kap)
            task_status.started(kap)
            await trio.sleep_forever()

    def scrape(self, name: str, kap: KapProcess) -> None:
        assert kap.health is not None
        self.targets[name] = kap.health
        groups = [{"targets": [t], "labels": {"scenario": n}} for n, t in self.targets.items()]
        tmp = self.tmp / "targets.json.tmp"
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.tmp / "targets.json")


async def usable(kap: KapProcess) -> None:
    """Until kap's /upstreams shows an upstream usable."""
    async with httpx2.AsyncClient(trust_env=False) as client:
        with trio.fail_after(20):
            while True:
                r = await client.get(f"http://{kap.health}/upstreams")
                if any(u["healthy"] for u in r.json()["upstreams"]):
                    return
                await trio.sleep(0.05)


def prometheus_config(tmp: Path, rules: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "kap",
                "file_sd_configs": [
                    {"files": [str(tmp / "targets.json")], "refresh_interval": "1s"}
                ],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def query(client: httpx2.AsyncClient, url: str, expr: str) -> list[Any]:
    r = await client.get(f"{url}/api/v1/query", params={"query": expr})
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


async def test_alerts_fire_and_resolve_in_a_real_prometheus(
    prometheus_bin: Path, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    pki = create_pki(tmp_path / "pki")  # its own: the scenarios rotate client certificates
    sev = severities()
    rules = tmp_path / "rules.yaml"
    shortened_rules(rules)
    (tmp_path / "targets.json").write_text("[]")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = ("--token-file", str(pki.token_file))
    ca = ("--ca-file", str(pki.ca_file))

    with trio.fail_after(TOTAL_TIMEOUT):
        async with (
            AsyncExitStack() as stack,
            httpx2.AsyncClient(trust_env=False, timeout=10) as client,
            trio.open_nursery() as nursery,
        ):
            lab = Lab(pki, tmp_path, nursery)
            alerts = Alerts(url)

            # ---- the kaps, each in front of its own fake apiserver
            store = SliceStore()
            base_fake = await lab.fake("baseline", store=store, require_token=pki.token)
            host, bport = base_fake.address  # type: ignore[misc]
            store.put(endpoint_slice("kubernetes", [(host, True)], ports=[("https", bport)]))
            base_cert = tmp_path / "base.crt"
            issue_client_cert(pki, base_cert, base_cert.with_suffix(".key"), days=365)
            base_key = str(base_cert.with_suffix(".key"))
            cert_flags = ("--cert-file", str(base_cert), "--key-file", base_key)

            dead_fake = await lab.fake("dead")
            refused_fake = await lab.fake("refused", require_token=pki.token)
            unauth_fake = await lab.fake("unauth", require_token=pki.token)
            disc_store = SliceStore()
            disc_fake = await lab.fake("discovery", store=disc_store, require_token=pki.token)
            dhost, dport = disc_fake.address  # type: ignore[misc]
            disc_store.put(endpoint_slice("kubernetes", [(dhost, True)], ports=[("https", dport)]))
            cert_fake = await lab.fake("cert", require_client_cert=True)
            cert = tmp_path / "cl.crt"
            issue_client_cert(pki, cert, cert.with_suffix(".key"), days=3)
            down_fake = await lab.fake("down")
            down_health = f"127.0.0.1:{free_port()}"

            discovery = ("--discovery", "--discover-period", "1s")
            no_discovery = ("--no-discovery",)
            kaps: dict[str, KapProcess] = {}

            async def start(name: str, fake: FakeApiServer, *flags: str) -> None:
                kaps[name] = await lab.kap(name, fake, *flags)

            async with trio.open_nursery() as starting:
                baseline_flags = (*ca, *token, *cert_flags, *discovery)
                starting.start_soon(start, "baseline", base_fake, *baseline_flags)
                starting.start_soon(start, "dead", dead_fake, *ca, *token, *no_discovery)
                starting.start_soon(start, "refused", refused_fake, *ca, *token, *no_discovery)
                starting.start_soon(start, "unauth", unauth_fake, *token, *no_discovery)
                starting.start_soon(start, "discovery", disc_fake, *ca, *token, *discovery)
                starting.start_soon(
                    start, "cert", cert_fake, *ca, "--cert-file", str(cert),
                    "--key-file", str(cert.with_suffix(".key")), *no_discovery,
                )  # fmt: skip
                starting.start_soon(
                    start, "down", down_fake, *ca, "--health-listen", down_health, *no_discovery
                )
            for name, kap in kaps.items():
                lab.scrape(name, kap)

            # ---- Prometheus
            process = await trio.lowlevel.open_process(
                [
                    str(prometheus_bin),
                    f"--config.file={prometheus_config(tmp_path, rules)}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(open(tmp_path / "prometheus.log", "wb")),  # noqa: ASYNC230, SIM115
            )
            stack.push_async_callback(_stop, process)
            started = trio.current_time()
            # Every kap scraped (up == 1), and the start-up absent(up) of
            # KapDown gone, before anything is recorded.
            with trio.fail_after(30):
                while True:
                    try:
                        up = await query(client, url, 'up{job="kap"} == 1')
                        firing = await client.get(f"{url}/api/v1/alerts")
                    except httpx2.TransportError:
                        await trio.sleep(0.2)
                        continue
                    unlabelled = [
                        a
                        for a in firing.json()["data"]["alerts"]
                        if not {"instance", "upstream"} & set(a["labels"])
                    ]
                    if len(up) == len(kaps) and not unlabelled:
                        break
                    await trio.sleep(0.2)
            ready_s = round(trio.current_time() - started, 1)
            nursery.start_soon(alerts.run, client)

            scenarios = {n: Scenario(n, alerts, {kaps[n].health or ""}) for n in kaps}
            scenarios["dead"].where.add(f"{dead_fake.address[0]}:{dead_fake.address[1]}")  # type: ignore[index]

            async def dead() -> None:
                s = scenarios["dead"]
                inst = kaps["dead"].health or ""
                upstream = "{}:{}".format(*dead_fake.address)  # type: ignore[misc]
                t0 = trio.current_time()
                dead_fake.stop()
                with pytest.raises((ConnectionError, OSError, trio.BrokenResourceError)):
                    await who(split(kaps["dead"].listen), timeout=5)
                await s.until(
                    "apiserver stopped, a client refused",
                    {
                        ("KapNoHealthyUpstream", sev["KapNoHealthyUpstream"], inst),
                        ("KapUpstreamDown", sev["KapUpstreamDown"], upstream),
                        ("KapClientsRefused", sev["KapClientsRefused"], inst),
                    },
                    t0,
                )
                t0 = trio.current_time()
                host, port = dead_fake.address  # type: ignore[misc]
                await lab.fake("dead", host=host, port=port)
                await s.until("apiserver back", set(), t0)

            async def refused() -> None:
                s = scenarios["refused"]
                inst = kaps["refused"].health or ""
                t0 = trio.current_time()
                refused_fake.require_token = "not-kap-s-token"
                key = ("KapCredentialsRefused", sev["KapCredentialsRefused"], inst)
                await s.until("token rejected (401)", {key}, t0)
                t0 = trio.current_time()
                refused_fake.require_token = pki.token
                await s.until("token accepted again", set(), t0)

            async def broken_discovery() -> None:
                s = scenarios["discovery"]
                inst = kaps["discovery"].health or ""
                await until_query(client, url, f'kap_discovery_up{{instance="{inst}"}} == 1')
                t0 = trio.current_time()
                disc_store.list_error = 500
                disc_fake.drop_connections()
                key = ("KapDiscoveryFailing", sev["KapDiscoveryFailing"], inst)
                await s.until("lists answer 500", {key}, t0)
                t0 = trio.current_time()
                disc_store.list_error = None
                await s.until("lists answer again", set(), t0)

            async def expiring_cert() -> None:
                s = scenarios["cert"]
                inst = kaps["cert"].health or ""
                key = cert.with_suffix(".key")
                soon_name, expiring_name = (
                    "KapClientCertificateExpiringSoon",
                    "KapClientCertificateExpiring",
                )
                soon = (soon_name, sev[soon_name], inst)
                expiring = (expiring_name, sev[expiring_name], inst)
                t0 = trio.current_time()
                await s.until("certificate for 3 days (from the first scrape)", {soon}, t0)
                t0 = trio.current_time()
                issue_client_cert(pki, cert, key, days=0.5)
                await s.until("rotated to one for 12 hours", {expiring}, t0)
                t0 = trio.current_time()
                issue_client_cert(pki, cert, key, days=365)
                await s.until("rotated to one for a year", set(), t0)

            async def down() -> None:
                s = scenarios["down"]
                inst = kaps["down"].health or ""
                t0 = trio.current_time()
                kaps["down"].process.kill()
                await s.until("kap killed", {("KapDown", sev["KapDown"], inst)}, t0)
                t0 = trio.current_time()
                kaps["down"] = await lab.kap(
                    "down2", down_fake, *ca, "--health-listen", down_health, *no_discovery
                )
                await s.until("kap restarted on its port", set(), t0)

            async def quiet(name: str, client_traffic: bool = False) -> None:
                """No alert for ``name`` while the others run (checked at the end too)."""
                if client_traffic:
                    assert await who(split(kaps[name].listen)) == name
                await scenarios[name].until("stays quiet", set(), trio.current_time())

            async with trio.open_nursery() as running:
                for job in (dead, refused, broken_discovery, expiring_cert, down):
                    running.start_soon(job)
                running.start_soon(quiet, "baseline", True)
                running.start_soon(quiet, "unauth")
            scenarios_s = round(trio.current_time() - started, 1)

            # ---- nothing else fired, ever
            expected = set().union(*(s.expected for s in scenarios.values()))
            assert set(alerts.seen) <= expected, set(alerts.seen) - expected
            unauth_probes = await query(
                client,
                url,
                f'kap_upstream_probe_results_total{{instance="{kaps["unauth"].health}",'
                'result="unauthenticated"} > 0',
            )
            assert unauth_probes, "the unauth kap's probes were not counted as unauthenticated"

            # ---- every dashboard panel query returns data
            empty = []
            for q in yaml.safe_load(QUERIES.read_text()):
                if not await query(client, url, q["query"]):
                    empty.append(f"{q['panel']} ({q['refId']}): {q['query']}")
            unexpected = [e for e in empty if e.split(" (")[0] not in EMPTY_ALLOWED]
            assert not unexpected, "dashboard queries without data:\n" + "\n".join(unexpected)

            report = {
                "prometheus_ready_s": ready_s,
                "scenarios_s": scenarios_s,
                "scenarios": {
                    s.name: {
                        "fired": sorted(f"{k[0]}{{severity={k[1]}, {k[2]}}}" for k in s.expected),
                        "timings_s": s.timings,
                    }
                    for s in scenarios.values()
                },
            }
            print(json.dumps(report, indent=1))
            if out := os.environ.get("KAP_E2E_REPORT"):
                await trio.Path(out).write_text(json.dumps(report, indent=1))
            nursery.cancel_scope.cancel()


async def until_query(client: httpx2.AsyncClient, url: str, expr: str) -> None:
    with trio.fail_after(ALERT_TIMEOUT):
        while not await query(client, url, expr):
            await trio.sleep(POLL)


def split(text: str | None) -> Any:
    from kap.address import Address

    assert text is not None
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))


async def _stop(process: trio.Process) -> None:
    """SIGTERM Prometheus by its PID, then SIGKILL if it has not gone within 5 s."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
