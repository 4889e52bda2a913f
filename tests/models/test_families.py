"""The family records: every fact about a family is read from its record, so a dense family with the same layer
shape is one record (plus a tiny case) and nothing else."""

from __future__ import annotations

import torch

from megatron_srft.experiments.tiny import make_tiny_hf_model
from megatron_srft.models.arch import load_arch
from megatron_srft.models.families import DENSE_LAYER, FAMILIES, Family
from megatron_srft.models.mapping import HFWeights, check_hf_names
from tests.models.tiny_cases import CASES, full_round_trip


def test_every_family_has_a_tiny_case():
    assert {c["family"] for c in CASES.values()} == set(FAMILIES)


def test_a_record_added_at_run_time_is_read_by_arch_loading_mapping_and_the_tiny_maker(tmp_path, monkeypatch):
    # Mistral's layer is Llama's without biases: a record is all it takes (the test adds it for itself only).
    monkeypatch.setitem(FAMILIES, "mistral", Family("mistral", ("MistralForCausalLM",), "MistralConfig",
                                                    qkv_bias="never", qk_norm=False, layer_rules=DENSE_LAYER,
                                                    tiny_sets_head_dim=True))
    make_tiny_hf_model(tmp_path, family="mistral", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    arch = load_arch(tmp_path)
    assert (arch.family, arch.architecture, arch.qkv_bias, arch.qk_norm) == ("mistral", "MistralForCausalLM",
                                                                           False, False)
    weights = HFWeights(tmp_path)
    check_hf_names(arch, weights.names())
    hf = dict(weights.iter_tensors())
    assert arch.num_params() == sum(t.numel() for t in hf.values())
    _, back = full_round_trip(arch, hf, arch.padded_vocab_size(128))
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_a_config_without_architectures_is_read_by_its_model_type():
    from megatron_srft.models.arch import arch_from_hf_config

    cfg = dict(hidden_size=64, num_attention_heads=4, vocab_size=10, intermediate_size=8, num_hidden_layers=1)
    for fam in FAMILIES.values():
        assert arch_from_hf_config(dict(cfg, model_type=fam.model_type)).family == fam.name
