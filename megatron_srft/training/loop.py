"""The SRFT training loop. :func:`train` reads like the algorithm, one line per phase:

    for each step:
        plan     = the step's prompts                   # a pure function of (seed, step); CHORD's expert rows
        rollouts.generate(plan, version)                # sample them from the policy at its version (one-step-off:
                                                        # the next step's too, sampled while this one trains)
        rollouts.sync(policy, version)                  # ... whose weights the rollouts receive
        batch    = rollouts.collect(step)               # completions scored by the verifier
        scored   = route(plan, batch)                   # HPT's gate: a prompt trains on its demo or its rollouts
        samples  = build_groups(scored)                 # + demonstrations, group-normalised advantages
        update(samples)                                 # mini-batches, pi_old, one optimizer step each
        save / evaluate
    export

Set-up (config, world, model and optimizer, problems, run directory, resume, logger, rollouts, stop signals) is
one object, :class:`Run`, built by :func:`start_run`. Rollouts are reached through the rollout seam only
(rollout/seam.py): the colocated service (rollout/service.py) or engines on ranks of their own
(rollout/disaggregated.py; on those ranks :func:`train` serves the engines instead). Every random choice is a
function of (seed, step), and a one-step-off checkpoint keeps the batch sampled ahead, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
import yaml

from ..algorithms.advantages import group_advantages
from ..algorithms.metrics import all_reduce_metrics, finalize
from ..algorithms.presets import AlgoSettings, resolve
from ..checkpoint.atomic import atomic_dir, write_text_atomic
from ..checkpoint.convert import write_hf_model
from ..checkpoint.dist import start_checkpoint_writer
from ..checkpoint.loading import load_initial_weights
from ..checkpoint.manifest import write_manifest
from ..checkpoint.run_dir import plan_run, release_run_dir
from ..checkpoint.training_state import PENDING_ROLLOUTS, load_training_checkpoint, save_training_checkpoint
from ..config import SRFTConfig, to_dict
from ..data.dataset import TokenizedProblem
from ..data.templates import THINKING_TEMPLATES, load_tokenizer
from ..distributed import collectives
from ..distributed.groups import ParallelGroups, Role, init_distributed, init_roles
from ..distributed.layout import (check_micro_batch_memory, config_token_pad_multiple, device_memory_bytes,
                                  resolve_micro_batch_tokens, validate_layout)
from ..errors import ConfigError, SrftError
from ..models.arch import load_arch
from ..models.builder import build_model, build_optimizer
from ..models.mapping import export_hf_weights
from ..rollout.disaggregated import DisaggregatedRollouts, serve
from ..rollout.seam import RolloutRequest, Rollouts, ScoredPrompt
from ..rollout.service import RolloutService
from ..signals import STOP_SIGNALS, RunStopped
from .batch import MiniBatch, Sample, pack_micro_batches
from .metrics import MetricsLogger, PhaseTimer
from .prompts import Problems, PromptSampler, load_problems_for
from .routing import PromptPlan, check_prompt_split, plan_prompts, route_prompts
from .step import forward_logprobs, sync_parameters, train_minibatch

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from transformers import PreTrainedTokenizerBase

    from ..models.builder import ModelHandle


class TrainingError(SrftError):
    """The run cannot continue (e.g. too many consecutive non-finite updates); one line naming the step."""


# --------------------------------------------------------------------------------------------- state


@dataclass
class Policy:
    """The trained model and everything that moves with it. Also the rollouts' WeightSource (rollout/seam.py)."""

    handle: "ModelHandle"
    optimizer: "MegatronOptimizer"  # or its ChainedOptimizer (several model chunks)
    tokenizer: "PreTrainedTokenizerBase"
    model_dir: Path  # HF config + tokenizer (and initial weights) that the rollout engines start from
    groups: ParallelGroups
    micro_batch_tokens: int  # train.micro_batch_tokens with null resolved for this device (distributed/layout.py)
    version: int = 0  # optimizer steps applied: the version the rollouts are asked to sample from

    @property
    def chunks(self) -> list:
        return self.handle.chunks

    @property
    def vocab_size(self) -> int:
        return self.handle.arch.vocab_size

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of the current weights; a collective every rank iterates in lockstep."""
        sync_parameters(self.chunks)
        with torch.no_grad():
            yield from export_hf_weights(self.chunks, self.handle.arch, self.groups)


# --------------------------------------------------------------------------------------------- set-up


def build_policy(cfg: SRFTConfig, groups: ParallelGroups) -> Policy:
    model_dir = Path(cfg.model.path)
    if not cfg.model.path or not model_dir.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory (an HF model or a converted checkpoint)")
    arch = load_arch(model_dir)
    # Every layout rule against the world and the model's shapes, once, before anything is built.
    validate_layout(cfg, groups.world_size + cfg.rollout.num_engine_ranks, arch)  # the launched world
    on_gpu = torch.cuda.is_available()
    memory = device_memory_bytes(on_gpu, ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    micro_tokens = resolve_micro_batch_tokens(cfg, arch, on_gpu, memory, groups.world_size)
    warning = check_micro_batch_memory(cfg, arch, micro_tokens, on_gpu, memory, groups.world_size)
    if warning and groups.rank == 0:
        print(f"[srft] warning: {warning}", flush=True)
    handle = build_model(arch, cfg.model, cfg.parallel)
    load_initial_weights(handle, model_dir, groups)
    # After the weights: the optimizer copies its fp32 master weights from the model when it is built.
    optimizer = build_optimizer(handle, cfg.optimizer, cfg.model, cfg.parallel)
    tokenizer = load_tokenizer(model_dir)
    return Policy(handle=handle, optimizer=optimizer, tokenizer=tokenizer, model_dir=model_dir, groups=groups,
                  micro_batch_tokens=micro_tokens)


# --------------------------------------------------------------------------------------------- the steps


def build_groups(problems: Sequence[TokenizedProblem], scored: Sequence[ScoredPrompt], settings: AlgoSettings,
                 group_offset: int) -> tuple[list[Sample], dict]:
    """Samples of the augmented groups (rollouts + demos) with group-normalised advantages, and their metrics as
    (sum, count) pairs. ``scored[i]``: problem i's ScoredPrompt (completions, rewards, demo rewards)."""
    samples, rewards, group_ids = [], [], []
    for g, (p, sp) in enumerate(zip(problems, scored)):
        gid = group_offset + g
        for c, r in zip(sp.completions, sp.rewards):
            if not c.token_ids:
                continue  # an empty completion has no token to learn from
            samples.append(Sample(prompt_ids=list(p.prompt_ids), response_ids=list(c.token_ids), advantage=0.0,
                                  is_demo=False, group=gid, reward=float(r), engine_logprobs=list(c.logprobs)))
            rewards.append(float(r))
            group_ids.append(gid)
        for r in sp.demo_rewards:
            samples.append(Sample(prompt_ids=list(p.prompt_ids), response_ids=list(p.demo_ids), advantage=0.0,
                                  is_demo=True, group=gid, reward=float(r)))
            rewards.append(float(r))
            group_ids.append(gid)
    if not samples:
        return samples, {}
    # The augmented group: demos join the rollouts' reward statistics unless the preset keeps them out
    # (sft_plus_rl), in which case demos carry A = 0 (their RL term is off there).
    members = [i for i, s in enumerate(samples) if settings.demos_in_group or not s.is_demo]
    if members:
        adv = group_advantages(torch.tensor([rewards[i] for i in members], dtype=torch.float64),
                               torch.tensor([group_ids[i] for i in members]),
                               std_normalize=settings.std_normalize, eps=settings.adv_eps)
        for i, a in zip(members, adv.tolist()):
            samples[i].advantage = a
    roll = [s for s in samples if not s.is_demo]
    demos = [s for s in samples if s.is_demo and not math.isnan(s.reward)]  # expert rows are not scored
    per_group: dict[int, list[float]] = {}
    for s in samples:
        per_group.setdefault(s.group, []).append(s.reward)
    stats = {
        "reward/mean": (sum(s.reward for s in roll), len(roll)),
        "accuracy/rollout": (sum(s.reward > 0.5 for s in roll), len(roll)),
        "accuracy/demo": (sum(s.reward > 0.5 for s in demos), len(demos)),
        "response/length_mean": (sum(len(s.response_ids) for s in roll), len(roll)),
        "response/truncated_fraction": (sum(c.finish_reason == "length" for sp in scored for c in sp.completions),
                                        sum(len(sp.completions) for sp in scored)),
        "groups/all_equal_fraction": (sum(len(set(v)) == 1 for v in per_group.values()), len(per_group)),
    }
    return samples, stats


