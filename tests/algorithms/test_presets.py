"""The presets table and resolve(): config fields override preset defaults."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_srft.algorithms.presets import PRESETS, AlgoSettings, resolve
from megatron_srft.config import AlgorithmConfig, ConfigError, load_config


def test_table_covers_the_config_choices():
    import typing

    choices = typing.get_args(typing.get_type_hints(AlgorithmConfig)["preset"])
    assert set(choices) == set(PRESETS)
    for name, fn in PRESETS.items():
        s = fn()
        assert isinstance(s, AlgoSettings)
        assert all(getattr(s, f.name) is not None or f.name in ("sft_weight_max", "tis_cap")
                   for f in dataclasses.fields(s)), name


def test_paper_and_code_presets():
    s = resolve(AlgorithmConfig())
    assert (s.sft_weight, s.sft_coef) == ("exp_neg_entropy", 0.5)
    assert (s.rl_pos_weight, s.rl_pos_coef) == ("exp_pos_entropy", 0.1)
    assert (s.demo_ratio, s.clip, s.clip_eps, s.std_normalize) == ("p", True, 0.2, True)
    assert (s.aggregation, s.entropy_bonus, s.num_demos, s.demos_in_group) == ("seq_mean_token_mean", 0.0, 1, True)
    c = resolve(AlgorithmConfig(preset="srft_code"))
    assert (c.sft_weight, c.demo_ratio, c.clip, c.std_normalize) == ("exp_pos_entropy", "p_over_p_plus_gamma",
                                                                    False, False)
    assert (c.aggregation, c.aggregation_constant, c.entropy_bonus) == ("token_sum_norm", 8192.0, 0.001)


def test_baselines():
    sft, grpo, luffy, spr = (resolve(AlgorithmConfig(preset=p)) for p in ("sft", "grpo", "luffy", "sft_plus_rl"))
    assert not sft.use_rollouts and sft.sft_weight == "one" and sft.sft_coef == 1.0 and sft.demo_ratio == "off"
    assert grpo.num_demos == 0 and grpo.sft_weight == "zero" and grpo.rl_pos_weight == "one"
    assert grpo.rl_pos_coef == 1.0 and grpo.demo_ratio == "off"
    assert luffy.demos_in_group and luffy.sft_weight == "zero" and luffy.demo_ratio == "p_over_p_plus_gamma"
    assert luffy.rl_pos_weight == "one"
    assert spr.num_demos == 1 and not spr.demos_in_group and spr.sft_weight == "one" and spr.demo_ratio == "off"


def test_every_non_null_field_overrides():
    cfg = AlgorithmConfig(preset="srft", num_demos_per_prompt=2, sft_coef=0.7, sft_weight="exp_pos_entropy",
                          sft_weight_max=3.0, rl_pos_coef=0.2, rl_pos_weight="one", entropy_granularity="batch_mean",
                          std_normalize=False, adv_eps=1e-4, demo_ratio="off", demo_gamma=0.3, clip=False,
                          clip_eps=0.1, aggregation="token_mean", aggregation_constant=100.0, entropy_bonus=0.01)
    s = resolve(cfg, tis_cap=2.0)
    assert (s.num_demos, s.sft_coef, s.sft_weight, s.sft_weight_max) == (2, 0.7, "exp_pos_entropy", 3.0)
    assert (s.rl_pos_coef, s.rl_pos_weight, s.entropy_granularity, s.std_normalize) == (0.2, "one", "batch_mean",
                                                                                       False)
    assert (s.adv_eps, s.demo_ratio, s.demo_gamma, s.clip, s.clip_eps) == (1e-4, "off", 0.3, False, 0.1)
    assert (s.aggregation, s.aggregation_constant, s.entropy_bonus, s.tis_cap) == ("token_mean", 100.0, 0.01, 2.0)
    # every AlgorithmConfig field (but the preset name) reaches AlgoSettings
    names = {f.name for f in dataclasses.fields(AlgoSettings)}
    for f in dataclasses.fields(AlgorithmConfig):
        assert f.name == "preset" or {"num_demos_per_prompt": "num_demos"}.get(f.name, f.name) in names, f.name


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="algorithm.sft_coef"):
        load_config(overrides=["algorithm.sft_coef=-1"])
    with pytest.raises(ConfigError, match="algorithm.num_demos_per_prompt"):
        resolve(AlgorithmConfig(preset="sft", num_demos_per_prompt=0))
    with pytest.raises(ConfigError, match="algorithm.preset"):
        resolve(AlgorithmConfig(preset="nope"))  # type: ignore[arg-type]


def test_docs_settings_table_matches_presets():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "algorithms.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == len(PRESETS) + 1:
            rows[cells[0]] = cells[1:]
    for f in dataclasses.fields(AlgoSettings):
        expect = [repr(getattr(fn(), f.name)).replace("'", "") for fn in PRESETS.values()]
        assert rows.get(f.name) == expect, f"docs/algorithms.md settings table is stale for {f.name}"
