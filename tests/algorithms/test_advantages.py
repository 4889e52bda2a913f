"""Group advantages over the augmented group, against loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_srft.algorithms.advantages import group_advantages, group_all_equal


def reference(rewards, groups, std_normalize, eps):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        if all(m == members[0] for m in members):
            out.append(0.0)
            continue
        if std_normalize:
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
            out.append((r - mean) / (std + eps))
        else:
            out.append(r - mean)
    return out


@pytest.mark.parametrize("std_normalize", [True, False])
def test_matches_loops_with_unordered_group_ids(std_normalize):
    rng = random.Random(0)
    groups = [rng.choice([7, 3, 11, 42, 5]) for _ in range(40)]
    rewards = [float(rng.random() < 0.4) if g != 5 else rng.uniform(0, 1) for g in groups]
    adv = group_advantages(torch.tensor(rewards), torch.tensor(groups), std_normalize=std_normalize, eps=1e-6)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor(reference(rewards, groups, std_normalize, 1e-6)))


def test_all_equal_groups_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # group 0 all equal, group 2 is a single member
    adv = group_advantages(rewards, groups, std_normalize=True, eps=1e-6)
    assert torch.all(adv[[0, 1, 2, 5]] == 0)
    assert adv[3] > 0 > adv[4]
    assert group_all_equal(rewards, groups).tolist() == [True, True, True, False, False, True]


def test_paper_group_of_seven_rollouts_and_a_demo():
    # 7 rollouts all wrong, the demo right: only the demo has a positive advantage
    rewards = torch.tensor([0.0] * 7 + [1.0])
    adv = group_advantages(rewards, torch.zeros(8, dtype=torch.long), std_normalize=False)
    torch.testing.assert_close(adv, torch.tensor([-1 / 8] * 7 + [7 / 8]))


def test_empty_and_bad_shapes():
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), std_normalize=True).numel() == 0
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), std_normalize=True)
