"""Layout validation and memory arithmetic against the real ArchSpecs of public models (config.json values)."""

from __future__ import annotations

import pytest

from megatron_srft.config import ConfigError, SRFTConfig
from megatron_srft.distributed.layout import (is_engine_rank, memory_per_gpu, rollout_sequences_per_engine,
                                             split_world, validate_layout)
from megatron_srft.models.arch import arch_from_hf_config

# Values from the models' public config.json files on the Hugging Face Hub.
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064,
}
# Qwen2.5-Math-7B: the same shapes, 4k positions and rope theta 10k as released.
QWEN25_MATH_7B = QWEN25_7B | {"max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 4096}
QWEN25_32B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 5120,
    "intermediate_size": 27648, "max_position_embeddings": 131072, "num_attention_heads": 40,
    "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064,
}
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8192,
    "intermediate_size": 28672, "max_position_embeddings": 8192, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "vocab_size": 128256, "attention_bias": False, "mlp_bias": False,
}


def arch(d):
    return arch_from_hf_config(d, "test-config.json")


def cfg_with(tp=1, pp=1, sp=False, rollout_tp=1, prompt=1024, response=8192, micro_tokens=16384,
             step=128, minibatch=64) -> SRFTConfig:
    """A config built directly (not through load_config), so validate_layout is the only check that runs."""
    c = SRFTConfig()
    c.parallel.tensor_model_parallel_size = tp
    c.parallel.pipeline_model_parallel_size = pp
    c.parallel.sequence_parallel = sp
    c.rollout.tensor_parallel_size = rollout_tp
    c.data.max_prompt_length, c.data.max_response_length = prompt, response
    c.train.micro_batch_tokens = micro_tokens
    c.train.prompts_per_step, c.train.prompts_per_minibatch = step, minibatch
    return c


def expect_error(field: str, words: str, cfg: SRFTConfig, spec, world: int) -> str:
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg, world, spec)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert words in msg, msg
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("spec,tp,pp,world,rtp", [
    (QWEN25_7B, 2, 1, 32, 2),
    (QWEN25_7B, 4, 1, 64, 4),
    (QWEN25_32B, 4, 2, 32, 4),
    (QWEN25_32B, 8, 2, 64, 8),
    (LLAMA3_70B, 8, 4, 64, 8),
    (LLAMA3_70B, 8, 2, 64, 16),  # vLLM TP 16 > 8 KV heads: replicated, allowed
])
def test_valid_layouts_pass(spec, tp, pp, world, rtp):
    response = 8192 if spec is not LLAMA3_70B else 6144  # Llama-3 has 8k positions
    validate_layout(cfg_with(tp=tp, sp=tp > 1, rollout_tp=rtp, response=response, pp=pp), world, arch(spec))


def test_tp_must_divide_heads_kv_heads():
    expect_error("parallel.tensor_model_parallel_size", "num_attention_heads (28)", cfg_with(tp=8), arch(QWEN25_7B), 8)
    # 7 divides 28 heads but not 4 KV heads
    expect_error("parallel.tensor_model_parallel_size", "num_key_value_heads (4)", cfg_with(tp=7), arch(QWEN25_7B), 7)


def test_pp_must_divide_layers():
    expect_error("parallel.pipeline_model_parallel_size", "num_hidden_layers (28)", cfg_with(pp=3), arch(QWEN25_7B), 3)
    expect_error("parallel.pipeline_model_parallel_size", "num_hidden_layers (64)", cfg_with(tp=4, pp=3),
                 arch(QWEN25_32B), 12)


def test_world_must_be_divisible_by_model_parallel_size():
    expect_error("parallel", "world size 48", cfg_with(tp=8, pp=4, response=6144), arch(LLAMA3_70B), 48)


def test_vocab_padding_multiple_of_tp():
    c = cfg_with(tp=8, response=6144)
    c.model.make_vocab_size_divisible_by = 4
    expect_error("model.make_vocab_size_divisible_by", "not a multiple", c, arch(LLAMA3_70B), 8)


def test_fp8_without_gpu_is_a_config_error():
    c = cfg_with(tp=2)
    c.model.fp8 = "e4m3"
    expect_error("model.fp8", "Transformer Engine and a CUDA GPU", c, arch(QWEN25_7B), 8)
    c = cfg_with(tp=2)
    c.model.transformer_impl = "transformer_engine"
    expect_error("model.transformer_impl", "CUDA GPU", c, arch(QWEN25_7B), 8)