def reduce_stats(stats: dict, groups: ParallelGroups) -> dict[str, float]:
    """(sum, count) pairs -> values over all DP ranks, through the one metric reduction (algorithms/metrics.py)."""
    sums = {k: (torch.tensor(float(s)), torch.tensor(float(c))) for k, (s, c) in stats.items()}
    return finalize(all_reduce_metrics(sums, groups.dp_group if groups.dp_size > 1 else None))


def split_minibatches(samples: Sequence[Sample], num_minibatches: int, micro_batch_tokens: int, packing: bool,
                      pad_to_multiple: int = 1) -> list[MiniBatch]:
    """Groups stay whole; each mini-batch is packed into micro-batches, every one padded to ``pad_to_multiple``
    tokens (distributed.layout.token_pad_multiple)."""
    by_group: dict[int, list] = {}
    for s in samples:
        by_group.setdefault(s.group, []).append(s)
    gids = sorted(by_group)
    per = max(1, math.ceil(len(gids) / num_minibatches))
    out = []
    for i in range(0, len(gids), per):
        ss = [s for g in gids[i:i + per] for s in by_group[g]]
        out.append(MiniBatch(pack_micro_batches(ss, micro_batch_tokens, packing=packing,
                                                pad_to_multiple=pad_to_multiple)))
    return out


