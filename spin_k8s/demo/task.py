"""The demo's task: a seeded data distribution p_data(y|x) that is known exactly, so every model's distance to
it can be computed, not estimated.

A prompt asks for ``k`` different items of a category, sometimes excluding one of them:
``"Name 3 different fruits , but not fig ."``. The human answer is ``k`` distinct allowed items drawn without
replacement, each draw in proportion to the items' Zipf weights (``"plum apple kiwi"``), so

    p_data(y|x) = prod_j w(y_j) / (W_allowed - sum_{i<j} w(y_i))

for every ordered answer y, and each prompt has ``P(n, k)`` valid answers (7 to 336 here). A model has to
learn the count, distinctness, the exclusion, the category and the weights. Which item of a category gets
which weight is drawn from the seed, so seeds differ in their distribution, not only in their samples.

Everything is words separated by spaces (the demo's tokenizer is word-level: one tokenization per string, so
a sequence of words has exactly one token sequence and enumerated probabilities are exact). An answer that
is not valid is invalid by the *first* constraint its words break, read left to right (``Violation``).

This module imports no ML framework: the tests and the CLI use it as is.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Six categories of eight one-word items; no word is in two categories or in the prompt template.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "peach"),
    "animals": ("cat", "dog", "fox", "owl", "bear", "wolf", "deer", "hare"),
    "colors": ("red", "blue", "green", "gold", "pink", "gray", "teal", "white"),
    "tools": ("saw", "drill", "hammer", "wrench", "chisel", "rasp", "plane", "clamp"),
    "metals": ("iron", "copper", "tin", "zinc", "lead", "silver", "nickel", "cobalt"),
    "instruments": ("drum", "flute", "harp", "lute", "oboe", "horn", "bell", "tuba"),
}


@dataclass(frozen=True)
class TaskConfig:
    """Which prompts exist and how the answers are drawn."""

    categories: int = 6  # the first this many of CATEGORIES
    counts: tuple[int, ...] = (1, 2, 3)  # the k a prompt may ask for
    zipf: float = 1.0  # item weight of rank r (1-based) is r ** -zipf


@dataclass(frozen=True)
class Prompt:
    category: str
    k: int
    exclude: str | None  # the item the answer must not contain

    @property
    def text(self) -> str:
        but = f" , but not {self.exclude}" if self.exclude else ""
        return f"Name {self.k} different {self.category}{but} ."


class Violation(enum.Enum):
    """Why an answer is invalid: the first constraint broken, reading the answer's words left to right."""

    FORMAT = "format"  # a word that is no item at all, or no answer words
    CATEGORY = "category"  # an item of another category
    EXCLUSION = "exclusion"  # the excluded item
    REPEAT = "repeat"  # an item named twice
    COUNT = "count"  # fewer or more than k items


VIOLATIONS = tuple(Violation)


