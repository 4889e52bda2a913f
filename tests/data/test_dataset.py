import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_srft.data.dataset import DataError, Problem, load_problems, tokenize_problems
from megatron_srft.experiments.tiny import make_char_tokenizer

from tests.eval_data import EVAL_DATA


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=128)


def test_our_layout_jsonl(tmp_path):
    p = _jsonl(tmp_path, [
        {"prompt": "1+2", "answer": "3", "demonstration": "1+2=3. \\boxed{3}"},
        {"prompt": [{"role": "user", "content": "2+2"}], "answer": 4, "data_source": "arith"},
        "",
    ])
    probs = load_problems(p)
    assert probs[0] == Problem("1+2", "3", "1+2=3. \\boxed{3}", "d", f"{p}:1")
    assert probs[1].prompt == [{"role": "user", "content": "2+2"}]
    assert probs[1].answer == "4" and probs[1].demonstration is None and probs[1].data_source == "arith"


def test_verl_layout_parquet(tmp_path):
    rows = [{"data_source": "openr1", "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
             "ability": "math", "reward_model": {"ground_truth": "\\frac{1}{2}", "style": "rule"},
             "target": [{"role": "assistant", "content": "<think>\nx</think>\n\\boxed{\\frac12}"}],
             "extra_info": {"index": 0}}]
    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    (pr,) = load_problems(p, require_demo=True)
    assert pr.answer == "\\frac{1}{2}" and pr.demonstration.startswith("<think>") and pr.data_source == "openr1"
    assert pr.source == f"{p}:row 0" and pr.prompt[0]["role"] == "system"


@pytest.mark.parametrize("name,n,sources", [("math_eval", 2019, {"aime", "amc", "math", "minerva", "olympiad_bench"}),
                                            ("ood_arc_c", 1172, {"arc_c"}), ("ood_gpqa", 198, {"gpqa"})])
def test_shared_parquet_files(name, n, sources):
    probs = load_problems(f"{EVAL_DATA}/{name}.parquet")
    assert len(probs) == n and {p.data_source for p in probs} == sources
    assert all(isinstance(p.prompt, list) and p.prompt[0]["role"] == "system" and p.answer for p in probs)


@pytest.mark.parametrize("row,msg", [
    ({"answer": "1"}, "d.jsonl:2: prompt: missing field"),
    ({"prompt": "x"}, "d.jsonl:2: answer: missing field"),
    ({"prompt": "x", "answer": "1", "demonstration": "  "}, "d.jsonl:2: demonstration: empty demonstration"),
    ({"prompt": "x", "answer": 1.5}, "d.jsonl:2: answer: expected a string, got float"),
    ({"prompt": 3, "answer": "1"}, "d.jsonl:2: prompt: expected a non-empty list of chat messages, got int"),
    ({"prompt": [{"role": "bot", "content": "x"}], "answer": "1"}, "d.jsonl:2: prompt[0].role: expected one of"),
    ({"prompt": "x", "answer": "1", "target": []}, "d.jsonl:2: target: expected a non-empty list"),
    ({"prompt": "x", "reward_model": {"style": "rule"}}, "d.jsonl:2: answer: missing field"),
    ("{not json", "d.jsonl:2: not valid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object per line, got list"),
])
def test_malformed_rows_name_file_line_field(tmp_path, row, msg):
    p = _jsonl(tmp_path, [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(DataError) as e:
        load_problems(p)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_require_demo_and_bad_files(tmp_path):
    p = _jsonl(tmp_path, [{"prompt": "ok", "answer": "1"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: demonstration: missing field"):
        load_problems(p, require_demo=True)
    with pytest.raises(DataError, match="data file not found"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_problems(tmp_path / "x.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_problems(tmp_path / "bad.parquet")
    bad = [{"prompt": "q", "reward_model": {"ground_truth": "1"}, "target": [{"role": "assistant", "content": ""}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e.parquet:row 0: target\[0\].content: empty demonstration"):
        load_problems(tmp_path / "e.parquet")


def test_tokenize_filters_and_counts(tok, tmp_path):
    probs = [Problem("1+2", "3", "1+2=3", "a", "f:1"),
             Problem("9" * 50, "9", None, "a", "f:2"),  # prompt too long
             Problem("1", "1", "x" * 40, "a", "f:3"),  # demo too long
             Problem("5", "5", None, "b", "f:4")]
    out = tokenize_problems(probs, tok, "chat", max_prompt_length=20, max_response_length=10)
    assert len(out) == 2 and out.num_dropped_prompt == 1 and out.num_dropped_demo == 1 and out.num_dropped == 2
    t = out[0]
    assert tok.decode(t.prompt_ids) == "Q:1+2\nA:"
    assert t.demo_ids[-1] == tok.eos_token_id and tok.decode(t.demo_ids[:-1]) == "1+2=3"
    assert out[1].demo_ids is None and out[1].data_source == "b" and out[1].answer == "5"


def test_tokenize_batches_keep_demos_aligned(tok, monkeypatch):
    import megatron_srft.data.dataset as ds
    from megatron_srft.data.templates import encode_prompt

    monkeypatch.setattr(ds, "_TOKENIZE_BATCH", 2)
    probs = [Problem(f"{i}+1", str(i + 1), None if i % 3 == 0 else f"{i}+1={i + 1}", "a", f"f:{i}") for i in range(7)]
    out = tokenize_problems(probs, tok, "boxed", 1000, 1000)
    for pr, t in zip(probs, out):
        assert t.prompt_ids == encode_prompt(pr, tok, "boxed") and t.source == pr.source
        want = None if pr.demonstration is None else tok(pr.demonstration, add_special_tokens=False)["input_ids"]
        assert t.demo_ids == (None if want is None else want + [tok.eos_token_id])


def test_tokenize_verl_file_with_paper_template_keeps_its_system_prompt(tok):
    probs = load_problems(f"{EVAL_DATA}/ood_gpqa.parquet")
    out = tokenize_problems(probs, tok, "paper", 100_000, 10)
    assert len(out) == len(probs) and out.num_dropped == 0
    text = tok.decode(out[0].prompt_ids)
    assert text.startswith(probs[0].prompt[0]["content"][:40]) and text.endswith("\nA:")


def test_dropped_problems_are_counted_and_named(tok, tmp_path):
    p = _jsonl(tmp_path, [
        {"prompt": "1+2", "answer": "3", "demonstration": "3"},
        {"prompt": "9" * 40, "answer": "9"},
        {"prompt": "2+2", "answer": "4", "demonstration": "4" * 40},
        {"prompt": "8" * 50, "answer": "8"},
    ], name="eval.jsonl")
    toks = tokenize_problems(load_problems(p), tok, "plain", max_prompt_length=20, max_response_length=10)
    assert len(toks) == 1 and (toks.num_dropped_prompt, toks.num_dropped_demo) == (2, 1)
    assert [src for src, _ in toks.dropped] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    summary = toks.drop_summary(max_examples=2)
    assert summary.startswith("3 dropped: 2 with a prompt over data.max_prompt_length=20 tokens, 1 with a "
                              "demonstration over data.max_response_length=10 tokens")
    assert f"{p}:2 (prompt 40 tokens); {p}:3 (demonstration 41 tokens), ..." in summary
    none = tokenize_problems(load_problems(p)[:1], tok, "plain", max_prompt_length=20, max_response_length=10)
    assert none.drop_summary() == "" and none.dropped == []


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "1+2", "answer": "3"}\n{"prompt": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_problems(p)


def test_deeply_nested_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": ' + "[" * 200_000 + "]" * 200_000 + ', "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: nested too deeply"):
        load_problems(f)