def attach_old_logprobs(policy: Policy, minibatches: Sequence[MiniBatch], settings: AlgoSettings,
                        source: str = "recompute") -> None:
    """pi_old on every rollout token, computed where it carries information.

    ``recompute``: the first mini-batch is trained before any update of this rollout batch, so its pi_old is its
    own training forward's log-prob, detached (``old_logprob = None``; training/step.py token_batch): no extra
    pass, and with one optimizer step per rollout batch none at all. Later mini-batches need the pre-update policy:
    one forward-only pass over them, now. ``engine``: pi_old is the engine's log-prob everywhere; no pass. Presets
    without rollouts have no ratio to compute: no pass.
    """
    if source == "engine":
        for minibatch in minibatches:
            for mb in minibatch.micro_batches:
                mb.old_logprob, mb.old_from_engine = mb.engine_logprob, mb.engine_logprob is not None
        return
    for minibatch in minibatches[:1]:
        for mb in minibatch.micro_batches:
            mb.old_logprob = None
    if not settings.use_rollouts:
        return
    later = [mb for minibatch in minibatches[1:] for mb in minibatch.micro_batches]
    for mb, (lp, _ent) in zip(later, forward_logprobs(policy.chunks, later, policy.groups, policy.vocab_size)):
        mb.old_logprob = lp.detach()


def lr_at(cfg: SRFTConfig, opt_step: int, total_opt_steps: int) -> float:
    o = cfg.optimizer
    if o.warmup_steps and opt_step < o.warmup_steps:
        return o.lr * (opt_step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return o.lr
    frac = min(1.0, (opt_step - o.warmup_steps) / max(1, total_opt_steps - o.warmup_steps))
    if o.lr_schedule == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - frac)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def update_policy(policy: Policy, minibatches: Sequence[MiniBatch], settings: AlgoSettings, cfg: SRFTConfig,
                  step: int) -> dict:
    """One optimizer step per mini-batch; the policy's version moves on with every applied step."""
    settings = settings.at_step(step)  # the step's SFT mix (CHORD's mu), when the preset has one
    num_mb = len(minibatches)
    total = cfg.train.num_steps * num_mb
    merged: dict = {}
    for i, minibatch in enumerate(minibatches):
        lr = lr_at(cfg, (step - 1) * num_mb + i, total)
        for g in policy.optimizer.param_groups:
            g["lr"] = lr
        out = train_minibatch(policy.chunks, policy.optimizer, minibatch.micro_batches, settings, policy.groups,
                              policy.vocab_size)
        if not out["num_skipped"]:
            policy.version += 1
        for k, v in out.items():
            merged.setdefault(_metric_name(k), []).append(float(v))
        merged.setdefault("optim/lr", []).append(lr)
    result = {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in merged.items()}
    result["optim/num_skipped"] = sum(merged.get("optim/num_skipped", [0.0]))
    return result


