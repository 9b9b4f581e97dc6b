"""Supervised fine-tuning for the demo: the converged SFT model SPIN starts from, and the continued-SFT arms
SPIN is compared with.

A plain single-process torch loop over (prompt, response) pairs tokenized by the workers' own functions
(``data.encode_prompt``, ``data.encode_response``), so the SFT model sees exactly the prompt and answer tokens
generation and SPIN training will feed and score; prompt tokens are masked out of the loss, the mean negative
log-likelihood of the response tokens (``loss.sequence_logps``). AdamW (weight decay 0, as the SPIN trainer's),
gradient clipping at 1 (the trainer's default), linear warmup then linear decay (the trainer's
``linear_schedule``); the data order is ``batching.epoch_order`` of the seed, so a run is a deterministic
function of its inputs.

With validation pairs, the summed response NLL on them is measured every ``eval_every`` steps and the best
checkpoint is the one saved: "converged" is that early-stopped model, and the curve is kept for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spin_k8s.demo import evaluate
from spin_k8s.workers import batching, data

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SftConfig:
    """One SFT run. Steps and batch size together fix the compute: ``steps * batch_size`` sequences."""

    steps: int
    batch_size: int  # sequences per optimizer step
    learning_rate: float  # peak, after warmup
    warmup_ratio: float = 0.1  # share of the steps warming up linearly, then linear decay to 0
    eval_every: int = 0  # steps between validation measurements (with validation pairs); 0: only at the end
    max_prompt_length: int = 32  # tokens, as the workers cut them
    max_length: int = 48  # prompt + response tokens
    seed: int = 0


@dataclass(frozen=True)
class SftResult:
    steps: int
    sequences: int  # sequences forwarded and backpropagated (steps x batch size)
    tokens: int  # non-padding tokens in those sequences
    seconds: float
    best_step: int  # the step of the saved checkpoint: the last one without validation pairs
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean validation NLL per answer)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prompt + response + end-of-turn, cut to max_length
    prompt_len: int


def encode(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_prompt_length: int,
           max_length: int) -> list[Encoded]:
    """Each (prompt, response) as training scores it: the workers' prompt tokens, then the response."""
    out = []
    for prompt, response in pairs:
        p = data.encode_prompt(tokenizer, prompt, max_prompt_length)
        out.append(Encoded(p + data.encode_response(tokenizer, prompt, response, max_length - len(p)), len(p)))
    return out


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and response mask, each (B, T)."""
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    response = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(batch):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        attention[row, :len(e.ids)] = 1
        response[row, e.prompt_len:len(e.ids)] = 1
    return ids, attention, response


def nll(model_dir: Path, pairs: Sequence[tuple[str, str]], config: SftConfig) -> list[float]:
    """Per pair, the summed response NLL (answer and end token) under the model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # in eval mode
    examples = encode(tokenizer, pairs, config.max_prompt_length, config.max_length)
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int)
    return evaluate.validation_nll(model, [collate(examples[i:i + 512], pad_id) for i in range(0, len(examples), 512)])


def train(model_dir: Path, out_dir: Path, pairs: Sequence[tuple[str, str]], config: SftConfig,
          validation: Sequence[tuple[str, str]] = (), log: Callable[[str], None] | None = None) -> SftResult:
    """Fine-tunes the model in ``model_dir`` on ``pairs`` and saves it (with its tokenizer) to ``out_dir``:
    the checkpoint with the lowest validation NLL when ``validation`` is given, else the last one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_k8s.workers.loss import sequence_logps
    from spin_k8s.workers.train import linear_schedule

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    examples = encode(tokenizer, pairs, config.max_prompt_length, config.max_length)
    pad_id = tokenizer.pad_token_id
    assert isinstance(pad_id, int), "the tokenizer needs a pad token"
    held = encode(tokenizer, validation, config.max_prompt_length, config.max_length)
    held_batches = [collate(held[i:i + 512], pad_id) for i in range(0, len(held), 512)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = int(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: linear_schedule(k, config.steps, warmup))

    curve: list[tuple[int, float]] = []
    best, best_step = float("inf"), 0

    def validate(step: int) -> None:
        nonlocal best, best_step
        model.eval()  # type: ignore[no-untyped-call]
        value = sum(evaluate.validation_nll(model, held_batches)) / len(held)
        model.train()
        curve.append((step, value))
        if log is not None:
            log(f"step {step}/{config.steps}: validation NLL {value:.4f} nats per answer")
        if value < best:
            best = value
            best_step = step
            model.save_pretrained(out_dir)

    # The data order: whole epochs of a seeded permutation, read batch_size examples at a time.
    order: list[int] = []
    epoch = 0
    if held:
        validate(0)
    began, tokens = time.monotonic(), 0
    for step in range(config.steps):
        while len(order) < config.batch_size:
            order += batching.epoch_order(len(examples), config.seed, epoch)
            epoch += 1
        chosen, order = order[:config.batch_size], order[config.batch_size:]
        ids, attention, response = collate([examples[i] for i in chosen], pad_id)  # (B, T) each
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
        # Mean NLL per response token: sum the sequences' log-probs, divide by the tokens they cover.
        loss = -sequence_logps(logits, ids, response).sum() / response[:, 1:].sum()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(attention.sum())
        done = step + 1
        if held and ((config.eval_every and done % config.eval_every == 0) or done == config.steps):
            validate(done)
    if not held:
        model.save_pretrained(out_dir)
        best_step = config.steps
    tokenizer.save_pretrained(out_dir)
    return SftResult(steps=config.steps, sequences=config.steps * config.batch_size, tokens=tokens,
                     seconds=time.monotonic() - began, best_step=best_step, curve=curve)
