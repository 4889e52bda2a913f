"""Run directories cannot be mixed up, damaged checkpoints are detected and skipped, rotation keeps other runs'
checkpoints (checkpoint/manifest.py, checkpoint/run_dir.py), on copies of one real 2-step training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_srft.checkpoint import manifest
from megatron_srft.checkpoint.atomic import temp_sibling
from megatron_srft.checkpoint.run_dir import (
    ARCHIVE_DIR, LOCK_FILE, RUN_FILE, compare_configs, plan_run, release_run_dir, rotate_checkpoints, step_dirs,
)
from megatron_srft.errors import CheckpointError, ConfigError


def _config(run: Path, step: int = 2) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())["config"]


def _run_id(run: Path) -> str:
    return json.loads((run / RUN_FILE).read_text())["run_id"]


# --------------------------------------------------------------------------------------------- manifests


def test_every_checkpoint_directory_carries_a_verified_manifest(trained_run):
    step = trained_run / "checkpoints" / "step_000002"
    for d in (step, step / "model", step / "optimizer"):
        assert (d / manifest.MANIFEST).is_file(), d
    files = manifest.read_manifest(step / "model")
    assert {".metadata", "metadata.json", "common.pt", "srft_model.json"} <= set(files)
    assert set(manifest.read_manifest(step)) == {"state.json", "rng/rank_0.pt", "model/srft_manifest.json",
                                                 "optimizer/srft_manifest.json"}
    assert manifest.verify_part(step) == []
    (fp,) = json.loads((step / "state.json").read_text())["data_fingerprints"].values()  # the data it ran on
    assert fp["rows"] > 0 and fp["bytes"] > 0 and len(fp["crc32"]) == 8


@pytest.mark.parametrize("damage, words", [
    ("truncate", "bytes, expected"),
    ("flip", "checksum"),
    ("no_metadata", ".metadata: missing"),
    ("state_json", "state.json"),
])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(run_copy, damage, words, capsys):
    step2 = run_copy / "checkpoints" / "step_000002"
    shard = sorted((step2 / "model").glob("*.distcp"))[-1]
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif damage == "no_metadata":
        (step2 / "model" / ".metadata").unlink()
    else:
        (step2 / "state.json").write_text('{"step": 2, "data_cur')
    plan = plan_run(run_copy, "auto", _config(run_copy, step=1))
    assert plan.resume_from == run_copy / "checkpoints" / "step_000001"
    out = capsys.readouterr().out
    assert "warning: checkpoint" in out and "step_000002" in out and words in out, out
    # kept (nothing lost) under a name no listing takes for a checkpoint
    assert [p.name for p in step_dirs(run_copy)] == ["step_000001"]
    (aside,) = [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith("step_000002.damaged-")]
    assert plan.damaged[0][0] == aside and (aside / "model").is_dir()


def test_no_intact_checkpoint_is_an_error(run_copy):
    for step in step_dirs(run_copy):
        (step / "model" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(step_000002: .*\.metadata"):
        plan_run(run_copy, "auto", _config(run_copy))
    assert len(step_dirs(run_copy)) == 2  # nothing was moved or deleted


def _make_legacy(step: Path) -> None:
    """As written before run ids and top-level manifests: model/ and optimizer/ keep their own manifests."""
    (step / manifest.MANIFEST).unlink()
    state = json.loads((step / "state.json").read_text())
    del state["run_id"]
    (step / "state.json").write_text(json.dumps(state))


def test_legacy_checkpoint_verifies_the_manifests_it_has_and_warns(run_copy, capsys):
    step2 = run_copy / "checkpoints" / "step_000002"
    _make_legacy(step2)
    plan = plan_run(run_copy, "auto", _config(run_copy))
    assert plan.resume_from == step2
    out = capsys.readouterr().out
    assert f"{step2} has no {manifest.MANIFEST} (written by an older version): its files are not verified" in out
    shard = sorted((step2 / "model").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    plan = plan_run(run_copy, "auto", _config(run_copy, step=1))
    assert plan.resume_from.name == "step_000001"
    out = capsys.readouterr().out
    assert "warning: checkpoint" in out and "checksum" in out and shard.name in out, out


# --------------------------------------------------------------------------------------------- starting


def test_auto_resumes_this_run(run_copy, capsys):
    rid = _run_id(run_copy)
    plan = plan_run(run_copy, "auto", _config(run_copy))
    assert plan.resume_from.name == "step_000002" and plan.run_id == rid
    assert f"resuming run {rid}" in capsys.readouterr().out


def test_never_refuses_a_used_run_dir(run_copy):
    with pytest.raises(ConfigError, match=r"'never' but .* holds checkpoints of run .*steps 1\.\.2.*'fresh'"):
        plan_run(run_copy, "never", _config(run_copy))
    assert len(step_dirs(run_copy)) == 2 and (run_copy / "metrics.jsonl").is_file()


def test_fresh_moves_the_previous_run_aside(run_copy):
    old_id = _run_id(run_copy)
    metrics = (run_copy / "metrics.jsonl").read_text()
    plan = plan_run(run_copy, "fresh", _config(run_copy))
    assert plan.resume_from is None and plan.run_id != old_id and _run_id(run_copy) == plan.run_id
    assert plan.archived.parent == run_copy / ARCHIVE_DIR and plan.archived.name.startswith(old_id)
    assert (plan.archived / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in step_dirs(plan.archived)] == ["step_000001", "step_000002"]
    assert not (run_copy / "checkpoints").exists() and not (run_copy / "metrics.jsonl").exists()


def test_leftovers_of_a_run_without_checkpoints_are_moved_not_wiped(run_copy):
    cfg = _config(run_copy)
    shutil.rmtree(run_copy / "checkpoints")
    plan = plan_run(run_copy, "auto", cfg)
    assert plan.resume_from is None and (plan.archived / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match="'must' but no complete checkpoint"):
        plan_run(run_copy, "must", cfg)


def test_checkpoints_of_two_runs_are_refused(run_copy):
    other = run_copy / "checkpoints" / "step_000007"
    shutil.copytree(run_copy / "checkpoints" / "step_000002", other)
    state = json.loads((other / "state.json").read_text())
    state["run_id"] = "someone-else"
    (other / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="holds checkpoints of more than one run .*someone-else"):
        plan_run(run_copy, "auto", _config(run_copy))


# --------------------------------------------------------------------------------------------- config changes


def test_changes_that_break_exact_resume_are_errors_unless_allowed(run_copy, capsys):
    cfg = _config(run_copy)
    cfg["data"]["seed"] = cfg["data"]["seed"] + 1
    cfg["train"]["prompts_per_step"] = 8
    cfg["optimizer"]["lr"] = 5e-4
    with pytest.raises(ConfigError, match=r"break an exact resume: data\.seed \(1 -> 2\), "
                                          r"train\.prompts_per_step \(4 -> 8\); list them in checkpoint"):
        plan_run(run_copy, "auto", cfg)
    plan = plan_run(run_copy, "auto", cfg, ["data.seed", "train"])
    assert plan.resume_from.name == "step_000002"
    assert plan.changes.allowed == ["data.seed (1 -> 2)", "train.prompts_per_step (4 -> 8)"]
    out = capsys.readouterr().out
    assert "deliberately changed settings" in out and "optimizer.lr (0.001 -> 0.0005)" in out


def test_compare_configs_ignores_where_and_how_the_run_is_logged():
    a = {"run_dir": "a", "checkpoint": {"keep_last": 2}, "logging": {"log_every": 1}, "train": {"num_steps": 3},
         "data": {"train_files": ["x.jsonl"]}}
    b = {"run_dir": "b", "checkpoint": {"keep_last": 5}, "logging": {"log_every": 9}, "train": {"num_steps": 9},
         "data": {"train_files": ["y.jsonl"]}, "new_section": {"x": 1}}
    ch = compare_configs(a, b)
    assert ch.breaking == ["data.train_files (['x.jsonl'] -> ['y.jsonl'])"]
    assert ch.other == ["train.num_steps (3 -> 9)"]
    assert compare_configs(a, b, ["*"]).breaking == []


# --------------------------------------------------------------------------------------------- rotation


def _fake_ckpt(run: Path, step: int, run_id) -> Path:
    d = run / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "data_cursor": 0, **({"run_id": run_id} if run_id
                                                                                  else {})}))
    return d


def test_rotation_deletes_only_this_runs_older_checkpoints(tmp_path):
    for s in (1, 2, 3):
        _fake_ckpt(tmp_path, s, "old")
    for s in (4, 9):
        _fake_ckpt(tmp_path, s, None)  # written before run ids: never deleted by rotation of a named run
    for s in (5, 6, 7):
        _fake_ckpt(tmp_path, s, "new")
    later = _fake_ckpt(tmp_path, 8, "new")
    deleted = rotate_checkpoints(tmp_path, "new", keep_last=2, newest=tmp_path / "checkpoints" / "step_000007")
    assert [p.name for p in deleted] == ["step_000005"]
    names = [p.name for p in step_dirs(tmp_path)]
    assert names == ["step_000001", "step_000002", "step_000003", "step_000004", "step_000006", "step_000007",
                     "step_000008", "step_000009"]
    assert later.is_dir()  # newer than the newest complete one: untouched


# --------------------------------------------------------------------------------------------- one trainer per run

_HOLDER = """
import sys
from megatron_srft.checkpoint.run_dir import plan_run
plan = plan_run(sys.argv[1], "auto", {})
print(plan.run_id, flush=True)
sys.stdin.read()
"""


def _start_holder(run: Path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def test_a_second_trainer_is_refused_naming_the_holder_and_a_crashed_holder_is_stale(tmp_path):
    import os
    import signal
    import socket

    run = tmp_path / "run"
    proc, holder_id = _start_holder(run)
    try:
        assert holder_id and _run_id(run) == holder_id
        (run / "metrics.jsonl").write_text('{"step": 1}\n')  # the holder's progress
        before = sorted(p.name for p in run.iterdir())
        for mode in ("auto", "fresh", "never"):
            with pytest.raises(CheckpointError) as e:
                plan_run(run, mode, {})
            msg = str(e.value)
            assert len(msg.splitlines()) == 1 and "in use by another process" in msg
            assert f"host {socket.gethostname()}, pid {proc.pid}, run {holder_id}" in msg, msg
        assert sorted(p.name for p in run.iterdir()) == before and _run_id(run) == holder_id  # nothing moved
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: the kernel drops the lock, the file stays
        proc.wait()
    assert (run / LOCK_FILE).is_file()
    plan = plan_run(run, "fresh", {})
    assert plan.run_id != holder_id and plan.archived.name.startswith(holder_id)
    assert json.loads((run / LOCK_FILE).read_text())["run_id"] == plan.run_id
    release_run_dir(run)


# --------------------------------------------------------------------------------------------- what a start may move


def test_empty_run_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine")
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match="run_dir: empty"):
            plan_run(empty, "auto", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path):
    for name in ("logs", "plots"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("the user's")
    (tmp_path / "config.yaml").write_text("the user's")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for mode in ("auto", "fresh", "never"):
        with pytest.raises(ConfigError, match=r"is not empty and is not a run directory \(no srft_run.json; it "
                                              r"holds config.yaml, logs, plots\)"):
            plan_run(tmp_path, mode, {})
        release_run_dir(tmp_path)
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert [p for p in after if p != LOCK_FILE] == before


def test_failed_starts_do_not_pile_up_in_previous_runs(tmp_path):
    run = tmp_path / "run"
    ids = []
    for _ in range(3):  # each start fails before its first metrics: run file, config.yaml, an error log
        ids.append(plan_run(run, "auto", {}).run_id)
        (run / "config.yaml").write_text("x")
        (run / "logs").mkdir(exist_ok=True)
        (run / "logs" / f"error-2026-rank0-{len(ids)}.log").write_text("traceback")
    assert len(set(ids)) == 3 and not (run / ARCHIVE_DIR).exists()
    assert len(list((run / "logs").iterdir())) == 3  # the tracebacks are kept
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # a start that did something is moved, as before
    plan = plan_run(run, "auto", {})
    assert plan.archived is not None and (plan.archived / "metrics.jsonl").is_file()
    release_run_dir(run)


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    from megatron_srft.checkpoint import run_dir as rd

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(64)))
    cfg = {"data": {"train_files": [str(data)]}}
    run = tmp_path / "run"
    rid = plan_run(run, "auto", cfg).run_id
    ckpt = _fake_ckpt(run, 3, rid)
    state = json.loads((ckpt / "state.json").read_text())
    state.update(config=cfg, data_fingerprints=rd.data_fingerprints(cfg))
    assert state["data_fingerprints"][str(data)]["rows"] == 64
    (ckpt / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(rd, "checkpoint_problems", lambda *a, **k: [])  # a fake checkpoint: the data is the point
    assert plan_run(run, "auto", cfg).resume_from == ckpt
    data.write_text("".join(f'{{"prompt": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(40)))  # same path
    with pytest.raises(ConfigError, match=r"data\.train_files: .*train\.jsonl changed \(64 rows, .* -> 40 rows"):
        plan_run(run, "auto", cfg)
    plan = plan_run(run, "auto", cfg, ["data.train_files"])
    assert plan.resume_from == ckpt and "40 rows" in capsys.readouterr().out
    release_run_dir(run)


def test_rotation_says_when_it_skips_a_symlinked_step_dir(tmp_path, capsys):
    for s in (1, 2, 3):
        _fake_ckpt(tmp_path, s, "r")
    elsewhere = tmp_path / "elsewhere" / "step_000001"
    elsewhere.parent.mkdir()
    (tmp_path / "checkpoints" / "step_000001").rename(elsewhere)
    (tmp_path / "checkpoints" / "step_000001").symlink_to(elsewhere)
    deleted = rotate_checkpoints(tmp_path, "r", keep_last=1, newest=tmp_path / "checkpoints" / "step_000003")
    assert [p.name for p in deleted] == ["step_000002"]
    out = capsys.readouterr().out
    assert "rotation skips" in out and "step_000001: it is a symlink" in out, out
    assert (elsewhere / "state.json").is_file()


def test_a_planted_tmp_symlink_never_takes_a_checkpoint_outside_the_run(run_copy, toy, tmp_path):
    """A symlink at the name the next save writes to: the save replaces the link, never writes through it."""
    from tests.dist import run_ranks
    from tests.toy_run import toy_overrides, train_toy

    outside = tmp_path / "outside"
    outside.mkdir()
    step3 = run_copy / "checkpoints" / "step_000003"
    planted = temp_sibling(step3, _run_id(run_copy))
    planted.symlink_to(outside)
    run_ranks(train_toy, 1, toy_overrides(toy, run_copy, 3))
    assert list(outside.iterdir()) == []
    assert step3.is_dir() and not step3.is_symlink() and manifest.verify_part(step3) == []
    assert not planted.exists() and not planted.is_symlink()
