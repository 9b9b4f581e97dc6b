"""The controller under the faults a real cluster has, on the real control plane, each controller a real process:
a leader paused past its lease (SIGSTOP), a leader stopped (SIGTERM), a leader cut off from the API server, and
a connection that goes silent without closing (a blackholing TCP proxy, spin_k8s/testing/proxy.py, between the
controller and the API server).

Runs use simulated pods (the node agent ends them at once) and the outputs their workers would have written:
what is under test is who writes, and when, not the workers.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from support import (
    SIMULATED,
    Controllers,
    create_run,
    get_run,
    job_names,
    metric,
    spin_run,
    unsuspend,
    write_outputs,
)

from spin_k8s import api as spin_api
from spin_k8s.controller import manager
from spin_k8s.controller.manager import LEASE_NAME, LeaseTimes, Manager, NotLeading
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import Process, free_port, wait_until
from spin_k8s.testing.proxy import Proxy
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL


def holder(api: client.ApiClient, namespace: str) -> str | None:
    lease = client.CoordinationV1Api(api).read_namespaced_lease(LEASE_NAME, namespace)
    return lease.spec.holder_identity  # type: ignore[no-any-return]


def identity(proc: Process) -> str:
    """The identity a controller process holds the Lease under (the manager's: hostname-pid)."""
    return f"{socket.gethostname()}-{proc.popen.pid}"


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def suspended_run(api: client.ApiClient, namespace: str, assets: tiny.TinyAssets, s3_server: S3Server,
                  bucket: str) -> dict[str, Any]:
    """A suspended one-iteration run of simulated pods, with what its workers would write already in storage."""
    created = create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, suspend=True,
                                                  **SIMULATED))
    write_outputs(s3_server, bucket, created, iterations=1)
    return created


def written_state(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    """Every object a controller writes in the namespace, by kind and name, with its resourceVersion: any write
    (a status patch, a Job or Service created, deleted or patched, an event) changes it."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    runs = client.CustomObjectsApi(api).list_namespaced_custom_object(G, V, namespace, P)["items"]
    return {
        "runs": {r["metadata"]["name"]: r["metadata"]["resourceVersion"] for r in runs},
        "jobs": {j.metadata.name: j.metadata.resource_version for j in batch.list_namespaced_job(namespace).items},
        "services": {s.metadata.name: s.metadata.resource_version
                     for s in core.list_namespaced_service(namespace).items},
        "events": sorted(e.metadata.name for e in core.list_namespaced_event(namespace).items
                         if e.involved_object.kind == spin_api.KIND),
    }


def proxied_kubeconfig(cluster: Cluster, proxy: Proxy, path: Path) -> Path:
    """The admin kubeconfig, its server the proxy (the serving certificate is valid for 127.0.0.1)."""
    path.write_text(cluster.kubeconfig.read_text().replace(cluster.server, f"https://127.0.0.1:{proxy.port}"))
    return path


def test_a_paused_leader_is_replaced_and_writes_nothing_when_it_resumes(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """The leader is paused (SIGSTOP) with a run it has seen suspended; the run is resumed, the standby takes
    over once the lease has passed and finishes it. The old leader, resumed (SIGCONT), finds a backlog of watch
    events and a due resync, but its last renewal is older than the renew deadline: it writes nothing (no object
    a controller writes changes) and exits. Whether a worker gets as far as trying a write before the renewal
    sees the new holder is a race; the fence that refuses it then is shown without one by the next test."""
    leader = controllers.start("--lease-seconds=4")
    controllers.wait("the first controller to lead", lambda: holder(api, namespace) == identity(leader), 60)
    standby = controllers.start("--lease-seconds=4")
    suspended_run(api, namespace, assets, s3_server, bucket)
    controllers.wait_phase(api, "demo", "Suspended", 60)
    controllers.unwatch(leader)
    leader.popen.send_signal(signal.SIGSTOP)
    unsuspend(api, namespace, "demo")
    controllers.wait("the standby to take over", lambda: holder(api, namespace) == identity(standby), 60)
    controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]
    before = written_state(api, namespace)

    leader.popen.send_signal(signal.SIGCONT)
    controllers.wait("the resumed leader to exit", lambda: leader.popen.poll() is not None, 60)
    assert leader.popen.returncode == 1
    log = leader.log.read_text()
    assert "lost the leader Lease" in log, log[-3000:]
    time.sleep(1)  # let any write it sent as it died land before looking
    assert written_state(api, namespace) == before
    assert holder(api, namespace) == identity(standby)
    print("writes refused after the resume:", log.count("refused "))


def test_a_leader_past_its_renew_deadline_sends_no_write(cluster: Cluster, namespace: str) -> None:
    """The fence at the client's exit point, in-process: a leader whose renewal stalled (nothing renews it here,
    as nothing does in a paused process) has its writes refused before they are sent once the renew deadline
    has passed, while reads and the Lease's own renewal still go out; a renewal makes writes possible again."""
    own = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    fenced = Manager(own, namespace, "fenced", namespace, lease=LeaseTimes(3, 1, 0.5))
    elector, core = fenced.elector, client.CoreV1Api(own)
    assert elector is not None and elector.try_acquire_or_renew()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}})
    wait_until("the renew deadline to pass", lambda: not elector.renewed_in_time(), 10)
    with pytest.raises(NotLeading):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}})
    assert core.list_namespaced_config_map(namespace, field_selector="metadata.name=after").items == []
    assert elector.try_acquire_or_renew()  # the Lease's own update is not fenced
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "renewed"}})


