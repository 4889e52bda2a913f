"""Disaggregated rollouts end to end on CPU: one launch split into a training world (Megatron) and an engine world
(vLLM), joined by the bridge; real gloo ranks, real vLLM, real verifier."""

from __future__ import annotations

import json
from pathlib import Path

from tests.dist import run_ranks
from tests.toy_run import toy_overrides, train_toy

#: what two runs that trained on the same samples agree on exactly
SAME = ("loss/minibatch", "loss/sft", "loss/rl_pos", "loss/rl_neg", "loss/demo_rl", "reward/mean",
        "response/length_mean", "optim/grad_norm")


def _disaggregated(toy: Path, run: Path, steps: int, staleness: int, extra=(), engines: int = 1) -> list[str]:
    return toy_overrides(toy, run, steps, ["checkpoint.save_every=0", "rollout.placement=disaggregated",
                                           f"rollout.num_engine_ranks={engines}",
                                           f"rollout.max_staleness={staleness}", *extra], preset="srft")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_steps(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss/minibatch" in r]


def test_on_policy_disaggregated_run_equals_the_colocated_one(toy, tmp_path):
    # max_staleness 0: the engines on their own rank sample what the colocated engine samples (seeds depend on
    # (seed, step, prompt) only; the weights cross the bridge bit for bit), so the trainer sees the same batches
    colocated, split = tmp_path / "colocated", tmp_path / "split"
    run_ranks(train_toy, 1, toy_overrides(toy, colocated, 3, ["checkpoint.save_every=0"], preset="srft"))
    run_ranks(train_toy, 2, _disaggregated(toy, split, 3, 0))
    a, b = _rows(colocated), _rows(split)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in SAME if k in ra} == {k: rb[k] for k in SAME if k in ra}
    assert all(r["rollout/staleness_max"] == 0 for r in b)
    assert all(r["time/weight_sync"] > 0 and r["rollout/weight_sync_gbps"] > 0 for r in b)  # every step syncs
    assert all(r["time/trainer_wait"] >= 0 and r["time/engine_wait"] >= 0 for r in b)


def test_one_step_off_with_two_trainers_samples_one_step_ahead(toy, tmp_path):
    # 3 ranks: 2 trainers (DP 2) + 1 engine rank. Step 1 is sampled by the initial policy; every later step by
    # the policy one step older than the one that trains on it; evaluations interleave with the batches in flight
    run = tmp_path / "one_step_off"
    run_ranks(train_toy, 3, _disaggregated(toy, run, 3, 1, [f"data.eval_files=[{toy / 'test.jsonl'}]",
                                                            "train.eval_every=2"]))
    rows = _rows(run)
    steps = _train_steps(rows)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["rollout/staleness_max"] for r in steps] == [0, 1, 1]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 3] and all(0 <= r["eval/accuracy"] <= 1 for r in evals)
    assert all(r["loss/sft"] > 0 for r in steps)


def test_one_step_off_resume_repeats_the_uninterrupted_run(toy, tmp_path):
    # The checkpoint after step 2 keeps step 3's batch, sampled already by the policy of step 1: the resumed run
    # trains it instead of sampling step 3 again, and from there repeats the uninterrupted run exactly
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_ranks(train_toy, 2, _disaggregated(toy, whole, 4, 1, ["checkpoint.save_every=2"]))
    run_ranks(train_toy, 2, _disaggregated(toy, cut, 4, 1, ["checkpoint.save_every=2"]), 2)
    pending = cut / "checkpoints" / "step_000002" / "rollouts_pending.safetensors"
    assert pending.is_file()
    run_ranks(train_toy, 2, _disaggregated(toy, cut, 4, 1, ["checkpoint.save_every=2"]))
    a, b = _train_steps(_rows(whole)), _train_steps(_rows(cut))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in SAME if k in ra} == {k: rb[k] for k in SAME if k in ra}, ra["step"]
    assert [r["rollout/staleness_max"] for r in b] == [0, 1, 1, 1]


def test_sigusr1_to_srft_launch_stops_a_one_step_off_run_that_resumes(toy, tmp_path, monkeypatch):
    """Pre-emption under the launcher, with engines on their own rank: SIGUSR1 to `srft launch` reaches both ranks
    through torchrun. The engine rank outlives it; the trainer finishes its step, waits for the batch in flight, saves
    it with the checkpoint, stops the engines, and the launch ends with the trainer's one line and exit status 75.
    The requeued run resumes from that checkpoint with the saved batch."""
    import signal

    from megatron_srft.checkpoint import manifest
    from megatron_srft.checkpoint.run_dir import read_state, step_dirs
    from megatron_srft.signals import STOPPED_EXIT_CODE
    from megatron_srft.training.metrics import read_metrics
    from tests.cli.test_launch import SYSTEM_PATH, _last_line, _signal_when, _start_launch, _stop_line, _toy_config

    monkeypatch.setenv("PATH", SYSTEM_PATH)
    run = tmp_path / "run"
    split = ["rollout.placement=disaggregated", "rollout.num_engine_ranks=1", "rollout.max_staleness=1",
             "checkpoint.save_every=1"]
    cfg = _toy_config(toy, run, tmp_path / "cfg.yaml", "srft", split)
    proc = _start_launch(cfg, tmp_path, gpus_per_node=2)
    out = _signal_when(proc, lambda: "step_000002" in [p.name for p in step_dirs(run)], signal.SIGUSR1)

    ckpt = step_dirs(run)[-1]
    step = read_state(ckpt)["step"]
    assert step >= 2 and _last_line(out) == "srft launch: " + _stop_line(step, "SIGUSR1", ckpt), out[-3000:]
    assert proc.returncode == STOPPED_EXIT_CODE and "Traceback" not in out
    assert manifest.verify_part(ckpt) == [] and (ckpt / "rollouts_pending.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run) if "loss/minibatch" in r] == list(range(1, step + 1))

    run_ranks(train_toy, 2, toy_overrides(toy, run, 10_000, [*split, "checkpoint.resume=must"], preset="srft"),
              step + 1)
    rows = [r for r in read_metrics(run) if "loss/minibatch" in r]
    assert [r["step"] for r in rows] == list(range(1, step + 2))
    assert rows[-1]["rollout/staleness_max"] == 1  # the saved batch, sampled one step ahead, was trained
