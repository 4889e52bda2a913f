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

    DIR/model/         tiny Qwen2 (hidden 128, 4 heads of 32, 2 KV heads, 2 layers), random init, char tokenizer
    DIR/train.jsonl    prompts with demonstrations (our JSONL layout)
    DIR/test.jsonl     held-out prompts (no prompt string occurs in both files)
    DIR/test_ood.jsonl only with ``num_ood_test`` > 0: out-of-distribution prompts, chains of ``ood_min_ops`` ..
                       ``ood_max_ops`` operations (default max_ops + 1 .. max_ops + 2: longer than any training
                       problem), same operand and value ranges
    DIR/test_held_out.jsonl only with ``num_held_out_test`` > 0: out-of-distribution prompts of the training
                       length (2..max_ops operations), each with at least one addition of a held-out operand
                       (``+d`` with d >= ``held_out_plus_min``), which no train, test or longer-chain problem has
    DIR/toy.json       the settings used

Held-out operands (``held_out_plus_min``, default None = off): no problem in train.jsonl, test.jsonl or
test_ood.jsonl adds an operand >= held_out_plus_min (subtracting it, or reaching such values, stays allowed), so
a model trained on them has never seen the step ``v+d`` for those d; test_held_out.jsonl asks for exactly that.

Imperfect demonstrations (``demo_error_rate`` > 0, default 0): that fraction of the training demonstrations,
chosen at random, carries one arithmetic slip the way a distilled trace does: one step's result is off by 1..3,
the chain continues correctly from the wrong value, and the boxed answer is wrong (the reference ``answer`` stays
right, so the verifier scores such a demonstration 0). Every row then has ``demo_correct``. The defaults write
exactly the files they wrote before these options existed (the same problems for the same seed).

