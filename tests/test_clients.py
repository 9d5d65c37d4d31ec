"""Real Kubernetes clients through kap: kubectl, and lightkube watching across a failover.

kap does not terminate TLS, so a client verifies the apiserver's certificate
and authenticates end to end, exactly as without kap; these tests prove the
bytes get through with real client stacks, not only with the fakes' raw mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx2
import trio
from fakeapi import PkiFiles, SliceStore, endpoint_slice
from kaptest import StartFake, make_config, start_kap, upstream, wait_until
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.resources.discovery_v1 import EndpointSlice

from kap.app import Bound

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
WATCH = "watch=true"


async def kap_in_front(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    port: int,
    slice_store: SliceStore,
    hosts: tuple[str, ...] = HOSTS[:2],
) -> tuple[Any, Bound, dict[str, Any]]:
    fakes = {h: await start_fake(h, host=h, port=port, require_token=pki.token) for h in hosts}
    slice_store.put(
        endpoint_slice("kubernetes", [(h, True) for h in hosts], ports=[("https", port)])
    )
    config = make_config(
        pki,
        fallback_upstreams=",".join(f"{h}:{port}" for h in hosts),
        token_file=str(pki.token_file),
    )
    app, bound = await start_kap(nursery, config)
    await wait_until(lambda: all(upstream(app, f).usable for f in fakes.values()))
    return app, bound, fakes


async def kubectl_run(kubectl: Path, home: Path, bound: Bound, pki: PkiFiles, *args: str) -> str:
    """kubectl against kap's port, with no kubeconfig and its caches under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HTTP", "HTTPS"))}
    env.update({"HOME": str(home), "NO_PROXY": "*"})
    command = [
        str(kubectl),
        "--server",
        f"https://127.0.0.1:{bound.proxy.port}",
        "--certificate-authority",
        str(pki.ca_file),
        "--tls-server-name",
        "kubernetes.default.svc",
        "--token",
        pki.token,
        "--request-timeout",
        "5s",
        *args,
    ]
    with trio.fail_after(20):
        result = await trio.run_process(
            command, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode())


async def test_kubectl_lists_endpointslices_through_kap(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    kubectl: Path,
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        _, bound, fakes = await kap_in_front(nursery, start_fake, pki, free_port, slice_store)
        out = await kubectl_run(
            kubectl, tmp_path, bound, pki, "get", "endpointslices", "-n", "default", "-o", "json"
        )
        doc = json.loads(out)
        assert [item["metadata"]["name"] for item in doc["items"]] == ["kubernetes"]
        addresses = [ep["addresses"][0] for ep in doc["items"][0]["endpoints"]]
        assert addresses == list(HOSTS[:2])
        out = await kubectl_run(kubectl, tmp_path, bound, pki, "get", "--raw", "/readyz")
        assert out.strip() == "ok"
        # The requests reached the apiservers as kubectl's own, token and all.
        users = {r.user for f in fakes.values() for r in f.requests if "endpointslices" in r.target}
        assert users == {"system:serviceaccount:kube-system:kap"}


async def test_lightkube_watch_resumes_through_another_upstream_when_one_dies(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    with trio.fail_after(20):
        _, bound, fakes = await kap_in_front(
            nursery, start_fake, pki, free_port, slice_store, HOSTS
        )
        config = KubeConfig.from_one(
            cluster=Cluster(
                server=f"https://127.0.0.1:{bound.proxy.port}", certificate_auth=str(pki.ca_file)
            ),
            user=User(token=pki.token),
        )
        client = AsyncClient(config, trust_env=False, timeout=httpx2.Timeout(5.0))
        listing = client.list(EndpointSlice, namespace="default")
        names = [s.metadata.name async for s in listing]
        assert names == ["kubernetes"]
        rv = listing.resourceVersion

        seen: list[str] = []
        resumed = 0
        killed: list[str] = []

        async def kill_the_watched_one_then_change() -> None:
            await wait_until(lambda: slice_store.open_watches == 1)
            victim = next(h for h, f in fakes.items() if any(WATCH in r.target for r in f.requests))
            killed.append(victim)
            fakes[victim].stop()  # resets the watch connection, refuses new dials
            await wait_until(lambda: slice_store.open_watches == 1)
            slice_store.put(endpoint_slice("resumed", [("10.0.0.9", True)]))

        nursery.start_soon(kill_the_watched_one_then_change)
        while "resumed" not in seen and resumed < 5:
            stream = client.watch(EndpointSlice, namespace="default", resource_version=rv)
            try:
                async for kind, obj in stream:
                    rv = obj.metadata.resourceVersion
                    seen.append(obj.metadata.name)
                    if obj.metadata.name == "resumed":
                        assert kind == "ADDED"
                        break
            except httpx2.TransportError:
                resumed += 1  # the upstream died under the watch: resume from rv
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        assert seen[-1] == "resumed" and resumed == 1
        # Two watches, served by two apiservers: the killed one, then another.
        watched = [h for h, f in fakes.items() if any(WATCH in r.target for r in f.requests)]
        assert killed[0] in watched and len(watched) == 2
        await client.close()
