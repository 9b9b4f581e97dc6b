"""The SPIN loss against hand-computed values, and the log-prob helper against a naive per-token loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spin_k8s.workers import batching, tiny, train
from spin_k8s.workers.loss import sequence_logps, spin_loss


def test_loss_is_ln2_for_every_pair_when_policy_equals_reference() -> None:
    logps = torch.randn(2, 16, dtype=torch.float64) * 30  # (2, B): real, generated
    for loss_type, expected in (("sigmoid", math.log(2)), ("hinge", 1.0)):
        losses, real, generated = spin_loss(logps[0], logps[1], logps[0].clone(), logps[1].clone(), 0.1, loss_type)
        assert losses.shape == (16,)
        assert torch.allclose(losses, torch.full((16,), expected, dtype=torch.float64))
        assert torch.equal(real, torch.zeros(16, dtype=torch.float64))
        assert torch.equal(generated, torch.zeros(16, dtype=torch.float64))


def test_loss_and_rewards_match_hand_computed_values() -> None:
    policy_real = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_generated = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref_real = torch.tensor([-2.0, -2.0])
    ref_generated = torch.tensor([-2.0, -2.0])
    # log-ratios: real (1, 0), generated (-1, 1); beta 0.5 -> margins (1.0, -0.5)
    losses, real, generated = spin_loss(policy_real, policy_generated, ref_real, ref_generated, 0.5)
    # -logsigmoid(1) = log(1 + e^-1); -logsigmoid(-0.5) = log(1 + e^0.5)
    assert losses.tolist() == pytest.approx([0.31326168751822286, 0.9740769841801067], abs=1e-7)
    assert real.tolist() == [0.5, 0.0]
    assert generated.tolist() == [-0.5, 0.5]
    assert not real.requires_grad and not generated.requires_grad
    losses.sum().backward()
    # d/dm -logsigmoid(m) = -sigmoid(-m); dm/d policy_real = beta
    assert policy_real.grad is not None
    assert policy_real.grad.tolist() == pytest.approx([-0.5 / (1 + math.e), -0.5 / (1 + math.exp(-0.5))])

    hinge, _, _ = spin_loss(policy_real, policy_generated, ref_real, ref_generated, 0.5, "hinge")
    assert hinge.tolist() == [0.0, 1.5]  # relu(1 - 1), relu(1 + 0.5)

    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(policy_real, policy_generated, ref_real, ref_generated, 0.5, "ipo")


def naive_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[ids[b, t]].item()
        out.append(total)
    return out


def test_sequence_logps_matches_a_naive_loop_and_ignores_prompt_and_padding() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 7))
    logits = torch.randn(3, 7, 11) * 3
    mask = torch.zeros(3, 7, dtype=torch.long)
    mask[0, 2:7] = 1  # prompt 2, no padding
    mask[1, 4:5] = 1  # prompt 4, one response token, two padding
    mask[2, 2:4] = 1  # prompt 2, padding from 4
    got = sequence_logps(logits, ids, mask)
    assert got.tolist() == pytest.approx(naive_logps(logits, ids, mask), abs=1e-5)

    # Changing prompt or padding tokens' logits and ids changes nothing; a response token's id does.
    poked_logits, poked_ids = logits.clone(), ids.clone()
    poked_logits[1, 5:] += 5.0
    poked_ids[1, 5:] = 0
    poked_ids[0, 0] = (ids[0, 0] + 1) % 11
    assert torch.allclose(sequence_logps(poked_logits, poked_ids, mask), got)
    poked_ids[0, 3] = (ids[0, 3] + 1) % 11
    assert not torch.allclose(sequence_logps(logits, poked_ids, mask), got)

    # The last K = T - (shortest prompt) + 1 positions hold every prediction of a response token.
    k = 7 - 2 + 1
    assert torch.allclose(sequence_logps(logits[:, -k:], ids[:, -k:], mask[:, -k:]), got)


def test_batch_logps_with_a_real_model_matches_full_logits(tmp_path: Path) -> None:
    """The trainer keeps only the logits it scores (``logits_to_keep``): same numbers as the full forward."""
    texts = ["hello world", "a b c d e f", "numbers 1 2 3 4"]
    model_dir = tiny.build_model(tmp_path / "m", texts, tiny.TinyConfig(hidden_size=64, num_heads=1,
                                                                       num_kv_heads=1), seed=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs = [batching.Pair(real=[5, 6, 7, 8, 9, 10], generated=[5, 6, 7, 11], prompt_len=3),
             batching.Pair(real=[12, 13, 14, 15, 16], generated=[12, 13, 14, 15, 17, 18, 19, 20], prompt_len=4)]
    batch = batching.collate(pairs, pad_id=0)
    assert batch.keep == batch.input_ids.shape[1] - 3 + 1
    with torch.no_grad():
        got = train.batch_logps(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert got.shape == (4,)
    assert got.tolist() == pytest.approx(naive_logps(full, batch.input_ids, batch.response_mask), abs=1e-4)
