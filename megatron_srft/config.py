"""The one typed config tree.

Every setting of a run lives in a dataclass below. YAML maps 1:1 onto the tree; an unknown key is an error
naming the key, the file and the closest valid key; a value of the wrong type or an impossible combination
is an error naming the field's dotted path. ``docs/config.md`` is generated from these dataclasses
(``python -m megatron_srft.config --markdown``), so it cannot drift.

Validation sits next to the fields: each section's ``validate(path)`` checks its own fields;
:meth:`SRFTConfig.validate` checks the combinations across sections.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from .errors import ConfigError
from .typed_yaml import (Table, check_tables, merge, parse_override, type_hints, type_name, yaml_load)


def _f(default: Any, help: str, **kw):
    """A field with a help string; mutable defaults go through default_factory."""
    if isinstance(default, (list, dict)):
        val = default
        return field(default_factory=lambda: type(val)(val), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _table(ref: str):
    """``Annotated[str, Table(ref)]``: a string that must name an entry of the table ``ref``."""
    return Annotated[str, Table(ref)]


Preset = _table("megatron_srft.algorithms.presets:PRESETS")
Reward = _table("megatron_srft.rewards:REWARDS")
Template = _table("megatron_srft.data.templates:TEMPLATES")
Engine = _table("megatron_srft.rollout.base:ENGINES")
SftWeight = _table("megatron_srft.algorithms.losses:SFT_WEIGHTS")
RlPosWeight = _table("megatron_srft.algorithms.losses:RL_POS_WEIGHTS")
EntropyGranularity = _table("megatron_srft.algorithms.losses:WEIGHT_ENTROPIES")
DemoRatio = _table("megatron_srft.algorithms.losses:DEMO_RATIOS")
Aggregation = _table("megatron_srft.algorithms.losses:AGGREGATIONS")
SftAggregation = _table("megatron_srft.algorithms.losses:SFT_AGGREGATIONS")
MixSchedule = _table("megatron_srft.algorithms.presets:MIX_SCHEDULES")
ResumeMode = _table("megatron_srft.checkpoint.run_dir:RESUME_MODES")


def _sub(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


#: Upper bounds for sizes and counts: far beyond any real run, low enough that a typo (an extra few zeros) is an
#: error instead of a hang or an allocation that never finishes.
MAX_STEPS = 10_000_000
MAX_PROMPTS = 1_000_000
MAX_TOKENS = 100_000_000
MAX_SEED = 2**63 - 1
MAX_TIMEOUT_S = 86_400.0  # one day
#: rollout.tis_cap when it is null and batches may be stale (max_staleness > 0): C = 2, the cap of the truncated
#: importance-sampling write-up that introduced TIS for engine/trainer mismatch (Yao et al., "Your efficient RL
#: framework secretly brings you off-policy RL training", 2025), and the threshold of verl's rollout-correction
#: examples.
ASYNC_TIS_CAP = 2.0


def _finite(obj, path: str) -> None:
    """Every float field of a section is finite (NaN and inf are never a meaningful setting)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{path}.{f.name}: expected a finite number, got {v}")


def _in(value, lo, hi, path: str, what: str = "") -> None:
    _need(lo <= value <= hi, path, f"expected {what or f'{lo} <= value <= {hi}'}, got {value}")