def test_batches_divisible_by_dp():
    expect_error("train.prompts_per_step", "data-parallel size (48", cfg_with(), arch(QWEN25_7B), 48)
    expect_error("train.prompts_per_minibatch", "data-parallel size (128)", cfg_with(), arch(QWEN25_7B), 128)


def test_rollout_tp():
    expect_error("rollout.tensor_parallel_size", "world size (8)", cfg_with(rollout_tp=16), arch(QWEN25_7B), 8)
    expect_error("rollout.tensor_parallel_size", "num_attention_heads (28)", cfg_with(rollout_tp=8), arch(QWEN25_7B), 8)
    expect_error("rollout.tensor_parallel_size", "num_key_value_heads (8)", cfg_with(rollout_tp=5, step=120,
                 minibatch=40), arch(QWEN25_32B), 40)


def test_lengths_fit_positions_and_micro_batch():
    # Qwen2.5-Math-7B as released has 4k positions: the paper raises them to 16k (rope theta 40k) in config.json.
    msg = expect_error("data.max_response_length", "max_position_embeddings (4096)", cfg_with(tp=2),
                       arch(QWEN25_MATH_7B), 8)
    assert "9216" in msg
    validate_layout(cfg_with(tp=2), 8, arch(QWEN25_MATH_7B | {"max_position_embeddings": 16384, "rope_theta": 40000.0}))
    expect_error("train.micro_batch_tokens", "9216", cfg_with(tp=2, micro_tokens=8192), arch(QWEN25_7B), 8)
    c = cfg_with(tp=2)
    c.rollout.max_model_len = 4096
    expect_error("rollout.max_model_len", "got 4096", c, arch(QWEN25_7B), 8)


@pytest.mark.parametrize("spec,billions", [(QWEN25_7B, 7.62), (QWEN25_32B, 32.76), (LLAMA3_70B, 70.55)])
def test_param_count_matches_published_sizes(spec, billions):
    a = arch(spec)
    n = a.num_params(tp=1, pp=1, padded_vocab=a.vocab_size)
    assert abs(n / 1e9 - billions) / billions < 0.005, n
    # Splitting by TP x PP: every GPU holds about 1/(TP*PP) of it (plus the embedding on the last stage).
    tp, pp = (8 if a.num_query_groups >= 8 else 4), 2
    n_split = a.num_params(tp=tp, pp=pp, padded_vocab=a.vocab_size)
    assert n / (tp * pp) < n_split < n / (tp * pp) + a.vocab_size * a.hidden_size / tp


def test_memory_formula_distributed_optimizer():
    """bf16 params + fp32 grads + 12 bytes of fp32 optimizer state sharded over DP (Megatron: 6 + 12/d)."""
    a = arch(LLAMA3_70B)
    c = cfg_with(tp=8, pp=4, sp=True, rollout_tp=8, response=6144)
    c.model.recompute_granularity, c.model.recompute_method, c.model.recompute_num_layers = "full", "uniform", 1
    est = memory_per_gpu(c, a, world_size=64)
    n = est.params_per_gpu
    assert est.weights == 2 * n and est.grads == 4 * n and est.optimizer == 12 * n // 2
    c.parallel.use_distributed_optimizer = False
    assert memory_per_gpu(c, a, world_size=64).optimizer == 12 * n
    c.model.params_dtype = "fp32"
    assert memory_per_gpu(c, a, world_size=64).optimizer == 8 * n
    # Full recompute keeps far less than storing every layer's activations.
    c2 = cfg_with(tp=8, pp=4, sp=True, rollout_tp=8, response=6144)
    assert memory_per_gpu(c2, a, 64).activations > 5 * est.activations


def test_fp8_recipes_the_gpu_cannot_run_are_config_errors():
    from megatron_srft.distributed.layout import check_fp8_recipe

    check_fp8_recipe("delayed", (9, 0))
    check_fp8_recipe("blockwise", (9, 0))
    with pytest.raises(ConfigError, match=r"model.fp8_recipe: 'mxfp8' needs a GPU of compute capability 10.0"):
        check_fp8_recipe("mxfp8", (9, 0))  # Hopper
    with pytest.raises(ConfigError, match=r"model.fp8_recipe: 'blockwise'"):
        check_fp8_recipe("blockwise", (8, 9))
    with pytest.raises(ConfigError, match=r"model.fp8: FP8 needs a CUDA GPU"):
        check_fp8_recipe("delayed", None)
    with pytest.raises(ConfigError, match=r"model.fp8_recipe: a GPU of compute capability 8.0 has no FP8"):
        check_fp8_recipe("delayed", (8, 0))  # A100
    with pytest.raises(ConfigError, match=r"'mxfp8' needs .* 10.0 or newer, below 12.0; this GPU is 12.0"):
        check_fp8_recipe("mxfp8", (12, 0))


