"""The test environment is real: the Job controller, the scheduler, RBAC, CRD validation, S3 conditional
writes and helm all behave as they do on a real cluster."""

from __future__ import annotations

import os
import subprocess

import botocore.exceptions
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from spin_k8s.testing import tools
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.processes import wait_until
from spin_k8s.testing.s3 import S3Server

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
