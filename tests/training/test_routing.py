"""Prompt routing (training/routing.py): expert rows before generation (CHORD), the gate after scoring (HPT)."""

from __future__ import annotations

import dataclasses
import math

from megatron_srft.algorithms.presets import PRESETS
from megatron_srft.rollout.seam import ScoredPrompt
from megatron_srft.training.routing import expert_mask, plan_prompts, route_prompts


def test_expert_rows_are_round_fraction_spread_evenly():
    assert expert_mask(96, 64 / 96) == [i % 3 != 0 for i in range(96)]  # Trinity's layout: 64 of 96
    assert sum(expert_mask(4, 2 / 3)) == 3 and expert_mask(4, 2 / 3) == [False, True, True, True]
    assert expert_mask(5, 0.0) == [False] * 5
    for n in range(1, 20):
        for f in (0.1, 0.2, 0.5, 2 / 3, 0.9):
            assert sum(expert_mask(n, f)) == round(f * n)


def test_plan_keeps_each_replica_block_and_its_share_of_generation():
    settings = PRESETS["chord_mu"]()
    problems = list(range(12))  # 2 replicas x 6 prompts, replica-major
    plans = [plan_prompts(problems, slice(d * 6, (d + 1) * 6), 2, settings) for d in range(2)]
    mask = expert_mask(6, settings.expert_prompt_fraction)  # 4 expert rows per replica
    assert sum(mask) == 4
    for d, plan in enumerate(plans):
        assert plan.expert == mask
        assert plan.generate == [p for p in problems if not mask[p % 6]]  # the same global list on every rank
        assert plan.generate[plan.generate_slice] == [p for i, p in enumerate(problems[d * 6:(d + 1) * 6])
                                                       if not mask[i]]
    off = plan_prompts(problems, slice(6, 12), 2, PRESETS["srft"]())
    assert off.generate == problems and off.generate_slice == slice(6, 12) and not any(off.expert)


def _scored(rewards):
    return ScoredPrompt(completions=[object()] * len(rewards), rewards=list(rewards), demo_rewards=[1.0])


def test_route_expert_rows_and_rollouts():
    settings = PRESETS["chord_mu"]()
    plan = plan_prompts(list(range(4)), slice(0, 4), 1, settings)  # [rl, expert, expert, expert]
    routed, stats = route_prompts(plan, [_scored([1.0, 0.0, 0.0])], settings)
    assert [bool(sp.completions) for sp in routed] == [True, False, False, False]
    assert routed[0].demo_rewards == [] and all(math.isnan(sp.demo_rewards[0]) for sp in routed[1:])
    assert stats["routing/expert_prompt_fraction"] == (3, 4) and "routing/gated_fraction" not in stats


def test_gate_at_most_max_correct():
    settings = dataclasses.replace(PRESETS["hpt"](), sft_gate_max_correct=1)
    plan = plan_prompts(list(range(3)), slice(0, 3), 1, settings)
    routed, stats = route_prompts(plan, [_scored([0, 0, 0]), _scored([1, 0, 0]), _scored([1, 1, 0])], settings)
    assert [(len(sp.completions), len(sp.demo_rewards)) for sp in routed] == [(0, 1), (0, 1), (3, 0)]
    assert stats["routing/gated_fraction"] == (2, 3) and stats["routing/rollout_accuracy_before"] == (3, 9)


def test_no_routing_leaves_the_prompts_alone():
    settings = PRESETS["srft"]()
    scored = [_scored([1.0, 0.0])]
    routed, stats = route_prompts(plan_prompts([0], slice(0, 1), 1, settings), scored, settings)
    assert routed == scored and stats == {}


def test_a_split_that_rounds_to_all_expert_rows_is_refused_at_start_up():
    import pytest

    from megatron_srft.errors import ConfigError
    from megatron_srft.training.routing import check_prompt_split

    chord = PRESETS["chord_mu"]()  # 2/3 expert rows
    check_prompt_split(chord, 16, 2)  # 8 per replica: 5 expert rows, 3 with rollouts
    check_prompt_split(PRESETS["srft"](), 1, 1)  # no expert rows: nothing to check
    for per_step, dp in ((1, 1), (4, 4), (2, 2)):  # a share of 1 rounds to all-expert: pure SFT, silently
        with pytest.raises(ConfigError, match=r"train.prompts_per_step: .* expert rows"):
            check_prompt_split(chord, per_step, dp)
