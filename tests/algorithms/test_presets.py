"""The presets table and resolve(): config fields override preset defaults."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_srft.algorithms.presets import PRESETS, AlgoSettings, resolve
from megatron_srft.config import AlgorithmConfig, ConfigError, RolloutConfig, load_config


def test_every_preset_is_complete_and_names_table_entries():
    from megatron_srft.algorithms import losses

    from megatron_srft.algorithms.presets import MIX_SCHEDULES

    tables = {"sft_weight": losses.SFT_WEIGHTS, "rl_pos_weight": losses.RL_POS_WEIGHTS,
              "demo_ratio": losses.DEMO_RATIOS, "aggregation": losses.AGGREGATIONS,
              "entropy_granularity": losses.WEIGHT_ENTROPIES, "sft_aggregation": losses.SFT_AGGREGATIONS,
              "sft_mix_schedule": MIX_SCHEDULES}
    for name, fn in PRESETS.items():
        s = fn()
        assert isinstance(s, AlgoSettings)
        assert all(getattr(s, f.name) is not None or f.name in ("sft_weight_max", "tis_cap", "sft_mix")
                   for f in dataclasses.fields(s)), name
        assert s.sft_mix is None, name  # the step's mu: set by at_step() only
        for field_name, table in tables.items():
            assert getattr(s, field_name) in table, (name, field_name)
        assert resolve(AlgorithmConfig(preset=name)) == s


# --------------------------------------------------------------------------------------------- released runs
#
# Each preset against the settings of the source its docstring cites, transcribed here from the source (not from
# presets.py). LUFFY's run is kept as the script's own keys and values (ElliottYan/LUFFY exp_scripts/train.sh,
# defaults from luffy/verl/verl/mix_src/config/mix_ppo_trainer.yaml) and translated by the rules of its actor
# (mix_actor.py, mix_core_alg.py), so a change to either side shows up as a field-by-field difference.

LUFFY_TRAIN_SH = {
    "algorithm.adv_estimator": "grpo",                       # demo (prefix) sample joins the group statistics
    "algorithm.grpo_use_std": False,
    "data.train_batch_size": 128,
    "data.max_response_length": 8192,                        # the padded response length the token sum divides by
    "actor_rollout_ref.actor.ppo_mini_batch_size": 64,       # prompts; x rollout.n sequences, / GPUs per GPU
    "actor_rollout_ref.actor.ppo_micro_batch_size": 64,      # = mini-batch: gradient_accumulation = 1
    "actor_rollout_ref.actor.clip_ratio": 0.2,               # yaml default
    "actor_rollout_ref.actor.entropy_coeff": 0.001,
    "actor_rollout_ref.actor.use_kl_loss": False,
    "actor_rollout_ref.actor.use_off_policy_loss": True,
    "actor_rollout_ref.actor.off_policy_reshape": "p_div_p_0.1",
    "actor_rollout_ref.actor.loss_remove_token_mean": True,
    "actor_rollout_ref.actor.loss_remove_clip": True,
    "actor_rollout_ref.rollout.n": 8,
    "actor_rollout_ref.rollout.n_prefix": 1,
    "actor_rollout_ref.rollout.min_prefix_ratio": 1.0,
    "actor_rollout_ref.rollout.max_prefix_ratio": 1.0,
    "trainer.n_gpus_per_node": 8,
    "trainer.nnodes": 1,
}


def from_luffy_script(k: dict) -> dict:
    """LUFFY's script keys -> our settings, by the rules of LUFFY's actor."""
    assert k["actor_rollout_ref.rollout.min_prefix_ratio"] == k["actor_rollout_ref.rollout.max_prefix_ratio"] == 1.0
    assert k["actor_rollout_ref.actor.use_off_policy_loss"] and not k["actor_rollout_ref.actor.use_kl_loss"]
    gpus = k["trainer.n_gpus_per_node"] * k["trainer.nnodes"]
    seqs_per_minibatch = k["actor_rollout_ref.actor.ppo_mini_batch_size"] * k["actor_rollout_ref.rollout.n"]
    assert k["actor_rollout_ref.actor.ppo_micro_batch_size"] == k["actor_rollout_ref.actor.ppo_mini_batch_size"]
    reshape = {"p_div_p_0.1": ("p_over_p_plus_gamma", 0.1), "no_reshape": ("p", 0.1)}
    demo_ratio, gamma = reshape[k["actor_rollout_ref.actor.off_policy_reshape"]]
    out = dict(
        use_rollouts=True, num_demos=k["actor_rollout_ref.rollout.n_prefix"],
        demos_in_group=k["algorithm.adv_estimator"] == "grpo",  # grpo_split keeps the demo out
        sft_weight="zero", rl_pos_weight="one", rl_pos_coef=1.0,
        std_normalize=k["algorithm.grpo_use_std"], demo_ratio=demo_ratio, demo_gamma=gamma,
        clip=not k["actor_rollout_ref.actor.loss_remove_clip"], clip_eps=k["actor_rollout_ref.actor.clip_ratio"],
        entropy_bonus=k["actor_rollout_ref.actor.entropy_coeff"],
    )
    if k["actor_rollout_ref.actor.loss_remove_token_mean"]:
        # per GPU: sum over micro-batches of token sum / 8192; FSDP averages GPUs. = token sum / (8192 * gpus)
        # = mean over sequences of token sum / C with C = 8192 * gpus / sequences.
        out.update(aggregation="token_sum_norm",
                   aggregation_constant=k["data.max_response_length"] * gpus / seqs_per_minibatch)
    else:
        out.update(aggregation="token_mean")
    return out


#: preset -> (the source its docstring cites, the settings that source fixes)
RELEASED = {
    "srft": ("arXiv 2506.19767 Eq. 7-12", dict(
        use_rollouts=True, num_demos=1, demos_in_group=True, sft_weight="exp_neg_entropy", sft_coef=0.5,
        rl_pos_weight="exp_pos_entropy", rl_pos_coef=0.1, std_normalize=True, demo_ratio="p", clip=True,
        clip_eps=0.2, aggregation="seq_mean_token_mean", entropy_bonus=0.0)),
    "srft_code": ("SRFT released code (method notes)", dict(
        use_rollouts=True, num_demos=1, demos_in_group=True, sft_weight="exp_pos_entropy", sft_coef=0.5,
        rl_pos_weight="exp_pos_entropy", rl_pos_coef=0.1, std_normalize=False, demo_ratio="p_over_p_plus_gamma",
        demo_gamma=0.1, clip=False, aggregation="token_sum_norm", aggregation_constant=8192.0,
        entropy_bonus=0.001)),
    "luffy": ("ElliottYan/LUFFY exp_scripts/train.sh", from_luffy_script(LUFFY_TRAIN_SH)),
    "sft": ("the paper's SFT baseline: NLL on demonstrations", dict(
        use_rollouts=False, num_demos=1, sft_weight="one", sft_coef=1.0, demo_ratio="off", entropy_bonus=0.0,
        aggregation="seq_mean_token_mean")),
    "grpo": ("the paper's GRPO baseline", dict(
        use_rollouts=True, num_demos=0, sft_weight="zero", demo_ratio="off", rl_pos_weight="one", rl_pos_coef=1.0,
        std_normalize=True, clip=True, clip_eps=0.2, aggregation="seq_mean_token_mean", entropy_bonus=0.0)),
    "sft_plus_rl": ("the paper's Fig. 5 single-stage SFT + RL", dict(
        use_rollouts=True, num_demos=1, demos_in_group=False, sft_weight="one", sft_coef=1.0, demo_ratio="off",
        rl_pos_weight="one", rl_pos_coef=1.0, std_normalize=True, clip=True, aggregation="seq_mean_token_mean")),
    "srft_w_sft_1": ("the paper's ablation: w_SFT fixed to 1", dict(
        sft_weight="one", sft_coef=1.0, rl_pos_weight="exp_pos_entropy", rl_pos_coef=0.1, demo_ratio="p",
        std_normalize=True, clip=True, aggregation="seq_mean_token_mean")),
    "srft_w_rl_1": ("the paper's ablation: w_RL fixed to 1", dict(
        sft_weight="exp_neg_entropy", sft_coef=0.5, rl_pos_weight="one", rl_pos_coef=1.0, demo_ratio="p",
        std_normalize=True, clip=True, aggregation="seq_mean_token_mean")),
}


def test_released_table_covers_every_preset():
    assert set(RELEASED) == set(PRESETS)


@pytest.mark.parametrize("preset", list(RELEASED))
def test_preset_equals_its_cited_source(preset):
    source, expected = RELEASED[preset]
    resolved = dataclasses.asdict(resolve(AlgorithmConfig(preset=preset)))
    diff = {k: (resolved[k], v) for k, v in expected.items() if resolved[k] != v}
    assert not diff, f"{preset} vs {source}: (ours, source) = {diff}"


def test_luffy_scale_is_the_scripts_and_does_not_follow_the_gpu_count():
    # the script's effective scale: token sum / (8192 * 8 GPUs) over 512 sequences = token sum / 128 per sequence
    assert from_luffy_script(LUFFY_TRAIN_SH)["aggregation_constant"] == 128.0
    # LUFFY's own loss halves on 16 GPUs (twice the divisor); ours is fixed by the preset, so it does not
    on_16 = from_luffy_script({**LUFFY_TRAIN_SH, "trainer.nnodes": 2})["aggregation_constant"]
    assert on_16 == 256.0 and resolve(AlgorithmConfig(preset="luffy")).aggregation_constant == 128.0


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
        load_config(overrides=["algorithm.preset=nope"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes_the_configs_own_field_checks(preset):
    """The value ranges are checked once, on the config (AlgorithmConfig.validate): a preset's defaults, written
    back as config fields, must pass them too."""
    s = dataclasses.asdict(PRESETS[preset]())
    renamed = {"num_demos_per_prompt": "num_demos"}
    fields = {f.name: s[renamed.get(f.name, f.name)] for f in dataclasses.fields(AlgorithmConfig)
              if f.name != "preset" and renamed.get(f.name, f.name) in s}
    AlgorithmConfig(preset=preset, **fields).validate("algorithm")
    RolloutConfig(tis_cap=s["tis_cap"]).validate("rollout")


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


# --------------------------------------------------------------------------------------------- CHORD, HPT, DFT
#
# Their released settings, as the sources' own keys (Trinity-RFT examples/mix_chord/mix_chord.yaml at 041433056e;
# Unify-Post-Training exp_scripts/train.sh and train_llama.sh at ae332f5; DFT's README launch command at e153181),
# translated by the rules of their code (docstrings of the presets cite file and line).

CHORD_YAML = {
    "algorithm.repeat_times": 8,
    "algorithm.sample_strategy_args.expert_data_ratio": 0.20,
    "algorithm.kl_loss_fn_args.kl_coef": 0.0,
    "algorithm.policy_loss_fn_args.clip_range": 0.2,
    "algorithm.policy_loss_fn_args.use_token_level_loss_in_sft": True,
    "buffer.batch_size": 40,
}
#: the yaml's comments: "0 for chord-mu and chord-phi", "200 for chord-mu and 0 for chord-phi", ...
CHORD_VARIANTS = {
    "chord_mu": dict(mu_warmup_steps=0, mu_decay_steps=200, mu_peak=0.9, mu_valley=0.05, enable_phi_function=False),
    "chord_phi": dict(mu_warmup_steps=0, mu_decay_steps=0, mu_peak=0.1, mu_valley=0.1, enable_phi_function=True),
}


def from_chord_yaml(k: dict, variant: dict) -> dict:
    """Trinity-RFT's keys -> our settings: the mix sampler reads batch_size x repeat_times experiences, ceil(ratio x
    that) of them expert rows (one prompt each), the rest rollouts (repeat_times per prompt)."""
    import math

    rows = k["buffer.batch_size"] * k["algorithm.repeat_times"]
    expert = math.ceil(k["algorithm.sample_strategy_args.expert_data_ratio"] * rows)
    rl_prompts = (rows - expert) // k["algorithm.repeat_times"]
    assert k["algorithm.kl_loss_fn_args.kl_coef"] == 0.0 and k["algorithm.policy_loss_fn_args.use_token_level_loss_in_sft"]
    return dict(
        use_rollouts=True, num_demos=1, demos_in_group=False, expert_prompt_fraction=expert / (expert + rl_prompts),
        sft_weight="phi" if variant["enable_phi_function"] else "one", sft_coef=1.0, demo_ratio="off",
        rl_pos_weight="one", rl_pos_coef=1.0, std_normalize=True, adv_eps=1e-6, clip=True,
        clip_eps=k["algorithm.policy_loss_fn_args.clip_range"], aggregation="rollout_token_mean",
        sft_aggregation="demo_token_mean", sft_mix_schedule="warmup_cosine", entropy_bonus=0.0,
        **{name: variant[name] for name in ("mu_warmup_steps", "mu_decay_steps", "mu_peak", "mu_valley")},
    )


HPT_TRAIN_SH = {**LUFFY_TRAIN_SH, "trainer.unify_strategy": "switch", "trainer.switch_gate": 0,
                "trainer.switch_gate_off": 0, "actor_rollout_ref.actor.offline_loss_type": "sft",
                "actor_rollout_ref.actor.sft_loss_coef": 1.0, "actor_rollout_ref.rollout.n_verify": 8}


def from_hpt_script(k: dict) -> dict:
    """HPT's keys -> our settings: LUFFY's machinery for the rollouts (no std, no clip, token sum / 8192 in LUFFY's
    layout, entropy 0.001), the switch gate, SFT rows by compute_sft_pure_loss x sft_loss_coef."""
    luffy = from_luffy_script(k)
    assert k["trainer.unify_strategy"] == "switch" and k["trainer.switch_gate_off"] <= k["trainer.switch_gate"]
    assert k["actor_rollout_ref.actor.offline_loss_type"] == "sft"
    return dict(
        use_rollouts=True, num_demos=1, demos_in_group=False, sft_gate_max_correct=k["trainer.switch_gate"],
        sft_weight="one", sft_coef=k["actor_rollout_ref.actor.sft_loss_coef"], demo_ratio="off",
        sft_aggregation="demo_token_mean", rl_pos_weight="one", rl_pos_coef=1.0,
        **{name: luffy[name] for name in ("std_normalize", "clip", "aggregation", "aggregation_constant",
                                          "entropy_bonus")},
    )


RELEASED.update({
    "chord_mu": ("Trinity-RFT examples/mix_chord/mix_chord.yaml (chord-mu)",
                 from_chord_yaml(CHORD_YAML, CHORD_VARIANTS["chord_mu"])),
    "chord_phi": ("Trinity-RFT examples/mix_chord/mix_chord.yaml (chord-phi)",
                  from_chord_yaml(CHORD_YAML, CHORD_VARIANTS["chord_phi"])),
    "hpt": ("Unify-Post-Training exp_scripts/train.sh", from_hpt_script(HPT_TRAIN_SH)),
    "dft": ("DFT verl/verl/trainer/fsdp_dft_trainer.py", dict(
        use_rollouts=False, num_demos=1, sft_weight="prob", sft_coef=1.0, demo_ratio="off", aggregation="token_mean",
        entropy_bonus=0.0, sft_mix_schedule="none")),
})


def test_chord_expert_rows_are_trinitys_20_percent_of_rows():
    # 96 prompts: 64 expert rows + 32 x 8 rollouts; 64 / 320 = 20% of the rows, 2/3 of the prompts
    assert resolve(AlgorithmConfig(preset="chord_mu")).expert_prompt_fraction == 64 / 96
    assert 64 / (64 + 32 * 8) == 0.2


def test_hpt_llama_gate_is_an_override():
    llama = from_hpt_script({**HPT_TRAIN_SH, "trainer.switch_gate": 2, "trainer.switch_gate_off": 2})
    s = resolve(AlgorithmConfig(preset="hpt", sft_gate_max_correct=2))
    assert s.sft_gate_max_correct == llama["sft_gate_max_correct"] == 2


def test_mu_schedule_is_trinitys():
    from tests.algorithms.reference.trinity_chord import mu_schedule_function

    for name, variant in CHORD_VARIANTS.items():
        s = resolve(AlgorithmConfig(preset=name))
        for step in (0, 1, 2, 50, 100, 199, 200, 201, 500):
            ref = mu_schedule_function(step, variant["mu_warmup_steps"], variant["mu_decay_steps"],
                                       variant["mu_peak"], variant["mu_valley"])
            assert s.at_step(step).sft_mix == ref, (name, step)
    warm = dataclasses.replace(resolve(AlgorithmConfig(preset="chord_mu")), mu_warmup_steps=200, mu_decay_steps=400,
                               mu_peak=0.5, mu_valley=0.02)  # the yaml's own (uncommented) values
    for step in (0, 1, 100, 199, 200, 399, 600, 601):
        assert warm.at_step(step).sft_mix == mu_schedule_function(step, 200, 400, 0.5, 0.02)
    assert resolve(AlgorithmConfig(preset="srft")).at_step(5).sft_mix is None


def test_routing_and_mix_settings_are_checked():
    with pytest.raises(ConfigError, match="algorithm.expert_prompt_fraction"):
        load_config(overrides=["algorithm.preset=chord_mu", "algorithm.expert_prompt_fraction=1.0"])
    with pytest.raises(ConfigError, match="algorithm.expert_prompt_fraction / algorithm.sft_gate_max_correct"):
        resolve(AlgorithmConfig(preset="hpt", num_demos_per_prompt=0))
    with pytest.raises(ConfigError, match="algorithm.expert_prompt_fraction / algorithm.sft_gate_max_correct"):
        resolve(AlgorithmConfig(preset="sft", sft_gate_max_correct=0))  # no rollouts to gate
    with pytest.raises(ConfigError, match="algorithm.mu_peak"):
        load_config(overrides=["algorithm.mu_peak=1.5"])
    with pytest.raises(ConfigError, match="algorithm.sft_gate_max_correct"):
        load_config(overrides=["algorithm.sft_gate_max_correct=-2"])
    with pytest.raises(ConfigError, match="algorithm.sft_mix_schedule"):
        load_config(overrides=["algorithm.sft_mix_schedule=linear"])
    off = resolve(AlgorithmConfig(preset="hpt", sft_gate_max_correct=-1))
    assert not off.routes_prompts
