"""The CPU toy task: arithmetic chains a tiny model learns in minutes on 2 cores.

A problem is a chain of additions and subtractions of small numbers, e.g. the prompt ``3+5-2`` with the
worked demonstration ``3+5=8,8-2=6. \\boxed{6}`` and the answer ``6``. Every step of the demonstration is one
operation on two small numbers, so a small transformer can learn the steps; chaining them without a slip is
what makes longer problems hard. The difficulty knobs are ``max_ops``
(problems have 2..max_ops operations), ``max_operand`` (operands 1..max_operand) and ``max_value`` (every
intermediate result v has 0 <= v < max_value). The defaults (4, 19, 100) are tuned so that a short plain SFT
leaves room for RL: on 2 CPU cores, AdamW lr 1e-3, batch 32, greedy held-out accuracy went
0% (0 steps) -> 5.5% (300 steps) -> 57% (600 steps); single-digit operands (max_operand 9) saturate
near 90-98% by 600 steps.

``srft make-toy --out DIR`` writes::

    DIR/model/        tiny Qwen2 (hidden 128, 4 heads of 32, 2 KV heads, 2 layers), random init, char tokenizer
    DIR/train.jsonl   prompts with demonstrations (our JSONL layout)
    DIR/test.jsonl    held-out prompts (no prompt string occurs in both files)
    DIR/toy.json      the settings used

Use it with ``data.template=chat`` (the char tokenizer's template renders ``Q:<prompt>\\nA:``) and the
``exact`` (or ``math``) reward, without think tags.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_SOURCE = "toy_arith"


@dataclass
class ToySettings:
    seed: int = 0
    num_train: int = 4000
    num_test: int = 200
    max_ops: int = 4
    max_operand: int = 19
    max_value: int = 100
    # model (head_dim = hidden / heads = 32: vLLM's CPU attention rejects 16)
    vocab_size: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256


def make_problem(rng: random.Random, max_ops: int, max_value: int, max_operand: int = 9) -> dict:
    """One chain of 2..max_ops operations (+/- an operand 1..max_operand); every intermediate value v has
    0 <= v < max_value."""
    num_ops = rng.randint(2, max_ops)
    value = rng.randint(1, min(max_operand, max_value - 1))
    prompt = str(value)
    steps = []
    for _ in range(num_ops):
        choices = [("+", d) for d in range(1, max_operand + 1) if value + d < max_value]
        choices += [("-", d) for d in range(1, max_operand + 1) if value - d >= 0]
        op, d = rng.choice(choices)
        new = value + d if op == "+" else value - d
        steps.append(f"{value}{op}{d}={new}")
        prompt += f"{op}{d}"
        value = new
    demo = ",".join(steps) + f". \\boxed{{{value}}}"
    return {"prompt": prompt, "answer": str(value), "demonstration": demo, "data_source": DATA_SOURCE}


def make_problems(settings: ToySettings) -> tuple[list[dict], list[dict]]:
    """(train, test) with distinct prompt strings; deterministic in ``settings.seed``."""
    rng = random.Random(settings.seed)
    seen: set[str] = set()
    rows: list[dict] = []
    need = settings.num_train + settings.num_test
    for _ in range(need * 50):
        row = make_problem(rng, settings.max_ops, settings.max_value, settings.max_operand)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
            if len(rows) == need:
                break
    if len(rows) < need:
        raise ValueError(f"only {len(rows)} distinct problems at max_ops={settings.max_ops}, "
                         f"max_value={settings.max_value}; ask for fewer or raise the difficulty")
    return rows[: settings.num_train], rows[settings.num_train:]


def write_toy_model(out_dir: str | Path, settings: ToySettings):
    """A randomly initialised tiny Qwen2 HF directory with the char tokenizer; returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.tiny import make_char_tokenizer, tiny_hf_config

    out = Path(out_dir)
    tok = make_char_tokenizer(out, vocab_size=settings.vocab_size)
    cfg = tiny_hf_config("qwen2", vocab_size=settings.vocab_size, hidden_size=settings.hidden_size,
                         num_layers=settings.num_layers, num_heads=settings.num_heads,
                         num_kv_heads=settings.num_kv_heads, intermediate_size=settings.intermediate_size,
                         max_position_embeddings=settings.max_position_embeddings)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # no sampling defaults baked into the model
    return model, tok


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def make_toy(out_dir: str | Path, settings: ToySettings = ToySettings(), overwrite: bool = False) -> Path:
    """Write the toy task to ``out_dir`` (built in a temporary sibling, renamed when complete)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train, test = make_problems(settings)
        write_toy_model(tmp / "model", settings)
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        (tmp / "toy.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
