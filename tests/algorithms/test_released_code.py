"""The CHORD, HPT and DFT presets against their authors' released loss code (tests/algorithms/reference/, test
oracles copied with their licence and source) on random tensors: values and gradients equal where the layouts
agree, and every intended difference written out and checked exactly.

The released code computes per micro-batch on [B, L] padded rows; ours on flat tokens with mini-batch-global
normalisers (losses.py). In the layout where the two coincide (one micro-batch holding the mini-batch, one GPU)
they must agree to fp32 rounding (summation order; their masked means add 1e-8 to the denominator): rtol 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_srft.algorithms.advantages import group_advantages
from megatron_srft.algorithms.losses import Normalizers, TokenBatch, srft_objective
from megatron_srft.algorithms.presets import PRESETS
from tests.algorithms.reference import dft_loss, hpt_loss, trinity_chord

RTOL = 1e-5
ATOL = 1e-7


def _rows(seed: int, num_rollout_groups: int, group_size: int, num_demos: int, max_len: int = 7,
          log_ratio_scale: float = 0.3):
    """Padded rows: rollouts (groups of ``group_size``) then demos. Log-probs are a leaf [B, L] tensor."""
    g = torch.Generator().manual_seed(seed)
    B = num_rollout_groups * group_size + num_demos
    lengths = torch.randint(1, max_len + 1, (B,), generator=g)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    logprob = (-torch.rand(B, max_len, generator=g) * 2.5 - 0.01).requires_grad_()
    # |log ratio| <= 3 x 0.3 < 1: inside Trinity's dual-clip bound (ratio < 3), tested on its own below
    old = logprob.detach() + (torch.rand(B, max_len, generator=g) * 2 - 1) * 3 * log_ratio_scale
    entropy = (torch.rand(B, max_len, generator=g) * 2).requires_grad_()
    is_demo = torch.arange(B) >= num_rollout_groups * group_size
    uid = [i // group_size for i in range(num_rollout_groups * group_size)] + [f"d{i}" for i in range(num_demos)]
    scores = torch.randint(0, 2, (B,), generator=g).float()
    return dict(B=B, L=max_len, mask=mask, logprob=logprob, old=old, entropy=entropy, is_demo=is_demo, uid=uid,
                scores=scores)


def _token_batch(r: dict, advantages: torch.Tensor) -> TokenBatch:
    """Our flat batch over the same leaves (gradients land in r['logprob'] / r['entropy'])."""
    mask = r["mask"]
    seq = torch.arange(r["B"])[:, None].expand(-1, r["L"])[mask]
    lengths = mask.sum(1)
    return TokenBatch(
        logprob=r["logprob"][mask], entropy=r["entropy"][mask], old_logprob=r["old"][mask],
        advantage=advantages[:, None].expand(-1, r["L"])[mask].float(),
        is_demo=r["is_demo"][:, None].expand(-1, r["L"])[mask], loss_mask=torch.ones(int(mask.sum()), dtype=torch.bool),
        seq_index=seq, seq_num_tokens=lengths[seq])


def _normalizers(settings, batch: TokenBatch) -> Normalizers:
    return Normalizers.for_settings(settings, num_tokens=batch.num_tokens,
                                    num_sequences=len(set(batch.seq_index.tolist())),
                                    num_demo_tokens=int(batch.is_demo.sum()))


def _grads(loss, r):
    gl, ge = torch.autograd.grad(loss, [r["logprob"], r["entropy"]], allow_unused=True, retain_graph=True)
    return (torch.zeros_like(r["logprob"]) if gl is None else gl, torch.zeros_like(r["entropy"]) if ge is None else ge)


def _assert_same(ours, theirs, r):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=RTOL, atol=ATOL)
    for a, b in zip(_grads(ours, r), _grads(theirs, r)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------- CHORD


def _chord_theirs(preset: str, r: dict, advantages: torch.Tensor, step: int, rows=None):
    """Trinity-RFT's loss for the rows ``rows`` as one micro-batch on one GPU holding the whole mini-batch."""
    s = PRESETS[preset]()
    rows = torch.arange(r["B"]) if rows is None else rows
    n_usual, n_expert = int((~r["is_demo"]).sum()), int(r["is_demo"].sum())
    pb = len(rows)
    loss = trinity_chord.mix_chord_loss(
        r["logprob"][rows], r["old"][rows], r["mask"][rows].float(), advantages[rows, None].float(),
        r["is_demo"][rows], step, mu_warmup_steps=s.mu_warmup_steps, mu_decay_steps=s.mu_decay_steps,
        mu_peak=s.mu_peak, mu_valley=s.mu_valley, enable_phi_function=s.sft_weight == "phi",
        clip_range=s.clip_eps, use_dynamic_bsz=True, ppo_mini_batch_size=r["B"], ppo_micro_batch_size_per_gpu=1,
        ngpus_trainer=1, train_batch_size_usual=n_usual, train_batch_size_expert=n_expert)
    return loss * trinity_chord.actor_scale(pb, r["B"])


