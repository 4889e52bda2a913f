"""The fused vocab-parallel log-prob/entropy op against the naive full-vocab computation (values and grads)."""

from __future__ import annotations

import pytest
import torch

from megatron_srft.ops.logprob import naive_logprob_entropy, vocab_parallel_logprob_entropy
from tests.dist import run_ranks


def _case(num_tokens, padded_vocab, vocab_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, padded_vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=g)
    g_logp = torch.randn(num_tokens, generator=g)
    g_ent = torch.randn(num_tokens, generator=g)
    return logits, targets, g_logp, g_ent


def _fused(logits_shard, targets, g_logp, g_ent, **kw):
    x = logits_shard.detach().clone().requires_grad_()
    lp, ent = vocab_parallel_logprob_entropy(x, targets, **kw)
    ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _naive(logits, targets, g_logp, g_ent, vocab_size):
    x = logits.detach().clone().float().requires_grad_()
    lp, ent = naive_logprob_entropy(x, targets, vocab_size)
    ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("vocab_size", [None, 45])
def test_tp1_fp32_matches_naive(chunk, vocab_size):
    logits, targets, g_logp, g_ent = _case(33, 64, vocab_size or 64, torch.float32)
    lp, ent, grad = _fused(logits, targets, g_logp, g_ent, vocab_size=vocab_size, chunk_tokens=chunk)
    rlp, rent, rgrad = _naive(logits, targets, g_logp, g_ent, vocab_size)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, rgrad, atol=1e-5, rtol=0)
    if vocab_size is not None:
        assert torch.all(grad[:, vocab_size:] == 0)


def test_tp1_bf16_close_to_fp32_of_same_values():
    logits, targets, g_logp, g_ent = _case(20, 64, 50, torch.bfloat16)
    lp, ent, grad = _fused(logits, targets, g_logp, g_ent, vocab_size=50, chunk_tokens=6)
    rlp, rent, rgrad = _naive(logits, targets, g_logp, g_ent, 50)
    assert lp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # Values are computed in fp32 from the same bf16 inputs: fp32-exact; the grad is rounded to bf16.
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.float(), rgrad, atol=2e-2, rtol=1e-2)


def test_gradcheck_fp64_both_outputs():
    logits, targets, _, _ = _case(9, 12, 10, torch.float64)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprob_entropy(z, targets, vocab_size=10, chunk_tokens=4), (x,))


def test_extreme_logits_are_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4]])
    targets = torch.tensor([1, 2])
    lp, ent = vocab_parallel_logprob_entropy(logits, targets, vocab_size=3)
    rlp, rent = naive_logprob_entropy(logits, targets, 3)
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(ent, rent)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprob_entropy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        vocab_parallel_logprob_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def _tp2_rank(cases):
    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed.groups import init_distributed

    groups = init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    out = []
    for num_tokens, padded_vocab, vocab_size, dtype, chunk in cases:
        logits, targets, g_logp, g_ent = _case(num_tokens, padded_vocab, vocab_size, dtype)
        v_local = padded_vocab // 2
        shard = logits[:, groups.tp_rank * v_local:(groups.tp_rank + 1) * v_local]
        lp, ent, grad = _fused(shard, targets, g_logp, g_ent, tp_group=groups.tp_group, vocab_size=vocab_size,
                               chunk_tokens=chunk)
        rlp, rent, rgrad = _naive(logits, targets, g_logp, g_ent, vocab_size)
        rgrad = torch.nn.functional.pad(rgrad, (0, padded_vocab - rgrad.shape[1]))
        rshard = rgrad[:, groups.tp_rank * v_local:(groups.tp_rank + 1) * v_local]
        out.append(((lp - rlp).abs().max().item(), (ent - rent).abs().max().item(),
                    (grad.float() - rshard).abs().max().item()))
    return out


def test_tp2_matches_naive_values_and_grads():
    # (tokens, padded vocab, true vocab, dtype, chunk): no padding; padding on rank 1 only; rank 1 all padding.
    cases = [(19, 64, 64, torch.float32, 5), (19, 64, 40, torch.float32, 1024), (8, 64, 30, torch.float32, 3),
             (16, 64, 50, torch.bfloat16, 4)]
    results = run_ranks(_tp2_rank, 2, cases)
    for rank_result in results:
        for (dlp, dent, dgrad), case in zip(rank_result, cases):
            bf16 = case[3] == torch.bfloat16
            assert dlp <= 1e-5 and dent <= 1e-5, (case, dlp, dent)
            assert dgrad <= (2e-2 if bf16 else 1e-5), (case, dgrad)
