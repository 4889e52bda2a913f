"""The rollout seam: everything the training loop asks of rollouts, as one protocol.

Per step the loop says, in this order::

    rollouts.generate(request)             # this step's prompts, to be sampled from the policy at request.version
    rollouts.sync(policy, policy.version)  # the trainer's weights at that version
    batch = rollouts.collect(step)         # the step's completions, scored by the verifier (this replica's part)

and, between steps, ``rollouts.sync(policy, policy.version)`` then ``rollouts.evaluate(problems, version=...)``.
The policy version (optimizer steps applied) travels in every call, so an implementation can tell which weights
a sample came from and refuse a mismatch instead of guessing.

Implementations:

- colocated (rollout/service.py, :class:`~megatron_srft.rollout.service.RolloutService`): the engines share the
  trainer's devices. ``generate`` records the request; the engines generate when the results are collected, after
  ``sync``. The tensors of a sync move when the engines next need them (before any update of the trainer, so they
  are the offered version's), and not at all when nothing generates. Device memory is the implementation's
  business: it wakes its engines inside ``collect`` / ``evaluate`` and puts them to sleep
  (``rollout.sleep_level``) before returning, so training always finds the device free.
- disaggregated (rollout/disaggregated.py, :class:`~megatron_srft.rollout.disaggregated.DisaggregatedRollouts`):
  engines on ranks of their own. ``generate`` sends the request to the engines as soon as they are free and hold
  (or can be sent) the request's version; ``sync`` offers the weights that a waiting request needs; ``collect``
  waits for the answer. With ``rollout.max_staleness`` 1 the loop asks for step s + 1 before step s trains, at
  the version step s was sampled with: the engines generate it while step s trains.

Every method is a collective: every rank of the world calls it with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

import torch

from .base import Completion


class WeightSource(Protocol):
    """The trainer's side of a weight sync."""

    @property
    def version(self) -> int:
        """Changes whenever the weights change (the optimizer-step count)."""

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for the whole model; a collective every rank iterates in lockstep."""


@dataclass
class ScoredPrompt:
    """One prompt's results: its completions, their rewards, and the rewards of its demonstrations."""

    completions: list[Completion]
    rewards: list[float]
    demo_rewards: list[float]


@dataclass
class RolloutBatch:
    """This replica's prompts, in order, and the step's rollout metrics (the same on every rank)."""

    prompts: list[ScoredPrompt]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutRequest:
    """One step's generation. ``problems``: the step's GLOBAL prompt list (replica-major, the same on every rank);
    ``replica_slice``: this rank's replica's part of it; ``version``: the policy version the samples must come
    from; ``num_rollouts`` completions per prompt (0: none, only the demonstrations are scored); ``staleness``:
    training steps between that policy and the one that will train on the batch (0 on-policy, 1 one-step-off)."""

    step: int
    problems: Sequence
    replica_slice: slice
    version: int
    num_rollouts: int
    num_demos: int
    staleness: int = 0


class Rollouts(Protocol):
    """What the training loop asks of rollouts (module docstring)."""

    def generate(self, request: RolloutRequest) -> None:
        """Sample ``request.problems`` from the policy at ``request.version``; results come from :meth:`collect`."""

    def sync(self, weights: WeightSource, version: int) -> None:
        """Receive the trainer's weights at ``version`` (``weights.version`` must equal it); nothing moves when the
        engines hold that version already."""

    def collect(self, step: int) -> RolloutBatch:
        """The scored results of ``step``'s request: this replica's prompts, in order, and the rollout metrics."""

    def evaluate(self, problems: Sequence, *, version: Optional[int], n_samples: int, temperature: float,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 keep_records: bool = False) -> tuple[dict[str, float], Optional[list]]:
        """Sample and grade ``problems`` with the policy at ``version`` (None: the engines' own weights, no
        trainer). Returns (``eval/*`` metrics, per-problem records on global rank 0 with ``keep_records``)."""

    def pending(self) -> Optional[bytes]:
        """Batches asked for and not yet collected (one step ahead), once sampled, as bytes the checkpoint keeps;
        None when there are none. A collective that waits for a generation in flight."""

    def restore_pending(self, data: bytes) -> list[int]:
        """A checkpoint's :meth:`pending` batches: their steps are collected without sampling again. Returns
        those steps."""

    def describe(self) -> str:
        """One line for the run's start-up summary (engines, their layout, memory)."""

    def close(self) -> None:
        """Shut the engines and verifiers down."""
