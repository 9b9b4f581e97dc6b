"""What the API server refuses, and Jobs that vanish, on the real control plane: a refused create or a pod the
Job controller cannot create becomes a condition with the server's words (backed off, never a hot loop), and
a deleted attempt neither resets the restart budget nor makes the controller re-create a name.

Simulated pods (the node agent's annotations): these tests are about orchestration, not the workers.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from support import (
    SIMULATED,
    Controllers,
    create_run,
    get_run,
    job_names,
    metric,
    progressing,
    quota,
    spin_run,
    warnings,
    write_outputs,
)

from spin_k8s import api as spin_api
from spin_k8s.controller import crdcheck
from spin_k8s.controller.manager import LEASE_NAME
from spin_k8s.testing.nodeagent import HANG_ANNOTATION
from spin_k8s.testing.processes import free_port
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL


def test_a_refused_job_is_a_condition_with_the_servers_words_backed_off_then_the_run_goes_on(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    port = free_port()
    controllers.start(f"--metrics-bind=127.0.0.1:{port}")
    quota(api, controllers, "no-jobs", {"count/jobs.batch": "0"})
    created = create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, **SIMULATED))
    write_outputs(s3_server, bucket, created, iterations=1)

    condition = controllers.wait("the refusal in the status", lambda: progressing(
        api, namespace, "demo", "JobCreationFailed"), 60)
    assert condition["status"] == "False"
    assert condition["message"].startswith(
        'creating Job demo-i0-gen: jobs.batch "demo-i0-gen" is forbidden: exceeded quota: no-jobs'), condition
    assert "Audit-Id" not in condition["message"]  # the server's message, not the client's exception dump
    run = get_run(api, namespace, "demo")
    assert (run["status"]["phase"], run["status"]["reason"], job_names(api, namespace, "demo")) == (
        "Pending", "JobCreationFailed", [])

    # Backed off: over a 12 s window a retry loop at the work queue's pace would reconcile hundreds of times.
    before = metric(port, "spin_controller_reconciles_total", result="error")
    time.sleep(12)
    assert metric(port, "spin_controller_reconciles_total", result="error") - before <= 6
    assert len(warnings(api, namespace, "JobCreationFailed")) == 1  # one event, not one per retry

    client.CoreV1Api(api).delete_namespaced_resource_quota("no-jobs", namespace)
    run = controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert run["status"]["reason"] == "Completed"
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]


def test_pods_the_job_controller_cannot_create_are_named_in_the_status(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    controllers.start()
    quota(api, controllers, "no-pods", {"pods": "0"})
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, **SIMULATED))
    condition = controllers.wait("the pods' refusal in the status", lambda: progressing(
        api, namespace, "demo", "PodCreationFailed"), 90)
    message = condition["message"]
    assert message.startswith('Job demo-i0-gen: Error creating: pods "demo-i0-gen-'), message
    assert "is forbidden: exceeded quota: no-pods" in message
    run = get_run(api, namespace, "demo")
    assert (condition["status"], run["status"]["phase"], run["status"]["reason"]) == (
        "False", "Generating", "PodCreationFailed")


def test_a_deleted_attempt_is_counted_and_its_name_never_reused(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """Generation has one attempt per grant. Deleting the running Job spends it (the run fails, saying so) instead
    of re-creating the same Job forever; `spinctl resume` grants one more, which starts attempt r1."""
    batch, objects = client.BatchV1Api(api), client.CustomObjectsApi(api)
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1,
                                        podAnnotations={HANG_ANNOTATION: "true"}))

    def failed() -> dict[str, Any] | None:
        run = get_run(api, namespace, "demo")
        return run if (run.get("status") or {}).get("phase") == "Failed" else None

    for attempt, job, resumes in ((1, "demo-i0-gen", 0), (2, "demo-i0-gen-r1", 1)):
        controllers.wait(f"{job} to run", lambda job=job: job in job_names(api, namespace, "demo") or None, 60)
        batch.delete_namespaced_job(job, namespace, propagation_policy="Background")
        run = controllers.wait("the run to fail", failed, 60)
        message = next(c["message"] for c in run["status"]["conditions"] if c["type"] == "Failed")
        assert message.startswith(f"{job} was deleted before it finished, attempt {attempt}"), message
        (item,) = run["status"]["iterations"]
        assert (item["generateAttempts"], run["status"]["restarts"]) == (attempt, attempt - 1)
        assert job_names(api, namespace, "demo") == []  # nothing re-created
        objects.patch_namespaced_custom_object(G, V, namespace, P, "demo", {
            "metadata": {"annotations": {spin_api.RESUME_ANNOTATION: str(resumes + 1)}}})
    controllers.wait("demo-i0-gen-r2 after the second resume", lambda: job_names(api, namespace, "demo")
                     == ["demo-i0-gen-r2"] or None, 60)


@pytest.mark.parametrize(("plural", "kind", "prop", "path"), [
    (P, "SpinRun", "restarts", "status.restarts"),
    (spin_api.RUNTIME_PLURAL, "SpinRuntime", "storage", "spec.storage")])
def test_a_controller_refuses_to_start_on_an_older_crd_naming_what_it_lacks(
        api: client.ApiClient, crd: None, controllers: Controllers, plural: str, kind: str, prop: str,
        path: str) -> None:
    """`helm upgrade` leaves crds/ alone: a new controller on the old CRD would lose pruned fields and rewrite
    its status forever. The installed CRD loses one property for the length of this test."""
    ext = client.ApiextensionsV1Api(api)
    name = f"{plural}.{G}"
    (version,) = [i for i, v in enumerate(ext.read_custom_resource_definition(name).spec.versions) if v.name == V]
    parent, _ = path.split(".")
    pointer = f"/spec/versions/{version}/schema/openAPIV3Schema/properties/{parent}/properties/{prop}"
    removed = ext.read_custom_resource_definition(name).spec.versions[version].schema.open_apiv3_schema \
        .properties[parent].properties[prop]
    ext.patch_custom_resource_definition(name, [{"op": "remove", "path": pointer}])
    try:
        proc = controllers.start()
        controllers.unwatch(proc)
        assert proc.popen.wait(60) == 1
        log = proc.log.read_text()
        lacks = ", ".join(sorted(p for p in crdcheck.property_paths(
            spin_api.schema() if kind == "SpinRun" else spin_api.runtime_schema()) if p.startswith(path)))
        assert (f"refusing to start: the installed {kind} CRD is older than this controller (it lacks {lacks}): "
                "kubectl apply --server-side --force-conflicts -f charts/spin/crds/") in log, log
    finally:
        ext.patch_custom_resource_definition(name, [{"op": "add", "path": pointer,
                                                     "value": api.sanitize_for_serialization(removed)}])
    # With the CRD whole again, a controller starts and stays up.
    proc = controllers.start()
    controllers.wait("the controller to lead", lambda: client.CoordinationV1Api(api).read_namespaced_lease(
        LEASE_NAME, controllers.namespace).spec.holder_identity.endswith(f"-{proc.popen.pid}"), 60)


def test_storage_the_platform_did_not_allow_is_refused_naming_the_chart_value(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, s3_secret: str,
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """A tenant cannot point the controller at another endpoint (here the cloud metadata address) nor, without a
    credentials Secret, make it use its own identity: the controller contacts neither and creates nothing."""
    controllers.start()  # allowed: the test S3 server's endpoint only
    create_run(api, namespace, spin_run("elsewhere", assets, s3_server, bucket, iterations=1, storage={
        "uri": f"s3://{bucket}/spin", "credentialsSecret": "s3", "endpoint": "http://169.254.169.254"}))
    create_run(api, namespace, spin_run("mine", assets, s3_server, bucket, iterations=1, storage={
        "uri": f"s3://{bucket}/spin", "endpoint": s3_server.endpoint}))
    endpoint = controllers.wait("the endpoint refused", lambda: progressing(
        api, namespace, "elsewhere", "EndpointNotAllowed"), 60)
    assert endpoint["message"] == (
        f"spec.storage.endpoint http://169.254.169.254 is not one the controller may reach (allowed: "
        f"{s3_server.endpoint}; chart value storage.allowedEndpoints)")
    identity = controllers.wait("the controller's identity refused", lambda: progressing(
        api, namespace, "mine", "CredentialsRequired"), 60)
    assert identity["message"] == ("spec.storage.credentialsSecret is required: the controller uses its own identity "
                                   "nowhere (chart value storage.controllerIdentityPrefixes)")
    assert job_names(api, namespace, "elsewhere") == job_names(api, namespace, "mine") == []


def test_storage_credentials_fixed_after_a_refusal_are_read_again_at_the_next_retry(
        api: client.ApiClient, crd: None, namespace: str, controllers: Controllers, assets: tiny.TinyAssets,
        s3_server: S3Server, bucket: str) -> None:
    """The controller trusts a credentials Secret for an hour (a read per step would cost more than the step's
    writes), except once storage refuses a request: wrong keys, then rotated ones, are read again at the next
    retry, and the run goes on without a restart of anything."""
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"}})
    controllers.start()
    create_run(api, namespace, spin_run("demo", assets, s3_server, bucket, iterations=1, **SIMULATED))

    def refused() -> dict[str, Any] | None:
        conditions = (get_run(api, namespace, "demo").get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "StorageAvailable" and c["status"] == "False"), None)

    condition = controllers.wait("StorageAvailable=False", refused, 60)
    assert "InvalidAccessKeyId" in condition["message"], condition
    assert job_names(api, namespace, "demo") == []  # nothing starts on storage the controller cannot use
    core.patch_namespaced_secret("s3", namespace, {"stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    controllers.wait("the generation Job", lambda: job_names(api, namespace, "demo") == ["demo-i0-gen"] or None, 60)
    assert refused() is None
