"""The demo's task: small-integer arithmetic with answers that can be checked exactly.

A prompt is ``"What is 17 plus 25?"`` and the human answer ``"17 plus 25 is 42."``. Every problem of the
task (all operand pairs of every operation) is enumerated, shuffled by the seed and cut into a training split
and a held-out split, so the two never share a prompt. The scorer parses a model's answer against the
answer's one format and compares the operands and the value with the problem's; anything that does not
parse is malformed (and wrong). The training split is written as chat-shaped JSONL, the rows the workers
read (``spin_k8s.workers.data.parse_row``).

This module imports no ML framework: the tests and the CLI use it as is.
"""

from __future__ import annotations

import enum
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OPERATIONS = ("plus", "minus")
_ANSWER_RE = re.compile(r"\s*(\d+) (plus|minus) (\d+) is (-?\d+)\.\s*")


@dataclass(frozen=True)
class Problem:
    """One arithmetic question. ``minus`` problems never go below zero (``a >= b``)."""

    a: int
    op: str  # one of OPERATIONS
    b: int

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "plus" else self.a - self.b

    @property
    def prompt(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def response(self) -> str:
        """The human answer: the question restated, then the value."""
        return f"{self.a} {self.op} {self.b} is {self.value}."

    def row(self) -> dict[str, list[dict[str, str]]]:
        """The problem as one chat-shaped SFT row."""
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.response}]}


@dataclass(frozen=True)
class TaskConfig:
    """Which problems exist and how many of them each split gets."""

    max_operand: int = 29  # operands are 0..max_operand
    operations: tuple[str, ...] = OPERATIONS
    train_size: int = 512  # problems in the training split (the SFT and SPIN data)
    heldout_size: int = 256  # problems in the held-out split (evaluation only)


@dataclass(frozen=True)
class Split:
    train: list[Problem]
    heldout: list[Problem]


def all_problems(config: TaskConfig) -> list[Problem]:
    """Every problem of the task, in a fixed order."""
    out = []
    for op in config.operations:
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}, expected one of {OPERATIONS}")
        for a in range(config.max_operand + 1):
            for b in range(config.max_operand + 1):
                if op == "plus" or a >= b:
                    out.append(Problem(a, op, b))
    return out


def split(config: TaskConfig, seed: int) -> Split:
    """The training and held-out problems of ``seed``: disjoint (no prompt in both), a function of the seed."""
    problems = all_problems(config)
    if config.train_size + config.heldout_size > len(problems):
        raise ValueError(f"the task has {len(problems)} problems, fewer than {config.train_size} training + "
                         f"{config.heldout_size} held-out")
    random.Random(f"demo-split:{seed}").shuffle(problems)
    return Split(train=problems[:config.train_size],
                 heldout=problems[config.train_size:config.train_size + config.heldout_size])


class Verdict(enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"  # the answer's format, but other operands or another value
    MALFORMED = "malformed"  # not in the answer's format


def judge(problem: Problem, answer: str) -> Verdict:
    """Exact match: the answer must restate the question's operands and give its value, in the one format."""
    match = _ANSWER_RE.fullmatch(answer)
    if match is None:
        return Verdict.MALFORMED
    a, op, b, value = int(match[1]), match[2], int(match[3]), int(match[4])
    return Verdict.CORRECT if (a, op, b, value) == (problem.a, problem.op, problem.b, problem.value) else Verdict.WRONG


def exact_match(problems: Sequence[Problem], answers: Sequence[str]) -> float:
    """Share of ``answers`` judged correct for their problems (0 for no problems)."""
    if len(problems) != len(answers):
        raise ValueError(f"{len(problems)} problems but {len(answers)} answers")
    correct = sum(judge(p, a) is Verdict.CORRECT for p, a in zip(problems, answers, strict=True))
    return correct / len(problems) if problems else 0.0


def write_jsonl(path: Path, problems: Sequence[Problem]) -> Path:
    """The problems as chat-shaped JSONL (one ``{"messages": [user, assistant]}`` row per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in problems))
    return path


def corpus(problems: Sequence[Problem]) -> list[str]:
    """The texts a tokenizer is trained on: every prompt and answer of ``problems``."""
    return [text for p in problems for text in (p.prompt, p.response)]
