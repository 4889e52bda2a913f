"""``srft eval``: sample K responses per problem, grade them, report avg@k / pass@k (markdown + JSON).

The metrics and the engine-side evaluation live in :mod:`megatron_srft.rollout.evaluation`.
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

from ..rollout.evaluation import evaluate, markdown_table


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
    from ..errors import UserError

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
    from ..errors import UserError
    from ..config import RolloutConfig
    from ..data.dataset import load_problems, tokenize_problems
    from ..data.templates import THINKING_TEMPLATES, load_tokenizer
    from ..models.arch import load_arch
    from ..rewards.pool import RewardPool

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

    from ..rollout.vllm_engine import RolloutEngine

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

