"""The config tree: YAML 1:1, unknown keys, wrong types, impossible layouts, the generated reference."""

from pathlib import Path

import pytest

from megatron_srft.cli import main as cli_main
from megatron_srft.config import ASYNC_TIS_CAP, ConfigError, SRFTConfig, load_config, markdown_reference
from megatron_srft.distributed.layout import validate_layout
from megatron_srft.models.arch import arch_from_hf_config

from tests.test_examples import MODELS

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_maps_onto_the_tree(tmp_path):
    p = _write(tmp_path, "run_dir: r\nparallel:\n  tensor_model_parallel_size: 2\noptimizer:\n  lr: 1e-6\n"
                         "algorithm:\n  preset: srft_code\n")
    cfg = load_config(str(p), ["train.num_steps=7", "data.train_files=[a.jsonl, b.parquet]"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == 1e-6  # YAML 1.1 reads 1e-6 as a string: accepted as a float literal
    assert cfg.algorithm.preset == "srft_code"
    assert cfg.train.num_steps == 7 and cfg.data.train_files == ["a.jsonl", "b.parquet"]


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = _write(tmp_path, "optimizer:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert str(p) in msg and "optimizer.learning_rate" in msg and "valid keys" in msg
    p = _write(tmp_path, "paralel:\n  tensor_model_parallel_size: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'paralel'; did you mean 'parallel'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match=r"override: unknown key 'train.num_step'; did you mean 'train.num_steps'"):
        load_config(None, ["train.num_step=3"])


def test_wrong_type_names_the_field(tmp_path):
    p = _write(tmp_path, "train:\n  num_steps: many\n")
    with pytest.raises(ConfigError, match=r"run.yaml: train.num_steps: expected int, got 'many'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match=r"algorithm.preset: expected 'srft' \| 'srft_code'"):
        load_config(None, ["algorithm.preset=ppo"])
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: expected bool"):
        load_config(None, ["parallel.sequence_parallel=3"])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by tensor_model_parallel_size \(2\)"):
        validate_layout(load_config(None, ["parallel.tensor_model_parallel_size=2"]), 3)
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: needs tensor_model_parallel_size > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match=r"train.prompts_per_minibatch: must divide prompts_per_step"):
        load_config(None, ["train.prompts_per_step=10", "train.prompts_per_minibatch=4"])
    with pytest.raises(ConfigError, match=r"model.fp8: needs Transformer Engine and a CUDA GPU"):
        validate_layout(load_config(None, ["model.fp8=e4m3"]), 1)
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size: expected an integer >= 1"):
        load_config(None, ["parallel.tensor_model_parallel_size=0"])


def test_cli_errors_are_one_line_exit_2(capsys):
    assert cli_main(["config", "--print", "train.num_steps=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srft config: error: override: train.num_steps")
    assert cli_main(["config", "--print", "run_dir=r"]) == 0
    assert "run_dir: r" in capsys.readouterr().out


def test_help_lists_every_subcommand(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "convert", "score", "generate", "eval", "plot", "make-toy", "config", "launch"):
        assert name in out


def test_docs_config_md_is_generated_from_the_dataclasses():
    assert (ROOT / "docs" / "config.md").read_text() == markdown_reference(), \
        "docs/config.md is stale: run `make docs`"


def test_every_field_has_help():
    import dataclasses

    root = SRFTConfig()
    for f in dataclasses.fields(root):
        assert f.metadata.get("help"), f.name
        sub = getattr(root, f.name)
        if dataclasses.is_dataclass(sub):
            for sf in dataclasses.fields(sub):
                assert sf.metadata.get("help"), f"{f.name}.{sf.name}"


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr=.inf", "optimizer.lr: expected a finite number"),
    ("optimizer.lr=.nan", "optimizer.lr: expected a finite number"),
    ("optimizer.lr=1e999", "optimizer.lr: expected a finite number"),
    ("optimizer.lr=inf", "optimizer.lr: expected a finite number"),
    ("optimizer.adam_eps=-1e-8", "optimizer.adam_eps: expected > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay: expected >= 0"),
    ("rollout.temperature=.inf", "rollout.temperature: expected a finite number"),
    ("train.eval_temperature=.inf", "train.eval_temperature: expected a finite number"),
    ("train.reward_timeout_s=1e13", "train.reward_timeout_s: expected 0 < seconds <= 86400"),
    ("train.reward_timeout_s=10000000000000", "train.reward_timeout_s: expected 0 < seconds <= 86400"),
    ("train.prompts_per_step=1000000000000", "train.prompts_per_step: expected 1 <= value <= 1000000"),
    ("train.num_steps=100000000000", "train.num_steps: expected 0 <= value <= 10000000"),
    ("train.eval_n_samples=0", "train.eval_n_samples: expected 1 <= value"),
    ("train.seed=-1", "train.seed: expected 0 <= value"),
    ("data.seed=-5", "data.seed: expected 0 <= value"),
    ("data.max_response_length=10000000000", "data.max_response_length: expected 1 <= value"),
    ("algorithm.adv_eps=.nan", "algorithm.adv_eps: expected a finite number"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: expected 1 <= value"),
    ("checkpoint.resume=sometimes", "checkpoint.resume: expected 'auto' | 'must' | 'never' | 'fresh'"),
    ("checkpoint.allow_changes=[data.sed]", "checkpoint.allow_changes[0]: 'data.sed' is not a config field"),
    ("logging.log_every=0", "logging.log_every: expected 1 <= value"),
    ("parallel.virtual_pipeline_model_parallel_size=2",
     "parallel.virtual_pipeline_model_parallel_size: only null or 1 is supported"),
    ("rollout.cpu_kvcache_space_gib=-1", "rollout.cpu_kvcache_space_gib: expected 0 < GiB <= 4096 or null"),
    ("rollout.cpu_kvcache_space_gib=5000", "rollout.cpu_kvcache_space_gib: expected 0 < GiB <= 4096 or null"),
])
def test_values_that_cannot_be_right_are_config_errors(override, words):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["rollout.max_staleness=1"], "rollout.max_staleness: expected 0 with placement colocated"),
    (["rollout.num_engine_ranks=8"], "rollout.num_engine_ranks: expected 0 with placement colocated"),
    (["rollout.placement=disaggregated"], "rollout.num_engine_ranks: expected >= 1 with placement disaggregated"),
    (["rollout.placement=disaggregated", "rollout.num_engine_ranks=-8"], "rollout.num_engine_ranks: expected >= 0"),
    (["rollout.placement=disaggregated", "rollout.num_engine_ranks=8", "rollout.max_staleness=2"],
     "rollout.max_staleness: expected 0 or 1"),
    (["rollout.placement=remote"], "rollout.placement: expected 'colocated' | 'disaggregated'"),
])
def test_placement_fields_that_do_not_fit_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_placement_defaults_and_the_effective_tis_cap():
    r = load_config(None, []).rollout
    assert (r.placement, r.num_engine_ranks, r.max_staleness, r.tis_cap, r.effective_tis_cap) == (
        "colocated", 0, 0, None, None)
    disagg = ["rollout.placement=disaggregated", "rollout.num_engine_ranks=8"]
    assert load_config(None, disagg).rollout.effective_tis_cap is None  # on-policy: TIS stays off
    assert load_config(None, disagg + ["rollout.max_staleness=1"]).rollout.effective_tis_cap == ASYNC_TIS_CAP == 2.0
    assert load_config(None, disagg + ["rollout.max_staleness=1", "rollout.tis_cap=3"]).rollout.effective_tis_cap == 3.0
    assert load_config(None, ["rollout.tis_cap=1.5"]).rollout.effective_tis_cap == 1.5


def test_layout_errors_of_a_placement_through_srft_config(capsys):
    base = ["config", "--world-size", "32", "rollout.placement=disaggregated"]
    assert cli_main(base + ["rollout.num_engine_ranks=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srft config: error: rollout.num_engine_ranks: 32 leaves no training")
    assert cli_main(base + ["rollout.num_engine_ranks=16", "parallel.tensor_model_parallel_size=2"]) == 0
    assert "placement: disaggregated" in capsys.readouterr().out


def test_every_shipped_config_states_its_placement_and_why():
    for path in sorted((ROOT / "examples/configs").glob("*.yaml")):
        line = [ln for ln in path.read_text().splitlines() if ln.strip().startswith("placement:")]
        assert len(line) == 1 and "#" in line[0], f"{path.name}: no commented 'rollout.placement:' line"
        assert load_config(str(path)).rollout.placement in line[0]


#: docs/rollout.md, "Placement": each shipped training config's disaggregated alternative(s) as
#: (world, rollout.num_engine_ranks, other overrides, DP over the training ranks).
DISAGGREGATED = {
    "qwen2.5-math-7b-srft.yaml": [(32, 16, [], 8), (32, 24, [], 4), (40, 8, [], 16)],
    "qwen2.5-32b-srft.yaml": [(32, 16, [], 2)],
    "llama3.1-70b-srft.yaml": [(64, 32, [], 1), (64, 32, ["parallel.pipeline_model_parallel_size=2"], 2)],
    "toy-cpu.yaml": [(3, 1, [], 1), (2, 1, ["parallel.tensor_model_parallel_size=1"], 1)],
}


@pytest.mark.parametrize("name", sorted(DISAGGREGATED))
def test_documented_disaggregated_layouts_fit(name):
    for world, engines, extra, dp in DISAGGREGATED[name]:
        cfg = load_config(str(ROOT / "examples/configs" / name), [
            "rollout.placement=disaggregated", f"rollout.num_engine_ranks={engines}", "rollout.max_staleness=1",
            *extra])
        spec = arch_from_hf_config(MODELS[name], name) if name in MODELS else None
        assert validate_layout(cfg, world, spec) == dp, (name, world, engines)


def test_validate_catches_non_finite_values_set_in_code():
    cfg = SRFTConfig()
    cfg.optimizer.lr = float("inf")
    with pytest.raises(ConfigError, match="optimizer.lr: expected a finite number"):
        cfg.validate()
    cfg = SRFTConfig()
    cfg.algorithm.clip_eps = float("nan")
    with pytest.raises(ConfigError, match="algorithm.clip_eps: expected a finite number"):
        cfg.validate()
    assert load_config(None, ["checkpoint.allow_changes=[data.seed, optimizer, '*']", "checkpoint.resume=fresh"])


def test_names_come_from_their_tables(monkeypatch):
    """A row added to a table (PRESETS, REWARDS, TEMPLATES, ENGINES, the loss variants) is a valid config value,
    in the error message and in docs/config.md, with no other change."""
    from megatron_srft.algorithms import losses, presets
    from megatron_srft.config import markdown_reference

    monkeypatch.setitem(presets.PRESETS, "my_ablation", presets.PRESETS["srft"])
    monkeypatch.setitem(losses.SFT_WEIGHTS, "my_weight", losses.SFT_WEIGHTS["one"])
    cfg = load_config(None, ["algorithm.preset=my_ablation", "algorithm.sft_weight=my_weight"])
    assert (cfg.algorithm.preset, cfg.algorithm.sft_weight) == ("my_ablation", "my_weight")
    assert "'my_ablation'" in markdown_reference() and "'my_weight'" in markdown_reference()
    with pytest.raises(ConfigError, match=r"algorithm.preset: expected 'srft' \| .*'my_ablation', got 'nope'"):
        load_config(None, ["algorithm.preset=nope"])
    cfg.train.reward = "nope"  # set in code: validate() checks it against REWARDS
    with pytest.raises(ConfigError, match=r"train.reward: expected 'math' \| 'exact', got 'nope'"):
        cfg.validate()


# --------------------------------------------------------------------------------------------- hostile YAML

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcde", "bcdef")) + "train:\n  num_steps: *f\n"


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_BOMB)  # 9^6 = 531441 leaves, a few hundred bytes (the real bomb has more levels)
    with pytest.raises(ConfigError, match=r"bomb\.yaml: line 2 not valid YAML: alias \*a: YAML aliases are not "
                                          r"allowed in configs"):
        load_config(str(bomb))
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        load_config(None, ["train.num_steps=[&x 1, *x]"])


def test_error_messages_show_a_value_cut_to_a_fixed_length(tmp_path):
    from megatron_srft.typed_yaml import MAX_SHOWN_CHARS

    big = tmp_path / "big.yaml"
    big.write_text("optimizer:\n  lr: [" + ", ".join(["[" + ", ".join(["123456789"] * 50) + "]"] * 200) + "]\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(big))
    msg = str(e.value)
    assert msg.startswith(f"{big}: optimizer.lr: expected float, got [[") and "..." in msg
    assert len(msg) < len(str(big)) + 60 + MAX_SHOWN_CHARS, msg


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  num_steps: 5\n  seed: 1\n  num_steps: 500\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 4 not valid YAML: duplicate key 'num_steps' \(first at "
                                          r"line 2\)"):
        load_config(str(dup))
    dup.write_text("train: {num_steps: 5, num_steps: 10}\n")  # both on one line
    with pytest.raises(ConfigError, match=r"duplicate key 'num_steps' \(first at line 1\)"):
        load_config(str(dup))


def test_config_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  num_steps: 5\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: line 3 not valid UTF-8 \(byte 0xe9\)"):
        load_config(str(bad))
    assert cli_main(["config", "--config", str(bad), "--print"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latin1.yaml: line 3 not valid UTF-8" in err, err
