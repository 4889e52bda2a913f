"""``srft eval``: sample K responses per problem, grade them, report avg@k / pass@k (markdown + JSON).

The metrics and the engine-side evaluation live in :mod:`megatron_srft.rollout.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..checkpoint.atomic import check_output, write_files_atomic
from ..config import ParallelConfig, SRFTConfig, load_config
from ..data.dataset import load_problems, tokenize_problems
from ..data.templates import TEMPLATES, THINKING_TEMPLATES, load_tokenizer
from ..distributed.layout import check_rollout_split
from ..dtypes import DTYPES
from ..errors import UserError
from ..models.arch import load_arch
from ..rewards import REWARDS
from ..rollout.evaluation import markdown_table, summarise


#: What `srft eval` writes into --out; --overwrite replaces these files and nothing else.
OUTPUT_FILES = ("results.json", "results.md", "samples.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config: model.path, data.eval_files / template / max_prompt_length, the rollout "
                             "section (tensor_parallel_size, gpu_memory_utilization, dtype, max_tokens, top_p, seed) "
                             "and train.eval_n_samples / eval_temperature / reward*. Flags below override it.")
    parser.add_argument("--model", default=None, help="HF model directory (config.json, weights, tokenizer).")
    parser.add_argument("--data", default=None, nargs="+", help="Benchmark files (.jsonl / .parquet, any layout).")
    parser.add_argument("--n-samples", type=int, default=None, help="K samples per problem (avg@K, pass@1..K).")
    parser.add_argument("--temperature", type=float, default=None, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus sampling.")
    parser.add_argument("--max-tokens", type=int, default=None, help="Max response tokens (default 1024).")
    parser.add_argument("--out", required=True, help="Output directory (results.json, results.md, samples.jsonl).")
    parser.add_argument("--template", default=None, choices=list(TEMPLATES),
                        help="Prompt template (see data.template; default paper).")
    parser.add_argument("--reward", default=None, choices=list(REWARDS), help="Verifier (default math).")
    parser.add_argument("--require-think", choices=["auto", "yes", "no"], default="auto",
                        help="Grade only the text after </think> (0 without it); auto = yes for --template paper.")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="Drop longer prompts (tokens); default: the config's data.max_prompt_length, else the "
                             "model's max positions minus --max-tokens.")
    parser.add_argument("--dtype", default=None, choices=["auto", *DTYPES],
                        help="Engine dtype; auto = fp32 on CPU, the model's dtype on GPU.")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="Ranks per engine (rollout TP); under torchrun every rank belongs to one engine.")
    parser.add_argument("--seed", type=int, default=None, help="Sampling seed (default 0).")
    parser.add_argument("--reward-workers", type=int, default=None, help="Verifier processes per engine (default 2).")
    parser.add_argument("--reward-timeout", type=float, default=None, help="Per-sample verifier timeout (s).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the results files of an earlier evaluation in --out (nothing else is removed).")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides (with or without --config)")


def resolve_settings(args):
    """The evaluation's SRFTConfig: the --config file (if any) and its overrides, then every flag given. Flags win;
    without either, the defaults of `srft eval` (greedy, 1 sample, 1024 tokens, the paper template, math)."""
    cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else SRFTConfig()
    if args.config is None:  # flag defaults of the command, not the training defaults
        cfg.rollout.max_tokens, cfg.train.eval_n_samples, cfg.train.eval_temperature = 1024, 1, 0.0
        cfg.rollout.seed, cfg.train.reward_workers = 0, 2
    flags = {"model": ("model", "path"), "n_samples": ("train", "eval_n_samples"),
             "temperature": ("train", "eval_temperature"), "top_p": ("rollout", "top_p"),
             "max_tokens": ("rollout", "max_tokens"), "template": ("data", "template"),
             "reward": ("train", "reward"), "dtype": ("rollout", "dtype"),
             "tensor_parallel_size": ("rollout", "tensor_parallel_size"), "seed": ("rollout", "seed"),
             "reward_workers": ("train", "reward_workers"), "reward_timeout": ("train", "reward_timeout_s")}
    for flag, (section, field) in flags.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(getattr(cfg, section), field, value)
    if args.data is not None:
        cfg.data.eval_files = list(args.data)
    cfg.rollout.max_tokens = cfg.rollout.max_tokens or cfg.data.max_response_length
    return cfg


def _check_args(args, cfg) -> None:
    t, r = cfg.train, cfg.rollout
    if not cfg.model.path:
        raise UserError("--model: required (or model.path in --config)")
    if not cfg.data.eval_files:
        raise UserError("--data: required (or data.eval_files in --config)")
    if t.eval_n_samples < 1:
        raise UserError(f"--n-samples: expected >= 1, got {t.eval_n_samples}")
    if t.eval_temperature < 0:
        raise UserError(f"--temperature: expected >= 0, got {t.eval_temperature}")
    if r.max_tokens < 1:
        raise UserError(f"--max-tokens: expected >= 1, got {r.max_tokens}")
    if not 0 < r.top_p <= 1:
        raise UserError(f"--top-p: expected 0 < top_p <= 1, got {r.top_p}")
    if t.eval_temperature == 0 and t.eval_n_samples > 1:
        raise UserError("--n-samples > 1 at --temperature 0 gives K identical greedy samples; raise the temperature")
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise UserError(f"--model: {cfg.model.path}/config.json not found (expected a Hugging Face model directory)")
    out = Path(args.out)
    check_output(out, [Path(cfg.model.path), *map(Path, cfg.data.eval_files),
                       Path(args.config) if args.config else None])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    ours = [n for n in OUTPUT_FILES if (out / n).exists()]
    if ours and not args.overwrite:
        raise UserError(f"--out: {out} already holds {', '.join(ours)} (pass --overwrite to replace these files)")


def main(args) -> int:
    """Under torchrun every rank builds one engine shard (rollout TP from the config or flags); the problems are
    split over the engines, each engine's leader grades its share, and global rank 0 writes the results."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # as `srft train`: vLLM's per-call INFO lines, quiet
    # lazy: Megatron (groups, the rollout service) stays out of `srft eval --help`
    from ..distributed.groups import destroy, init_distributed
    from ..rollout.service import RolloutService

    cfg = resolve_settings(args)
    _check_args(args, cfg)
    arch = load_arch(cfg.model.path)
    max_tokens = cfg.rollout.max_tokens
    max_prompt = args.max_prompt_length or (cfg.data.max_prompt_length if args.config else
                                            arch.max_position_embeddings - max_tokens)
    if max_prompt < 1:
        raise UserError(f"--max-tokens: {max_tokens} leaves no room for a prompt within the model's "
                        f"{arch.max_position_embeddings} positions")
    tokenizer = load_tokenizer(cfg.model.path)
    problems, dropped = [], {}
    for f in cfg.data.eval_files:
        tok = tokenize_problems(load_problems(f), tokenizer, cfg.data.template, max_prompt, sys.maxsize)
        problems += tok
        dropped[f] = tok.num_dropped
        if tok.num_dropped:
            print(f"{f}: dropped {tok.num_dropped} prompts longer than {max_prompt} tokens", file=sys.stderr)
    if not problems:
        raise UserError(f"--data: no problem has a prompt of at most {max_prompt} tokens")
    require_think = args.require_think == "yes" or (args.require_think == "auto" and
                                                      cfg.data.template in THINKING_TEMPLATES)
    cfg.rollout.max_model_len = cfg.rollout.max_model_len or min(
        arch.max_position_embeddings, max(len(p.prompt_ids) for p in problems) + max_tokens)
    check_rollout_split(arch, cfg.rollout.tensor_parallel_size)

    start = time.perf_counter()
    groups = init_distributed(ParallelConfig(backend=cfg.parallel.backend), seed=cfg.rollout.seed)
    try:
        if groups.world_size % cfg.rollout.tensor_parallel_size:
            raise UserError(f"rollout.tensor_parallel_size: {cfg.rollout.tensor_parallel_size} does not divide "
                            f"the world size ({groups.world_size})")
        with RolloutService(cfg, groups, cfg.model.path, tokenizer, None, need_engine=True,
                            arch=arch,
                            require_think=require_think) as service:
            metrics, records = service.evaluate(problems, version=None, n_samples=cfg.train.eval_n_samples,
                                          temperature=cfg.train.eval_temperature, top_p=cfg.rollout.top_p,
                                          seed=cfg.rollout.seed, keep_records=True)
            engines = service.placement.num_engines
        if groups.rank == 0:
            summary = summarise(records)
            summary["all"]["num_reward_timeouts"] = int(metrics["eval/reward_timeouts"])
            settings = {"model": cfg.model.path, "data": list(cfg.data.eval_files), "config": args.config,
                        "n_samples": cfg.train.eval_n_samples, "temperature": cfg.train.eval_temperature,
                        "top_p": cfg.rollout.top_p, "max_tokens": max_tokens, "template": cfg.data.template,
                        "reward": cfg.train.reward, "seed": cfg.rollout.seed, "require_think": require_think,
                        "dtype": cfg.rollout.dtype, "max_model_len": cfg.rollout.max_model_len,
                        "max_prompt_length": max_prompt, "num_dropped_prompts": dropped,
                        "num_engines": engines, "rollout_tensor_parallel_size": cfg.rollout.tensor_parallel_size,
                        "world_size": groups.world_size, "seconds": round(time.perf_counter() - start, 1)}
            table = markdown_table(summary)
            _write_outputs(Path(args.out), {"settings": settings, "summary": summary}, table, records)
            print(table, end="")
            print(f"wrote {args.out}/results.json, results.md, samples.jsonl")
    finally:
        destroy()
    return 0


def _write_outputs(out: Path, results: dict, table: str, records: list[dict]) -> None:
    """Each file whole (written beside its name, then renamed); other files in ``out`` are left alone."""
    texts = (json.dumps(results, indent=2) + "\n", table, "".join(json.dumps(r) + "\n" for r in records))
    write_files_atomic(out, dict(zip(OUTPUT_FILES, texts)))
