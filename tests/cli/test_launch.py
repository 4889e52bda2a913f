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
from megatron_srft.training.launch import expand_hostlist, plan_launch, slurm_hostnames, torchrun_forwards_signals

from tests.distributed.test_layout import QWEN25_7B

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_7B = str(ROOT / "examples/configs/qwen2.5-math-7b-srft.yaml")
SYSTEM_PATH = os.environ.get("PATH", "")  # training runs need it (vLLM calls lscpu); no_slurm empties PATH


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


def test_launch_runs_this_nodes_torchrun(capsys, monkeypatch):
    """Without --dry-run, `srft launch` runs this node's torchrun command (torchrun's agent in this process, so srun's
    signals reach it) and tells the trainers where to leave a stop line."""
    from megatron_srft.training import launch
    from megatron_srft.signals import STOP_FILE_ENV

    seen = []
    monkeypatch.setattr(launch, "run_torchrun", lambda argv: seen.append((argv, os.environ[STOP_FILE_ENV])))
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    for k, v in dict(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_ID="55",
                     SLURM_GPUS_ON_NODE="8").items():
        monkeypatch.setenv(k, v)
    rc, out, err = run_cli(capsys, "--config", EXAMPLE_7B, "--", "train.num_steps=1")
    assert rc == 0, err
    ((argv, stop_file),) = seen
    assert "--node-rank=1" in argv and "--nnodes=2" in argv and "--rdzv-endpoint=gpu01:29500" in argv
    assert argv[-4:] == ["train", "--config", EXAMPLE_7B, "train.num_steps=1"]
    assert "node 1: torchrun " in err and not Path(stop_file).parent.exists()  # its temporary directory is gone


def test_launch_status_after_a_forwarded_signal(capsys, monkeypatch):
    """The trainers' stop line (left in the stop file) is the launch's last line with status 75; a signal after
    which no trainer left one is an error line with 128 + the signal's number, never torchrun's traceback."""
    import signal

    from megatron_srft.training import launch
    from megatron_srft.signals import STOP_FILE_ENV, STOPPED_EXIT_CODE

    def stopped(argv):
        Path(os.environ[STOP_FILE_ENV]).write_text("stopped at step 3 by SIGUSR1; checkpoint at /r/step_000003 "
                                                   "(a requeue resumes from it)\n")
        return signal.SIGUSR1

    monkeypatch.setattr(launch, "run_torchrun", stopped)
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    assert launch.run_node(["torchrun", "-m", "megatron_srft", "train"]) == STOPPED_EXIT_CODE == 75
    assert capsys.readouterr().err.splitlines()[-1] == ("srft launch: stopped at step 3 by SIGUSR1; checkpoint at "
                                                        "/r/step_000003 (a requeue resumes from it)")
    monkeypatch.setattr(launch, "run_torchrun", lambda argv: signal.SIGUSR1)
    assert launch.run_node(["torchrun", "-m", "megatron_srft", "train"]) == 128 + signal.SIGUSR1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("srft launch: error: torchrun received SIGUSR1")
    assert STOP_FILE_ENV not in os.environ  # nothing of the launch is left in this process's environment


def test_dry_run_estimates_the_preemption_lead(capsys, tmp_path):
    """The lead follows from the checkpoint's size at an assumed bandwidth and the run's longest step/evaluation."""
    d = _model_dir(tmp_path, QWEN25_7B)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "time/step": 380.0}, {"step": 2, "time/step": 400.0, "time/eval": 95.0}]))
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run", "--write-gbs", "2", "--", f"model.path={d}", f"run_dir={run}")
    assert rc == 0, err
    # 7.6e9 parameters x (2 bytes of bf16 weights + 12 of fp32 master weights and Adam moments) = 106.6 GB / 2 GB/s
    assert "one checkpoint 106.6 GB (weights + optimizer state) written at an assumed 2 GB/s aggregate" in out
    assert "53 s; longest step 400 s, evaluation 95 s" in out
    assert "--shutdown-timeout >= 490 s (" in out and "#SBATCH --signal=B:USR1@520 (" in out  # 400 + 53 + 30
    assert "--shutdown-timeout 270 is below that" in out


DISAGG_7B = ["rollout.placement=disaggregated", "rollout.num_engine_ranks=16", "rollout.max_staleness=1",
             "rollout.gpu_memory_utilization=0.9"]


