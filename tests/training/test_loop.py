"""The training loop end to end on the toy task: real Megatron on gloo ranks, real vLLM (CPU), real rewards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.toy_run import toy_overrides, train_toy


def _overrides(toy: Path, run_dir: Path, preset: str, steps: int, extra=()) -> list[str]:
    return toy_overrides(toy, run_dir, steps, ["checkpoint.keep_last=2", *extra], preset=preset)


_train = train_toy


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
    from megatron_srft.checkpoint.run_dir import step_dirs

    run = tmp_path / "killed"
    run_ranks(_train, 1, _overrides(toy, run, "sft", 2))
    # simulate a kill in the middle of writing step 3: a partial .tmp directory and no state.json
    partial = run / "checkpoints" / "step_000003.tmp"
    shutil.copytree(run / "checkpoints" / "step_000002" / "model", partial / "model")
    ckpt = step_dirs(run)[-1]
    assert ckpt.name == "step_000002"
    assert run_ranks(_load_checkpoint, 1, str(ckpt), str(toy / "model")) == [2]


def test_layout_is_checked_against_the_model_before_building(toy, tmp_path):
    # 32 + 1000 tokens exceed the toy model's 256 positions: a ConfigError naming the field, before any build
    with pytest.raises(AssertionError, match=r"ConfigError: data.max_response_length: max_prompt_length \+ "
                                             r"max_response_length = 1032 exceeds"):
        run_ranks(_train, 1, _overrides(toy, tmp_path / "long", "sft", 1, ["data.max_response_length=1000"]))
    assert not (tmp_path / "long" / "checkpoints").exists()


class _EvalFails:
    """The real engine, except that greedy generation (this run's evaluation) fails."""

    def __init__(self, **kwargs):
        from megatron_srft.rollout.vllm_engine import VllmEngine

        self.engine = VllmEngine(**kwargs)

    def generate(self, *args, temperature, **kwargs):
        if temperature == 0:
            raise RuntimeError("evaluation failed")
        return self.engine.generate(*args, temperature=temperature, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _train_with_failing_eval(overrides):
    from megatron_srft.config import load_config
    from megatron_srft.training.loop import train

    try:
        train(load_config(None, overrides), engine_factory=_EvalFails)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_last_step_is_saved_before_the_evaluation(toy, tmp_path):
    run = tmp_path / "evalfail"
    extra = [f"data.eval_files=[{toy / 'test.jsonl'}]", "checkpoint.save_every=0", "checkpoint.export_hf=true"]
    assert run_ranks(_train_with_failing_eval, 1, _overrides(toy, run, "sft", 1, extra)) == ["evaluation failed"]
    assert (run / "checkpoints" / "step_000001" / "state.json").is_file()  # nothing of the run is lost
    assert not (run / "hf").exists()  # and the export comes only after a successful evaluation


def test_bad_eval_settings_fail_at_start_up(toy, tmp_path):
    with pytest.raises(AssertionError, match=r"ConfigError: train.eval_n_samples: expected 1 <= value <= 100000, got 0"):
        run_ranks(_train, 1, _overrides(toy, tmp_path / "e0", "sft", 1, [f"data.eval_files=[{toy / 'test.jsonl'}]",
                                                                          "train.eval_n_samples=0"]))
    assert not (tmp_path / "e0" / "checkpoints").exists()


def test_consecutive_non_finite_steps_stop_the_run(toy, tmp_path):
    # lr 1e30: the first update is finite but ruins the weights; the next loss is not finite and its update is
    # skipped; after max_consecutive_skips such steps the run stops with one line naming the step
    run = tmp_path / "nan"
    with pytest.raises(AssertionError, match=r"TrainingError: step 2: 1 consecutive steps had a non-finite loss"):
        run_ranks(_train, 1, _overrides(toy, run, "sft", 4, ["optimizer.lr=1e30", "optimizer.clip_grad=0",
                                                             "train.prompts_per_minibatch=4",
                                                             "train.max_consecutive_skips=1"]))
    rows = _rows(run)
    assert [r["optim/num_skipped"] for r in rows] == [0.0, 1.0]
    assert not (run / "checkpoints" / "step_000002").exists()  # a skipped step is never checkpointed


def test_chord_mu_trains_expert_rows_beside_rollouts(toy, tmp_path):
    # 4 prompts, chord_mu's 2/3 expert rows: round(2.67) = 3 expert rows (no rollouts) and 1 prompt with 3
    # rollouts; loss = (1 - mu) RL + mu SFT with mu at step 1 of the cosine 0.9 -> 0.05 over 200 steps
    from megatron_srft.algorithms.presets import PRESETS

    run = tmp_path / "chord"
    run_ranks(_train, 1, _overrides(toy, run, "chord_mu", 1, ["checkpoint.save_every=0"]))
    (row,) = _rows(run)
    assert row["routing/expert_prompt_fraction"] == 0.75 and row["routing/sft_prompt_fraction"] == 0.75
    assert row["train/sft_mix"] == pytest.approx(PRESETS["chord_mu"]().at_step(1).sft_mix)
    assert row["loss/sft"] > 0 and row["loss/demo_rl"] == 0.0
    assert row["accuracy/demo"] is None  # the step's only demos are expert rows, which are not scored
    # timing figures live in time/ and perf/ only (runs are compared without them)
    assert row["perf/rollout_tokens_per_s"] > 0
    assert [k for k in row if k.endswith("_per_s") and not k.startswith(("time/", "perf/"))] == []


def test_hpt_gate_routes_each_prompt(toy, tmp_path):
    # the untrained toy model solves nothing: at gate 0 every prompt (no correct rollout) is trained on its
    # demonstration alone, and its rollouts are dropped
    run = tmp_path / "hpt"
    run_ranks(_train, 1, _overrides(toy, run, "hpt", 1, ["checkpoint.save_every=0"]))
    (row,) = _rows(run)
    gated = row["routing/gated_fraction"]
    assert gated == row["routing/sft_prompt_fraction"]
    assert (row["loss/sft"] > 0) == (gated > 0)
    if gated == 1.0:  # no rollout left to train on
        assert row["loss/rl_pos"] == row["loss/rl_neg"] == 0.0
    assert row["routing/rollout_accuracy_before"] <= 1 - gated  # a gated prompt had no correct rollout


def test_a_failed_export_leaves_no_temporary_directory(tmp_path):
    from types import SimpleNamespace

    import torch

    from megatron_srft.training.loop import export_final_hf

    def export():
        yield "model.embed_tokens.weight", torch.zeros(4, 4)
        raise RuntimeError("the export failed half way")

    policy = SimpleNamespace(export=export, model_dir=tmp_path, groups=SimpleNamespace(rank=0),
                             handle=SimpleNamespace(arch=SimpleNamespace(hf_config={})))
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="half way"):
        export_final_hf(policy, tmp_path / "run" / "hf", "fp32")
    assert list((tmp_path / "run").iterdir()) == []  # no hf/, no .hf.tmp*


def _train_twice_and_report(overrides_a, overrides_b):
    """Two runs in one process (as the demo and a study worker do): after each, the stop-signal handlers are the
    process's own again and the run directory's lock is released; a start that fails part-way releases it too."""
    import signal

    from megatron_srft.checkpoint import atomic
    from megatron_srft.config import load_config
    from megatron_srft.errors import ConfigError
    from megatron_srft.training.loop import train

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    train(load_config(None, overrides_a))
    after_one = {s: signal.getsignal(s) for s in before} == before and not atomic._HELD_LOCKS
    try:
        train(load_config(None, overrides_b))  # fails after taking the run directory: model.path is no model
    except ConfigError:
        pass
    after_failed = {s: signal.getsignal(s) for s in before} == before and not atomic._HELD_LOCKS
    return after_one, after_failed


def test_a_run_leaves_no_handlers_or_locks_behind(toy, tmp_path):
    good = _overrides(toy, tmp_path / "a", "sft", 1)
    bad = _overrides(toy, tmp_path / "b", "sft", 1, [f"model.path={tmp_path / 'missing'}"])
    assert run_ranks(_train_twice_and_report, 1, good, bad) == [(True, True)]


def test_the_run_error_is_reported_not_the_failed_shutdown_after_it(tmp_path):
    # A broken engine rank fails the step and then the stop command that closing the rollouts sends: the step's
    # error is the one that propagates; the logger and the handlers are released either way.
    from types import SimpleNamespace

    from megatron_srft.training.loop import Run

    closed = []

    def broken_close():
        raise RuntimeError("Connection closed by peer")

    run = SimpleNamespace(rollouts=SimpleNamespace(close=broken_close),
                          logger=SimpleNamespace(close=lambda: closed.append("logger")),
                          stop=SimpleNamespace(restore=lambda: closed.append("handlers")), run_dir=tmp_path)
    step_error = ValueError("the step's own error")
    assert Run.__exit__(run, ValueError, step_error, None) is False  # the with statement re-raises step_error
    assert closed == ["logger", "handlers"]
    with pytest.raises(RuntimeError, match="Connection closed"):  # no error of its own: the shutdown's is reported
        Run.__exit__(run, None, None, None)
    assert closed == ["logger", "handlers"] * 2