Use it with ``data.template=chat`` (the char tokenizer's template renders ``Q:<prompt>\\nA:``) and the
``exact`` (or ``math``) reward, without think tags.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint.atomic import atomic_dir
from ..errors import UserError
from .tiny import make_char_tokenizer, tiny_hf_config

DATA_SOURCE = "toy_arith"


@dataclass
class ToySettings:
    seed: int = 0
    num_train: int = 4000
    num_test: int = 200
    max_ops: int = 4
    max_operand: int = 19
    max_value: int = 100
    num_ood_test: int = 0              # out-of-distribution test problems (test_ood.jsonl); 0 = none
    ood_min_ops: Optional[int] = None  # None = max_ops + 1
    ood_max_ops: Optional[int] = None  # None = max_ops + 2
    demo_error_rate: float = 0.0       # fraction of training demonstrations with one arithmetic slip
    held_out_plus_min: Optional[int] = None  # '+d' with d >= this occurs only in test_held_out.jsonl; None = off
    num_held_out_test: int = 0         # test_held_out.jsonl problems (needs held_out_plus_min)
    # model (head_dim = hidden / heads = 32: vLLM's CPU attention rejects 16)
    vocab_size: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256

    @property
    def ood_ops(self) -> tuple[int, int]:
        """(min, max) operations of the out-of-distribution problems."""
        lo = self.max_ops + 1 if self.ood_min_ops is None else self.ood_min_ops
        hi = lo + 1 if self.ood_max_ops is None else self.ood_max_ops
        return lo, hi

    def check(self) -> None:
        """ValueError naming the field for settings that cannot make the promised task."""
        if not 0.0 <= self.demo_error_rate <= 1.0:
            raise ValueError(f"demo_error_rate: expected 0 <= rate <= 1, got {self.demo_error_rate}")
        if self.num_ood_test < 0:
            raise ValueError(f"num_ood_test: expected >= 0, got {self.num_ood_test}")
        if self.held_out_plus_min is not None and not 2 <= self.held_out_plus_min <= self.max_operand:
            raise ValueError(f"held_out_plus_min: expected 2 <= value <= max_operand ({self.max_operand}), got "
                             f"{self.held_out_plus_min}")
        if self.num_held_out_test < 0 or (self.num_held_out_test and self.held_out_plus_min is None):
            raise ValueError(f"num_held_out_test: expected 0, or >= 1 with held_out_plus_min set, got "
                             f"{self.num_held_out_test} (held_out_plus_min {self.held_out_plus_min})")
        lo, hi = self.ood_ops
        if self.num_ood_test and not self.max_ops < lo <= hi:
            raise ValueError(f"ood_min_ops/ood_max_ops: expected max_ops ({self.max_ops}) < min <= max, got "
                             f"{lo}..{hi} (out-of-distribution problems are longer than every training problem)")


def make_problem(rng: random.Random, max_ops: int, max_value: int, max_operand: int = 9, min_ops: int = 2) -> dict:
    """One chain of min_ops..max_ops operations (+/- an operand 1..max_operand); every intermediate value v has
    0 <= v < max_value."""
    num_ops = rng.randint(min_ops, max_ops)
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


def adds_held_out_operand(prompt: str, held_out_plus_min: Optional[int]) -> bool:
    """Whether ``prompt`` adds an operand >= held_out_plus_min (never, when that is None)."""
    if held_out_plus_min is None:
        return False
    return any(op == "+" and d >= held_out_plus_min for op, d in _chain(prompt)[1])


def make_problems(settings: ToySettings) -> tuple[list[dict], list[dict]]:
    """(train, test) with distinct prompt strings, none adding a held-out operand; deterministic in
    ``settings.seed``."""
    rng = random.Random(settings.seed)
    seen: set[str] = set()
    rows: list[dict] = []
    need = settings.num_train + settings.num_test
    for _ in range(need * 50):
        row = make_problem(rng, settings.max_ops, settings.max_value, settings.max_operand)
        if adds_held_out_operand(row["prompt"], settings.held_out_plus_min):
            continue
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
            if len(rows) == need:
                break
    if len(rows) < need:
        raise ValueError(f"only {len(rows)} distinct problems at max_ops={settings.max_ops}, "
                         f"max_value={settings.max_value}; ask for fewer or raise the difficulty")
    return rows[: settings.num_train], rows[settings.num_train:]


def make_ood_problems(settings: ToySettings) -> list[dict]:
    """``settings.num_ood_test`` distinct problems of ``settings.ood_ops`` operations (none adding a held-out
    operand: they differ from training in length only); deterministic in the seed and independent of the
    train/test draw (its own random stream), so adding them changes no other file."""
    lo, hi = settings.ood_ops
    rng = random.Random(f"ood-{settings.seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(settings.num_ood_test * 50):
        row = make_problem(rng, hi, settings.max_value, settings.max_operand, min_ops=lo)
        if adds_held_out_operand(row["prompt"], settings.held_out_plus_min):
            continue
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append({**row, "data_source": f"{DATA_SOURCE}_ood"})
            if len(rows) == settings.num_ood_test:
                return rows
    raise ValueError(f"only {len(rows)} distinct problems of {lo}..{hi} operations; ask for fewer")


def make_held_out_problems(settings: ToySettings) -> list[dict]:
    """``settings.num_held_out_test`` distinct problems of the training length (2..max_ops operations), each
    adding at least one held-out operand (d >= ``held_out_plus_min`` after a '+'), so none occurs in training;
    deterministic in the seed, its own random stream (adding them changes no other file)."""
    rng = random.Random(f"held-out-{settings.seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(settings.num_held_out_test * 200):
        row = make_problem(rng, settings.max_ops, settings.max_value, settings.max_operand)
        if adds_held_out_operand(row["prompt"], settings.held_out_plus_min) and row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append({**row, "data_source": f"{DATA_SOURCE}_held_out"})
            if len(rows) == settings.num_held_out_test:
                return rows
    raise ValueError(f"only {len(rows)} distinct problems adding an operand >= {settings.held_out_plus_min}; "
                     f"ask for fewer")


def _chain(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """``3+5-2`` -> (3, [("+", 5), ("-", 2)]) (the toy's own prompts: digits and + / - only)."""
    ops, num, start, pending = [], "", None, "+"
    for ch in prompt + "+":
        if ch.isdigit():
            num += ch
            continue
        if start is None:
            start = int(num)
        else:
            ops.append((pending, int(num)))
        pending, num = ch, ""
    return start, ops


def slipped_demonstration(prompt: str, rng: random.Random, max_slip: int = 3) -> tuple[str, str]:
    """A worked chain for ``prompt`` with one arithmetic slip: the result of one step (chosen at random) is off by
    1..max_slip (never below 0), later steps are computed correctly from the wrong value. Returns (demonstration,
    its wrong final answer); the error carries through every later +/- step, so the final answer is always wrong."""
    value, ops = _chain(prompt)
    slip_at = rng.randrange(len(ops))
    steps = []
    for i, (op, d) in enumerate(ops):
        new = value + d if op == "+" else value - d
        if i == slip_at:
            deltas = [x for x in range(-max_slip, max_slip + 1) if x and new + x >= 0]
            new += rng.choice(deltas)
        steps.append(f"{value}{op}{d}={new}")
        value = new
    return ",".join(steps) + f". \\boxed{{{value}}}", str(value)


def corrupt_demonstrations(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """Copies of ``rows`` where exactly round(rate * len(rows)) demonstrations, chosen at random, carry one slip
    (:func:`slipped_demonstration`); every returned row has ``demo_correct``. ``answer`` stays the true one."""
    rng = random.Random(f"slips-{seed}")
    wrong = set(rng.sample(range(len(rows)), round(rate * len(rows))))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in wrong:
            row["demonstration"], _ = slipped_demonstration(row["prompt"], rng)
        row["demo_correct"] = i not in wrong
        out.append(row)
    return out


def write_toy_model(out_dir: str | Path, settings: ToySettings):
    """A randomly initialised tiny Qwen2 HF directory with the char tokenizer; returns (model, tokenizer)."""
    # lazy: `srft make-toy --help` and the study's settings need neither torch nor transformers
    import torch
    from transformers import AutoModelForCausalLM

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
    settings.check()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if out.exists() and any(out.iterdir()) and not (out / "toy.json").is_file():  # never remove what we did not write
        raise UserError(f"--out {out}: exists and is not a toy written by make-toy (no toy.json); --overwrite "
                        f"replaces only that: choose a new directory")
    with atomic_dir(out) as tmp:
        train, test = make_problems(settings)
        if settings.demo_error_rate > 0:
            train = corrupt_demonstrations(train, settings.demo_error_rate, settings.seed)
        write_toy_model(tmp / "model", settings)
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        if settings.num_ood_test:
            _write_jsonl(tmp / "test_ood.jsonl", make_ood_problems(settings))
        if settings.num_held_out_test:
            _write_jsonl(tmp / "test_held_out.jsonl", make_held_out_problems(settings))
        (tmp / "toy.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return out
