"""The SPIN objective: summed response log-probs and the loss over them.

Batch convention, used everywhere a pair batch is built: real and generated sequences go through the policy
in ONE concatenated forward, the B real sequences first, then the B generated ones, so rows ``[:B]`` and
``[B:]`` of every (2B, ...) tensor are the two halves of the same B pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
