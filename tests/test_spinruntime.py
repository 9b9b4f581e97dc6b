"""SpinRuntimes on the real control plane: a runtime's pod fields reach both Jobs of a run under the run's own,
the run keeps the copy it started with when the platform edits the runtime, a run naming a runtime that does not
exist waits (RuntimeNotFound, backed off) and goes on once it is created, and `spinctl start` takes its storage
from the `default` runtime.

Simulated pods (the node agent's annotations): these tests are about what the Jobs carry, not the workers.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import support
import yaml
from click.testing import CliRunner, Result
from kubernetes import client
from kubernetes.client.rest import ApiException
from support import SIMULATED, Controllers, get_run, job_names, progressing

from spin_k8s import api as spin_api
from spin_k8s.cli import main
from spin_k8s.testing.cluster import Cluster
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
G, V, R = spin_api.GROUP, spin_api.VERSION, spin_api.RUNTIME_PLURAL


def runtime_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": spin_api.API_VERSION, "kind": spin_api.RUNTIME_KIND, "metadata": {"name": name},
            "spec": spec}


@pytest.fixture
def runtimes(api: client.ApiClient, crd: None) -> Iterator[list[str]]:
    """The SpinRuntimes a test creates (cluster-scoped: deleted at its end, so no other test sees them)."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            client.CustomObjectsApi(api).delete_cluster_custom_object(G, V, R, name)
        except ApiException as e:
            if e.status != 404:
                raise


def create_runtime(api: client.ApiClient, runtimes: list[str], name: str, **spec: Any) -> dict[str, Any]:
    runtimes.append(name)
    created: dict[str, Any] = client.CustomObjectsApi(api).create_cluster_custom_object(
        G, V, R, runtime_body(name, **spec))
    return created


def pod_template(api: client.ApiClient, namespace: str, job: str) -> client.V1PodTemplateSpec:
    template: client.V1PodTemplateSpec = client.BatchV1Api(api).read_namespaced_job(job, namespace).spec.template
    return template


