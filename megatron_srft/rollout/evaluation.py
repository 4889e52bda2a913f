"""``srft eval``: sample K responses per problem through the rollout engine, grade them, report avg@k / pass@k.

Metrics, per data_source and over all problems (each problem counts once, whatever its source):

- avg@k: the mean score of the k samples, averaged over problems (the paper's avg@32 on AIME24/AMC;
  avg@1 at temperature 0 is greedy accuracy, the paper's "pass@1" of the other benchmarks).
- pass@j for j in 1, 2, 4, ..., k: the unbiased estimator of "at least one of j samples is correct" from
  k >= j samples of which c are correct (Chen et al. 2021):
      pass@j = 1 - C(k - c, j) / C(k, j) = 1 - prod_{i=k-c+1}^{k} (1 - j / i)
  (the product form avoids huge binomials). A sample is correct when its score is >= 0.5.

Outputs in ``--out``: ``results.json`` (settings + summary), ``results.md`` (the markdown table), and
``samples.jsonl`` (every response with its score), written to a temporary sibling and renamed when complete.
The pure parts (:func:`pass_at_k`, :func:`avg_at_k`, :func:`summarise`, :func:`markdown_table`) need no engine.
"""

from __future__ import annotations

from typing import Sequence

from .base import sequential_seeds

# --------------------------------------------------------------------------------------------- pure metrics


def pass_at_k_estimate(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``num_samples`` samples with ``num_correct`` correct ones."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k: need 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"pass@k: num_correct {num_correct} outside [0, {num_samples}]")
    if num_samples - num_correct < k:  # every j-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _num_correct(scores: list[float]) -> int:
    return sum(1 for s in scores if s >= 0.5)


def pass_at_k(scores_per_problem: list[list[float]], k: int) -> float:
    """Mean over problems of the unbiased pass@k; ``scores_per_problem[i]`` holds problem i's sample scores."""
    if not scores_per_problem:
        return float("nan")
    return sum(pass_at_k_estimate(len(s), _num_correct(s), k) for s in scores_per_problem) / len(scores_per_problem)


def avg_at_k(scores_per_problem: list[list[float]]) -> float:
    """Mean over problems of the mean sample score."""
    if not scores_per_problem:
        return float("nan")
    return sum(sum(s) / len(s) for s in scores_per_problem) / len(scores_per_problem)


def _pass_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per data_source (sorted) plus ``"all"``: num_problems, n_samples, avg@n, pass@1..pass@n (powers of 2 and n),
    and, when the records carry them, mean_response_tokens and truncated_fraction (finish_reason "length").

    ``records``: one dict per problem with ``data_source`` and ``scores`` (list[float], the same length for all),
    optionally ``num_tokens`` (list[int]) and ``finish_reasons`` (list[str]).
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["data_source"], []).append(r)
    out = {}
    for name, recs in sorted(groups.items()) + [("all", records)]:
        if not recs:
            continue
        n = len(recs[0]["scores"])
        if any(len(r["scores"]) != n for r in recs):
            raise ValueError(f"summarise: data_source {name!r} mixes different numbers of samples per problem")
        scores = [r["scores"] for r in recs]
        row: dict = {"num_problems": len(recs), "n_samples": n, f"avg@{n}": avg_at_k(scores)}
        for k in _pass_ks(n):
            row[f"pass@{k}"] = pass_at_k(scores, k)
        if all("num_tokens" in r for r in recs):
            toks = [t for r in recs for t in r["num_tokens"]]
            row["mean_response_tokens"] = sum(toks) / len(toks)
        if all("finish_reasons" in r for r in recs):
            fins = [f for r in recs for f in r["finish_reasons"]]
            row["truncated_fraction"] = sum(f == "length" for f in fins) / len(fins)
        out[name] = row
    return out


