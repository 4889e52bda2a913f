"""srft_objective against a slow reference written straight from the method spec (loops over sequences/tokens)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from megatron_srft.algorithms.losses import Normalizers, TokenBatch, srft_objective
from megatron_srft.algorithms.metrics import accumulate, finalize
from megatron_srft.algorithms.presets import PRESETS

SEQ_AGGS = ["seq_mean_token_mean", "token_mean", "token_sum_norm", "rollout_token_mean"]


# --------------------------------------------------------------------------------------------- random batches


def make_batch(seed: int, num_groups: int = 3, rollouts: int = 3, demos: int = 1, with_engine: bool = False):
    """A packed mini-batch: sequences of random length (some masked tokens), random advantages with zeros."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    cols = {k: [] for k in ("is_demo", "mask", "seq", "adv")}
    k = 0
    for _ in range(num_groups):
        for member in range(rollouts + demos):
            length = rng.randint(1, 6)
            adv = rng.choice([0.0, rng.uniform(-1.5, 1.5), rng.uniform(0.1, 1.5), -rng.uniform(0.1, 1.5)])
            mask = [rng.random() > 0.2 for _ in range(length)]
            mask[rng.randrange(length)] = True  # at least one loss token
            cols["is_demo"] += [member >= rollouts] * length
            cols["mask"] += mask
            cols["seq"] += [k] * length
            cols["adv"] += [adv] * length
            k += 1
    T = len(cols["seq"])
    logprob = -torch.rand(T, generator=g) * 3 - 0.01
    old = logprob + torch.randn(T, generator=g) * 0.4
    seq = torch.tensor(cols["seq"])
    mask = torch.tensor(cols["mask"])
    per_seq = torch.zeros(k, dtype=torch.long).index_add_(0, seq, mask.long())
    batch = TokenBatch(
        logprob=logprob.requires_grad_(),
        entropy=(torch.rand(T, generator=g) * 2.5).requires_grad_(),
        old_logprob=old,
        advantage=torch.tensor(cols["adv"]),
        is_demo=torch.tensor(cols["is_demo"]),
        loss_mask=mask,
        seq_index=seq,
        seq_num_tokens=per_seq[seq],
        engine_logprob=(old + torch.randn(T, generator=g) * 0.3) if with_engine else None,
    )
    # garbage at masked positions must not matter
    with torch.no_grad():
        batch.old_logprob[~mask] = float("inf")
        batch.advantage[~mask] = float("nan")
    return batch


def normalizers(batch: TokenBatch, settings, mean_entropy=None) -> Normalizers:
    mask = batch.loss_mask
    return Normalizers.for_settings(settings, num_tokens=int(mask.sum()),
                                    num_sequences=len(set(batch.seq_index[mask].tolist())),
                                    mean_entropy=mean_entropy, num_demo_tokens=int((mask & batch.is_demo).sum()))


def sub_batch(batch: TokenBatch, idx: torch.Tensor) -> TokenBatch:
    return TokenBatch(**{f.name: (None if getattr(batch, f.name) is None else getattr(batch, f.name)[idx])
                         for f in dataclasses.fields(batch)})


# --------------------------------------------------------------------------------------------- the reference