def _metric_name(key: str) -> str:
    """The loss adapter's flat names -> the run's namespaced metric names (loss_sft -> loss/sft, ...)."""
    for prefix, space in (("loss_", "loss/"), ("entropy_", "entropy/"), ("w_", "weight/"),
                          ("mismatch_", "mismatch/")):
        if key.startswith(prefix):
            return space + key[len(prefix):]
    return {"loss": "loss/minibatch", "grad_norm": "optim/grad_norm",
            "num_skipped": "optim/num_skipped"}.get(key, f"train/{key}")


# --------------------------------------------------------------------------------------------- the run


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption, signals.STOP_SIGNALS) -> no new step; checkpoint the last finished
    step, then end the run with :class:`~megatron_srft.signals.RunStopped`. Read before each step's rollouts and
    after its update, so a signal that arrives during a save or an evaluation does not start another step."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self.signal_name = "a signal on another rank"  # until this rank receives one itself
        self._previous: dict = {}  # the handlers before the run's, put back by restore()
        if enabled:
            for sig in STOP_SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):  # not the main thread
                    pass

    def restore(self) -> None:
        """The handlers from before the run: a process that trains again (the demo, a study worker) or goes on
        after a run must not keep ignoring SIGTERM through a finished run's flag."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank received the signal (a collective)."""
        return collectives.agree(self.requested)


