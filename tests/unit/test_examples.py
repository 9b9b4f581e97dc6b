"""The example SpinRuns under manifests/examples/ are valid against the CRD, offline, as the API server
would see them (defaults applied, then the schema and the rules the CRD states in CEL)."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_k8s import api

EXAMPLES = Path(__file__).parent.parent.parent / "manifests" / "examples"


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


def test_examples_are_the_two_documented_ones() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == ["tiny-cpu.yaml", "zephyr-7b-gpu.yaml"]


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "zephyr-7b-gpu.yaml"])
def test_example_validates_against_the_crd(name: str) -> None:
    example = load(name)
    assert (example["apiVersion"], example["kind"]) == (api.API_VERSION, api.KIND)
    defaulted = api.load_defaulted(example)
    assert api.schema_errors(defaulted) == []
    assert api.semantic_errors(defaulted) == []


def test_tiny_cpu_needs_no_gpu_and_stays_tiny() -> None:
    spec = api.parse(api.load_defaulted(load("tiny-cpu.yaml"))).spec
    assert (spec.generation.gpus_per_shard, spec.training.gpus_per_node) == (0, 0)
    assert (spec.training.zero_stage, spec.training.precision) == (0, "fp32")
    assert spec.training.max_length <= 128 and spec.generation.max_tokens <= 16
    assert spec.model.startswith("file:///") and spec.dataset.startswith("file:///")


def test_zephyr_mirrors_the_paper() -> None:
    """The settings of SPIN's 7B runs (arXiv 2401.01335): 4 iterations, lr 5e-7, 5e-7, 1e-7, 1e-7 and
    beta 0.1, 0.1, 0.1, 5.0, RMSProp, bf16, ZeRO-3 on 8 GPUs, 1024/512 tokens, sampling at T=1, top_p=1,
    and each iteration also trains on the previous iteration's synthetic data."""
    spec = api.parse(api.load_defaulted(load("zephyr-7b-gpu.yaml"))).spec
    assert spec.iterations == 4
    assert [(spec.hyper(t).learning_rate, spec.hyper(t).beta) for t in range(4)] == \
        [(5e-7, 0.1), (5e-7, 0.1), (1e-7, 0.1), (1e-7, 5.0)]
    t = spec.training
    assert (t.optimizer, t.precision, t.zero_stage) == ("rmsprop", "bf16", 3)
    assert t.nodes * t.gpus_per_node == 8 and t.per_device_batch_size * 8 == 64
    assert (t.max_length, t.max_prompt_length, t.warmup_ratio) == (1024, 512, 0.1)
    g = spec.generation
    assert (g.temperature, g.top_p, g.shards * g.gpus_per_shard) == (1.0, 1.0, 8)
    assert spec.keep_previous == 1
    assert spec.storage.uri.startswith("s3://") and spec.storage.credentials_secret
