"""``srft convert``: hf-to-mcore and mcore-to-hf, in one process on CPU (a 1-rank gloo world).

    srft convert hf-to-mcore --hf DIR --out DIR [--dtype bf16|fp16|fp32] [--overwrite]
    srft convert mcore-to-hf --ckpt DIR --out DIR [--overwrite] [--max-shard-mb N]

See docs/checkpoints.md for the layouts.
"""

from __future__ import annotations

import argparse
import time

from ..config import ParallelConfig
from ..dtypes import DTYPES
from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{hf-to-mcore,mcore-to-hf}")
    a = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> Megatron torch_dist checkpoint dir.")
    a.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors, tokenizer).")
    a.add_argument("--out", required=True, help="Output directory (written to a temp sibling, then renamed).")
    a.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="Parameter dtype of the checkpoint (default: the HF config's dtype, else bf16).")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Embedding rows are padded to a multiple of this (model.make_vocab_size_divisible_by).")
    a.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (converted dir, training checkpoint or its "
                                           "model/) -> HF safetensors dir loadable by transformers and vLLM.")
    b.add_argument("--ckpt", required=True, help="DIR with model/ inside, or the torch_dist model dir itself.")
    b.add_argument("--out", required=True, help="Output directory (written to a temp sibling, then renamed).")
    b.add_argument("--max-shard-mb", type=int, default=2048, help="Max size of one safetensors shard (MiB).")
    b.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")


def main(args: argparse.Namespace) -> int:
    from ..checkpoint import convert  # lazy (with groups): keeps Megatron out of `srft convert --help`
    from ..distributed.groups import destroy, init_distributed

    if args.direction == "hf-to-mcore" and args.make_vocab_size_divisible_by < 1:
        raise UserError(f"--make-vocab-size-divisible-by: expected >= 1, got {args.make_vocab_size_divisible_by}")
    if args.direction == "mcore-to-hf" and args.max_shard_mb < 1:
        raise UserError(f"--max-shard-mb: expected >= 1, got {args.max_shard_mb}")
    # Input errors are reported before any process group or model exists.
    if args.direction == "hf-to-mcore":
        convert.preflight_hf_to_mcore(args.hf, args.out, args.overwrite)
    else:
        convert.preflight_mcore_to_hf(args.ckpt, args.out, args.overwrite)
    start = time.perf_counter()
    init_distributed(ParallelConfig(backend="gloo"), purpose="convert")  # on CPU even beside GPUs
    try:
        if args.direction == "hf-to-mcore":
            out = convert.hf_to_mcore(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                      make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        else:
            out = convert.mcore_to_hf(args.ckpt, args.out, overwrite=args.overwrite,
                                      max_shard_bytes=args.max_shard_mb << 20)
    finally:
        destroy()
    print(f"srft convert {args.direction}: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
