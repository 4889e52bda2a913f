"""Algorithm presets: every open choice of SRFT (docs/algorithms.md) as a concrete field.

``PRESETS`` is the ONE table of presets (name -> function returning its :class:`AlgoSettings`);
:func:`resolve` starts from the preset and lets every non-null field of ``AlgorithmConfig`` override it.
Code elsewhere branches on settings (``settings.clip``, ``settings.demo_ratio``, ...), never on preset names.
Each preset's docstring names the source it follows (the paper's equation, or the released file and setting);
tests/algorithms/test_presets.py holds those sources' settings in a table and checks every preset against it.
"""

from __future__ import annotations

import dataclasses
import math
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
    terms 1-4 are aggregated over the mini-batch by ``aggregation`` (demo tokens by ``sft_aggregation`` when it
    names one); the bonus is always the mini-batch token-mean of -entropy_bonus * H, whatever ``aggregation`` is
    (as LUFFY's actor and the SRFT code derived from it apply ``entropy_coeff``: ``masked_mean(entropy,
    response_mask)``; see losses.py). With an SFT mix (``sft_mix_schedule``) demo-token terms are multiplied by
    the step's mu and rollout-token terms by 1 - mu.

    Prompt routing (training/routing.py): with ``expert_prompt_fraction`` > 0 that share of each step's prompts
    are expert rows (no rollouts; their demonstration alone, trained by the demo terms); with
    ``sft_gate_max_correct`` >= 0 a prompt whose rollouts have at most that many correct answers drops them and
    keeps its demonstration alone. When either is on, every other prompt keeps its rollouts alone (no demo).
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
    sft_aggregation: str = "as_rollouts"  # a key of losses.SFT_AGGREGATIONS: c_t of the demo tokens' terms
    sft_mix_schedule: str = "none"  # a key of MIX_SCHEDULES: mu(step) of L = (1 - mu) RL + mu SFT
    mu_warmup_steps: int = 0        # warmup_cosine: mu rises linearly 0 -> mu_peak over these steps,
    mu_decay_steps: int = 0         # then falls from mu_peak to mu_valley along a half cosine over these,
    mu_peak: float = 0.0
    mu_valley: float = 0.0          # and stays at mu_valley after
    sft_mix: Optional[float] = None  # mu at the current step: set by at_step(), never by a preset or config
    expert_prompt_fraction: float = 0.0  # share of each step's prompts trained on their demonstration alone
    sft_gate_max_correct: int = -1  # a prompt with <= this many correct rollouts is trained on its demo alone

    @property
    def uses_demo_terms(self) -> bool:
        return self.num_demos > 0 and (self.sft_weight != "zero" or self.demo_ratio != "off")

    @property
    def routes_prompts(self) -> bool:
        """Each prompt is trained either on its demonstration alone or on its rollouts alone (CHORD, HPT)."""
        return self.expert_prompt_fraction > 0 or self.sft_gate_max_correct >= 0

    def at_step(self, step: int) -> "AlgoSettings":
        """These settings with ``sft_mix`` = mu at ``step`` (the loop's 1-based step); unchanged without a mix."""
        schedule = MIX_SCHEDULES[self.sft_mix_schedule]
        return self if schedule is None else dataclasses.replace(self, sft_mix=float(schedule(self, step)))


def _warmup_cosine(s: AlgoSettings, step: int) -> float:
    """CHORD's mu (Trinity-RFT's ``mu_schedule_function``): linear warm-up 0 -> mu_peak over mu_warmup_steps, a
    half cosine mu_peak -> mu_valley over mu_decay_steps, then mu_valley. W = D = 0 gives mu_valley throughout."""
    if step < s.mu_warmup_steps:
        return step / s.mu_warmup_steps * s.mu_peak
    if step >= s.mu_warmup_steps + s.mu_decay_steps:
        return s.mu_valley
    cosine = 0.5 * (1 + math.cos(math.pi * (step - s.mu_warmup_steps) / s.mu_decay_steps))
    return (s.mu_peak - s.mu_valley) * cosine + s.mu_valley


