"""Check a parallel layout against a model's shapes, and estimate its memory, without building the model.

``validate_layout`` runs every divisibility rule that Megatron and vLLM would otherwise hit minutes into a
multi-node job (or silently work around): it needs only the config, the ``ArchSpec`` read from the
model's ``config.json`` and the world size. ``memory_per_gpu`` is the arithmetic behind the memory budgets
written in ``examples/configs/*.yaml``; it is an estimate from shapes, not a measurement. An ``arch`` argument is
always that spec, passed in: this module sits below models/ and never imports it (parameter counts come from
``arch.num_params``).

Device defaults: settings left null resolve here for the device a run is on, as pure functions of the config,
the model's shapes and the device's memory: ``resolve_micro_batch_tokens`` (``train.micro_batch_tokens``),
``check_micro_batch_memory`` (a one-line warning, or a ConfigError, before the first step when a micro-batch
cannot fit) and ``resolve_engine_settings`` (the CPU engine's KV cache size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config import ParallelConfig, SRFTConfig
from ..dtypes import DTYPES
from ..errors import ConfigError

GIB = 1024 ** 3


@dataclass(frozen=True)
class Fp8Recipe:
    """What one Transformer Engine FP8 recipe needs: the GPUs that run it, by CUDA compute capability, from
    ``min_capability`` up to (not including) ``below_capability``; and the token multiple of its GEMMs."""

    min_capability: tuple[int, int]
    below_capability: Optional[tuple[int, int]]
    token_multiple: int


#: ``model.fp8_recipe`` -> its needs. GPUs: Transformer Engine's support checks (check_fp8_support,
#: check_fp8_block_scaling_support, check_mxfp8_support): FP8 tensor cores arrived with Ada/Hopper (8.9);
#: 1x128 block scaling needs Hopper (9.0); MXFP8 needs Blackwell's microscaling tensor cores (10.x; TE refuses it
#: on 12.x). Token multiples: megatron-core 0.16.1's fp8_utils.get_fp8_align_size (32 for MXFP8's 1x32 scaling
#: blocks, 16 for the others).
FP8_RECIPES = {
    "delayed": Fp8Recipe((8, 9), None, 16),
    "tensorwise": Fp8Recipe((8, 9), None, 16),
    "blockwise": Fp8Recipe((9, 0), None, 16),
    "mxfp8": Fp8Recipe((10, 0), (12, 0), 32),
}


def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def te_available() -> bool:
    """Transformer Engine importable and a CUDA GPU present."""
    try:
        import torch  # lazy here and below: srft config / launch --dry-run validate layouts without torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine  # noqa: F401  (optional; importing it is the probe)

        return True
    except Exception:
        return False


def gpu_capability() -> Optional[tuple[int, int]]:
    """The CUDA compute capability of this process's GPU, or None without one."""
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def split_world(rollout_cfg, world_size: int) -> tuple[int, int]:
    """(training ranks, engine-only ranks) of a launched world of ``world_size`` ranks. Colocated: every rank trains
    (and generates): (world, 0). Disaggregated: the LAST ``rollout.num_engine_ranks`` ranks only generate, so a
    node's GPUs stay together in one role whenever the engine ranks fill whole nodes (docs/rollout.md)."""
    if rollout_cfg.placement == "colocated":
        return world_size, 0
    engines = rollout_cfg.num_engine_ranks
    _need(engines < world_size, "rollout.num_engine_ranks",
          f"{engines} leaves no training rank in a world of {world_size} (expected fewer than the world size)")
    return world_size - engines, engines


def is_engine_rank(rollout_cfg, rank: int, world_size: int) -> bool:
    """True on a disaggregated run's engine-only ranks (the last ``rollout.num_engine_ranks`` of the world)."""
    return rank >= split_world(rollout_cfg, world_size)[0]


def data_parallel_size(pcfg: ParallelConfig, world_size: int) -> int:
    """DP = world / (TP x PP x CP); a world size that the model-parallel size does not divide is an error."""
    mp = pcfg.tensor_model_parallel_size * pcfg.pipeline_model_parallel_size * pcfg.context_parallel_size
    _need(world_size >= 1, "world_size", f"expected >= 1, got {world_size}")
    if world_size % mp != 0:
        raise ConfigError(
            f"parallel: training world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({pcfg.tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pcfg.pipeline_model_parallel_size}) x context_parallel_size ({pcfg.context_parallel_size}) = {mp}")
    return world_size // mp