def test_dry_run_prints_the_placement(capsys, tmp_path):
    """Colocated: every rank trains and generates. Disaggregated: the split, the engines, their nodes, the memory of
    each role, and the one-step-off stop's extra generation in the pre-emption lead."""
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run")
    assert rc == 0, err
    assert ("# placement colocated: all 32 ranks train (TP 2 x PP 1 x CP 1 x DP 16) and generate (32 engine(s) of "
            "rollout TP 1); on-policy (max_staleness 0)") in out
    d = _model_dir(tmp_path, QWEN25_7B | {"max_position_embeddings": 16384, "rope_theta": 40000.0})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 400.0, "time/generate": 300.0}) + "\n")
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run", "--write-gbs", "2", "--", f"model.path={d}", f"run_dir={run}",
                           *DISAGG_7B)
    assert rc == 0, err
    assert ("# placement disaggregated: 16 training ranks 0-15 (TP 2 x PP 1 x CP 1 x DP 8); 16 engine ranks 16-31 "
            "(16 engine(s) of rollout TP 1); one-step-off (max_staleness 1, TIS cap 2)") in out
    assert "# placement: the engines fill nodes 2-3" in out
    # DP 8 over the 16 training ranks: the optimizer's share doubles against colocated DP 16; no vLLM beside it
    assert "estimated GiB per training GPU" in out and "optimizer 5.3" in out and "per engine GPU: vllm 72.0" in out
    # 400 s step + 300 s in-flight generation + 53 s save + 30 s margin
    assert "one-step-off: + the in-flight generation, longest 300 s (time/generate)" in out
    assert "--shutdown-timeout >= 790 s (" in out and "#SBATCH --signal=B:USR1@820 (" in out
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 400.0}) + "\n")  # no generation time
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run", "--write-gbs", "2", "--", f"model.path={d}", f"run_dir={run}",
                           *DISAGG_7B)
    assert rc == 0 and "in-flight generation, not measured" in out, err
    assert "--shutdown-timeout >= 490 s + what is unknown above" in out
    # engine ranks that are not whole nodes: the node that holds both roles is named
    rc, out, err = run_cli(capsys, "--nodes", "4", "--gpus-per-node", "6", "--nodelist", "g[1-4]", "--config",
                           EXAMPLE_7B, "--dry-run", "--", "rollout.placement=disaggregated", "rollout.num_engine_ranks=8")
    assert rc == 0, err
    assert "16 training ranks 0-15 (TP 2 x PP 1 x CP 1 x DP 8); 8 engine ranks 16-23" in out
    assert "# placement: node 2 holds both training and engine ranks" in out


def test_dry_run_of_impossible_placements_is_one_line(capsys):
    rc, out, err = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "--config", EXAMPLE_7B, "--dry-run", "--",
                           "rollout.placement=disaggregated", "rollout.num_engine_ranks=8")
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("srft launch: error: rollout.num_engine_ranks: 8 leaves no training rank in a world of 8")
    rc, out, err = run_cli(capsys, "--nodes", "1", "--gpus-per-node", "8", "--config", EXAMPLE_7B, "--dry-run", "--",
                           "rollout.max_staleness=1")
    assert rc == 2 and "rollout.max_staleness: expected 0 with placement colocated" in err and err.count("\n") == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_config(toy, run: Path, out: Path, preset: str, extra=()) -> Path:
    import yaml

    from megatron_srft.config import load_config, to_dict
    from tests.toy_run import toy_overrides

    cfg = load_config(None, toy_overrides(toy, run, 10_000, list(extra), preset=preset))
    out.write_text(yaml.safe_dump(to_dict(cfg)))
    return out


