"""The controller's cache against the races of its own writes with the watch."""

from __future__ import annotations

import json

from kubernetes import client

from spin_k8s import api, manifests, naming
from spin_k8s.controller.reconcile import Cache, job_view


def job(uid: str, rv: str) -> client.V1Job:
    return client.V1Job(metadata=client.V1ObjectMeta(name="demo-i0-gen", namespace="ns", uid=uid,
                                                     resource_version=rv))


def test_the_answer_to_a_create_never_brings_back_what_the_watch_saw_deleted() -> None:
    cache = Cache()
    cache.put("jobs", job("u1", "10"))  # the watch's ADDED
    cache.delete("jobs", job("u1", "11"))  # the watch's DELETED: a user deleted it at once
    cache.put("jobs", job("u1", "10"))  # then the create call returns, and the controller puts its answer
    assert cache.get("jobs", "ns", "demo-i0-gen") is None
    cache.put("jobs", job("u2", "12"))  # a new Job of the same name is another object
    assert cache.get("jobs", "ns", "demo-i0-gen").metadata.uid == "u2"


def test_an_older_version_never_replaces_a_newer_one() -> None:
    cache = Cache()
    cache.put("runs", {"metadata": {"name": "demo", "namespace": "ns", "uid": "r", "resourceVersion": "20"}})
    cache.put("runs", {"metadata": {"name": "demo", "namespace": "ns", "uid": "r", "resourceVersion": "19"}})
    assert cache.get("runs", "ns", "demo")["metadata"]["resourceVersion"] == "20"
    cache.put("runs", {"metadata": {"name": "demo", "namespace": "ns", "uid": "r", "resourceVersion": "21"}})
    assert cache.get("runs", "ns", "demo")["metadata"]["resourceVersion"] == "21"


def labelled(name: str, run_uid: str, uid: str, rv: str = "1") -> client.V1Job:
    return client.V1Job(metadata=client.V1ObjectMeta(name=name, namespace="ns", uid=uid, resource_version=rv,
                                                     labels={naming.LABEL_RUN_UID: run_uid}))


def test_a_runs_objects_are_found_by_its_uid_through_every_change() -> None:
    cache = Cache()
    cache.replace("jobs", [labelled("a-i0-gen", "run-a", "1"), labelled("b-i0-gen", "run-b", "2"),
                           client.V1Job(metadata=client.V1ObjectMeta(name="other", namespace="ns", uid="3"))])
    assert [j.metadata.name for j in cache.owned("jobs", "ns", "run-a")] == ["a-i0-gen"]
    cache.put("jobs", labelled("a-i0-train", "run-a", "4"))
    assert [j.metadata.name for j in cache.owned("jobs", "ns", "run-a")] == ["a-i0-gen", "a-i0-train"]
    assert cache.owned("jobs", "other-ns", "run-a") == []
    cache.delete("jobs", labelled("a-i0-gen", "run-a", "1"))
    # A Job of the same name made by another run (the first deleted and its name reused) moves with its label.
    cache.put("jobs", labelled("a-i0-train", "run-c", "5"))
    assert cache.owned("jobs", "ns", "run-a") == []
    assert [j.metadata.uid for j in cache.owned("jobs", "ns", "run-c")] == ["5"]
    cache.replace("jobs", [])
    assert cache.owned("jobs", "ns", "run-c") == [] and cache.owned("jobs", "ns", "run-b") == []


def test_the_cache_keeps_of_a_job_what_the_planner_reads_and_little_else() -> None:
    run = api.parse(api.load_defaulted({
        "apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "demo", "namespace": "ns", "uid": "u"},
        "spec": {"model": "s3://b/base", "dataset": "s3://b/sft.jsonl", "iterations": 1,
                 "storage": {"uri": "s3://b/spin"}}}))
    body = manifests.generate_job(run, "s3://b/spin/ns/demo/u", 0)
    body["metadata"].update(uid="j", resourceVersion="7", creationTimestamp="2026-12-01T00:00:00Z",
                            managedFields=[{"manager": "spin-controller", "operation": "Update"}])
    body["status"] = {"active": 1, "startTime": "2026-12-01T00:00:01Z"}

    def model() -> client.V1Job:
        job: client.V1Job = client.ApiClient().deserialize(json.dumps(body), "V1Job", "application/json")
        return job

    full = model()
    assert full.metadata.managed_fields and full.spec.pod_failure_policy
    cache = Cache()
    cache.put("jobs", model())
    kept = cache.get("jobs", "ns", "demo-i0-gen")
    assert job_view(kept) == job_view(full)
    assert kept.metadata.managed_fields is None and kept.spec.pod_failure_policy is None
    assert kept.spec.completions == full.spec.completions
    size = len(json.dumps(client.ApiClient().sanitize_for_serialization(kept)))
    assert size < len(json.dumps(client.ApiClient().sanitize_for_serialization(full))) / 3, size
