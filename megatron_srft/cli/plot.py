"""``srft plot RUN_DIR [RUN_DIR ...]``: PNG curves of runs' metrics.jsonl (training/plots.py draws them).

One run: every figure of ``FIGURES`` (reward, entropy, length, weights, eval, losses, ...), several metrics per
figure. Several runs: one PNG per quantity of ``COMPARE`` (accuracy, rollout entropy, response length, reward),
one line per run overlaid. Runs that share a ``--label`` (e.g. the seeds of one preset) are drawn as one line, their
mean at each step, with a band of +/- one standard deviation over the runs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..training.plots import plot_compare, plot_run


def add_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    p.add_argument("--label", action="append", default=None,
                   help="a label per run dir (repeat, in order); runs sharing a label are averaged (mean +/- std). "
                        "Default: each run's directory name.")
    p.add_argument("--title", default="", help="figure title prefix (several runs)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots for one run; required for "
                                               "several)")


def main(args) -> int:
    for d in args.run_dirs:
        if not (Path(d) / "metrics.jsonl").is_file():
            raise UserError(f"{d}: no metrics.jsonl (expected a run directory)")
    if len(args.run_dirs) == 1 and not args.label:
        paths = plot_run(args.run_dirs[0], args.out)
    else:
        if args.out is None:
            raise UserError("--out: required when comparing several runs")
        labels = args.label or [Path(d).name for d in args.run_dirs]
        if len(labels) != len(args.run_dirs):
            raise UserError(f"--label: expected one per run dir ({len(args.run_dirs)}), got {len(labels)}")
        runs: dict[str, list[str]] = {}
        for label, d in zip(labels, args.run_dirs):
            runs.setdefault(label, []).append(d)
        paths = plot_compare(runs, args.out, title=args.title)
    for p in paths:
        print(p)
    return 0
