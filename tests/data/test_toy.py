import json
import random

import pytest

from megatron_srft.cli import main as cli_main
from megatron_srft.data.dataset import load_problems, tokenize_problems
from megatron_srft.data.templates import load_tokenizer
from megatron_srft.data.toy import ToySettings, make_problem, make_problems
from megatron_srft.rewards import exact_score, math_score


def test_problems_are_correct_chains():
    rng = random.Random(0)
    for _ in range(500):
        row = make_problem(rng, max_ops=5, max_value=60, max_operand=19)
        assert eval(row["prompt"]) == int(row["answer"])  # our own generated arithmetic, not user input
        steps = row["demonstration"].split(". ")[0].split(",")
        assert 2 <= len(steps) <= 5
        for s in steps:
            lhs, rhs = s.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) < 60
        assert exact_score(row["demonstration"], row["answer"]) == 1.0
        assert math_score(row["demonstration"], row["answer"]) == 1.0


def test_train_test_disjoint_and_deterministic():
    s = ToySettings(num_train=300, num_test=50)
    train, test = make_problems(s)
    assert len(train) == 300 and len(test) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert make_problems(s) == (train, test)
    with pytest.raises(ValueError, match="distinct problems"):
        make_problems(ToySettings(num_train=200, num_test=10, max_ops=2, max_value=10, max_operand=2))


def test_make_toy_cli(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli_main(["make-toy", "--out", str(out), "--num-train", "50", "--num-test", "10"]) == 0
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["hidden_size"] // cfg["num_attention_heads"] >= 32
    train = load_problems(out / "train.jsonl", require_demo=True)
    assert len(train) == 50 and len(load_problems(out / "test.jsonl")) == 10
    tok = load_tokenizer(out / "model")
    t = tokenize_problems(train, tok, "chat", 64, 64)
    assert len(t) == 50 and tok.decode(t[0].prompt_ids) == f"Q:{train[0].prompt}\nA:"
    assert tok.decode(t[0].demo_ids, skip_special_tokens=True) == train[0].demonstration  # spaces survive
    assert cli_main(["make-toy", "--out", str(out)]) == 2  # exists: refused
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli_main(["make-toy", "--out", str(out), "--max-ops", "1"]) == 2
