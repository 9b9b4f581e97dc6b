"""Exact distributional metrics of a demo model against the task's p_data, and the paper's quantities on fresh
held-out pairs.

Exact, by enumeration (``Enumeration``, ``exact``): for every prompt of the task, every valid answer is one
token sequence (word-level tokenizer), so one forward of ``prompt + answer + <|end|>`` per valid answer gives
the model's probability of each of them, and the next-token distribution after each valid prefix. From these:

- ``invalid`` = 1 - the mass on valid answers, split by the first constraint broken (``task.Violation``): each
  valid prefix passes its mass on to the next token, and a next token that breaks a constraint ends the answer
  as invalid with that mass. The parts and the valid mass sum to 1 (up to float rounding), with no sampling;
- ``tv``: total-variation distance to p_data, ``1/2 (sum_valid |p_data - p| + invalid)``: the referee;
- ``kl``: forward KL(p_data || p), and ``nll`` = H(p_data) + KL: the expected NLL of a fresh human answer
  (coverage: a model that trades diversity for validity pays here);
- ``copy``: the model's mass on answers that are in the training set for that prompt, next to ``copy_data``,
  the same for p_data (what a perfect model would have): above it, the model memorises.

Every metric is a mean over the task's prompts (each equally likely) and is computed at several sampling
temperatures at once (the same forward, logits divided by T), so "SFT sampled at T" costs no training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_k8s.demo import task
from spin_k8s.workers import data

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

# Token classes after a prefix (the invalid ones are task.Violation's values).
VALID, END = "valid", "end"
CLASSES = (VALID, END, *(v.value for v in task.VIOLATIONS))


@dataclass(frozen=True)
class PromptTable:
    """One prompt's valid answers as token ids and the class of every vocabulary token after a prefix."""

    prompt: task.Prompt
    prompt_ids: list[int]
    answers: list[list[int]]  # every valid answer's token ids (k each), in task.answers order
    p_data: list[float]
    token_class: list[str]  # per vocabulary id: VALID (an allowed item), END, or a Violation value
    copied: list[bool]  # per answer: in the training set for this prompt


@dataclass(frozen=True)
class Enumeration:
    tables: list[PromptTable]
    entropy: float  # mean H(p_data(y|x)) over the prompts, nats


def enumerate_task(t: task.Task, tokenizer: PreTrainedTokenizerBase, train: Sequence[task.Pair],
                   max_prompt_length: int) -> Enumeration:
    """Every prompt's valid answers as token ids, with p_data and whether the training set holds them."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    end = tokenizer.eos_token_id
    assert isinstance(end, int)
    seen = {(p.prompt, p.answer) for p in train}
    tables = []
    for prompt in t.prompts:
        answers = list(t.answers(prompt))
        classes = [task.Violation.FORMAT.value] * len(vocab)
        for word, i in vocab.items():
            category = t.item_category(word)
            if category is not None:
                classes[i] = (task.Violation.CATEGORY.value if category != prompt.category
                              else task.Violation.EXCLUSION.value if word == prompt.exclude else VALID)
        classes[end] = END
        tables.append(PromptTable(
            prompt, data.encode_prompt(tokenizer, prompt.text, max_prompt_length),
            [[vocab[w] for w in a] for a, _ in answers], [p for _, p in answers], classes,
            [(prompt, a) in seen for a, _ in answers]))
    return Enumeration(tables, task.entropy(t))


def _answer_logits(model: Any, table: PromptTable, end: int, batch_size: int) -> torch.Tensor:
    """Logits of the k + 1 positions predicting each valid answer's tokens and its end: (N, k + 1, V)."""
    import torch

    k, plen = table.prompt.k, len(table.prompt_ids)
    rows = torch.tensor([table.prompt_ids + a + [end] for a in table.answers])  # (N, plen + k + 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            logits = model(input_ids=rows[start:start + batch_size], use_cache=False).logits  # (B, T, V)
            out.append(logits[:, plen - 1:plen + k].float())  # (B, k + 1, V)
    return torch.cat(out)


