"""The pod infrastructure a SpinRun adds to its Job bodies (spin_k8s/manifests.py): env, volumes and mounts after
the Job's own, the scratch volume's three sources, pull secrets, priority, affinity, deadlines per role, and the
default requests where spec.resources names none. What a kubelet makes of them is tested on the real-node tier."""

from __future__ import annotations

from typing import Any

import pytest

from spin_k8s import api, manifests

PREFIX = "s3://b/p"


def run_of(**spec: Any) -> api.SpinRun:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND,
           "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"},
           "spec": {"model": "s3://bk/base", "dataset": "s3://bk/sft.jsonl", "iterations": 2,
                    "storage": {"uri": "s3://bk/spin"}, **spec}}
    assert api.schema_errors(obj) == [] and api.semantic_errors(api.load_defaulted(obj)) == []
    return api.parse(api.load_defaulted(obj))


def jobs(run: api.SpinRun) -> dict[str, dict[str, Any]]:
    """Both Job bodies of iteration 0, by role."""
    return {"generate": manifests.generate_job(run, PREFIX, 0), "train": manifests.train_job(run, PREFIX, 0, 0)}


def pod(job: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = job["spec"]["template"]["spec"]
    return result


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod(job)["containers"]
    return dict(only)


def test_nothing_extra_without_the_fields() -> None:
    for role, job in jobs(run_of()).items():
        spec = pod(job)
        assert not {"imagePullSecrets", "priorityClassName", "affinity"} & set(spec), role
        assert "activeDeadlineSeconds" not in job["spec"]
        assert [v["name"] for v in spec["volumes"]] == ["shm", "scratch"]
        assert [m["name"] for m in container(job)["volumeMounts"]] == ["shm", "scratch"]
        assert [e["name"] for e in container(job)["env"]] == ["AWS_DEFAULT_REGION"]


def test_env_volumes_and_mounts_per_role_come_after_the_job_s_own() -> None:
    nccl = [{"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "NCCL_IB_HCA", "valueFrom": {"configMapKeyRef": {"name": "fabric", "key": "hca"}}}]
    models = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    nvme = {"name": "nvme", "hostPath": {"path": "/mnt/nvme", "type": "Directory"}}
    run = run_of(env={"train": nccl, "generate": [{"name": "HF_HUB_OFFLINE", "value": "1"}]},
                 volumes={"generate": [models], "train": [models, nvme]},
                 volumeMounts={"generate": [{"name": "models", "mountPath": "/models", "readOnly": True}],
                               "train": [{"name": "models", "mountPath": "/models", "readOnly": True},
                                         {"name": "nvme", "mountPath": "/nvme", "subPath": "spin"}]},
                 storage={"uri": "s3://bk/spin", "endpoint": "http://minio:9000"})
    gen, train = jobs(run)["generate"], jobs(run)["train"]
    assert container(train)["env"] == [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
                                       {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio:9000"}, *nccl]
    assert container(gen)["env"][-1] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert pod(gen)["volumes"][2:] == [models] and pod(train)["volumes"][2:] == [models, nvme]
    assert [(m["name"], m["mountPath"]) for m in container(train)["volumeMounts"]] == [
        ("shm", "/dev/shm"), ("scratch", "/tmp"), ("models", "/models"), ("nvme", "/nvme")]
    assert container(train)["volumeMounts"][3]["subPath"] == "spin"
    assert [m["mountPath"] for m in container(gen)["volumeMounts"]] == ["/dev/shm", "/tmp", "/models"]


def test_user_env_never_precedes_the_cpu_settings() -> None:
    run = run_of(generation={"gpusPerShard": 0}, env={"generate": [{"name": "TOKENIZERS_PARALLELISM", "value": "0"}]})
    names = [e["name"] for e in container(jobs(run)["generate"])["env"]]
    assert names == ["AWS_DEFAULT_REGION", "DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"]


def test_scratch_is_an_empty_dir_an_ephemeral_claim_or_an_existing_claim_per_role() -> None:
    run = run_of(scratchSize={"train": "2Ti"},
                 scratchVolume={"train": {"ephemeral": {"storageClassName": "local-nvme"}},
                                "generate": {"persistentVolumeClaim": {"claimName": "gen-scratch"}}})
    gen, train = jobs(run)["generate"], jobs(run)["train"]
    assert pod(train)["volumes"][1] == {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "local-nvme",
        "resources": {"requests": {"storage": "2Ti"}}}}}}
    assert container(train)["volumeMounts"][1] == {"name": "scratch", "mountPath": "/tmp"}
    assert pod(gen)["volumes"][1] == {"name": "scratch", "persistentVolumeClaim": {"claimName": "gen-scratch"}}
    # One directory of the claim per completion index: two pods of a Job never stage into the same one.
    assert container(gen)["volumeMounts"][1] == {"name": "scratch", "mountPath": "/tmp",
                                                 "subPathExpr": "$(JOB_COMPLETION_INDEX)"}
    default_class = run_of(scratchVolume={"generate": {"ephemeral": {}}})
    claim = pod(jobs(default_class)["generate"])["volumes"][1]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "100Gi"}}}
    assert pod(jobs(default_class)["train"])["volumes"][1] == {"name": "scratch", "emptyDir": {"sizeLimit": "500Gi"}}


