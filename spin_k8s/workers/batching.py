"""Pairs to tensors for the training worker: tokenized pairs, the data order, length-grouped micro-batches
and their collation (one row per pair, its prompt once; log-probs real first, then generated; see ``loss``).

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
    """A collated micro-batch of B pairs, one row each: the prompt once, then the real response, then the
    generated one. The generated response attends to the prompt and to itself, never to the real response, and
    its positions continue the prompt's, so each token sees exactly what it would in its own sequence: the two
    branches of a pair in one forward that computes the shared prompt once (2B sequences would compute it twice).

    ``targets`` are the N response tokens as (row, col, label, out): the hidden state at (row, col) predicts
    ``label``, and its log-prob adds to log-prob ``out`` of 2B, the B real responses first (``loss``'s order). A
    generated response's first token is predicted by the prompt's last position, which the real one shares."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool: query position (row 3) may attend to key position (row 4)
    targets: torch.Tensor  # (N, 4) long: row, col, label, out
    ref_logps: torch.Tensor | None  # (2B,) when every pair carries reference log-probs
    tokens: int  # of the 2B sequences, each prompt counted in both: what throughput counts

    @property
    def pairs(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> Batch:
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.attention_mask.to(device),
                     self.targets.to(device), ref, self.tokens)


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
    """Right-padded tensors for B pairs, one row each (see :class:`Batch`)."""
    b = len(pairs)
    width = max(len(p.real) + len(p.generated) - p.prompt_len for p in pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)  # (B, T, T)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    targets = []
    for row, p in enumerate(pairs):
        plen, real_end = p.prompt_len, len(p.real)
        if p.real[:plen] != p.generated[:plen]:
            raise ValueError(f"pair {row}: its real and generated sequences do not start with the same prompt")
        end = real_end + len(p.generated) - plen
        input_ids[row, :real_end] = torch.tensor(p.real)
        input_ids[row, real_end:end] = torch.tensor(p.generated[plen:])
        position_ids[row, :real_end] = torch.arange(real_end)
        position_ids[row, real_end:end] = torch.arange(plen, len(p.generated))
        allowed[row, :real_end, :real_end] = causal[:real_end, :real_end]  # prompt and real response
        allowed[row, real_end:end, :plen] = True  # the generated response sees the prompt ...
        allowed[row, real_end:end, real_end:end] = causal[:end - real_end, :end - real_end]  # ... and itself
        allowed[row, end:, end:] = torch.eye(width - end, dtype=torch.bool)  # padding: itself (no empty row)
        targets += [(row, col - 1, p.real[col], row) for col in range(plen, real_end)]
        targets += [(row, plen - 1 if k == 0 else real_end + k - 1, p.generated[plen + k], b + row)
                    for k in range(len(p.generated) - plen)]
    refs = [p.ref_real for p in pairs] + [p.ref_generated for p in pairs]
    ref_logps = None
    if all(r is not None for r in refs):
        ref_logps = torch.tensor(refs, dtype=torch.float32)  # (2B,)
    return Batch(input_ids, position_ids, allowed.unsqueeze(1), torch.tensor(targets, dtype=torch.long).view(-1, 4),
                 ref_logps, sum(len(p.real) + len(p.generated) for p in pairs))
