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

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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
        lines.append("| " + " | ".join([name] + [fmt(c, row.get(c)) for c in cols]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- evaluation


def evaluate(engine, problems: list, tokenizer, pool, *, n_samples: int, temperature: float, top_p: float = 1.0,
             max_tokens: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Generate ``n_samples`` per problem with ``engine`` (a RolloutEngine), grade with ``pool`` (a RewardPool).

    ``problems``: TokenizedProblem list (``prompt_ids``, ``answer``, ``data_source``, ``source``).
    Returns (records, summary): one record per problem (responses, scores, num_tokens, finish_reasons) and
    :func:`summarise` of them, plus ``num_reward_timeouts`` under ``summary["all"]``.
    """
    if not problems:
        raise ValueError("evaluate: no problems")
    outs = engine.generate([p.prompt_ids for p in problems], n=n_samples, temperature=temperature, top_p=top_p,
                           max_tokens=max_tokens, stop_token_ids=[tokenizer.eos_token_id], seed=seed)
    responses, answers = [], []
    for p, comps in zip(problems, outs):
        for c in comps:
            responses.append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
            answers.append(p.answer)
    scores, num_timeouts = pool.score(responses, answers)
    records = []
    for i, (p, comps) in enumerate(zip(problems, outs)):
        sl = slice(i * n_samples, (i + 1) * n_samples)
        records.append({"source": p.source, "data_source": p.data_source, "answer": p.answer,
                        "responses": responses[sl], "scores": scores[sl],
                        "num_tokens": [len(c.token_ids) for c in comps],
                        "finish_reasons": [c.finish_reason for c in comps]})
    summary = summarise(records)
    summary["all"]["num_reward_timeouts"] = num_timeouts
    return records, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json, weights, tokenizer).")
    parser.add_argument("--data", required=True, nargs="+", help="Benchmark files (.jsonl / .parquet, any layout).")
    parser.add_argument("--n-samples", type=int, default=1, help="K samples per problem (avg@K, pass@1..K).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling.")
    parser.add_argument("--max-tokens", type=int, default=1024, help="Max response tokens.")
    parser.add_argument("--out", required=True, help="Output directory (results.json, results.md, samples.jsonl).")
    parser.add_argument("--template", default="paper", choices=["chat", "paper", "boxed", "plain"],
                        help="Prompt template (see data.template).")
    parser.add_argument("--reward", default="math", choices=["math", "exact"], help="Verifier.")
    parser.add_argument("--require-think", choices=["auto", "yes", "no"], default="auto",
                        help="Grade only the text after </think> (0 without it); auto = yes for --template paper.")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="Drop longer prompts (tokens); default: the model's max positions minus --max-tokens.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="Engine dtype; auto = fp32 on CPU, bf16 on GPU.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--reward-workers", type=int, default=2, help="Verifier processes.")
    parser.add_argument("--reward-timeout", type=float, default=10.0, help="Per-sample verifier timeout (s).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --out.")


def _check_args(args) -> None:
    from .cli import UserError

    if args.n_samples < 1:
        raise UserError(f"--n-samples: expected >= 1, got {args.n_samples}")
    if args.temperature < 0:
        raise UserError(f"--temperature: expected >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: expected 0 < top_p <= 1, got {args.top_p}")
    if args.temperature == 0 and args.n_samples > 1:
        raise UserError("--n-samples > 1 at --temperature 0 gives K identical greedy samples; raise the temperature")
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"--model: {args.model}/config.json not found (expected a Hugging Face model directory)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")


def main(args) -> int:
    from .cli import UserError
    from .config import RolloutConfig
    from .data.dataset import load_problems, tokenize_problems
    from .data.templates import THINKING_TEMPLATES, load_tokenizer
    from .models.arch import load_arch
    from .rewards.pool import RewardPool

    _check_args(args)
    arch = load_arch(args.model)
    max_prompt = args.max_prompt_length or arch.max_position_embeddings - args.max_tokens
    if max_prompt < 1:
        raise UserError(f"--max-tokens: {args.max_tokens} leaves no room for a prompt within the model's "
                        f"{arch.max_position_embeddings} positions")
    tokenizer = load_tokenizer(args.model)
    problems, dropped = [], {}
    for f in args.data:
        tok = tokenize_problems(load_problems(f), tokenizer, args.template, max_prompt, sys.maxsize)
        problems += tok
        dropped[f] = tok.num_dropped
        if tok.num_dropped:
            print(f"{f}: dropped {tok.num_dropped} prompts longer than {max_prompt} tokens", file=sys.stderr)
    if not problems:
        raise UserError(f"--data: no problem has a prompt of at most {max_prompt} tokens")
    require_think = args.require_think == "yes" or (args.require_think == "auto" and
                                                      args.template in THINKING_TEMPLATES)
    dtype = args.dtype
    if dtype == "auto":
        import torch

        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    max_model_len = min(arch.max_position_embeddings, max(len(p.prompt_ids) for p in problems) + args.max_tokens)

    from .rollout.engine import RolloutEngine

    start = time.perf_counter()
    with RewardPool(args.reward, timeout_s=args.reward_timeout, num_workers=args.reward_workers,
                    require_think=require_think) as pool, \
            RolloutEngine(RolloutConfig(), args.model, dtype=dtype, seed=args.seed, max_model_len=max_model_len) \
            as engine:
        records, summary = evaluate(engine, problems, tokenizer, pool, n_samples=args.n_samples,
                                    temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                    seed=args.seed)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(require_think=require_think, dtype=dtype, max_model_len=max_model_len,
                    max_prompt_length=max_prompt, num_dropped_prompts=dropped,
                    seconds=round(time.perf_counter() - start, 1))
    table = markdown_table(summary)
    _write_outputs(Path(args.out), {"settings": settings, "summary": summary}, table, records)
    print(table, end="")
    print(f"wrote {args.out}/results.json, results.md, samples.jsonl")
    return 0


def _write_outputs(out: Path, results: dict, table: str, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(table)
        with open(tmp / "samples.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