def _start_launch(cfg: Path, cwd: Path, gpus_per_node: int) -> subprocess.Popen:
    """`srft launch --config CFG` on this node as a user starts it (no launcher variables inherited), output piped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", PATH=SYSTEM_PATH)
    return subprocess.Popen([sys.executable, "-m", "megatron_srft", "launch", "--gpus-per-node", str(gpus_per_node),
                             "--rdzv-port", str(_free_port()), "--shutdown-timeout", "240", "--config", str(cfg)],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_when(proc: subprocess.Popen, ready, sig, timeout_s: float = 480) -> str:
    """Send ``sig`` to ``proc`` once ``ready()`` holds; its whole output after it exits."""
    import time

    deadline = time.time() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(sig)
        return proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def _last_line(out: str) -> str:
    return [ln for ln in out.splitlines() if ln.strip()][-1]


def _stop_line(step: int, sig: str, ckpt: Path) -> str:
    return f"stopped at step {step} by {sig}; checkpoint at {ckpt} (a requeue resumes from it)"


def test_sigusr1_to_srft_launch_after_a_save_checkpoints_and_resumes(toy, run_copy, tmp_path, monkeypatch):
    """Pre-emption the way users launch, after the run has saved (so Megatron's checkpoint queue manager exists) and
    with rollouts (so the reward pool's workers exist): SIGUSR1 to `srft launch` reaches the trainer through
    torchrun, which signals the trainer's whole process group. Its children ignore it; the trainer finishes the
    step, saves it, and the launch ends with one line and exit status 75. A resume continues from that checkpoint.
    The run starts with checkpoint.resume=fresh in a used run directory: the real loop moves the previous run aside
    (not deleted)."""
    import signal

    from megatron_srft.checkpoint import manifest
    from megatron_srft.checkpoint.run_dir import ARCHIVE_DIR, RUN_FILE, checkpoint_root, read_state, step_dirs
    from megatron_srft.signals import STOPPED_EXIT_CODE
    from megatron_srft.training.metrics import read_metrics
    from tests.dist import run_ranks
    from tests.toy_run import toy_overrides, train_toy

    monkeypatch.setenv("PATH", SYSTEM_PATH)  # for the resume's rank
    run = run_copy
    old_run = json.loads((run / RUN_FILE).read_text())["run_id"]
    cfg = _toy_config(toy, run, tmp_path / "cfg.yaml", "srft", ["checkpoint.save_every=1", "checkpoint.resume=fresh"])
    proc = _start_launch(cfg, tmp_path, gpus_per_node=1)
    # the old run was moved aside, and the new run saved step 2
    out = _signal_when(proc, lambda: (run / ARCHIVE_DIR).is_dir() and "step_000002" in [p.name for p in step_dirs(run)],
                       signal.SIGUSR1)

    ckpt = step_dirs(run)[-1]
    step = read_state(ckpt)["step"]
    assert step >= 2 and _last_line(out) == "srft launch: " + _stop_line(step, "SIGUSR1", ckpt), out[-3000:]
    assert proc.returncode == STOPPED_EXIT_CODE and "SignalException" not in out and "Traceback" not in out
    assert "closing signal SIGUSR1" in out  # torchrun forwarded it
    assert manifest.verify_part(ckpt) == [] and not list(checkpoint_root(run).glob("*.tmp*"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, step + 1))  # no step after the signalled one began
    assert [r["reward/timeouts"] for r in rows] == [0.0] * step  # the reward workers survived the signal
    assert read_state(ckpt)["run_id"] != old_run
    (archived,) = (run / ARCHIVE_DIR).iterdir()
    assert [p.name for p in step_dirs(archived)] == ["step_000001", "step_000002"]

    # the requeued job: the same config resumes from the signal's checkpoint and trains the next step
    run_ranks(train_toy, 1, toy_overrides(toy, run, 10_000, ["checkpoint.save_every=1", "checkpoint.resume=must"],
                                          preset="srft"), step + 1)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 2))
    resumed = step_dirs(run)[-1]
    assert resumed.name == f"step_{step + 1:06d}" and read_state(resumed)["data_cursor"] == (step + 1) * 4


def test_sigterm_to_srft_train_exits_75_with_one_line(toy, tmp_path):
    """A stopped run must not look finished: SIGTERM to a single-process `srft train` saves the step, prints one
    line and exits 75 (no final metrics line), so `srft train && srft convert ...` does not carry on."""
    import signal

    from megatron_srft.checkpoint.run_dir import read_state, step_dirs
    from megatron_srft.signals import STOPPED_EXIT_CODE

    run = tmp_path / "run"
    cfg = _toy_config(toy, run, tmp_path / "cfg.yaml", "sft", ["checkpoint.save_every=0"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "SRFT_STOP"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PATH=SYSTEM_PATH)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_srft", "train", "--config", str(cfg)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    out = _signal_when(proc, lambda: metrics.is_file() and metrics.read_text().strip(), signal.SIGTERM)
    (ckpt,) = step_dirs(run)
    step = read_state(ckpt)["step"]
    assert proc.returncode == STOPPED_EXIT_CODE, out[-3000:]
    assert _last_line(out) == "srft train: " + _stop_line(step, "SIGTERM", ckpt) and '"loss/sft"' not in out, \
        out[-3000:]


class _SignalsDuringSecondEvaluation:
    """The real engine; its second greedy generation (the evaluation after step 1) brings a SIGUSR1."""

    greedy_calls = 0

    def __init__(self, **kwargs):
        from megatron_srft.rollout.vllm_engine import VllmEngine

        self.engine = VllmEngine(**kwargs)

    def generate(self, *args, temperature, **kwargs):
        import signal

        if temperature == 0:
            type(self).greedy_calls += 1
            if type(self).greedy_calls == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
        return self.engine.generate(*args, temperature=temperature, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _train_signalled_during_eval(overrides):
    from megatron_srft.config import load_config
    from megatron_srft.signals import RunStopped
    from megatron_srft.training.loop import train

    try:
        train(load_config(None, overrides), engine_factory=_SignalsDuringSecondEvaluation)
    except RunStopped as e:
        return e.step, str(e.checkpoint)
    return "not stopped"


def test_a_signal_during_the_evaluation_starts_no_new_step(toy, tmp_path, monkeypatch):
    """SIGUSR1 during step 1's evaluation: the stop flag is read before step 2's rollouts, so the run saves step 1
    (nothing saved it on schedule) and stops instead of training another step."""
    from megatron_srft.checkpoint.run_dir import step_dirs
    from megatron_srft.training.metrics import read_metrics
    from tests.dist import run_ranks
    from tests.toy_run import toy_overrides

    monkeypatch.setenv("PATH", SYSTEM_PATH)
    run = tmp_path / "run"
    extra = [f"data.eval_files=[{toy / 'test.jsonl'}]", "train.eval_every=1", "checkpoint.save_every=0"]
    (got,) = run_ranks(_train_signalled_during_eval, 1, toy_overrides(toy, run, 3, extra))
    assert got == (1, str(run / "checkpoints" / "step_000001"))
    assert [p.name for p in step_dirs(run)] == ["step_000001"]
    assert sorted({r["step"] for r in read_metrics(run)}) == [0, 1]
