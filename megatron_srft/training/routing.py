"""Prompt routing: which of a step's prompts are trained on their demonstration alone (SFT rows) and which on their
rollouts alone (RL rows). Off for the SRFT-style presets, where every prompt keeps its rollouts and demos.

Two rules, both settings of :class:`~megatron_srft.algorithms.presets.AlgoSettings`:

- ``expert_prompt_fraction`` (CHORD): before generation, round(fraction x P) of each replica's P prompts become
  expert rows, spread evenly over the block (so every mini-batch mixes both kinds). They get no rollouts and are
  not scored (reward NaN: Trinity-RFT's mix sampler sets an expert row's reward to 0 and never uses it).
- ``sft_gate_max_correct`` (HPT): after scoring, a prompt with at most that many correct rollouts (reward > 0.5)
  drops them and keeps its demonstration alone; any other prompt keeps its rollouts alone.

The loop calls :func:`plan_prompts` before the rollouts and :func:`route_prompts` after scoring, before the groups
and their advantages are built; the SFT rows' demos carry A = 0 (``demos_in_group`` is off for these presets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ..algorithms.presets import AlgoSettings
from ..errors import ConfigError
from ..rollout.seam import ScoredPrompt

__all__ = ["check_prompt_split", "expert_mask", "PromptPlan", "plan_prompts", "route_prompts"]


def expert_mask(num_prompts: int, fraction: float) -> list[bool]:
    """[P] True at the expert rows: E = round(fraction x P) of them, spread evenly (position i is one iff
    floor((i + 1) E / P) > floor(i E / P))."""
    experts = round(fraction * num_prompts)
    return [(i + 1) * experts // num_prompts > i * experts // num_prompts for i in range(num_prompts)]


def check_prompt_split(settings: AlgoSettings, prompts_per_step: int, dp_size: int) -> None:
    """At start-up: with expert rows, every replica's share of a step keeps at least one expert row and at least
    one prompt with rollouts (a share of 1 at CHORD's 2/3 would round to all-expert: pure SFT, silently)."""
    if settings.expert_prompt_fraction <= 0:
        return
    share = prompts_per_step // dp_size
    experts = sum(expert_mask(share, settings.expert_prompt_fraction))
    if not 1 <= experts < share:
        raise ConfigError(f"train.prompts_per_step: {prompts_per_step} prompts over {dp_size} data-parallel "
                          f"replica(s) give each {share}, of which {experts} would be expert rows "
                          f"(algorithm.expert_prompt_fraction {settings.expert_prompt_fraction:.3g}); each replica "
                          f"needs at least one expert row and one prompt with rollouts: raise prompts_per_step")


@dataclass
class PromptPlan:
    """What the step generates: ``generate`` (every replica's prompts that get rollouts, replica-major: the rollout
    service's input), ``generate_slice`` (this replica's block of it) and ``expert`` (per prompt of this replica's
    block: an expert row, which gets no rollouts)."""

    generate: list
    generate_slice: slice
    expert: list[bool]


def plan_prompts(step_problems: Sequence, replica: slice, dp_size: int, settings: AlgoSettings) -> PromptPlan:
    """The step's prompts (global, replica-major, equal blocks) minus the expert rows of every replica."""
    share = len(step_problems) // dp_size
    expert = expert_mask(share, settings.expert_prompt_fraction)
    keep = share - sum(expert)
    generate = [p for d in range(dp_size) for p, e in zip(step_problems[d * share:(d + 1) * share], expert) if not e]
    d = replica.start // share if share else 0
    return PromptPlan(generate=generate, generate_slice=slice(d * keep, (d + 1) * keep), expert=expert)


def route_prompts(plan: PromptPlan, scored: Sequence[ScoredPrompt], settings: AlgoSettings
                  ) -> tuple[list[ScoredPrompt], dict]:
    """This replica's prompts in order, each routed, and the routing metrics as (sum, count) pairs.

    ``scored``: the rollout service's ScoredPrompt of each generated prompt of this replica, in order. Expert rows
    come back with their demonstration alone (reward NaN: not scored); with the gate, a prompt with at most
    ``sft_gate_max_correct`` correct rollouts keeps its demonstration alone; when routing is on, every other
    prompt keeps its rollouts alone. Without routing, ``scored`` is returned as is.
    """
    if not settings.routes_prompts:
        return list(scored), {}
    it = iter(scored)
    out: list = []
    gated = 0
    for is_expert in plan.expert:
        if is_expert:
            out.append(ScoredPrompt(completions=[], rewards=[], demo_rewards=[float("nan")] * settings.num_demos))
            continue
        sp = next(it)
        correct = sum(r > 0.5 for r in sp.rewards)
        if correct <= settings.sft_gate_max_correct:  # HPT's gate (off at -1)
            gated += 1
            out.append(dataclasses.replace(sp, completions=[], rewards=[]))
        else:
            out.append(dataclasses.replace(sp, demo_rewards=[]))
    experts = sum(plan.expert)
    generated = [r for sp in scored for r in sp.rewards]  # before the gate drops any (accuracy/rollout: after)
    stats = {"routing/sft_prompt_fraction": (experts + gated, len(plan.expert)),
             "routing/rollout_accuracy_before": (sum(r > 0.5 for r in generated), len(generated))}
    if settings.expert_prompt_fraction > 0:
        stats["routing/expert_prompt_fraction"] = (experts, len(plan.expert))
    if settings.sft_gate_max_correct >= 0:
        stats["routing/gated_fraction"] = (gated, len(plan.expert) - experts)
    return out, stats
