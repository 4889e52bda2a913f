"""Tiny HF models covering every mapping rule, shared by the mapping, checkpoint and scoring tests."""

from __future__ import annotations

from pathlib import Path

#: name -> make_tiny_hf_model kwargs. vocab 100 is not a multiple of 128, so vocab padding is exercised.
CASES = {
    "qwen2_tied": dict(family="qwen2", vocab_size=100, tie_word_embeddings=True),
    "qwen2_untied": dict(family="qwen2", vocab_size=100, tie_word_embeddings=False),
    # GQA (4 query heads, 2 KV heads) and llama3 rope scaling whose original length (16) is below the test
    # sequence lengths, so the scaled frequencies matter.
    "llama_gqa_rope": dict(family="llama", vocab_size=100, tie_word_embeddings=False, num_heads=4, num_kv_heads=2,
                           rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3": dict(family="qwen3", vocab_size=100, tie_word_embeddings=False),
}


def full_round_trip(arch, hf: dict, padded_vocab: int) -> tuple[dict, dict]:
    """HF tensors -> {Megatron local-spec name: full TP=1 tensor} through the conversion's own stream (what
    mapping.load_hf_into_model applies), and back to {HF name: tensor} through each rule's inverse (what
    mapping.export_hf_weights applies)."""
    from megatron_srft.models.mapping import _convert_stream, expanded, hf_names, mcore_name, to_hf

    mc = {mcore_name(rule, layer): full for rule, layer, full in _convert_stream(arch, hf.items(), padded_vocab)}
    back: dict = {}
    for rule, layer in expanded(arch):
        if mcore_name(rule, layer) in mc:
            back.update(zip(hf_names(rule, layer), to_hf(rule, arch, mc[mcore_name(rule, layer)])))
    return mc, back


def make_case(out_dir: str | Path, name: str, seed: int = 0) -> Path:
    """Write the named tiny model (fp32 safetensors + char tokenizer) to ``out_dir``; returns the path."""
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    out = Path(out_dir)
    make_tiny_hf_model(out, seed=seed, hidden_size=128, num_layers=2, intermediate_size=256,
                       max_position_embeddings=256, **CASES[name])
    return out


def hf_logits(hf_dir: str | Path, input_ids):
    """transformers' fp32 logits [B, T, V] for ``input_ids`` [B, T]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits
