"""Worker pods as the real control plane makes them: a SpinRun with pull secrets, a PriorityClass, node affinity,
env, a volume of its own and deadlines is accepted by the API server; its Job bodies (spin_k8s/manifests.py) go
to the real Job controller, whose pods carry them, get the class's priority from the Priority admission plugin,
and are placed by the real scheduler where the affinity allows or nowhere. What a kubelet does with them
(pulling, mounting) is the real-node tier's (tests/realnode/)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from support import create_run, pods

from spin_k8s import api as spin_api
from spin_k8s import manifests
from spin_k8s.testing.processes import wait_until

pytestmark = pytest.mark.cluster
POOL = "selfplay.dev/test-pool"  # a node label the test sets, so no other test's pods depend on it


@pytest.fixture
def priority_class(api: client.ApiClient) -> Iterator[str]:
    name = f"spin-{secrets.token_hex(4)}"
    scheduling = client.SchedulingV1Api(api)
    scheduling.create_priority_class({"metadata": {"name": name}, "value": 1000, "globalDefault": False,
                                      "description": "tests/test_pods.py"})
    yield name
    scheduling.delete_priority_class(name)


@pytest.fixture
def pool(api: client.ApiClient) -> Iterator[str]:
    """A value of POOL put on the (only) node for the test."""
    core = client.CoreV1Api(api)
    (node,) = core.list_node().items
    value = secrets.token_hex(4)
    core.patch_node(node.metadata.name, {"metadata": {"labels": {POOL: value}}})
    yield value
    core.patch_node(node.metadata.name, {"metadata": {"labels": {POOL: None}}})


def spinrun(name: str, pool: str, priority_class: str, **spec: Any) -> dict[str, Any]:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": POOL, "operator": "In", "values": [pool]}]}]}}}
    return {"apiVersion": spin_api.API_VERSION, "kind": spin_api.KIND, "metadata": {"name": name}, "spec": {
        "model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 1,
        "storage": {"uri": "s3://runs/spin"}, "generation": {"shards": 2, "gpusPerShard": 0},
        "imagePullSecrets": [{"name": "registry"}], "priorityClassName": priority_class, "affinity": affinity,
        "env": {"generate": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
        "volumes": {"generate": [{"name": "models", "emptyDir": {}}]},
        "volumeMounts": {"generate": [{"name": "models", "mountPath": "/models"}]},
        # The node agent keeps the containers from starting: the pods stay Running until deleted.
        "podAnnotations": {"nodeagent.selfplay.dev/hang": "true"}, **spec}}


def generation_job(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """The SpinRun as the API server stores it (defaults, validation), made into its generation Job, created."""
    served = create_run(api, namespace, body)
    job = manifests.generate_job(spin_api.parse(served), "s3://runs/spin/p", 0)
    client.BatchV1Api(api).create_namespaced_job(namespace, job)
    return job


def test_pods_carry_pull_secrets_priority_env_and_volumes_and_run_where_the_affinity_allows(
        api: client.ApiClient, crd: None, namespace: str, pool: str, priority_class: str) -> None:
    job = generation_job(api, namespace, spinrun("placed", pool, priority_class))
    core = client.CoreV1Api(api)
    name = job["metadata"]["name"]

    def running() -> list[client.V1Pod] | None:
        found = pods(api, namespace, name)
        return found if len(found) == 2 and all(p.status.phase == "Running" for p in found) else None

    (node,) = core.list_node().items
    for pod in wait_until("both shards to run", running, 60):
        assert pod.spec.node_name == node.metadata.name
        assert [s.name for s in pod.spec.image_pull_secrets] == ["registry"]
        assert (pod.spec.priority_class_name, pod.spec.priority) == (priority_class, 1000)
        terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
        assert [(e.key, e.values) for e in terms[0].match_expressions] == [(POOL, [pool])]
        (container,) = pod.spec.containers
        # The Job controller adds JOB_COMPLETION_INDEX after the Job's own.
        assert [e.name for e in container.env] == ["AWS_DEFAULT_REGION", "DS_ACCELERATOR", "OMP_NUM_THREADS",
                                                   "NCCL_DEBUG", "JOB_COMPLETION_INDEX"]
        assert container.env[3].value == "INFO"
        assert [(m.name, m.mount_path) for m in container.volume_mounts
                if not m.name.startswith("kube-api-access")] == [("shm", "/dev/shm"), ("scratch", "/tmp"),
                                                                 ("models", "/models")]
        assert {v.name for v in pod.spec.volumes} >= {"shm", "scratch", "models"}


def test_pods_whose_affinity_no_node_meets_stay_pending_until_the_job_s_deadline_fails_it(
        api: client.ApiClient, crd: None, namespace: str, pool: str, priority_class: str) -> None:
    body = spinrun("nowhere", f"not-{pool}", priority_class, activeDeadlineSeconds={"generate": 5})
    job = generation_job(api, namespace, body)
    assert job["spec"]["activeDeadlineSeconds"] == 5
    name = job["metadata"]["name"]

    def unschedulable() -> list[client.V1Pod] | None:
        found = pods(api, namespace, name)
        return found if len(found) == 2 and all(any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in p.status.conditions or []) for p in found) else None

    for pod in wait_until("both shards to be found unschedulable", unschedulable, 60):
        assert pod.spec.node_name is None and pod.status.phase == "Pending"
    batch = client.BatchV1Api(api)
    failed = wait_until("the Job's deadline", lambda: next((c for c in batch.read_namespaced_job(
        name, namespace).status.conditions or [] if c.type == "Failed" and c.status == "True"), None), 60)
    assert failed.reason == "DeadlineExceeded"
