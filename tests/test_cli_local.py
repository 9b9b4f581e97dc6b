"""``spinctl start --local``: a run without a cluster, through the same command users type, then inspected
with ``status --local`` and ``lineage --local``; a bad spec is one line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from spin_k8s.cli import main
from spin_k8s.workers import tiny

EXAMPLE = Path(__file__).parent.parent / "manifests" / "examples" / "tiny-cpu.yaml"


def test_start_local_then_status_and_lineage(tmp_path: Path) -> None:
    assets = tiny.create(tmp_path / "tiny", rows=16, seed=0)
    run = CliRunner().invoke(main, [
        "start", "-f", str(EXAMPLE), "--name", "here", "--local", str(tmp_path / "work"), "--iterations", "1",
        "--model", f"file://{assets.model_dir}", "--dataset", f"file://{assets.data_path}",
        "--storage", f"file://{tmp_path}/store",
        "--set", "generation.engine=transformers"],  # vLLM is not under test here: skip its start-up on CPU
        catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "here-i0-gen[1] shard written: 8 rows" in run.output
    assert run.output.splitlines()[-1].startswith("here: Succeeded (Completed); lineage: file://")

    status = CliRunner().invoke(main, ["status", "here", "--local", str(tmp_path / "work")]).output
    assert "Phase:       Succeeded (Completed)" in status and "here-i0-train" in status
    manifest = json.loads(CliRunner().invoke(main, ["lineage", "here", "--local", str(tmp_path / "work"),
                                                    "-o", "json"]).output)
    assert sorted(manifest["iterations"]["0"]) == ["generate", "train"]
    assert manifest["run"]["name"] == "here"
    assert Path(manifest["iterations"]["0"]["train"]["checkpoint"].removeprefix("file://"), "model.safetensors") \
        .is_file()


def test_start_local_refuses_a_bad_spec_in_one_line(tmp_path: Path) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["spec"]["training"]["zeroStage"] = 9
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    bad = CliRunner().invoke(main, ["start", "-f", str(tmp_path / "bad.yaml"), "--local", str(tmp_path / "w")])
    assert bad.exit_code == 1
    assert bad.output.strip() == "Error: invalid SpinRun tiny-cpu: spec.training.zeroStage: 9 is greater than " \
                                 "the maximum of 3"
    assert not (tmp_path / "w" / "runs").exists()  # nothing started