# --------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = _f("", "HF model directory, or a converted Megatron checkpoint directory (from `srft convert`).")
    params_dtype: Literal["fp32", "bf16", "fp16"] = _f(
        "bf16", "Dtype of the model's compute/params. Master weights and grads stay fp32 in the optimizer."
    )
    transformer_impl: Literal["auto", "local", "transformer_engine"] = _f(
        "auto", "Layer spec: `auto` = Transformer Engine when importable and CUDA present, else Megatron's local spec."
    )
    fp8: Optional[Literal["e4m3", "hybrid"]] = _f(None, "FP8 format through Transformer Engine (GPU only); null = off.")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = _f(
        "delayed", "Transformer Engine FP8 scaling recipe."
    )
    fp8_param: bool = _f(False, "Keep parameters in FP8 (TE fp8 params); needs `fp8`.")
    recompute_granularity: Optional[Literal["full", "selective"]] = _f(None, "Activation recompute; null = off.")
    recompute_method: Optional[Literal["uniform", "block"]] = _f(None, "How full recompute splits layers.")
    recompute_num_layers: Optional[int] = _f(None, "Layers per recompute chunk (full recompute).")
    make_vocab_size_divisible_by: int = _f(
        128, "Embedding rows are padded to a multiple of this (independent of TP, so checkpoints reshard); "
        "must be a multiple of the TP size."
    )
    attention_dropout: float = _f(0.0, "Attention dropout (0 for RL: log-probs must be deterministic).")
    hidden_dropout: float = _f(0.0, "Hidden dropout (0 for RL).")

    def validate(self, path: str) -> None:
        _need(self.make_vocab_size_divisible_by >= 1, f"{path}.make_vocab_size_divisible_by", "expected >= 1")
        _need(not self.fp8_param or self.fp8 is not None, f"{path}.fp8_param", "needs model.fp8 to be set")
        _need(0.0 <= self.attention_dropout < 1.0, f"{path}.attention_dropout", "expected 0 <= p < 1")
        _need(0.0 <= self.hidden_dropout < 1.0, f"{path}.hidden_dropout", "expected 0 <= p < 1")
        if self.recompute_granularity == "full":
            _need(self.recompute_method is not None, f"{path}.recompute_method", "full recompute needs a method")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "TP size (heads, FFN and vocab are split across these ranks).")
    pipeline_model_parallel_size: int = _f(1, "PP size (layers are split across these stages).")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(
        None, "Interleaved PP chunks per stage (reserved: must be null or 1 in this release, one chunk per stage).")
    context_parallel_size: int = _f(1, "CP size for long sequences (reserved: must be 1 in this release).")
    expert_model_parallel_size: int = _f(1, "EP size for MoE (reserved: must be 1 in this release).")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs TP > 1).")
    use_distributed_optimizer: bool = _f(True, "Shard optimizer state across DP ranks (ZeRO-1).")
    overlap_grad_reduce: bool = _f(False, "Overlap DP grad reduce-scatter with backward (GPU).")
    overlap_param_gather: bool = _f(False, "Overlap DP param all-gather with forward (GPU, distributed optimizer).")
    backend: Literal["auto", "nccl", "gloo"] = _f("auto", "torch.distributed backend: auto = nccl on GPU, gloo on CPU.")
    timeout_minutes: int = _f(30, "Collective timeout.")

    def validate(self, path: str) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            _need(getattr(self, name) >= 1, f"{path}.{name}", f"expected an integer >= 1, got {getattr(self, name)}")
        _need(self.context_parallel_size == 1, f"{path}.context_parallel_size", "only 1 is supported in this release")
        _need(self.expert_model_parallel_size == 1, f"{path}.expert_model_parallel_size",
              "only 1 is supported in this release")
        _need(not self.sequence_parallel or self.tensor_model_parallel_size > 1, f"{path}.sequence_parallel",
              "needs tensor_model_parallel_size > 1")
        _need(not self.overlap_param_gather or self.use_distributed_optimizer, f"{path}.overlap_param_gather",
              "needs use_distributed_optimizer")
        _need(self.virtual_pipeline_model_parallel_size in (None, 1), f"{path}.virtual_pipeline_model_parallel_size",
              f"only null or 1 is supported in this release (the model builder makes one chunk per pipeline "
              f"stage), got {self.virtual_pipeline_model_parallel_size}")



