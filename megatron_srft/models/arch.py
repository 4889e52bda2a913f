"""A normalised view of a Hugging Face ``config.json`` for the families we support.

Both the old (``rope_theta`` / ``rope_scaling``) and the transformers-5 (``rope_parameters``) spellings are
read. Anything we cannot represent exactly is an error here rather than a silent numerical difference later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError

#: HF ``architectures[0]`` -> our family name. Qwen2.5 uses Qwen2ForCausalLM.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ArchSpec:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: Optional[dict] = None  # llama3 parameters, or None
    hf_config: dict = field(default_factory=dict, repr=False)

    def padded_vocab_size(self, divisible_by: int, tp_size: int = 1) -> int:
        """Rows of the embedding: vocab rounded up to a multiple of ``divisible_by``.

        The padding does not depend on TP (``divisible_by`` must be a multiple of the TP size), so a
        distributed checkpoint has the same global shapes at every layout and reshards on load.
        """
        if divisible_by % tp_size:
            raise ConfigError(f"model.make_vocab_size_divisible_by: {divisible_by} is not a multiple of "
                              f"tensor_model_parallel_size ({tp_size})")
        return int(math.ceil(self.vocab_size / divisible_by) * divisible_by)

    def num_params(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


def _get(cfg: dict, key: str, source: str, default=None, required: bool = True):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required and default is None:
        raise ConfigError(f"{source}: missing field '{key}'")
    return default


def arch_from_hf_config(cfg: dict, source: str = "config.json") -> ArchSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:
        by_type = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        arch = by_type.get(cfg.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported architecture {arch or cfg.get('model_type')!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    heads = int(_get(cfg, "num_attention_heads", source))
    hidden = int(_get(cfg, "hidden_size", source))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling")
    if legacy_scaling:
        rope.update(legacy_scaling)
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(rope.get("original_max_position_embeddings", 8192)),
        }
    elif rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: default, llama3")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported; expected 'silu'")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    if cfg.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    qkv_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
    if family == "qwen3" and cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for Qwen3")
    return ArchSpec(
        family=family,
        architecture=arch,
        vocab_size=int(_get(cfg, "vocab_size", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size", source)),
        num_layers=int(_get(cfg, "num_hidden_layers", source)),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        hf_config=cfg,
    )


def load_arch(model_dir: str | Path) -> ArchSpec:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (expected a Hugging Face config.json)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return arch_from_hf_config(cfg, str(path))


def rope_inv_freq(spec: ArchSpec):
    """inv_freq exactly as transformers computes it (default and llama3 rope types)."""
    import torch

    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = spec.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, inv_llama)
