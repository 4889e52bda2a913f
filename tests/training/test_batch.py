"""Packing properties: every token exactly once, budget respected, masks/targets/positions right."""

import random

import pytest
import torch

from megatron_srft.training.batch import (MicroBatch, Sample, block_causal_mask, empty_micro_batch,
                                          pack_micro_batches, per_sequence_values)


def _samples(n, seed=0, max_prompt=6, max_resp=9, with_logprobs=True):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        P, R = rng.randint(1, max_prompt), rng.randint(1, max_resp)
        out.append(Sample(prompt_ids=[rng.randint(3, 60) for _ in range(P)],
                          response_ids=[rng.randint(3, 60) for _ in range(R)],
                          advantage=rng.uniform(-1, 1), is_demo=k % 3 == 0, group=k // 4, reward=float(k % 2),
                          old_logprobs=[-0.1 * (j + 1) - k for j in range(R)] if with_logprobs else None,
                          engine_logprobs=[-0.2 * (j + 1) - k for j in range(R)] if with_logprobs else None))
    return out


def _check_mb(mb: MicroBatch, samples):
    T = mb.num_tokens
    assert mb.tokens.shape == (1, T) and mb.position_ids.shape == (1, T)
    for name in ("targets", "loss_mask", "advantage", "is_demo", "seq_index", "seq_num_tokens", "old_logprob"):
        assert getattr(mb, name).shape == (T,), name
    assert int(mb.cu_seqlens[0]) == 0 and int(mb.cu_seqlens[-1]) == T
    for s in range(mb.num_sequences):
        a, b = int(mb.cu_seqlens[s]), int(mb.cu_seqlens[s + 1])
        k = int(mb.seq_index[a])
        smp = samples[k]
        P, R = len(smp.prompt_ids), len(smp.response_ids)
        assert b - a == P + R
        assert mb.tokens[0, a:b].tolist() == smp.prompt_ids + smp.response_ids
        assert mb.position_ids[0, a:b].tolist() == list(range(P + R))
        assert (mb.seq_index[a:b] == k).all() and (mb.seq_num_tokens[a:b] == R).all()
        assert mb.targets[a:b - 1].tolist() == (smp.prompt_ids + smp.response_ids)[1:]
        # loss positions predict exactly the response tokens
        mask = mb.loss_mask[a:b]
        assert mask.sum() == R
        assert mb.targets[a:b][mask > 0].tolist() == smp.response_ids
        assert mask[:P - 1].sum() == 0 and mask[P - 1:P - 1 + R].all() and mask[P - 1 + R:].sum() == 0
        assert torch.allclose(mb.old_logprob[a:b][mask > 0], torch.tensor(smp.old_logprobs))
        assert torch.allclose(mb.engine_logprob[a:b][mask > 0], torch.tensor(smp.engine_logprobs))
        assert (mb.advantage[a:b] == torch.tensor(smp.advantage, dtype=torch.float32)).all()
        assert (mb.is_demo[a:b] == smp.is_demo).all()
    pad_start = int(mb.cu_seqlens[mb.num_sequences])
    assert (mb.loss_mask[pad_start:] == 0).all() and (mb.seq_index[pad_start:] == -1).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [8, 20, 64])
def test_packing_properties(seed, budget):
    samples = _samples(17, seed)
    mbs = pack_micro_batches(samples, budget)
    seen = []
    for mb in mbs:
        _check_mb(mb, samples)
        seen += [int(mb.seq_index[int(mb.cu_seqlens[s])]) for s in range(mb.num_sequences)]
        if mb.num_sequences > 1:
            assert mb.num_tokens <= budget  # only a lone over-long sequence may exceed the budget
        assert mb.num_tokens == sum(samples[k].num_tokens for k in mb.seq_index.unique().tolist() if k >= 0)
    assert sorted(seen) == list(range(len(samples)))  # every sequence exactly once
    total = sum(s.num_tokens for s in samples)
    assert sum(mb.num_tokens for mb in mbs) == total  # no padding when packing with pad_to_multiple=1
    # first-fit-decreasing cannot leave two bins that would fit into one
    loads = sorted(mb.num_tokens for mb in mbs)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > budget


def test_padded_layout_and_pad_multiple():
    samples = _samples(6, 1)
    longest = max(s.num_tokens for s in samples)
    mbs = pack_micro_batches(samples, 4, packing=False)
    assert len(mbs) == 6 and all(mb.num_tokens == longest for mb in mbs)
    assert [int(mb.seq_index[0]) for mb in mbs] == list(range(6))
    for mb in mbs:
        _check_mb(mb, samples)
    packed = pack_micro_batches(samples, 30, pad_to_multiple=8)
    for mb in packed:
        assert mb.num_tokens % 8 == 0
        _check_mb(mb, samples)


def test_missing_logprobs_and_errors():
    samples = _samples(3, 2, with_logprobs=False)
    mb = pack_micro_batches(samples, 100)[0]
    assert mb.engine_logprob is None and (mb.old_logprob == 0).all()
    with pytest.raises(ValueError, match="samples\\[0\\]: prompt_ids is empty"):
        pack_micro_batches([Sample([], [1], 0.0, False, 0, 0.0)], 10)
    with pytest.raises(ValueError, match="old_logprobs has 1 values"):
        pack_micro_batches([Sample([1], [1, 2], 0.0, False, 0, 0.0, old_logprobs=[0.0])], 10)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_micro_batches(samples, 0)


def test_block_causal_mask():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    mask = block_causal_mask(cu, 6)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    seg = [0, 0, 1, 1, 1, 2]
    for i in range(6):
        for j in range(6):
            assert bool(mask[0, 0, i, j]) == (not (j <= i and seg[i] == seg[j]))


def test_per_sequence_values_roundtrip():
    samples = _samples(9, 3)
    mbs = pack_micro_batches(samples, 25)
    vals = per_sequence_values(mbs, [mb.old_logprob for mb in mbs], len(samples))
    for k, s in enumerate(samples):
        assert torch.allclose(vals[k], torch.tensor(s.old_logprobs))


def test_empty_micro_batch():
    e = empty_micro_batch()
    assert e.num_tokens == 1 and e.num_loss_tokens == 0 and e.num_sequences == 0