def check_chord(preset: str, seed: int):
    """Trinity-RFT's MIXCHORDPolicyLossFn (its GRPO advantage, PPO loss, SFT / phi-SFT losses, mu schedule)."""
    step = (1, 37, 150, 250)[seed]
    r = _rows(seed, num_rollout_groups=3, group_size=8, num_demos=5)
    # the advantage: Trinity's GRPO over the rollout groups (expert rows: reward 0, a group of one, unused)
    theirs_adv = trinity_chord.grpo_advantage(r["scores"], r["uid"])
    rollout = ~r["is_demo"]
    ours_adv = torch.zeros(r["B"])
    ours_adv[rollout] = group_advantages(r["scores"][rollout], torch.tensor(r["uid"][:int(rollout.sum())]),
                                         std_normalize=True, eps=1e-6)
    torch.testing.assert_close(ours_adv[rollout], theirs_adv[rollout], rtol=1e-6, atol=1e-6)
    settings = PRESETS[preset]().at_step(step)
    batch = _token_batch(r, theirs_adv.masked_fill(r["is_demo"], 0.0))
    ours, metrics = srft_objective(batch, settings, _normalizers(settings, batch))
    _assert_same(ours, _chord_theirs(preset, r, theirs_adv, step), r)
    assert float(metrics["sft_mix"][0] / metrics["sft_mix"][1]) == pytest.approx(settings.sft_mix)


def test_chord_micro_batches_intended_difference():
    """Trinity sums, over micro-batches, each micro-batch's token mean weighted by its share of the rows
    (n_rows_mb / rows); ours is the token mean over the whole mini-batch: each micro-batch's token mean weighted by
    its share of the tokens (M_mb / M). Checked exactly on two micro-batches; equal when rows and tokens split
    alike."""
    r = _rows(5, num_rollout_groups=2, group_size=8, num_demos=4)
    adv = trinity_chord.grpo_advantage(r["scores"], r["uid"]).masked_fill(r["is_demo"], 0.0)
    step = 20
    settings = PRESETS["chord_mu"]().at_step(step)
    mu = settings.sft_mix
    parts = [torch.tensor([0, 1, 2, 3, 4, 5, 16, 17]), torch.tensor([6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19])]
    n_usual, n_expert = int((~r["is_demo"]).sum()), int(r["is_demo"].sum())
    tok = r["mask"].sum(1).double()
    theirs = ours_formula = 0.0
    M_usual, M_expert = tok[~r["is_demo"]].sum(), tok[r["is_demo"]].sum()
    for rows in parts:
        usual, expert = rows[~r["is_demo"][rows]], rows[r["is_demo"][rows]]
        pg = trinity_chord.ppo_policy_loss(r["logprob"][usual], r["old"][usual], r["mask"][usual].float(),
                                           adv[usual, None], clip_range=0.2)
        sft = trinity_chord.sft_loss(r["logprob"][expert], r["mask"][expert].float())
        # Trinity: (1 - mu) pg_mb n_usual_mb / n_usual + mu sft_mb n_expert_mb / n_expert (the actor's scale is
        # already inside: per_micro_batch_weight x len(data) / ppo_mini_batch_size)
        trinity_mb = trinity_chord.mix_chord_loss(
            r["logprob"][rows], r["old"][rows], r["mask"][rows].float(), adv[rows, None], r["is_demo"][rows], step,
            mu_warmup_steps=0, mu_decay_steps=200, mu_peak=0.9, mu_valley=0.05, enable_phi_function=False,
            clip_range=0.2, use_dynamic_bsz=True, ppo_mini_batch_size=r["B"], ppo_micro_batch_size_per_gpu=1,
            ngpus_trainer=1, train_batch_size_usual=n_usual, train_batch_size_expert=n_expert,
        ) * trinity_chord.actor_scale(len(rows), r["B"])
        written = (1 - mu) * pg * len(usual) / n_usual + mu * sft * len(expert) / n_expert
        torch.testing.assert_close(trinity_mb.double(), written.double(), rtol=RTOL, atol=ATOL)
        theirs = theirs + trinity_mb
        ours_formula = ours_formula + (1 - mu) * pg * tok[usual].sum() / M_usual + mu * sft * tok[expert].sum() / M_expert
    batch = _token_batch(r, adv)
    ours, _ = srft_objective(batch, settings, _normalizers(settings, batch))
    torch.testing.assert_close(ours.double(), ours_formula.double(), rtol=RTOL, atol=ATOL)
    assert abs(float(ours.detach()) - float(theirs.detach())) > 1e-6  # the layouts differ here, and so do the losses


