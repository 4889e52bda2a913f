"""Training recipes of the toy study: one or more presets run one after the other, each stage starting from the
previous stage's exported model (``sft_then_rl``: the paper's two-stage SFT->RL baseline). Every preset is also a
one-stage recipe of the same name."""

from __future__ import annotations

from ..algorithms.presets import PRESETS

#: Multi-stage recipes: name -> presets run in order, each stage starting from the previous stage's exported
#: model (fresh optimizer, the same step budget per stage). ``sft_then_rl`` is the paper's two-stage SFT->RL
#: baseline (Table 2): SFT on the demonstrations, then GRPO from the SFT model.
MULTI_STAGE: dict[str, tuple[str, ...]] = {
    "sft_then_rl": ("sft", "grpo"),
}

#: Every recipe by name: each preset as one stage, plus the multi-stage ones.
RECIPES: dict[str, tuple[str, ...]] = {**{name: (name,) for name in PRESETS}, **MULTI_STAGE}
