"""The SRFT objective and its baselines as pure tensor functions over flat per-token tensors.

One micro-batch is a :class:`TokenBatch` of [T] tensors (packed sequences, any order). The loss of the whole
mini-batch is

    L = sum_t c_t * (l1_t + l2_t + l3_t + l4_t)  +  sum_t l5_t / num_tokens

over every loss token t of the mini-batch, where l1..l4 are the four SRFT terms and l5 the entropy bonus
(see :class:`~megatron_srft.algorithms.presets.AlgoSettings` for their formulas). The bonus is the mini-batch
token-mean of l5 = -beta * H_t whatever the aggregation: that is how LUFFY's actor, and the SRFT code derived
from it, apply ``entropy_coeff`` (``entropy_loss = masked_mean(entropy, response_mask)``), so a bonus of 0.001
means the same thing under every aggregation (folded into token_sum_norm it would be scaled by the mean
response length / C: about 0.5 for 4k-token responses at C = 8192, 1/200 for 40-token ones). c_t is the
aggregation coefficient of terms 1-4, computed from mini-batch totals (:class:`Normalizers`) and the token's
own sequence only:

    seq_mean_token_mean:  c_t = 1 / (num_sequences * |seq(t)|)   (mean over tokens of each sequence, then over
                                                                  sequences: GRPO, the paper)
    token_mean:           c_t = 1 / num_tokens                   (mean over all loss tokens: verl token-mean)
    token_sum_norm:       c_t = 1 / (num_sequences * C)           (token sum / C per sequence, mean over sequences:
                                                                  Dr.GRPO; the released code per sequence with
                                                                  C = 8192; LUFFY's run with C = 128)
    rollout_token_mean:   c_t = 1 / num_rollout_tokens            (mean over the rollout tokens only: CHORD's RL part)

With ``sft_aggregation = demo_token_mean`` the demo tokens' terms take c_t = 1 / num_demo_tokens instead (the SFT
rows are a token mean of their own: CHORD, HPT). With an SFT mix (``sft_mix_schedule``; the step's mu is
``settings.sft_mix``) demo-token terms are multiplied by mu and rollout-token terms by 1 - mu (CHORD).

Because c_t (and 1 / num_tokens) does not depend on how tokens are split, :func:`srft_objective` returns this
micro-batch's share of L, and summing the shares over micro-batches and DP ranks gives L exactly: invariant to
micro-batching, packing and DP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .metrics import MetricSums
from .mismatch import truncated_is_weights
from .presets import AlgoSettings

__all__ = [
    "TokenBatch", "Normalizers", "srft_objective", "aggregation_coefficients", "token_mean_coefficients",
    "weight_entropy", "sft_weight", "sft_mix_weights",
    "rl_pos_weight", "sft_term", "demo_rl_term", "policy_gradient_term", "entropy_bonus_term",
]


@dataclass
class TokenBatch:
    """Flat per-token tensors [T] of one micro-batch. Positions with ``loss_mask`` False are ignored (any value).

    logprob:        log pi_theta(y_t) (differentiable; from ops.logprob)
    entropy:        H_t of pi_theta at t (differentiable; only the entropy bonus back-propagates through it,
                    the SRFT weights use sg(H))
    old_logprob:    log pi_old(y_t) from the trainer before this rollout step's updates (rollout tokens)
    advantage:      the sequence's group advantage A_k broadcast to its tokens
    is_demo:        bool, token of a demonstration (else of an on-policy rollout)
    loss_mask:      bool, response token that counts in the loss
    seq_index:      long, sequence id (unique within the mini-batch)
    seq_num_tokens: loss tokens of this token's sequence (the whole sequence, whichever micro-batch holds it)
    engine_logprob: optional log-prob the rollout engine reported; with ``settings.tis_cap`` = C the on-policy
                    terms are multiplied by sg(min(exp(old_logprob - engine_logprob), C)) (truncated IS)
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    old_logprob: torch.Tensor
    advantage: torch.Tensor
    is_demo: torch.Tensor
    loss_mask: torch.Tensor
    seq_index: torch.Tensor
    seq_num_tokens: torch.Tensor
    engine_logprob: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.logprob.shape[0])


