"""The SPIN loss against hand-computed values, the log-prob helper against a naive per-token loop, and the
trainer's chunked log-probs against the full logits: the same values and gradients, without the whole
(sequences, positions, vocabulary) fp32 tensor ever existing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def separate(pairs: list[batching.Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain layout the trainer's shared-prompt rows must agree with: 2B right-padded sequences, the B real
    ones first, as (input_ids, attention_mask, response_mask), each (2B, T)."""
    sequences = [p.real for p in pairs] + [p.generated for p in pairs]
    prompt_lens = [p.prompt_len for p in pairs] * 2
    ids = torch.zeros((len(sequences), max(map(len, sequences))), dtype=torch.long)
    attention, response = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (seq, plen) in enumerate(zip(sequences, prompt_lens, strict=True)):
        ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        response[row, plen:len(seq)] = 1
    return ids, attention, response


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
    """The trainer runs a pair as one row (its prompt once) and projects only the response positions, a few at a
    time: the same numbers as the full forward of the real and the generated sequence apart."""
    texts = ["hello world", "a b c d e f", "numbers 1 2 3 4"]
    model_dir = tiny.build_model(tmp_path / "m", texts, tiny.TinyConfig(hidden_size=64, num_heads=1,
                                                                       num_kv_heads=1), seed=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pairs = [batching.Pair(real=[5, 6, 7, 8, 9, 10], generated=[5, 6, 7, 11], prompt_len=3),
             batching.Pair(real=[12, 13, 14, 15, 16], generated=[12, 13, 14, 15, 17, 18, 19, 20], prompt_len=4)]
    batch = batching.collate(pairs, pad_id=0)
    ids, attention, response = separate(pairs)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention).logits
        for chunk in (0, 1, 3, train.LOGITS_CHUNK_TOKENS):
            got = train.batch_logps(model, batch, chunk)
            assert got.shape == (4,)
            assert got.tolist() == pytest.approx(naive_logps(full, ids, response), abs=1e-4)


