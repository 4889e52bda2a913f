"""A real training run made once per session (2 SFT steps on the toy task, 1 rank, a checkpoint after each step),
which the checkpoint tests copy and damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.dist import run_ranks


def toy_overrides(toy: Path, run_dir: Path, steps: int, extra=()) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.path={toy / 'model'}", "model.params_dtype=fp32",
        f"data.train_files=[{toy / 'train.jsonl'}]", "data.template=chat", "data.max_prompt_length=32",
        "data.max_response_length=24", "algorithm.preset=sft", f"train.num_steps={steps}",
        "train.prompts_per_step=4", "train.prompts_per_minibatch=2", "train.reward=exact", "train.reward_workers=1",
        "train.micro_batch_tokens=256", "optimizer.lr=1e-3", "checkpoint.save_every=1", "checkpoint.keep_last=3",
        "logging.progress_bar=false", *extra,
    ]


def train_toy(overrides):
    from megatron_srft.config import load_config
    from megatron_srft.training.loop import train

    return train(load_config(None, overrides))


@pytest.fixture(scope="session")
def toy_task(tmp_path_factory):
    from megatron_srft.data.toy import ToySettings, make_toy

    return make_toy(tmp_path_factory.mktemp("ckpt_toy") / "toy", ToySettings(num_train=64, num_test=8, max_ops=2))


@pytest.fixture(scope="session")
def trained_run(toy_task, tmp_path_factory):
    """RUN_DIR with checkpoints/step_000001 and step_000002 (model/, optimizer/, rng/, state.json, manifests)."""
    run = tmp_path_factory.mktemp("ckpt_run") / "run"
    run_ranks(train_toy, 1, toy_overrides(toy_task, run, 2))
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run directory, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, symlinks=True)
    return dst
