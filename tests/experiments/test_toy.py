import json
import random
import re

import pytest

from megatron_srft.cli import main as cli_main
from megatron_srft.data.dataset import load_problems, tokenize_problems
from megatron_srft.data.templates import load_tokenizer
from megatron_srft.experiments.toy import ToySettings, make_problem, make_problems
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


def _num_ops(prompt: str) -> int:
    return sum(ch in "+-" for ch in prompt)


def test_ood_problems_are_longer_chains_and_leave_train_test_unchanged():
    from megatron_srft.experiments.toy import make_ood_problems

    base = ToySettings(num_train=300, num_test=50)
    s = ToySettings(num_train=300, num_test=50, num_ood_test=40)
    assert make_problems(s) == make_problems(base)  # the OOD draw has its own random stream
    ood = make_ood_problems(s)
    assert len(ood) == 40 and len({r["prompt"] for r in ood}) == 40
    assert {_num_ops(r["prompt"]) for r in ood} <= {5, 6} and s.ood_ops == (5, 6)
    for r in ood:
        assert eval(r["prompt"]) == int(r["answer"])  # our own generated arithmetic
        assert exact_score(r["demonstration"], r["answer"]) == 1.0
    assert max(_num_ops(r["prompt"]) for r in make_problems(s)[0]) <= s.max_ops
    with pytest.raises(ValueError, match="ood_min_ops"):
        ToySettings(num_ood_test=5, ood_min_ops=3).check()


def _added(prompt: str) -> set[int]:
    return {int(d) for d in re.findall(r"\+(\d+)", prompt)}


def test_held_out_operands_are_added_only_in_their_split():
    from megatron_srft.experiments.toy import make_held_out_problems, make_ood_problems

    s = ToySettings(num_train=300, num_test=50, num_ood_test=40, held_out_plus_min=13, num_held_out_test=40)
    s.check()
    train, test = make_problems(s)
    assert len(train) == 300 and len(test) == 50
    # no training, test or longer-chain problem adds 13..19; subtracting them stays allowed
    for r in train + test + make_ood_problems(s):
        assert max(_added(r["prompt"]), default=0) < 13
    assert any(int(d) >= 13 for r in train for d in re.findall(r"-(\d+)", r["prompt"]))
    held = make_held_out_problems(s)
    assert len(held) == 40 and len({r["prompt"] for r in held}) == 40
    for r in held:
        assert max(_added(r["prompt"])) >= 13 and 2 <= _num_ops(r["prompt"]) <= s.max_ops  # the training length
        assert eval(r["prompt"]) == int(r["answer"])  # our own generated arithmetic
        assert exact_score(r["demonstration"], r["answer"]) == 1.0
    assert make_held_out_problems(s) == held
    # off by default: every operand may be added
    assert any(max(_added(r["prompt"]), default=0) >= 13 for r in make_problems(ToySettings(num_train=300))[0])
    with pytest.raises(ValueError, match="held_out_plus_min"):
        ToySettings(held_out_plus_min=20).check()
    with pytest.raises(ValueError, match="num_held_out_test"):
        ToySettings(num_held_out_test=5).check()


def test_slipped_demonstrations_are_wrong_by_one_step():
    from megatron_srft.experiments.toy import corrupt_demonstrations

    train, _ = make_problems(ToySettings(num_train=200, num_test=10))
    noisy = corrupt_demonstrations(train, 0.3, seed=0)
    assert corrupt_demonstrations(train, 0.3, seed=0) == noisy  # deterministic
    wrong = [r for r in noisy if not r["demo_correct"]]
    assert len(wrong) == 60
    for clean, r in zip(train, noisy):
        assert (r["prompt"], r["answer"]) == (clean["prompt"], clean["answer"])
        if r["demo_correct"]:
            assert r["demonstration"] == clean["demonstration"]
            continue
        assert exact_score(r["demonstration"], r["answer"]) == 0.0  # the verifier sees the slip
        steps = [re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", x).groups()
                 for x in r["demonstration"].split(". ")[0].split(",")]
        # the prompt's operations, each step starting from the previous step's (possibly wrong) value
        assert "".join(op + d for _, op, d, _ in steps) == r["prompt"][len(steps[0][0]):]
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))
        slips = [a for a, op, d, v in steps if int(a) + (int(d) if op == "+" else -int(d)) != int(v)]
        assert len(slips) == 1  # exactly one step is computed wrong


def test_make_toy_cli_ood_and_noisy(tmp_path):
    out = tmp_path / "toy"
    assert cli_main(["make-toy", "--out", str(out), "--num-train", "50", "--num-test", "10", "--num-ood-test", "7",
                     "--demo-error-rate", "0.2"]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert sum(not r["demo_correct"] for r in rows) == 10
    assert len(load_problems(out / "test_ood.jsonl")) == 7
    assert json.loads((out / "toy.json").read_text())["demo_error_rate"] == 0.2
    assert cli_main(["make-toy", "--out", str(tmp_path / "x"), "--demo-error-rate", "1.5"]) == 2


def test_make_toy_cli_held_out_operands(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli_main(["make-toy", "--out", str(out), "--num-train", "50", "--num-test", "10",
                     "--held-out-plus-min", "13", "--num-held-out-test", "6"]) == 0
    assert "test_held_out.jsonl (6)" in capsys.readouterr().out
    assert len(load_problems(out / "test_held_out.jsonl")) == 6
    assert json.loads((out / "toy.json").read_text())["held_out_plus_min"] == 13
    assert cli_main(["make-toy", "--out", str(tmp_path / "x"), "--num-held-out-test", "3"]) == 2  # needs the min
