"""Pairs to tensors for the training worker: tokenized pairs, the data order, length-grouped micro-batches
and their collation (real first, then generated; see ``loss``).

The order is a pure function of (pair lengths, global batch, seed, epoch), so every rank, and a run
resumed after a crash, sees the same pairs at the same step. Padding is kept small twice: global batches are
formed from pairs of similar lengths (``epoch_batches`` with a window), and within a global batch the pairs
are sorted by length before they are dealt into micro-batches, each padded only to its own longest sequence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Global batches formed together from pairs of similar length when length grouping is on: enough to cut most
# padding, few enough that a run of long batches stays short.
GROUP_WINDOW = 8


@dataclass(frozen=True)
class Pair:
    """One tokenized training pair. Both sequences start with the same ``prompt_len`` prompt tokens;
    ``ref_real``/``ref_generated`` are the reference model's summed response log-probs when known."""

    real: list[int]
    generated: list[int]
    prompt_len: int
    ref_real: float | None = None
    ref_generated: float | None = None

    @property
    def length(self) -> int:
        return max(len(self.real), len(self.generated))


@dataclass(frozen=True)
class Batch:
    """A collated micro-batch of B pairs as 2B sequences, real rows first."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T), 1 on real tokens, 0 on padding
    response_mask: torch.Tensor  # (2B, T), 1 on response tokens only
    ref_logps: torch.Tensor | None  # (2B,) when every pair carries reference log-probs

    def to(self, device: torch.device) -> Batch:
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), ref)


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_pairs))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, window: int) -> list[list[int]]:
    """The global batches (pair indices) of one epoch: a fresh permutation cut into batches; the last
    incomplete batch is dropped, so every step has exactly ``batch_size`` pairs.

    With ``window`` > 1, each run of ``window`` batches is re-cut after sorting its pairs by length, so that
    a batch holds pairs of similar lengths and pads little; the batches are then shuffled, so long and short
    ones alternate at random (Hugging Face's ``group_by_length`` does the same).
    """
    count = len(lengths) // batch_size
    if count == 0:
        raise ValueError(f"{len(lengths)} pairs cannot fill one global batch of {batch_size}")
    order = epoch_order(len(lengths), seed, epoch)[:count * batch_size]
    if window <= 1:
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    batches = []
    for start in range(0, len(order), window * batch_size):
        group = sorted(order[start:start + window * batch_size], key=lambda i: (-lengths[i], i))
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return batches


def micro_batches(indices: Sequence[int], lengths: Sequence[int], micro_batch_size: int, world_size: int,
                  rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: pairs sorted by length (longest first, ties by index)
    and cut into micro-batches, which are dealt to the ranks in turn so that every rank gets a similar
    amount of work."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    chunks = [ordered[k:k + micro_batch_size] for k in range(0, len(ordered), micro_batch_size)]
    return chunks[rank::world_size]


def collate(pairs: Sequence[Pair], pad_id: int) -> Batch:
    """Right-padded (2B, T) tensors for B pairs, the B real sequences first, then the B generated ones."""
    sequences = [p.real for p in pairs] + [p.generated for p in pairs]
    prompt_lens = [p.prompt_len for p in pairs] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    for row, (seq, plen) in enumerate(zip(sequences, prompt_lens, strict=True)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention_mask[row, :len(seq)] = 1
        response_mask[row, plen:len(seq)] = 1
    refs = [p.ref_real for p in pairs] + [p.ref_generated for p in pairs]
    ref_logps = None
    if all(r is not None for r in refs):
        ref_logps = torch.tensor(refs, dtype=torch.float32)  # (2B,)
    return Batch(input_ids, attention_mask, response_mask, ref_logps)
