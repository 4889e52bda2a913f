"""Megatron ``GPTModel`` from a Hugging Face config, declared through Megatron's ModuleSpec.

On GPU with Transformer Engine importable the TE layer spec is used (FP8 possible); otherwise Megatron's local
spec (pure PyTorch, runs on CPU). Nothing here forks or patches Megatron: the only after-construction change
is setting the rotary ``inv_freq`` to the HF formula when a Llama-3 rope scaling differs from Megatron's
hard-coded defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs as specs
from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from ..config import ConfigError, ModelConfig, OptimizerConfig, ParallelConfig
from ..distributed.groups import device_for_rank
from ..distributed.layout import check_model_split
from ..dtypes import torch_dtype
from .arch import ArchSpec, rope_inv_freq
from .local_spec import local_block_spec

def use_transformer_engine(mcfg: ModelConfig, on_gpu: Optional[bool] = None) -> bool:
    """Transformer Engine's layers for a model on the GPU (``on_gpu``; None = CUDA is available) when TE imports."""
    if mcfg.transformer_impl == "local":
        return False
    te_ok = torch.cuda.is_available() if on_gpu is None else on_gpu
    if te_ok:
        try:
            import transformer_engine  # noqa: F401  (lazy: optional, and importing it is the probe)
        except Exception:
            te_ok = False
    if mcfg.transformer_impl == "transformer_engine" and not te_ok:
        raise ConfigError("model.transformer_impl: 'transformer_engine' needs Transformer Engine and a CUDA GPU")
    return te_ok


def transformer_config(arch: ArchSpec, mcfg: ModelConfig, pcfg: ParallelConfig,
                       device: Optional[torch.device] = None):
    """The Megatron ``TransformerConfig`` for an HF architecture and the device the model will live on (None =
    this rank's, :func:`~megatron_srft.distributed.groups.device_for_rank`). Checks the layout against the shapes."""
    check_model_split(arch, pcfg)
    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    dtype = torch_dtype(mcfg.params_dtype)
    on_gpu = (device or device_for_rank()).type == "cuda"
    te = use_transformer_engine(mcfg, on_gpu)
    kw = {}
    if mcfg.fp8 is not None:
        kw.update(fp8=mcfg.fp8, fp8_recipe=mcfg.fp8_recipe, fp8_param=mcfg.fp8_param)
    if mcfg.recompute_granularity is not None:
        kw.update(recompute_granularity=mcfg.recompute_granularity, recompute_method=mcfg.recompute_method,
                  recompute_num_layers=mcfg.recompute_num_layers)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        attention_dropout=mcfg.attention_dropout,
        hidden_dropout=mcfg.hidden_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=pcfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,  # Megatron allocates parameters on the current GPU otherwise
        variable_seq_lengths=True,  # PP p2p shapes follow each packed micro-batch
        moe_token_dispatcher_type="alltoall",  # (dense models; allgather rejects variable lengths)
        init_method_std=float(arch.hf_config.get("initializer_range", 0.02)),
        transformer_impl="transformer_engine" if te else "local",
        **kw,
    )


def layer_spec(arch: ArchSpec, mcfg: ModelConfig, tf_config=None, pp_rank: Optional[int] = None,
               core_attention=None):
    """The Transformer Engine layer spec on GPU with TE; otherwise our local block spec (models/local_spec.py:
    Megatron's local layer with norms that support sequence parallelism and per-segment packed attention), which
    needs ``tf_config``. ``core_attention`` replaces the local spec's core (tests: Megatron's dense-mask one)."""
    te = tf_config.transformer_impl == "transformer_engine" if tf_config is not None else use_transformer_engine(mcfg)
    if te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm, fp8=mcfg.fp8)
    return local_block_spec(tf_config, arch.qk_norm, pp_rank=pp_rank, core_attention=core_attention)


