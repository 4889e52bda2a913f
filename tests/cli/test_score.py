"""`srft score`: log-probs and entropies equal transformers' at TP=1, TP=2 and PP=2; input errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from megatron_srft.errors import UserError
from megatron_srft.cli.score import read_rows
from tests.dist import run_ranks
from tests.models.tiny_cases import hf_logits, make_case

ROWS = [
    {"input_ids": list(range(5, 45)), "response_start": 30, "id": "a"},  # 40 tokens > rope original length 16
    {"text": "Q:12+30=?\nA:42"},
    {"input_ids": [7, 9]},
]


def _score(ckpt, data, out, tp, pp):
    from megatron_srft.cli.score import main

    return main(argparse.Namespace(ckpt=ckpt, data=data, out=out, tp=tp, pp=pp, dtype="fp32"))


def _reference(hf_dir, rows):
    """transformers' fp32 log p(x_t | x_<t) and entropy for t >= response_start."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    out = []
    for row in rows:
        ids = row["input_ids"] if "input_ids" in row else tok(row["text"])["input_ids"]
        logp_all = torch.log_softmax(hf_logits(hf_dir, torch.tensor([ids]))[0, :-1].double(), -1)
        start = row.get("response_start", 1)
        lp = logp_all.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][start - 1:]
        ent = -(logp_all.exp() * logp_all).sum(-1)[start - 1:]
        out.append((lp, ent))
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_score_matches_transformers(tmp_path, tp, pp):
    hf = make_case(tmp_path / "hf", "llama_gqa_rope")
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"
    run_ranks(_score, tp * pp, str(hf), str(data), str(out), tp, pp)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(ROWS) and got[0]["id"] == "a" and "id" not in got[1]
    for g, (lp, ent) in zip(got, _reference(hf, ROWS)):
        assert len(g["logprobs"]) == len(lp) == len(g["entropy"])
        assert torch.allclose(torch.tensor(g["logprobs"], dtype=torch.float64), lp, atol=1e-4)
        assert torch.allclose(torch.tensor(g["entropy"], dtype=torch.float64), ent, atol=1e-4)


def test_bad_rows_name_the_line(tmp_path):
    data = tmp_path / "in.jsonl"
    cases = [
        ('{"input_ids": [1, 2]}\n{"input_ids": [1, 200]}\n', "in.jsonl:2: token id 200 outside the vocabulary"),
        ('{"input_ids": [1, 2], "response_start": 2}\n', "in.jsonl:1: response_start: expected an integer in [1, 1]"),
        ('{"input_ids": [1]}\n', "response_start"),
        ("not json\n", "in.jsonl:1: not valid JSON"),
        ('{"tokens": [1, 2]}\n', "expected 'input_ids'"),
        ('{"text": "abc"}\n', "need tokenizer files"),
    ]
    for text, msg in cases:
        data.write_text(text)
        with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            read_rows(data, None, 100)
    with pytest.raises(UserError, match="input file not found"):
        read_rows(tmp_path / "missing.jsonl", None, 100)


def test_a_model_too_large_for_its_gpus_is_refused_naming_tp(tmp_path):
    """On a GPU machine the scored model lives on the GPUs: weights beyond one GPU at --tp/--pp are refused in one
    line before the model is built (pure: the GPU's memory is an argument)."""
    from megatron_srft.checkpoint.convert import resolve_source, weights_bytes_per_rank
    from megatron_srft.cli.score import score_device
    from megatron_srft.config import ParallelConfig

    from megatron_srft.experiments.tiny import tiny_hf_config

    tiny_hf_config(vocab_size=100, tie_word_embeddings=False).save_pretrained(tmp_path)  # the sizes are all it takes
    source = resolve_source(tmp_path)
    tp1, tp2 = ParallelConfig(), ParallelConfig(tensor_model_parallel_size=2)
    one, half = weights_bytes_per_rank(source, tp1, "bf16"), weights_bytes_per_rank(source, tp2, "bf16")
    gpu = (one + half) // 2  # holds half the model, not all of it
    with pytest.raises(UserError) as e:
        score_device(source, tp1, "bf16", True, gpu)
    assert str(e.value).startswith("--tp/--pp: the model's weights alone need") and "TP=1 PP=1" in str(e.value)
    assert "\n" not in str(e.value)
    assert score_device(source, tp2, "bf16", True, gpu, local_rank=1) == torch.device("cuda", 1)
    assert score_device(source, tp1, "bf16", False, None) == torch.device("cpu")
