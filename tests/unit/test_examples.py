"""The example SpinRuns under manifests/examples/ are valid against the CRD, offline, as the API server
would see them (defaults applied, then the schema and the rules the CRD states in CEL); tests/test_controller.py
has the API server itself accept them. The two zephyr examples say, setting by setting, where they follow the
paper and where they deviate, and the paper example takes the authors' settings."""

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_k8s import api
from spin_k8s.workers import train

EXAMPLES = Path(__file__).parent.parent.parent / "manifests" / "examples"


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


NAMES = ["tiny-cpu.yaml", "zephyr-7b-gpu.yaml", "zephyr-7b-paper.yaml"]
ZEPHYRS = ["zephyr-7b-gpu.yaml", "zephyr-7b-paper.yaml"]
# The settings where the authors' choices and ours can differ: each zephyr example must address every one.
FIDELITY = {"data": ["keepPreviousIterations", "systemPrompt"],
            "generation": ["promptFormat", "temperature", "topP", "maxTokens", "scoreReference"],
            "training": ["optimizer", "precision", "zeroStage", "learningRate", "beta", "lossType", "epochs",
                         "scheduleEpochs", "perDeviceBatchSize", "maxLength", "maxPromptLength", "maxResponseLength",
                         "warmupRatio", "lengthGrouping"]}


def test_examples_are_the_documented_ones() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == NAMES


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", ZEPHYRS)
def test_zephyr_trains_as_the_paper(name: str) -> None:
    """The training setup of SPIN's 7B runs (arXiv 2401.01335), common to both examples: 4 iterations, lr 5e-7,
    5e-7, 1e-7, 1e-7 and beta 0.1, 0.1, 0.1, 5.0, RMSProp, bf16, ZeRO-3 on 8 GPUs, global batch 64, 1024/512
    tokens, answers capped at 512, 2 epochs, 256 new tokens, each iteration also training on the previous
    iteration's synthetic data."""
    spec = api.parse(api.load_defaulted(load(name))).spec
    assert spec.iterations == 4
    assert [(spec.hyper(t).learning_rate, spec.hyper(t).beta, spec.hyper(t).epochs) for t in range(4)] == \
        [(5e-7, 0.1, 2), (5e-7, 0.1, 2), (1e-7, 0.1, 2), (1e-7, 5.0, 2)]
    t = spec.training
    assert (t.optimizer, t.precision, t.zero_stage, t.loss_type) == ("rmsprop", "bf16", 3, "sigmoid")
    assert t.nodes * t.gpus_per_node == 8 and t.per_device_batch_size * 8 == 64
    assert (t.max_length, t.max_prompt_length, t.max_response_length, t.warmup_ratio) == (1024, 512, 512, 0.1)
    assert spec.generation.max_tokens == 256 and spec.generation.shards * spec.generation.gpus_per_shard == 8
    assert spec.keep_previous == 1
    assert spec.storage.uri.startswith("s3://") and spec.storage.credentials_secret


def test_zephyr_gpu_takes_our_choices() -> None:
    """Sampling at T=1 on the chat template with the empty system turn zephyr's SFT had, length-grouped batches,
    and a schedule that ends with training."""
    spec = api.parse(api.load_defaulted(load("zephyr-7b-gpu.yaml"))).spec
    g = spec.generation
    assert (g.prompt_format, g.temperature, g.top_p, spec.system_prompt) == ("chatTemplate", 1.0, 1.0, "")
    assert (spec.training.length_grouping, spec.training.schedule_epochs) == (True, None)


def test_zephyr_paper_takes_the_authors_settings() -> None:
    """Their instruction prompt, greedy decoding, random batches, and a 6-epoch linear schedule with 10% warmup
    stopped after 2 epochs: the learning rate there is still ~0.74 of its peak (SPIN.md), not 0."""
    spec = api.parse(api.load_defaulted(load("zephyr-7b-paper.yaml"))).spec
    g = spec.generation
    assert (g.prompt_format, g.temperature, spec.system_prompt) == ("paperInstruction", 0.0, None)
    assert spec.training.length_grouping is False
    per_epoch = 50_000 // 64
    for t in range(4):
        hyper = spec.hyper(t)
        schedule = hyper.schedule_epochs * per_epoch
        warmup = math.ceil(spec.training.warmup_ratio * schedule)
        stop = train.linear_schedule(hyper.epochs * per_epoch, schedule, warmup)
        assert (hyper.epochs, hyper.schedule_epochs) == (2, 6) and stop == pytest.approx(0.74, abs=0.005)


@pytest.mark.parametrize("name", ZEPHYRS)
def test_zephyr_says_where_it_follows_the_paper_and_where_it_deviates(name: str) -> None:
    """Every setting of data, generation and training, and every fidelity setting left unset, carries a comment
    "paper: ..." or "deviates: ..."."""
    text = (EXAMPLES / name).read_text()
    spec = load(name)["spec"]
    for section in ("data", "generation", "training"):
        for key in spec[section]:
            assert re.search(rf"^ +{key}: .*  # (paper|deviates): \S", text, re.M), f"{name}: {section}.{key}"
        for key in FIDELITY[section]:
            if key not in spec[section]:
                assert re.search(rf"^ +# {key} unset   (paper|deviates): \S", text, re.M), f"{name}: {section}.{key}"
    for key in ("model", "dataset", "iterations", "iterationOverrides"):
        assert re.search(rf"^  {key}:.*  # paper: \S", text, re.M), f"{name}: {key}"