def test_chord_dual_clip_intended_difference():
    """Trinity's PPO loss caps a negative-advantage token's loss at -A x clip_ratio_c (3): ours has no dual clip.
    One token, A = -1, ratio 4: Trinity 3, ours -ratio x A = 4 (the upper clip 1.2 does not bind for A < 0)."""
    lp = torch.tensor([[math.log(4.0)]], requires_grad=True)
    theirs = trinity_chord.ppo_policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), -torch.ones(1, 1))
    s = dataclasses.replace(PRESETS["chord_mu"](), sft_mix_schedule="none")
    batch = TokenBatch(logprob=lp[0], entropy=torch.zeros(1), old_logprob=torch.zeros(1), advantage=-torch.ones(1),
                       is_demo=torch.tensor([False]), loss_mask=torch.tensor([True]), seq_index=torch.tensor([0]),
                       seq_num_tokens=torch.tensor([1]))
    ours, _ = srft_objective(batch, s, Normalizers(1, 1, num_demo_tokens=0))
    assert float(theirs.detach()) == pytest.approx(3.0, rel=1e-6) and float(ours.detach()) == pytest.approx(4.0, rel=1e-6)


# --------------------------------------------------------------------------------------------- HPT


def check_hpt(preset: str, seed: int):
    """HPT's actor (mix_actor.py, offline_loss_type sft). One micro-batch of S rows on one GPU, padded to L: HPT's loss is sft_mean + (token sum / L) - 0.001 mean H.
    Ours is token_sum_norm with C: (1/S) sum / C. The same rule as LUFFY's (C = L x GPUs / S) makes them equal;
    the preset's 128 is that rule in the released layout (test_presets.py: 8192 x 8 / 512)."""
    r = _rows(seed, num_rollout_groups=3, group_size=8, num_demos=4)
    rollout = ~r["is_demo"]
    adv = torch.zeros(r["B"])
    adv[rollout] = group_advantages(r["scores"][rollout], torch.tensor(r["uid"][:int(rollout.sum())]),
                                    std_normalize=False)
    prefix_mask = r["is_demo"][:, None].expand(-1, r["L"]) & r["mask"]  # a demo row is all prefix (ratio 1.0)
    theirs = hpt_loss.actor_micro_batch_loss(
        r["logprob"], r["old"], adv[:, None].expand(-1, r["L"]), r["mask"].float(), prefix_mask, r["entropy"],
        clip_ratio=0.2, entropy_coeff=0.001, sft_loss_coef=1.0, loss_remove_token_mean=True, loss_remove_clip=True,
        gradient_accumulation=1)
    settings = dataclasses.replace(PRESETS["hpt"](), aggregation_constant=r["L"] / r["B"])
    batch = _token_batch(r, adv)
    ours, _ = srft_objective(batch, settings, _normalizers(settings, batch))
    _assert_same(ours, theirs, r)


def test_hpt_gate_equals_select_on_off_ada_balance():
    from megatron_srft.rollout.seam import ScoredPrompt
    from megatron_srft.training.routing import plan_prompts, route_prompts

    g = torch.Generator().manual_seed(0)
    for gate in (0, 2):
        settings = dataclasses.replace(PRESETS["hpt"](), sft_gate_max_correct=gate)
        rewards = torch.randint(0, 2, (40, 8), generator=g).float()
        rewards[:5] = 0  # some all-wrong questions
        scored = [ScoredPrompt(completions=[object()] * 8, rewards=row.tolist(), demo_rewards=[1.0]) for row in rewards]
        plan = plan_prompts(list(range(40)), slice(0, 40), 1, settings)
        routed, stats = route_prompts(plan, scored, settings)
        for row, sp in zip(rewards, routed):
            on_remove, _, off_add = hpt_loss.select_on_off_ada_balance(int((row == 1).sum()), gate, gate)
            sft = on_remove == 8 and off_add == 1
            assert (not sp.completions and sp.demo_rewards == [1.0]) if sft else (len(sp.completions) == 8
                                                                                 and not sp.demo_rewards)
        gated = sum(hpt_loss.select_on_off_ada_balance(int((row == 1).sum()), gate, gate)[2] == 1 for row in rewards)
        assert stats["routing/gated_fraction"] == (gated, 40) and gated >= 5