def test_a_stopped_leader_releases_the_lease_and_the_standby_takes_over_at_once(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers) -> None:
    """SIGTERM: the leader clears the Lease's holder before it exits, so the standby acquires it within its
    retry period instead of after the lease duration (60 s here: only a release explains a quick takeover)."""
    args = ("--lease-seconds=60", "--retry-period-seconds=0.5")
    leader = controllers.start(*args)
    controllers.wait("the first controller to lead", lambda: holder(api, namespace) == identity(leader), 60)
    standby = controllers.start(*args)
    controllers.wait("the standby to stand by", lambda: "standing by" in standby.log.read_text(), 60)
    started = time.monotonic()
    controllers.kill(leader, signal.SIGTERM)
    exited = time.monotonic()
    assert holder(api, namespace) in (None, "", identity(standby))  # never the stopped leader's any more
    assert leader.popen.returncode == 0
    assert "released the leader Lease" in leader.log.read_text()
    controllers.wait("the standby to acquire", lambda: holder(api, namespace) == identity(standby), 120)
    print(f"hand-over: {time.monotonic() - started:.2f}s from SIGTERM ({exited - started:.2f}s to exit)")


def test_a_leader_cut_off_from_the_api_server_fails_healthz_and_exits(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        tmp_path: Path) -> None:
    """The leader's connections go silent (the proxy blackholes them): it cannot renew, /healthz answers 500
    once the renew deadline has passed while it still believes it leads, and the process exits."""
    port = free_port()
    with Proxy(("127.0.0.1", cluster.apiserver_port)) as proxy:
        kubeconfig = proxied_kubeconfig(cluster, proxy, tmp_path / "proxied.kubeconfig")
        leader = controllers.start(f"--kubeconfig={kubeconfig}", f"--metrics-bind=127.0.0.1:{port}",
                                   "--lease-seconds=4", "--renew-deadline-seconds=2", "--retry-period-seconds=1.5")
        controllers.wait("the controller to lead", lambda: holder(api, namespace) == identity(leader), 60)
        controllers.wait("/healthz ok", lambda: healthz(port) == 200, 30)
        controllers.unwatch(leader)
        proxy.blackhole()
        answers = []

        def exited() -> bool:
            with contextlib.suppress(OSError):  # the server goes with the process
                answers.append(healthz(port))
            return leader.popen.poll() is not None

        controllers.wait("the cut-off leader to exit", exited, 60)
    assert 500 in answers, answers
    assert leader.popen.returncode == 1
    assert "not renewed within the renew deadline" in leader.log.read_text()


def test_a_silent_connection_does_not_stall_the_controller(
        cluster: Cluster, api: client.ApiClient, crd: None, namespace: str, controllers: Controllers,
        s3_secret: str, assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    """Every connection of the controller goes silent (blackholed, never closed) and new ones hang too; the
    run is resumed meanwhile. Once the proxy forwards again, the controller sees the change within its watch
    timeout plus its request timeout (10 + 5 s here) after the last byte it got, and finishes the run. Without
    client-side timeouts its watches wait on the dead connections forever and the run never starts."""
    with Proxy(("127.0.0.1", cluster.apiserver_port)) as proxy:
        kubeconfig = proxied_kubeconfig(cluster, proxy, tmp_path / "proxied.kubeconfig")
        controllers.start(f"--kubeconfig={kubeconfig}", "--no-leader-elect", "--watch-timeout-seconds=10",
                          "--request-timeout-seconds=5")
        suspended_run(api, namespace, assets, s3_server, bucket)
        controllers.wait_phase(api, "demo", "Suspended", 60)
        proxy.blackhole()
        unsuspend(api, namespace, "demo")
        time.sleep(3)  # the resync (5 s) comes due while everything is silent
        assert get_run(api, namespace, "demo")["status"]["phase"] == "Suspended"
        restored = time.monotonic()
        proxy.restore()
        controllers.wait_phase(api, "demo", "Succeeded", 120)
    print(f"finished {time.monotonic() - restored:.1f}s after the proxy forwarded again")


def test_relists_are_paginated(api: client.ApiClient, crd: None, namespace: str, assets: tiny.TinyAssets,
                               s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relist fetches every page (two objects a page here), for built-in kinds (models) and SpinRuns (dicts)."""
    monkeypatch.setattr(manager, "PAGE", 2)
    core = client.CoreV1Api(api)
    for i in range(5):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"cm-{i}"}})
        create_run(api, namespace, spin_run(f"run-{i}", assets, s3_server, bucket, suspend=True))
    maps, _ = manager._list(core.list_namespaced_config_map, namespace=namespace)
    assert {m.metadata.name for m in maps} >= {f"cm-{i}" for i in range(5)}
    runs, rv = manager._list(client.CustomObjectsApi(api).list_namespaced_custom_object, group=G, version=V,
                             namespace=namespace, plural=P)
    assert sorted(r["metadata"]["name"] for r in runs) == [f"run-{i}" for i in range(5)] and rv


def test_watches_resume_where_they_ended_without_listing_again(namespace: str, crd: None,
                                                               controllers: Controllers) -> None:
    """The server ends each watch after 2 s here; each is started again from the last resourceVersion it saw
    (an event's or a bookmark's), not from a new list: with nothing in the namespace and no Lease, the only GETs
    are the four first lists (runs, Jobs, Services, runtimes), however many watches ran."""
    port = free_port()
    controllers.start("--no-leader-elect", "--watch-timeout-seconds=2", f"--metrics-bind=127.0.0.1:{port}")
    controllers.wait("every watch to be resumed twice", lambda: metric(
        port, "spin_controller_api_requests_total", verb="WATCH") >= 12, 60)
    assert metric(port, "spin_controller_api_requests_total", verb="GET") == 4
