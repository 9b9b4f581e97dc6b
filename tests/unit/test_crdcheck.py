"""The controller's check of the installed CRD: an older one (a property this controller writes or reads is
missing) is refused naming the properties; the same or a newer one passes."""

from __future__ import annotations

import copy
from typing import Any

from spin_k8s import api
from spin_k8s.controller import crdcheck


def served(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == api.VERSION)
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_the_shipped_crd_and_a_newer_one_pass() -> None:
    assert crdcheck.missing(api.crd()) == []
    newer = copy.deepcopy(api.crd())
    served(newer)["properties"]["spec"]["properties"]["someFutureField"] = {"type": "string"}
    assert crdcheck.missing(newer) == []


def test_an_older_crd_lacks_what_this_controller_writes_and_reads() -> None:
    older = copy.deepcopy(api.crd())
    del served(older)["properties"]["status"]["properties"]["restarts"]
    del served(older)["properties"]["spec"]["properties"]["training"]["properties"]["checkpointsToKeep"]
    assert crdcheck.missing(older) == ["spec.training.checkpointsToKeep", "status.restarts"]
    # Nested paths of a missing object count once each, and array items are followed.
    paths = set(crdcheck.property_paths(served(api.crd())))
    assert {"spec.iterationOverrides[].learningRate", "status.conditions[].reason"} <= paths
    other = copy.deepcopy(api.crd())
    other["spec"]["versions"][0]["name"] = "v0"
    assert len(crdcheck.missing(other)) == len(paths)  # the served version is not there at all
