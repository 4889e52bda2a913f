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
from ..distributed.layout import check_vocab_padding
from .families import FAMILIES, architecture_families


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
        check_vocab_padding(divisible_by, tp_size)
        return int(math.ceil(self.vocab_size / divisible_by) * divisible_by)

    def num_params(self, tp: int = 1, pp: int = 1, padded_vocab: Optional[int] = None,
                   matmul_only: bool = False) -> int:
        """Parameter count: the whole model by default; with ``tp``/``pp``, what one GPU of the most loaded pipeline
        stage holds (the first holds the embedding, the last the head); ``padded_vocab`` counts the embedding rows
        Megatron allocates (default: the HF vocab).

        Per layer: QKV h*(q+2kv) (+ biases q+2kv), output q*h, SwiGLU 3*h*f, two norms 2h (+ q/k norms 2*head_dim);
        all split by TP except the norms, which we count whole (they are tiny).

        ``matmul_only``: N in FLOPs = 6*N per token, the weights every token multiplies through (all layers' matrices
        and the output layer, tied or not); the input embedding is a lookup, and norms and biases are negligible.
        """
        h, f = self.hidden_size, self.ffn_hidden_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        v = self.vocab_size if padded_vocab is None else padded_vocab
        matrices = h * (q + 2 * kv) + q * h + 3 * h * f
        if matmul_only:
            if (tp, pp) != (1, 1):
                raise ValueError("num_params: matmul_only counts the whole model (tp = pp = 1)")
            return self.num_layers * matrices + v * h
        split = matrices + ((q + 2 * kv) if self.qkv_bias else 0)
        whole = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        layers = (self.num_layers // pp) * (split // tp + whole)
        emb = v * h // tp
        if pp == 1:
            return layers + emb + h + (0 if self.tie_word_embeddings else emb)
        # Last stage: its layers, the final norm and the output layer (Megatron keeps a copy of a tied
        # embedding there under PP); the first stage has only layers + embedding, so the last is the larger.
        return layers + h + emb


def _get(cfg: dict, key: str, source: str, default=None, required: bool = True):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required and default is None:
        raise ConfigError(f"{source}: missing field '{key}'")
    return default


def arch_from_hf_config(cfg: dict, source: str = "config.json") -> ArchSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:  # an old config.json without ``architectures``: its model_type names the family
        arch = next((f.architectures[0] for f in FAMILIES.values() if f.model_type == cfg.get("model_type")), None)
    supported = architecture_families()
    if arch not in supported:
        raise ConfigError(
            f"{source}: unsupported architecture {arch or cfg.get('model_type')!r}; supported: "
            f"{', '.join(sorted(supported))}"
        )
    fam = supported[arch]
    heads = int(_get(cfg, "num_attention_heads", source))
    hidden = int(_get(cfg, "hidden_size", source))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling")
    if legacy_scaling:
        rope.update(legacy_scaling)
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (*fam.rope_types, None):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(fam.rope_types)}")
    scaling = None
    if rope_type == "llama3":
        scaling = {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(rope.get("original_max_position_embeddings", 8192)),
        }
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported; expected 'silu'")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    if cfg.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    qkv_bias = fam.qkv_bias == "always" or bool(cfg.get("attention_bias", False))
    if fam.qkv_bias == "never" and cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for {arch}")
    return ArchSpec(
        family=fam.name,
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
        qk_norm=fam.qk_norm,
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
    import torch  # lazy: config checks read ArchSpec, and torch would slow `srft launch --help` (0.06 -> 0.9 s)

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
