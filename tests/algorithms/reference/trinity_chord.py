# Copyright Trinity-RFT Team (modelscope/Trinity-RFT).
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""TEST ORACLE ONLY (never imported by the package): the minimal parts of Trinity-RFT's CHORD loss, copied from

- https://github.com/modelscope/Trinity-RFT/blob/041433056e9067e35a42a3943ecbaf89bef24518/trinity/algorithm/policy_loss_fn/chord_policy_loss.py
  (mu_schedule_function, phi_function, SFTISLossFn / SFTPhiLossFn.__call__, MIXCHORDPolicyLossFn.__call__)
- https://github.com/modelscope/Trinity-RFT/blob/b458e2c26ff13b2f538ecbc819a2e0a40e98fc73/trinity/algorithm/utils.py
  (masked_mean)
- https://github.com/modelscope/Trinity-RFT/blob/221b0759e0d11c51b1bd3b7512c8b5c6c8431d69/trinity/algorithm/policy_loss_fn/ppo_policy_loss.py
  (PPOPolicyLossFn.__call__, token-mean, without the unused sequence masking)
- https://github.com/modelscope/Trinity-RFT/blob/1542f4bd310f60d7f5afc8f521ee28bddcb3e089/trinity/algorithm/advantage_fn/grpo_advantage.py

Classes are flattened into functions of their constructor arguments; the arithmetic is the released code's.
Tensors are [B, L] (rows x padded response positions) with a 0/1 mask.
"""

import math
from collections import defaultdict

import torch


def masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def mu_schedule_function(global_step, mu_warmup_steps, mu_decay_steps, mu_peak, mu_valley):
    # Warmup
    if global_step < mu_warmup_steps:
        return (global_step / mu_warmup_steps) * mu_peak
    # Decay
    if global_step >= (mu_warmup_steps + mu_decay_steps):
        return mu_valley
    adjusted_step = global_step - mu_warmup_steps
    cosine_decay = 0.5 * (1 + math.cos(math.pi * adjusted_step / mu_decay_steps))
    decayed_mu = (mu_peak - mu_valley) * cosine_decay + mu_valley
    return decayed_mu


def phi_function(token_prob):
    return token_prob * (1 - token_prob)


def sft_loss(logprob, action_mask):  # SFTLossFn, use_token_level_loss=True
    return masked_mean(-logprob, action_mask)


def sft_is_loss(logprob, action_mask):  # SFTISLossFn ("sft_is"), use_token_level_loss=True
    token_prob = torch.exp(logprob)
    return masked_mean(-logprob * token_prob.detach(), action_mask)


def sft_phi_loss(logprob, action_mask, cutoff_prob=1.0):  # SFTPhiLossFn, use_token_level_loss=True
    token_prob = torch.exp(logprob)
    if cutoff_prob < 1.0:
        logprob = torch.clamp(logprob, max=math.log(cutoff_prob))
    weighted_phi = phi_function(token_prob)
    return masked_mean(-logprob * weighted_phi.detach(), action_mask)


def ppo_policy_loss(logprob, old_logprob, action_mask, advantages, clip_range=0.2, clip_ratio_c=3.0):
    negative_approx_kl = logprob - old_logprob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return masked_mean(pg_losses, action_mask)  # loss_agg_mode "token-mean"


def mix_chord_loss(logprob, old_logprob, action_mask, advantages, expert_mask, step, *, mu_warmup_steps,
                   mu_decay_steps, mu_peak, mu_valley, enable_phi_function, clip_range, use_dynamic_bsz,
                   ppo_mini_batch_size, ppo_micro_batch_size_per_gpu, ngpus_trainer, train_batch_size_usual,
                   train_batch_size_expert):
    """MIXCHORDPolicyLossFn.__init__ + __call__ for one micro-batch."""
    experience_per_gpu = ppo_mini_batch_size // ngpus_trainer
    gradient_accumulation = ppo_mini_batch_size // ppo_micro_batch_size_per_gpu
    train_batch_size_usual = train_batch_size_usual // ngpus_trainer
    train_batch_size_expert = train_batch_size_expert // ngpus_trainer
    n_usual_exp = torch.sum(~expert_mask).item()
    n_expert_exp = torch.sum(expert_mask).item()
    if use_dynamic_bsz:
        per_micro_batch_weight_usual = experience_per_gpu / (logprob.shape[0] * train_batch_size_usual)
        per_micro_batch_weight_expert = experience_per_gpu / (logprob.shape[0] * train_batch_size_expert)
    else:
        per_micro_batch_weight_usual = gradient_accumulation / train_batch_size_usual
        per_micro_batch_weight_expert = gradient_accumulation / train_batch_size_expert
    if n_usual_exp > 0:
        grpo_loss = ppo_policy_loss(logprob[~expert_mask], old_logprob[~expert_mask], action_mask[~expert_mask],
                                    advantages[~expert_mask], clip_range=clip_range)
        grpo_loss = grpo_loss * n_usual_exp * per_micro_batch_weight_usual
    else:
        grpo_loss = torch.tensor(0.0, device=logprob.device)
    if n_expert_exp > 0:
        sft_fn = sft_phi_loss if enable_phi_function else sft_loss
        sft = sft_fn(logprob[expert_mask], action_mask[expert_mask])
        sft = sft * n_expert_exp * per_micro_batch_weight_expert
    else:
        sft = torch.tensor(0.0, device=logprob.device)
    mu = mu_schedule_function(step, mu_warmup_steps, mu_decay_steps, mu_peak, mu_valley)
    return (1 - mu) * grpo_loss + mu * sft


def actor_scale(num_rows_in_micro_batch, ppo_mini_batch_size_per_gpu):
    """trinity/trainer/verl/dp_actor.py update_policy with use_dynamic_bsz:
    ``loss = policy_loss * (len(data) / self.config.ppo_mini_batch_size)``."""
    return num_rows_in_micro_batch / ppo_mini_batch_size_per_gpu


def grpo_advantage(scores, index, epsilon=1e-6):
    """GRPOAdvantageFn.__call__ on the outcome scores [B] (one uid per row)."""
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    scores = scores.clone()
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx] = torch.tensor(0.0)
            id2std[idx] = torch.tensor(1.0)
        else:
            id2mean[idx] = torch.mean(torch.tensor(id2score[idx], dtype=torch.float32))
            id2std[idx] = torch.std(torch.tensor([id2score[idx]], dtype=torch.float32))
    for i in range(bsz):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
    return scores