@pytest.mark.parametrize("capability,recipes", [
    (None, ()),  # no GPU
    ((8, 0), ()),  # A100: no FP8 tensor cores
    ((8, 6), ()),  # A10, RTX 30xx
    ((8, 9), ("delayed", "tensorwise")),  # L4, L40S, RTX 40xx
    ((9, 0), ("delayed", "tensorwise", "blockwise")),  # H100, H200
    ((10, 0), ("delayed", "tensorwise", "blockwise", "mxfp8")),  # B200
    ((12, 0), ("delayed", "tensorwise", "blockwise")),  # RTX 50xx: Transformer Engine refuses MXFP8 there
])
def test_fp8_recipes_supported_by_compute_capability(capability, recipes):
    from megatron_srft.distributed.layout import fp8_recipes_supported, fp8_unsupported_reason

    assert fp8_recipes_supported(capability) == recipes
    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert (fp8_unsupported_reason(recipe, capability) is None) == (recipe in recipes)


def test_fp8_recipe_table_matches_the_config_and_megatron():
    """Every recipe the config accepts is in the table, and its token multiple is megatron-core's FP8 alignment
    (fp8_utils.get_fp8_align_size: 32 for MXFP8, 16 for the others)."""
    import typing

    from megatron.core.fp8_utils import get_fp8_align_size

    from megatron_srft.config import ModelConfig
    from megatron_srft.distributed.layout import FP8_RECIPES

    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["fp8_recipe"])) == set(FP8_RECIPES)
    assert {name: r.token_multiple for name, r in FP8_RECIPES.items()} == {
        name: get_fp8_align_size(name) for name in FP8_RECIPES}
    assert FP8_RECIPES["mxfp8"].token_multiple == 32


def test_token_pad_multiple():
    from megatron_srft.distributed.layout import config_token_pad_multiple, token_pad_multiple

    assert token_pad_multiple(False, 4, None) == 1
    assert token_pad_multiple(True, 4, None) == 4
    assert token_pad_multiple(False, 4, "delayed") == 16
    assert token_pad_multiple(True, 2, "delayed") == 32  # TP x 16: each rank's shard goes through FP8 GEMMs
    assert token_pad_multiple(True, 4, "blockwise") == 64  # not lcm(4, 16) = 16
    assert token_pad_multiple(False, 1, "mxfp8") == 32
    assert token_pad_multiple(True, 2, "mxfp8") == 64
    c = cfg_with(tp=4, sp=True)
    assert config_token_pad_multiple(c.parallel, c.model) == 4  # FP8 off: the recipe does not count
    c.model.fp8, c.model.fp8_recipe = "hybrid", "mxfp8"
    assert config_token_pad_multiple(c.parallel, c.model) == 128


def test_impossible_rollout_placement_is_one_line():
    spec = arch(QWEN25_MATH_7B | {"max_position_embeddings": 16384})  # 28 heads, 4 KV heads
    msg = expect_error("rollout.tensor_parallel_size", "does not divide the world size (8)",
                       cfg_with(tp=2, rollout_tp=3), spec, 8)
    assert "every rank must belong to exactly one engine" in msg
    expect_error("rollout.tensor_parallel_size", "does not divide the model's num_attention_heads (28)",
                 cfg_with(tp=2, rollout_tp=8), spec, 8)
    odd = arch(QWEN25_MATH_7B | {"max_position_embeddings": 16384, "num_attention_heads": 24,
                                 "num_key_value_heads": 3, "hidden_size": 3072})
    expect_error("rollout.tensor_parallel_size", "neither divides nor is a multiple of the model's "
                 "num_key_value_heads (3)", cfg_with(tp=1, rollout_tp=2), odd, 8)


# --------------------------------------------------------------------------------------------- placement

MATH_7B_16K = QWEN25_MATH_7B | {"max_position_embeddings": 16384, "rope_theta": 40000.0}  # the paper's edit


