"""The SPIN objective: summed response log-probs and the loss over them.

Two ways to the log-probs, one result: ``sequence_logps`` from a model's logits (scoring and evaluation, where
the logits are small or already there) and ``response_logps`` from the final hidden states and the LM head (the
trainer), which projects only the response tokens' positions to the vocabulary and only ``chunk_tokens`` of
them at a time, so the fp32 logits of a whole batch never exist at once: at a 128k vocabulary they would be
~0.5 GB per 1000 tokens, many GB per micro-batch.

Batch convention, used everywhere a pair batch is built: the trainer's log-probs come as (2B,), the B real
responses first, then the B generated ones, so ``[:B]`` and ``[B:]`` are the two halves of the same B pairs
(``batching.Batch`` computes both from one row per pair, the prompt once).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("sigmoid", "hinge")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the response tokens of each sequence.

    ``logits`` (B, K, V) are the model's outputs at the last K positions, aligned with ``input_ids`` and
    ``response_mask`` (B, K) cut to the same K columns (K = T gives the plain full-sequence case). Position j
    predicts token j + 1 (shift); prompt and padding tokens have mask 0 and add nothing (mask).
    Returns (B,) in float32.
    """
    logits = logits[:, :-1].float()  # (B, K-1, V)
    labels = input_ids[:, 1:]  # (B, K-1)
    mask = response_mask[:, 1:].to(logits.dtype)  # (B, K-1)
    # log_softmax gathered at the label, without materialising the (B, K-1, V) log-prob tensor.
    picked = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)  # (B, K-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)  # (B, K-1)
    return (token_logps * mask).sum(dim=-1)  # (B,)


def _token_logps(head: torch.nn.Linear, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each of n positions from their hidden states (n, H); (n,) float32. The chunk's logits are
    upcast here, alone: the (n, V) fp32 tensor lives only inside this call."""
    logits = F.linear(states, head.weight, head.bias).float()  # (n, V)
    return logits.gather(1, labels.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)  # (n,)


def response_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, outputs: int,
                   chunk_tokens: int) -> torch.Tensor:
    """Summed log-probs of response tokens from the model's final hidden states, without its whole logits.

    ``hidden`` (B, T, H) are the model's final hidden states, ``head`` its LM head, ``targets`` (N, 4) the
    response tokens as (row, col, label, out) (``batching.Batch``): the state at (row, col) predicts ``label``,
    whose log-prob adds to sum ``out`` of ``outputs``. Only those positions are projected (prompt and padding
    positions never reach the head), ``chunk_tokens`` at a time. With gradients on, each chunk is recomputed in
    backward instead of keeping its logits for it (activation checkpointing): autograd would otherwise save
    every chunk's fp32 logits, the whole tensor again. Returns (outputs,) in float32.

    The chunks are projected inside ONE call of ``head``, whatever their number: under ZeRO-3 each call of a
    module gathers its weights from every rank, collectively, so a call per chunk would have ranks with
    different token counts make different numbers of collectives, and hang. For that call the head's forward
    is this function's chunk loop (its hooks, ZeRO-3's gathering and release, run around it as around any call).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    rows, cols, labels, outs = targets.unbind(1)  # (N,) each
    score = functools.partial(_token_logps, head)

    def project(states: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N,)
        recompute = torch.is_grad_enabled() and states.requires_grad
        parts = [checkpoint(score, states[i:i + chunk_tokens], labels[i:i + chunk_tokens], use_reentrant=False)
                 if recompute else score(states[i:i + chunk_tokens], labels[i:i + chunk_tokens])
                 for i in range(0, len(labels), chunk_tokens)]
        return torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)

    head.forward = project  # type: ignore[method-assign,assignment]
    try:
        tokens = head(hidden[rows, cols])  # (N,)
    finally:
        del head.forward  # the class's forward again
    return torch.zeros(outputs, dtype=torch.float32, device=hidden.device).index_add(0, outs, tokens)  # (outputs,)


def logits_logps(logits: torch.Tensor, targets: torch.Tensor, outputs: int) -> torch.Tensor:
    """``response_logps`` from a model's own logits (B, T, V), for a model whose logits are not its head's
    output (a soft-cap in its forward); the whole logits exist here. Returns (outputs,) in float32."""
    rows, cols, labels, outs = targets.unbind(1)  # (N,) each
    picked = logits[rows, cols].float()  # (N, V)
    tokens = picked.gather(1, labels.unsqueeze(1)).squeeze(1) - picked.logsumexp(dim=-1)  # (N,)
    return torch.zeros(outputs, dtype=torch.float32, device=logits.device).index_add(0, outs, tokens)


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SPIN loss and the (detached) implicit rewards; all inputs and outputs are (B,).

    ``rewards = beta * (log p_policy - log p_ref)`` for the real and the generated response;
    ``sigmoid``: ``-logsigmoid(real_reward - generated_reward)`` (ln 2 when policy == reference);
    ``hinge``: ``relu(1 - (real_reward - generated_reward))``.
    """
    real_ratio = policy_real_logps - ref_real_logps  # (B,)
    generated_ratio = policy_generated_logps - ref_generated_logps  # (B,)
    margin = beta * (real_ratio - generated_ratio)  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}, expected one of {LOSS_TYPES}")
    return losses, (beta * real_ratio).detach(), (beta * generated_ratio).detach()