class VocabTensors(TorchDispatchMode):
    """Watches float32 tensors whose last dimension is the vocabulary (logits, their upcast copy, log-softmax
    temporaries, their gradients): the largest any op makes, in forward or backward (``largest``), and the
    elements of those autograd keeps for backward (``saved``, each storage once), which live together until
    then. Enter ``saving()`` around the forward too."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.largest = 0
        self._saved: dict[int, int] = {}  # storage address -> elements

    @property
    def saved(self) -> int:
        return sum(self._saved.values())

    def _is_vocab(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] == self.vocab and t.dtype == torch.float32

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.largest = max([self.largest, *(t.numel() for t in pytree.tree_leaves(out) if self._is_vocab(t))])
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._is_vocab(t):
            self._saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    def saving(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny fp32 Llama whose hidden size (16) is far below its vocabulary and a batch's token count: a logits
    tensor is then the largest thing a forward makes, and the head's (V, H) weight stays small beside it."""
    from transformers import AutoModelForCausalLM

    texts = ["hello world, how are you", "a b c d e f g h", "numbers 1 2 3 4 5 6 7 8 9", "the cat sat on the mat"]
    model_dir = tiny.build_model(tmp_path_factory.mktemp("narrow"), texts,
                                 tiny.TinyConfig(hidden_size=16, intermediate_size=32, num_heads=1, num_kv_heads=1),
                                 seed=3)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def long_pairs(vocab: int) -> list[batching.Pair]:
    """4 pairs (8 sequences) of 20-30 tokens with prompts of 5-9: about 130 response tokens, padding included."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for k in range(4):
        prompt = torch.randint(5, vocab, (5 + k,), generator=g).tolist()
        real = torch.randint(5, vocab, (15 + 3 * k,), generator=g).tolist()
        generated = torch.randint(5, vocab, (21 - 2 * k,), generator=g).tolist()
        pairs.append(batching.Pair(real=prompt + real, generated=prompt + generated, prompt_len=len(prompt)))
    return pairs


def logps_and_grads(model: Any, pairs: list[batching.Pair],
                    chunk: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], VocabTensors]:
    """(2B,) log-probs, the gradients of a weighted sum of them, and what the vocabulary-sized fp32 tensors came
    to: the trainer's chunked path (``chunk`` positions at a time, on its one-row-per-pair batch) or, with None,
    the full logits of the 2B sequences apart."""
    model.zero_grad()
    weights = torch.linspace(-2.0, 3.0, 2 * len(pairs))  # (2B,) every sequence's gradient counts, differently
    probe = VocabTensors(model.config.vocab_size)
    with probe:
        with probe.saving():
            if chunk is None:
                ids, attention, response = separate(pairs)
                logits = model(input_ids=ids, attention_mask=attention).logits  # (2B, T, V)
                logps = sequence_logps(logits, ids, response)
            else:
                logps = train.batch_logps(model, batching.collate(pairs, pad_id=0), chunk)
        (logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads, probe


def test_chunked_logps_equal_the_full_logits_with_the_same_gradients(narrow_model: Any) -> None:
    pairs = long_pairs(narrow_model.config.vocab_size)
    full, full_grads, _ = logps_and_grads(narrow_model, pairs, None)
    for chunk in (1, 7, 64, 10_000):
        logps, grads, _ = logps_and_grads(narrow_model, pairs, chunk)
        # Sums of ~25 terms near -5 each, added in another order: a few fp32 ulps of the sum apart.
        torch.testing.assert_close(logps, full, rtol=1e-6, atol=1e-6)
        assert grads.keys() == full_grads.keys() and len(grads) == len(list(narrow_model.parameters()))
        for name, grad in grads.items():
            # summed over ~130 tokens in another order (and per chunk): fp32 rounding
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_logps_never_hold_the_batch_logits(narrow_model: Any) -> None:
    """The full path makes (2B, T, V) fp32 tensors and keeps them for backward; the chunked one makes nothing
    above a chunk's rows, the model's own one-position head output (2B, 1, V) or the head's weight (H rows), in
    forward and in backward, and keeps none for backward: each chunk's logits are recomputed there."""
    pairs = long_pairs(narrow_model.config.vocab_size)
    ids, _, response = separate(pairs)
    rows, width = ids.shape
    vocab, hidden = narrow_model.config.vocab_size, narrow_model.config.hidden_size
    responses = int(response[:, 1:].sum())
    assert responses > 100 and rows * width > 10 * hidden  # the batch's logits dwarf everything else
    *_, full = logps_and_grads(narrow_model, pairs, None)
    # the probe sees the whole tensor where it exists
    assert full.largest >= rows * (width - 1) * vocab and full.saved >= rows * (width - 1) * vocab
    for chunk in (4, 12):
        *_, chunked = logps_and_grads(narrow_model, pairs, chunk)
        assert chunked.largest <= max(chunk, rows, hidden) * vocab < full.largest / 10
        assert chunked.saved <= hidden * vocab  # the head's weight, transposed (H, V), saved by its one position


def test_a_model_whose_logits_are_not_its_heads_output_is_scored_from_its_whole_logits(narrow_model: Any) -> None:
    """Gemma 2 soft-caps its logits in its forward, after the LM head: the chunked path, which applies the head
    alone, would be wrong there; the trainer's check tells the two kinds apart, and 0 chunk tokens score from the
    model's own logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=narrow_model.config.vocab_size, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=0.5)
    gemma = Gemma2ForCausalLM(config).eval()
    gemma.lm_head.weight.data *= 100  # logits of ~10, which the cap at 0.5 squashes: the two paths far apart
    pairs = long_pairs(config.vocab_size)
    batch = batching.collate(pairs, pad_id=0)
    ids, attention, response = separate(pairs)
    with torch.no_grad():
        assert train.head_gives_the_logits(narrow_model, batch)
        assert not train.head_gives_the_logits(gemma, batch)
        full = gemma(input_ids=ids, attention_mask=attention).logits  # (2B, T, V)
        expected = torch.tensor(naive_logps(full, ids, response), dtype=torch.float64)
        torch.testing.assert_close(train.batch_logps(gemma, batch, 0).double(), expected, rtol=1e-6, atol=1e-5)
        assert (train.batch_logps(gemma, batch, 4).double() - expected).abs().max() > 1.0  # what the check prevents