def disaggregated(c: SRFTConfig, engine_ranks: int, staleness: int = 0) -> SRFTConfig:
    c.rollout.placement, c.rollout.num_engine_ranks, c.rollout.max_staleness = "disaggregated", engine_ranks, staleness
    return c


def test_split_world_colocated_and_disaggregated():
    """Colocated: every rank trains and generates. Disaggregated: the LAST num_engine_ranks ranks only generate."""
    c = cfg_with()
    assert split_world(c.rollout, 32) == (32, 0)
    assert not any(is_engine_rank(c.rollout, g, 32) for g in range(32))
    d = disaggregated(cfg_with(), 8)
    assert split_world(d.rollout, 32) == (24, 8)
    assert [g for g in range(32) if is_engine_rank(d.rollout, g, 32)] == list(range(24, 32))
    assert split_world(disaggregated(cfg_with(), 1).rollout, 2) == (1, 1)


@pytest.mark.parametrize("engine_ranks", [32, 33])
def test_engine_ranks_must_leave_a_training_rank(engine_ranks):
    c = disaggregated(cfg_with(), engine_ranks)
    msg = expect_error("rollout.num_engine_ranks", f"{engine_ranks} leaves no training rank in a world of 32", c,
                       None, 32)
    assert "fewer than the world size" in msg
    with pytest.raises(ConfigError, match="rollout.num_engine_ranks"):
        is_engine_rank(c.rollout, 0, 32)


def test_disaggregated_dp_is_over_the_training_ranks():
    """The 7B recipe (TP 2, 128 prompts, mini-batch 64) on 32 GPUs: 16 + 16 fits, 24 + 8 does not (DP 12)."""
    spec = arch(MATH_7B_16K)
    assert validate_layout(disaggregated(cfg_with(tp=2), 16), 32, spec) == 8
    assert validate_layout(disaggregated(cfg_with(tp=2), 8), 40, spec) == 16  # 5 nodes: 32 train + 8 generate
    msg = expect_error("train.prompts_per_step", "data-parallel size (12 = training ranks 24 / (TP 2 x PP 1 x CP 1))",
                       disaggregated(cfg_with(tp=2), 8), spec, 32)
    assert "128 is not divisible" in msg
    expect_error("train.prompts_per_minibatch", "data-parallel size (16)",
                 disaggregated(cfg_with(tp=1, step=128, minibatch=8), 16), spec, 32)
    # the model-parallel size must divide the training ranks (27), not the launched world (32)
    expect_error("parallel", "27 is not divisible by tensor_model_parallel_size (2)",
                 disaggregated(cfg_with(tp=2), 5), spec, 32)
    validate_layout(cfg_with(tp=2), 32, spec)  # the same world colocated: DP 16


def test_disaggregated_rollout_tp_divides_the_engine_ranks():
    spec = arch(MATH_7B_16K)  # 28 heads, 4 KV heads
    msg = expect_error("rollout.tensor_parallel_size", "4 does not divide rollout.num_engine_ranks (6)",
                       disaggregated(cfg_with(tp=2, rollout_tp=4), 6), spec, 22)
    assert "every engine rank must belong to exactly one engine" in msg
    # 1 training rank + 4 engine ranks: rollout TP 4 divides the engine ranks, not the world (5): allowed
    assert validate_layout(disaggregated(cfg_with(tp=1, rollout_tp=4), 4), 5, spec) == 1
    with pytest.raises(ConfigError, match="does not divide the world size"):
        validate_layout(cfg_with(tp=1, rollout_tp=4, step=5, minibatch=5), 5, spec)  # the same world colocated
    # the model's heads still bound the rollout TP
    expect_error("rollout.tensor_parallel_size", "num_attention_heads (28)",
                 disaggregated(cfg_with(tp=2, rollout_tp=8), 16), spec, 32)


def test_rollout_sequences_per_engine_disaggregated():
    """Disaggregated (the world given is the engine ranks): the step's prompts over the engines, rounded up."""
    c = disaggregated(cfg_with(tp=2, step=128), 16)
    assert rollout_sequences_per_engine(c, 16) == 8 * 7  # 16 engines of rollout TP 1: 8 prompts x 7 rollouts
    c.rollout.tensor_parallel_size = 4
    assert rollout_sequences_per_engine(c, 12) == 256  # 3 engines: ceil(128 / 3) = 43 x 7 = 301, capped at 256
    c.train.prompts_per_step = 16
    assert rollout_sequences_per_engine(c, 12) == 6 * 7  # ceil(16 / 3) = 6 prompts
    assert rollout_sequences_per_engine(cfg_with(tp=2, step=128), 32) == 8 * 7  # colocated: DP 16 -> 8 prompts


