"""The toy study's recipes table: every preset is a one-stage recipe; multi-stage recipes chain presets."""

from __future__ import annotations

from megatron_srft.algorithms.presets import PRESETS
from megatron_srft.experiments.recipes import MULTI_STAGE, RECIPES


def test_recipes_table():
    assert RECIPES["sft_then_rl"] == ("sft", "grpo")
    assert all(RECIPES[p] == (p,) for p in PRESETS)
    assert not set(MULTI_STAGE) & set(PRESETS)
    assert all(stage in PRESETS for stages in RECIPES.values() for stage in stages)
