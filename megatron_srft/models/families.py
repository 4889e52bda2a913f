"""Every fact about a supported model family in one record: its Hugging Face names, its feature flags, its weight
rules and the recipe for a tiny model of it.

Adding a dense family with the same layer shape is one :class:`Family` in ``FAMILIES`` (plus a tiny case in
``tests/models/tiny_cases.py``): config loading (``arch.py``), the weight mapping (``mapping.py``) and the tiny
model maker (``experiments/tiny.py``) read everything from here.

Weight rules: each :class:`Rule` names a Megatron parameter (local-spec name, and the Transformer Engine spec
name where it differs), the HF tensors it is made of, the transform between them and how tensor parallelism
splits it (the transforms are described and implemented in ``mapping.py``). Layer names use ``{i}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Rule:
    mcore: str  # local-spec Megatron name ({i} = layer)
    hf: tuple[str, ...]  # HF names ({i} = layer), in the order the transform takes them
    kind: str  # copy | vocab | qkv | fc1
    tp_dim: Optional[int]  # dimension TP splits; None = replicated on every TP rank
    te: Optional[str] = None  # Transformer Engine spec name where it differs from the local spec
    when: Optional[str] = None  # an ArchSpec attribute that must be true ("untied" = not tie_word_embeddings)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

EMBED = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0)
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None)
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0, when="untied")
#: the layer of every dense family: pre-norm attention (fused QKV) and a SwiGLU MLP
DENSE_LAYER = (
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "copy", None,
         te=_L + "self_attention.linear_qkv.layer_norm_weight"),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), "qkv", 0),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "copy", 1),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "copy", None,
         te=_L + "mlp.linear_fc1.layer_norm_weight"),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "fc1", 0),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "copy", 1),
)
QKV_BIAS = (Rule(_L + "self_attention.linear_qkv.bias",
                 (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
                 "qkv", 0, when="qkv_bias"),)
QK_NORM = (
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), "copy", None, when="qk_norm"),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), "copy", None, when="qk_norm"),
)

#: HF tensors that carry no weights we need (recomputed buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Family:
    """One model family. ``name`` is our name for it (and HF's ``model_type``)."""

    name: str
    architectures: tuple[str, ...]  # HF ``architectures[0]`` values; the first is the one we write
    hf_config_class: str  # the transformers config class (the tiny-model maker instantiates it)
    qkv_bias: str  # "always" | "attention_bias" (only when config.json sets it) | "never" (attention_bias refused)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    layer_rules: tuple[Rule, ...]  # the weight rules of one layer (in export order)
    rope_types: tuple[str, ...] = ("default", "llama3")  # rope_type values config.json may name
    tiny_sets_head_dim: bool = False  # the tiny config names head_dim (its class has the field)

    @property
    def model_type(self) -> str:
        """HF's ``model_type`` (read when a config.json names no architecture): our name."""
        return self.name

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every weight rule in export order (embedding, layers, final norm, output); ``when`` drops optional ones."""
        return (EMBED, *self.layer_rules, FINAL_NORM, OUTPUT)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Qwen2 and Qwen2.5 (both Qwen2ForCausalLM): q/k/v always carry a bias.
    Family("qwen2", ("Qwen2ForCausalLM",), "Qwen2Config", qkv_bias="always", qk_norm=False,
           layer_rules=(*DENSE_LAYER, *QKV_BIAS)),
    Family("llama", ("LlamaForCausalLM",), "LlamaConfig", qkv_bias="attention_bias", qk_norm=False,
           layer_rules=(*DENSE_LAYER, *QKV_BIAS), tiny_sets_head_dim=True),
    Family("qwen3", ("Qwen3ForCausalLM",), "Qwen3Config", qkv_bias="never", qk_norm=True,
           layer_rules=(*DENSE_LAYER, *QK_NORM), tiny_sets_head_dim=True),
)}


def architecture_families() -> dict[str, Family]:
    """HF ``architectures[0]`` -> family, over every record."""
    return {a: f for f in FAMILIES.values() for a in f.architectures}
