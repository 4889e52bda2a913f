"""``srft generate``: sample from a model through the rollout engine (vLLM), for a quick look at a checkpoint.

``--ckpt`` is an HF directory (vLLM reads its weights), or a Megatron checkpoint in the converted layout
(``DIR/config.json`` + tokenizer beside ``DIR/model/``, see checkpoint/convert.py), a training checkpoint or
its ``model/`` directory: then the engine starts on the HF config with dummy weights, the Megatron model is
loaded in this process (one rank, TP=1, on CPU: it computes nothing, so only the engine takes GPU memory) and its
weights are synced into the engine exactly as during training, which also exercises the sync path. The engine
runs at TP 1 on one GPU: a model whose weights exceed that GPU's share is refused in one line before anything
starts (``srft eval`` under torchrun samples at any ``rollout.tensor_parallel_size``).

Prompts: a ``.jsonl`` file with a ``"prompt"`` string per line, or any other text file with one prompt per
line. Output: one JSON line per sample (``prompt_index, sample_index, prompt, text, token_ids, logprobs,
finish_reason``) on stdout, or into ``--out`` (written to a temporary file and renamed when complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..checkpoint.atomic import check_output, write_text_atomic
from ..config import ParallelConfig, RolloutConfig
from ..data.templates import load_tokenizer
from ..distributed.layout import device_memory_bytes
from ..dtypes import DTYPES
from ..errors import UserError, first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="HF model directory or Megatron checkpoint (converted layout).")
    parser.add_argument("--prompts", required=True, help="Prompts: .jsonl with a 'prompt' field, or one per line.")
    parser.add_argument("--n", type=int, default=1, help="Samples per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Max new tokens per sample.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--chat", action="store_true", help="Wrap each prompt in the tokenizer's chat template.")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="Engine dtype; auto = fp32 on CPU, bf16 on GPU.")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="Engine context; default = longest prompt + max tokens (capped by the model).")
    parser.add_argument("--out", default=None, help="Write JSONL here instead of stdout.")


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: prompts file not found")
    lines = p.read_text(encoding="utf-8").splitlines()
    prompts = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"{path}:{i}: expected an object with a string field 'prompt'")
            prompts.append(row["prompt"])
    else:
        prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _tokenize(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: the tokenizer has no chat template")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)) for p in prompts]
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def check_engine_fits(source, dtype: str, cuda_available: bool, gpu_memory_bytes: Optional[int],
                      memory_utilization: float) -> None:
    """The one engine of `srft generate` (rollout TP 1) holds the whole model on one GPU: refuse, in one line naming
    rollout.tensor_parallel_size, a model whose weights exceed the share of the GPU vLLM is given. CPU: no check."""
    # lazy, as checkpoint.convert, groups, rollout and torch below: Megatron, torch and vLLM's engine module stay
    # out of `srft generate --help`, and main() sets VLLM_LOGGING_* before the engine module is imported
    from ..checkpoint.convert import weights_bytes_per_rank
    from ..distributed.groups import check_fits

    if not cuda_available or gpu_memory_bytes is None:
        return
    check_fits(weights_bytes_per_rank(source, ParallelConfig(), dtype), int(gpu_memory_bytes * memory_utilization),
               field="--ckpt", memory=f"one GPU at rollout.gpu_memory_utilization {memory_utilization}",
               fix="`srft generate` runs one engine at TP 1; sample from this model with `srft eval` under torchrun "
                   "with rollout.tensor_parallel_size set")


def main(args: argparse.Namespace) -> int:
    # stdout carries the JSONL samples: send vLLM's log lines (stdout by default) to stderr, and quiet them.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from ..checkpoint.convert import resolve_source
    from ..rollout.base import resolve_engine_settings, sequential_seeds
    from ..rollout.vllm_engine import VllmEngine

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"srft generate: runs one engine in one process (TP 1), not under torchrun with "
                        f"{os.environ['WORLD_SIZE']} processes; to sample on several GPUs use `srft eval` with "
                        f"rollout.tensor_parallel_size")
    if args.n < 1:
        raise UserError(f"--n: expected >= 1, got {args.n}")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    prompts = read_prompts(args.prompts)
    source = resolve_source(args.ckpt)
    hf_dir = source.root
    if args.out:
        check_output(Path(args.out), [Path(args.ckpt), hf_dir, Path(args.prompts)])
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: the engine needs the HF config.json and tokenizer next to the checkpoint "
                        f"(the layout `srft convert hf-to-mcore` writes)")
    try:
        tokenizer = load_tokenizer(hf_dir)
    except Exception as e:  # noqa: BLE001 - report the cause in one line
        raise UserError(f"{hf_dir}: cannot load the tokenizer ({first_line(e, empty='')})") from e
    token_ids = _tokenize(tokenizer, prompts, args.chat)
    rollout_cfg = RolloutConfig(dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len)
    settings = resolve_engine_settings(rollout_cfg, "bf16", source.arch,
                                       max(len(t) for t in token_ids) + args.max_tokens,
                                       num_seqs=len(token_ids) * args.n)
    dtype, max_len = settings.dtype, settings.max_model_len
    import torch

    cuda = torch.cuda.is_available()
    check_engine_fits(source, dtype, cuda, device_memory_bytes(True) if cuda else None,
                      rollout_cfg.gpu_memory_utilization)

    engine = handle = None
    started_dist = False
    try:
        if source.kind == "hf":
            engine = VllmEngine(rollout_cfg, str(hf_dir), dtype=dtype, seed=args.seed, max_model_len=max_len,
                                kv_cache_bytes=settings.kv_cache_bytes)
        else:
            from ..checkpoint.convert import build_and_load
            from ..distributed.groups import init_distributed
            from ..rollout.sync import sync_weights

            pcfg = ParallelConfig()
            groups = init_distributed(pcfg)
            started_dist = True
            handle = build_and_load(source, pcfg, groups, params_dtype=dtype, purpose="generate")  # on CPU
            engine = VllmEngine(rollout_cfg, str(hf_dir), dtype=dtype, seed=args.seed, max_model_len=max_len,
                                kv_cache_bytes=settings.kv_cache_bytes,
                                load_format="dummy")
            sync_weights(handle.chunks, source.arch, groups, engine, bucket_mb=rollout_cfg.sync_bucket_mb)
            del handle
        results = engine.generate(token_ids, n=args.n, temperature=args.temperature, top_p=args.top_p,
                                  max_tokens=args.max_tokens, seeds=sequential_seeds(args.seed, len(token_ids), args.n))
    finally:
        if engine is not None:
            engine.close()
        if started_dist:
            from ..distributed.groups import destroy

            destroy()
    rows = []
    for i, (prompt, samples) in enumerate(zip(prompts, results)):
        for j, c in enumerate(samples):
            rows.append({"prompt_index": i, "sample_index": j, "prompt": prompt,
                         "text": tokenizer.decode(c.token_ids, skip_special_tokens=True),
                         "token_ids": c.token_ids, "logprobs": [round(x, 6) for x in c.logprobs],
                         "finish_reason": c.finish_reason})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, text)
        print(f"srft generate: wrote {len(rows)} samples to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
