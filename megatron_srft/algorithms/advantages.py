"""Group-relative advantages over the augmented group (rollouts AND demonstrations), one scalar per sequence.

    A_k = (r_k - mean(r_group)) / (std(r_group) + eps)     (std_normalize; paper Eq. 7)
    A_k =  r_k - mean(r_group)                            (no std; released code)

std is the unbiased (Bessel-corrected) sample std, as GRPO implementations use. A group whose members all
have the same reward (including a group of one) gets A = 0 exactly, not a rounding residue.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "group_all_equal"]


def _dense_groups(group_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Arbitrary group ids [N] -> dense ids in [0, num_groups) [N], num_groups."""
    uniq, dense = torch.unique(group_index, return_inverse=True)
    return dense, uniq.numel()


def group_all_equal(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where every member of this sequence's group has the same reward."""
    dense, num_groups = _dense_groups(group_index)
    r = rewards.double()
    hi = torch.full((num_groups,), float("-inf"), dtype=r.dtype).scatter_reduce(0, dense, r, "amax")
    lo = torch.full((num_groups,), float("inf"), dtype=r.dtype).scatter_reduce(0, dense, r, "amin")
    return (hi == lo)[dense]


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, *, std_normalize: bool,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] float, group_index [N] long (members of one prompt's group share an id) -> advantages [N] fp32."""
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)}: "
                         "expected two [N] tensors")
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    dense, num_groups = _dense_groups(group_index)
    r = rewards.double()
    count = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, dense, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, dense, r) / count
    centred = r - mean[dense]
    adv = centred
    if std_normalize:
        # unbiased std: sqrt(sum (r - mean)^2 / (n - 1)); a group of one has no spread (all-equal below)
        sq = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, dense, centred * centred)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        adv = centred / (std[dense] + eps)
    adv = torch.where(group_all_equal(rewards, group_index), torch.zeros_like(adv), adv)
    return adv.float()