# --------------------------------------------------------------------------------------------- device defaults

TOY = {  # megatron_srft/experiments/toy.py's model
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 128,
    "intermediate_size": 256, "max_position_embeddings": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "vocab_size": 128,
}
GIB = 1024 ** 3


def toy_cfg(micro_tokens=None) -> SRFTConfig:
    c = cfg_with(prompt=32, response=64, micro_tokens=micro_tokens, step=32, minibatch=32)
    c.model.params_dtype = "fp32"
    return c


def test_micro_batch_tokens_resolve_per_device():
    from megatron_srft.distributed.layout import DEFAULT_MICRO_BATCH_TOKENS, resolve_micro_batch_tokens

    a = arch(TOY)
    assert SRFTConfig().train.micro_batch_tokens is None  # null by default
    assert resolve_micro_batch_tokens(toy_cfg(), a, on_gpu=True) == DEFAULT_MICRO_BATCH_TOKENS["gpu"] == 16384
    assert resolve_micro_batch_tokens(toy_cfg(), a, on_gpu=False) == DEFAULT_MICRO_BATCH_TOKENS["cpu"] == 8192
    assert resolve_micro_batch_tokens(toy_cfg(), a, on_gpu=False, memory_bytes=12 * GIB) == 8192  # fits easily
    assert resolve_micro_batch_tokens(toy_cfg(micro_tokens=1000), a, on_gpu=False, memory_bytes=GIB) == 1000
    # never below one full sequence, also when the default is smaller than it
    long = cfg_with(prompt=1024, response=16384, micro_tokens=None)
    assert resolve_micro_batch_tokens(long, arch(QWEN25_7B), on_gpu=True) == 17408
    validate_layout(toy_cfg(), 1, a)  # null passes the layout checks


def test_micro_batch_tokens_shrink_to_fit_cpu_memory():
    """Qwen2.5-7B on a 2-rank CPU host of 256 GiB: the 152k vocabulary's fp32 logits alone are 4.6 GiB at the
    8192-token default, so the budget halves until the micro-batch fits its share."""
    from megatron_srft.distributed.layout import (MICRO_BATCH_MEMORY_SHARE, micro_batch_memory, model_state_bytes,
                                                 engine_bytes, resolve_micro_batch_tokens)

    a = arch(QWEN25_7B)
    c = cfg_with(tp=2, prompt=512, response=1024, micro_tokens=None, step=8, minibatch=8)
    c.model.params_dtype = "fp32"
    memory = 128 * GIB
    tokens = resolve_micro_batch_tokens(c, a, on_gpu=False, memory_bytes=memory, world_size=2)
    room = MICRO_BATCH_MEMORY_SHARE * (memory - model_state_bytes(c, a, 2)
                                      - engine_bytes(c, a, False, 2, memory_bytes=memory))
    assert 1536 <= tokens < 8192 and 8192 % tokens == 0
    assert micro_batch_memory(c, a, tokens).total <= room < micro_batch_memory(c, a, 2 * tokens).total


def test_micro_batch_memory_check_errors_warns_or_passes():
    from megatron_srft.distributed.layout import check_micro_batch_memory

    a = arch(QWEN25_7B)
    c = cfg_with(tp=2, prompt=512, response=1024, micro_tokens=65536, step=8, minibatch=8)
    with pytest.raises(ConfigError) as e:
        check_micro_batch_memory(c, a, 65536, on_gpu=True, memory_bytes=80 * GIB, world_size=8)
    msg = str(e.value)
    assert msg.startswith("train.micro_batch_tokens: 65536 tokens need about") and "\n" not in msg
    assert "logits" in msg and "leave it null" in msg
    warning = check_micro_batch_memory(c, a, 8192, on_gpu=True, memory_bytes=80 * GIB, world_size=8)
    assert warning is None
    big = check_micro_batch_memory(c, a, 24576, on_gpu=True, memory_bytes=80 * GIB, world_size=8)
    assert big is not None and big.startswith("train.micro_batch_tokens: 24576") and "\n" not in big
    assert check_micro_batch_memory(toy_cfg(), arch(TOY), 8192, on_gpu=False, memory_bytes=12 * GIB) is None


