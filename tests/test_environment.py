"""The test environment is real: the Job controller, the scheduler, RBAC, CRD validation, S3 conditional
writes and helm all behave as they do on a real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from typing import Any

import botocore.exceptions
import pytest
from invalid_specs import valid
from kubernetes import client
from kubernetes.client.rest import ApiException

from spin_k8s import api as spin_api
from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import wait_until
from spin_k8s.testing.s3 import MAX_VOLUMES, S3Server

pytestmark = pytest.mark.cluster


def _job(name: str, command: str, completions: int = 1, subdomain: str | None = None) -> dict[str, object]:
    pod_spec: dict[str, object] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", command]}],
    }
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {
        "metadata": {"name": name},
        "spec": {"completions": completions, "parallelism": completions, "completionMode": "Indexed",
                 "backoffLimit": 0, "template": {"spec": pod_spec}},
    }


def _condition(job: client.V1Job) -> str | None:
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return str(c.type)
    return None


def _finished(batch: client.BatchV1Api, name: str, namespace: str) -> client.V1Job:
    def finished() -> client.V1Job | None:
        job = batch.read_namespaced_job(name, namespace)
        return job if _condition(job) else None

    return wait_until(f"job {name} to finish", finished, 90)


def test_indexed_job_with_headless_service_completes(cluster: Cluster, api: client.ApiClient,
                                                     namespace: str) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "gang"},
        "spec": {"clusterIP": "None", "selector": {"job-name": "pair"}, "ports": [{"port": 29500}]},
    })
    # Each pod prints its completion index and hostname, and resolves its peer the way a training gang
    # finds its master: through the headless Service's name.
    command = ('echo "index=$JOB_COMPLETION_INDEX host=$(hostname)"; '
               f'getent hosts pair-0.gang.{namespace}.svc.cluster.local')
    batch.create_namespaced_job(namespace, _job("pair", command, completions=2, subdomain="gang"))
    job = _finished(batch, "pair", namespace)
    assert _condition(job) == "Complete"
    assert job.status.succeeded == 2

    pods = core.list_namespaced_pod(namespace, label_selector="job-name=pair").items
    by_index = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_index) == ["0", "1"]
    for index, pod in by_index.items():
        assert pod.status.phase == "Succeeded"
        out = cluster.pod_log(namespace, pod.metadata.name, "main")
        assert f"index={index} host=pair-{index}" in out
        assert out.splitlines()[-1].startswith("127.0.0.1")  # the master name resolves, on loopback


def test_failing_pod_fails_the_job_with_its_exit_code(api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, _job("broken", "echo about to fail; exit 3"))
    job = _finished(batch, "broken", namespace)
    assert _condition(job) == "Failed"
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    (pod,) = core.list_namespaced_pod(namespace, label_selector="job-name=broken").items
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3


def test_container_logs_are_served_through_the_apiserver(cluster: Cluster, api: client.ApiClient,
                                                         namespace: str) -> None:
    core = client.CoreV1Api(api)
    # The pod prints three lines, then waits for a file the test writes, then prints a last line: a follow
    # started while it runs must see the last line arrive and end when the pod does.
    command = 'for i in 1 2 3; do echo "line $i"; done; while [ ! -e go ]; do sleep 0.1; done; echo done'
    container = {"name": "main", "image": "busybox", "command": ["sh", "-c", command]}
    core.create_namespaced_pod(namespace, {"metadata": {"name": "talk"},
                                           "spec": {"restartPolicy": "Never", "containers": [container]}})
    wait_until("the first lines", lambda: "line 3" in (core.read_namespaced_pod_log("talk", namespace) or ""),
               60)  # the client gives None for an empty log
    assert core.read_namespaced_pod_log("talk", namespace, tail_lines=2) == "line 2\nline 3\n"
    follow = subprocess.Popen([str(tools.kube_binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}", "-n",
                               namespace, "logs", "-f", "talk"], stdout=subprocess.PIPE, text=True)
    (pod_dir,) = (cluster.node_root / "pods").glob(f"{namespace}_talk_*")
    (pod_dir / "go").touch()
    out, _ = follow.communicate(timeout=60)
    assert (follow.returncode, out) == (0, "line 1\nline 2\nline 3\ndone\n")
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod_log("talk", namespace, container="nope")
    assert missing.value.status == 400  # the apiserver itself refuses a container the pod does not have


def test_pod_env_from_downward_api_and_secret(cluster: Cluster, api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cret"}})
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "env", "labels": {"role": "probe"}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "busybox", "command": ["sh", "-c", "echo $(GREETING) $POD $ROLE $KEY"],
            "env": [
                {"name": "GREETING", "value": "hi"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            ]}]},
    })
    wait_until("the pod to succeed", lambda: core.read_namespaced_pod("env", namespace).status.phase
               == "Succeeded", 60)
    assert cluster.pod_log(namespace, "env", "main").strip() == "hi env probe s3cret"


def test_crd_with_status_subresource_rejects_invalid_object(api: client.ApiClient, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(api)
    group = f"{namespace}.example.dev"  # one group per test: CRDs are cluster-scoped
    ext.create_custom_resource_definition({
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"],
                             "properties": {"size": {"type": "integer", "minimum": 1}}},
                    "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                }}},
            }],
        },
    })
    try:
        wait_until("the CRD to be established", lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(f"widgets.{group}").status.conditions or []), 30)
        objects = client.CustomObjectsApi(api)

        def create(size: object) -> object:
            body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": f"w{size}"},
                    "spec": {"size": size}}
            return objects.create_namespaced_custom_object(group, "v1", namespace, "widgets", body)

        wait_until("the new API to serve", lambda: create(2), 30)
        with pytest.raises(ApiException) as rejected:
            create(0)
        assert rejected.value.status == 422
        assert "spec.size" in rejected.value.body
        # The status subresource is separate: a status write through the main resource is dropped.
        objects.patch_namespaced_custom_object(group, "v1", namespace, "widgets", "w2", {"status": {"ready": True}})
        assert "status" not in objects.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w2")
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


@pytest.mark.s3
def test_s3_conditional_put_on_existing_key_fails_with_412(s3_server: S3Server, bucket: str) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="manifest.json", Body=b"{}", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as lost:
        s3.put_object(Bucket=bucket, Key="manifest.json", Body=b"{\"other\": 1}", IfNoneMatch="*")
    assert lost.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="manifest.json")["Body"].read() == b"{}"


@pytest.mark.s3
def test_s3_has_a_volume_for_every_bucket_a_session_makes_whatever_the_free_disk(s3_server: S3Server) -> None:
    """weed's default allowance is (free disk / volume size) volumes, one per bucket: with 12 GiB free a CI
    run's 13th bucket could not be written. The master must offer MAX_VOLUMES however full the disk is."""
    status = json.load(urllib.request.urlopen(f"{s3_server.master_url}/dir/status"))
    assert status["Topology"]["Max"] == MAX_VOLUMES


