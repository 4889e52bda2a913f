# Copyright 2024 Bytedance Ltd. and/or its affiliates
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
"""TEST ORACLE ONLY (never imported by the package): DFT's loss, copied from
https://github.com/yongliang-wu/DFT/blob/e153181f71522428ed030f4519702890c699ed6b/verl/verl/trainer/fsdp_dft_trainer.py
(``_compute_loss_and_backward`` L357-372 and L428-436 without sequence parallelism, ``balance_dp_token`` False as
in verl/verl/trainer/config/sft_trainer.yaml; ``training_step`` L453-460 divides by the number of micro-batches).
Logits are [B * (S - 1), V] after the shift, as there.
"""

import torch
from torch import nn


def dft_micro_batch_loss(shift_logits, shift_labels, loss_mask, dp_size=1):
    loss_fct = nn.CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits, shift_labels)
    probs = torch.softmax(shift_logits, dim=-1)
    prob_coefficients = probs.gather(1, shift_labels.unsqueeze(-1)).squeeze(-1)
    loss = loss * prob_coefficients.detach()
    loss = loss * loss_mask.to(loss.device)
    valid_token_this_rank = torch.sum(loss_mask)
    return torch.sum(loss) / (valid_token_this_rank + 1e-8) * dp_size


def dft_step_loss(micro_batches):
    """``training_step``: each micro-batch's loss divided by their number (the sum is the step's loss)."""
    n_micro_batches = len(micro_batches)
    return sum(dft_micro_batch_loss(*mb) / n_micro_batches for mb in micro_batches)
