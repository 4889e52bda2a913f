"""The toy study's recipes table: every preset is a one-stage recipe; multi-stage recipes chain stages; the
one-step-off stages are presets run on a training and an engine rank."""

from __future__ import annotations

from megatron_srft.algorithms.presets import PRESETS
from megatron_srft.config import load_config
from megatron_srft.experiments.recipes import MULTI_STAGE, ONE_STEP_OFF, RECIPES, STAGES


def test_recipes_table():
    assert RECIPES["sft_then_rl"] == ("sft", "grpo")
    assert all(RECIPES[p] == (p,) and STAGES[p].num_ranks == 1 for p in PRESETS)
    assert not set(MULTI_STAGE) & set(STAGES)
    assert all(stage in STAGES and STAGES[stage].preset in PRESETS for stages in RECIPES.values() for stage in stages)
    for name in ("grpo_one_step_off", "srft_one_step_off"):
        stage = STAGES[name]
        assert name.startswith(stage.preset) and stage.overrides == ONE_STEP_OFF and stage.num_ranks == 2
        assert load_config(None, list(ONE_STEP_OFF)).rollout.max_staleness == 1  # the overrides are a valid config
