"""``srft train --config X.yaml [key.sub=value ...]`` (under torchrun for more than one rank)."""

from __future__ import annotations

import json
import os


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config (see docs/config.md); optional if everything is overridden")
    p.add_argument("--resume", choices=["auto", "must", "never", "fresh"], default=None,
                   help="override checkpoint.resume (default: the config's, 'auto'; see docs/reliability.md)")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="a config field (or section) that may differ from the resumed checkpoint's although it "
                        "breaks an exact resume (adds to checkpoint.allow_changes; repeatable)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.num_steps=10")


def main(args) -> int:
    from ..config import load_config
    from ..training.loop import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # world-size checks run once the ranks are up
    cfg.checkpoint.allow_changes = [*cfg.checkpoint.allow_changes, *args.allow_change]
    cfg.checkpoint.validate("checkpoint")
    args.srft_run_dir = cfg.run_dir  # failure logs go to RUN_DIR/logs (cli/failures.py)
    metrics = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # the last step's metrics, once
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, sort_keys=True))
    return 0
