"""The training worker's pure parts: data order, micro-batches, collation and the learning-rate schedule."""

from __future__ import annotations

import random

import pytest
import torch

from spin_k8s.workers import batching, train


def test_epoch_batches_are_deterministic_permutations_without_remainder() -> None:
    lengths = [10] * 10
    epochs = [batching.epoch_batches(lengths, 4, seed=3, epoch=e, window=1) for e in (0, 1)]
    assert epochs == [batching.epoch_batches(lengths, 4, seed=3, epoch=e, window=1) for e in (0, 1)]
    for epoch, batches in enumerate(epochs):
        assert len(batches) == 2 and all(len(b) == 4 for b in batches)  # 10 // 4 steps, remainder dropped
        assert batches[0] + batches[1] == batching.epoch_order(10, 3, epoch)[:8]
    assert epochs[0] != epochs[1]  # each epoch is reshuffled
    assert batching.epoch_batches(lengths, 4, seed=4, epoch=0, window=1) != epochs[0]
    with pytest.raises(ValueError, match="cannot fill"):
        batching.epoch_batches([1, 2, 3], 4, seed=0, epoch=0, window=1)


def test_length_grouping_cuts_padding_and_keeps_the_same_pairs() -> None:
    rng = random.Random(0)
    lengths = [rng.randrange(10, 300) for _ in range(1000)]

    def padded(batches: list[list[int]]) -> int:  # tokens a batch takes once padded to its longest pair
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = batching.epoch_batches(lengths, 8, seed=1, epoch=0, window=1)
    grouped = batching.epoch_batches(lengths, 8, seed=1, epoch=0, window=16)
    assert grouped == batching.epoch_batches(lengths, 8, seed=1, epoch=0, window=16)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # same 992 pairs
    assert all(len(b) == 8 for b in grouped)
    assert padded(grouped) < 0.7 * padded(plain)
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped]
    assert sum(spans) / len(spans) < 40  # similar lengths share a batch
    firsts = [max(lengths[i] for i in b) for b in grouped[:8]]
    assert firsts != sorted(firsts, reverse=True)  # batches shuffled, not longest first


def test_micro_batches_split_a_global_batch_over_ranks_by_length() -> None:
    lengths = [5, 50, 7, 48, 9, 30, 31, 6]
    indices = list(range(8))
    per_rank = [batching.micro_batches(indices, lengths, 2, world_size=2, rank=r) for r in (0, 1)]
    assert per_rank[0] == [[1, 3], [4, 2]] and per_rank[1] == [[6, 5], [7, 0]]
    flat = sorted(i for rank in per_rank for chunk in rank for i in chunk)
    assert flat == indices  # every pair exactly once


def test_collate_runs_a_pair_as_one_row_each_token_seeing_what_it_would_in_its_own_sequence() -> None:
    pairs = [batching.Pair(real=[1, 2, 3, 4], generated=[1, 2, 9], prompt_len=2, ref_real=-1.0, ref_generated=-2.0),
             batching.Pair(real=[5, 6, 7, 8, 8, 8], generated=[5, 6, 7, 0], prompt_len=3, ref_real=-3.0,
                           ref_generated=-4.0)]
    batch = batching.collate(pairs, pad_id=0)
    # prompt once, real response, generated response; right-padded
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 9, 0, 0], [5, 6, 7, 8, 8, 8, 0]]
    # the generated response's positions continue the prompt's, as in its own sequence
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 0], [0, 1, 2, 3, 4, 5, 3]]
    # row 0: the generated token (index 4) sees the prompt (0, 1) and itself, not the real response (2, 3)
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    # (row, state position, label, output): real responses are outputs 0..B-1, generated ones B..2B-1; a
    # generated response's first token is predicted by the prompt's last position
    assert batch.targets.tolist() == [[0, 1, 3, 0], [0, 2, 4, 0], [0, 1, 9, 2],
                                      [1, 2, 8, 1], [1, 3, 8, 1], [1, 4, 8, 1], [1, 2, 0, 3]]
    assert batch.tokens == 17  # of the 2B sequences, what throughput counts
    assert batch.ref_logps is not None and batch.ref_logps.tolist() == [-1.0, -3.0, -2.0, -4.0]
    no_refs = batching.collate([batching.Pair(real=[1, 2], generated=[1, 3], prompt_len=1)], pad_id=0)
    assert no_refs.ref_logps is None
    assert torch.equal(no_refs.input_ids, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="same prompt"):
        batching.collate([batching.Pair(real=[1, 2], generated=[4, 3], prompt_len=1)], pad_id=0)


def test_linear_schedule_with_warmup() -> None:
    assert [train.linear_schedule(k, total=10, warmup=2) for k in range(11)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert train.linear_schedule(0, total=4, warmup=0) == 1.0
