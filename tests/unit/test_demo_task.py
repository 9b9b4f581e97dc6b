"""The demo's task: p_data is a distribution (each prompt's answers sum to 1, with the closed form of drawing
without replacement), the sampler draws from it, answers are classified by the first constraint they break,
everything is a function of the seed, and the JSONL rows are what the workers read."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from spin_k8s.demo import task
from spin_k8s.workers import data

TASK = task.build(task.TaskConfig(), 0)


def test_every_prompt_is_a_distribution_over_its_valid_answers() -> None:
    assert len(TASK.prompts) == 6 * 3 * 9  # categories x counts x (no exclusion + each item)
    for prompt in TASK.prompts:
        answers = list(TASK.answers(prompt))
        n = 8 - (prompt.exclude is not None)
        assert len(answers) == math.perm(n, prompt.k)
        assert sum(p for _, p in answers) == pytest.approx(1.0, abs=1e-12)
        assert all(TASK.violation(prompt, a) is None and p > 0 for a, p in answers)


def test_probability_is_drawing_without_replacement_by_zipf_weight() -> None:
    prompt = task.Prompt("fruits", 2, "fig")
    w = TASK.weights["fruits"]
    a, b = [item for item in w if item != "fig"][:2]
    total = sum(v for k, v in w.items() if k != "fig")
    assert TASK.probability(prompt, (a, b)) == pytest.approx(w[a] / total * w[b] / (total - w[a]))
    assert sorted(w.values(), reverse=True) == pytest.approx([1 / r for r in range(1, 9)])  # Zipf, exponent 1
    assert TASK.probability(prompt, (a, a)) == 0.0


def test_sampling_follows_p_data() -> None:
    prompt = task.Prompt("metals", 2, None)
    rng = random.Random(1)
    n = 40_000
    counts = Counter(TASK.sample(prompt, rng) for _ in range(n))
    for answer, p in TASK.answers(prompt):
        # within 4 standard errors of the binomial count
        assert abs(counts[answer] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, answer


@pytest.mark.parametrize(("answer", "violation"), [
    ("plum apple", None),
    ("plum", task.Violation.COUNT),  # too few
    ("plum apple kiwi", task.Violation.COUNT),  # too many
    ("plum plum", task.Violation.REPEAT),
    ("plum fig", task.Violation.EXCLUSION),
    ("plum cat", task.Violation.CATEGORY),
    ("cat plum", task.Violation.CATEGORY),
    ("plum Name", task.Violation.FORMAT),
    ("", task.Violation.FORMAT),
    ("fig fig", task.Violation.EXCLUSION),  # the first constraint broken, left to right
    ("plum apple apple", task.Violation.REPEAT),
])
def test_violation_is_the_first_constraint_broken(answer: str, violation: task.Violation | None) -> None:
    assert TASK.violation(task.Prompt("fruits", 2, "fig"), answer.split()) is violation


def test_task_and_pairs_are_functions_of_the_seed() -> None:
    again, other = task.build(task.TaskConfig(), 0), task.build(task.TaskConfig(), 1)
    assert again == TASK and other.weights != TASK.weights
    assert task.draw(TASK, 50, "train", 3) == task.draw(TASK, 50, "train", 3)
    assert task.draw(TASK, 20, "train", 3) == task.draw(TASK, 50, "train", 3)[:20]  # a stream, not a resample
    assert task.draw(TASK, 50, "train", 3) != task.draw(TASK, 50, "validation", 3)
    assert all(TASK.violation(p.prompt, p.answer) is None for p in task.draw(TASK, 200, "heldout", 0))


def test_words_cover_prompts_and_items_once() -> None:
    words = TASK.words()
    assert len(words) == len(set(words))
    items = {i for c in TASK.weights.values() for i in c}
    assert {w for p in TASK.prompts for w in p.text.split()} | items == set(words)
    assert task.Prompt("tools", 3, "saw").text == "Name 3 different tools , but not saw ."


def test_entropy_of_a_one_item_prompt() -> None:
    one = task.build(task.TaskConfig(categories=1, counts=(1,)), 0)
    w = [1 / r for r in range(1, 9)]
    expected_full = -sum(x / sum(w) * math.log(x / sum(w)) for x in w)
    # the exclusion prompts remove one item each; check the no-exclusion prompt's share through the mean
    per_prompt = [-sum(p * math.log(p) for _, p in one.answers(q)) for q in one.prompts]
    assert per_prompt[0] == pytest.approx(expected_full)
    assert task.entropy(one) == pytest.approx(sum(per_prompt) / len(per_prompt))


def test_jsonl_is_read_by_the_workers(tmp_path: Path) -> None:
    pairs = task.draw(TASK, 5, "train", 0)
    loaded = data.load_sft(str(task.write_jsonl(tmp_path / "sft.jsonl", pairs)))
    assert not loaded.bad
    assert [(e.prompt, e.response) for e in loaded.examples] == [(p.prompt.text, p.response) for p in pairs]
