"""The SpinRun and SpinRuntime CRDs' schemas as users meet them: every field described (what `kubectl explain`
shows), the fields that define a run immutable once it is created while the ones spinctl and users change during a
run are not, the SpinRuntime's fields the SpinRun's of the same names, and the name and queueName rules the same
online (CEL, schema pattern) as offline (spinctl, local runs)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from invalid_specs import valid

from spin_k8s import api

# The fields whose change during a run would mix two runs in one lineage: every iteration reads what the previous
# one wrote under storage, trains from its model with these settings, and resumes from checkpoints made with them.
IDENTITY = {"model", "dataset", "iterations", "storage", "data", "generation", "training", "iterationOverrides",
            "earlyStop"}
# What spinctl (suspend, resume, cancel) and the tests patch during a run, and what only places or paces the pods.
OPERATIONAL = {"suspend", "restartLimit", "queueName", "images", "resources", "shmSize", "scratchSize", "scratchVolume",
               "env", "volumes", "volumeMounts", "activeDeadlineSeconds", "imagePullSecrets", "priorityClassName",
               "affinity", "podLabels", "podAnnotations", "nodeSelector", "tolerations", "serviceAccountName"}
# Read once, before the run's first Job (the copy in status.runtime builds every Job): a later change would do nothing.
RESOLVED_ONCE = {"runtime"}
# The pod infrastructure a SpinRuntime sets for runs: every operational field but the run's own pacing.
INFRASTRUCTURE = OPERATIONAL - {"suspend", "restartLimit"}


def properties(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every declared property below ``node``, with its path (``spec.iterationOverrides[].beta``)."""
    for name, prop in (node.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here, prop
        yield from properties(prop, here)
    for key, mark in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            yield from properties(node[key], path + mark)


def rules(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("x-kubernetes-validations") or [])


def immutable_message(name: str) -> str:
    return f"{name} is immutable once the run is created"


@pytest.mark.parametrize("schema", [api.schema(), api.runtime_schema()], ids=[api.KIND, api.RUNTIME_KIND])
def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    # metadata is the one exception: the API server refuses a description there and shows ObjectMeta's own.
    found = dict(properties(schema))
    undescribed = [path for path, prop in found.items()
                   if path != "metadata" and not str(prop.get("description", "")).strip()]
    assert undescribed == [], f"{len(undescribed)} of {len(found)} CRD properties have no description: {undescribed}"
    assert "description" not in found["metadata"]
    assert schema["description"]  # `kubectl explain spinrun` itself


def test_a_runtime_field_is_the_spinrun_field_of_its_name() -> None:
    """The same schema (bounds, rules, descriptions), so a value valid in a SpinRuntime is valid in a run and the
    merge of the two is one the SpinRun schema describes; storage's fields are a run's spec.storage's."""
    ours, runs = api.runtime_schema()["properties"]["spec"], api.schema()["properties"]["spec"]
    assert set(ours["properties"]) == INFRASTRUCTURE | {"storage"}
    for name in INFRASTRUCTURE:
        assert ours["properties"][name] == runs["properties"][name], name
    assert ours["properties"]["storage"]["properties"] == runs["properties"]["storage"]["properties"]
    assert "required" not in ours["properties"]["storage"] and not rules(ours["properties"]["storage"])
    # The spec-level rules that span two of these fields: a mount names a volume of its own role.
    assert rules(ours) == [r for r in rules(runs) if "volumeMounts" in r["rule"]]
    assert api.crd("runtime-crd.yaml")["spec"]["scope"] == "Cluster"


def test_the_fields_that_define_a_run_are_immutable_and_the_others_are_not() -> None:
    spec = api.schema()["properties"]["spec"]
    assert set(spec["properties"]) == IDENTITY | OPERATIONAL | RESOLVED_ONCE  # a new field must be put in one
    frozen = {name for name, prop in spec["properties"].items()
              if {"rule": "self == oldSelf", "message": immutable_message(name)} in rules(prop)}
    assert frozen == IDENTITY | RESOLVED_ONCE
    for name in IDENTITY | RESOLVED_ONCE:
        assert "Immutable" in spec["properties"][name]["description"], name  # kubectl explain says so
    # A rule on a field is not evaluated when the field is added or removed: the optional ones (no default) are
    # held at the spec level as well.
    optional = {n for n in IDENTITY | RESOLVED_ONCE
                if n not in spec["required"] and "default" not in spec["properties"][n]}
    assert optional == {"iterationOverrides", "earlyStop", "runtime"}
    for name in optional:
        assert {"rule": f"has(self.{name}) == has(oldSelf.{name})", "message": immutable_message(name),
                "fieldPath": f".{name}"} in rules(spec)
    # Nothing else is a transition rule: suspend, and everything the controller writes (status), stay free.
    transitions = [(path, r["rule"]) for path, prop in [("", api.schema()), *properties(api.schema())]
                   for r in rules(prop) if "oldSelf" in r["rule"]]
    assert sorted(p for p, _ in transitions) == sorted(["spec"] * 3 + [f"spec.{n}" for n in IDENTITY | RESOLVED_ONCE])


def root_rule(pattern: str) -> tuple[dict[str, Any], str]:
    """The CEL rule at the top of the schema whose text matches ``pattern``, and what ``pattern`` captures."""
    for rule in rules(api.schema()):
        match = re.fullmatch(pattern, rule["rule"])
        if match:
            return rule, match.group(1)
    raise AssertionError(f"no rule at the top of the CRD's schema matches {pattern}")


NAMES = ["run-v2", "a", "r" * 40, "r" * 41, "run.v2", "7run", "Demo", "run-", "run_1", "-run", ""]


@pytest.mark.parametrize("name", NAMES)
def test_the_name_rules_of_the_crd_are_the_ones_checked_offline(name: str) -> None:
    """Offline validation refuses a name exactly where the CRD's CEL rules (evaluated here as the API server does:
    ``matches`` is an RE2 search, hence the anchors) refuse it, and both messages name metadata.name."""
    size, limit = root_rule(r"self\.metadata\.name\.size\(\) <= (\d+)")
    dns, pattern = root_rule(r"self\.metadata\.name\.matches\('(.*)'\)")
    assert size["message"].startswith("metadata.name ") and dns["message"].startswith("metadata.name ")
    server_refuses = len(name) > int(limit) or re.search(pattern, name) is None
    offline = [e for e in api.semantic_errors(valid(name)) if e.startswith("metadata.name:")]
    if name:  # an empty name is refused by the API server itself (name or generateName required)
        assert bool(offline) == server_refuses, (name, offline)


@pytest.mark.parametrize("queue", ["team a", "team/gpu", "-team", "team-", ".team", "", "q" * 64, "équipe"])
def test_a_queue_name_that_is_no_label_value_is_refused(queue: str) -> None:
    obj = valid()
    obj["spec"]["queueName"] = queue
    errors = api.schema_errors(api.load_defaulted(obj))
    assert errors and all(e.startswith("spec.queueName:") for e in errors), errors


@pytest.mark.parametrize("queue", ["team-a", "a", "7", "Team_A.gpu-1", "q" * 63])
def test_a_label_value_is_a_queue_name(queue: str) -> None:
    obj = valid()
    obj["spec"]["queueName"] = queue
    assert api.schema_errors(api.load_defaulted(obj)) == []


def leaf_rule(path: str) -> str:
    """The one CEL rule of the property at ``path`` (as :func:`properties` writes paths)."""
    (rule,) = rules(dict(properties(api.schema()))[path])
    return str(rule["rule"])


@pytest.mark.parametrize("role", api.ROLES)
def test_the_names_and_paths_the_jobs_keep_are_the_ones_checked_offline(role: str) -> None:
    """The CRD's rules on env names, volume names and mount paths refuse what offline validation refuses."""
    env = leaf_rule(f"spec.env.{role}[].name")
    assert env == "!(self in [" + ", ".join(f"'{n}'" for n in api.RESERVED_ENV) + "])"
    volume = leaf_rule(f"spec.volumes.{role}[].name")
    assert volume == " && ".join(f"self != '{n}'" for n in api.RESERVED_VOLUMES)
    assert leaf_rule(f"spec.volumeMounts.{role}[].mountPath") == f"!self.matches('{api.RESERVED_MOUNT}')"


@pytest.mark.parametrize(("path", "refused"), [
    ("/dev/shm", True), ("/tmp", True), ("/tmp/", True), ("//tmp", True), ("/dev", True), ("/", True),
    ("/dev//shm/", True), ("/models", False), ("/tmp/models", False), ("/dev/shm2", False), ("/tmpfs", False),
    ("/mnt/nvme", False), ("/devices", False),
])
def test_a_mount_over_the_jobs_own_paths_is_refused(path: str, refused: bool) -> None:
    obj = valid()
    obj["spec"]["volumes"] = {"train": [{"name": "v", "emptyDir": {}}]}
    obj["spec"]["volumeMounts"] = {"train": [{"name": "v", "mountPath": path}]}
    errors = api.semantic_errors(api.load_defaulted(obj))
    assert errors == ([f"spec.volumeMounts.train[0].mountPath: {path} would hide the Job's own /dev/shm or /tmp"]
                      if refused else []), errors
