"""spinctl without a cluster: building and checking specs, dry runs, one-line errors, pure formatting."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from spin_k8s.cli import main, output

SPEC = {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 2,
        "storage": {"uri": "s3://runs/spin"}}


def spinctl(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={"KUBECONFIG": "", **(env or {})}, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_dry_run_prints_the_run_and_iteration_zero_jobs_with_overrides(spec_file: Path) -> None:
    result = spinctl("start", "-f", str(spec_file), "--name", "demo", "-n", "team-a", "--dry-run", "-o", "yaml",
                     "--set", "generation.shards=3", "--set", "training.learningRate=5e-7",
                     "--set", "iterationOverrides[0].iteration=1", "--set", "iterationOverrides[0].beta=5",
                     "--model", "s3://models/other")
    assert result.exit_code == 0, result.output
    run, gen, service, train = yaml.safe_load_all(result.output)
    assert run["metadata"] == {"name": "demo", "namespace": "team-a"}
    assert run["spec"]["model"] == "s3://models/other"  # a flag beats the file
    assert run["spec"]["training"]["learningRate"] == 5e-7  # a number, though YAML 1.1 reads 5e-7 as text
    assert run["spec"]["iterationOverrides"] == [{"iteration": 1, "beta": 5}]
    assert [o["metadata"]["name"] for o in (gen, service, train)] == ["demo-i0-gen", "demo-train", "demo-i0-train"]
    assert gen["spec"]["completions"] == 3 and gen["metadata"]["namespace"] == "team-a"
    args = train["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--learning-rate") + 1] == "5e-07" and args[args.index("--beta") + 1] == "0.1"
    assert args[args.index("--model") + 1] == "s3://models/other"


def test_dry_run_json_is_a_list_and_name_output_lists_objects(spec_file: Path) -> None:
    listed = json.loads(spinctl("start", "-f", str(spec_file), "--name", "x", "--dry-run", "-o", "json").output)
    assert listed["kind"] == "List" and [i["kind"] for i in listed["items"]] == ["SpinRun", "Job", "Service", "Job"]
    names = spinctl("start", "-f", str(spec_file), "--name", "x", "--dry-run").output.splitlines()
    assert names == ["spinrun/x (dry run)", "job/x-i0-gen (dry run)", "service/x-train (dry run)",
                     "job/x-i0-train (dry run)"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "training.zeroStage=7"], "spec.training.zeroStage: 7 is greater than the maximum of 3"),
    (["--iterations", "0"], "spec.iterations: 0 is less than the minimum of 1"),
    (["--set", "training.maxPromptLength=2048"], "spec.training.maxPromptLength: must be below"),
    (["--name", "x" * 41], "metadata.name: must be at most 40 characters"),
    (["--set", "nonsense"], "--set 'nonsense': expected key=value"),
    (["--set", "storage.uri.x=1"], "--set storage.uri.x: storage.uri is a string, it has no field 'x'"),
])
def test_bad_input_is_one_line_naming_the_field(spec_file: Path, args: list[str], expected: str) -> None:
    assert expected in one_line_error(spinctl("start", "-f", str(spec_file), "--dry-run", *args))


def test_a_file_of_another_kind_or_missing_fields_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "job.yaml"
    other.write_text(yaml.safe_dump({"kind": "Job", "spec": {}}))
    assert "kind is 'Job', expected SpinRun" in one_line_error(spinctl("start", "-f", str(other), "--dry-run"))
    assert "--model is required (spec.model)" in one_line_error(spinctl("start", "--dry-run", "--iterations", "1"))


def test_no_cluster_is_one_line(tmp_path: Path) -> None:
    assert one_line_error(spinctl("list", "--kubeconfig", str(tmp_path / "nope"))) == \
        f"Error: kubeconfig {tmp_path / 'nope'} does not exist"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c",
                      "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "ctx-ns"}}]}))
    line = one_line_error(spinctl("status", "demo", env={"KUBECONFIG": str(config)}))
    assert line == f"Error: cannot reach the cluster at https://127.0.0.1:{port} (connection refused)"
    # The context's namespace is used when -n is absent, as kubectl does.
    dry = spinctl("start", "--dry-run", "-o", "json", *_flags(), env={"KUBECONFIG": str(config)})
    assert json.loads(dry.output)["items"][0]["metadata"]["namespace"] == "ctx-ns"


def _flags() -> list[str]:
    return ["--name", "d", "--model", "s3://models/x", "--dataset", "s3://data/x.jsonl", "--iterations", "1",
            "--storage", "s3://runs/spin"]


def test_completion_script_and_help_examples() -> None:
    assert "_SPINCTL_COMPLETE" in spinctl("completion", "bash").output
    for command in ("start", "wait", "list", "status", "logs", "cancel", "resume", "delete", "lineage", "completion"):
        assert "Examples:" in spinctl(command, "--help").output, command


MANIFEST: dict[str, Any] = {
    "run": {"name": "demo", "namespace": "ns"}, "codeVersion": "0.1.0", "updated": "2026-11-27T00:00:00Z",
    "iterations": {
        "0": {"generate": {"job": "demo-i0-gen", "model": "s3://m/sft", "config": {"temperature": 1.0},
                           "shards": [{"sha256": "a" * 64, "rows": 8}, {"sha256": "b" * 64, "rows": 8}]},
              "train": {"job": "demo-i0-train", "model": "s3://m/sft", "config": {"learningRate": 5e-7, "beta": 0.1},
                        "dataMix": ["p/i0/synthetic"], "checkpointDigest": "c" * 64,
                        "metrics": {"final": {"loss": 0.5, "rewards/accuracies": 0.75}}}},
        "1": {"generate": {"job": "demo-i1-gen", "model": "p/i0/model", "config": {"temperature": 1.0},
                           "shards": [{"sha256": "d" * 64, "rows": 8}]},
              "train": {"job": "demo-i1-train-r1", "model": "p/i0/model", "restarts": 1,
                        "config": {"learningRate": 1e-7, "beta": 0.1},
                        "dataMix": ["p/i0/synthetic", "p/i1/synthetic"], "checkpointDigest": "e" * 64}},
    },
}


def test_lineage_rows_and_config_diff() -> None:
    rows = output.lineage_rows(MANIFEST)
    assert [(r["iteration"], r["role"], r["job"]) for r in rows] == [
        (0, "generate", "demo-i0-gen"), (0, "train", "demo-i0-train"), (1, "generate", "demo-i1-gen"),
        (1, "train", "demo-i1-train-r1")]
    assert rows[0]["sha256"] == f"{'a' * 12},{'b' * 12}" and rows[0]["detail"] == "2 shards, 16 rows"
    assert rows[1]["detail"] == "loss 0.5, accuracy 0.75, restarts 0"
    diff = {d["key"]: (d["0"], d["1"]) for d in output.config_diff(MANIFEST, 0, 1)}
    assert diff == {"generate.model": ("s3://m/sft", "p/i0/model"), "train.model": ("s3://m/sft", "p/i0/model"),
                    "train.config.learningRate": (5e-7, 1e-7),
                    "train.dataMix": (["p/i0/synthetic"], ["p/i0/synthetic", "p/i1/synthetic"])}
    assert output.config_diff(MANIFEST, 0, 0) == []
    with pytest.raises(KeyError):
        output.config_diff(MANIFEST, 0, 2)


def test_progress_line_names_the_current_job() -> None:
    run = {"metadata": {"name": "demo"}, "spec": {"iterations": 4},
           "status": {"phase": "Training", "iteration": 2}}
    jobs = [{"iteration": 2, "role": "train", "attempt": a, "succeeded": s, "completions": 2}
            for a, s in ((0, 0), (1, 1))]
    # Counted from 0, as status, Job names, logs --iteration and lineage count: the third of four iterations.
    assert output.progress_line(run, jobs) == "demo: iteration 2 of 4 Training, nodes done 1/2, restart 1"


def test_demo_passes_its_arguments_to_the_demo(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep me")
    used = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert used.exit_code == 1 and "is not empty: give the demo a new directory" in used.output
    assert (tmp_path / "old.txt").read_text() == "keep me"
    assert "spinctl demo --out /tmp/spin-demo" in CliRunner().invoke(main, ["demo", "--help"]).output
