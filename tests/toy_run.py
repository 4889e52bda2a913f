"""A real training run on the toy task, shared by the checkpoint, run-directory and pre-emption tests."""

from __future__ import annotations

from pathlib import Path


def toy_overrides(toy: Path, run_dir: Path, steps: int, extra=(), preset: str = "sft") -> list[str]:
    """2-prompt minibatches of ``preset`` (sft: no rollout engine), 3 rollouts per prompt, a checkpoint every step."""
    return [
        f"run_dir={run_dir}", f"model.path={toy / 'model'}", "model.params_dtype=fp32",
        "model.make_vocab_size_divisible_by=128",
        f"data.train_files=[{toy / 'train.jsonl'}]", "data.template=chat", "data.max_prompt_length=32",
        "data.max_response_length=24", f"algorithm.preset={preset}", f"train.num_steps={steps}",
        "train.prompts_per_step=4", "train.prompts_per_minibatch=2", "train.reward=exact", "train.reward_workers=1",
        "train.micro_batch_tokens=256", "rollout.num_rollouts_per_prompt=3", "rollout.dtype=fp32",
        "optimizer.lr=1e-3", "checkpoint.save_every=1", "checkpoint.keep_last=3", "logging.progress_bar=false",
        *extra,
    ]


def train_toy(overrides, stop_after=None):
    from megatron_srft.config import load_config
    from megatron_srft.training.loop import train

    return train(load_config(None, overrides), stop_after=stop_after)
