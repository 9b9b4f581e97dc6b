"""spinctl start's input, strictly: fields the CRD does not declare are refused (in -f files and --set keys)
with a did-you-mean, YAML numbers are read as the API server reads them, and every message names what the
user wrote (the flag, the --set key, the field in the file), on one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from spin_k8s.cli import main, spec

BASE = ("--name", "x", "--dry-run", "-o", "yaml")
VALID = {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 2,
         "storage": {"uri": "s3://runs/spin"}}


def spinctl(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"KUBECONFIG": ""}, catch_exceptions=False)


def error_line(result: Result) -> str:
    """The one line an error is, without its ``Error: `` prefix."""
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: "), line
    return line.removeprefix("Error: ")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def dry_run_spec(*args: str) -> dict[str, Any]:
    result = spinctl("start", *BASE, *args)
    assert result.exit_code == 0, result.output
    run: dict[str, Any] = next(yaml.safe_load_all(result.output))
    return run


def test_misspelled_fields_in_a_file_are_refused_with_their_path_and_a_suggestion(tmp_path: Path) -> None:
    spec_only = write(tmp_path, yaml.safe_dump({**VALID, "training": {"learningrate": 1e-3},
                                                "generation": {"shard": 2}}, sort_keys=False))
    assert error_line(spinctl("start", "-f", str(spec_only), *BASE)) == (
        f'{spec_only}: unknown field "training.learningrate" (did you mean "learningRate"?) '
        '(and 1 more: unknown field "generation.shard" (did you mean "shards"?))')
    whole = write(tmp_path, yaml.safe_dump({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun",
                                            "metadata": {"name": "x", "labels": {"free": "form"}},
                                            "spec": {**VALID, "iterationOverrides": [{"iteration": 1, "bta": 5}]}}))
    assert error_line(spinctl("start", "-f", str(whole), *BASE)) == (
        f'{whole}: unknown field "spec.iterationOverrides[0].bta" (did you mean "beta"?)')
    top = write(tmp_path, yaml.safe_dump({"kind": "SpinRun", "spec": VALID, "sepc": {}}))
    assert 'unknown field "sepc" (did you mean "spec"?)' in error_line(spinctl("start", "-f", str(top), *BASE))


def test_misspelled_set_keys_are_refused(tmp_path: Path) -> None:
    flags = ["--model", "s3://models/sft", "--dataset", "s3://data/x.jsonl", "--iterations", "1",
             "--storage", "s3://runs/spin"]
    assert error_line(spinctl("start", *BASE, *flags, "--set", "trainig.learningRate=1e-3")) == (
        '--set trainig.learningRate: unknown field "trainig" (did you mean "training"?)')
    no_match = error_line(spinctl("start", *BASE, *flags, "--set", "training.lr=1e-3"))
    assert no_match.startswith('--set training.lr: unknown field "training.lr" (training has: nodes, gpusPerNode,')
    assert "learningRate" in no_match
    assert error_line(spinctl("start", *BASE, *flags, "--set", "training={learningrate: 1}")) == (
        '--set training: unknown field "training.learningrate" (did you mean "learningRate"?)')
    # Where the schema leaves fields free, any name goes.
    run = dry_run_spec(*flags, "--set", "podLabels.team=a", "--set", "resources.generate.limits.cpu=2",
                       "--set", "spec.queueName=123")
    assert run["spec"]["podLabels"] == {"team": "a"} and run["spec"]["resources"]["generate"]["limits"]["cpu"] == 2
    assert run["spec"]["queueName"] == "123"  # a string field takes the text as written


@pytest.mark.parametrize(("assignment", "expected"), [
    ("training=3", "--set training=3: training is an object; set one of its fields, e.g. --set training.nodes=VALUE"),
    ("iterationOverrides=1", "--set iterationOverrides=1: iterationOverrides is a list; set an item's field, "
                             "e.g. --set iterationOverrides[0].FIELD=VALUE"),
    ("model[0]=x", "--set model[0]: model is a string, not a list"),
])
def test_a_value_of_the_wrong_shape_is_one_line(assignment: str, expected: str) -> None:
    flags = ["--model", "s3://models/sft", "--dataset", "s3://data/x.jsonl", "--iterations", "1",
             "--storage", "s3://runs/spin"]
    assert error_line(spinctl("start", *BASE, *flags, "--set", assignment)) == expected


def test_a_file_of_the_wrong_shape_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # The CEL rules (maxPromptLength < maxLength) are not evaluated on a training that is not an object, as
    # the API server skips them; they used to raise AttributeError here.
    bad = write(tmp_path, yaml.safe_dump({**VALID, "training": 3}))
    assert error_line(spinctl("start", "-f", str(bad), *BASE)) == (
        "invalid SpinRun x: spec.training: 3 is not of type 'object'")


def test_yaml_numbers_are_read_as_the_api_server_reads_them(tmp_path: Path) -> None:
    path = write(tmp_path, "model: s3://models/sft\ndataset: s3://data/sft.jsonl\niterations: 2\n"
                           "storage: {uri: s3://runs/spin}\ntraining: {learningRate: 5e-7, beta: 1E-1}\n"
                           "generation: {temperature: .5, maxTokens: 64}\nimages: {train: 'trainer:1.2.3'}\n")
    run = dry_run_spec("-f", str(path))
    assert run["spec"]["training"]["learningRate"] == 5e-7 and run["spec"]["training"]["beta"] == 0.1
    assert run["spec"]["generation"]["temperature"] == 0.5
    assert isinstance(run["spec"]["generation"]["maxTokens"], int)
    assert yaml.load("[5e-7, 3, 1.0e-3, 1.2.3, 2026-11-27, yes]", Loader=spec.SpecLoader) == [
        5e-7, 3, 1e-3, "1.2.3", yaml.safe_load("2026-11-27"), True]
    assert yaml.safe_load("5e-7") == "5e-7"  # PyYAML's own loader is left as it is


def test_missing_fields_name_the_flag_and_every_problem_is_listed() -> None:
    line = error_line(spinctl("start", "--name", "x", "--dry-run"))
    problems = ["--dataset is required (spec.dataset)", "--iterations is required (spec.iterations)",
                "--model is required (spec.model)"]
    assert line == f"invalid SpinRun x: {problems[0]} (and 2 more: {'; '.join(problems[1:])})"
    # Storage may come from the cluster's SpinRuntime (tests/unit/test_cli_commands.py); without a cluster, none.
    only_secret = error_line(spinctl("start", "--name", "x", "--dry-run", "--model", "s3://models/m",
                                     "--dataset", "s3://data/d", "--iterations", "1", "--storage-secret", "s3"))
    assert only_secret == '--storage is required (spec.storage.uri): no SpinRuntime "default" gives one'


def test_a_bad_uri_is_explained_in_words(tmp_path: Path) -> None:
    flags = ["--dataset", "s3://data/x.jsonl", "--iterations", "1", "--storage", "s3://runs/spin"]
    assert error_line(spinctl("start", "--name", "x", "--dry-run", *flags, "--model", "./dir")) == (
        "invalid SpinRun x: --model ./dir: a local path needs file:///absolute/path (the path as the pods see "
        "it), or use s3://bucket/key")
    assert "--storage-endpoint minio:9000: expected a URL" in error_line(spinctl(
        "start", "--name", "x", "--dry-run", *flags, "--model", "s3://models/m", "--storage-endpoint", "minio:9000"))
    # From a file, the field is named instead of a flag.
    path = write(tmp_path, yaml.safe_dump({**VALID, "model": "file://models/m", "dataset": "s3://Data/x"}))
    assert error_line(spinctl("start", "-f", str(path), "--name", "x", "--dry-run")) == (
        "invalid SpinRun x: spec.dataset s3://Data/x: bucket name 'Data': 2 to 63 lowercase letters, digits, dots "
        "and hyphens (and 1 more: spec.model file://models/m: a file:// URI takes an absolute path: "
        "file:///absolute/path (three slashes))")


def test_one_line_lists_exactly_the_problems_it_counts() -> None:
    assert spec.one_line("bad", ["a"]) == "bad: a"
    assert spec.one_line("bad", ["a", "b", "c", "d"]) == "bad: a (and 3 more: b; c; d)"


@pytest.mark.parametrize("name", ["Demo", "run.v2", "7run", "run_1", "run-"])
def test_a_name_the_api_server_refuses_is_refused_offline_in_one_line(tmp_path: Path, name: str) -> None:
    """Legal object names that no Service or pod hostname can derive from (DNS-1035), named as the server's CEL
    rule names them, whether they come from the file or from --name."""
    expected = (f"invalid SpinRun {name}: metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, "
                "digits and '-', starting with a letter and ending with a letter or digit)")
    path = write(tmp_path, yaml.safe_dump({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun",
                                           "metadata": {"name": name}, "spec": VALID}))
    assert error_line(spinctl("start", "-f", str(path), "--dry-run")) == expected
    assert error_line(spinctl("start", "-f", str(path), "--dry-run", "--local", str(tmp_path / "runs"))) == expected
    spec_only = tmp_path / "spec.yaml"
    spec_only.write_text(yaml.safe_dump(VALID))
    assert error_line(spinctl("start", "-f", str(spec_only), "--name", name, "--dry-run")) == expected


def test_a_long_name_is_refused_offline() -> None:
    flags = ["--model", "s3://models/sft", "--dataset", "s3://data/x.jsonl", "--iterations", "1",
             "--storage", "s3://runs/spin"]
    name = "r" * 41
    assert error_line(spinctl("start", "--name", name, "--dry-run", *flags)) == (
        f"invalid SpinRun {name}: metadata.name: must be at most 40 characters (got 41)")
    assert dry_run_spec(*flags, "--name", "r" * 40)["metadata"]["name"] == "r" * 40  # the last --name wins


def test_unknown_metadata_fields_are_refused_as_strict_validation_does(tmp_path: Path) -> None:
    """The CRD leaves metadata to the API server, which refuses unknown ObjectMeta fields under strict field
    validation: offline, a misspelt `lables` is refused too instead of being dropped with its labels."""
    path = write(tmp_path, yaml.safe_dump({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SpinRun",
                                           "metadata": {"name": "x", "lables": {"team": "a"}, "uid": "u"},
                                           "spec": {**VALID, "trainig": {}}}, sort_keys=False))
    assert error_line(spinctl("start", "-f", str(path), "--dry-run")) == (
        f'{path}: unknown field "metadata.lables" (did you mean "labels"?) '
        '(and 1 more: unknown field "spec.trainig" (did you mean "training"?))')
    path.write_text(yaml.safe_dump({"kind": "SpinRun", "metadata": "x", "spec": VALID}))
    assert error_line(spinctl("start", "-f", str(path), "--dry-run")) == (
        f"{path}: metadata must be a mapping (name, labels, annotations), not 'x'")
    labelled = write(tmp_path, yaml.safe_dump({"kind": "SpinRun", "spec": VALID, "metadata": {
        "name": "x", "labels": {"team": "a"}, "annotations": {"note": "n"}}}))
    run = dry_run_spec("-f", str(labelled))
    assert run["metadata"]["labels"] == {"team": "a"} and run["metadata"]["annotations"] == {"note": "n"}