@dataclass
class ModelHandle:
    """The built model chunks plus what the rest of the code needs to know about them."""

    chunks: list  # list[GPTModel] (or DDP-wrapped), one per virtual pipeline stage
    arch: ArchSpec
    tf_config: "TransformerConfig"
    padded_vocab_size: int


def build_gpt(arch: ArchSpec, mcfg: ModelConfig, pcfg: ParallelConfig, pre_process: bool, post_process: bool,
              tf_config=None, pp_rank: Optional[int] = None, spec=None, core_attention=None,
              device: Optional[torch.device] = None):
    """One ``GPTModel`` for this pipeline stage (``pre_process`` = holds the embedding, ``post_process`` = head),
    on ``device`` (None = this rank's; ``tf_config`` must have been made for the same device).
    ``spec``: a layer or block spec instead of :func:`layer_spec`'s choice; ``core_attention``: see there."""
    device = device or device_for_rank()
    tf_config = tf_config or transformer_config(arch, mcfg, pcfg, device)
    if tf_config.use_cpu_initialization != (device.type != "cuda"):
        raise ValueError(f"build_gpt: tf_config was made for another device than {device}")
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=spec if spec is not None else layer_spec(arch, mcfg, tf_config, pp_rank=pp_rank,
                                                                         core_attention=core_attention),
        vocab_size=arch.padded_vocab_size(mcfg.make_vocab_size_divisible_by, pcfg.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
    )
    if arch.rope_scaling is not None or not float(arch.rope_theta).is_integer():
        # Megatron hard-codes the llama3 low/high factors and original length; use HF's exact formula.
        model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
    if device.type == "cuda":
        model.cuda(device)
    return model


def build_model(arch: ArchSpec, mcfg: ModelConfig, pcfg: ParallelConfig, *, wrap_ddp: bool = True,
                ddp_overrides: Optional[dict] = None, pp_rank: Optional[int] = None,
                pp_size: Optional[int] = None) -> ModelHandle:
    """Build this rank's model chunk(s), optionally wrapped in Megatron DDP (needed by the Megatron optimizer)."""
    pp_size = pp_size if pp_size is not None else mpu.get_pipeline_model_parallel_world_size()
    pp_rank = pp_rank if pp_rank is not None else mpu.get_pipeline_model_parallel_rank()
    tf_config = transformer_config(arch, mcfg, pcfg)
    model = build_gpt(arch, mcfg, pcfg, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                      tf_config=tf_config, pp_rank=pp_rank)
    chunks = [model]
    if wrap_ddp:
        ddp_kw = dict(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=pcfg.overlap_grad_reduce,
            overlap_param_gather=pcfg.overlap_param_gather,
            use_distributed_optimizer=pcfg.use_distributed_optimizer,
            # FP8 parameters must be all-gathered as FP8 (their storage), not as the bf16 they report
            fp8_param_gather=mcfg.fp8_param,
        )
        ddp_kw.update(ddp_overrides or {})
        chunks = [DistributedDataParallel(config=tf_config, ddp_config=DistributedDataParallelConfig(**ddp_kw),
                                          module=m) for m in chunks]
    return ModelHandle(chunks=chunks, arch=arch, tf_config=tf_config,
                       padded_vocab_size=arch.padded_vocab_size(mcfg.make_vocab_size_divisible_by,
                                                                pcfg.tensor_model_parallel_size))


def build_optimizer(handle: ModelHandle, ocfg: OptimizerConfig, mcfg: ModelConfig, pcfg: ParallelConfig):
    """Megatron's optimizer with fp32 master weights (and the distributed optimizer when configured)."""
    dtype = torch_dtype(mcfg.params_dtype)
    mo = MOptimizerConfig(
        optimizer=ocfg.name,
        lr=ocfg.lr,
        min_lr=ocfg.min_lr,
        weight_decay=ocfg.weight_decay,
        adam_beta1=ocfg.adam_beta1,
        adam_beta2=ocfg.adam_beta2,
        adam_eps=ocfg.adam_eps,
        clip_grad=ocfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=pcfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(mo, handle.chunks)


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
