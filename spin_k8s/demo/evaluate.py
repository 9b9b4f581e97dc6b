"""Held-out evaluation of a demo model: greedy answers to the held-out prompts, judged by exact match.

Answers come from the generation worker's transformers engine (``generate.TransformersEngine``) with
temperature 0, on prompt tokens from ``data.encode_prompt``: the same template and decoding code SPIN's
generation uses, only greedy, so a score never depends on a sampling seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spin_k8s.demo import task
from spin_k8s.workers import data, generate


@dataclass(frozen=True)
class Score:
    exact_match: float  # share of held-out problems answered correctly
    malformed: float  # share of answers not in the answer format
    samples: list[tuple[str, str, str]]  # a few (prompt, answer, verdict) to show in the report


def evaluate(model_dir: Path, problems: Sequence[task.Problem], max_prompt_length: int, max_tokens: int,
             batch_size: int = 128, samples: int = 3) -> Score:
    """Greedy answers of the model in ``model_dir`` to ``problems``, judged by ``task.judge``."""
    from transformers import AutoTokenizer

    settings = generate.settings_from_args(
        ["--model", str(model_dir), "--data", "-", "--output", "-", "--engine", "transformers",
         "--batch-size", str(batch_size), "--max-tokens", str(max_tokens)])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = generate.TransformersEngine(model_dir, settings, tokenizer)
    prompts = [data.encode_prompt(tokenizer, p.prompt, max_prompt_length) for p in problems]
    greedy = generate.Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    answers = [str(tokenizer.decode(ids, skip_special_tokens=True)) for ids in engine.generate(prompts, greedy)]
    verdicts = [task.judge(p, a) for p, a in zip(problems, answers, strict=True)]
    counts = Counter(verdicts)
    n = max(len(problems), 1)
    shown = zip(problems[:samples], answers[:samples], verdicts[:samples], strict=True)
    return Score(exact_match=counts[task.Verdict.CORRECT] / n, malformed=counts[task.Verdict.MALFORMED] / n,
                 samples=[(p.prompt, a, v.value) for p, a, v in shown])
