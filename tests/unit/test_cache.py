"""The controller's cache against the races of its own writes with the watch."""

from __future__ import annotations

from kubernetes import client

from spin_k8s.controller.reconcile import Cache


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
