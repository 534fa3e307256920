"""Goyal et al. sec. 2.2 data shuffling: one permutation per epoch, divided among all workers."""

from __future__ import annotations

import torch

from train.data import GlobalBatchSampler, eval_shard


def batches(n, B, micro, world, epoch=0, seed=0, start=0):
    out = []
    for r in range(world):
        s = GlobalBatchSampler(n, B, micro, world, r, seed)
        s.set_epoch(epoch, start)
        out.append(list(s))
    return out


def test_each_step_sees_the_same_global_batch_whatever_the_split():
    n, B = 1000, 16
    one = batches(n, B, 16, 1)[0]  # 1 rank x micro 16
    two = batches(n, B, 4, 2)  # 2 ranks x 2 accumulation x micro 4
    assert len(one) == n // B and all(len(b) == 4 for r in two for b in r)
    for step in range(n // B):
        union = two[0][2 * step] + two[0][2 * step + 1] + two[1][2 * step] + two[1][2 * step + 1]
        assert sorted(union) == sorted(one[step])


def test_epoch_is_a_permutation_without_repeats_and_drops_the_remainder():
    n, B = 1000, 64
    got = [i for r in batches(n, B, 8, 4) for b in r for i in b]
    assert len(got) == (n // B) * B == 960
    assert len(set(got)) == 960 and max(got) < n


def test_new_order_each_epoch_same_on_every_rank():
    s0 = GlobalBatchSampler(100, 10, 5, 2, 0, seed=3)
    s1 = GlobalBatchSampler(100, 10, 5, 2, 1, seed=3)
    s0.set_epoch(4)
    s1.set_epoch(4)
    assert torch.equal(s0.permutation(), s1.permutation())
    e5 = GlobalBatchSampler(100, 10, 5, 2, 0, seed=3)
    e5.set_epoch(5)
    assert not torch.equal(s0.permutation(), e5.permutation())
    assert sorted(s0.permutation().tolist()) == list(range(100))


def test_start_step_resumes_mid_epoch():
    full = batches(500, 20, 5, 2, epoch=2)
    tail = batches(500, 20, 5, 2, epoch=2, start=7)
    accum = 20 // (5 * 2)
    for r in range(2):
        assert tail[r] == full[r][7 * accum:]


def test_eval_shard_counts_every_sample_once():
    for n, world in [(10000, 2), (10001, 3), (7, 8)]:
        shards = [eval_shard(n, world, r) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