def test_a_runtime_s_pod_fields_reach_both_jobs_under_the_run_s_and_an_edit_does_not_reach_a_run_under_way(
        api: client.ApiClient, namespace: str, controllers: Controllers, s3_secret: str, runtimes: list[str],
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    (node,) = client.CoreV1Api(api).list_node().items
    name = f"rt-{secrets.token_hex(3)}"
    create_runtime(api, runtimes, name, images={"generate": "platform/generate:1", "train": "platform/train:1"},
                   nodeSelector={"kubernetes.io/hostname": node.metadata.name},
                   env={"generate": [{"name": "PLATFORM", "value": "1"}, {"name": "SHARED", "value": "runtime"}],
                        "train": [{"name": "PLATFORM", "value": "1"}]},
                   shmSize={"generate": "2Gi", "train": "3Gi"}, podLabels={"team": "platform"})
    controllers.start()
    support.quota(api, controllers, "no-jobs", {"count/jobs.batch": "0"})  # holds the run before its first Job
    run = support.create_run(api, namespace, support.spin_run(
        "demo", assets, s3_server, bucket, iterations=1, runtime=name, shmSize={"train": "1Gi"},
        env={"generate": [{"name": "SHARED", "value": "run"}]}, **SIMULATED))
    support.write_outputs(s3_server, bucket, run, iterations=1)

    # The runtime is read at the first reconcile that would create a Job (refused here), and kept in status.
    controllers.wait("the Job refused", lambda: progressing(api, namespace, "demo", "JobCreationFailed"), 60)
    kept = get_run(api, namespace, "demo")["status"]["runtime"]
    assert (kept["name"], kept["spec"]["shmSize"]) == (name, {"generate": "2Gi", "train": "3Gi"})
    objects = client.CustomObjectsApi(api)

    def edit(value: str) -> None:  # the platform changes every field the run took from the runtime
        objects.patch_cluster_custom_object(G, V, R, name, {"spec": {
            "images": {"generate": f"platform/generate:{value}", "train": f"platform/train:{value}"},
            "nodeSelector": {"kubernetes.io/hostname": "elsewhere"}, "shmSize": {"generate": f"{value}Gi"},
            "env": {role: [{"name": "PLATFORM", "value": value}] for role in spin_api.ROLES},
            "podLabels": {"team": value}}})

    edit("7")
    client.CoreV1Api(api).delete_namespaced_resource_quota("no-jobs", namespace)
    controllers.wait("demo-i0-gen", lambda: "demo-i0-gen" in job_names(api, namespace, "demo") or None, 60)
    # Built from the copy, not the edited runtime (which would leave its pods unschedulable: "elsewhere").
    here = {"kubernetes.io/hostname": node.metadata.name}
    assert pod_template(api, namespace, "demo-i0-gen").spec.node_selector == here
    edit("8")  # after the first Job exists, before (or while) the next one is made
    finished = controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert finished["status"]["runtime"] == kept  # never read again
    assert job_names(api, namespace, "demo") == ["demo-i0-gen", "demo-i0-train"]

    expected_env = {"gen": [("PLATFORM", "1"), ("SHARED", "run")], "train": [("PLATFORM", "1")]}
    for role, image, shm in (("gen", "platform/generate:1", "2Gi"), ("train", "platform/train:1", "1Gi")):
        template = pod_template(api, namespace, f"demo-i0-{role}")
        pod = template.spec
        assert pod.node_selector == here, role
        (container,) = pod.containers
        assert container.image == image, role
        ours = [(e.name, e.value) for e in container.env if e.name in ("PLATFORM", "SHARED")]
        assert ours == expected_env[role], role  # the runtime's order; the run's SHARED replaced the runtime's
        (volume,) = [v for v in pod.volumes if v.name == "shm"]
        assert volume.empty_dir.size_limit == shm, role  # train: the run's own shmSize wins over the runtime's
        assert template.metadata.labels["team"] == "platform"
        assert template.metadata.annotations == SIMULATED["podAnnotations"]  # the run's own, by key


def test_a_run_naming_a_missing_runtime_waits_for_it_then_runs(
        api: client.ApiClient, namespace: str, controllers: Controllers, s3_secret: str, runtimes: list[str],
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    name = f"rt-{secrets.token_hex(3)}"
    controllers.start()
    run = support.create_run(api, namespace, support.spin_run("demo", assets, s3_server, bucket, iterations=1,
                                                              runtime=name, **SIMULATED))
    support.write_outputs(s3_server, bucket, run, iterations=1)
    condition = controllers.wait("RuntimeNotFound", lambda: progressing(api, namespace, "demo", "RuntimeNotFound"), 60)
    assert condition["status"] == "False"
    assert condition["message"] == (f'SpinRuntime "{name}" (spec.runtime) not found: no Job is created until it '
                                    "exists (kubectl get spinruntimes)")
    status = get_run(api, namespace, "demo")["status"]
    assert (status["phase"], status["reason"], "runtime" in status) == ("Pending", "RuntimeNotFound", False)
    assert job_names(api, namespace, "demo") == []
    # Emitted right after the status write it describes; one, not one per retry (checked again at the end).
    (event,) = controllers.wait("the Warning event",
                                lambda: support.warnings(api, namespace, "RuntimeNotFound") or None, 30)
    assert event.type == "Warning" and event.message == condition["message"]

    create_runtime(api, runtimes, name, podLabels={"runtime": name})
    controllers.wait_phase(api, "demo", "Succeeded", 120)
    assert pod_template(api, namespace, "demo-i0-gen").metadata.labels["runtime"] == name
    assert len(support.warnings(api, namespace, "RuntimeNotFound")) == 1


def spinctl(cluster: Cluster, namespace: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--kubeconfig", str(cluster.kubeconfig), "-n", namespace],
                              catch_exceptions=False)


def test_spinctl_start_takes_the_default_runtime_s_storage(
        cluster: Cluster, api: client.ApiClient, namespace: str, s3_secret: str, runtimes: list[str],
        assets: tiny.TinyAssets, s3_server: S3Server, bucket: str) -> None:
    """The one-command start on a prepared cluster: no --storage. No controller runs: this is spinctl's part."""
    storage = {"uri": f"s3://{bucket}/spin", "credentialsSecret": s3_secret, "endpoint": s3_server.endpoint}
    args = ["start", "--iterations", "1", "--model", f"file://{assets.model_dir}",
            "--dataset", f"file://{assets.data_path}"]
    refused = spinctl(cluster, namespace, *args, "--name", "none")
    assert refused.exit_code == 1
    assert refused.output.strip() == ('Error: --storage is required (spec.storage.uri): no SpinRuntime "default" '
                                      "gives one")

    create_runtime(api, runtimes, spin_api.DEFAULT_RUNTIME, storage=storage, nodeSelector={"pool": "gpu"})
    dry = spinctl(cluster, namespace, *args, "--name", "dry", "--set", "nodeSelector.zone=a", "--dry-run", "-o", "yaml")
    assert dry.exit_code == 0, dry.output
    run, gen, _, train = yaml.safe_load_all(dry.output)
    assert run["spec"]["storage"] == {**storage, "region": "us-east-1"}  # the runtime's, defaults and all
    assert run["status"]["runtime"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    for job in (gen, train):
        assert job["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "a"}
    assert job_names(api, namespace, "dry") == []

    started = spinctl(cluster, namespace, *args, "--name", "demo")  # the preflight checks the runtime's storage
    assert started.exit_code == 0, started.output
    created = get_run(api, namespace, "demo")
    assert created["spec"]["storage"] == run["spec"]["storage"]  # written into the run
    assert "runtime" not in created["spec"]  # unset: the controller takes `default` itself