def prompt_metrics(table: PromptTable, logits: torch.Tensor, temperature: float) -> dict[str, float]:
    """The exact metrics of one prompt (see the module docstring) from ``_answer_logits`` at ``temperature``."""
    import torch

    k = table.prompt.k
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # (N, k + 1, V)
    answers = torch.tensor(table.answers, dtype=torch.long)  # (N, k)
    end = table.token_class.index(END)
    picked = torch.gather(logp[:, :k], 2, answers.unsqueeze(-1)).squeeze(-1)  # (N, k)
    prefix_logp = torch.cat([torch.zeros(len(answers), 1, dtype=logp.dtype), picked.cumsum(1)], 1)  # (N, k + 1)
    answer_logp = prefix_logp[:, k] + logp[:, k, end]  # (N,)
    classes = {c: torch.tensor([tc == c for tc in table.token_class], dtype=logp.dtype) for c in CLASSES}
    invalid = dict.fromkeys((v.value for v in task.VIOLATIONS), 0.0)
    for j in range(k + 1):
        # Each valid prefix of j items once: the first answer that starts with it.
        first: dict[tuple[int, ...], int] = {}
        for n, a in enumerate(table.answers):
            first.setdefault(tuple(a[:j]), n)
        rows = torch.tensor(list(first.values()))
        mass = prefix_logp[rows, j].exp()  # (U,)
        q = logp[rows, j].exp() * mass.unsqueeze(1)  # (U, V): the mass each next token takes
        repeated = torch.zeros_like(q)  # (U, V): an item already in the prefix
        for u, prefix in enumerate(first):
            repeated[u, list(prefix)] = 1.0
        fresh = classes[VALID] * (1 - repeated)  # (U, V)
        invalid[task.Violation.REPEAT.value] += float((q * repeated).sum())
        invalid[task.Violation.FORMAT.value] += float((q * classes[task.Violation.FORMAT.value]).sum())
        invalid[task.Violation.CATEGORY.value] += float((q * classes[task.Violation.CATEGORY.value]).sum())
        invalid[task.Violation.EXCLUSION.value] += float((q * classes[task.Violation.EXCLUSION.value]).sum())
        if j < k:  # ending early: no answer words at all is format, too few items is count
            key = task.Violation.FORMAT.value if j == 0 else task.Violation.COUNT.value
            invalid[key] += float((q * classes[END]).sum())
        else:  # a (k+1)-th allowed item
            invalid[task.Violation.COUNT.value] += float((q * fresh).sum())
    p_data = torch.tensor(table.p_data, dtype=logp.dtype)  # (N,)
    p_model = answer_logp.exp()  # (N,)
    total_invalid = sum(invalid.values())
    copied = torch.tensor(table.copied, dtype=logp.dtype)  # (N,)
    return {
        "tv": 0.5 * (float((p_data - p_model).abs().sum()) + total_invalid),
        "kl": float((p_data * (p_data.log() - answer_logp)).sum()),
        "nll": float(-(p_data * answer_logp).sum()),
        "valid": float(p_model.sum()),
        "invalid": total_invalid,
        **{f"invalid/{name}": value for name, value in invalid.items()},
        "copy": float((p_model * copied).sum()),
        "copy_data": float((p_data * copied).sum()),
    }


def exact(model_dir: Path, enumeration: Enumeration, temperatures: Sequence[float],
          batch_size: int = 512) -> dict[float, dict[str, float]]:
    """Per temperature, the exact metrics of the model in ``model_dir``, each the mean over the task's prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end = tokenizer.eos_token_id
    assert isinstance(end, int)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # in eval mode
    sums: dict[float, dict[str, float]] = {t: {} for t in temperatures}
    for table in enumeration.tables:
        logits = _answer_logits(model, table, end, batch_size)
        for t in temperatures:
            for key, value in prompt_metrics(table, logits, t).items():
                sums[t][key] = sums[t].get(key, 0.0) + value
    n = len(enumeration.tables)
    return {t: {key: value / n for key, value in s.items()} for t, s in sums.items()}


def paper_metrics(policy_dir: Path, reference_dir: Path, pairs: Sequence[task.Pair], beta: float, seed: int,
                  max_prompt_length: int, max_length: int, max_tokens: int) -> dict[str, float]:
    """The paper's quantities on fresh held-out pairs: the human answer against a sample of the reference model
    (temperature 1, as SPIN's opponent samples), scored by policy and reference with the generation worker's
    engine and the trainer's loss. Reward accuracy falls toward 0.5 as the policy stops telling them apart."""
    import torch
    from transformers import AutoTokenizer

    from spin_k8s.workers import generate
    from spin_k8s.workers.loss import spin_loss

    def engine(model_dir: Path) -> generate.TransformersEngine:
        settings = generate.settings_from_args(
            ["--model", str(model_dir), "--data", "-", "--output", "-", "--engine", "transformers",
             "--batch-size", "256", "--max-tokens", str(max_tokens)])
        return generate.TransformersEngine(model_dir, settings, tokenizer)

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    reference, policy = engine(reference_dir), engine(policy_dir)
    prompts = [data.encode_prompt(tokenizer, p.prompt.text, max_prompt_length) for p in pairs]
    sampled = reference.generate(prompts, generate.Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                                            seed=seed))
    real = [data.encode_response(tokenizer, p.prompt.text, p.response, max_length - len(ids))
            for p, ids in zip(pairs, prompts, strict=True)]
    fake = [data.encode_response(tokenizer, p.prompt.text, s.ids, max_length - len(ids), ended=not s.length_stopped)
            for p, ids, s in zip(pairs, prompts, sampled, strict=True)]
    sequences = [ids + r for ids, r in zip(prompts * 2, real + fake, strict=True)]
    lens = [len(ids) for ids in prompts * 2]
    ref = torch.tensor(reference.score(sequences, lens))  # (2N,) real first
    pol = torch.tensor(policy.score(sequences, lens))  # (2N,)
    n = len(pairs)
    losses, real_rewards, generated_rewards = spin_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)
    return {"loss": losses.mean().item(), "rewards/real": real_rewards.mean().item(),
            "rewards/generated": generated_rewards.mean().item(),
            "rewards/margins": (real_rewards - generated_rewards).mean().item(),
            "rewards/accuracies": (real_rewards > generated_rewards).double().mean().item(),
            "identical": sum(a == b for a, b in zip(real, fake, strict=True)) / n}


def validation_nll(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[float]:
    """Per sequence, the summed NLL of its response tokens (answer and end) under ``model``, in nats."""
    import torch

    from spin_k8s.workers.loss import sequence_logps

    out: list[float] = []
    with torch.no_grad():
        for ids, attention, response in batches:
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
            out.extend((-sequence_logps(logits, ids, response)).tolist())
    return out


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)
