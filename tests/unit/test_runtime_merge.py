"""A SpinRun over its SpinRuntime, without servers: the merge rule (the run wins; per role, env by name, the label
maps by key), the spec parse builds from the copy in status.runtime, and the planner keeping that copy and holding
a run whose runtime does not exist."""

from __future__ import annotations

import copy
from typing import Any

from spin_k8s import api, manifests, planner

NOW = "2026-11-26T00:00:00Z"
RUNTIME = {
    "images": {"generate": "registry.local/generate:1", "train": "registry.local/train:1", "pullPolicy": "Always"},
    "resources": {"generate": {"limits": {"memory": "64Gi"}}, "train": {"limits": {"memory": "128Gi"}}},
    "shmSize": {"generate": "4Gi", "train": "32Gi"},
    "env": {"train": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "NCCL_IB_HCA", "value": "mlx5"}]},
    "nodeSelector": {"pool": "gpu", "zone": "a"},
    "podLabels": {"team": "platform"},
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
    "priorityClassName": "batch",
    "storage": {"uri": "s3://platform/spin", "credentialsSecret": "s3"},
}


def run_obj(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return api.load_defaulted({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "namespace": "ns", "uid": "u"},
        "spec": {"model": "s3://b/base", "dataset": "s3://b/sft.jsonl", "iterations": 1,
                 "storage": {"uri": "s3://mine/spin"}, **spec},
        "status": status or {}})


def test_the_run_wins_field_by_field_per_role_and_key_by_key() -> None:
    mine = run_obj(images={"train": "mine/train:2"}, shmSize={"train": "8Gi"},
                   env={"train": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "MINE", "value": "1"}]},
                   nodeSelector={"zone": "b"}, tolerations=[])["spec"]
    runtime = copy.deepcopy(RUNTIME)
    merged = api.merge_runtime(runtime, mine)
    assert runtime == RUNTIME  # pure: neither input is changed
    # pullPolicy: the run's, which the API server (here load_defaulted) always fills in.
    assert merged["images"] == {"generate": "registry.local/generate:1", "train": "mine/train:2",
                                "pullPolicy": "IfNotPresent"}
    assert merged["shmSize"] == {"generate": "4Gi", "train": "8Gi"}
    assert merged["resources"] == RUNTIME["resources"]  # the run sets none: the runtime's, both roles
    # env by name within the role: the runtime's order, its NCCL_DEBUG replaced, the run's own added after.
    assert merged["env"] == {"train": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                       {"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "MINE", "value": "1"}]}
    assert merged["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    assert merged["podLabels"] == {"team": "platform"} and merged["priorityClassName"] == "batch"
    assert merged["tolerations"] == []  # a list the run sets replaces the runtime's whole
    assert merged["storage"] == {"uri": "s3://mine/spin", "region": "us-east-1"}  # storage is never merged
    assert {k: v for k, v in merged.items() if k not in RUNTIME} == {k: v for k, v in mine.items() if k not in RUNTIME}


def test_resources_of_a_role_the_run_sets_replace_the_runtimes_for_that_role() -> None:
    merged = api.merge_runtime(RUNTIME, {"resources": {"train": {"requests": {"cpu": "2"}}}})
    assert merged["resources"] == {"generate": {"limits": {"memory": "64Gi"}}, "train": {"requests": {"cpu": "2"}}}


def test_parse_builds_the_spec_from_the_runtime_copy_in_status() -> None:
    snapshot = api.runtime_snapshot({"metadata": {"name": "gpu", "resourceVersion": "7"}, "spec": RUNTIME})
    assert snapshot == {"name": "gpu", "resourceVersion": "7", "spec": RUNTIME}
    spec = api.parse(run_obj({"runtime": snapshot}, shmSize={"generate": "2Gi"})).spec
    assert (spec.image_generate, spec.image_train) == ("registry.local/generate:1", "registry.local/train:1")
    assert spec.shm_size == {"generate": "2Gi", "train": "32Gi"}
    assert spec.node_selector == {"pool": "gpu", "zone": "a"} and spec.priority_class == "batch"
    assert spec.storage.uri == "s3://mine/spin"
    job = manifests.train_job(api.parse(run_obj({"runtime": snapshot})), "s3://mine/spin/p", 0, 0)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "a"} and pod["tolerations"] == RUNTIME["tolerations"]
    # Without a runtime copy (none applied, or not read yet) the spec is the run's own, as before runtimes.
    bare = api.parse(run_obj({"runtime": api.runtime_snapshot(None)})).spec
    assert (bare.image_generate, bare.pull_policy, bare.node_selector) == (
        api.DEFAULT_IMAGES.generate, "IfNotPresent", {})


def test_the_plan_keeps_the_runtime_copy_and_a_missing_runtime_holds_the_run() -> None:
    snapshot = {"name": "gpu", "resourceVersion": "7", "spec": RUNTIME}
    run = api.parse(run_obj({"runtime": snapshot}, runtime="gpu"))
    plan = planner.plan(run, planner.Observed(), planner.Lineage(), NOW)
    assert plan.creates() and plan.status["runtime"] == snapshot
    assert "runtime" not in planner.plan(api.parse(run_obj()), planner.Observed(), planner.Lineage(), NOW).status

    held = planner.runtime_missing(api.parse(run_obj(runtime="gpu")), "gpu", NOW)
    message = 'SpinRuntime "gpu" (spec.runtime) not found: no Job is created until it exists (kubectl get spinruntimes)'
    assert (held.actions, held.status["phase"], held.status["reason"]) == ((), "Pending", "RuntimeNotFound")
    (progressing,) = held.status["conditions"]
    assert (progressing["type"], progressing["status"], progressing["message"]) == ("Progressing", "False", message)
    assert [(e.type, e.reason, e.message) for e in held.events] == [("Warning", "RuntimeNotFound", message)]