@dataclass
class Normalizers:
    """Totals of the WHOLE mini-batch (all micro-batches, all DP ranks), computed once by the adapter.

    num_tokens:           loss tokens (loss_mask True) in the mini-batch
    num_sequences:        sequences with at least one loss token in the mini-batch (demos and rollouts)
    num_demo_tokens:      loss tokens of demonstrations; needed by ``sft_aggregation = demo_token_mean`` and
                          ``aggregation = rollout_token_mean`` (the rollout tokens are num_tokens - num_demo_tokens)
    aggregation_constant: C of token_sum_norm; None = settings.aggregation_constant
    mean_entropy:         mini-batch mean of H over loss tokens; needed only when
                          settings.entropy_granularity == "batch_mean" (e.g. from the old-logprob pass)
    """

    num_tokens: float
    num_sequences: float
    aggregation_constant: Optional[float] = None
    mean_entropy: Optional[float] = None
    num_demo_tokens: Optional[float] = None

    @classmethod
    def for_settings(cls, settings: AlgoSettings, *, num_tokens: float, num_sequences: float,
                     mean_entropy: Optional[float] = None, num_demo_tokens: Optional[float] = None
                     ) -> "Normalizers":
        return cls(float(num_tokens), float(num_sequences), settings.aggregation_constant,
                   None if mean_entropy is None else float(mean_entropy),
                   None if num_demo_tokens is None else float(num_demo_tokens))

    def demo_tokens(self) -> float:
        if self.num_demo_tokens is None:
            raise ValueError("Normalizers.num_demo_tokens: required by algorithm.sft_aggregation 'demo_token_mean' "
                             "and algorithm.aggregation 'rollout_token_mean'")
        return self.num_demo_tokens


# --------------------------------------------------------------------------------------------- pieces


def token_mean_coefficients(batch: TokenBatch, norm: Normalizers) -> torch.Tensor:
    """1 / num_tokens [T] fp32 on loss tokens, 0 elsewhere: the mini-batch token-mean (verl token-mean; the
    entropy bonus under every aggregation)."""
    mask = batch.loss_mask.bool()
    coef = torch.full_like(batch.logprob, 1.0 / max(norm.num_tokens, 1.0), dtype=torch.float32)
    return torch.where(mask, coef, torch.zeros_like(coef))


