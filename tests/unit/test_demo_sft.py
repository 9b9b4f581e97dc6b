"""The demo's SFT loop and its precondition: a run is a function of its seed (byte-identical weights), the
checkpoint it keeps is the one with the lowest validation NLL, and a continued-SFT model counts as an
improvement only beyond the tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_k8s.demo import experiment, model, sft, task

TASK = task.build(task.TaskConfig(categories=1, counts=(1, 2)), 0)
TINY = model.ModelConfig(hidden_size=32, intermediate_size=64, num_heads=1)


def texts(pairs: list[task.Pair]) -> list[tuple[str, str]]:
    return [(p.prompt.text, p.response) for p in pairs]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model.build(tmp_path_factory.mktemp("demo-sft") / "base", TASK.words(), TINY, seed=0)


def test_same_seed_same_weights(base: Path, tmp_path: Path) -> None:
    pairs = texts(task.draw(TASK, 64, "train", 0))
    config = sft.SftConfig(steps=6, batch_size=16, learning_rate=3e-3, seed=1)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        sft.train(base, tmp_path / name, pairs, sft.SftConfig(**{**config.__dict__, "seed": seed}))
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]  # the seed orders the data: it matters


def test_keeps_the_checkpoint_with_the_lowest_validation_nll(base: Path, tmp_path: Path) -> None:
    pairs = texts(task.draw(TASK, 32, "train", 0))  # few pairs and a high rate: it over-fits within the run
    validation = texts(task.draw(TASK, 128, "validation", 0))
    config = sft.SftConfig(steps=40, batch_size=16, learning_rate=1e-2, eval_every=10, seed=0)
    result = sft.train(base, tmp_path / "sft", pairs, config, validation)
    steps = [step for step, _ in result.curve]
    assert steps == [0, 10, 20, 30, 40]
    best_step, best = min(result.curve, key=lambda sv: sv[1])
    assert result.best_step == best_step
    kept = sft.nll(tmp_path / "sft", validation, config)
    assert sum(kept) / len(kept) == pytest.approx(best, rel=1e-5)


def test_improvement_needs_more_than_the_tolerances() -> None:
    p = experiment.Precondition(tv=0.01, nll=0.02, validation_se=2.0)
    base = {"tv": 0.30, "nll": 3.60}
    base_nll = [3.0, 4.0, 3.5, 3.7] * 50
    assert experiment.improvement(base, {"tv": 0.295, "nll": 3.59}, base_nll, base_nll, p) == []
    ways = experiment.improvement(base, {"tv": 0.28, "nll": 3.57}, base_nll, [v - 0.05 for v in base_nll], p)
    assert [w.split()[0] for w in ways] == ["TV", "exact", "validation"]
    # a validation gain above the nll tolerance but within 2 standard errors is noise
    noisy = [v - 0.03 + (0.5 if i % 2 else -0.5) for i, v in enumerate(base_nll)]
    assert experiment.improvement(base, base, base_nll, noisy, p) == []


def test_spin_steps_follow_the_training_worker() -> None:
    s = experiment.default_settings(iterations=3)
    # 2000 rows, global batch 32, 2 epochs; from iteration 1 on the previous synthetic set is mixed in
    assert experiment.spin_steps(s) == [2 * (2000 // 32), 2 * (4000 // 32), 2 * (4000 // 32)]


def test_trained_further_takes_the_best_continued_model_and_counts_its_steps() -> None:
    start = {"model": "sft", "steps": 400, "sequences": 25600, "sft_runs": [{"steps": 400, "best_step": 400}],
             "validation_nll": 3.60}

    def point(model: str, nll: float) -> dict[str, object]:
        return {"model": model, "arm": "x", "iteration": 1, "steps": 10, "sequences": 640, "validation_nll": nll}

    arms = {"sft-lr": [start, point("lr-1", 3.58), point("lr-2", 3.55), point("lr-3", 3.61)],
            "sft-spinopt": [start, point("opt-1", 3.57)]}
    further = experiment.trained_further(start, arms)
    assert further["model"] == "lr-2" and (further["arm"], further["iteration"]) == ("sft", 0)
    assert (further["steps"], further["sequences"]) == (420, 25600 + 1280)  # two continued iterations on top
    assert further["sft_runs"][-1] == {"continued": "sft-lr", "steps": 20, "best_step": 20}
