"""``make demo`` / ``make reproduce-toy``: the CPU demo and the toy study (megatron_srft/experiments/demo.py).

    python -m megatron_srft.cli.demo [--root runs/demo]
    python -m megatron_srft.cli.demo --reproduce [--recipes ...] [--conditions ...] [--seeds ...] [--steps N] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    # vLLM's per-sync INFO lines (weights reloaded, prefix cache reset) would bury the progress bar; warnings stay.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    p = argparse.ArgumentParser(prog="python -m megatron_srft.cli.demo",
                                description="make demo: SRFT training for real on a 2-core CPU, in minutes.")
    p.add_argument("--root", default="runs/demo", help="where the toy, the runs and the plots go")
    p.add_argument("--reproduce", action="store_true",
                   help="the multi-seed study of the paper's three claims (docs/toy_results.md)")
    p.add_argument("--doc", default="docs/toy_results.md", help="results file for --reproduce")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="--reproduce: recipes to compare (experiments/recipes.py's RECIPES)")
    p.add_argument("--conditions", nargs="+", default=None, help="--reproduce: demonstration conditions (exact, noisy)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="--reproduce: seeds per cell")
    p.add_argument("--steps", type=int, default=None, help="--reproduce: optimizer steps per training stage")
    p.add_argument("--jobs", type=int, default=None, help="--reproduce: worker processes")
    args = p.parse_args(argv)
    # lazy: this module is __main__, which every spawned helper process (reward workers, the checkpoint queue,
    # study workers) imports again; at the head it would load Megatron and vLLM into each of them
    from ..experiments.demo import run_demo, run_reproduce

    root = Path(args.root)
    if not args.reproduce:
        return run_demo(root)
    return run_reproduce(root, Path(args.doc), recipes=args.recipes and tuple(args.recipes),
                         conditions=args.conditions and tuple(args.conditions), seeds=args.seeds and tuple(args.seeds),
                         steps=args.steps, jobs=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