def test_pull_secrets_priority_and_affinity_on_every_pod_and_deadlines_per_role() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.product", "operator": "In", "values": ["H100"]}]}]}}}
    run = run_of(imagePullSecrets=[{"name": "registry"}, {"name": "mirror"}], priorityClassName="spin-high",
                 affinity=affinity, activeDeadlineSeconds={"train": 86400})
    for role, job in jobs(run).items():
        spec = pod(job)
        assert spec["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}], role
        assert (spec["priorityClassName"], spec["affinity"]) == ("spin-high", affinity), role
    assert jobs(run)["train"]["spec"]["activeDeadlineSeconds"] == 86400
    assert "activeDeadlineSeconds" not in jobs(run)["generate"]["spec"]
    restarted = manifests.train_job(run, PREFIX, 1, 2)  # every gang gets a deadline of its own
    assert restarted["spec"]["activeDeadlineSeconds"] == 86400


@pytest.mark.parametrize(("spec", "generate", "train"), [
    # One GPU per pod by default: per GPU 4 CPUs and 32Gi (generation) or 24Gi (training).
    ({}, {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"nvidia.com/gpu": "1"}},
     {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"nvidia.com/gpu": "1"}}),
    ({"generation": {"gpusPerShard": 2}, "training": {"gpusPerNode": 8}},
     {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"nvidia.com/gpu": "2"}},
     {"requests": {"cpu": "32", "memory": "192Gi"}, "limits": {"nvidia.com/gpu": "8"}}),
    ({"generation": {"gpusPerShard": 0}, "training": {"gpusPerNode": 0}},
     {"requests": {"cpu": "500m", "memory": "2Gi"}}, {"requests": {"cpu": "500m", "memory": "2Gi"}}),
    # What resources names wins, request or limit; a default request never exceeds a user's limit.
    ({"resources": {"train": {"requests": {"cpu": "16"}, "limits": {"memory": "100Gi"}},
                    "generate": {"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "1Gi"}}}},
     {"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "1Gi"}, "limits": {"nvidia.com/gpu": "1"}},
     {"requests": {"cpu": "16"}, "limits": {"memory": "100Gi", "nvidia.com/gpu": "1"}}),
])
def test_default_requests_unless_resources_names_them(spec: dict[str, Any], generate: dict[str, Any],
                                                      train: dict[str, Any]) -> None:
    bodies = jobs(run_of(**spec))
    assert container(bodies["generate"])["resources"] == generate
    assert container(bodies["train"])["resources"] == train
