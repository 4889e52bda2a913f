"""Every failure is one line naming the command and what went wrong; the traceback goes to a log file (or stderr
with SRFT_DEBUG=1), never lost; under torchrun one rank reports an error that every rank hits."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srft import cli
from megatron_srft.cli.failures import claim, describe

ROOT = Path(__file__).resolve().parents[2]


def _run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/mean": s / 10} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _one_line(capsys, argv, code):
    capsys.readouterr()
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_disk_full_is_one_line_and_the_traceback_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SRFT_DEBUG", raising=False)
    run, out = _run_dir(tmp_path), tmp_path / "plots"

    def full_disk(fd):  # a full disk often shows at the flush (delayed allocation): ENOSPC naming no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    err = _one_line(capsys, ["plot", str(run), "--out", str(out)], 1)
    monkeypatch.undo()
    assert err.startswith(f"srft plot: error: disk full while writing: {out / 'reward.png'}"), err
    assert "(traceback: " in err, err
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no partial file left behind
    log = Path(err.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "OSError" in log.read_text() and "Traceback" in log.read_text()
    log.unlink()


def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SRFT_DEBUG", raising=False)
    # /sys refuses new directories (read-only mount: EROFS; as root in a container: EPERM)
    err = _one_line(capsys, ["plot", str(_run_dir(tmp_path)), "--out", "/sys/srft-test/plots"], 2)
    assert err.startswith("srft plot: error: ") and "/sys/srft-test" in err, err
    assert "read-only file system" in err or "permission denied" in err, err


def test_srft_debug_prints_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SRFT_DEBUG", "1")
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("srft plot: error: ") and "no metrics.jsonl" in err


def test_describe_names_the_cause():
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:
            f.write("x")
    msg, code, log = describe(full.value)
    assert msg.startswith("disk full") and code == 1 and log
    msg, code, _ = describe(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"))
    assert msg == "read-only file system: /mnt/ro/out; choose a writable output directory" and code == 2
    try:
        b"ab\xffcd".decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e
    assert describe(bad)[0].startswith("invalid UTF-8 (invalid start byte at byte 2)")
    assert describe(RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                                 "file data/0: file write failed"))[0].startswith("disk full")
    assert describe(KeyError("x")) == ("KeyError: 'x'", 1, True)


def _checkpoint_exception(inner: BaseException):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise inner
    except BaseException as e:
        return CheckpointException("save failed", {0: _wrap_exception(e)})


@pytest.mark.parametrize("code, words, exit_code", [(errno.ENOSPC, "disk full while writing", 1),
                                                    (errno.EROFS, "read-only file system", 2),
                                                    (errno.EACCES, "permission denied", 2)])
def test_checkpoint_exception_is_unwrapped_to_one_line_naming_the_path(tmp_path, capsys, monkeypatch, code, words,
                                                                       exit_code):
    """torch's CheckpointException derives from BaseException: the command line still reports it in one line
    naming the file, and the traceback goes to the run's log."""
    import types

    monkeypatch.delenv("SRFT_DEBUG", raising=False)
    shard = tmp_path / "run" / "checkpoints" / "step_000003.tmp-x" / "model" / "__0_0.distcp"
    exc = _checkpoint_exception(OSError(code, os.strerror(code), str(shard)))
    assert not isinstance(exc, Exception)
    msg, _, _ = describe(exc)
    assert msg.startswith(words) and str(shard) in msg and len(msg.splitlines()) == 1, msg

    def main(args):
        args.srft_run_dir = str(tmp_path / "run")
        raise exc

    fake = types.SimpleNamespace(add_arguments=lambda p: None, main=main)
    monkeypatch.setitem(sys.modules, "srft_test_saver", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "saver", ("srft_test_saver", "test"))
    err = _one_line(capsys, ["saver"], exit_code)
    assert err.startswith(f"srft saver: error: {words}") and str(shard) in err, err
    log = Path(err.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "run" / "logs" and "CheckpointException" in log.read_text()


def test_one_rank_claims_the_message(tmp_path, monkeypatch):
    monkeypatch.setattr("megatron_srft.cli.failures.RANK0_GRACE_S", 0.0)
    marker = tmp_path / "logs" / ".failure"
    assert claim(marker, 0) and not claim(marker, 1) and not claim(marker, 0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")  # a later job's first failure is reported again
    assert claim(marker, 1)


def test_torchrun_error_on_every_rank_is_reported_once(tmp_path, toy):
    """Two ranks hit the same config error (world-size check after start-up): one line, from rank 0."""
    from tests.toy_run import toy_overrides

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "SRFT_DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    overrides = toy_overrides(toy, tmp_path / "run", 1, ["train.prompts_per_minibatch=1",
                                                                "train.prompts_per_step=3"])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={port}", "-m", "megatron_srft", "train", *overrides],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("srft train: error:")]
    assert lines == ["srft train: error: train.prompts_per_step: 3 is not divisible by the data-parallel size "
                     "(2 = world 2 / (TP 1 x PP 1 x CP 1))"], res.stderr[-3000:]
    logs = sorted(p.name for p in (tmp_path / "run" / "logs").glob("error-*.log"))
    assert len(logs) == 2 and logs[0].endswith("rank0.log") and logs[1].endswith("rank1.log")
