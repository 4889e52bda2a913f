"""A run's problems and which of them each step uses: the training and evaluation files tokenized and
length-filtered once (:func:`load_problems_for`), and the step's prompts as a pure function of (seed, step)
(:class:`PromptSampler`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import SRFTConfig
from ..data.dataset import TokenizedProblem, load_problems, tokenize_problems
from ..errors import ConfigError


@dataclass
class Problems:
    train: list[TokenizedProblem]
    eval: list[TokenizedProblem]
    num_filtered: int = 0
    num_eval_filtered: int = 0
    drop_notes: list = dataclasses.field(default_factory=list)  # one line per file that lost problems, and why


def load_problems_for(cfg: SRFTConfig, tokenizer, *, need_demos: bool) -> Problems:
    notes: list[str] = []

    def load(files, require_demo):
        out, dropped = [], 0
        for f in files:
            probs = load_problems(f, require_demo=require_demo)
            toks = tokenize_problems(probs, tokenizer, cfg.data.template, cfg.data.max_prompt_length,
                                     cfg.data.max_response_length)
            dropped += len(probs) - len(toks)
            if toks.drop_summary():
                notes.append(f"{f}: {toks.drop_summary()}")
            out.extend(toks)
        return out, dropped

    if not cfg.data.train_files:
        raise ConfigError("data.train_files: expected at least one .jsonl or .parquet file")
    train, dropped = load(cfg.data.train_files, need_demos)
    if not train:
        raise ConfigError(f"data.train_files: no usable problems after length filters ({dropped} dropped)")
    evals, eval_dropped = load(cfg.data.eval_files, False)
    if cfg.data.eval_files and not evals:
        raise ConfigError(f"data.eval_files: no usable problems after length filters ({eval_dropped} dropped)")
    return Problems(train=train, eval=evals, num_filtered=dropped, num_eval_filtered=eval_dropped,
                    drop_notes=notes)


class PromptSampler:
    """Which problems step s uses: epoch-wise seeded permutations, a pure function of (seed, step).

    The step's prompts form one global list; DP replica d owns its d-th contiguous block (replica-major).
    """

    def __init__(self, num_problems: int, prompts_per_step: int, *, seed: int, shuffle: bool, dp_rank: int,
                 dp_size: int) -> None:
        self.num_problems, self.per_step = num_problems, prompts_per_step
        self.seed, self.shuffle, self.dp_rank, self.dp_size = seed, shuffle, dp_rank, dp_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_problems)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_problems)

    def step_indices(self, step: int) -> list[int]:
        """Global problem indices of ``step`` (1-based), all replicas, replica-major."""
        start = (step - 1) * self.per_step
        orders: dict[int, np.ndarray] = {}  # one permutation per epoch the step touches (at most two)
        out = []
        for i in range(start, start + self.per_step):
            epoch = i // self.num_problems
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            out.append(int(orders[epoch][i % self.num_problems]))
        return out

    def replica_slice(self) -> slice:
        """This rank's replica's block of :meth:`step_indices`."""
        share = self.per_step // self.dp_size
        return slice(self.dp_rank * share, (self.dp_rank + 1) * share)

    def indices(self, step: int) -> list[int]:
        """This replica's problem indices for ``step``."""
        return self.step_indices(step)[self.replica_slice()]

    def cursor(self, step: int) -> int:
        return step * self.per_step
