"""``srft train --config X.yaml [key.sub=value ...]`` (under torchrun for more than one rank).

Exit status: 0 when every step ran; ``signals.STOPPED_EXIT_CODE`` (75) when a stop signal (SIGTERM, SIGUSR1)
ended the run after its checkpoint, with one line ``srft train: stopped at step N by SIGUSR1; checkpoint at PATH
(a requeue resumes from it)``; 2 or 1 for errors (cli/failures.py).
"""

from __future__ import annotations

import json
import os
import sys

from ..checkpoint.atomic import write_text_atomic
from ..config import load_config
from ..signals import STOP_FILE_ENV, STOPPED_EXIT_CODE, RunStopped


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config (see docs/config.md); optional if everything is overridden")
    p.add_argument("--resume", choices=["auto", "must", "never", "fresh"], default=None,
                   help="override checkpoint.resume (default: the config's, 'auto'; see docs/reliability.md)")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="a config field (or section) that may differ from the resumed checkpoint's although it "
                        "breaks an exact resume (adds to checkpoint.allow_changes; repeatable)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.num_steps=10")


def main(args) -> int:
    # vLLM's INFO lines at every weight sync ("Reloading and processing weights", "Successfully reset prefix
    # cache") would bury the progress on every rank; warnings stay. Set before vLLM is imported (it reads it then).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from ..training.loop import train  # lazy: keeps Megatron out of `srft train --help`

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # world-size checks run once the ranks are up
    cfg.checkpoint.allow_changes = [*cfg.checkpoint.allow_changes, *args.allow_change]
    cfg.checkpoint.validate("checkpoint")
    args.srft_run_dir = cfg.run_dir  # failure logs go to RUN_DIR/logs (cli/failures.py)
    try:
        metrics = train(cfg)
    except RunStopped as e:
        _report_stop(e)
        return STOPPED_EXIT_CODE
    if metrics and os.environ.get("RANK", "0") == "0":  # the last step's metrics, once (engine ranks have none)
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, sort_keys=True))
    return 0


def _report_stop(e: RunStopped) -> None:
    """One line from one rank. Under ``srft launch`` (``SRFT_STOP_FILE`` set) each node's local rank 0 leaves it
    in that file instead, and the launcher prints it as its last line, after torchrun's own shutdown messages."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            write_text_atomic(stop_file, str(e))
    elif os.environ.get("RANK", "0") == "0":
        print(f"srft train: {e}", file=sys.stderr, flush=True)
