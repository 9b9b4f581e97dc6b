"""Offline defaulting and validation of SpinRuns from the CRD schema."""

from __future__ import annotations

from typing import Any

import pytest
from invalid_specs import cases, valid

from spin_k8s import api


def offline_errors(obj: dict[str, Any]) -> list[str]:
    return api.schema_errors(obj) + api.semantic_errors(api.load_defaulted(obj))


def test_valid_spec_gets_the_crd_defaults() -> None:
    run = api.parse(api.load_defaulted(valid()))
    assert offline_errors(valid()) == []
    assert (run.spec.training.zero_stage, run.spec.training.optimizer, run.spec.keep_previous) == (3, "rmsprop", 1)
    assert (run.spec.generation.temperature, run.spec.generation.max_tokens, run.spec.restart_limit) == (1.0, 256, 3)


def test_iteration_overrides_apply_to_their_iteration_only() -> None:
    obj = valid()
    obj["spec"]["iterations"] = 4
    obj["spec"]["iterationOverrides"] = [{"iteration": 2, "learningRate": 1e-7}, {"iteration": 3, "beta": 5.0}]
    spec = api.parse(api.load_defaulted(obj)).spec
    assert spec.hyper(0) == api.Hyper(5e-7, 0.1, 2, 2)
    assert spec.hyper(2) == api.Hyper(1e-7, 0.1, 2, 2)
    assert spec.hyper(3) == api.Hyper(5e-7, 5.0, 2, 2)


def test_fidelity_fields_default_to_our_choices_and_take_the_authors() -> None:
    """Unset: the chat template without a system turn, a schedule as long as each iteration's training,
    length-grouped batches, responses capped at maxLength - maxPromptLength. Set: the authors' settings."""
    obj = valid()
    obj["spec"]["training"] = {"maxLength": 1024, "maxPromptLength": 400}
    obj["spec"]["iterationOverrides"] = [{"iteration": 1, "epochs": 3}]
    spec = api.parse(api.load_defaulted(obj)).spec
    assert (spec.generation.prompt_format, spec.system_prompt) == ("chatTemplate", None)
    assert (spec.training.schedule_epochs, spec.hyper(0).schedule_epochs, spec.hyper(1).schedule_epochs) == (None, 2, 3)
    assert (spec.training.length_grouping, spec.training.max_response_length) == (True, 624)

    obj["spec"]["data"] = {"systemPrompt": ""}
    obj["spec"]["generation"] = {"temperature": 0}
    obj["spec"]["training"].update(scheduleEpochs=6, lengthGrouping=False, maxResponseLength=300)
    assert offline_errors(obj) == []
    spec = api.parse(api.load_defaulted(obj)).spec
    assert spec.system_prompt == "" and spec.generation.temperature == 0.0
    assert [(spec.hyper(t).epochs, spec.hyper(t).schedule_epochs) for t in (0, 1)] == [(2, 6), (3, 6)]
    assert (spec.training.length_grouping, spec.training.max_response_length) == (False, 300)


@pytest.mark.parametrize(("why", "obj", "field"), cases(), ids=[c[0] for c in cases()])
def test_bad_specs_are_refused_offline_naming_the_field(why: str, obj: dict[str, Any], field: str) -> None:
    errors = offline_errors(obj)
    assert errors, why
    assert any(e.startswith(f"{field}:") or e.startswith(f"{field}[") for e in errors), errors


def test_long_name_is_refused() -> None:
    assert any("metadata.name" in e for e in api.semantic_errors(valid("x" * 41)))


@pytest.mark.parametrize("name", ["run.v2", "7run", "Demo", "run-", "run_1"])
def test_a_name_that_is_no_dns_1035_label_is_refused(name: str) -> None:
    """Legal object names that would make invalid pod hostnames or Service names."""
    assert [e for e in api.semantic_errors(valid(name)) if "is not a DNS-1035 label" in e] == [
        f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits and '-', starting with a "
        "letter and ending with a letter or digit)"]
    assert api.semantic_errors(valid("run-v2")) == []


def test_unset_worker_images_come_from_the_controller_defaults() -> None:
    obj = api.load_defaulted(valid("imgs"))
    assert "generate" not in obj["spec"]["images"]  # the CRD leaves them to the controller
    ours = api.Images(generate="registry.local/gen:1", train="registry.local/train:1")
    run = api.parse(obj, ours)
    assert (run.spec.image_generate, run.spec.image_train) == ("registry.local/gen:1", "registry.local/train:1")
    obj["spec"]["images"]["train"] = "mine/train:2"
    assert api.parse(obj, ours).spec.image_train == "mine/train:2"
    assert api.parse(obj).spec.image_generate == api.DEFAULT_IMAGES.generate


def test_checkpoints_to_keep_defaults_to_two_and_is_at_least_one() -> None:
    assert api.parse(api.load_defaulted(valid())).spec.training.checkpoints_to_keep == 2
    obj = valid()
    obj["spec"]["training"] = {"checkpointsToKeep": 1}
    assert api.parse(api.load_defaulted(obj)).spec.training.checkpoints_to_keep == 1
    obj["spec"]["training"] = {"checkpointsToKeep": 0}
    errors = offline_errors(obj)
    assert len(errors) == 1 and errors[0].startswith("spec.training.checkpointsToKeep: "), errors
