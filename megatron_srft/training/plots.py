"""PNG curves of runs' metrics.jsonl (the ``srft plot`` command, the demo and the toy study draw with these).

One run: every figure of :data:`FIGURES` (reward, entropy, length, weights, eval, losses, ...), several metrics per
figure. Several runs: one PNG per quantity of :data:`COMPARE` (accuracy, rollout entropy, response length, reward),
one line per run overlaid. Runs that share a ``--label`` (e.g. the seeds of one preset) are drawn as one line, their
mean at each step, with a band of +/- one standard deviation over the runs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

from ..checkpoint.atomic import write_bytes_atomic
from .metrics import read_metrics

#: figure name -> metric keys drawn on it
FIGURES = {
    "reward": ["reward/mean", "accuracy/rollout", "accuracy/demo"],
    "entropy": ["entropy/rollout", "entropy/demo"],
    "response_length": ["response/length_mean"],
    "weights": ["weight/sft_mean", "weight/sft_max", "weight/rl_mean", "weight/rl_max"],
    "eval": ["eval/accuracy"],
    "loss": ["loss/total", "loss/sft", "loss/demo_rl", "loss/rl_pos", "loss/rl_neg"],
    "mismatch": ["mismatch/abs_mean", "mismatch/abs_max"],
    "timing": ["time/rollout", "time/reward", "time/old_logprob", "time/train", "time/sync"],
}

#: comparison figure name -> (metric key, y-axis label): one PNG each when several runs are overlaid
COMPARE = {
    "accuracy": ("eval/accuracy", "held-out accuracy"),
    "entropy": ("entropy/rollout", "mean entropy of rollout tokens"),
    "response_length": ("response/length_mean", "mean rollout length (tokens)"),
    "reward": ("reward/mean", "mean rollout reward"),
}


def _pyplot():
    # lazy: matplotlib is imported only to draw, with the file-only backend chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path, dpi: int) -> None:
    """The figure as a PNG at ``path``, whole or not at all (rendered in memory, then written atomically)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes_atomic(path, buf.getvalue())


def _series(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    plt = _pyplot()
    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = {k: sorted(_series(rows, k).items()) for k in keys}
        series = {k: pts for k, pts in series.items() if pts}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        _save_png(fig, path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def mean_std_curve(runs: Sequence[str | Path], key: str) -> list[tuple[int, float, float, int]]:
    """(step, mean, std, number of runs) at every step any run logged ``key``; std is the sample std (0 for 1)."""
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for step, v in _series(read_metrics(run), key).items():
            per_step.setdefault(step, []).append(v)
    out = []
    for step in sorted(per_step):
        vs = per_step[step]
        mean = sum(vs) / len(vs)
        std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
        out.append((step, mean, std, len(vs)))
    return out


def plot_compare(runs: Mapping[str, Sequence[str | Path]], out_dir: str | Path, *, title: str = "",
                 figures: Mapping[str, tuple[str, str]] = COMPARE) -> list[Path]:
    """One PNG per figure of ``figures`` in ``out_dir``: a line per label (mean over its runs, +/- std band).

    ``runs``: label -> run directories (the seeds of one preset, or a single run). A figure none of the runs
    logged is skipped. Returns the written paths.
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (key, ylabel) in figures.items():
        curves = {label: mean_std_curve(dirs, key) for label, dirs in runs.items()}
        curves = {label: c for label, c in curves.items() if c}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, c in curves.items():
            xs = [s for s, *_ in c]
            mean = [m for _, m, _, _ in c]
            n = max(k for *_, k in c)
            line, = ax.plot(xs, mean, marker="o" if len(xs) < 30 else None, markersize=3,
                            label=label if n == 1 else f"{label} (mean of {n})")
            if n > 1:
                ax.fill_between(xs, [m - s for _, m, s, _ in c], [m + s for _, m, s, _ in c],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel}" if title else ylabel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        _save_png(fig, path, dpi=80)  # committed with docs/toy_results.md: keep them small
        plt.close(fig)
        written.append(path)
    return written