def reference_loss(batch: TokenBatch, s, mean_entropy=None):
    """The mini-batch loss from srft_method.md, token by token, with Python control flow."""
    T = batch.num_tokens
    seqs = {}
    for t in range(T):
        if bool(batch.loss_mask[t]):
            seqs.setdefault(int(batch.seq_index[t]), []).append(t)
    num_tokens = sum(len(v) for v in seqs.values())
    num_demo_tokens = sum(len(v) for v in seqs.values() if bool(batch.is_demo[v[0]]))
    total, bonus = 0.0, 0.0
    for toks in seqs.values():
        seq_loss = 0.0
        for t in toks:
            lp, H = batch.logprob[t], batch.entropy[t]
            h = float(H.detach()) if s.entropy_granularity == "token" else mean_entropy  # sg(H)
            A = float(batch.advantage[t])
            loss_t = 0.0
            if bool(batch.is_demo[t]):
                p_sg = math.exp(float(lp.detach()))
                g = {"exp_neg_entropy": math.exp(-h), "exp_pos_entropy": math.exp(h), "one": 1.0,
                     "zero": 0.0, "phi": p_sg * (1 - p_sg), "prob": p_sg}[s.sft_weight]
                w = s.sft_coef * g
                if s.sft_weight_max is not None:
                    w = min(w, s.sft_weight_max)
                loss_t = loss_t + w * (-lp)
                p = torch.exp(lp)
                if s.demo_ratio == "p":
                    loss_t = loss_t - A * p
                elif s.demo_ratio == "p_over_p_plus_gamma":
                    loss_t = loss_t - A * p / (p + s.demo_gamma)
            elif s.use_rollouts:
                ratio = torch.exp(lp - float(batch.old_logprob[t]))
                if s.clip:
                    clipped = max(1 - s.clip_eps, min(ratio, 1 + s.clip_eps))
                    pg = -min(ratio * A, clipped * A)
                else:
                    pg = -ratio * A
                if s.tis_cap is not None and batch.engine_logprob is not None:
                    pg = pg * min(math.exp(float(batch.old_logprob[t]) - float(batch.engine_logprob[t])), s.tis_cap)
                if A > 0:
                    w_rl = s.rl_pos_coef * (math.exp(h) if s.rl_pos_weight == "exp_pos_entropy" else 1.0)
                    pg = w_rl * pg
                loss_t = loss_t + pg
            bonus = bonus - s.entropy_bonus * H  # the bonus is a token-mean over the mini-batch, any aggregation
            seq_loss = seq_loss + loss_t
        is_demo_seq = bool(batch.is_demo[toks[0]])
        if is_demo_seq and s.sft_aggregation == "demo_token_mean":
            part = seq_loss / num_demo_tokens
        elif s.aggregation == "seq_mean_token_mean":
            part = seq_loss / len(toks) / len(seqs)
        elif s.aggregation == "token_mean":
            part = seq_loss / num_tokens
        elif s.aggregation == "rollout_token_mean":
            part = seq_loss / (num_tokens - num_demo_tokens)
        else:
            part = seq_loss / s.aggregation_constant / len(seqs)
        if s.sft_mix_schedule != "none":  # L = (1 - mu) RL + mu SFT
            part = part * (s.sft_mix if is_demo_seq else 1 - s.sft_mix)
        total = total + part
    return total + bonus / num_tokens


def grads(loss, batch):
    gl, ge = torch.autograd.grad(loss, [batch.logprob, batch.entropy], allow_unused=True)
    return (torch.zeros_like(batch.logprob) if gl is None else gl,
            torch.zeros_like(batch.entropy) if ge is None else ge)