@dataclass
class OptimizerConfig:
    name: Literal["adam", "sgd"] = _f("adam", "Optimizer (Megatron's, with fp32 master weights).")
    lr: float = _f(1e-6, "Peak learning rate (paper: 1e-6 constant).")
    min_lr: float = _f(0.0, "Final LR for decaying schedules.")
    lr_schedule: Literal["constant", "cosine", "linear"] = _f("constant", "LR decay style after warm-up.")
    warmup_steps: int = _f(0, "Linear warm-up optimizer steps.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Global grad-norm clip (paper: 1.0); 0 = off.")

    def validate(self, path: str) -> None:
        _finite(self, path)
        _need(self.lr > 0, f"{path}.lr", f"expected > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, f"{path}.min_lr", "expected 0 <= min_lr <= lr")
        _in(self.warmup_steps, 0, MAX_STEPS, f"{path}.warmup_steps")
        _need(0 <= self.adam_beta1 < 1, f"{path}.adam_beta1", f"expected in [0, 1), got {self.adam_beta1}")
        _need(0 <= self.adam_beta2 < 1, f"{path}.adam_beta2", f"expected in [0, 1), got {self.adam_beta2}")
        _need(self.adam_eps > 0, f"{path}.adam_eps", f"expected > 0, got {self.adam_eps}")
        _need(self.weight_decay >= 0, f"{path}.weight_decay", f"expected >= 0, got {self.weight_decay}")
        _need(self.clip_grad >= 0, f"{path}.clip_grad", "expected >= 0")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "Training data: .jsonl or .parquet (our layout or verl/LUFFY's).")
    eval_files: list[str] = _f([], "Held-out evaluation files (same layouts).")
    template: Template = _f(
        "paper", "Prompt template: tokenizer chat template as is, the paper's <think> system prompt, "
        "'reason step by step, answer in \\boxed{}', or the raw prompt string."
    )
    max_prompt_length: int = _f(1024, "Prompts longer than this (tokens) are filtered out.")
    max_response_length: int = _f(8192, "Max rollout tokens; demos longer than this are filtered out.")
    shuffle: bool = _f(True, "Shuffle prompts each epoch (seeded).")
    seed: int = _f(1, "Data order seed.")

    def validate(self, path: str) -> None:
        _in(self.max_prompt_length, 1, MAX_TOKENS, f"{path}.max_prompt_length")
        _in(self.max_response_length, 1, MAX_TOKENS, f"{path}.max_response_length")
        _in(self.seed, 0, MAX_SEED, f"{path}.seed")