@dataclass
class Run:
    """Everything a training run holds between its steps; built by :func:`start_run`, closed by ``with``."""

    cfg: SRFTConfig
    groups: ParallelGroups
    settings: AlgoSettings
    policy: Policy
    problems: Problems
    sampler: PromptSampler
    rollouts: Rollouts
    logger: MetricsLogger
    stop: _StopFlag
    run_dir: Path
    run_id: str
    start_step: int  # the checkpoint's step on a resume, else 0
    pad_multiple: int  # every micro-batch's token multiple (distributed.layout.token_pad_multiple)
    last_saved: Optional[Path] = None  # the newest checkpoint
    saved_step: Optional[int] = None  # its step
    stopped_at: Optional[int] = None  # the last finished step, once a stop signal ended the run
    consecutive_skips: int = 0
    requested: set = field(default_factory=set)  # steps whose batches were asked for

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.rollouts.close()
        except Exception:  # noqa: BLE001 - the run's own error is the one to report, not the shutdown's after it
            if exc is None:  # (a failed engine rank breaks both the step and the stop command that follows)
                raise
        finally:
            self.logger.close()
            self.stop.restore()
            release_run_dir(self.run_dir)  # the next run in this process (or another process) may take it
        return False

    # -- the phases

    def prompts(self, step: int) -> PromptPlan:
        """The step's prompts (every replica's, replica-major) less CHORD's expert rows, which get no rollouts."""
        step_problems = [self.problems.train[i] for i in self.sampler.step_indices(step)]
        return plan_prompts(step_problems, self.sampler.replica_slice(), self.groups.dp_size, self.settings)

    def generate(self, step: int) -> None:
        """Ask the rollouts for the batches of ``step`` and, with ``rollout.max_staleness`` 1, of the next step, at
        the policy's version now: that one is then sampled while this one trains (rollout/disaggregated.py)."""
        last = min(step + self.cfg.rollout.max_staleness, self.cfg.train.num_steps)
        for s in range(step, last + 1):
            if s not in self.requested:
                self.requested.add(s)
                self.rollouts.generate(self.request(s, self.prompts(s), staleness=s - step))

    def request(self, step: int, plan: PromptPlan, staleness: int = 0) -> RolloutRequest:
        num_rollouts = self.cfg.rollout.num_rollouts_per_prompt if self.settings.use_rollouts else 0
        return RolloutRequest(step=step, problems=plan.generate, replica_slice=plan.generate_slice,
                              version=self.policy.version, num_rollouts=num_rollouts,
                              num_demos=self.settings.num_demos, staleness=staleness)

    def advantages(self, step: int, scored: list[ScoredPrompt]) -> tuple[list[Sample], dict]:
        """This replica's groups (its prompts of the step, expert rows included, in order) with their advantages."""
        mine = [self.problems.train[i] for i in self.sampler.indices(step)]
        return build_groups(mine, scored, self.settings, group_offset=self.groups.dp_rank * len(mine))

    def update(self, step: int, samples: list[Sample], timer: PhaseTimer) -> dict:
        """Mini-batches of whole groups, their pi_old, one optimizer step each; stops the run after too many
        consecutive skipped (non-finite) updates."""
        cfg = self.cfg
        minibatches = split_minibatches(samples, cfg.train.prompts_per_step // cfg.train.prompts_per_minibatch,
                                        self.policy.micro_batch_tokens, cfg.train.sequence_packing, self.pad_multiple)
        with timer("old_logprob"):
            attach_old_logprobs(self.policy, minibatches, self.settings, cfg.train.old_logprobs)
        with timer("train"):
            metrics = update_policy(self.policy, minibatches, self.settings, cfg, step)
        self.consecutive_skips = self.consecutive_skips + 1 if metrics["optim/num_skipped"] > 0 else 0
        return metrics

    def check_skips(self, step: int) -> None:
        if self.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise TrainingError(f"step {step}: {self.consecutive_skips} consecutive steps had a non-finite loss or "
                                f"gradient and were skipped (train.max_consecutive_skips); the last checkpoint "
                                f"is {self.last_saved}")

    def log(self, step: int, t0: float, timer: PhaseTimer, num_tokens: int, *parts: dict) -> dict:
        metrics: dict = {}
        for part in parts:
            metrics.update(part)
        metrics.update(timer.as_metrics())
        metrics["perf/tokens_per_s"] = num_tokens * self.groups.dp_size / max(time.perf_counter() - t0, 1e-9)
        metrics["time/step"] = time.perf_counter() - t0
        self.logger.log(step, metrics)
        return metrics

    def save_due(self, step: int, last: bool) -> bool:
        """On schedule, or at the end. A step whose update was skipped is not checkpointed on schedule (the next
        good step is), only when the run ends."""
        every = self.cfg.checkpoint.save_every
        return last or bool(every and step % every == 0 and not self.consecutive_skips)

    def save(self, step: int, *, rotate: bool = True) -> None:
        """``rotate=False`` (the stop signal's save): older checkpoints stay until the next save's rotation, so
        the shutdown window holds nothing but the write itself."""
        sync_parameters(self.policy.chunks)  # every shard current before it is written
        meta = {"params_dtype": self.cfg.model.params_dtype, "config": to_dict(self.cfg), "run_id": self.run_id}
        pending = self.rollouts.pending()  # one-step-off: the next step's batch, sampled already, saved with it
        self.last_saved = save_training_checkpoint(
            self.run_dir, step, self.policy.chunks, self.policy.optimizer, data_cursor=self.sampler.cursor(step),
            metadata=meta, keep_last=self.cfg.checkpoint.keep_last if rotate else 0, rank=self.groups.rank,
            arch=self.policy.handle.arch, extra_files={PENDING_ROLLOUTS: pending} if pending else None)
        self.saved_step = step

    def end_by_signal(self, step: int) -> None:
        """The stop signal's end: ``step`` (the last finished one) checkpointed unless it is already; no
        evaluation, export or rotation in the shutdown window."""
        if step > 0 and self.saved_step != step:
            self.save(step, rotate=False)
        self.stopped_at = step

    def eval_due(self, step: int, last: bool) -> bool:
        every = self.cfg.train.eval_every
        if step == 0:
            return bool(self.problems.eval and every)
        return bool(self.problems.eval) and (bool(every and step % every == 0) or last)

    def evaluate(self, step: int) -> dict:
        """The rollouts receive the policy's weights and evaluate it; logged at ``step``."""
        t0 = time.perf_counter()
        self.rollouts.sync(self.policy, self.policy.version)
        metrics, _ = self.rollouts.evaluate(self.problems.eval, version=self.policy.version,
                                            n_samples=self.cfg.train.eval_n_samples,
                                            temperature=self.cfg.train.eval_temperature)
        self.logger.log(step, metrics if step == 0 else {**metrics, "time/eval": time.perf_counter() - t0})
        return metrics

    def finish(self, completed: bool) -> None:
        """The final export, only after the last step (never inside a pre-emption's shutdown window: a signal
        that came during the last evaluation leaves it to the requeued job, which finds the final checkpoint)."""
        if not (completed and self.cfg.checkpoint.export_hf):
            return
        if self.stop.agreed():
            self.stopped_at = self.cfg.train.num_steps
        else:
            export_final_hf(self.policy, self.run_dir / "hf", self.cfg.model.params_dtype)

    def raise_if_stopped(self) -> None:
        if self.stopped_at is not None:
            raise RunStopped(self.stopped_at, self.stop.signal_name, self.last_saved)


