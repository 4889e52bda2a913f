import json
import time

from megatron_srft.training.plots import plot_run
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


def _wandb_records(run_file):
    """(kind, payload) of every record in an offline W&B run file: a LevelDB-style log (7-byte header, 32 KiB
    blocks, records of crc32 / length / type then a protobuf Record)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, partial = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if pos % block + 7 > block:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, or last of several
            record = pb.Record()
            record.ParseFromString(partial + chunk)
            partial = b""
            yield record.WhichOneof("record_type"), record
        elif kind in (2, 3):  # first / middle
            partial += chunk


def _has_exit_record(run_file) -> bool:
    try:
        return any(kind == "exit" for kind, _ in _wandb_records(run_file))
    except Exception:  # a record still being written
        return False


def _logging(**kw):
    from megatron_srft.config import LoggingConfig

    return LoggingConfig(progress_bar=False, **kw)


def test_tensorboard_and_wandb_offline_runs_read_back(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var, value in (("WANDB_SILENT", "true"), ("WANDB_X_DISABLE_STATS", "true"), ("WANDB_X_DISABLE_META", "true"),
                       ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(var, value)  # a quiet, quick test run: no system metrics or console capture
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = _logging(tensorboard=True, wandb=True, wandb_mode="offline", wandb_project="p", wandb_run_name="toy")
    log = MetricsLogger(tmp_path, enabled=True, total_steps=3, logging_cfg=cfg, run_config={"lr": 1e-4},
                        run_id="abc123")
    for step in (1, 2, 3):
        log.log(step, {"loss/total": 1.0 / step, "eval/accuracy": 0.1 * step, "note": "x"})
    log.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss/total")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*-abc123/run-abc123.wandb")
    # wandb-core (its own process) may still be appending when finish() returns: read once its exit record is there.
    deadline = time.monotonic() + 60
    while not _has_exit_record(run_file) and time.monotonic() < deadline:
        time.sleep(0.1)
    history = []
    for kind, record in _wandb_records(run_file):
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.append((items["_step"], items["loss/total"], items["eval/accuracy"]))
        elif kind == "run":
            assert record.run.run_id == "abc123" and record.run.display_name == "toy"
    assert [(s, round(a, 6), round(b, 6)) for s, a, b in history] == [(1, 1.0, 0.1), (2, 0.5, 0.2),
                                                                      (3, 0.333333, 0.3)]


def test_a_missing_sink_package_is_a_config_error(tmp_path, monkeypatch):
    import sys

    import pytest

    from megatron_srft.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"logging.wandb: needs the 'wandb' package"):
        MetricsLogger(tmp_path, enabled=True, total_steps=1, logging_cfg=_logging(wandb=True))


def test_a_complete_last_line_without_a_step_is_an_error_not_torn(tmp_path, capsys):
    import pytest

    from megatron_srft.errors import UserError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"reward/mean": 0.7}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics row \(complete JSON without an integer "
                                        r"'step'\)"):
        read_metrics(tmp_path)
    assert "torn" not in capsys.readouterr().err
