"""Rollout placement (pure): engines, shares, the shipped layouts; the exchange codec; the impossible layouts."""

from __future__ import annotations

import pytest

from megatron_srft.rollout.base import Completion
from megatron_srft.rollout.placement import Placement, megatron_replica_of_rank
from megatron_srft.rollout.seam import ScoredPrompt
from megatron_srft.rollout.service import decode, encode, step_seed


def test_every_rank_in_one_engine_and_balanced_shares():
    p = Placement(2, megatron_replica_of_rank(8, tp=2, pp=1))
    assert p.num_engines == 4 and [p.engine_of(g) for g in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p.leader(e) for e in range(4)] == [0, 2, 4, 6] and p.is_leader(4) and not p.is_leader(5)
    for n in (0, 3, 8, 13):
        shares = p.shares(n)
        assert sorted(g for s in shares for g in s) == list(range(n))  # every item exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="does not divide"):
        Placement(3, megatron_replica_of_rank(8, tp=2, pp=1))


@pytest.mark.parametrize("world,tp,pp,rollout_tp", [
    (32, 2, 1, 1),  # qwen2.5-math-7b-srft: 32 engines, 2 per replica
    (32, 4, 2, 4),  # qwen2.5-32b-srft: 8 engines, 2 per replica
    (64, 8, 4, 8),  # llama3.1-70b-srft: 8 engines, 4 per replica
])
def test_shipped_layouts_generate_each_replicas_prompts_on_its_own_engines(world, tp, pp, rollout_tp):
    replica = megatron_replica_of_rank(world, tp, pp)
    p = Placement(rollout_tp, replica)
    dp = world // (tp * pp)
    assert p.num_engines == world // rollout_tp  # every GPU generates
    prompts_per_step = 128
    per_replica = prompts_per_step // dp
    for e, share in enumerate(p.shares(prompts_per_step)):
        engine_replicas = {replica[g] for g in p.engine_ranks(e)}
        assert len(engine_replicas) == 1  # an engine lies inside one model replica
        (d,) = engine_replicas
        assert all(g // per_replica == d for g in share)  # ... and serves that replica's prompts
        assert len(share) == prompts_per_step // p.num_engines


def test_engine_spanning_replicas_still_serves_everything():
    # DP 2 at TP 1 with rollout TP 2: one engine holds both replicas' ranks
    p = Placement(2, megatron_replica_of_rank(2, tp=1, pp=1))
    assert p.num_engines == 1 and p.shares(4) == [range(0, 4)]
    assert "engine 0: ranks 0-1 (replica 0, 1)" == p.describe()


def test_exchange_codec_round_trip():
    items = [ScoredPrompt([Completion([5, 6, 7], [-0.5, -1.25, -2.0], "stop"), Completion([], [], "length")],
                          [1.0, 0.0], [1.0]),
             ScoredPrompt([], [], [0.0, 1.0]),
             ScoredPrompt([Completion([9], [-3.0], "length")], [0.5], [])]
    got, extra = decode(*encode(items, [3.0, 1.5]))
    assert extra == [3.0, 1.5]
    assert got == items
    assert decode(*encode([], []))[0] == []


def test_seeds_depend_on_step_not_on_engines():
    assert step_seed(0, 1) != step_seed(0, 2) and step_seed(5, 3) - step_seed(0, 3) == 5