def _seq_mean_token_mean(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    # c_t = 1 / (num_sequences * |seq(t)|)
    return 1.0 / (batch.seq_num_tokens.float().clamp(min=1.0) * max(norm.num_sequences, 1.0))


def _token_mean(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    # c_t = 1 / num_tokens
    return token_mean_coefficients(batch, norm)


def _token_sum_norm(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    # c_t = 1 / (num_sequences * C)
    const = settings.aggregation_constant if norm.aggregation_constant is None else norm.aggregation_constant
    return torch.full_like(batch.logprob, 1.0 / (max(norm.num_sequences, 1.0) * const), dtype=torch.float32)


def _rollout_token_mean(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    # c_t = 1 / num_rollout_tokens (the demo tokens take their own mean through sft_aggregation)
    num_rollout_tokens = norm.num_tokens - norm.demo_tokens()
    return torch.full_like(batch.logprob, 1.0 / max(num_rollout_tokens, 1.0), dtype=torch.float32)


#: algorithm.aggregation: name -> c_t [T] (masked below); the module docstring has the formulas.
AGGREGATIONS: dict[str, Callable[[TokenBatch, AlgoSettings, Normalizers], torch.Tensor]] = {
    "seq_mean_token_mean": _seq_mean_token_mean,  # GRPO, the paper
    "token_mean": _token_mean,  # verl's token-mean
    "token_sum_norm": _token_sum_norm,  # the released code (C = 8192), LUFFY's run (C = 128)
    "rollout_token_mean": _rollout_token_mean,  # CHORD's RL part: a token mean over the rollout rows
}


def _demo_token_mean(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    # c_t = 1 / num_demo_tokens
    return torch.full_like(batch.logprob, 1.0 / max(norm.demo_tokens(), 1.0), dtype=torch.float32)


#: algorithm.sft_aggregation: name -> c_t [T] of the demo tokens' terms; None = the same c_t as ``aggregation``.
SFT_AGGREGATIONS: dict[str, Optional[Callable[[TokenBatch, AlgoSettings, Normalizers], torch.Tensor]]] = {
    "as_rollouts": None,  # one aggregation for every token (SRFT, LUFFY, the baselines)
    "demo_token_mean": _demo_token_mean,  # the SFT rows' own token mean (CHORD, HPT)
}


def aggregation_coefficients(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    """c_t [T] fp32 (0 on masked tokens) of terms 1-4: :data:`AGGREGATIONS` [``settings.aggregation``], and
    :data:`SFT_AGGREGATIONS` [``settings.sft_aggregation``] on demo tokens when it names one."""
    coef = AGGREGATIONS[settings.aggregation](batch, settings, norm).float().expand_as(batch.logprob)
    demo_agg = SFT_AGGREGATIONS[settings.sft_aggregation]
    if demo_agg is not None:
        demo_coef = demo_agg(batch, settings, norm).float().expand_as(batch.logprob)
        coef = torch.where(batch.is_demo.bool(), demo_coef, coef)
    return torch.where(batch.loss_mask.bool(), coef, torch.zeros_like(coef))


def sft_mix_weights(batch: TokenBatch, settings: AlgoSettings) -> Optional[torch.Tensor]:
    """[T] mu on demo tokens, 1 - mu on rollout tokens (CHORD: L = (1 - mu) RL + mu SFT), mu = the step's
    ``settings.sft_mix`` (:meth:`AlgoSettings.at_step`); None when the preset has no SFT mix."""
    if settings.sft_mix_schedule == "none":
        return None
    if settings.sft_mix is None:
        raise ValueError(f"algorithm.sft_mix_schedule {settings.sft_mix_schedule!r}: the step's mu is not set "
                         "(use AlgoSettings.at_step(step))")
    mu = torch.full_like(batch.logprob, settings.sft_mix, dtype=torch.float32)
    return torch.where(batch.is_demo.bool(), mu, 1.0 - mu)


def _batch_mean_entropy(batch: TokenBatch, norm: Normalizers) -> torch.Tensor:
    if norm.mean_entropy is None:
        raise ValueError("Normalizers.mean_entropy: required when algorithm.entropy_granularity is 'batch_mean'")
    return torch.full_like(batch.entropy, norm.mean_entropy, dtype=torch.float32)


#: algorithm.entropy_granularity: name -> sg(H) [T] used inside the weights.
WEIGHT_ENTROPIES: dict[str, Callable[[TokenBatch, Normalizers], torch.Tensor]] = {
    "token": lambda batch, norm: batch.entropy.detach().float(),  # H_t per token (paper, code)
    "batch_mean": _batch_mean_entropy,  # the mini-batch mean of H, broadcast
}


def weight_entropy(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers) -> torch.Tensor:
    """sg(H) [T] used inside the weights: :data:`WEIGHT_ENTROPIES` [``settings.entropy_granularity``]."""
    return WEIGHT_ENTROPIES[settings.entropy_granularity](batch, norm)


#: algorithm.sft_weight: name -> g(h, p) [T], w_SFT = min(sft_coef * g(sg(H), sg(p)), sft_weight_max),
#: p = pi(y_t) of the demo token.
SFT_WEIGHTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "exp_neg_entropy": lambda h, p: torch.exp(-h),  # SRFT, the paper (Eq. 8)
    "exp_pos_entropy": lambda h, p: torch.exp(h),  # SRFT, the released code
    "one": lambda h, p: torch.ones_like(h),  # plain SFT
    "zero": lambda h, p: torch.zeros_like(h),  # no SFT term
    "phi": lambda h, p: p * (1.0 - p),  # CHORD-phi: phi = sg(p (1 - p)) (Trinity-RFT's phi_function)
    "prob": lambda h, p: p,  # DFT: -sg(p) log p
}

#: algorithm.rl_pos_weight: name -> g(h) [T], w_RL = rl_pos_coef * g(sg(H)) on positive rollouts.
RL_POS_WEIGHTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp_pos_entropy": torch.exp,  # the paper (Eq. 12) and the code
    "one": torch.ones_like,  # the w_RL = 1 ablation, GRPO
}

#: algorithm.demo_ratio: name -> f(p, gamma) [T] of the off-policy demo term -A * f(pi(y_t)).
DEMO_RATIOS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "p": lambda p, gamma: p,  # the paper (Eq. 9-10): behaviour policy 1, no clip
    "p_over_p_plus_gamma": lambda p, gamma: p / (p + gamma),  # the released code and LUFFY
    "off": lambda p, gamma: torch.zeros_like(p),  # no demo RL term
}


def sft_weight(h: torch.Tensor, p: torch.Tensor, settings: AlgoSettings) -> torch.Tensor:
    """w_SFT [T] = min(sft_coef * g(h, p), sft_weight_max), g = :data:`SFT_WEIGHTS` [``settings.sft_weight``]
    (h and p already detached)."""
    w = settings.sft_coef * SFT_WEIGHTS[settings.sft_weight](h, p)
    if settings.sft_weight_max is not None:
        w = w.clamp(max=settings.sft_weight_max)
    return w


def rl_pos_weight(h: torch.Tensor, settings: AlgoSettings) -> torch.Tensor:
    """w_RL [T] = rl_pos_coef * g(h), g = :data:`RL_POS_WEIGHTS` [``settings.rl_pos_weight``] (h detached)."""
    return settings.rl_pos_coef * RL_POS_WEIGHTS[settings.rl_pos_weight](h)


def sft_term(logprob: torch.Tensor, w_sft: torch.Tensor) -> torch.Tensor:
    """Term 1 per token: w_SFT * (-log pi(y_t))."""
    return -w_sft * logprob


def demo_rl_term(logprob: torch.Tensor, advantage: torch.Tensor, settings: AlgoSettings) -> torch.Tensor:
    """Term 2 per token: -A * f(pi(y_t)), behaviour policy taken as 1, no clip; f = p | p/(p+gamma) | 0."""
    return -advantage * DEMO_RATIOS[settings.demo_ratio](torch.exp(logprob), settings.demo_gamma)


def policy_gradient_term(logprob: torch.Tensor, old_logprob: torch.Tensor, advantage: torch.Tensor,
                         settings: AlgoSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PG_t = -min(r_t A, clip(r_t, 1-eps, 1+eps) A) (or -r_t A without clip), r_t = exp(logprob - old_logprob).

    Returns (pg [T], ratio [T] detached, clipped [T] bool: the clipped branch is the active one).
    """
    ratio = torch.exp(logprob - old_logprob)
    unclipped = -ratio * advantage
    if not settings.clip:
        return unclipped, ratio.detach(), torch.zeros_like(ratio, dtype=torch.bool)
    eps = settings.clip_eps
    clipped_loss = -ratio.clamp(1.0 - eps, 1.0 + eps) * advantage
    pg = torch.maximum(unclipped, clipped_loss)
    active = ((advantage > 0) & (ratio > 1.0 + eps)) | ((advantage < 0) & (ratio < 1.0 - eps))
    return pg, ratio.detach(), active.detach()


def entropy_bonus_term(entropy: torch.Tensor, settings: AlgoSettings) -> torch.Tensor:
    """Bonus per token: -beta * H_t (maximises entropy; differentiable through H). Aggregated as a token-mean
    (:func:`token_mean_coefficients`), not with the other terms' c_t."""
    return -settings.entropy_bonus * entropy


def _tis_weight(batch: TokenBatch, old: torch.Tensor, mask: torch.Tensor, settings: AlgoSettings):
    if settings.tis_cap is None or batch.engine_logprob is None:
        return None
    # masked positions: engine = old there, so their (unused) weight is exp(0) = 1
    eng = torch.where(mask, batch.engine_logprob.float(), old.detach().float())
    return truncated_is_weights(old, eng, settings.tis_cap)


# --------------------------------------------------------------------------------------------- objective


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where (not multiply): masked positions may hold inf/nan, which must not reach the sums or the grads
    return torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def _sum_count(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _masked(x, mask).sum().detach(), mask.sum().float()


def _max(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = _masked(x, mask).detach()
    return (m.max() if m.numel() else torch.zeros((), device=x.device)), torch.ones((), device=x.device)


def srft_objective(batch: TokenBatch, settings: AlgoSettings, norm: Normalizers
                   ) -> tuple[torch.Tensor, MetricSums]:
    """This micro-batch's share of the mini-batch loss (0-d, differentiable), and its metrics.

    Summing the returned loss over all micro-batches and DP ranks of a mini-batch gives the exact mini-batch
    loss (module docstring). ``metrics``: name -> (sum, count) 0-d tensors (see algorithms/metrics.py):
    loss_total / loss_sft / loss_demo_rl / loss_rl_pos / loss_rl_neg / loss_entropy_bonus (sum = the share,
    count = this micro-batch's fraction of the mini-batch's loss tokens, so sum/count over everything = the
    term's value), entropy_demo / entropy_rollout (mean H), w_sft_mean / w_sft_max (demo tokens),
    w_rl_mean / w_rl_max (positive rollout tokens), clip_frac, ratio_mean / ratio_max (rollout tokens).
    """
    mask = batch.loss_mask.bool()
    demo = mask & batch.is_demo.bool()
    roll = mask & ~batch.is_demo.bool() & settings.use_rollouts
    lp = _masked(batch.logprob, mask)
    ent = _masked(batch.entropy, mask)
    old = _masked(batch.old_logprob, roll)  # demo tokens have no old/engine log-prob: keep any value out
    adv = _masked(batch.advantage, mask)
    coef = aggregation_coefficients(batch, settings, norm)
    h = _masked(weight_entropy(batch, settings, norm), mask)

    w_sft = sft_weight(h, torch.exp(lp.detach()), settings)
    l_sft = _masked(sft_term(lp, w_sft), demo)
    l_demo = _masked(demo_rl_term(lp, adv, settings), demo)
    pg, ratio, clipped = policy_gradient_term(lp, old, adv, settings)
    tis = _tis_weight(batch, old, roll, settings)
    if tis is not None:
        pg = pg * tis
    pos, neg = roll & (adv > 0), roll & (adv <= 0)
    w_rl = rl_pos_weight(h, settings)
    l_pos = _masked(w_rl * pg, pos)
    l_neg = _masked(pg, neg)
    l_bonus = _masked(entropy_bonus_term(ent, settings), mask) if settings.entropy_bonus else torch.zeros_like(lp)

    mix = sft_mix_weights(batch, settings)
    if mix is not None:
        coef = coef * mix
    terms = {"sft": l_sft, "demo_rl": l_demo, "rl_pos": l_pos, "rl_neg": l_neg}
    shares = {name: (coef * t).sum() for name, t in terms.items()}
    shares["entropy_bonus"] = (token_mean_coefficients(batch, norm) * l_bonus).sum()
    loss = sum(shares.values())

    frac = mask.sum().float() / max(norm.num_tokens, 1.0)
    metrics: MetricSums = {f"loss_{name}": (s.detach(), frac) for name, s in shares.items()}
    metrics["loss_total"] = (loss.detach(), frac)
    metrics["entropy_demo"] = _sum_count(ent, demo)
    metrics["entropy_rollout"] = _sum_count(ent, roll)
    metrics["w_sft_mean"] = _sum_count(w_sft, demo)
    metrics["w_sft_max"] = _max(w_sft, demo)
    metrics["w_rl_mean"] = _sum_count(w_rl, pos)
    metrics["w_rl_max"] = _max(w_rl, pos)
    metrics["clip_frac"] = _sum_count(clipped.float(), roll)
    metrics["ratio_mean"] = _sum_count(ratio, roll)
    metrics["ratio_max"] = _max(ratio, roll)
    if tis is not None:
        metrics["tis_weight_mean"] = _sum_count(tis, roll)
    if mix is not None:
        metrics["sft_mix"] = (frac * float(settings.sft_mix), frac)  # on frac's device
    return loss, metrics