@pytest.mark.s3
def test_s3_rejects_wrong_credentials(s3_server: S3Server, bucket: str) -> None:
    import boto3

    intruder = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                            aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as denied:
        intruder.list_objects_v2(Bucket=bucket)
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_helm_install_wait(cluster: Cluster, api: client.ApiClient, namespace: str) -> None:
    chart = os.path.join(os.path.dirname(__file__), "data", "tiny-chart")
    helm = [str(tools.helm_binary()), "--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace]
    done = subprocess.run([*helm, "install", "tiny", chart, "--wait", "--timeout", "60s",
                           "--set", "greeting=from-helm"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    deployment = client.AppsV1Api(api).read_namespaced_deployment("tiny", namespace)
    assert deployment.status.ready_replicas == 1
    (pod,) = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="app=tiny").items
    assert pod.status.phase == "Running"
    assert wait_until("the greeting", lambda: "from-helm" in cluster.pod_log(namespace, pod.metadata.name,
                                                                             "main"), 10)
    done = subprocess.run([*helm, "uninstall", "tiny", "--wait"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_spinrun_fields_that_define_a_run_are_immutable_and_suspend_is_not(api: client.ApiClient, crd: None,
                                                                           namespace: str) -> None:
    """Changing storage.uri mid-run ended in OutputMissing: the API server now refuses any change to what defines a
    run (CEL transition rules), naming the field, while what spinctl suspend / resume and users change during a run
    (suspend, the resume annotation, restartLimit, pod placement) is still accepted."""
    objects = client.CustomObjectsApi(api)
    G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL
    body = valid("frozen")
    body["spec"].update(suspend=True, iterationOverrides=[{"iteration": 1, "beta": 5.0}])
    created = objects.create_namespaced_custom_object(G, V, namespace, P, body)

    def refusal(spec: dict[str, object]) -> str:
        with pytest.raises(ApiException) as refused:
            objects.patch_namespaced_custom_object(G, V, namespace, P, "frozen", {"spec": spec})
        assert refused.value.status == 422, refused.value.body
        message: str = json.loads(refused.value.body)["message"]
        return message

    assert "spec.storage: Invalid value: storage is immutable once the run is created" in refusal(
        {"storage": {"uri": "s3://elsewhere/runs"}})
    changes: list[tuple[str, dict[str, object]]] = [
        ("storage", {"storage": {"credentialsSecret": "s3"}}),
        ("model", {"model": "s3://models/other"}), ("dataset", {"dataset": "s3://data/other.jsonl"}),
        ("iterations", {"iterations": 3}), ("data", {"data": {"systemPrompt": ""}}),
        ("generation", {"generation": {"temperature": 0}}), ("training", {"training": {"learningRate": 1e-6}}),
        ("iterationOverrides", {"iterationOverrides": [{"iteration": 1, "beta": 1.0}]}),
        ("iterationOverrides", {"iterationOverrides": None}),  # removed: the field's own rule is not evaluated
        ("earlyStop", {"earlyStop": {"minRewardAccuracy": 0.6}}),  # added
    ]
    for field, spec in changes:
        assert f"spec.{field}: " in (message := refusal(spec)), (spec, message)
        assert f"{field} is immutable once the run is created" in message, (spec, message)
    # What was refused was not stored; what spinctl resume and a user change during a run is accepted.
    resumed = objects.patch_namespaced_custom_object(G, V, namespace, P, "frozen", {
        "metadata": {"annotations": {spin_api.RESUME_ANNOTATION: "1"}}, "spec": {"suspend": False}})
    assert resumed["spec"]["suspend"] is False
    changed = objects.patch_namespaced_custom_object(G, V, namespace, P, "frozen", {"spec": {
        "suspend": True, "restartLimit": 5, "queueName": "team-a", "podLabels": {"team": "a"},
        "images": {"pullPolicy": "Always"}, "nodeSelector": {"pool": "gpu"}}})
    assert (changed["spec"]["restartLimit"], changed["spec"]["podLabels"]) == (5, {"team": "a"})
    assert {k: v for k, v in changed["spec"].items() if k in {"storage", "model", "iterations", "training",
                                                              "iterationOverrides", "earlyStop"}} == {
        k: v for k, v in created["spec"].items() if k in {"storage", "model", "iterations", "training",
                                                         "iterationOverrides", "earlyStop"}}
    # The status subresource is not held by the rules: the controller writes it throughout.
    objects.patch_namespaced_custom_object_status(G, V, namespace, P, "frozen", {"status": {"phase": "Training"}})


def test_spinrun_names_and_queue_names_are_refused_at_create_time(api: client.ApiClient, crd: None,
                                                                  namespace: str) -> None:
    """Names that are legal for objects but not for the Services, pod hostnames or labels derived from them."""
    objects = client.CustomObjectsApi(api)
    G, V, P = spin_api.GROUP, spin_api.VERSION, spin_api.PLURAL

    def create(body: dict[str, object]) -> None:
        objects.create_namespaced_custom_object(G, V, namespace, P, body, dry_run="All", field_validation="Strict")

    for name in ("run.v2", "7run", "run-"):
        with pytest.raises(ApiException) as refused:
            create(valid(name))
        assert refused.value.status == 422
        assert "metadata.name must be a DNS-1035 label" in json.loads(refused.value.body)["message"], name
    for queue in ("team a", "team/gpu", "-team", ""):
        body = valid("queued")
        body["spec"]["queueName"] = queue
        with pytest.raises(ApiException) as refused:
            create(body)
        assert refused.value.status == 422 and "spec.queueName: Invalid value" in refused.value.body, queue
    body = valid("queued")
    body["spec"]["queueName"] = "Team_A.gpu-1"
    create(body)


def test_kubectl_explain_describes_every_spinrun_field(cluster: Cluster, crd: None) -> None:
    """The OpenAPI document the API server publishes for SpinRuns (what `kubectl explain` reads) has a
    description on every property, metadata excepted (ObjectMeta's own is shown)."""
    kubectl = [str(tools.kube_binary("kubectl")), f"--kubeconfig={cluster.kubeconfig}"]

    def published() -> Any:
        raw = subprocess.run([*kubectl, "get", "--raw", f"/openapi/v3/apis/{spin_api.GROUP}/{spin_api.VERSION}"],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(raw)["components"]["schemas"].get(f"dev.selfplay.{spin_api.VERSION}.SpinRun")

    schema = wait_until("the SpinRun OpenAPI schema", published, 30)
    undescribed: list[str] = []

    def walk(node: dict[str, Any], where: str) -> None:
        for name, prop in (node.get("properties") or {}).items():
            here = f"{where}.{name}"
            if here != "SpinRun.metadata" and not prop.get("description"):
                undescribed.append(here)
            walk(prop, here)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")

    walk(schema, "SpinRun")
    assert undescribed == []
    explained = subprocess.run([*kubectl, "explain", "spinruns.spec.storage.uri"], capture_output=True, text=True,
                               check=False)
    assert explained.returncode == 0, explained.stderr
    assert "Prefix for everything the run writes" in explained.stdout