def token_pad_multiple(sequence_parallel: bool, tp: int, fp8_recipe: Optional[str]) -> int:
    """Every packed micro-batch (the empty one of a rank without data included) is padded to a multiple of this:
    TP under sequence parallelism (the sequence is split over the TP ranks), the recipe's token multiple under
    FP8 (:data:`FP8_RECIPES`; ``fp8_recipe`` None = FP8 off), their product with both (each rank's shard of the
    sequence goes through the FP8 GEMMs: Transformer Engine checks the per-rank token count before the
    all-gather). The loop packs with it; the Megatron adapter pads its empty micro-batch with it; `srft check`
    packs its steps with it."""
    fp8 = 1 if fp8_recipe is None else FP8_RECIPES[str(getattr(fp8_recipe, "value", fp8_recipe))].token_multiple
    return (tp if sequence_parallel else 1) * fp8


def config_token_pad_multiple(pcfg: ParallelConfig, model_cfg) -> int:
    """:func:`token_pad_multiple` for a run's ``parallel`` and ``model`` sections (FP8 off when ``model.fp8`` is
    null): what the training loop and `srft check` pack with."""
    return token_pad_multiple(pcfg.sequence_parallel, pcfg.tensor_model_parallel_size,
                              None if model_cfg.fp8 is None else model_cfg.fp8_recipe)


def fp8_recipes_supported(capability: Optional[tuple[int, int]]) -> tuple[str, ...]:
    """The FP8 recipes a GPU of this CUDA compute capability runs (:data:`FP8_RECIPES`); () without a GPU."""
    if capability is None:
        return ()
    cap = tuple(capability)
    return tuple(name for name, r in FP8_RECIPES.items()
                 if r.min_capability <= cap and (r.below_capability is None or cap < r.below_capability))


def fp8_unsupported_reason(recipe: str, capability: Optional[tuple[int, int]]) -> Optional[str]:
    """Why ``recipe`` cannot run on a GPU of this compute capability (None = no GPU); None when it can.
    The one rule behind :func:`check_fp8_recipe` (training refuses the config) and `srft check` (its FP8 step
    skips)."""
    if capability is None:
        return "FP8 needs a CUDA GPU with Transformer Engine"
    if recipe in fp8_recipes_supported(capability):
        return None
    r = FP8_RECIPES[recipe]
    cap = f"{capability[0]}.{capability[1]}"
    if not fp8_recipes_supported(capability):
        return f"a GPU of compute capability {cap} has no FP8 tensor cores (FP8 needs 8.9 or newer: Ada, Hopper)"
    others = ", ".join(fp8_recipes_supported(capability))
    need = f"{r.min_capability[0]}.{r.min_capability[1]} or newer" + (
        f", below {r.below_capability[0]}.{r.below_capability[1]}" if r.below_capability else "")
    return f"'{recipe}' needs a GPU of compute capability {need}; this GPU is {cap} (use {others})"


def check_fp8_recipe(recipe: str, capability: Optional[tuple[int, int]]) -> None:
    """``model.fp8_recipe`` must run on this GPU (``capability`` = CUDA compute capability, None = no GPU)."""
    reason = fp8_unsupported_reason(recipe, capability)
    if reason is not None:
        raise ConfigError(f"{'model.fp8' if capability is None else 'model.fp8_recipe'}: {reason}")


def check_model_split(arch, pcfg: ParallelConfig) -> None:
    """TP divides attention heads, KV heads and the FFN width; PP divides the layers (one model chunk per stage:
    config.py refuses virtual pipeline stages).

    The part of the layout that the model's shapes decide: the model builder checks it for every model it builds
    (conversion and scoring included), :func:`validate_layout` as part of a run's checks.
    """
    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    tp_path = "parallel.tensor_model_parallel_size"
    for count, name in ((arch.num_attention_heads, "num_attention_heads"),
                        (arch.num_query_groups, "num_key_value_heads"),
                        (arch.ffn_hidden_size, "intermediate_size")):
        _need(count % tp == 0, tp_path, f"{tp} does not divide the model's {name} ({count})")
    _need(arch.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
          f"pipeline stages ({pp}) do not divide the model's num_hidden_layers ({arch.num_layers})")


