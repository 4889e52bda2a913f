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


def test_torn_last_line_is_dropped_with_a_warning_and_the_rewrite_is_atomic(tmp_path, capsys, monkeypatch):
    import os

    import pytest

    from megatron_srft.errors import UserError

    log = MetricsLogger(tmp_path, enabled=True, total_steps=5, progress_bar=False)
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 10})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "reward/me')  # killed while writing step 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert "dropping a torn last line" in capsys.readouterr().err
    # the rewrite goes through a temporary file and a rename: a failure in between leaves the old file whole
    before = path.read_text()

    def fail(*a, **k):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        log.truncate_after(2)
    assert path.read_text() == before
    monkeypatch.undo()
    log.truncate_after(2)
    assert path.read_text() == "".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in (1, 2))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a damaged line that is not the last one is an error naming the line, not silently dropped
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics row"):
        read_metrics(tmp_path)
