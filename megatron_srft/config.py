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
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError


def _f(default: Any, help: str, **kw):
    """A field with a help string; mutable defaults go through default_factory."""
    if isinstance(default, (list, dict)):
        val = default
        return field(default_factory=lambda: type(val)(val), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


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
    virtual_pipeline_model_parallel_size: Optional[int] = _f(None, "Interleaved PP chunks per stage (reserved).")
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
        if self.virtual_pipeline_model_parallel_size is not None:
            _need(self.pipeline_model_parallel_size > 1, f"{path}.virtual_pipeline_model_parallel_size",
                  "needs pipeline_model_parallel_size > 1")

    def check_world_size(self, world_size: int) -> int:
        """Return the DP size; a world size that TP x PP x CP does not divide is an error."""
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        if world_size % mp != 0:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size ({self.context_parallel_size}) = {mp}"
            )
        return world_size // mp


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
        _need(self.lr > 0, f"{path}.lr", f"expected > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, f"{path}.min_lr", "expected 0 <= min_lr <= lr")
        _need(self.warmup_steps >= 0, f"{path}.warmup_steps", "expected >= 0")
        _need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, f"{path}.adam_beta1", "betas must be in [0, 1)")
        _need(self.clip_grad >= 0, f"{path}.clip_grad", "expected >= 0")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "Training data: .jsonl or .parquet (our layout or verl/LUFFY's).")
    eval_files: list[str] = _f([], "Held-out evaluation files (same layouts).")
    template: Literal["chat", "paper", "boxed", "plain"] = _f(
        "paper", "Prompt template: tokenizer chat template as is, the paper's <think> system prompt, "
        "'reason step by step, answer in \\boxed{}', or the raw prompt string."
    )
    max_prompt_length: int = _f(1024, "Prompts longer than this (tokens) are filtered out.")
    max_response_length: int = _f(8192, "Max rollout tokens; demos longer than this are filtered out.")
    shuffle: bool = _f(True, "Shuffle prompts each epoch (seeded).")
    seed: int = _f(1, "Data order seed.")

    def validate(self, path: str) -> None:
        _need(self.max_prompt_length > 0, f"{path}.max_prompt_length", "expected > 0")
        _need(self.max_response_length > 0, f"{path}.max_response_length", "expected > 0")


