"""The training loop end to end on the toy task: real Megatron on gloo ranks, real vLLM (CPU), real rewards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dist import run_ranks


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from megatron_srft.data.toy import ToySettings, make_toy

    root = tmp_path_factory.mktemp("toy")
    return make_toy(root / "toy", ToySettings(num_train=64, num_test=8, max_ops=2))


def _overrides(toy: Path, run_dir: Path, preset: str, steps: int, extra=()) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.path={toy / 'model'}", "model.params_dtype=fp32",
        "model.make_vocab_size_divisible_by=128",
        f"data.train_files=[{toy / 'train.jsonl'}]", "data.template=chat",
        "data.max_prompt_length=32", "data.max_response_length=24",
        f"algorithm.preset={preset}", f"train.num_steps={steps}", "train.prompts_per_step=4",
        "train.prompts_per_minibatch=2", "train.reward=exact", "train.reward_workers=1",
        "train.micro_batch_tokens=256", "rollout.num_rollouts_per_prompt=3", "rollout.dtype=fp32",
        "optimizer.lr=1e-3", "checkpoint.save_every=1", "checkpoint.keep_last=2", "logging.progress_bar=false",
        *extra,
    ]


def _train(overrides, stop_after=None):
    from megatron_srft.config import load_config
    from megatron_srft.training.loop import train

    cfg = load_config(None, overrides)
    return train(cfg, stop_after=stop_after)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sft_three_steps_dp2(toy, tmp_path):
    run = tmp_path / "sft_dp2"
    run_ranks(_train, 2, _overrides(toy, run, "sft", 3))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss/sft"] > 0 for r in rows)
    assert rows[-1]["loss/sft"] < rows[0]["loss/sft"]  # lr 1e-3 on the same demonstrations: it learns
    assert (run / "checkpoints" / "step_000003" / "state.json").is_file()


@pytest.mark.slow
def test_srft_three_steps_tp2(toy, tmp_path):
    run = tmp_path / "srft_tp2"
    run_ranks(_train, 2, _overrides(toy, run, "srft", 3, ["parallel.tensor_model_parallel_size=2"]))
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "entropy/rollout", "entropy/demo", "weight/sft_mean", "response/length_mean",
                "mismatch/abs_mean", "time/rollout", "time/sync", "groups/all_equal_fraction"):
        assert key in rows[-1], key
    # fp32 engine vs fp32 trainer on the same weights: the sampled tokens' log-probs agree closely
    assert rows[0]["mismatch/abs_mean"] < 1e-3


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(toy, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_ranks(_train, 1, _overrides(toy, full, "srft", 3))
    run_ranks(_train, 1, _overrides(toy, part, "srft", 3), 2)  # stops after step 2 (checkpoint at 2)
    assert [r["step"] for r in _rows(part)] == [1, 2]
    # a killed save leaves only a .tmp directory: it must be ignored
    (part / "checkpoints" / "step_000003.tmp").mkdir()
    run_ranks(_train, 1, _overrides(toy, part, "srft", 3, ["checkpoint.resume=must"]))
    a, b = _rows(full)[-1], _rows(part)[-1]
    assert b["step"] == 3
    for key in ("reward/mean", "loss/minibatch", "entropy/rollout", "optim/grad_norm", "response/length_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def _load_checkpoint(ckpt_dir, model_dir):
    from megatron_srft.distributed import groups as parallel
    from megatron_srft.checkpoint.training_state import load_training_checkpoint
    from megatron_srft.config import SRFTConfig
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_model, build_optimizer

    cfg = SRFTConfig()
    cfg.model.params_dtype = "fp32"
    groups = parallel.init_distributed(cfg.parallel)
    handle = build_model(load_arch(model_dir), cfg.model, cfg.parallel)
    opt = build_optimizer(handle, cfg.optimizer, cfg.model, cfg.parallel)
    return load_training_checkpoint(ckpt_dir, handle.chunks, opt, rank=groups.rank).step


def test_last_complete_checkpoint_of_a_killed_run_loads(toy, tmp_path):
    from megatron_srft.checkpoint.training_state import latest_checkpoint

    run = tmp_path / "killed"
    run_ranks(_train, 1, _overrides(toy, run, "sft", 2))
    # simulate a kill in the middle of writing step 3: a partial .tmp directory and no state.json
    partial = run / "checkpoints" / "step_000003.tmp"
    shutil.copytree(run / "checkpoints" / "step_000002" / "model", partial / "model")
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_000002"
    assert run_ranks(_load_checkpoint, 1, str(ckpt), str(toy / "model")) == [2]


def test_layout_is_checked_against_the_model_before_building(toy, tmp_path):
    # 32 + 1000 tokens exceed the toy model's 256 positions: a ConfigError naming the field, before any build
    with pytest.raises(AssertionError, match=r"ConfigError: data.max_response_length: max_prompt_length \+ "
                                             r"max_response_length = 1032 exceeds"):
        run_ranks(_train, 1, _overrides(toy, tmp_path / "long", "sft", 1, ["data.max_response_length=1000"]))
    assert not (tmp_path / "long" / "checkpoints").exists()
