"""The colocated rollout service keeps the rollout seam's contract (rollout/seam.py): a sync names the version of the
weights it offers, and results are collected once, for the step that was requested. One gloo rank, no engine (the
demonstrations alone are scored, by the real verifier)."""

from __future__ import annotations

from tests.dist import run_ranks
from tests.toy_run import toy_overrides


def _contract(toy, run_dir):
    from types import SimpleNamespace

    from megatron_srft.config import load_config
    from megatron_srft.data.dataset import load_problems, tokenize_problems
    from megatron_srft.data.templates import load_tokenizer
    from megatron_srft.distributed.groups import init_distributed
    from megatron_srft.models.arch import load_arch
    from megatron_srft.rollout.seam import RolloutRequest
    from megatron_srft.rollout.service import RolloutService

    cfg = load_config(None, toy_overrides(toy, run_dir, 1))
    groups = init_distributed(cfg.parallel)
    tokenizer = load_tokenizer(toy / "model")
    problems = tokenize_problems(load_problems(toy / "train.jsonl", require_demo=True), tokenizer, "chat", 32, 24)[:2]
    weights = SimpleNamespace(version=3, export=lambda: iter(()))
    request = RolloutRequest(step=1, problems=problems, replica_slice=slice(0, 2), version=3, num_rollouts=0,
                             num_demos=1)
    errors = []
    with RolloutService(cfg, groups, str(toy / "model"), tokenizer, weights, need_engine=False,
                        arch=load_arch(toy / "model"), require_think=False) as rollouts:
        for call in (lambda: rollouts.sync(weights, 2), lambda: rollouts.collect(1)):
            try:
                call()
            except RuntimeError as e:
                errors.append(str(e))
        rollouts.generate(request)
        try:
            rollouts.generate(request)
        except RuntimeError as e:
            errors.append(str(e))
        rollouts.sync(weights, 3)
        batch = rollouts.collect(1)
    return errors, [(len(sp.completions), sp.demo_rewards) for sp in batch.prompts]


def test_colocated_service_keeps_the_seam_contract(toy, tmp_path):
    ((errors, prompts),) = run_ranks(_contract, 1, toy, tmp_path / "run")
    assert errors == ["rollout service: sync offered version 2, the weights are at 3",
                      "rollout service: collect(1) without generate() for that step",
                      "rollout service: step 1's results were never collected"]
    assert prompts == [(0, [1.0]), (0, [1.0])]  # no rollouts asked: the demonstrations alone, scored correct