@dataclass
class RolloutConfig:
    engine: Literal["vllm"] = _f("vllm", "Rollout engine.")
    num_rollouts_per_prompt: int = _f(7, "G: on-policy samples per prompt (code: 7 + 1 demo = 8 per group).")
    temperature: float = _f(1.0, "Sampling temperature (paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_tokens: Optional[int] = _f(None, "Max new tokens; null = data.max_response_length.")
    stop: list[str] = _f([], "Extra stop strings.")
    seed: int = _f(0, "Sampling seed.")
    tensor_parallel_size: int = _f(1, "vLLM TP size (must divide the training world).")
    gpu_memory_utilization: float = _f(0.5, "vLLM memory fraction (GPU).")
    cpu_kvcache_space_gib: int = _f(1, "vLLM KV cache size on CPU, GiB.")
    max_model_len: Optional[int] = _f(None, "vLLM max model length; null = prompt + response lengths.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "vLLM dtype; auto = model.params_dtype (fp32 on CPU).")
    enforce_eager: bool = _f(False, "Disable CUDA graphs in vLLM.")
    sleep_between_steps: bool = _f(True, "Free vLLM weights and KV cache during training (GPU, level 1 sleep).")
    sync_bucket_mb: int = _f(512, "Weight-sync bucket size in MiB (peak extra memory during sync).")
    tis_cap: Optional[float] = _f(None, "Truncated importance-sampling cap C for engine/trainer mismatch; null = off.")

    def validate(self, path: str) -> None:
        _need(self.num_rollouts_per_prompt >= 0, f"{path}.num_rollouts_per_prompt", "expected >= 0")
        _need(self.temperature >= 0, f"{path}.temperature", "expected >= 0")
        _need(0 < self.top_p <= 1, f"{path}.top_p", "expected 0 < top_p <= 1")
        _need(self.tensor_parallel_size >= 1, f"{path}.tensor_parallel_size", "expected >= 1")
        _need(0 < self.gpu_memory_utilization <= 1, f"{path}.gpu_memory_utilization", "expected in (0, 1]")
        _need(self.sync_bucket_mb >= 1, f"{path}.sync_bucket_mb", "expected >= 1")
        _need(self.tis_cap is None or self.tis_cap >= 1, f"{path}.tis_cap", "expected >= 1 or null")


@dataclass
class AlgorithmConfig:
    """SRFT and its baselines. A preset only sets defaults: every null field takes the preset's value."""

    preset: Literal["srft", "srft_code", "sft", "grpo", "luffy", "sft_plus_rl", "srft_w_sft_1", "srft_w_rl_1"] = _f(
        "srft", "Algorithm preset (docs/algorithms.md): srft = the paper's equations, srft_code = released code, "
        "luffy = LUFFY's released run; srft_w_sft_1 / srft_w_rl_1 = the paper's ablations."
    )
    num_demos_per_prompt: Optional[int] = _f(None, "D: demonstrations joining each group.")
    sft_coef: Optional[float] = _f(None, "Coefficient of the SFT weight (paper 0.5).")
    sft_weight: Optional[Literal["exp_neg_entropy", "exp_pos_entropy", "one", "zero"]] = _f(
        None, "w_SFT form: 0.5*sg(exp(-H)) (paper), exp(+H) (code), 1 (plain SFT), 0 (off)."
    )
    sft_weight_max: Optional[float] = _f(None, "Clamp of w_SFT (the exp(+H) form is unbounded).")
    rl_pos_coef: Optional[float] = _f(None, "Coefficient of w_RL on positive rollouts (paper 0.1).")
    rl_pos_weight: Optional[Literal["exp_pos_entropy", "one"]] = _f(None, "w_RL form on positive rollouts.")
    entropy_granularity: Optional[Literal["token", "batch_mean"]] = _f(None, "H per token or batch-mean H.")
    std_normalize: Optional[bool] = _f(None, "Divide group advantages by the group std (paper yes, code no).")
    adv_eps: float = _f(1e-6, "eps in A = (r - mean) / (std + eps).")
    demo_ratio: Optional[Literal["p", "p_over_p_plus_gamma", "off"]] = _f(
        None, "Off-policy demo term f(pi): p (paper), p/(p+gamma) (code, LUFFY), off."
    )
    demo_gamma: float = _f(0.1, "gamma in p/(p+gamma).")
    clip: Optional[bool] = _f(None, "PPO clip on the on-policy ratio.")
    clip_eps: float = _f(0.2, "PPO clip epsilon.")
    aggregation: Optional[Literal["seq_mean_token_mean", "token_mean", "token_sum_norm"]] = _f(
        None, "Loss aggregation: GRPO seq-mean-token-mean (paper), verl token-mean, sum / constant (code)."
    )
    aggregation_constant: Optional[float] = _f(
        None, "C of token_sum_norm (token sum / C, mean over sequences): 8192 = the released code per sequence; "
        "luffy's 128 = LUFFY's run (docs/algorithms.md)."
    )
    entropy_bonus: Optional[float] = _f(
        None, "Entropy bonus: minus this times the mini-batch token-mean of H (code and LUFFY 0.001, paper 0)."
    )

    def validate(self, path: str) -> None:
        _need(self.num_demos_per_prompt is None or self.num_demos_per_prompt >= 0, f"{path}.num_demos_per_prompt",
              "expected >= 0")
        _need(self.adv_eps > 0, f"{path}.adv_eps", "expected > 0")
        _need(self.demo_gamma > 0, f"{path}.demo_gamma", "expected > 0")
        _need(0 < self.clip_eps < 1, f"{path}.clip_eps", "expected 0 < eps < 1")
        _need(self.aggregation_constant is None or self.aggregation_constant > 0, f"{path}.aggregation_constant",
              "expected > 0")
        _need(self.sft_coef is None or self.sft_coef >= 0, f"{path}.sft_coef", "expected >= 0")
        _need(self.rl_pos_coef is None or self.rl_pos_coef >= 0, f"{path}.rl_pos_coef", "expected >= 0")
        _need(self.sft_weight_max is None or self.sft_weight_max > 0, f"{path}.sft_weight_max", "expected > 0")


@dataclass
class TrainConfig:
    num_steps: int = _f(500, "Rollout steps (paper: 500).")
    prompts_per_step: int = _f(128, "Prompts sampled per rollout step, across all DP ranks (paper: 128).")
    prompts_per_minibatch: int = _f(64, "Prompts per optimizer step (paper 64: 2 optimizer steps per rollout step).")
    micro_batch_tokens: int = _f(16384, "Token budget of one packed micro-batch per rank.")
    sequence_packing: bool = _f(True, "Pack sequences into micro-batches (else pad, one sequence per row).")
    reward: Literal["math", "exact"] = _f("math", "Reward function (megatron_srft/rewards).")
    reward_timeout_s: float = _f(10.0, "Per-sample verifier timeout; a timeout scores 0.")
    reward_workers: int = _f(2, "Verifier worker processes.")
    eval_every: int = _f(0, "Evaluate every N steps (0 = only at the end).")
    eval_n_samples: int = _f(1, "Samples per eval prompt (avg@k / pass@k).")
    eval_temperature: float = _f(0.0, "Eval sampling temperature.")
    seed: int = _f(1234, "Model init / dropout seed.")

    def validate(self, path: str) -> None:
        _need(self.num_steps >= 0, f"{path}.num_steps", "expected >= 0")
        _need(self.prompts_per_step >= 1, f"{path}.prompts_per_step", "expected >= 1")
        _need(self.prompts_per_minibatch >= 1, f"{path}.prompts_per_minibatch", "expected >= 1")
        _need(self.prompts_per_step % self.prompts_per_minibatch == 0, f"{path}.prompts_per_minibatch",
              f"must divide prompts_per_step ({self.prompts_per_step})")
        _need(self.micro_batch_tokens >= 1, f"{path}.micro_batch_tokens", "expected >= 1")
        _need(self.reward_timeout_s > 0, f"{path}.reward_timeout_s", "expected > 0")
        _need(self.reward_workers >= 1, f"{path}.reward_workers", "expected >= 1")


@dataclass
class CheckpointConfig:
    save_every: int = _f(50, "Save a checkpoint every N steps (and at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Keep the newest K checkpoints.")
    resume: Literal["auto", "never", "must"] = _f("auto", "Resume from RUN_DIR/checkpoints if present.")
    export_hf: bool = _f(False, "Export the final model to RUN_DIR/hf.")
    save_on_signal: bool = _f(True, "Save before exiting on SIGTERM/SIGUSR1 (SLURM pre-emption).")

    def validate(self, path: str) -> None:
        _need(self.save_every >= 0, f"{path}.save_every", "expected >= 0")
        _need(self.keep_last >= 1, f"{path}.keep_last", "expected >= 1")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(False, "Also write TensorBoard event files.")
    progress_bar: bool = _f(True, "Console progress bar with ETA (rank 0).")
    log_every: int = _f(1, "Console log every N steps (metrics.jsonl gets every step).")

    def validate(self, path: str) -> None:
        _need(self.log_every >= 1, f"{path}.log_every", "expected >= 1")


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

    def validate(self, world_size: Optional[int] = None) -> "SRFTConfig":
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(f.name)
        p, m = self.parallel, self.model
        te_wanted = m.transformer_impl == "transformer_engine" or m.fp8 is not None
        if te_wanted:
            _need(_te_available(), "model.fp8" if m.fp8 is not None else "model.transformer_impl",
                  "needs Transformer Engine and a CUDA GPU, which this machine lacks")
        if self.algorithm.preset != "sft":
            _need(self.train.prompts_per_step >= 1, "train.prompts_per_step", "expected >= 1")
        _need(m.make_vocab_size_divisible_by % p.tensor_model_parallel_size == 0,
              "model.make_vocab_size_divisible_by",
              f"must be a multiple of parallel.tensor_model_parallel_size ({p.tensor_model_parallel_size})")
        if world_size is not None:
            dp = p.check_world_size(world_size)
            _need(self.train.prompts_per_minibatch % dp == 0, "train.prompts_per_minibatch",
                  f"must be divisible by the data-parallel size ({dp})")
        return self


def _te_available() -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-6` (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _merge(obj, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}unknown key '{path}'{hint}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            _merge(cur, value, f"{path}.", where)
        else:
            setattr(obj, key, _coerce(value, hints[key], path, where))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.__class__.__name__})") from None
    return key.strip().split("."), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> SRFTConfig:
    """Build the config from an optional YAML file and ``key.sub=value`` overrides, then validate it."""
    cfg = SRFTConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{line} not valid YAML: {getattr(e, 'problem', e)}") from None
        _merge(cfg, data, "", f"{path}: ")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "", "override: ")
    cfg.validate(world_size)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def markdown_reference() -> str:
    """docs/config.md, generated from the dataclasses."""
    out = ["# Configuration reference", "",
           "Generated from `megatron_srft/config.py` by `python -m megatron_srft.config --markdown`; do not edit.",
           "YAML keys map 1:1 onto these fields; override any of them on the command line with `key.sub=value`.", ""]
    root = SRFTConfig()
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(getattr(root, f.name))]
    out += ["## (top level)", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = _hints(SRFTConfig)
    for f in top:
        out.append(f"| `{f.name}` | `{_type_name(hints[f.name])}` | `{getattr(root, f.name)!r}` | {f.metadata['help']} |")
    for f in dataclasses.fields(root):
        sub = getattr(root, f.name)
        if not dataclasses.is_dataclass(sub):
            continue
        out += ["", f"## `{f.name}`: {f.metadata['help']}", "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        sh = _hints(type(sub))
        for sf in dataclasses.fields(sub):
            default = getattr(sub, sf.name)
            out.append(f"| `{f.name}.{sf.name}` | `{_type_name(sh[sf.name])}` | `{default!r}` | "
                       f"{sf.metadata['help'].replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--markdown" in sys.argv:
        sys.stdout.write(markdown_reference())