def start_run(cfg: SRFTConfig, groups: Optional[ParallelGroups] = None, engine_factory=None,
              role: Optional[Role] = None) -> Run:
    """Everything before the first step: the world, the checked config, the algorithm's settings, the run
    directory's plan (fresh or resumed), the policy (model, optimizer, tokenizer) and its checkpoint, the problems,
    the logger, the rollouts, and the stop-signal handlers. ``role``: a disaggregated run's training side
    (distributed/groups.py ``init_roles``)."""
    groups = groups or init_distributed(cfg.parallel, seed=cfg.train.seed)
    cfg.validate()  # evaluation settings included: checked now, not at the first evaluation hours later
    settings = resolve(cfg.algorithm, tis_cap=cfg.rollout.effective_tis_cap)
    check_prompt_split(settings, cfg.train.prompts_per_step, groups.dp_size)
    with contextlib.ExitStack() as undo:  # a start that fails part-way releases what it took; Run owns it after
        run = _start(cfg, groups, settings, engine_factory, role, undo)
        undo.pop_all()
    return run


def _start(cfg: SRFTConfig, groups: ParallelGroups, settings: AlgoSettings, engine_factory, role: Optional[Role],
           undo: contextlib.ExitStack) -> Run:
    plan = plan_run(cfg.run_dir, cfg.checkpoint.resume, to_dict(cfg), cfg.checkpoint.allow_changes,
                    rank=groups.rank, world=groups.world_size)
    undo.callback(release_run_dir, cfg.run_dir)
    policy = build_policy(cfg, groups)
    problems = load_problems_for(cfg, policy.tokenizer, need_demos=settings.num_demos > 0)
    sampler = PromptSampler(len(problems.train), cfg.train.prompts_per_step, seed=cfg.data.seed,
                            shuffle=cfg.data.shuffle, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    run_dir = Path(cfg.run_dir)
    logger = MetricsLogger(run_dir, enabled=groups.is_logging_rank, total_steps=cfg.train.num_steps,
                           logging_cfg=cfg.logging, run_config=to_dict(cfg), run_id=plan.run_id)
    undo.callback(logger.close)
    start_step = 0
    if plan.resume_from is not None:
        start_step = load_training_checkpoint(plan.resume_from, policy.chunks, policy.optimizer, rank=groups.rank,
                                              verified=True).step
        policy.version = start_step  # any value that differs from the engines' (they start with dummy weights)
    # A fresh start begins a fresh metrics.jsonl; a resume drops the lines of steps after its checkpoint.
    logger.truncate_after(start_step if plan.resume_from is not None else -1)
    if groups.is_logging_rank:
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # The helper processes (the checkpoint writer's queue, the reward pool's workers) start while the stop signals
    # are ignored (signals.children_ignore_stop_signals); they start before the run's handlers exist, so a signal
    # can not fall into that window at start-up.
    start_checkpoint_writer()
    if role is not None:
        rollouts: Rollouts = DisaggregatedRollouts(cfg, groups, role, policy)
    else:
        rollouts = RolloutService(cfg, groups, str(policy.model_dir), policy.tokenizer, policy,
                                  need_engine=settings.use_rollouts or bool(problems.eval), arch=policy.handle.arch,
                                  require_think=cfg.data.template in THINKING_TEMPLATES, engine_factory=engine_factory)
    undo.callback(rollouts.close)
    if plan.resume_from is not None and (plan.resume_from / PENDING_ROLLOUTS).is_file():
        restored = rollouts.restore_pending((plan.resume_from / PENDING_ROLLOUTS).read_bytes())
        if not restored and groups.rank == 0:
            print(f"[srft] note: {plan.resume_from / PENDING_ROLLOUTS} (a batch sampled one step ahead) is not used "
                  "by this on-policy run; its step is sampled again", flush=True)
    stop = _StopFlag(cfg.checkpoint.save_on_signal)
    undo.callback(stop.restore)
    run = Run(cfg=cfg, groups=groups, settings=settings, policy=policy, problems=problems, sampler=sampler,
              rollouts=rollouts, logger=logger, stop=stop, run_dir=run_dir, run_id=plan.run_id,
              start_step=start_step, pad_multiple=config_token_pad_multiple(cfg.parallel, cfg.model),
              last_saved=plan.resume_from, saved_step=start_step if plan.resume_from is not None else None)
    if groups.is_logging_rank:
        print(_startup_summary(run), flush=True)
    return run


def _startup_summary(run: Run) -> str:
    cfg, groups, problems, p = run.cfg, run.groups, run.problems, run.cfg.parallel
    lines = [
        f"[srft] {len(problems.train)} training problems ({problems.num_filtered} dropped by the length filters), "
        f"{len(problems.eval)} eval problems ({problems.num_eval_filtered} dropped); preset {cfg.algorithm.preset}",
        f"[srft] world {groups.world_size + cfg.rollout.num_engine_ranks}: "
        f"{f'{groups.world_size} training ranks at ' if cfg.rollout.num_engine_ranks else ''}"
        f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x DP {groups.dp_size}{' + SP' if p.sequence_parallel else ''}"
        f"{f' + {cfg.rollout.num_engine_ranks} engine ranks' if cfg.rollout.num_engine_ranks else ''}; "
        f"micro-batch {run.policy.micro_batch_tokens} "
        f"tokens{' (resolved for the device)' if cfg.train.micro_batch_tokens is None else ''} (padded to multiples "
        f"of {run.pad_multiple})",
        f"[srft] rollouts: {run.rollouts.describe()}",
    ]
    lines += [f"[srft] {note}" for note in problems.drop_notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the loop


def train(cfg: SRFTConfig, *, groups: Optional[ParallelGroups] = None, stop_after: Optional[int] = None,
          engine_factory=None) -> dict:
    """Run training; returns the last step's metrics. ``stop_after`` ends early (tests of resume/kill);
    ``engine_factory`` builds the rollout engines (tests wrap the real one). A stop signal (``_StopFlag``) ends
    the run with :class:`~megatron_srft.signals.RunStopped` after its checkpoint: a stopped run never returns
    as if it had finished."""
    metrics: dict = {}
    role = None
    if groups is None and cfg.rollout.placement == "disaggregated":
        role = init_roles(cfg.rollout, cfg.parallel)  # the launched world splits: these ranks train, those generate
        if role.is_engine:
            return serve(cfg, role)
    with start_run(cfg, groups, engine_factory, role) as run:
        completed = run.start_step == cfg.train.num_steps
        if run.start_step == 0 and run.eval_due(0, False):
            metrics = run.evaluate(0)
        for step in range(run.start_step + 1, cfg.train.num_steps + 1):
            if run.stop.agreed():  # the signal came during the previous step's save or evaluation: no new step
                run.end_by_signal(step - 1)
                break
            timer, t0, last = PhaseTimer(), time.perf_counter(), step == cfg.train.num_steps
            plan = run.prompts(step)                                             # prompts
            with timer("rollout"):
                run.generate(step)                                               # generate (policy version)
                run.rollouts.sync(run.policy, run.policy.version)                # sync the weights
                batch = run.rollouts.collect(step)                               # score (verifier rewards)
            scored, route_stats = route_prompts(plan, batch.prompts, run.settings)  # route (CHORD, HPT)
            samples, stats = run.advantages(step, scored)                        # groups + advantages
            train_metrics = run.update(step, samples, timer)                     # update
            metrics = run.log(step, t0, timer, sum(s.num_tokens for s in samples),
                              reduce_stats({**stats, **route_stats}, run.groups), batch.metrics, train_metrics)
            run.check_skips(step)
            if run.stop.agreed():  # the signal's save: no evaluation, export or rotation in the shutdown window
                run.end_by_signal(step)
                break
            if run.save_due(step, last):
                run.save(step)                                                   # save
            if stop_after is not None and step >= stop_after:
                break
            if run.eval_due(step, last):
                metrics.update(run.evaluate(step))                               # evaluate
            completed = last
        run.finish(completed)                                                    # export
    run.raise_if_stopped()
    return metrics


def export_final_hf(policy: Policy, out_dir: Path, params_dtype: str) -> None:
    """Collective: the live model as an HF directory through the one HF export (checkpoint/convert.py
    ``write_hf_model``), written by rank 0 into a temporary sibling and renamed when complete."""
    items = policy.export()  # parameters made current first (overlapped param gather)
    if policy.groups.rank == 0:
        with atomic_dir(out_dir) as tmp:  # a failed export leaves no temporary directory behind
            write_hf_model(tmp, items, policy.handle.arch, params_dtype, [policy.model_dir])
            write_manifest(tmp)  # last: sizes + CRC-32 of every file (checkpoint/manifest.py)
    else:
        for _ in items:
            pass
    collectives.barrier()