def test_attention_memory_is_per_sequence():
    """No [T, T] term: only the math kernel (attention dropout) holds one sequence's scores at a time."""
    from megatron_srft.distributed.layout import micro_batch_memory

    c = toy_cfg()
    a = arch(TOY)
    assert micro_batch_memory(c, a, 16384).attention == 0
    c.model.attention_dropout = 0.1
    assert micro_batch_memory(c, a, 16384).attention == 4 * 96 * 96 * 4  # heads x L^2 x 4, L = 32 + 64
    assert micro_batch_memory(c, a, 64).attention == 4 * 64 * 64 * 4


def test_engine_kv_cache_sized_to_a_step_on_cpu():
    from megatron_srft.distributed.layout import engine_kv_cache_bytes, kv_cache_bytes_per_token
    from megatron_srft.rollout.base import resolve_engine_settings

    a = arch(TOY)
    assert kv_cache_bytes_per_token(a, 4) == 2 * 2 * 2 * 32 * 4  # K,V x layers x kv heads x head_dim x fp32
    assert engine_kv_cache_bytes(toy_cfg(), a, on_gpu=True) is None  # vLLM's gpu_memory_utilization
    c = toy_cfg()
    assert engine_kv_cache_bytes(c, a, on_gpu=False) == 64 * 1024 ** 2  # 224 x 96 x 1 KiB < floor
    c7 = cfg_with(prompt=1024, response=8192, micro_tokens=None, step=32, minibatch=32)
    kv = engine_kv_cache_bytes(c7, arch(QWEN25_7B), on_gpu=False)
    per_token = kv_cache_bytes_per_token(arch(QWEN25_7B), 4)  # auto dtype on CPU: fp32
    assert kv >= 1.25 * 224 * 9216 * per_token and kv % 1024 ** 2 == 0
    c.rollout.cpu_kvcache_space_gib = 0.5
    assert engine_kv_cache_bytes(c, a, on_gpu=False) == GIB // 2
    # the engine's resolver gives the same size for the same sequences (the one formula)
    import torch

    if not torch.cuda.is_available():
        got = resolve_engine_settings(c7.rollout, "bf16", arch(QWEN25_7B), 9216, num_seqs=224)
        assert got.kv_cache_bytes == kv and got.max_model_len == 9216


@pytest.mark.parametrize("sleep_level", [0, 1, 2])
def test_gpu_engine_memory_at_each_sleep_level(sleep_level):
    """At sleep level 0 vLLM keeps gpu_memory_utilization x the GPU resident during training; asleep (1: weights
    offloaded to host, 2: dropped; the KV cache freed at both) it holds nothing the estimate counts. On CPU the
    level is a no-op."""
    from megatron_srft.distributed.layout import (check_micro_batch_memory, engine_bytes,
                                                 resolve_micro_batch_tokens)

    a = arch(QWEN25_7B)
    c = cfg_with(tp=2, prompt=512, response=1024, micro_tokens=None, step=8, minibatch=8)
    c.rollout.sleep_level, c.rollout.gpu_memory_utilization = sleep_level, 0.5
    gpu = 80 * GIB
    resident = engine_bytes(c, a, True, 8, memory_bytes=gpu)
    assert resident == (40 * GIB if sleep_level == 0 else 0)
    cpu = engine_bytes(c, a, False, 8, memory_bytes=128 * GIB)
    c2 = cfg_with(tp=2, prompt=512, response=1024, micro_tokens=None, step=8, minibatch=8)
    assert cpu == engine_bytes(c2, a, False, 8, memory_bytes=128 * GIB) > 0
    # the resolver and the pre-step check count it (model states 31.9 GiB; 8192 tokens 15.3 GiB)
    tokens = resolve_micro_batch_tokens(c, a, on_gpu=True, memory_bytes=gpu, world_size=8)
    assert tokens == (1536 if sleep_level == 0 else 4096)  # level 0: one full sequence is all that is left
    if sleep_level == 0:
        with pytest.raises(ConfigError, match=r"\+ engine 40.0 GiB\), more than the 80.0 GiB"):
            check_micro_batch_memory(c, a, 8192, on_gpu=True, memory_bytes=gpu, world_size=8)
    else:
        assert check_micro_batch_memory(c, a, 8192, on_gpu=True, memory_bytes=gpu, world_size=8) is None
