"""``srft plot`` over several runs: one PNG per quantity, seeds sharing a label averaged."""

from __future__ import annotations

import json

import pytest

from megatron_srft.cli import main as cli_main
from megatron_srft.training.plots import mean_std_curve


def _run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mean_std_over_runs(tmp_path):
    a = _run(tmp_path / "a", [{"step": 0, "eval/accuracy": 0.2}, {"step": 1, "entropy/rollout": 1.0},
                              {"step": 2, "entropy/rollout": 0.5, "eval/accuracy": 0.4}])
    b = _run(tmp_path / "b", [{"step": 1, "entropy/rollout": 3.0}, {"step": 2, "entropy/rollout": None}])
    assert mean_std_curve([a, b], "entropy/rollout") == [(1, 2.0, pytest.approx(2 ** 0.5), 2), (2, 0.5, 0.0, 1)]
    assert mean_std_curve([a, b], "eval/accuracy") == [(0, 0.2, 0.0, 1), (2, 0.4, 0.0, 1)]


def test_cli_overlays_runs_one_png_per_quantity(tmp_path, capsys):
    runs = []
    for name, slope in (("grpo_s1", -0.1), ("grpo_s2", -0.2), ("srft_s1", 0.0)):
        runs.append(_run(tmp_path / name, [{"step": s, "entropy/rollout": 1 + slope * s, "eval/accuracy": 0.1 * s,
                                            "response/length_mean": 30 + s} for s in range(4)]))
    out = tmp_path / "cmp"
    argv = ["plot", *map(str, runs), "--label", "grpo", "--label", "grpo", "--label", "srft", "--out", str(out)]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "entropy.png", "response_length.png"]
    assert all(p.stat().st_size > 1000 for p in out.iterdir())
    assert cli_main(["plot", *map(str, runs)]) == 2  # several runs need --out
    assert "--out" in capsys.readouterr().err
    assert cli_main(["plot", str(runs[0]), str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_mismatch_figure_draws_the_names_a_run_writes():
    """The figure's keys are the loss adapter's mismatch sums under the run's metric names."""
    import torch

    from megatron_srft.algorithms.mismatch import mismatch_sums
    from megatron_srft.training.plots import FIGURES
    from megatron_srft.training.loop import _metric_name

    lp = torch.zeros(4)
    written = {_metric_name(k) for k in mismatch_sums(lp, lp + 0.1, torch.ones(4, dtype=torch.bool))}
    assert set(FIGURES["mismatch"]) <= written, written
