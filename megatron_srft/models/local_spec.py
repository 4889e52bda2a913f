"""Our layer spec for Megatron's pure-PyTorch path (CPU, and GPU without Transformer Engine).

Megatron's local spec (``get_gpt_layer_local_spec``) builds its norms with ``WrappedTorchNorm``, which asserts on
sequence parallelism: a configuration with SP could not even be built without Transformer Engine. This module
keeps Megatron's local layer (attention, MLP, linears) and swaps in :class:`RMSNorm`, a plain norm that works under
SP, so CPU runs (and CI) exercise the sequence-parallel code paths our shipped configs use.

Under SP the norm's input is this rank's slice of the sequence; its weight is replicated over TP, and each TP
rank's weight gradient covers only its slice. Marking the weight ``sequence_parallel = True`` makes Megatron's
``finalize_model_grads`` sum those gradients over the TP group (``_allreduce_non_tensor_model_parallel_grads``),
as Transformer Engine's norms do. Parameter names and checkpoint keys are those of the local spec.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = w * (x / sqrt(mean(x^2, last dim) + eps)), computed in fp32 and cast back to x's dtype (HF Qwen2/Llama).

    Built by Megatron's ``build_module(spec, config=..., hidden_size=..., eps=...)``. The weight is fp32, like the
    local spec's ``torch.nn.RMSNorm``; it carries ``sequence_parallel`` = ``config.sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"models.local_spec.RMSNorm: expected normalization 'RMSNorm', got {config.normalization}")
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def local_layer_spec(qk_norm: bool):
    """Megatron's local GPT layer spec with :class:`RMSNorm` for every norm (input, pre-MLP, q/k)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    if qk_norm:
        attn.q_layernorm = RMSNorm
        attn.k_layernorm = RMSNorm
    return spec


def local_block_spec(config, qk_norm: bool, pp_rank: int | None = None, vp_stage: int | None = None):
    """The decoder block for this pipeline stage: its layers' specs plus the final norm (also :class:`RMSNorm`).

    A bare layer spec would let Megatron pick the final norm itself (``WrappedTorchNorm``), which refuses SP.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = local_layer_spec(qk_norm)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=RMSNorm)
