"""Training recipes of the toy study: one or more stages run one after the other, each stage starting from the
previous stage's exported model (``sft_then_rl``: the paper's two-stage SFT->RL baseline). Every preset is also a
one-stage recipe of the same name; ``<preset>_one_step_off`` runs it with engines on a rank of their own, one step
off (rollout.max_staleness 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..algorithms.presets import PRESETS


@dataclass(frozen=True)
class Stage:
    """One training stage: a preset, the config overrides that set how it runs, and its number of local ranks."""

    preset: str
    overrides: tuple[str, ...] = ()
    num_ranks: int = 1


#: 1 training rank + 1 engine rank; the engines sample step n + 1 while step n trains (docs/rollout.md)
ONE_STEP_OFF = ("rollout.placement=disaggregated", "rollout.num_engine_ranks=1", "rollout.max_staleness=1")

#: Every stage by name: each preset, and the one-step-off runs of GRPO and SRFT (the same steps, prompts and seeds
#: as their on-policy runs; only when each batch is sampled differs).
STAGES: dict[str, Stage] = {
    **{name: Stage(name) for name in PRESETS},
    **{f"{name}_one_step_off": Stage(name, ONE_STEP_OFF, num_ranks=2) for name in ("grpo", "srft")},
}

#: Multi-stage recipes: name -> stages run in order, each stage starting from the previous stage's exported
#: model (fresh optimizer, the same step budget per stage). ``sft_then_rl`` is the paper's two-stage SFT->RL
#: baseline (Table 2): SFT on the demonstrations, then GRPO from the SFT model.
MULTI_STAGE: dict[str, tuple[str, ...]] = {
    "sft_then_rl": ("sft", "grpo"),
}

#: Every recipe by name: each stage alone, plus the multi-stage ones.
RECIPES: dict[str, tuple[str, ...]] = {**{name: (name,) for name in STAGES}, **MULTI_STAGE}
