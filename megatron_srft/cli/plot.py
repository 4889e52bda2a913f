"""``srft plot RUN_DIR``: PNG curves of a run's metrics.jsonl (reward, entropy, length, weights, eval, losses)."""

from __future__ import annotations

from pathlib import Path

from ..training.metrics import read_metrics

#: figure name -> metric keys drawn on it
FIGURES = {
    "reward": ["reward/mean", "accuracy/rollout", "accuracy/demo"],
    "entropy": ["entropy/rollout", "entropy/demo"],
    "response_length": ["response/length_mean"],
    "weights": ["weight/sft_mean", "weight/sft_max", "weight/rl_mean", "weight/rl_max"],
    "eval": ["eval/accuracy"],
    "loss": ["loss/total", "loss/sft", "loss/demo_rl", "loss/rl_pos", "loss/rl_neg"],
    "mismatch": ["mismatch/mean_abs", "mismatch/max_abs"],
    "timing": ["time/rollout", "time/reward", "time/old_logprob", "time/train", "time/sync"],
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = {}
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                series[k] = pts
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
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")


def main(args) -> int:
    paths = plot_run(args.run_dir, args.out)
    for p in paths:
        print(p)
    return 0