#: algorithm.sft_mix_schedule: name -> mu(settings, step), or None for no mix (every term weighted 1).
MIX_SCHEDULES: dict[str, Optional[Callable[[AlgoSettings, int], float]]] = {
    "none": None,
    "warmup_cosine": _warmup_cosine,  # CHORD
}


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


#: Trinity-RFT (github.com/modelscope/Trinity-RFT), as read for the CHORD presets: examples/mix_chord/mix_chord.yaml
#: and trinity/algorithm/policy_loss_fn/chord_policy_loss.py at commit 041433056e9067e35a42a3943ecbaf89bef24518,
#: trinity/algorithm/sample_strategy/mix_sample_strategy.py, trinity/algorithm/advantage_fn/grpo_advantage.py.


def _chord_mu() -> AlgoSettings:
    """CHORD-mu (arXiv 2508.11408) as Trinity-RFT runs it (sources above; line numbers of those files):

    - mix_chord.yaml L6 ``repeat_times: 8``; advantage_fn ``grpo`` (grpo_advantage.py: (r - mean) / (std + 1e-6),
      unbiased std); policy loss ``PPOPolicyLossFn`` with yaml L17 ``clip_range: 0.2``, token-mean;
    - yaml L10 ``expert_data_ratio: 0.20`` of the 320 experiences a step reads (L34 ``batch_size: 40`` x 8):
      ceil(0.2 x 320) = 64 expert rows (mix_sample_strategy.py ``expert_batch_size = ceil(...)``) and 256
      rollouts = 32 prompts x 8. Each expert row is a prompt of its own, so 64 of the step's 96 prompts: 2/3;
    - chord_policy_loss.py L211-237: L = (1 - mu) GRPO + mu SFT, each a token mean over its own rows
      (``masked_mean`` over the micro-batch's usual / expert rows, L192-201 weights);
    - yaml L12-16 comments, "0 for chord-mu", "200 for chord-mu", "0.9 for chord-mu", "0.05 for chord-mu",
      ``enable_phi_function`` "false for chord-mu": mu warms up over 0 steps, falls 0.9 -> 0.05 along a cosine
      over 200 steps (``mu_schedule_function``, L14-31); plain NLL on expert rows (``SFTLossFn``);
    - yaml L8 ``kl_coef: 0.0``; no entropy term (Trinity's entropy loss coefficient defaults to 0).
    The differences from that code (global normalisers, its dual-clip) are in docs/algorithms.md.
    """
    return dataclasses.replace(
        _grpo(), num_demos=1, sft_weight="one", sft_coef=1.0, aggregation="rollout_token_mean",
        sft_aggregation="demo_token_mean", sft_mix_schedule="warmup_cosine", mu_warmup_steps=0, mu_decay_steps=200,
        mu_peak=0.9, mu_valley=0.05, expert_prompt_fraction=64 / 96,
    )


def _chord_phi() -> AlgoSettings:
    """CHORD-phi: ``chord_mu`` with the yaml's chord-phi values (mix_chord.yaml L12-16: warm-up 0, decay 0,
    peak 0.1, valley 0.1: a constant mu = 0.1) and ``enable_phi_function: true``: the SFT token weight
    phi = sg(p (1 - p)) (chord_policy_loss.py ``phi_function`` L64-69, ``SFTPhiLossFn`` L99:
    ``masked_mean(-logprob * weighted_phi.detach(), action_mask)``, ``cutoff_prob`` 1.0 = no cut-off)."""
    return dataclasses.replace(_chord_mu(), sft_weight="phi", mu_decay_steps=0, mu_peak=0.1, mu_valley=0.1)


