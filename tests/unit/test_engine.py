"""``spec.generation.engine``: the SpinRun names the generation engine (the worker never falls back from one
to the other), the generation Job passes it to the worker, the lineage records it, and a value outside the
enum is refused offline naming the field."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from spin_k8s import api, manifests, naming, planner
from spin_k8s.cli import main, spec
from spin_k8s.workers import generate, runtime

SPEC = {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 2,
        "storage": {"uri": "s3://runs/spin"}}
PREFIX = "s3://runs/spin/ns/demo/u-1"


def spinrun_object(**generation: Any) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"},
            "spec": {**SPEC, "generation": generation}}


def worker_args(run: api.SpinRun) -> list[str]:
    """The generation worker's arguments, as the Job's container runs ``python -m spin_k8s.workers.generate``."""
    container = manifests.generate_job(run, PREFIX, 0)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"][:2] == ["python", "-m", "spin_k8s.workers.generate"]
    args: list[str] = container["args"][2:]
    return args


@pytest.mark.parametrize(("generation", "engine"), [
    ({}, "vllm"),  # the CRD's default: the production engine
    ({"engine": "vllm"}, "vllm"),
    ({"engine": "transformers"}, "transformers"),
])
def test_the_generation_job_names_the_engine_of_the_spec(generation: dict[str, Any], engine: str) -> None:
    run = api.parse(api.load_defaulted(spinrun_object(shards=2, **generation)))
    assert run.spec.generation.engine == engine
    args = worker_args(run)
    assert args.count("--engine") == 1 and args[args.index("--engine") + 1] == engine
    assert generate.settings_from_args(args).engine == engine  # the worker accepts the Job's command as is


def test_the_lineage_records_the_engine() -> None:
    run = api.parse(api.load_defaulted(spinrun_object(engine="transformers")))
    job = planner.JobView(naming.job_name("demo", 0, naming.GENERATE), "uid-gen", 0, naming.GENERATE, 0,
                          "complete")
    assert planner.generate_record(run, PREFIX, job, {})["config"]["engine"] == "transformers"


def test_an_unknown_engine_is_refused_offline_naming_the_field() -> None:
    defaulted = api.load_defaulted(spinrun_object(engine="gpu"))
    errors = api.schema_errors(defaulted) + api.semantic_errors(defaulted)
    assert len(errors) == 1 and errors[0].startswith("spec.generation.engine: ") and "'gpu'" in errors[0], errors
    with pytest.raises(spec.SpecError, match=r"spec\.generation\.engine"):
        spec.check(spinrun_object(engine="gpu"))

    result = CliRunner().invoke(main, ["start", "--dry-run", "--name", "demo", "--model", "s3://models/sft",
                                       "--dataset", "s3://data/sft.jsonl", "--iterations", "1",
                                       "--storage", "s3://runs/spin", "--set", "generation.engine=gpu"],
                                env={"KUBECONFIG": ""}, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: invalid SpinRun demo: spec.generation.engine: "), lines


@pytest.mark.parametrize(("gpus", "size"), [(0, 1), (1, 1), (4, 4)])
def test_a_shard_s_gpus_reach_vllm_as_its_tensor_parallel_size(gpus: int, size: int, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job's command, parsed by the worker, builds vLLM's engine over all of the pod's GPUs (vLLM itself is
    replaced by a recorder: constructing a real multi-GPU engine needs the GPUs)."""
    run = api.parse(api.load_defaulted(spinrun_object(gpusPerShard=gpus)))
    settings = generate.settings_from_args(worker_args(run))
    assert settings.tensor_parallel_size == size
    built: dict[str, Any] = {}
    monkeypatch.setattr(generate, "import_vllm", lambda: SimpleNamespace(__version__="0.0", LLM=built.update))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "dtype": "bfloat16", "num_hidden_layers": 2, '
                                          '"hidden_size": 64, "num_attention_heads": 2}')
    generate.VllmEngine(tmp_path, settings, eos=2, max_model_len=1025)
    assert built["tensor_parallel_size"] == size
    assert (built["model"], built["dtype"], built["max_model_len"]) == (str(tmp_path), "bfloat16", 1025)


def test_the_transformers_engine_refuses_to_shard_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run = api.parse(api.load_defaulted(spinrun_object(engine="transformers", gpusPerShard=2)))
    assert generate.main(worker_args(run)) == runtime.USAGE_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine transformers cannot shard" in err[0] and "--tensor-parallel-size 2" in err[0]
    one_gpu = api.parse(api.load_defaulted(spinrun_object(engine="transformers", gpusPerShard=1)))
    assert generate.settings_from_args(worker_args(one_gpu)).tensor_parallel_size == 1