def check_against_reference(batch, settings, mean_entropy=None):
    norm = normalizers(batch, settings, mean_entropy)
    loss, metrics = srft_objective(batch, settings, norm)
    ref = reference_loss(batch, settings, mean_entropy)
    torch.testing.assert_close(loss, torch.as_tensor(ref, dtype=loss.dtype), atol=1e-6, rtol=1e-5)
    g, rg = grads(loss, batch), grads(ref, batch)
    torch.testing.assert_close(g[0], rg[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g[1], rg[1], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(loss)
    return loss, metrics


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_matches_reference(preset, seed):
    settings = PRESETS[preset]().at_step(seed * 70 + 1)  # the step's SFT mix (mu) where the preset has one
    check_against_reference(make_batch(seed), settings)


@pytest.mark.parametrize("aggregation", SEQ_AGGS)
@pytest.mark.parametrize("preset", ["srft", "srft_code"])
def test_variants_match_reference(preset, aggregation):
    base = dataclasses.replace(PRESETS[preset](), aggregation=aggregation)
    variants = [
        base,
        dataclasses.replace(base, entropy_granularity="batch_mean"),
        dataclasses.replace(base, sft_weight_max=1.3, entropy_bonus=0.01, clip=not base.clip),
        dataclasses.replace(base, tis_cap=1.5, aggregation_constant=16.0),
        dataclasses.replace(base, sft_weight="phi", sft_aggregation="demo_token_mean"),
        dataclasses.replace(base, sft_weight="prob", sft_coef=0.7, sft_mix_schedule="warmup_cosine",
                            mu_warmup_steps=2, mu_decay_steps=10, mu_peak=0.7, mu_valley=0.2).at_step(5),
    ]
    for i, s in enumerate(variants):
        batch = make_batch(10 + i, with_engine=True)
        mean_h = float(batch.entropy.detach()[batch.loss_mask].mean())
        check_against_reference(batch, s, mean_entropy=mean_h)


@pytest.mark.parametrize("aggregation", SEQ_AGGS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_sum_over_micro_batches_equals_unsplit(preset, aggregation):
    settings = dataclasses.replace(PRESETS[preset](), aggregation=aggregation, entropy_bonus=0.003).at_step(3)
    batch = make_batch(5, num_groups=4)
    norm = normalizers(batch, settings)
    full, full_metrics = srft_objective(batch, settings, norm)
    full_grads = grads(full, batch)
    # an arbitrary split that cuts sequences across micro-batches, after shuffling token order (packing)
    perm = torch.randperm(batch.num_tokens, generator=torch.Generator().manual_seed(1))
    cuts = [0, 3, 4, 17, batch.num_tokens // 2, batch.num_tokens]
    total, acc = 0.0, {}
    for a, b in zip(cuts, cuts[1:]):
        part, m = srft_objective(sub_batch(batch, perm[a:b]), settings, norm)
        total = total + part
        accumulate(acc, m)
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-5)
    split_grads = grads(total, batch)
    torch.testing.assert_close(split_grads[0], full_grads[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(split_grads[1], full_grads[1], atol=1e-7, rtol=1e-5)
    f_full, f_split = finalize(accumulate({}, full_metrics)), finalize(acc)
    assert f_full.keys() == f_split.keys()
    for name in f_full:
        assert f_full[name] == pytest.approx(f_split[name], rel=1e-5, abs=1e-6, nan_ok=True), name
    assert f_split["loss_total"] == pytest.approx(float(full.detach()), rel=1e-5, abs=1e-7)


def test_srft_without_demo_terms_and_unit_rl_weight_equals_grpo():
    srft = dataclasses.replace(PRESETS["srft"](), sft_weight="zero", demo_ratio="off", rl_pos_weight="one",
                               rl_pos_coef=1.0)
    grpo = PRESETS["grpo"]()
    batch = make_batch(7)
    norm = normalizers(batch, grpo)
    a, _ = srft_objective(batch, srft, norm)
    b, _ = srft_objective(batch, grpo, norm)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(grads(a, batch)[0], grads(b, batch)[0], atol=0, rtol=0)


def test_sft_plus_rl_without_rl_equals_sft():
    sft_plus_rl = dataclasses.replace(PRESETS["sft_plus_rl"](), use_rollouts=False)
    sft = PRESETS["sft"]()
    batch = make_batch(8)
    norm = normalizers(batch, sft)
    a, _ = srft_objective(batch, sft_plus_rl, norm)
    b, _ = srft_objective(batch, sft, norm)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _one_token(lp, h, adv, is_demo, old=None):
    return TokenBatch(
        logprob=torch.tensor([lp], requires_grad=True), entropy=torch.tensor([h], requires_grad=True),
        old_logprob=torch.tensor([lp if old is None else old]), advantage=torch.tensor([adv]),
        is_demo=torch.tensor([is_demo]), loss_mask=torch.tensor([True]), seq_index=torch.tensor([0]),
        seq_num_tokens=torch.tensor([1]))


def test_hand_computed_demo_token_weights_and_signs():
    # p = 0.5, H = ln 2, A = 1. paper: w_SFT = 0.5 * exp(-ln 2) = 0.25; term1 = 0.25 ln 2; term2 = -A p = -0.5
    s = PRESETS["srft"]()
    b = _one_token(math.log(0.5), math.log(2.0), 1.0, True)
    loss, m = srft_objective(b, s, Normalizers(1, 1))
    assert float(loss.detach()) == pytest.approx(0.25 * math.log(2) - 0.5, abs=1e-6)
    loss.backward()
    # d/dlp: -w_SFT - A p = -0.25 - 0.5; nothing flows into H (weights use sg(H))
    assert float(b.logprob.grad) == pytest.approx(-0.75, abs=1e-6)
    assert b.entropy.grad is None or float(b.entropy.grad) == 0.0
    assert finalize(accumulate({}, m))["w_sft_mean"] == pytest.approx(0.25)
    # code: w_SFT = 0.5 * exp(+ln 2) = 1; f = p/(p+0.1) = 0.5/0.6; sum / 8192; entropy bonus -0.001 * ln 2 as a
    # token-mean (one token), not divided by 8192
    s = PRESETS["srft_code"]()
    b = _one_token(math.log(0.5), math.log(2.0), 1.0, True)
    loss, m = srft_objective(b, s, Normalizers(1, 1, 8192.0))
    expect = (1.0 * math.log(2) - 0.5 / 0.6) / 8192 - 0.001 * math.log(2)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    assert finalize(accumulate({}, m))["w_sft_max"] == pytest.approx(1.0)
    assert finalize(accumulate({}, m))["loss_entropy_bonus"] == pytest.approx(-0.001 * math.log(2), rel=1e-5)


def test_hand_computed_luffy_group():
    # LUFFY's run: one demo token (p = 0.5, A = 0.5) and one rollout token (ratio 2, A = -0.5: no clip), H = 1 on
    # both, two sequences. Terms: demo -A p/(p+0.1) = -0.5 * 0.5/0.6; rollout -ratio A = 1.0. Token sum / 128,
    # mean over the 2 sequences; bonus -0.001 * mean H = -0.001.
    s = PRESETS["luffy"]()
    b = TokenBatch(
        logprob=torch.tensor([math.log(0.5), math.log(0.5)], requires_grad=True),
        entropy=torch.tensor([1.0, 1.0], requires_grad=True),
        old_logprob=torch.tensor([0.0, math.log(0.25)]), advantage=torch.tensor([0.5, -0.5]),
        is_demo=torch.tensor([True, False]), loss_mask=torch.tensor([True, True]), seq_index=torch.tensor([0, 1]),
        seq_num_tokens=torch.tensor([1, 1]))
    loss, m = srft_objective(b, s, Normalizers.for_settings(s, num_tokens=2, num_sequences=2))
    expect = (-0.5 * 0.5 / 0.6 + 1.0) / (2 * 128) - 0.001
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
    assert finalize(accumulate({}, m))["clip_frac"] == 0.0


@pytest.mark.parametrize("aggregation", SEQ_AGGS)
def test_entropy_bonus_is_a_token_mean_under_every_aggregation(aggregation):
    base = dataclasses.replace(PRESETS["srft_code"](), aggregation=aggregation, entropy_bonus=0.0)
    batch = make_batch(21)
    norm = normalizers(batch, base)
    without, _ = srft_objective(batch, base, norm)
    with_bonus, m = srft_objective(batch, dataclasses.replace(base, entropy_bonus=0.01), norm)
    mean_h = batch.entropy.detach()[batch.loss_mask].mean()
    torch.testing.assert_close(with_bonus - without, -0.01 * mean_h, atol=1e-7, rtol=1e-5)
    _, g_ent = grads(with_bonus, batch)
    expect = torch.where(batch.loss_mask, torch.tensor(-0.01 / int(batch.loss_mask.sum())), torch.tensor(0.0))
    torch.testing.assert_close(g_ent, expect, atol=1e-9, rtol=1e-5)


def test_hand_computed_rollout_tokens():
    s = PRESETS["srft"]()
    # positive: ratio 1, A = 1, H = 0 -> w_RL = 0.1 -> loss -0.1, d/dlp = -0.1
    b = _one_token(-1.0, 0.0, 1.0, False)
    loss, _ = srft_objective(b, s, Normalizers(1, 1))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-0.1, abs=1e-6) and float(b.logprob.grad) == pytest.approx(-0.1, abs=1e-6)
    # negative: ratio 0.5, A = -1, clip 0.2 -> -min(-0.5, -0.8) = 0.8, clipped (grad 0), weight 1
    b = _one_token(math.log(0.5), 3.0, -1.0, False, old=0.0)
    loss, m = srft_objective(b, s, Normalizers(1, 1))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.8, abs=1e-6) and float(b.logprob.grad) == 0.0
    assert finalize(accumulate({}, m))["clip_frac"] == 1.0
    # the code preset has no clip: -ratio * A = 0.5, d/dlp = -A * ratio = 0.5
    b = _one_token(math.log(0.5), 3.0, -1.0, False, old=0.0)
    loss, _ = srft_objective(b, PRESETS["srft_code"](), Normalizers(1, 1, 1.0))
    loss = loss - (-0.001 * 3.0)  # remove the entropy bonus
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5, abs=1e-6) and float(b.logprob.grad) == pytest.approx(0.5, abs=1e-6)


def test_masked_only_batch_gives_zero_loss_with_graph():
    b = make_batch(3)
    b.loss_mask = torch.zeros_like(b.loss_mask)
    loss, m = srft_objective(b, PRESETS["srft"](), Normalizers(10, 2))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(b.logprob.grad == 0)


def test_batch_mean_needs_mean_entropy():
    s = dataclasses.replace(PRESETS["srft"](), entropy_granularity="batch_mean")
    with pytest.raises(ValueError, match="mean_entropy"):
        srft_objective(make_batch(0), s, Normalizers(10, 2))


def test_garbage_old_and_engine_logprob_on_demo_tokens_is_ignored():
    s = dataclasses.replace(PRESETS["srft"](), tis_cap=2.0)
    batch = make_batch(4, with_engine=True)
    clean, _ = srft_objective(batch, s, normalizers(batch, s))
    g_clean = grads(clean, batch)
    with torch.no_grad():
        batch.old_logprob[batch.is_demo] = float("-inf")
        batch.engine_logprob[batch.is_demo] = float("nan")
    dirty, _ = srft_objective(batch, s, normalizers(batch, s))
    g_dirty = grads(dirty, batch)
    torch.testing.assert_close(dirty, clean)
    torch.testing.assert_close(g_dirty[0], g_clean[0])
    assert torch.isfinite(g_dirty[0]).all()
