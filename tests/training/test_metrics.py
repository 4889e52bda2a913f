import json

from megatron_srft.cli.plot import plot_run
from megatron_srft.training.metrics import MetricsLogger, read_metrics


def test_resume_keeps_steps_up_to_the_checkpoint_and_fresh_start_clears(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, total_steps=5, progress_bar=False)
    for step in range(1, 5):
        log.log(step, {"reward/mean": step / 10, "entropy/rollout": 1.0})
    log.truncate_after(2)  # resumed from the step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    log.log(3, {"reward/mean": float("nan")})
    assert read_metrics(tmp_path)[-1] == {"step": 3, "reward/mean": None}  # NaN is written as null
    log.truncate_after(-1)  # a fresh run in the same directory
    assert read_metrics(tmp_path) == []


def test_plot_writes_pngs(tmp_path):
    rows = [{"step": s, "reward/mean": s / 10, "entropy/rollout": 1.0 - s / 10, "eval/accuracy": None}
            for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = sorted(p.name for p in plot_run(tmp_path))
    assert names == ["entropy.png", "reward.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in names)
