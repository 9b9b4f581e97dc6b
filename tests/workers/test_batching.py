"""The training worker's pure parts: data order, micro-batches, collation and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from spin_k8s.workers import batching, train


def test_global_batches_are_deterministic_epoch_permutations_without_remainder() -> None:
    steps = [batching.global_batch(10, 4, seed=3, step=k) for k in range(4)]  # 2 steps per epoch
    assert steps == [batching.global_batch(10, 4, seed=3, step=k) for k in range(4)]
    assert all(len(s) == 4 for s in steps)
    for epoch in (0, 1):
        first, second = steps[2 * epoch], steps[2 * epoch + 1]
        assert not set(first) & set(second)  # no pair twice in one epoch
        assert first + second == batching.epoch_order(10, 3, epoch)[:8]
    assert steps[:2] != steps[2:]  # each epoch is reshuffled
    assert batching.global_batch(10, 4, seed=4, step=0) != steps[0]
    with pytest.raises(ValueError, match="cannot fill"):
        batching.global_batch(3, 4, seed=0, step=0)


def test_micro_batches_split_a_global_batch_over_ranks_by_length() -> None:
    lengths = [5, 50, 7, 48, 9, 30, 31, 6]
    indices = list(range(8))
    per_rank = [batching.micro_batches(indices, lengths, 2, world_size=2, rank=r) for r in (0, 1)]
    assert per_rank[0] == [[1, 3], [4, 2]] and per_rank[1] == [[6, 5], [7, 0]]
    flat = sorted(i for rank in per_rank for chunk in rank for i in chunk)
    assert flat == indices  # every pair exactly once


def test_collate_puts_real_rows_first_and_masks_prompt_and_padding() -> None:
    pairs = [batching.Pair(real=[1, 2, 3, 4], generated=[1, 2, 9], prompt_len=2, ref_real=-1.0, ref_generated=-2.0),
             batching.Pair(real=[5, 6, 7, 8, 8, 8], generated=[5, 6, 7, 0], prompt_len=3, ref_real=-3.0,
                           ref_generated=-4.0)]
    batch = batching.collate(pairs, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 8, 8], [1, 2, 9, 0, 0, 0], [5, 6, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0],
                                            [0, 0, 0, 1, 0, 0]]
    assert batch.keep == 6 - 2 + 1 and batch.tokens == 17
    assert batch.ref_logps is not None and batch.ref_logps.tolist() == [-1.0, -3.0, -2.0, -4.0]
    no_refs = batching.collate([batching.Pair(real=[1, 2], generated=[1, 3], prompt_len=1)], pad_id=0)
    assert no_refs.ref_logps is None
    assert torch.equal(no_refs.input_ids, torch.tensor([[1, 2], [1, 3]]))


def test_linear_schedule_with_warmup() -> None:
    assert [train.linear_schedule(k, total=10, warmup=2) for k in range(11)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert train.linear_schedule(0, total=4, warmup=0) == 1.0