@dataclass
class RolloutConfig:
    engine: Engine = _f("vllm", "Rollout engine.")
    num_rollouts_per_prompt: int = _f(7, "G: on-policy samples per prompt (code: 7 + 1 demo = 8 per group).")
    temperature: float = _f(1.0, "Sampling temperature (paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_tokens: Optional[int] = _f(None, "Max new tokens; null = data.max_response_length.")
    stop: list[str] = _f([], "Stop strings: a response ends with the token that completes one (its token ids are "
                             "cut there; e.g. '</answer>'). Besides the model's EOS.")
    seed: int = _f(0, "Sampling seed.")
    placement: Literal["colocated", "disaggregated"] = _f(
        "colocated", "Where engines run (docs/rollout.md): colocated = every rank generates, then trains; "
        "disaggregated = the last num_engine_ranks ranks only generate, the others only train.")
    num_engine_ranks: int = _f(
        0, "disaggregated: ranks (GPUs) that run vLLM engines only, the last ones of the world; the others train. "
        "0 with colocated.")
    max_staleness: int = _f(
        0, "k: the batch trained at step n was sampled by a policy at most k optimizer steps older. 0 = on-policy; "
        "1 = one-step-off (disaggregated only): the engines sample step n + 1 while step n trains.")
    tensor_parallel_size: int = _f(
        1, "Ranks per vLLM engine (rollout TP). Colocated: every rank belongs to one engine, engines = world / "
        "this; disaggregated: engines = num_engine_ranks / this (docs/rollout.md). Must fit the model's heads.")
    gpu_memory_utilization: float = _f(0.5, "vLLM memory fraction (GPU).")
    cpu_kvcache_space_gib: Optional[float] = _f(
        None, "vLLM KV cache on CPU, GiB (allocated whole at engine start); null = sized to one step's rollouts "
        "(x1.25, at least 64 MiB; distributed/layout.py).")
    max_model_len: Optional[int] = _f(None, "vLLM max model length; null = prompt + response lengths.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "vLLM dtype; auto = model.params_dtype (fp32 on CPU).")
    enforce_eager: bool = _f(False, "Disable CUDA graphs in vLLM.")
    sleep_level: Literal[0, 1, 2] = _f(
        2, "GPU memory between generations: 0 = vLLM stays resident; 1 = weights offloaded to host, KV cache "
        "freed; 2 = both freed (the trainer re-syncs the weights before every generation, so nothing is copied "
        "back). No-op on CPU.")
    sync_bucket_mb: int = _f(512, "Weight-sync bucket size in MiB (peak extra memory during sync).")
    tis_cap: Optional[float] = _f(
        None, "Truncated importance-sampling cap C on pi_old / pi_engine (engine/trainer mismatch, and staleness); "
        "null = off when max_staleness is 0, else 2.0 (ASYNC_TIS_CAP).")

    def validate(self, path: str) -> None:
        _need(self.num_rollouts_per_prompt >= 0, f"{path}.num_rollouts_per_prompt", "expected >= 0")
        _need(self.temperature >= 0, f"{path}.temperature", "expected >= 0")
        _need(0 < self.top_p <= 1, f"{path}.top_p", "expected 0 < top_p <= 1")
        _need(self.tensor_parallel_size >= 1, f"{path}.tensor_parallel_size", "expected >= 1")
        _need(self.seed >= 0, f"{path}.seed", "expected >= 0")
        _need(0 < self.gpu_memory_utilization <= 1, f"{path}.gpu_memory_utilization", "expected in (0, 1]")
        _need(self.sync_bucket_mb >= 1, f"{path}.sync_bucket_mb", "expected >= 1")
        _need(self.tis_cap is None or self.tis_cap >= 1, f"{path}.tis_cap", "expected >= 1 or null")
        _need(self.cpu_kvcache_space_gib is None or 0 < self.cpu_kvcache_space_gib <= 4096,
              f"{path}.cpu_kvcache_space_gib", "expected 0 < GiB <= 4096 or null")
        _need(self.num_engine_ranks >= 0, f"{path}.num_engine_ranks", "expected >= 0")
        _need(self.max_staleness in (0, 1), f"{path}.max_staleness",
              f"expected 0 or 1 (the engines run at most one step ahead), got {self.max_staleness}")
        if self.placement == "colocated":
            _need(self.num_engine_ranks == 0, f"{path}.num_engine_ranks",
                  "expected 0 with placement colocated (every rank runs an engine); set placement: disaggregated")
            _need(self.max_staleness == 0, f"{path}.max_staleness",
                  "expected 0 with placement colocated (its engines share the trainers' devices and cannot generate "
                  "while they train); set placement: disaggregated")
        else:
            _need(self.num_engine_ranks >= 1, f"{path}.num_engine_ranks",
                  "expected >= 1 with placement disaggregated")

    @property
    def effective_tis_cap(self) -> Optional[float]:
        """tis_cap, or ASYNC_TIS_CAP when it is null and the batches may be stale (max_staleness > 0)."""
        if self.tis_cap is None and self.max_staleness > 0:
            return ASYNC_TIS_CAP
        return self.tis_cap


@dataclass
class AlgorithmConfig:
    """SRFT and its baselines. A preset only sets defaults: every null field takes the preset's value."""

    preset: Preset = _f(
        "srft", "Algorithm preset (docs/algorithms.md): srft = the paper's equations, srft_code = released code, "
        "luffy = LUFFY's released run; srft_w_sft_1 / srft_w_rl_1 = the paper's ablations; chord_mu / chord_phi, "
        "hpt, dft = those methods' released code."
    )
    num_demos_per_prompt: Optional[int] = _f(None, "D: demonstrations joining each group.")
    sft_coef: Optional[float] = _f(None, "Coefficient of the SFT weight (paper 0.5).")
    sft_weight: Optional[SftWeight] = _f(
        None, "w_SFT form: 0.5*sg(exp(-H)) (paper), exp(+H) (code), 1 (plain SFT), 0 (off)."
    )
    sft_weight_max: Optional[float] = _f(None, "Clamp of w_SFT (the exp(+H) form is unbounded).")
    rl_pos_coef: Optional[float] = _f(None, "Coefficient of w_RL on positive rollouts (paper 0.1).")
    rl_pos_weight: Optional[RlPosWeight] = _f(None, "w_RL form on positive rollouts.")
    entropy_granularity: Optional[EntropyGranularity] = _f(None, "H per token or batch-mean H.")
    std_normalize: Optional[bool] = _f(None, "Divide group advantages by the group std (paper yes, code no).")
    adv_eps: float = _f(1e-6, "eps in A = (r - mean) / (std + eps).")
    demo_ratio: Optional[DemoRatio] = _f(
        None, "Off-policy demo term f(pi): p (paper), p/(p+gamma) (code, LUFFY), off."
    )
    demo_gamma: float = _f(0.1, "gamma in p/(p+gamma).")
    clip: Optional[bool] = _f(None, "PPO clip on the on-policy ratio.")
    clip_eps: float = _f(0.2, "PPO clip epsilon.")
    aggregation: Optional[Aggregation] = _f(
        None, "Loss aggregation: GRPO seq-mean-token-mean (paper), verl token-mean, sum / constant (code)."
    )
    aggregation_constant: Optional[float] = _f(
        None, "C of token_sum_norm (token sum / C, mean over sequences): 8192 = the released code per sequence; "
        "luffy's 128 = LUFFY's run (docs/algorithms.md)."
    )
    entropy_bonus: Optional[float] = _f(
        None, "Entropy bonus: minus this times the mini-batch token-mean of H (code and LUFFY 0.001, paper 0)."
    )
    sft_aggregation: Optional[SftAggregation] = _f(
        None, "Aggregation of the demo tokens' terms: as_rollouts = the same as `aggregation`; demo_token_mean = "
        "a token mean over the demo rows alone (CHORD, HPT)."
    )
    sft_mix_schedule: Optional[MixSchedule] = _f(
        None, "mu(step) of L = (1 - mu) RL + mu SFT: none = no mix; warmup_cosine = CHORD's (0 -> mu_peak over "
        "mu_warmup_steps, cosine to mu_valley over mu_decay_steps, then mu_valley)."
    )
    mu_warmup_steps: Optional[int] = _f(None, "warmup_cosine: steps of the linear warm-up of mu (CHORD 0).")
    mu_decay_steps: Optional[int] = _f(None, "warmup_cosine: steps of the cosine decay of mu (chord_mu 200).")
    mu_peak: Optional[float] = _f(None, "warmup_cosine: mu after the warm-up (chord_mu 0.9, chord_phi 0.1).")
    mu_valley: Optional[float] = _f(None, "warmup_cosine: mu after the decay (chord_mu 0.05, chord_phi 0.1).")
    expert_prompt_fraction: Optional[float] = _f(
        None, "Share of each step's prompts (per DP replica, rounded) that are expert rows: no rollouts, trained "
        "on their demonstration alone; the others on their rollouts alone (CHORD 2/3: Trinity-RFT's 20% of rows)."
    )
    sft_gate_max_correct: Optional[int] = _f(
        None, "HPT's gate: a prompt with at most this many correct rollouts drops them and is trained on its "
        "demonstration alone, the others on their rollouts alone; -1 = off (HPT 0; 2 for Llama-3.1-8B)."
    )

    def validate(self, path: str) -> None:
        _finite(self, path)
        _need(self.num_demos_per_prompt is None or 0 <= self.num_demos_per_prompt <= 1024,
              f"{path}.num_demos_per_prompt", "expected 0 <= value <= 1024")
        _need(self.adv_eps > 0, f"{path}.adv_eps", "expected > 0")
        _need(self.demo_gamma > 0, f"{path}.demo_gamma", "expected > 0")
        _need(0 < self.clip_eps < 1, f"{path}.clip_eps", "expected 0 < eps < 1")
        _need(self.aggregation_constant is None or self.aggregation_constant > 0, f"{path}.aggregation_constant",
              "expected > 0")
        _need(self.sft_coef is None or self.sft_coef >= 0, f"{path}.sft_coef", "expected >= 0")
        _need(self.rl_pos_coef is None or self.rl_pos_coef >= 0, f"{path}.rl_pos_coef", "expected >= 0")
        _need(self.sft_weight_max is None or self.sft_weight_max > 0, f"{path}.sft_weight_max", "expected > 0")
        _need(self.entropy_bonus is None or self.entropy_bonus >= 0, f"{path}.entropy_bonus", "expected >= 0")
        for name in ("mu_warmup_steps", "mu_decay_steps"):
            value = getattr(self, name)
            _need(value is None or 0 <= value <= MAX_STEPS, f"{path}.{name}", f"expected 0 <= steps <= {MAX_STEPS}")
        for name in ("mu_peak", "mu_valley"):
            value = getattr(self, name)
            _need(value is None or 0 <= value <= 1, f"{path}.{name}", "expected 0 <= mu <= 1")
        _need(self.expert_prompt_fraction is None or 0 <= self.expert_prompt_fraction < 1,
              f"{path}.expert_prompt_fraction", "expected 0 <= fraction < 1")
        _need(self.sft_gate_max_correct is None or -1 <= self.sft_gate_max_correct <= MAX_PROMPTS,
              f"{path}.sft_gate_max_correct", "expected -1 (off) or a count >= 0")


@dataclass
class TrainConfig:
    num_steps: int = _f(500, "Rollout steps (paper: 500).")
    prompts_per_step: int = _f(128, "Prompts sampled per rollout step, across all DP ranks (paper: 128).")
    prompts_per_minibatch: int = _f(64, "Prompts per optimizer step (paper 64: 2 optimizer steps per rollout step).")
    micro_batch_tokens: Optional[int] = _f(
        None, "Token budget of one packed micro-batch per rank; null = resolved for the device (GPU 16384, CPU "
        "8192, halved while a micro-batch would not fit in memory; distributed/layout.py)."
    )
    sequence_packing: bool = _f(True, "Pack sequences into micro-batches (else pad, one sequence per row).")
    old_logprobs: Literal["recompute", "engine"] = _f(
        "recompute", "pi_old of the PPO ratio: `recompute` = the trainer's log-probs before the step's first update "
        "(free for the first mini-batch: its own forward; one forward-only pass for the others); `engine` = the "
        "rollout engine's log-probs (no pass at all; the ratio pi_theta / pi_engine corrects for the engine/trainer "
        "mismatch and the PPO clip truncates it, verl's bypass mode).")
    reward: Reward = _f("math", "Reward function (megatron_srft/rewards).")
    reward_timeout_s: float = _f(10.0, "Per-sample verifier timeout; a timeout scores 0.")
    reward_workers: int = _f(2, "Verifier worker processes on each rollout engine's leader rank.")
    max_consecutive_skips: int = _f(
        3, "Stop the run (one-line error naming the step) after this many consecutive steps whose update was "
        "skipped for a non-finite loss or gradient.")
    eval_every: int = _f(0, "Evaluate every N steps (0 = only at the end).")
    eval_n_samples: int = _f(1, "Samples per eval prompt (avg@k / pass@k).")
    eval_temperature: float = _f(0.0, "Eval sampling temperature.")
    seed: int = _f(1234, "Model init / dropout seed.")

    def validate(self, path: str) -> None:
        _finite(self, path)
        _in(self.num_steps, 0, MAX_STEPS, f"{path}.num_steps")
        _in(self.prompts_per_step, 1, MAX_PROMPTS, f"{path}.prompts_per_step")
        _in(self.prompts_per_minibatch, 1, MAX_PROMPTS, f"{path}.prompts_per_minibatch")
        _need(self.prompts_per_step % self.prompts_per_minibatch == 0, f"{path}.prompts_per_minibatch",
              f"must divide prompts_per_step ({self.prompts_per_step})")
        if self.micro_batch_tokens is not None:  # null: resolved per device (distributed/layout.py)
            _in(self.micro_batch_tokens, 1, MAX_TOKENS, f"{path}.micro_batch_tokens")
        _need(0 < self.reward_timeout_s <= MAX_TIMEOUT_S, f"{path}.reward_timeout_s",
              f"expected 0 < seconds <= {MAX_TIMEOUT_S:g} (a day), got {self.reward_timeout_s:g}")
        _in(self.reward_workers, 1, 4096, f"{path}.reward_workers")
        _in(self.eval_every, 0, MAX_STEPS, f"{path}.eval_every")
        _in(self.eval_n_samples, 1, 100_000, f"{path}.eval_n_samples")
        _need(self.eval_temperature > 0 or self.eval_n_samples == 1, f"{path}.eval_n_samples",
              f"greedy evaluation (eval_temperature 0) gives one sample per problem, got {self.eval_n_samples}")
        _need(0 <= self.eval_temperature <= 100, f"{path}.eval_temperature",
              f"expected 0 <= temperature <= 100, got {self.eval_temperature}")
        _in(self.seed, 0, MAX_SEED, f"{path}.seed")
        _in(self.max_consecutive_skips, 1, MAX_STEPS, f"{path}.max_consecutive_skips")


@dataclass
class CheckpointConfig:
    save_every: int = _f(50, "Save a checkpoint every N steps (and at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Keep the newest K checkpoints of this run (older ones of this run only are deleted).")
    resume: ResumeMode = _f(
        "auto", "auto = resume from the newest intact checkpoint of RUN_DIR, else start a new run; must = resume or "
        "fail; never = start a new run, refusing a RUN_DIR that holds checkpoints; fresh = move the previous run's "
        "files to RUN_DIR/previous_runs/ (nothing is deleted) and start a new run. See docs/reliability.md."
    )
    allow_changes: list[str] = _f(
        [], "Config fields (dotted, or a section name, or '*') that may differ from the resumed checkpoint's even "
        "though they break an exact resume (data, model, seeds, batch sizes, TP/PP)."
    )
    export_hf: bool = _f(False, "Export the final model to RUN_DIR/hf.")
    save_on_signal: bool = _f(True, "Save before exiting on SIGTERM/SIGUSR1 (SLURM pre-emption).")

    def validate(self, path: str) -> None:
        _in(self.save_every, 0, MAX_STEPS, f"{path}.save_every")
        _in(self.keep_last, 1, MAX_STEPS, f"{path}.keep_last")
        known = _field_paths(SRFTConfig())
        for i, name in enumerate(self.allow_changes):
            _need(name == "*" or name in known, f"{path}.allow_changes[{i}]",
                  f"{name!r} is not a config field or section (e.g. data.seed, optimizer, '*')")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(False, "Also write TensorBoard event files (RUN_DIR/tensorboard).")
    wandb: bool = _f(False, "Also log to Weights & Biases (pip install 'megatron-srft[logging]').")
    wandb_project: str = _f("megatron-srft", "W&B project.")
    wandb_entity: Optional[str] = _f(None, "W&B entity (team or user); null = your default.")
    wandb_run_name: Optional[str] = _f(None, "W&B run name; null = the run directory's name.")
    wandb_mode: Literal["online", "offline"] = _f(
        "online", "offline: write the W&B run under RUN_DIR/wandb (clusters without egress; `wandb sync` it later).")
    progress_bar: bool = _f(True, "Console progress bar with ETA (rank 0).")
    log_every: int = _f(1, "Console log every N steps (metrics.jsonl gets every step).")

    def validate(self, path: str) -> None:
        _in(self.log_every, 1, MAX_STEPS, f"{path}.log_every")


@dataclass
class SRFTConfig:
    run_dir: str = _f("runs/srft", "Directory for metrics, checkpoints, plots and exports.")
    model: ModelConfig = _sub(ModelConfig, "The policy model.")
    parallel: ParallelConfig = _sub(ParallelConfig, "Megatron parallel layout.")
    optimizer: OptimizerConfig = _sub(OptimizerConfig, "Optimizer and LR schedule.")
    data: DataConfig = _sub(DataConfig, "Datasets and templates.")
    rollout: RolloutConfig = _sub(RolloutConfig, "vLLM rollouts and weight sync.")
    algorithm: AlgorithmConfig = _sub(AlgorithmConfig, "SRFT objective and baselines.")
    train: TrainConfig = _sub(TrainConfig, "Loop sizes and rewards.")
    checkpoint: CheckpointConfig = _sub(CheckpointConfig, "Checkpointing and resume.")
    logging: LoggingConfig = _sub(LoggingConfig, "Metrics and console.")

    def validate(self) -> "SRFTConfig":
        """Each section's own fields. How the sections fit the machine, the world size and the model (TP vs heads,
        DP vs batch sizes, rollout TP, FP8 on this GPU, ...) is checked in ONE place:
        :func:`megatron_srft.distributed.layout.validate_layout`."""
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                check_tables(sub, f.name)
                sub.validate(f.name)
        return self


def _field_paths(obj, prefix: str = "") -> set[str]:
    """Every dotted field path and section name of a config tree."""
    out: set[str] = set()
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.add(prefix + f.name)
        if dataclasses.is_dataclass(v):
            out |= _field_paths(v, f"{prefix}{f.name}.")
    return out


# --------------------------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> SRFTConfig:
    """Build the config from an optional YAML file and ``key.sub=value`` overrides, then validate its fields.

    The layout against a world size and a model is :func:`megatron_srft.distributed.layout.validate_layout`."""
    cfg = SRFTConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            line = p.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path}: line {line} not valid UTF-8 (byte {e.object[e.start]:#04x}); config files "
                              f"must be UTF-8 encoded") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{line} not valid YAML: {getattr(e, 'problem', e)}") from None
        merge(cfg, data, "", f"{path}: ")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        merge(cfg, nested, "", "override: ")
    cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _cell(text: str) -> str:
    """A table cell's text: GitHub splits cells at every '|', code spans included, unless it is escaped."""
    return text.replace("|", "\\|")


def markdown_reference() -> str:
    """docs/config.md, generated from the dataclasses."""
    out = ["# Configuration reference", "",
           "Generated from `megatron_srft/config.py` by `python -m megatron_srft.config --markdown`; do not edit.",
           "YAML keys map 1:1 onto these fields; override any of them on the command line with `key.sub=value`.", ""]
    root = SRFTConfig()
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(getattr(root, f.name))]
    out += ["## (top level)", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = type_hints(SRFTConfig)
    for f in top:
        out.append(f"| `{f.name}` | `{_cell(type_name(hints[f.name]))}` | `{_cell(repr(getattr(root, f.name)))}` | "
                   f"{_cell(f.metadata['help'])} |")
    for f in dataclasses.fields(root):
        sub = getattr(root, f.name)
        if not dataclasses.is_dataclass(sub):
            continue
        out += ["", f"## `{f.name}`: {f.metadata['help']}", "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        sh = type_hints(type(sub))
        for sf in dataclasses.fields(sub):
            default = getattr(sub, sf.name)
            out.append(f"| `{f.name}.{sf.name}` | `{_cell(type_name(sh[sf.name]))}` | `{_cell(repr(default))}` | "
                       f"{sf.metadata['help'].replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--markdown" in sys.argv:
        sys.stdout.write(markdown_reference())