def _cell(text: str) -> str:
    """A markdown table cell: ``|`` escaped, line breaks as spaces (a data_source comes from the data file)."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())


def markdown_table(summary: dict[str, dict]) -> str:
    """The summary as a markdown table; rates in percent with one decimal."""
    if not summary:
        return "(no problems)\n"
    cols = []
    for row in summary.values():
        for c in row:
            if c not in cols:
                cols.append(c)

    def fmt(c, v):
        if v is None:
            return ""
        if c.startswith(("avg@", "pass@")) or c == "truncated_fraction":
            return f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    head = ["data_source"] + [c + (" (%)" if c.startswith(("avg@", "pass@")) or c == "truncated_fraction" else "")
                              for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        lines.append("| " + " | ".join([_cell(name)] + [_cell(fmt(c, row.get(c))) for c in cols]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- evaluation


def grade(problems: list, outs: list, tokenizer, pool, *, keep_text: bool = True) -> tuple[list[dict], int]:
    """Decode and score one engine's completions: one record per problem (``scores``, ``num_tokens``,
    ``finish_reasons``, and ``responses`` with ``keep_text``), plus the number of verifier timeouts.

    ``problems``: TokenizedProblem list (``answer``, ``data_source``, ``source``); ``outs[i]``: problem i's
    completions (token_ids, finish_reason); ``pool``: a RewardPool.
    """
    responses, answers = [], []
    for p, comps in zip(problems, outs):
        for c in comps:
            responses.append(tokenizer.decode(list(c.token_ids), skip_special_tokens=True))
            answers.append(p.answer)
    scores, num_timeouts = pool.score(responses, answers) if responses else ([], 0)
    records, i = [], 0
    for p, comps in zip(problems, outs):
        k = len(comps)
        rec = {"source": p.source, "data_source": p.data_source, "answer": p.answer, "scores": scores[i:i + k],
               "num_tokens": [len(c.token_ids) for c in comps], "finish_reasons": [c.finish_reason for c in comps]}
        if keep_text:
            rec["responses"] = responses[i:i + k]
        records.append(rec)
        i += k
    return records, num_timeouts


def sample(engine, problems: Sequence, tokenizer, *, first_index: int = 0, n_samples: int, temperature: float,
           top_p: float = 1.0, max_tokens: int, seed: int, stop: Sequence[str] = ()) -> list:
    """The one evaluation generation: ``n_samples`` completions per problem from one ``engine`` ([P][n]; [] for no
    problems). A response ends at the tokenizer's EOS or after the token that completes one of the ``stop`` strings
    (``rollout.stop``: the same stops as the training rollouts). Problem i is the ``first_index + i``-th of the
    whole evaluation set, and its sample j uses seed ``seed + (first_index + i) * n_samples + j``: the samples do
    not depend on how the set is split over engines."""
    if not problems:
        return []
    return engine.generate([p.prompt_ids for p in problems], n=n_samples, temperature=temperature, top_p=top_p,
                           max_tokens=max_tokens, stop_token_ids=[tokenizer.eos_token_id], stop=list(stop) or None,
                           seeds=sequential_seeds(seed + first_index * n_samples, len(problems), n_samples))


def evaluate(engine, problems: list, tokenizer, pool, *, n_samples: int, temperature: float, top_p: float = 1.0,
             max_tokens: int, seed: int = 0, stop: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Sample ``n_samples`` per problem with one ``engine`` (:func:`sample`), grade with ``pool`` (a RewardPool).

    ``problems``: TokenizedProblem list (``prompt_ids``, ``answer``, ``data_source``, ``source``).
    Returns (records, summary): one record per problem (responses, scores, num_tokens, finish_reasons) and
    :func:`summarise` of them, plus ``num_reward_timeouts`` under ``summary["all"]``. Every engine of a world at
    once: :meth:`megatron_srft.rollout.service.RolloutService.evaluate` (the same :func:`sample` and :func:`grade`).
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    outs = sample(engine, problems, tokenizer, n_samples=n_samples, temperature=temperature, top_p=top_p,
                  max_tokens=max_tokens, seed=seed, stop=stop)
    records, num_timeouts = grade(problems, outs, tokenizer, pool)
    summary = summarise(records)
    summary["all"]["num_reward_timeouts"] = num_timeouts
    return records, summary
