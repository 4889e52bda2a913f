"""`srft launch`: host-list expansion, the per-node torchrun commands (dry run), config/layout checks, exec."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_srft import cli
from megatron_srft.errors import UserError
from megatron_srft.cli.launch import expand_hostlist, plan_launch, slurm_hostnames, torchrun_forwards_signals

from tests.distributed.test_layout import QWEN25_7B

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_7B = str(ROOT / "examples/configs/qwen2.5-math-7b-srft.yaml")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch, tmp_path):
    """A clean environment: no SLURM variables and no scontrol on PATH unless a test adds them."""
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.parametrize("spec,hosts", [
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("node7", ["node7"]),
    ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
    ("rack[1-2]-n[0-1]", ["rack1-n0", "rack1-n1", "rack2-n0", "rack2-n1"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("x1,y2", ["x1", "y2"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-3", "gpu1-3]", "gpu[3-1]", "gpu[a-b]", ""])
def test_expand_hostlist_rejects_bad_lists(bad):
    with pytest.raises(UserError):
        expand_hostlist(bad)


def test_slurm_hostnames_prefers_scontrol(tmp_path, monkeypatch):
    assert slurm_hostnames("gpu[01-02]") == ["gpu01", "gpu02"]  # no scontrol: our expander
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "h-a\\nh-b\\n"\n')
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    assert slurm_hostnames("gpu[01-02]") == ["h-a", "h-b"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["launch", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.startswith("torchrun ")]


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_dry_run_one_node(capsys):
    rc, out, err = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "--config", EXAMPLE_7B, "--dry-run",
                           "--", "train.num_steps=3", "optimizer.lr=2.0e-6")
    assert rc == 0, err
    (cmd,) = commands(out)
    f = flags(cmd)
    assert cmd[0] == "torchrun"
    assert f["nnodes"] == "1" and f["nproc-per-node"] == "8" and f["node-rank"] == "0"
    assert f["rdzv-backend"] == "c10d" and f["rdzv-endpoint"] == "localhost:29500" and f["rdzv-id"] == "srft"
    assert cmd[cmd.index("-m"):] == ["-m", "megatron_srft", "train", "--config", EXAMPLE_7B,
                                     "train.num_steps=3", "optimizer.lr=2.0e-6"]
    assert "world size 8" in out
    assert "config OK at world size 8" in out  # the model dir is not on this machine: layout not checked
    if torchrun_forwards_signals():
        assert "SIGUSR1" in f["signals-to-handle"] and f["shutdown-timeout"] == "270"


def test_dry_run_four_nodes_from_slurm_env(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-03,07]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NODEID", "2")
    rc, out, err = run_cli(capsys, "--config", EXAMPLE_7B, "--dry-run")
    assert rc == 0, err
    cmds = commands(out)
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        f = flags(cmd)
        assert f["nnodes"] == "4" and f["nproc-per-node"] == "8" and f["node-rank"] == str(i)
        assert f["rdzv-endpoint"] == "gpu01:29500" and f["rdzv-id"] == "4242" and f["rdzv-backend"] == "c10d"
    for i, host in enumerate(["gpu01", "gpu02", "gpu03", "gpu07"]):
        assert f"# node {i} ({host})" in out
    assert "world size 32" in out
    # the node this process runs on comes from SLURM_NODEID
    plan = plan_launch(config=EXAMPLE_7B, overrides=[], env=dict(os.environ),
                       forward_signals=torchrun_forwards_signals())
    assert plan.node_rank == 2 and plan.commands == cmds


def test_node_rank_falls_back_to_procid_and_flags_win():
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4(x2)",
           "SLURM_PROCID": "1", "SLURM_JOB_ID": "9"}
    plan = plan_launch(config="c.yaml", overrides=[], env=env)
    assert plan.node_rank == 1 and plan.gpus_per_node == 4 and plan.rdzv_endpoint == "n1:29500"
    plan = plan_launch(config="c.yaml", overrides=[], env=env, rdzv_port=6000, rdzv_host="n2", gpus_per_node=2)
    assert plan.rdzv_endpoint == "n2:6000" and plan.world_size == 4


@pytest.mark.parametrize("argv,words", [
    (["--nodes", "2", "--gpus-per-node", "8"], "--rdzv-host"),
    (["--nodes", "3", "--gpus-per-node", "8", "--nodelist", "gpu[1-2]"], "has 2 hosts"),
    (["--nodes", "1"], "SLURM_GPUS_ON_NODE"),
    (["--nodes", "1", "--gpus-per-node", "6"], "train.prompts_per_step"),  # TP 2 -> DP 3 does not divide 64
    (["--nodes", "1", "--gpus-per-node", "8", "--node-rank", "1"], "--node-rank"),
])
def test_bad_launch_is_one_line_error(capsys, argv, words):
    rc, out, err = run_cli(capsys, *argv, "--config", EXAMPLE_7B, "--dry-run")
    assert rc == 2
    assert err.startswith("srft launch: error: ") and words in err and err.count("\n") == 1, err


def _model_dir(tmp_path: Path, hf: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    return d


def test_dry_run_checks_layout_when_model_config_is_readable(capsys, tmp_path):
    d = _model_dir(tmp_path, QWEN25_7B)
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run", "--", f"model.path={d}")
    assert rc == 0, err
    assert "config and layout OK at world size 32" in out and "estimated GiB per GPU" in out
    rc, out, err = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "--config", EXAMPLE_7B, "--dry-run",
                           "--", f"model.path={d}", "parallel.tensor_model_parallel_size=8",
                           "model.make_vocab_size_divisible_by=128")
    assert rc == 2 and "parallel.tensor_model_parallel_size: 8 does not divide" in err, err


def test_exec_runs_this_nodes_torchrun(tmp_path):
    """Without --dry-run, `srft launch` replaces itself with this node's torchrun command."""
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "argv.txt"
    (fake / "torchrun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    (fake / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2",
               SLURM_NODEID="1", SLURM_JOB_ID="55", SLURM_GPUS_ON_NODE="8", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "megatron_srft", "launch", "--config", EXAMPLE_7B,
                          "--", "train.num_steps=1"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    argv = record.read_text().split("\n")[:-1]
    assert "--node-rank=1" in argv and "--nnodes=2" in argv and "--rdzv-endpoint=gpu01:29500" in argv
    assert argv[-4:] == ["train", "--config", EXAMPLE_7B, "train.num_steps=1"]
    assert "node 1:" in res.stderr


def test_sigusr1_to_srft_launch_checkpoints_the_toy_run(run_copy, toy, tmp_path):
    """Pre-emption the way users launch: SIGUSR1 to `srft launch` (which execs torchrun) reaches the trainer, which
    finishes its step, writes a checkpoint and exits. The run starts with checkpoint.resume=fresh in a used run
    directory, so the previous run is moved aside (not deleted) by the real training loop."""
    import signal
    import socket
    import time

    import yaml

    from megatron_srft.checkpoint import manifest
    from megatron_srft.checkpoint.run_dir import ARCHIVE_DIR, RUN_FILE, step_dirs
    from megatron_srft.config import load_config, to_dict
    from tests.toy_run import toy_overrides

    old_run = json.loads((run_copy / RUN_FILE).read_text())["run_id"]
    cfg = load_config(None, toy_overrides(toy, run_copy, 10_000, ["checkpoint.save_every=0",
                                                                       "checkpoint.resume=fresh"]))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_srft", "launch", "--gpus-per-node", "1",
                             "--rdzv-port", str(port), "--shutdown-timeout", "240", "--config",
                             str(tmp_path / "cfg.yaml")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_copy / "metrics.jsonl"
    try:
        deadline = time.time() + 480
        # the old run was moved aside, and the new run finished a step
        while not ((run_copy / ARCHIVE_DIR).is_dir() and metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torchrun forwarded the signal and the trainer returned normally (its last metrics line); torchrun itself
    # then exits non-zero (it re-raises a handled signal once its workers are done), which is its design
    assert "closing signal SIGUSR1" in out and '"loss/sft"' in out, out[-3000:]
    (ckpt,) = step_dirs(run_copy)
    state = json.loads((ckpt / "state.json").read_text())
    assert 1 <= state["step"] < 10_000 and state["run_id"] != old_run
    assert manifest.verify_part(ckpt) == []
    (archived,) = (run_copy / ARCHIVE_DIR).iterdir()
    assert [p.name for p in step_dirs(archived)] == ["step_000001", "step_000002"]