# --------------------------------------------------------------------------------------------- DFT


def _dft_ours(logits, labels, mask):
    lp_all = torch.log_softmax(logits.float(), dim=-1)
    lp = lp_all.gather(1, labels[:, None])[:, 0]
    T = lp.shape[0]
    batch = TokenBatch(logprob=lp, entropy=torch.zeros(T), old_logprob=torch.zeros(T), advantage=torch.zeros(T),
                       is_demo=torch.ones(T, dtype=torch.bool), loss_mask=mask.bool(), seq_index=torch.zeros(T, dtype=torch.long),
                       seq_num_tokens=torch.full((T,), int(mask.sum())))
    settings = PRESETS["dft"]()
    return srft_objective(batch, settings, Normalizers.for_settings(settings, num_tokens=int(mask.sum()),
                                                                   num_sequences=1,
                                                                   num_demo_tokens=int(mask.sum())))[0]


def check_dft(preset: str, seed: int):
    """DFT's fsdp_dft_trainer (loss and gradient with respect to the logits)."""
    g = torch.Generator().manual_seed(seed)
    T, V = 30, 11
    logits = (torch.randn(T, V, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    mask = (torch.rand(T, generator=g) > 0.3).float()
    theirs = dft_loss.dft_step_loss([(logits, labels, mask)])
    ours = _dft_ours(logits, labels, mask)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=RTOL, atol=ATOL)
    g_ours, = torch.autograd.grad(ours, logits, retain_graph=True)
    g_theirs, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-8)


def test_dft_micro_batches_intended_difference():
    """DFT's step loss is the mean of its micro-batches' token means; ours the token mean of the whole mini-batch
    (each micro-batch's mean weighted by its share of the tokens). Checked exactly on two uneven micro-batches."""
    g = torch.Generator().manual_seed(3)
    T, V = 24, 9
    logits = torch.randn(T, V, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    mask = torch.ones(T)
    mask[20:] = 0
    a, b = slice(0, 6), slice(6, T)  # 6 and 14 loss tokens
    ma, mb = (dft_loss.dft_micro_batch_loss(logits[s], labels[s], mask[s]) for s in (a, b))
    theirs = dft_loss.dft_step_loss([(logits[a], labels[a], mask[a]), (logits[b], labels[b], mask[b])])
    torch.testing.assert_close(theirs, (ma + mb) / 2, rtol=RTOL, atol=ATOL)
    ours = _dft_ours(logits, labels, mask)
    torch.testing.assert_close(ours.double(), ((6 * ma + 14 * mb) / 20).double(), rtol=RTOL, atol=ATOL)
    assert abs(float(ours.detach()) - float(theirs.detach())) > 1e-4


def test_trinity_sft_is_is_dft():
    g = torch.Generator().manual_seed(4)
    lp = (-torch.rand(3, 5, generator=g) * 2).requires_grad_()
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    batch = TokenBatch(logprob=lp[mask.bool()], entropy=torch.zeros(int(mask.sum())),
                       old_logprob=torch.zeros(int(mask.sum())), advantage=torch.zeros(int(mask.sum())),
                       is_demo=torch.ones(int(mask.sum()), dtype=torch.bool),
                       loss_mask=torch.ones(int(mask.sum()), dtype=torch.bool),
                       seq_index=torch.zeros(int(mask.sum()), dtype=torch.long),
                       seq_num_tokens=torch.full((int(mask.sum()),), int(mask.sum())))
    ours, _ = srft_objective(batch, PRESETS["dft"](), Normalizers(float(mask.sum()), 1.0,
                                                                 num_demo_tokens=float(mask.sum())))
    torch.testing.assert_close(ours, trinity_chord.sft_is_loss(lp, mask), rtol=RTOL, atol=ATOL)


#: preset -> its check against the released code (the layout where both compute the same loss)
ORACLES = {"chord_mu": check_chord, "chord_phi": check_chord, "hpt": check_hpt, "dft": check_dft}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("preset", list(ORACLES))
def test_preset_equals_released_code(preset, seed):
    ORACLES[preset](preset, seed)


def test_every_method_preset_has_an_oracle():
    from tests.algorithms.test_presets import RELEASED

    methods = {"chord_mu", "chord_phi", "hpt", "dft"}
    assert set(ORACLES) == methods and methods <= set(RELEASED) and methods <= set(PRESETS)
