# Copyright 2024 Bytedance Ltd. and/or its affiliates
# Copyright 2025 TsinghuaC3I (Unify-Post-Training, MIT License)
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
"""TEST ORACLE ONLY (never imported by the package): the minimal parts of HPT's released code, copied from
https://github.com/TsinghuaC3I/Unify-Post-Training at commit ae332f5fa4dc8b4c3d3cd77ebc9cff3a3abab2d0:

- hpt/verl/verl/utils/torch_functional.py L107-109 (masked_mean)
- hpt/verl/verl/mix_src/mix_core_alg.py L7-10 (compute_sft_pure_loss)
- hpt/verl/verl/trainer/ppo/core_algos.py L285-324 (compute_policy_loss, without its debug print)
- hpt/verl/verl/mix_src/mix_actor.py L135-165, L436, L460, L477 (the ``offline_loss_type == "sft"`` branch of
  update_policy for one micro-batch, with ``use_adaptive_temperature`` and the KL terms off as the scripts set them)
- hpt/verl/verl/mix_src/mix_trainer.py L394-407 (select_on_off_ada_balance, ``unify_strategy == 'switch'``)
"""

import torch


def masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def compute_sft_pure_loss(log_prob, eos_mask):
    sft_losses = -log_prob
    sft_loss = masked_mean(sft_losses, eos_mask)
    return sft_loss


def compute_policy_loss(old_log_prob, log_prob, advantages, eos_mask, cliprange, loss_remove_token_mean=False,
                        loss_remove_clip=False):
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    if loss_remove_clip is False:
        pg_losses = torch.max(pg_losses, pg_losses2)
    if loss_remove_token_mean is True:
        pg_loss = (pg_losses * eos_mask).sum() / eos_mask.shape[-1]
    else:
        pg_loss = masked_mean(pg_losses, eos_mask)
    return pg_loss


def actor_micro_batch_loss(log_prob, old_log_prob, advantages, response_mask, prefix_mask, entropy, *,
                           clip_ratio, entropy_coeff, sft_loss_coef, loss_remove_token_mean, loss_remove_clip,
                           gradient_accumulation):
    off_policy_mask = prefix_mask.any(-1)
    sft_loss = compute_sft_pure_loss(log_prob=log_prob[off_policy_mask], eos_mask=response_mask[off_policy_mask])
    on_policy_mask = ~off_policy_mask
    pg_loss = compute_policy_loss(old_log_prob=old_log_prob[on_policy_mask], log_prob=log_prob[on_policy_mask],
                                  advantages=advantages[on_policy_mask], eos_mask=response_mask[on_policy_mask],
                                  cliprange=clip_ratio, loss_remove_token_mean=loss_remove_token_mean,
                                  loss_remove_clip=loss_remove_clip)
    if not torch.isnan(sft_loss):
        pg_loss = sft_loss * sft_loss_coef + pg_loss
    entropy_loss = masked_mean(entropy, response_mask)
    policy_loss = pg_loss - entropy_loss * entropy_coeff
    return policy_loss / gradient_accumulation


def select_on_off_ada_balance(on_solve_num, switch_gate, switch_gate_off):
    on_add_num = 0
    if on_solve_num <= switch_gate:
        on_remove_num = 8
        off_add_num = 1
    elif on_solve_num <= switch_gate_off:
        on_remove_num = 8
        off_add_num = -1
    else:
        on_remove_num = 0
        off_add_num = 0
    return on_remove_num, on_add_num, off_add_num
