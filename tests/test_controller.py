"""The controller on the real control plane: a SpinRun runs its iterations through real Jobs whose pods
(run by the node agent) are the real workers on a tiny local model, with lineage on the real S3 server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from spin_k8s import api as spin_api
from spin_k8s import lineage, naming
from spin_k8s.testing.cluster import Cluster, free_port, wait_until
from spin_k8s.testing.s3 import S3Server
from spin_k8s.workers import tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
CRD = Path(__file__).parent.parent / "manifests" / "crd" / "spinruns.selfplay.dev.yaml"


@pytest.fixture(scope="module")
def crd(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load(CRD.read_text())
    try:
        ext.create_custom_resource_definition(body)
    except client.ApiException as e:
        if e.status != 409:
            raise
    wait_until("the SpinRun CRD", lambda: any(
        c.type == "Established" and c.status == "True"
        for c in ext.read_custom_resource_definition(body["metadata"]["name"]).status.conditions or []), 30)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyAssets:
    return tiny.create(tmp_path_factory.mktemp("tiny"), rows=16, seed=0)


@pytest.fixture
def controller(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "controller.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "spin_k8s.controller", f"--kubeconfig={cluster.kubeconfig}",
                             f"--namespace={namespace}", f"--lease-namespace={namespace}", "--resync-seconds=5"],
                            stdout=log, stderr=subprocess.STDOUT)
    yield proc
    proc.terminate()
    proc.wait(10)


def spin_run(name: str, assets: tiny.TinyAssets, s3_server: S3Server, bucket: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": spin_api.API_VERSION, "kind": spin_api.KIND, "metadata": {"name": name},
        "spec": {
            "model": f"file://{assets.model_dir}", "dataset": f"file://{assets.data_path}", "iterations": 2,
            "storage": {"uri": f"s3://{bucket}/spin", "credentialsSecret": "s3", "endpoint": s3_server.endpoint},
            "generation": {"shards": 2, "gpusPerShard": 0, "maxTokens": 12},
            "training": {"nodes": 1, "gpusPerNode": 0, "zeroStage": 0, "precision": "fp32", "optimizer": "adamw",
                         "learningRate": 1e-3, "epochs": 1, "perDeviceBatchSize": 4, "maxLength": 96,
                         "maxPromptLength": 48, "gradientCheckpointing": False, "port": free_port()},
            **spec,
        },
    }


def test_two_iterations_complete_with_lineage(api: client.ApiClient, crd: None, namespace: str,
                                              controller: subprocess.Popen[bytes], assets: tiny.TinyAssets,
                                              s3_server: S3Server, bucket: str) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    objects = client.CustomObjectsApi(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    created = objects.create_namespaced_custom_object(spin_api.GROUP, spin_api.VERSION, namespace, spin_api.PLURAL,
                                                      spin_run("demo", assets, s3_server, bucket))

    def finished() -> dict[str, Any] | None:
        run = objects.get_namespaced_custom_object(spin_api.GROUP, spin_api.VERSION, namespace, spin_api.PLURAL, "demo")
        phase = (run.get("status") or {}).get("phase")
        assert phase != "Failed", run["status"]
        return run if phase == "Succeeded" else None

    run = wait_until("the run to succeed", finished, 600)
    status = run["status"]
    assert status["iteration"] == 1 and status["observedGeneration"] == run["metadata"]["generation"]
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    assert all("loss" in i["metrics"] for i in status["iterations"])

    jobs = batch.list_namespaced_job(namespace, label_selector=f"{naming.LABEL_RUN}=demo").items
    assert sorted(j.metadata.name for j in jobs) == ["demo-i0-gen", "demo-i0-train", "demo-i1-gen", "demo-i1-train"]
    for j in jobs:
        assert j.metadata.owner_references[0].uid == created["metadata"]["uid"]
        assert j.metadata.labels[naming.LABEL_RUN_UID] == created["metadata"]["uid"]
        assert j.spec.template.metadata.labels[naming.LABEL_ROLE] in naming.ROLES
    gen_pods = core.list_namespaced_pod(namespace, label_selector=f"{naming.LABEL_ROLE}=generate,"
                                                                  f"{naming.LABEL_ITERATION}=0").items
    assert sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in gen_pods) == ["0", "1"]

    prefix = f"spin/{namespace}/demo/{created['metadata']['uid']}"
    store = lineage.S3Store(s3_server.client(), bucket, prefix)
    steps = lineage.load(store)
    assert sorted(steps) == [(0, "generate"), (0, "train"), (1, "generate"), (1, "train")]
    assert all(len(s["sha256"]) == 64 for t in (0, 1) for s in steps[(t, "generate")]["shards"])
    assert steps[(1, "train")]["model"] == f"s3://{bucket}/{prefix}/i0/model"
    assert steps[(1, "train")]["dataMix"] == [f"s3://{bucket}/{prefix}/i0/synthetic",
                                              f"s3://{bucket}/{prefix}/i1/synthetic"]
    assert status["manifest"] == f"s3://{bucket}/{prefix}/manifest.json"
    s3 = s3_server.client()
    assert s3.head_object(Bucket=bucket, Key=f"{prefix}/i1/model/model.safetensors")["ContentLength"] > 0
