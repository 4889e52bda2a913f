"""Algorithm presets: every open choice of SRFT (docs/algorithms.md) as a concrete field.

``PRESETS`` is the ONE table of presets (name -> function returning its :class:`AlgoSettings`);
:func:`resolve` starts from the preset and lets every non-null field of ``AlgorithmConfig`` override it.
Code elsewhere branches on settings (``settings.clip``, ``settings.demo_ratio``, ...), never on preset names.
Each preset's docstring names the source it follows (the paper's equation, or the released file and setting);
tests/algorithms/test_presets.py holds those sources' settings in a table and checks every preset against it.

``RECIPES`` is the table of training recipes: one or more presets run one after the other, each stage starting
from the previous stage's exported model (``sft_then_rl``: the paper's two-stage SFT->RL baseline). Every
preset is also a one-stage recipe of the same name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import AlgorithmConfig, ConfigError



@dataclass(frozen=True)
class AlgoSettings:
    """A fully resolved objective: no field is left open.

    Per token t (H_t = entropy, sg = stop-gradient, A = the sequence's group advantage):
      term 1 (demo tokens):       w_SFT,t * (-log pi(y_t)),  w_SFT,t = min(sft_coef * g(sg(H_t)), sft_weight_max)
                                  g = exp(-H) | exp(+H) | 1 | 0   (``sft_weight``)
      term 2 (demo tokens):       -A * f(pi(y_t)),  f = p | p / (p + demo_gamma) | 0   (``demo_ratio``)
      term 3 (rollouts, A > 0):   w_RL,t * PG_t,  w_RL,t = rl_pos_coef * (sg(exp(H_t)) | 1)   (``rl_pos_weight``)
      term 4 (rollouts, A <= 0):  PG_t = -min(r_t A, clip(r_t, 1 - clip_eps, 1 + clip_eps) A)  (-r_t A if not clip)
      bonus (all loss tokens):    -entropy_bonus * H_t
    terms 1-4 are aggregated over the mini-batch by ``aggregation``; the bonus is always the mini-batch token-mean
    of -entropy_bonus * H, whatever ``aggregation`` is (as LUFFY's actor and the SRFT code derived from it apply
    ``entropy_coeff``: ``masked_mean(entropy, response_mask)``; see losses.py).
    """

    use_rollouts: bool              # on-policy rollouts are generated and trained on (terms 3, 4)
    num_demos: int                  # D: demonstrations per prompt
    demos_in_group: bool            # demos join the reward group for the advantage (SRFT/LUFFY yes; SFT+RL no)
    sft_weight: str                 # a key of losses.SFT_WEIGHTS
    sft_coef: float
    sft_weight_max: Optional[float]  # clamp of w_SFT; None = unclamped
    rl_pos_weight: str              # a key of losses.RL_POS_WEIGHTS
    rl_pos_coef: float
    entropy_granularity: str        # a key of losses.WEIGHT_ENTROPIES
    std_normalize: bool
    adv_eps: float
    demo_ratio: str                 # a key of losses.DEMO_RATIOS
    demo_gamma: float
    clip: bool
    clip_eps: float
    aggregation: str                # a key of losses.AGGREGATIONS
    aggregation_constant: float     # used by token_sum_norm only
    entropy_bonus: float
    tis_cap: Optional[float] = None  # truncated importance-sampling cap for engine/trainer mismatch; None = off

    @property
    def uses_demo_terms(self) -> bool:
        return self.num_demos > 0 and (self.sft_weight != "zero" or self.demo_ratio != "off")


def _srft() -> AlgoSettings:
    """The paper's equations (arXiv 2506.19767, Eq. 7-12): w_SFT = 0.5 exp(-H) (Eq. 8), f(p) = p (Eq. 9-10),
    w_RL = 0.1 exp(H) on positive rollouts (Eq. 12), std-normalised group advantage over rollouts and demo (Eq. 7),
    clip 0.2, GRPO aggregation (mean over each sequence's tokens, then over sequences), no entropy bonus."""
    return AlgoSettings(
        use_rollouts=True, num_demos=1, demos_in_group=True,
        sft_weight="exp_neg_entropy", sft_coef=0.5, sft_weight_max=None,
        rl_pos_weight="exp_pos_entropy", rl_pos_coef=0.1, entropy_granularity="token",
        std_normalize=True, adv_eps=1e-6, demo_ratio="p", demo_gamma=0.1,
        clip=True, clip_eps=0.2, aggregation="seq_mean_token_mean", aggregation_constant=8192.0, entropy_bonus=0.0,
    )


def _srft_code() -> AlgoSettings:
    """The SRFT authors' released code (a fork of LUFFY; as read in the project's method notes, "the four loss
    terms" and "Aggregation"): w_SFT = 0.5 exp(+H) (sign flipped), f = p / (p + 0.1) (LUFFY's policy shaping),
    advantage without std, on-policy clip off, token sum / 8192 per sequence (``loss_remove_token_mean``), and
    ``entropy_coeff`` 0.001 on the token-mean of H (LUFFY's mix_actor.py: ``entropy_loss = masked_mean(entropy,
    response_mask)``, ``policy_loss = pg_loss - entropy_loss * entropy_coeff``), not on the sum / 8192 weighting.

    The aggregation constant stays 8192 (sum / 8192, mean over sequences): the released code's effective scale
    also multiplies by its sequences per GPU, which depends on a launch layout no released script of this code
    fixes; docs/algorithms.md shows how to reproduce it for a given layout (as ``luffy`` does for LUFFY's).
    """
    return dataclasses.replace(
        _srft(), sft_weight="exp_pos_entropy", std_normalize=False, demo_ratio="p_over_p_plus_gamma", clip=False,
        aggregation="token_sum_norm", entropy_bonus=0.001,
    )


def _srft_w_sft_1() -> AlgoSettings:
    """The paper's ablation "w_SFT fixed to 1" (its ablation table: 55.1 average against SRFT's 59.1): ``srft``
    with w_SFT = 1 on demo tokens."""
    return dataclasses.replace(_srft(), sft_weight="one", sft_coef=1.0)


def _srft_w_rl_1() -> AlgoSettings:
    """The paper's ablation "w_RL fixed to 1" (its ablation table: 56.2 average against SRFT's 59.1): ``srft``
    with w_RL = 1 on positive rollouts."""
    return dataclasses.replace(_srft(), rl_pos_weight="one", rl_pos_coef=1.0)


def _sft() -> AlgoSettings:
    """Plain NLL on demonstrations (term 1 with w = 1, mean over each demo's tokens, then over demos); no
    rollouts. The paper's SFT baseline."""
    return dataclasses.replace(
        _srft(), use_rollouts=False, demos_in_group=False, sft_weight="one", sft_coef=1.0, demo_ratio="off",
        rl_pos_weight="one", rl_pos_coef=1.0,
    )


def _grpo() -> AlgoSettings:
    """GRPO as the paper writes it (its RL baseline; Eq. 7 advantage, clipped surrogate, no KL): terms 3 + 4 with
    w_RL = 1, std-normalised advantage, clip 0.2, mean over tokens then sequences; no demonstrations."""
    return dataclasses.replace(
        _srft(), num_demos=0, demos_in_group=False, sft_weight="zero", demo_ratio="off",
        rl_pos_weight="one", rl_pos_coef=1.0,
    )


def _luffy() -> AlgoSettings:
    """LUFFY as its released run trains (ElliottYan/LUFFY, exp_scripts/train.sh, with the defaults of
    luffy/verl/verl/mix_src/config/mix_ppo_trainer.yaml for the keys it does not set):

    - ``rollout.n=8``, ``n_prefix=1``, prefix ratio 1.0: 7 rollouts + 1 full demonstration per group;
      ``adv_estimator=grpo`` puts the demo in the group, ``grpo_use_std=False``: A = r - mean(r);
    - ``use_off_policy_loss=True``, ``off_policy_reshape=p_div_p_0.1``: demo tokens -A * p / (p + 0.1), no SFT term;
    - ``loss_remove_clip=True``: on-policy ratio not clipped;
    - ``entropy_coeff=0.001`` on the token-mean entropy of all response tokens;
    - ``loss_remove_token_mean=True``: per micro-batch the token sum / 8192 (``max_response_length``), micro-batch
      losses summed (``ppo_micro_batch_size`` = ``ppo_mini_batch_size``: no accumulation division), then averaged
      over the 8 GPUs by FSDP. That is (sequences per GPU) x (token sum / 8192, mean over sequences). In the
      script's layout a mini-batch is 64 prompts x 8 = 512 sequences on 8 GPUs, 64 per GPU, so the loss equals
      our ``token_sum_norm`` with C = 8192 / 64 = 128 (token sum / 128, mean over sequences). That constant is
      the script's effective scale, and ours stays at it on any GPU count (docs/algorithms.md).
    """
    return dataclasses.replace(
        _grpo(), num_demos=1, demos_in_group=True, demo_ratio="p_over_p_plus_gamma", std_normalize=False,
        clip=False, aggregation="token_sum_norm", aggregation_constant=128.0, entropy_bonus=0.001,
    )


def _sft_plus_rl() -> AlgoSettings:
    """Term 1 with w = 1 plus GRPO (the paper's Fig. 5 single-stage baseline); demos are not in the RL group."""
    return dataclasses.replace(_grpo(), num_demos=1, sft_weight="one", sft_coef=1.0)


#: The one table of presets. Adding a preset = one function + one row (and the name in AlgorithmConfig.preset).
PRESETS: dict[str, Callable[[], AlgoSettings]] = {
    "srft": _srft,
    "srft_code": _srft_code,
    "sft": _sft,
    "grpo": _grpo,
    "luffy": _luffy,
    "sft_plus_rl": _sft_plus_rl,
    "srft_w_sft_1": _srft_w_sft_1,
    "srft_w_rl_1": _srft_w_rl_1,
}

#: Multi-stage recipes: name -> presets run in order, each stage starting from the previous stage's exported
#: model (fresh optimizer, the same step budget per stage). ``sft_then_rl`` is the paper's two-stage SFT->RL
#: baseline (Table 2): SFT on the demonstrations, then GRPO from the SFT model.
MULTI_STAGE: dict[str, tuple[str, ...]] = {
    "sft_then_rl": ("sft", "grpo"),
}

#: Every recipe by name: each preset as one stage, plus the multi-stage ones.
RECIPES: dict[str, tuple[str, ...]] = {**{name: (name,) for name in PRESETS}, **MULTI_STAGE}


#: AlgorithmConfig field -> AlgoSettings field, for the fields whose names differ.
_RENAMED = {"num_demos_per_prompt": "num_demos"}


def resolve(cfg: AlgorithmConfig, *, tis_cap: Optional[float] = None) -> AlgoSettings:
    """The preset's settings with every non-null field of ``cfg`` applied on top.

    ``tis_cap`` comes from ``rollout.tis_cap`` (it lives with the rollout engine in the config tree).
    """
    if cfg.preset not in PRESETS:
        raise ConfigError(f"algorithm.preset: expected one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    settings = PRESETS[cfg.preset]()
    names = {f.name for f in dataclasses.fields(AlgoSettings)}
    overrides = {}
    for f in dataclasses.fields(cfg):
        target = _RENAMED.get(f.name, f.name)
        value = getattr(cfg, f.name)
        if f.name != "preset" and value is not None and target in names:
            overrides[target] = value
    if tis_cap is not None:
        overrides["tis_cap"] = float(tis_cap)
    settings = dataclasses.replace(settings, **overrides)
    _check(settings)
    return settings


def _check(s: AlgoSettings) -> None:
    if s.sft_coef < 0:
        raise ConfigError(f"algorithm.sft_coef: expected >= 0, got {s.sft_coef}")
    if s.rl_pos_coef < 0:
        raise ConfigError(f"algorithm.rl_pos_coef: expected >= 0, got {s.rl_pos_coef}")
    if s.sft_weight_max is not None and s.sft_weight_max <= 0:
        raise ConfigError(f"algorithm.sft_weight_max: expected > 0 or null, got {s.sft_weight_max}")
    if not s.use_rollouts and s.num_demos == 0:
        raise ConfigError("algorithm.num_demos_per_prompt: this preset trains on demonstrations only; expected >= 1")
    if s.tis_cap is not None and s.tis_cap < 1:
        raise ConfigError(f"rollout.tis_cap: expected >= 1 or null, got {s.tis_cap}")
