"""Our layer spec for Megatron's pure-PyTorch path (CPU, and GPU without Transformer Engine).

Megatron's local spec (``get_gpt_layer_local_spec``) builds its norms with ``WrappedTorchNorm``, which asserts on
sequence parallelism: a configuration with SP could not even be built without Transformer Engine. This module
keeps Megatron's local layer (attention projections, MLP, linears) and swaps in two modules:

- :class:`RMSNorm`, a plain norm that works under SP, so CPU runs (and CI) exercise the sequence-parallel code
  paths our shipped configs use;
- :class:`PackedSegmentAttention` as the core attention. Megatron's local ``DotProductAttention`` takes packed
  rows only through a dense [T, T] mask (memory and time grow with T^2: 12.7 GB for one step at T = 16384 on the
  toy). Ours takes the packed row in THD format with its cumulative sequence lengths (``PackedSeqParams``, as the
  Transformer Engine spec does) and attends within each segment, so its cost grows with sum_k L_k^2.

Under SP the norm's input is this rank's slice of the sequence; its weight is replicated over TP, and each TP
rank's weight gradient covers only its slice. Marking the weight ``sequence_parallel = True`` makes Megatron's
``finalize_model_grads`` sum those gradients over the TP group (``_allreduce_non_tensor_model_parallel_grads``),
as Transformer Engine's norms do. Parameter names and checkpoint keys are those of the local spec.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build


class RMSNorm(torch.nn.Module):
    """y = w * (x / sqrt(mean(x^2, last dim) + eps)) as HF Qwen2/Llama compute it: the normalisation in fp32, cast
    back to x's dtype, then multiplied by the weight in x's dtype, so the output has the activation dtype.

    Built by Megatron's ``build_module(spec, config=..., hidden_size=..., eps=...)``. The weight is held in
    ``config.params_dtype``, as Transformer Engine's norms and the HF / vLLM models hold it (an fp32 weight would
    promote bf16 activations to fp32 and the next bf16 linear layer would reject them); the optimizer keeps its
    fp32 master copy. It carries ``sequence_parallel`` = ``config.sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"models.local_spec.RMSNorm: expected normalization 'RMSNorm', got {config.normalization}")
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * h.to(x.dtype)  # (a no-op cast when the weight has x's dtype)


class PackedSegmentAttention(MegatronModule):
    """Causal self-attention computed per packed segment: softmax(q k^T * scale + causal) v within each sequence.

    Built by Megatron's ``SelfAttention`` through the spec's ``core_attention`` slot, with the arguments
    ``DotProductAttention`` gets. Inputs come after the column-parallel QKV projection and RoPE, so every TP rank
    sees the FULL sequence (also under sequence parallelism) and its own heads:

    - THD (``packed_seq_params.qkv_format == 'thd'``, what ``training.batch.model_forward`` passes): query
      [T, n_q, d], key/value [T, n_kv, d], segments [cu_seqlens[i], cu_seqlens[i+1]); n_q = heads / TP,
      n_kv = query groups / TP (GQA: each KV head serves n_q / n_kv query heads). Returns [T, n_q * d].
      A trailing padding segment is one more segment (it attends to itself only; its outputs carry no loss).
      Memory per layer: the scores of one segment at a time, n_q * L_k^2, instead of n_q * T^2.
    - no packed params (``[S, B, n, d]`` inputs): one causal sequence per batch row, or an explicit boolean
      ``attention_mask`` [B or 1, 1, S, S] (True = masked, Megatron's convention). Returns [S, B, n_q * d].

    Megatron's THD path applies RoPE per segment (positions restart at 0 in every sequence), so each packed
    sequence sees exactly the positions it would see alone. Dropout follows ``DotProductAttention`` (under the
    tensor-parallel RNG tracker unless SP); RL runs use 0.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, **unused) -> None:
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("models.local_spec.PackedSegmentAttention: context parallelism is not supported")
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp = pg_collection.tp.size()
        else:
            tp = parallel_state.get_tensor_model_parallel_world_size()
        head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads // tp
        self.hidden_size_per_partition = head_dim * self.num_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("models.local_spec.PackedSegmentAttention: apply_query_key_layer_scaling is not supported")
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def _sdpa(self, q, k, v, **kw):
        """q [B, n_q, L, d], k/v [B, n_kv, L, d] -> [B, n_q, L, d]."""
        p = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        if p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, enable_gqa=gqa, **kw)
        fork = (tensor_parallel.get_cuda_rng_tracker().fork() if not self.config.sequence_parallel
                else contextlib.nullcontext())
        with fork:
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, dropout_p=p, enable_gqa=gqa,
                                                  **kw)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("models.local_spec.PackedSegmentAttention: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            return self._segments(query, key, value, cu)
        # [S, B, n, d] -> [B, n, S, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is None:
            out = self._sdpa(q, k, v, is_causal=True)
        else:
            out = self._sdpa(q, k, v, attn_mask=~attention_mask.bool())
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)

    def _segments(self, query, key, value, cu_seqlens):
        num_tokens = query.shape[0]
        # one host read of the boundaries per layer call (they are on the host already on CPU)
        sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if sum(sizes) != num_tokens:
            raise ValueError(f"PackedSegmentAttention: cu_seqlens cover {sum(sizes)} tokens, the row has {num_tokens}")
        # split (not slicing) so that autograd concatenates the segments' gradients once instead of adding a
        # full-size zero-padded gradient per segment (O(S * T) memory traffic)
        qs, ks, vs = (t.transpose(0, 1).split(sizes, dim=1) for t in (query, key, value))  # [n, L_k, d] each
        outs = [self._sdpa(q[None], k[None], v[None], is_causal=True)[0] for q, k, v in zip(qs, ks, vs)]
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # [n_q, T, d]
        return out.transpose(0, 1).reshape(num_tokens, self.hidden_size_per_partition)


def local_layer_spec(qk_norm: bool, core_attention=None):
    """Megatron's local GPT layer spec with :class:`RMSNorm` for every norm (input, pre-MLP, q/k) and
    :class:`PackedSegmentAttention` as the core attention (``core_attention`` overrides it, e.g. Megatron's
    ``DotProductAttention`` as the dense-mask reference in tests)."""
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = core_attention or PackedSegmentAttention
    if qk_norm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return spec


def local_block_spec(config, qk_norm: bool, pp_rank: int | None = None, vp_stage: int | None = None,
                     core_attention=None):
    """The decoder block for this pipeline stage: its layers' specs plus the final norm (also :class:`RMSNorm`).

    A bare layer spec would let Megatron pick the final norm itself (``WrappedTorchNorm``), which refuses SP.
    """
    layer = local_layer_spec(qk_norm, core_attention=core_attention)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=RMSNorm)