def _hpt() -> AlgoSettings:
    """HPT (arXiv 2509.04419) as its released run trains (TsinghuaC3I/Unify-Post-Training at commit
    ae332f5fa4dc8b4c3d3cd77ebc9cff3a3abab2d0, a fork of LUFFY; paths under hpt/verl/verl/):

    - exp_scripts/train.sh (Qwen2.5-Math-7B): ``unify_strategy=switch``, ``switch_gate=0``, ``rollout.n=8``,
      ``n_verify=8``; mix_src/mix_trainer.py L609-610 counts a question's correct rollouts and L394-407
      (``select_on_off_ada_balance``): at most ``switch_gate`` correct -> its 8 rollouts removed (L912-990) and its
      demonstration added (``off_add_num = 1``, L761-880); otherwise the rollouts alone. exp_scripts/train_llama.sh
      (Llama-3.1-8B) sets ``switch_gate=2``: ``algorithm.sft_gate_max_correct=2``;
    - ``offline_loss_type=sft``, ``sft_loss_coef=1.0`` (0.3 for Qwen2.5-Math-1.5B, the script's comment):
      mix_src/mix_actor.py L135-165, the demo rows' ``compute_sft_pure_loss`` (mix_core_alg.py L7-10: the token
      mean of -log p over the micro-batch's demo tokens) x sft_loss_coef plus the rollouts' policy loss;
    - ``algorithm.grpo_use_std=False``, ``loss_remove_clip=True``, ``loss_remove_token_mean=True``
      (trainer/ppo/core_algos.py L285-324: token sum / 8192 per micro-batch) in LUFFY's layout (128 prompts,
      mini-batch 64 x 8 sequences on 8 GPUs), so C = 128 as for ``luffy`` (docs/algorithms.md);
    - ``entropy_coeff=0.001`` on ``masked_mean(entropy, response_mask)`` over every row (mix_actor.py L436, L460).
    """
    return dataclasses.replace(
        _grpo(), num_demos=1, sft_weight="one", sft_coef=1.0, std_normalize=False, clip=False,
        aggregation="token_sum_norm", aggregation_constant=128.0, entropy_bonus=0.001,
        sft_aggregation="demo_token_mean", sft_gate_max_correct=0,
    )


def _dft() -> AlgoSettings:
    """DFT (arXiv 2508.05629) as its released trainer computes it (yongliang-wu/DFT at commit
    e153181f71522428ed030f4519702890c699ed6b, verl/verl/trainer/fsdp_dft_trainer.py L366-371, L436): each
    demo token's NLL times its detached probability, -sg(p) log p, a token mean (per micro-batch there; over the
    mini-batch here, docs/algorithms.md); no rollouts. Trinity-RFT's ``sft_is`` loss is the same
    (chord_policy_loss.py L52)."""
    return dataclasses.replace(_sft(), sft_weight="prob", aggregation="token_mean")


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
    "chord_mu": _chord_mu,
    "chord_phi": _chord_phi,
    "hpt": _hpt,
    "dft": _dft,
}

#: AlgorithmConfig field -> AlgoSettings field, for the fields whose names differ.
_RENAMED = {"num_demos_per_prompt": "num_demos"}


def resolve(cfg: AlgorithmConfig, *, tis_cap: Optional[float] = None) -> AlgoSettings:
    """The preset's settings with every non-null field of ``cfg`` applied on top.

    ``cfg``'s own fields (the preset's name, each value's range) are checked where they are defined, by
    ``AlgorithmConfig.validate`` (config.py); this checks only what the combination with the preset decides.
    ``tis_cap`` comes from ``rollout.tis_cap`` (it lives with the rollout engine in the config tree).
    """
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
    """The rules that need the resolved settings (a preset's defaults with the config's overrides)."""
    if not s.use_rollouts and s.num_demos == 0:
        raise ConfigError("algorithm.num_demos_per_prompt: this preset trains on demonstrations only; expected >= 1")
    if s.routes_prompts and (not s.use_rollouts or s.num_demos != 1 or s.demos_in_group):
        raise ConfigError("algorithm.expert_prompt_fraction / algorithm.sft_gate_max_correct: prompt routing needs "
                          "rollouts, exactly one demonstration per prompt (num_demos_per_prompt=1), and demos "
                          "outside the reward group")