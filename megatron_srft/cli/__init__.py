"""The ``srft`` command line. Each subcommand lives in its own module, imported only when it runs.

A subcommand module provides ``add_arguments(parser)`` and ``main(args) -> int``. Every failure prints one line
``srft <cmd>: error: ...`` (exit 2 for errors the user can fix, 1 otherwise) and its traceback goes to a log file
whose path the line names, or to stderr with ``SRFT_DEBUG=1`` (cli/failures.py); under torchrun one rank reports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from ..version import __version__

#: name -> (module, one-line help). The order is the order `srft --help` shows.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_srft.cli.train", "Train with SRFT (or a baseline) from a YAML config; run under torchrun."),
    "convert": ("megatron_srft.cli.convert", "Convert checkpoints: hf-to-mcore, mcore-to-hf."),
    "score": ("megatron_srft.cli.score", "Per-token log-probs and entropies of given sequences under the Megatron model."),
    "generate": ("megatron_srft.cli.generate", "Sample from a checkpoint through the rollout engine (vLLM)."),
    "eval": ("megatron_srft.cli.eval", "Evaluate a model on benchmark files: avg@k, pass@k, markdown + JSON."),
    "plot": ("megatron_srft.cli.plot", "Plot a run's metrics.jsonl as PNG curves."),
    "make-toy": ("megatron_srft.cli.make_toy", "Write the CPU toy task: char tokenizer, tiny Qwen2 config, problems."),
    "config": ("megatron_srft.cli.config", "Print the resolved config (--print) or the config reference."),
    "launch": ("megatron_srft.cli.launch", "Print or run the torchrun command for a single- or multi-node job."),
    "check": ("megatron_srft.cli.check", "Validate this node and measure it: CUDA/NCCL, a Megatron step's MFU, vLLM, TE."),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srft",
        description="megatron-srft: SRFT (supervised + reinforcement fine-tuning) on Megatron-core with vLLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in SUBCOMMANDS.items())
        + "\n\nRun `srft <subcommand> --help` for its options.",
    )
    p.add_argument("--version", action="version", version=f"megatron-srft {__version__}")
    p.add_argument("subcommand", nargs="?", choices=list(SUBCOMMANDS), metavar="subcommand")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        try:
            top.parse_args(argv)  # --version, or argparse's one-line "invalid choice" error
        except SystemExit as e:
            return int(e.code or 0)
        return 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"srft {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from .failures import report  # lazy: failures.py (atomic writes, tempfile) would add ~40% to `srft --help`

    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print(f"srft {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure: one line, the traceback in a log file (cli/failures.py)
        return report(name, e, run_dir=getattr(args, "srft_run_dir", None))
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        return report(name, e, run_dir=getattr(args, "srft_run_dir", None))
