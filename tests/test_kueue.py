"""SpinRuns under a real Kueue (spin_k8s/testing/kueue.py: built from its Go module, its own CRDs, a
ClusterQueue with quota for one generation gang): the run says Queued while Kueue holds its Job, cancel and resume
go through Kueue's Workload instead of fighting Kueue over the Job's suspend field, and a Job that Kueue
suspended is never unsuspended by the controller, with or without a queueName."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from support import Controllers, create_run, get_run, spin_run, unsuspend

from spin_k8s import api as spin_api
from spin_k8s import naming
from spin_k8s.testing import kueue as kueue_env
from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = pytest.mark.cluster
# One generation Job of the runs below: 2 shards x the CPU pod's default request (500m, 2Gi).
ONE_GANG = {"cpu": "1", "memory": "4Gi"}


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueue_env.Kueue]:
    if not tools.kueue_binary().is_file():  # a failure, not a skip: the tests must not look green without it
        pytest.fail(f"Kueue is missing ({tools.kueue_binary()}): run scripts/install")
    k = kueue_env.Kueue(tmp_path_factory.mktemp("kueue"), cluster.kubeconfig).start()
    yield k
    k.stop()


@pytest.fixture
def managed(api: client.ApiClient, namespace: str, kueue: kueue_env.Kueue) -> str:
    """The test's namespace, managed by Kueue (Jobs without a queue name too)."""
    client.CoreV1Api(api).patch_namespace(namespace, {"metadata": {"labels": {kueue_env.MANAGED_LABEL: "true"}}})
    return namespace


def generate_job(api: client.ApiClient, namespace: str, run: str) -> client.V1Job | None:
    return next(iter(client.BatchV1Api(api).list_namespaced_job(
        namespace, label_selector=f"{naming.LABEL_RUN}={run},{naming.LABEL_ROLE}={naming.GENERATE}").items), None)


def condition(run: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (run.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def queued(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    run = get_run(api, namespace, name)
    return run if condition(run, "Queued").get("status") == "True" else None


def stays_suspended(api: client.ApiClient, namespace: str, job: str, seconds: float) -> list[bool]:
    """The Job's spec.suspend, sampled every 0.2 s for ``seconds``, then one False per Resumed event the Job
    controller recorded meanwhile: any False means someone unsuspended it."""
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)

    def resumed() -> int:
        return sum(e.count or 1 for e in core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={job},reason=Resumed").items)

    before, samples = resumed(), []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(bool(batch.read_namespaced_job(job, namespace).spec.suspend))
        time.sleep(0.2)
    return samples + [False] * (resumed() - before)


def cancel(api: client.ApiClient, namespace: str, run: str) -> None:
    """What `spinctl cancel` changes (`spinctl resume` is support.unsuspend)."""
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        spin_api.GROUP, spin_api.VERSION, namespace, spin_api.PLURAL, run, {"spec": {"suspend": True}})


def test_a_run_waits_queued_cancel_and_resume_go_through_kueue_and_quota_passes_to_the_next(
        api: client.ApiClient, crd: None, managed: str, kueue: kueue_env.Kueue, controllers: Controllers,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, s3_secret: str) -> None:
    ns = managed
    kueue.queue(ns, "team", ONE_GANG)
    controllers.start()
    for name in ("first", "second"):
        create_run(api, ns, spin_run(name, assets, s3_server, bucket, iterations=1, queueName="team"))
        if name == "first":  # admitted: the quota was free
            controllers.wait("first's Job admitted", lambda: (job := generate_job(api, ns, "first"))
                             and not job.spec.suspend, 60)
    second = controllers.wait("second to say Queued", lambda: queued(api, ns, "second"), 60)
    assert second["status"]["reason"] == "Queued"
    assert "waits for admission by Kueue (LocalQueue team)" in condition(second, "Queued")["message"]
    assert condition(get_run(api, ns, "first"), "Queued")["status"] == "False"

    cancel(api, ns, "first")
    first = controllers.wait_phase(api, "first", "Suspended", 60)
    job = generate_job(api, ns, "first")
    assert job is not None
    controllers.wait("Kueue to stop first's Job", lambda: client.BatchV1Api(api).read_namespaced_job(
        job.metadata.name, ns).spec.suspend, 30)
    workload = next(w for w in kueue.workloads(ns) if w["metadata"]["labels"].get(naming.LABEL_KUEUE_JOB_UID)
                    == job.metadata.uid)
    assert workload["spec"]["active"] is False, kueue_env.describe(kueue.workloads(ns))
    # Kueue admitted it and stopped it: nobody resumes it while the run is cancelled.
    assert all(stays_suspended(api, ns, job.metadata.name, 8)), kueue_env.describe(kueue.workloads(ns))
    assert first["status"]["phase"] == "Suspended"

    controllers.wait_phase(api, "second", "Succeeded", 300)  # the quota first gave back ran second's gang
    unsuspend(api, ns, "first")
    controllers.wait_phase(api, "first", "Succeeded", 300)
    assert all(w["spec"].get("active", True) for w in kueue.workloads(ns)), kueue_env.describe(kueue.workloads(ns))


def test_a_job_kueue_holds_without_a_queue_name_is_left_suspended_and_the_run_says_queued(
        api: client.ApiClient, crd: None, managed: str, kueue: kueue_env.Kueue, controllers: Controllers,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, s3_secret: str) -> None:
    ns = managed
    controllers.start()
    create_run(api, ns, spin_run("unqueued", assets, s3_server, bucket, iterations=1))
    run = controllers.wait("the run to say Queued", lambda: queued(api, ns, "unqueued"), 60)
    assert "suspended by another controller" in condition(run, "Queued")["message"]
    job = generate_job(api, ns, "unqueued")
    assert job is not None
    # manageJobsWithoutQueueName: Kueue suspended the Job it found running, and has no queue to admit it to.
    assert all(stays_suspended(api, ns, job.metadata.name, 8)), kueue_env.describe(kueue.workloads(ns))
    assert any(w["metadata"]["labels"].get(naming.LABEL_KUEUE_JOB_UID) == job.metadata.uid
               for w in kueue.workloads(ns))
    assert get_run(api, ns, "unqueued")["status"]["phase"] == "Generating"