@dataclass(frozen=True)
class Task:
    """The seed's distribution: per category its items with their weights, and every prompt."""

    config: TaskConfig
    weights: dict[str, dict[str, float]]  # category -> item -> Zipf weight (unnormalised)
    prompts: tuple[Prompt, ...]

    def allowed(self, prompt: Prompt) -> list[str]:
        return [item for item in self.weights[prompt.category] if item != prompt.exclude]

    def item_category(self, word: str) -> str | None:
        return next((c for c, items in self.weights.items() if word in items), None)

    def probability(self, prompt: Prompt, answer: Sequence[str]) -> float:
        """p_data(answer | prompt): 0 for an invalid answer."""
        if self.violation(prompt, answer) is not None:
            return 0.0
        w = self.weights[prompt.category]
        left = sum(w[item] for item in self.allowed(prompt))
        p = 1.0
        for item in answer:
            p *= w[item] / left
            left -= w[item]
        return p

    def answers(self, prompt: Prompt) -> Iterator[tuple[tuple[str, ...], float]]:
        """Every valid answer with its p_data, in a fixed order; the probabilities sum to 1."""
        for answer in itertools.permutations(self.allowed(prompt), prompt.k):
            yield answer, self.probability(prompt, answer)

    def violation(self, prompt: Prompt, answer: Sequence[str]) -> Violation | None:
        """None for a valid answer, else the first constraint broken (``Violation``)."""
        seen: set[str] = set()
        for word in answer:
            category = self.item_category(word)
            if category is None:
                return Violation.FORMAT
            if category != prompt.category:
                return Violation.CATEGORY
            if word == prompt.exclude:
                return Violation.EXCLUSION
            if word in seen:
                return Violation.REPEAT
            seen.add(word)
            if len(seen) > prompt.k:
                return Violation.COUNT
        if not answer:
            return Violation.FORMAT
        return Violation.COUNT if len(seen) != prompt.k else None

    def sample(self, prompt: Prompt, rng: random.Random) -> tuple[str, ...]:
        """One human answer: k draws without replacement, each in proportion to the remaining weights."""
        w = self.weights[prompt.category]
        left = self.allowed(prompt)
        out = []
        for _ in range(prompt.k):
            item = rng.choices(left, weights=[w[i] for i in left])[0]
            out.append(item)
            left.remove(item)
        return tuple(out)

    def words(self) -> list[str]:
        """Every word a prompt or an answer of the task uses (the tokenizer's vocabulary)."""
        seen: dict[str, None] = {}
        for p in self.prompts:
            seen.update(dict.fromkeys(p.text.split()))
        for items in self.weights.values():
            seen.update(dict.fromkeys(items))
        return list(seen)


def build(config: TaskConfig, seed: int) -> Task:
    """The seed's task: which item of each category gets which Zipf rank is drawn from the seed."""
    if not 1 <= config.categories <= len(CATEGORIES):
        raise ValueError(f"categories: 1..{len(CATEGORIES)}, got {config.categories}")
    if not config.counts or min(config.counts) < 1 or max(config.counts) > 7:
        raise ValueError(f"counts: each 1..7 (an excluded item leaves 7), got {config.counts}")
    rng = random.Random(f"demo-task:{seed}")
    weights = {}
    for category in list(CATEGORIES)[:config.categories]:
        items = list(CATEGORIES[category])
        rng.shuffle(items)
        weights[category] = {item: (rank + 1) ** -config.zipf for rank, item in enumerate(items)}
    prompts = tuple(Prompt(c, k, exclude) for c in weights for k in config.counts
                    for exclude in (None, *CATEGORIES[c]))
    return Task(config, weights, prompts)


@dataclass(frozen=True)
class Pair:
    prompt: Prompt
    answer: tuple[str, ...]

    @property
    def response(self) -> str:
        return " ".join(self.answer)

    def row(self) -> dict[str, list[dict[str, str]]]:
        """The pair as one chat-shaped SFT row, the shape the workers read."""
        return {"messages": [{"role": "user", "content": self.prompt.text},
                             {"role": "assistant", "content": self.response}]}


def draw(task: Task, n: int, stream: str, seed: int) -> list[Pair]:
    """``n`` pairs of p_data: prompts uniform over the task's, answers from p_data. ``stream`` names an
    independent sample ("train", "validation", "heldout"), so the sets never depend on each other's size."""
    rng = random.Random(f"demo-pairs:{seed}:{stream}")
    return [Pair(p, task.sample(p, rng)) for p in (rng.choice(task.prompts) for _ in range(n))]


def entropy(task: Task) -> float:
    """H(p_data(y|x)) in nats, averaged over the prompts: the lowest expected NLL any model can reach."""
    return sum(-sum(p * math.log(p) for _, p in task.answers(prompt)) for prompt in task.prompts) / len(task.prompts)


def write_jsonl(path: Path, pairs: Sequence[Pair]) -> Path:
    """The pairs as chat-shaped JSONL (one ``{"messages": [user, assistant]}`` row per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in pairs))
    return path
