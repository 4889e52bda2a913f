"""Fused vocab-parallel log-prob and entropy of the target tokens, chunked over tokens.

Each tensor-parallel rank holds a vocab shard of the logits, ``z`` of shape [T, V_local]: columns
[tp_rank * V_local, (tp_rank + 1) * V_local) of the padded vocabulary. Per token, with the softmax over the
TRUE vocabulary (global column id < ``vocab_size``; padding columns are excluded):

    m       = max_v z_v                                        (all-reduce MAX)
    s       = sum_v exp(z_v - m)                               (all-reduce SUM)
    lse     = m + log s
    logp    = z_target - lse                                   (z_target: all-reduce SUM, only its owner adds it)
    H       = -sum_v p_v log p_v = log s - sum_v p_v (z_v - m)  (sum of exp(z - m)(z - m): all-reduce SUM)

Gradients (p = softmax(z)), for both outputs, with upstream grads g_logp and g_H per token:

    d logp / d z_v = onehot_v(target) - p_v
    d H    / d z_v = -p_v (log p_v + H)
    => d L / d z_v = g_logp * onehot_v - p_v * (g_logp + g_H * (log p_v + H)),   log p_v = z_v - lse

Backward needs no communication: it recomputes p per chunk from the saved input logits and the saved
per-token ``lse`` and ``H``. Padded columns get gradient 0. The forward holds at most two fp32 [chunk, V_local]
temporaries at a time, so the peak beyond the logits (and, in backward, their gradient) does not grow with T.

Padding columns are always the last columns of the padded vocabulary, so on each rank the valid columns are a
prefix of the local shard: ``num_valid_local = clamp(vocab_size - tp_rank * V_local, 0, V_local)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..distributed import collectives

__all__ = ["vocab_parallel_logprob_entropy", "naive_logprob_entropy"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (lets tests use torch.autograd.gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _tp_coords(tp_group: Optional[collectives.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return collectives.rank(tp_group), collectives.world_size(tp_group)


def _all_reduce(t: torch.Tensor, op: str, tp_group, tp_size: int) -> torch.Tensor:
    # logits live on the device the TP group communicates on, so this reduces in place
    return collectives.all_reduce(t, op, tp_group) if tp_size > 1 else t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_size, chunk_tokens):
        num_tokens, vocab_local = logits.shape
        tp_rank, tp_size = _tp_coords(tp_group)
        vocab_start = tp_rank * vocab_local
        total = vocab_local * tp_size if vocab_size is None else vocab_size
        num_valid = max(0, min(vocab_local, total - vocab_start))
        cdt = _compute_dtype(logits.dtype)
        dev = logits.device

        # Pass 1: the per-token max over the valid columns (exact in the input dtype, so no fp32 copy).
        m = torch.full((num_tokens,), float("-inf"), dtype=cdt, device=dev)
        if num_valid > 0:
            for s0 in range(0, num_tokens, chunk_tokens):
                s1 = min(num_tokens, s0 + chunk_tokens)
                m[s0:s1] = logits[s0:s1, :num_valid].amax(dim=-1).to(cdt)
        m = _all_reduce(m, "max", tp_group, tp_size)

        # Pass 2: [sum exp(z - m), sum exp(z - m)(z - m), z_target - m] per token; one all-reduce for all three.
        stats = torch.zeros((3, num_tokens), dtype=cdt, device=dev)
        local_t = targets - vocab_start
        owned = (local_t >= 0) & (local_t < num_valid)
        if num_valid > 0:
            for s0 in range(0, num_tokens, chunk_tokens):
                s1 = min(num_tokens, s0 + chunk_tokens)
                shifted = logits[s0:s1, :num_valid].to(cdt) - m[s0:s1, None]  # [C, V_valid], new fp32 buffer
                idx = local_t[s0:s1].clamp(0, num_valid - 1)
                zt = shifted.gather(1, idx[:, None]).squeeze(1)
                stats[2, s0:s1] = torch.where(owned[s0:s1], zt, torch.zeros_like(zt))
                e = torch.exp(shifted)
                stats[0, s0:s1] = e.sum(dim=-1)
                stats[1, s0:s1] = e.mul_(shifted).sum(dim=-1)
                del shifted, e
        stats = _all_reduce(stats, "sum", tp_group, tp_size)

        log_s = stats[0].log()
        logprob = stats[2] - log_s           # (z_t - m) - log s = z_t - lse
        entropy = log_s - stats[1] / stats[0]
        lse = m + log_s

        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.vocab_start, ctx.num_valid, ctx.chunk_tokens = vocab_start, num_valid, chunk_tokens
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        num_tokens = logits.shape[0]
        num_valid, chunk = ctx.num_valid, ctx.chunk_tokens
        cdt = _compute_dtype(logits.dtype)
        if num_valid == 0:
            return torch.zeros_like(logits), None, None, None, None
        grad = torch.empty_like(logits)
        grad[:, num_valid:].zero_()  # padding columns: not part of the softmax
        g_logp = g_logp.to(cdt)
        g_ent = g_ent.to(cdt)
        local_t = targets - ctx.vocab_start
        owned = (local_t >= 0) & (local_t < num_valid)
        for s0 in range(0, num_tokens, chunk):
            s1 = min(num_tokens, s0 + chunk)
            logp_v = logits[s0:s1, :num_valid].to(cdt) - lse[s0:s1, None]  # log p_v, new buffer
            p = torch.exp(logp_v)
            # -p * (g_logp + g_H * (log p + H)), built in place in logp_v's buffer
            gz = logp_v.add_(entropy[s0:s1, None]).mul_(g_ent[s0:s1, None]).add_(g_logp[s0:s1, None]).mul_(p).neg_()
            del p
            idx = local_t[s0:s1].clamp(0, num_valid - 1)
            add = torch.where(owned[s0:s1], g_logp[s0:s1], torch.zeros_like(g_logp[s0:s1]))
            gz.scatter_add_(1, idx[:, None], add[:, None])
            grad[s0:s1, :num_valid] = gz
            del gz
        return grad, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: Optional[collectives.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of each token's distribution, over a vocab-sharded logits.

    Args:
        logits: [T, V_local] (fp32, bf16, fp16 or fp64), this rank's vocab shard: global columns
            [tp_rank * V_local, (tp_rank + 1) * V_local), tp_rank = rank in tp_group.
        targets: [T] long, global token ids in [0, vocab_size) (the same tensor on every TP rank).
        tp_group: the tensor-parallel group the vocab is split over; None = one rank holds the whole vocab.
        vocab_size: the true vocabulary size; global columns >= vocab_size (padding) are excluded from the
            softmax. None = every column is a real token.
        chunk_tokens: tokens per chunk; bounds the fp32 temporaries to 2 x [chunk_tokens, V_local]. The default
            256 keeps them at ~4% of the logits at [8192, 32k] (benchmarks/results.json: 13% at 1024) and was
            also the fastest measured on CPU.

    Returns:
        (logprob [T], entropy [T]) in fp32 (fp64 for fp64 logits), identical on every TP rank, both
        differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [T, V_local], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape [{logits.shape[0]}], got {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected >= 1, got {chunk_tokens}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size: expected >= 1, got {vocab_size}")
    return _VocabParallelLogprobEntropy.apply(logits, targets.long(), tp_group, vocab_size, chunk_tokens)


def naive_logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious full-vocab reference (materialises several fp32 [T, V] tensors): for tests and benchmarks.

    logits [T, V] (the whole padded vocab), targets [T] -> (logprob [T], entropy [T]) in fp32.
    """
    z = logits.to(_compute_dtype(logits.dtype))
    if vocab_size is not None:
        z = z[:, :vocab_size]
    logp_all = torch.log_softmax(z, dim=-1)
    logprob = logp_all.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logprob, entropy