def check_vocab_padding(divisible_by: int, tp: int) -> None:
    """Embedding rows are padded to a multiple of ``model.make_vocab_size_divisible_by`` whatever the TP size (so
    checkpoints reshard), so it must be a multiple of TP. Run by :func:`validate_layout` and for every model built
    or converted (``ArchSpec.padded_vocab_size``)."""
    _need(divisible_by % tp == 0, "model.make_vocab_size_divisible_by",
          f"{divisible_by} is not a multiple of parallel.tensor_model_parallel_size ({tp})")


def check_rollout_split(arch, rollout_tp: int) -> None:
    """vLLM splits attention heads over its TP ranks, and KV heads too when TP <= KV heads; when TP is a multiple
    of the KV heads it replicates each KV head. Anything else it refuses at engine start."""
    path = "rollout.tensor_parallel_size"
    _need(arch.num_attention_heads % rollout_tp == 0, path,
          f"{rollout_tp} does not divide the model's num_attention_heads ({arch.num_attention_heads})")
    kv = arch.num_query_groups
    _need(kv % rollout_tp == 0 or rollout_tp % kv == 0, path,
          f"{rollout_tp} neither divides nor is a multiple of the model's num_key_value_heads ({kv})")


def validate_layout(cfg: SRFTConfig, world_size: int, arch=None) -> int:
    """Every rule of how ``cfg`` fits ``world_size`` ranks, this machine and (when given) the model ``arch``.

    The one home of the layout rules: `srft train` runs it once at start-up before anything is built, `srft
    launch --dry-run` and `srft config --world-size` run it without a GPU. Raises :class:`ConfigError` naming the
    field; returns the data-parallel size.

    World: split into training and engine-only ranks (:func:`split_world`); TP x PP x CP divides the training
    ranks; DP divides the prompts of a step and of a mini-batch; the rollout TP divides the ranks that generate
    (colocated: the world, every rank belongs to exactly one engine; disaggregated: the engine ranks). Machine:
    Transformer Engine / FP8 need TE and a GPU, and the FP8 recipe this GPU. Model: TP divides attention heads, KV
    heads and the FFN width, PP the layers; vLLM can split the heads over the rollout TP; sequence lengths fit the
    model's positions and one micro-batch. A rule about one section's own fields (sequence parallelism needs TP > 1,
    ...) is that section's ``validate`` in config.py, run by ``load_config``: not repeated here.
    """
    p, m, t, d, r = cfg.parallel, cfg.model, cfg.train, cfg.data, cfg.rollout
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    num_trainers, num_engine_ranks = split_world(r, world_size)
    dp = data_parallel_size(p, num_trainers)
    if arch is not None:
        check_model_split(arch, p)
    check_vocab_padding(m.make_vocab_size_divisible_by, tp)
    if m.fp8 is not None or m.transformer_impl == "transformer_engine":
        _need(te_available(), "model.fp8" if m.fp8 is not None else "model.transformer_impl",
              "needs Transformer Engine and a CUDA GPU, which this machine lacks")
    if m.fp8 is not None:
        check_fp8_recipe(m.fp8_recipe, gpu_capability())
    _need(t.prompts_per_step % dp == 0, "train.prompts_per_step",
          f"{t.prompts_per_step} is not divisible by the data-parallel size ({dp} = "
          f"{'training ranks' if num_engine_ranks else 'world'} {num_trainers} / "
          f"(TP {tp} x PP {pp} x CP {p.context_parallel_size}))")
    _need(t.prompts_per_minibatch % dp == 0, "train.prompts_per_minibatch",
          f"{t.prompts_per_minibatch} is not divisible by the data-parallel size ({dp})")
    rtp = r.tensor_parallel_size
    if r.placement == "colocated":
        _need(world_size % rtp == 0, "rollout.tensor_parallel_size",
              f"{rtp} does not divide the world size ({world_size}): every rank must belong to exactly one engine")
    else:
        _need(num_engine_ranks % rtp == 0, "rollout.tensor_parallel_size",
              f"{rtp} does not divide rollout.num_engine_ranks ({num_engine_ranks}): every engine rank must belong "
              "to exactly one engine")
    if arch is None:
        return dp
    check_rollout_split(arch, rtp)
    seq = d.max_prompt_length + d.max_response_length
    _need(seq <= arch.max_position_embeddings, "data.max_response_length",
          f"max_prompt_length + max_response_length = {seq} exceeds the model's max_position_embeddings "
          f"({arch.max_position_embeddings}); shorten them or raise max_position_embeddings (and rope_theta) "
          "in the model's config.json")
    if r.max_model_len is not None:
        _need(seq <= r.max_model_len <= arch.max_position_embeddings, "rollout.max_model_len",
              f"expected {seq} (prompt + response) <= max_model_len <= {arch.max_position_embeddings} "
              f"(max_position_embeddings), got {r.max_model_len}")
    if t.micro_batch_tokens is not None:  # null resolves to at least one full sequence
        _need(t.micro_batch_tokens >= seq, "train.micro_batch_tokens",
              f"{t.micro_batch_tokens} cannot hold one full sequence (max_prompt_length + max_response_length = "
              f"{seq})")
    return dp


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage; see :func:`memory_per_gpu` for the formulas."""

    params_per_gpu: int  # parameter count held by one GPU (not bytes)
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    vllm: int

    @property
    def training(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        names = ("weights", "grads", "optimizer", "activations", "logits", "vllm", "training")
        return {n: round(getattr(self, n) / GIB, 1) for n in names} | {"params_per_gpu_b": self.params_per_gpu / 1e9}


def memory_per_gpu(cfg: SRFTConfig, arch, world_size: int, gpu_memory_gib: float = 80.0) -> MemoryEstimate:
    """Estimate one GPU's memory for ``cfg`` (call :func:`validate_layout` first).

    - weights: P x bytes(params_dtype); grads: P x 4 (Megatron DDP reduces grads in fp32 here);
      optimizer: fp32 master copy (when params are not fp32) + Adam m and v = P x 12 (or 8), divided by DP
      with the distributed optimizer (Megatron-LM docs, "Distributed Optimizer": 6 + 12/d bytes per param
      for bf16 params with fp32 grads).
    - activations, full recompute: each layer keeps its input, T x h x 2 bytes (/TP with sequence
      parallelism), for the stage's layers and up to PP micro-batches in flight (1F1B); plus one layer
      recomputed at a time, ~34 x T x h bytes / TP (Korthikanti et al. 2022, flash attention so no a*s term).
      Without recompute every layer costs that 34 x T x h / TP. T = train.micro_batch_tokens.
      The 34 bytes are for 2-byte activations; fp32 doubles them.
    - logits: T x padded_vocab / TP x 4 bytes (fp32) on the last stage; an upper bound, chunking lowers it.
    - vllm: rollout.gpu_memory_utilization x GPU memory (vLLM's own budget while it is awake).

    T = train.micro_batch_tokens, or its GPU default (:func:`resolve_micro_batch_tokens`) when null.
    """
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp * p.context_parallel_size)
    padded = arch.padded_vocab_size(m.make_vocab_size_divisible_by, tp)
    n = arch.num_params(tp, pp, padded)
    pbytes = DTYPES[m.params_dtype].bytes
    opt_per_param = 12 if pbytes != 4 else 8
    opt = n * opt_per_param // (dp if p.use_distributed_optimizer else 1)
    tokens = resolve_micro_batch_tokens(cfg, arch, on_gpu=True)
    act, logits = _activation_bytes(cfg, arch, tokens), _logit_bytes(cfg, arch, tokens)
    vllm = int(cfg.rollout.gpu_memory_utilization * gpu_memory_gib * GIB)
    return MemoryEstimate(params_per_gpu=n, weights=n * pbytes, grads=n * 4, optimizer=opt, activations=act,
                          logits=logits, vllm=vllm)


def _activation_bytes(cfg: SRFTConfig, arch, tokens: int) -> int:
    """Activations kept for backward on the most loaded stage (formulas in :func:`memory_per_gpu`)."""
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    pbytes = DTYPES[m.params_dtype].bytes
    h, layers = arch.hidden_size, arch.num_layers // pp
    act_layer = 34 * tokens * h * pbytes // 2 // tp
    if m.recompute_granularity == "full":
        kept = tokens * h * pbytes // (tp if p.sequence_parallel else 1)
        return kept * layers * pp + act_layer
    return act_layer * layers * pp


def _logit_bytes(cfg: SRFTConfig, arch, tokens: int) -> int:
    tp = cfg.parallel.tensor_model_parallel_size
    return tokens * arch.padded_vocab_size(cfg.model.make_vocab_size_divisible_by, tp) // tp * 4


# --------------------------------------------------------------------------------------------- device defaults

#: ``train.micro_batch_tokens`` when left null, before the memory check shrinks it. GPU: packed rows go to the
#: attention kernels in THD format, so memory grows linearly with the budget. CPU: the largest budget that was
#: faster on the toy (benchmarks/bench_step.py; larger rows amortise the per-micro-batch costs).
DEFAULT_MICRO_BATCH_TOKENS = {"gpu": 16384, "cpu": 8192}
#: A resolved budget keeps the micro-batch estimate within this share of the memory left after the model
#: states (and, on CPU, the colocated engine): the estimate is from shapes, and the CPU local spec was measured
#: at about twice it (docs/benchmarks.md).
MICRO_BATCH_MEMORY_SHARE = 0.25
#: :func:`check_micro_batch_memory` warns above this share of the device memory.
WARN_MEMORY_SHARE = 0.85


@dataclass
class MicroBatchMemory:
    """Bytes one micro-batch of ``tokens`` adds on one rank; see :func:`micro_batch_memory`."""

    tokens: int
    activations: int
    logits: int
    attention: int

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.attention


def micro_batch_memory(cfg: SRFTConfig, arch, tokens: int) -> MicroBatchMemory:
    """What a micro-batch of ``tokens`` packed tokens costs on the most loaded rank, from shapes.

    activations and logits: :func:`memory_per_gpu`'s formulas at T = ``tokens``. attention: packed rows are
    attended per sequence (THD: Transformer Engine, or models/local_spec.py), so no [T, T] scores exist. Without
    attention dropout the kernels are flash kernels (TE; torch SDPA on CPU and GPU), which never materialise the
    scores: 0. With dropout torch SDPA falls back to its math kernel, which holds one sequence's scores at a time
    (the local spec attends segment by segment): heads / TP x L^2 x 4 bytes, L = min(T, max_prompt_length +
    max_response_length).
    """
    tp = cfg.parallel.tensor_model_parallel_size
    longest = min(tokens, cfg.data.max_prompt_length + cfg.data.max_response_length)
    attention = 0 if cfg.model.attention_dropout == 0 else arch.num_attention_heads // tp * longest * longest * 4
    return MicroBatchMemory(tokens=tokens, activations=_activation_bytes(cfg, arch, tokens),
                            logits=_logit_bytes(cfg, arch, tokens), attention=attention)


def model_state_bytes(cfg: SRFTConfig, arch, world_size: int) -> int:
    """Weights + grads + optimizer state on the most loaded rank (:func:`memory_per_gpu`'s formulas)."""
    est = memory_per_gpu(cfg, arch, world_size)
    return est.weights + est.grads + est.optimizer


def engine_bytes(cfg: SRFTConfig, arch, on_gpu: bool, world_size: int = 1, *, memory_bytes: int) -> int:
    """Memory the colocated rollout engine holds next to training on one rank (``memory_bytes``: this rank's
    device memory). GPU: at ``rollout.sleep_level`` 0 vLLM stays resident with its whole budget,
    ``rollout.gpu_memory_utilization`` x ``memory_bytes`` (weights, KV cache, activations); at 1 and 2 it sleeps
    during training (weights offloaded to host or dropped, KV cache freed): 0. CPU: its own copy of the weights
    plus its KV cache (:func:`engine_kv_cache_bytes`). Disaggregated: 0, the engines have ranks of their own."""
    if cfg.rollout.placement == "disaggregated":
        return 0
    if on_gpu:
        return 0 if cfg.rollout.sleep_level > 0 else int(cfg.rollout.gpu_memory_utilization * memory_bytes)
    tp = cfg.rollout.tensor_parallel_size
    padded = arch.padded_vocab_size(1, 1)
    weights = arch.num_params(tp, 1, padded) * _rollout_dtype_bytes(cfg, on_gpu)
    return weights + (engine_kv_cache_bytes(cfg, arch, on_gpu, world_size) or 0)


def device_memory_bytes(on_gpu: bool, ranks_per_node: int = 1) -> int:
    """This rank's share of the device memory: the GPU's total, or the host's physical memory / ranks per node.
    (Reads the machine; the resolvers below take its result as an argument.)"""
    if on_gpu:
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // max(1, ranks_per_node)


def _free_for_micro_batch(cfg: SRFTConfig, arch, on_gpu: bool, memory_bytes: int, world_size: int) -> int:
    return (memory_bytes - model_state_bytes(cfg, arch, world_size)
            - engine_bytes(cfg, arch, on_gpu, world_size, memory_bytes=memory_bytes))


def resolve_micro_batch_tokens(cfg: SRFTConfig, arch, on_gpu: bool, memory_bytes: Optional[int] = None,
                               world_size: int = 1) -> int:
    """``train.micro_batch_tokens``, with null resolved for the device.

    A set value is returned as is (:func:`check_micro_batch_memory` judges it). Null: the device's default
    (:data:`DEFAULT_MICRO_BATCH_TOKENS`), at least one full sequence (max_prompt_length + max_response_length);
    with ``memory_bytes`` (this rank's device memory, e.g. :func:`device_memory_bytes`) halved while the
    micro-batch estimate (:func:`micro_batch_memory`) exceeds :data:`MICRO_BATCH_MEMORY_SHARE` of the memory left
    after the model states and the colocated engine, never below one full sequence.
    """
    if cfg.train.micro_batch_tokens is not None:
        return int(cfg.train.micro_batch_tokens)
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    tokens = max(DEFAULT_MICRO_BATCH_TOKENS["gpu" if on_gpu else "cpu"], longest)
    if memory_bytes is None:
        return tokens
    room = MICRO_BATCH_MEMORY_SHARE * _free_for_micro_batch(cfg, arch, on_gpu, memory_bytes, world_size)
    while tokens > longest and micro_batch_memory(cfg, arch, tokens).total > room:
        tokens = max(longest, tokens // 2)
    return tokens


def check_micro_batch_memory(cfg: SRFTConfig, arch, tokens: int, on_gpu: bool, memory_bytes: int,
                             world_size: int = 1) -> Optional[str]:
    """Before the first step: does a micro-batch of ``tokens`` fit next to the model states and the engine?

    Raises :class:`ConfigError` (one line naming ``train.micro_batch_tokens``) when the estimate exceeds
    ``memory_bytes``; returns a one-line warning when it exceeds :data:`WARN_MEMORY_SHARE` of it; else None.
    """
    mb = micro_batch_memory(cfg, arch, tokens)
    states = model_state_bytes(cfg, arch, world_size)
    engine = engine_bytes(cfg, arch, on_gpu, world_size, memory_bytes=memory_bytes)
    total = states + engine + mb.total
    where = "GPU" if on_gpu else "host memory per rank"
    parts = (f"micro-batch {mb.total / GIB:.1f} GiB (activations {mb.activations / GIB:.1f}, logits "
             f"{mb.logits / GIB:.1f}, attention {mb.attention / GIB:.1f}) + model states {states / GIB:.1f} GiB"
             + (f" + engine {engine / GIB:.1f} GiB" if engine else ""))
    if total > memory_bytes:
        hint = "leave it null to resolve one that fits" if cfg.train.micro_batch_tokens is not None else \
            "the model alone does not leave room for one full sequence; use more ranks (TP/PP) or recompute"
        raise ConfigError(f"train.micro_batch_tokens: {tokens} tokens need about {total / GIB:.1f} GiB ({parts}), "
                          f"more than the {memory_bytes / GIB:.1f} GiB of {where}; {hint}")
    if total > WARN_MEMORY_SHARE * memory_bytes:
        return (f"train.micro_batch_tokens: {tokens} tokens need about {total / GIB:.1f} GiB ({parts}), "
                f"{total / memory_bytes:.0%} of the {memory_bytes / GIB:.1f} GiB of {where}")
    return None


#: vLLM's CPU KV cache is allocated (and zeroed) whole at start-up, so its size is resident memory.
_MIN_CPU_KV_CACHE_BYTES = 64 * 1024 ** 2
_KV_CACHE_HEADROOM = 1.25
#: vLLM's CPU default max_num_seqs: more sequences than this never share the cache at once.
_CPU_MAX_NUM_SEQS = 256


def _rollout_dtype_bytes(cfg: SRFTConfig, on_gpu: bool) -> int:
    dtype = cfg.rollout.dtype
    if dtype == "auto":
        dtype = cfg.model.params_dtype if on_gpu else "fp32"
    return DTYPES[dtype].bytes


def kv_cache_bytes_per_token(arch, dtype_bytes: int, rollout_tp: int = 1) -> int:
    """K and V of every layer for one token on one engine rank: 2 x layers x kv_heads / TP x head_dim x bytes
    (vLLM replicates KV heads when TP exceeds them)."""
    kv_heads = max(1, arch.num_query_groups // rollout_tp)
    return 2 * arch.num_layers * kv_heads * arch.head_dim * dtype_bytes


def rollout_sequences_per_engine(cfg: SRFTConfig, world_size: int) -> int:
    """Sequences one engine generates at once in a training step (an upper bound), capped at vLLM's CPU
    max_num_seqs (256): colocated, the replica's prompts (prompts_per_step / DP) x num_rollouts_per_prompt;
    disaggregated (``world_size`` = the engine ranks), the step's prompts over its engines, rounded up."""
    if cfg.rollout.placement == "disaggregated":
        prompts = -(-cfg.train.prompts_per_step // max(1, world_size // cfg.rollout.tensor_parallel_size))
    else:
        dp = data_parallel_size(cfg.parallel, world_size) if world_size else 1
        prompts = cfg.train.prompts_per_step // max(1, dp)
    seqs = max(1, prompts) * max(1, cfg.rollout.num_rollouts_per_prompt)
    return min(_CPU_MAX_NUM_SEQS, seqs)


def cpu_kv_cache_bytes(num_seqs: int, max_model_len: int, bytes_per_token: int) -> int:
    """The CPU engine's KV cache when ``rollout.cpu_kvcache_space_gib`` is null: ``num_seqs`` sequences of
    ``max_model_len`` tokens at once, x1.25, rounded up to MiB, at least 64 MiB. (vLLM's 1 GiB default cost the toy
    1.2 GB of resident memory and 1.5 s per engine start for a cache it never filled; docs/benchmarks.md.)"""
    need = int(num_seqs * max_model_len * bytes_per_token * _KV_CACHE_HEADROOM)
    mib = 1024 ** 2
    return max(_MIN_CPU_KV_CACHE_BYTES, -(-need // mib) * mib)


def resolve_cpu_kv_cache_bytes(rollout_cfg, arch, dtype_bytes: int, max_model_len: int,
                               num_seqs: int) -> int:
    """One CPU engine rank's KV cache: ``rollout.cpu_kvcache_space_gib`` when set, else :func:`cpu_kv_cache_bytes`
    for ``num_seqs`` sequences at once (capped at vLLM's CPU max_num_seqs)."""
    if rollout_cfg.cpu_kvcache_space_gib is not None:
        return int(rollout_cfg.cpu_kvcache_space_gib * GIB)
    per_token = kv_cache_bytes_per_token(arch, dtype_bytes, rollout_cfg.tensor_parallel_size)
    return cpu_kv_cache_bytes(min(_CPU_MAX_NUM_SEQS, max(1, int(num_seqs))), max_model_len, per_token)


def engine_kv_cache_bytes(cfg: SRFTConfig, arch, on_gpu: bool, world_size: int = 1) -> Optional[int]:
    """The KV cache one engine rank allocates in a training run: None on GPU (vLLM sizes it from
    ``rollout.gpu_memory_utilization``); on CPU ``rollout.cpu_kvcache_space_gib`` when set, else
    :func:`cpu_kv_cache_bytes` for one step's rollouts (:func:`rollout_sequences_per_engine`)."""
    if on_gpu:
        return None
    r = cfg.rollout
    max_len = r.max_model_len or (cfg.data.max_prompt_length + cfg.data.max_response_length)
    return resolve_cpu_kv_cache_bytes(r, arch, _rollout_dtype_bytes(cfg, on_gpu), max_len,
                                      rollout_sequences_per_engine(cfg, world_size))
