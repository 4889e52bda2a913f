import itertools
from math import comb

import pytest

from megatron_srft.cli import main as cli_main
from megatron_srft.rollout.evaluation import avg_at_k, markdown_table, pass_at_k, pass_at_k_estimate, summarise


def _pass_at_k_slow(scores, k):
    """Fraction of k-subsets of the samples that hold a correct one (the definition the estimator is unbiased for)."""
    subsets = list(itertools.combinations(range(len(scores)), k))
    return sum(any(scores[i] >= 0.5 for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        scores = [1.0] * c + [0.0] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k_estimate(n, c, k) == pytest.approx(_pass_at_k_slow(scores, k), abs=1e-12)
            assert pass_at_k_estimate(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_and_avg_over_problems():
    scores = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(scores) == pytest.approx((0.25 + 1 + 0) / 3)
    assert pass_at_k(scores, 1) == pytest.approx(avg_at_k(scores))  # pass@1 = avg@k for 0/1 scores
    assert pass_at_k(scores, 4) == pytest.approx(2 / 3)
    assert pass_at_k(scores, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        pass_at_k_estimate(2, 1, 3)


def test_summarise_and_table():
    recs = [{"data_source": "b", "scores": [1.0, 0.0, 0.0], "num_tokens": [3, 5, 7],
             "finish_reasons": ["stop", "length", "stop"]},
            {"data_source": "a", "scores": [1.0, 1.0, 1.0], "num_tokens": [1, 1, 1],
             "finish_reasons": ["stop"] * 3},
            {"data_source": "b", "scores": [0.0, 0.0, 0.0], "num_tokens": [2, 2, 2],
             "finish_reasons": ["stop"] * 3}]
    s = summarise(recs)
    assert list(s) == ["a", "b", "all"]
    assert s["b"] == {"num_problems": 2, "n_samples": 3, "avg@3": pytest.approx(1 / 6),
                      "pass@1": pytest.approx(1 / 6), "pass@2": pytest.approx((2 / 3) / 2), "pass@3": 0.5,
                      "mean_response_tokens": pytest.approx(21 / 6), "truncated_fraction": pytest.approx(1 / 6)}
    assert s["all"]["num_problems"] == 3 and s["all"]["avg@3"] == pytest.approx((1 / 3 + 1) / 3)
    table = markdown_table(s)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| data_source | num_problems | n_samples | avg@3 (%) | pass@1 (%)")
    assert lines[3].startswith("| b | 2 | 3 | 16.7 | 16.7 | 33.3 | 50.0 | 3.5 | 16.7 |")
    with pytest.raises(ValueError, match="mixes different numbers of samples"):
        summarise([{"data_source": "a", "scores": [1.0]}, {"data_source": "a", "scores": [1.0, 0.0]}])


def test_table_escapes_pipes_and_newlines_in_data_source():
    recs = [{"data_source": "a|b\nc", "scores": [1.0]}, {"data_source": "plain", "scores": [0.0]}]
    lines = markdown_table(summarise(recs)).splitlines()
    assert len(lines) == 5  # header, rule, two sources, all
    assert lines[2].startswith("| a\\|b c | 1 | 1 | 100.0 |"), lines[2]
    assert all(line.count("|") - line.count("\\|") == lines[0].count("|") for line in lines)


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "none"), "--data", "x.jsonl", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "srft eval: error: --model:" in err and "config.json not found" in err
    assert cli_main(["eval", "--model", "m", "--data", "x.jsonl", "--out", "o", "--n-samples", "4"]) == 2
    assert "--n-samples > 1 at --temperature 0" in capsys.readouterr().err


def test_eval_end_to_end_on_the_toy_model(tmp_path, capsys):
    """Real vLLM engine + real reward pool through `srft eval` on the (untrained) toy model."""
    pytest.importorskip("vllm")
    import json

    toy = tmp_path / "toy"
    assert cli_main(["make-toy", "--out", str(toy), "--num-train", "20", "--num-test", "6"]) == 0
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--model", str(toy / "model"), "--data", str(toy / "test.jsonl"), "--n-samples", "2",
                   "--temperature", "1.0", "--max-tokens", "24", "--template", "chat", "--reward", "exact",
                   "--reward-workers", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]
    assert set(s) == {"toy_arith", "all"} and s["all"]["num_problems"] == 6 and s["all"]["n_samples"] == 2
    assert set(s["all"]) >= {"avg@2", "pass@1", "pass@2", "mean_response_tokens", "truncated_fraction"}
    assert results["settings"]["require_think"] is False
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(r["responses"]) == 2 and len(r["scores"]) == 2 for r in samples)
    assert all(0 < t <= 24 for r in samples for t in r["num_tokens"])
    assert (out / "results.md").read_text().startswith("| data_source |")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp dirs renamed or removed
