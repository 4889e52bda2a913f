"""Tiny Hugging Face models and a character-level tokenizer, made locally (no hub access).

Used by the tests, the toy task, the demo and the benchmarks. The tokenizer is a ``PreTrainedTokenizerFast``
(WordLevel over single characters), which transformers and vLLM both load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..models.families import FAMILIES

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEFAULT_CHARS = list("0123456789+-*/=()., ?:abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n<>_{}\\[]!;'\"#%&@^|~`$")


def make_char_tokenizer(out_dir: str | Path, chars: Optional[list[str]] = None, vocab_size: Optional[int] = None):
    """Write a character-level tokenizer to ``out_dir``; returns the loaded ``PreTrainedTokenizerFast``.

    ``vocab_size`` pads the vocabulary with unused ``<extra_i>`` tokens (to exercise vocab padding/TP splits).
    """
    # lazy (transformers and torch, here and below): `srft make-toy --help` imports this module, without them
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(chars or DEFAULT_CHARS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} tokens needed")
        while len(vocab) < vocab_size:
            vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode joins characters without spaces (the default joins with " ")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% elif m['role'] == 'user' %}{{ 'Q:' + m['content'] + '\\n' }}"
        "{% else %}{{ 'A:' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def tiny_hf_config(family: str = "qwen2", vocab_size: int = 128, hidden_size: int = 128, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
                   tie_word_embeddings: bool = True, max_position_embeddings: int = 512,
                   rope_scaling: Optional[dict] = None, rope_theta: float = 10000.0):
    """A transformers config object for a tiny model of the given family (head_dim = hidden / heads)."""
    import transformers  # slow to import: only the makers need it

    fam = FAMILIES[family]
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
              num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
              tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {"rope_theta": rope_theta, **rope_scaling}
    kw["rope_parameters"] = rope
    if fam.tiny_sets_head_dim:
        kw["head_dim"] = hidden_size // num_heads
    cfg = getattr(transformers, fam.hf_config_class)(**kw)
    cfg.architectures = [fam.architectures[0]]
    return cfg


def make_tiny_hf_model(out_dir: str | Path, family: str = "qwen2", seed: int = 0, dtype: str = "float32",
                       tokenizer_chars: Optional[list[str]] = None, **config_kw):
    """Save a randomly initialised tiny HF model (safetensors) plus a char tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_char_tokenizer(out, tokenizer_chars, vocab_size=config_kw.get("vocab_size", 128))
    cfg = tiny_hf_config(family, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # give norms non-trivial weights so conversion bugs in them show up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    return model, tok


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
