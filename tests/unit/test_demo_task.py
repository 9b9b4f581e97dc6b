"""The demo's task: problems and splits are a function of the seed, the splits never share a prompt, the
scorer tells correct from wrong from malformed answers, and the JSONL rows are what the workers read."""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_k8s.demo import task
from spin_k8s.workers import data

CONFIG = task.TaskConfig(max_operand=9, train_size=80, heldout_size=40)


def test_problems_are_the_whole_task_with_their_values() -> None:
    problems = task.all_problems(CONFIG)
    # 10 x 10 additions and the 55 subtractions with a >= b
    assert len(problems) == 100 + 55
    assert len(set(problems)) == len(problems)
    assert all(p.value >= 0 for p in problems)
    p = task.Problem(17, "plus", 25)
    assert (p.prompt, p.response, p.value) == ("What is 17 plus 25?", "17 plus 25 is 42.", 42)
    assert task.Problem(9, "minus", 4).response == "9 minus 4 is 5."


def test_split_is_deterministic_by_seed_and_disjoint() -> None:
    first, again, other = task.split(CONFIG, 3), task.split(CONFIG, 3), task.split(CONFIG, 4)
    assert first == again
    assert first.train != other.train
    assert (len(first.train), len(first.heldout)) == (80, 40)
    assert not {p.prompt for p in first.train} & {p.prompt for p in first.heldout}


def test_split_larger_than_the_task_is_refused() -> None:
    with pytest.raises(ValueError, match="155 problems"):
        task.split(task.TaskConfig(max_operand=9, train_size=150, heldout_size=10), 0)


@pytest.mark.parametrize(("answer", "verdict"), [
    ("17 plus 25 is 42.", task.Verdict.CORRECT),
    (" 17 plus 25 is 42. ", task.Verdict.CORRECT),  # surrounding whitespace is not the model's mistake
    ("17 plus 25 is 43.", task.Verdict.WRONG),
    ("17 plus 24 is 42.", task.Verdict.WRONG),  # the right value for another question
    ("17 minus 25 is 42.", task.Verdict.WRONG),
    ("17 plus 25 is 42", task.Verdict.MALFORMED),  # no full stop
    ("42", task.Verdict.MALFORMED),
    ("17 plus 25 is 42. 17 plus 25 is 42.", task.Verdict.MALFORMED),
    ("17 plus is 42.", task.Verdict.MALFORMED),
    ("", task.Verdict.MALFORMED),
])
def test_judge(answer: str, verdict: task.Verdict) -> None:
    assert task.judge(task.Problem(17, "plus", 25), answer) is verdict


def test_exact_match_counts_correct_answers() -> None:
    problems = [task.Problem(1, "plus", 2), task.Problem(5, "minus", 3), task.Problem(4, "plus", 4)]
    assert task.exact_match(problems, ["1 plus 2 is 3.", "5 minus 3 is 3.", "8"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        task.exact_match(problems, ["1 plus 2 is 3."])


def test_jsonl_is_read_by_the_workers(tmp_path: Path) -> None:
    problems = task.split(CONFIG, 0).train[:5]
    path = task.write_jsonl(tmp_path / "sft.jsonl", problems)
    loaded = data.load_sft(str(path))
    assert not loaded.bad
    assert [(e.prompt, e.response) for e in loaded.examples] == [(p.prompt, p.response) for p in problems]
    assert all(task.judge(p, e.response) is task.Verdict.CORRECT
               for p, e in zip(problems, loaded.examples, strict=True))
