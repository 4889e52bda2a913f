"""A real training run on the toy task, shared by the checkpoint, run-directory and pre-emption tests."""

from __future__ import annotations

from pathlib import Path


def toy_overrides(toy: Path, run_dir: Path, steps: int, extra=()) -> list[str]:
    """2-prompt minibatches of plain SFT (no rollout engine), a checkpoint every step."""
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
