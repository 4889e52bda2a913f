"""The SRFT training loop. It reads like the algorithm:

    for each step:
        problems = the step's prompts                   # a pure function of (seed, step); replica-major
        batch    = rollouts(problems)                   # every engine generates its share; verifier rewards
        samples  = build_groups(batch)                  # + demonstrations, group-normalised advantages
        minibatches = split(samples)                    # whole groups, packed micro-batches
        attach_old_logprobs(minibatches)                # pi_old only where it carries information
        for minibatch in minibatches: update(minibatch) # the policy's version moves on
        log / checkpoint / evaluate
    checkpoint, evaluate, export

Who generates, weight sync and the GPU memory dance belong to the rollout service (rollout/service.py): the loop
asks for "rollouts for these prompts" and "evaluate these problems", and the service brings the engines up to
the policy's version first. Every random choice is a function of (seed, step), so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch

from ..config import SRFTConfig, to_dict
from ..distributed import collectives
from ..distributed.groups import ParallelGroups
from ..errors import ConfigError, SrftError
from ..signals import STOP_SIGNALS, RunStopped

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from transformers import PreTrainedTokenizerBase

    from ..models.builder import ModelHandle


class TrainingError(SrftError):
    """The run cannot continue (e.g. too many consecutive non-finite updates); one line naming the step."""


# --------------------------------------------------------------------------------------------- state


@dataclass
class Policy:
    """The trained model and everything that moves with it. Also the rollout service's weight source."""

    handle: "ModelHandle"
    optimizer: "MegatronOptimizer"  # or its ChainedOptimizer (several model chunks)
    tokenizer: "PreTrainedTokenizerBase"
    model_dir: Path  # HF config + tokenizer (and initial weights) that the rollout engines start from
    groups: ParallelGroups
    micro_batch_tokens: int  # train.micro_batch_tokens with null resolved for this device (distributed/layout.py)
    version: int = 0  # optimizer steps applied; the rollout service re-syncs engines when it changes

    @property
    def chunks(self) -> list:
        return self.handle.chunks

    @property
    def vocab_size(self) -> int:
        return self.handle.arch.vocab_size

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of the current weights; a collective every rank iterates in lockstep."""
        from ..models.mapping import export_hf_weights
        from .step import sync_parameters

        sync_parameters(self.chunks)
        with torch.no_grad():
            yield from export_hf_weights(self.chunks, self.handle.arch, self.groups)


@dataclass
class Problems:
    train: list  # list[data.dataset.TokenizedProblem]
    eval: list
    num_filtered: int = 0
    num_eval_filtered: int = 0
    drop_notes: list = dataclasses.field(default_factory=list)  # one line per file that lost problems, and why


# --------------------------------------------------------------------------------------------- set-up


def build_policy(cfg: SRFTConfig, groups: ParallelGroups) -> Policy:
    from ..checkpoint.loading import load_initial_weights
    from ..data.templates import load_tokenizer
    from ..distributed.layout import (check_micro_batch_memory, device_memory_bytes, resolve_micro_batch_tokens,
                                      validate_layout)
    from ..models.arch import load_arch
    from ..models.builder import build_model, build_optimizer

    model_dir = Path(cfg.model.path)
    if not cfg.model.path or not model_dir.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory (an HF model or a converted checkpoint)")
    arch = load_arch(model_dir)
    # Every layout rule against the world and the model's shapes, once, before anything is built.
    validate_layout(cfg, groups.world_size, arch)
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


def load_problems_for(cfg: SRFTConfig, tokenizer, *, need_demos: bool) -> Problems:
    from ..data.dataset import load_problems, tokenize_problems

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
        return [int(self._order((start + i) // self.num_problems)[(start + i) % self.num_problems])
                for i in range(self.per_step)]

    def replica_slice(self) -> slice:
        """This rank's replica's block of :meth:`step_indices`."""
        share = self.per_step // self.dp_size
        return slice(self.dp_rank * share, (self.dp_rank + 1) * share)

    def indices(self, step: int) -> list[int]:
        """This replica's problem indices for ``step``."""
        return self.step_indices(step)[self.replica_slice()]

    def cursor(self, step: int) -> int:
        return step * self.per_step


# --------------------------------------------------------------------------------------------- the steps


def build_groups(problems: list, scored: list, settings, group_offset: int) -> tuple[list, dict]:
    """Samples of the augmented groups (rollouts + demos) with group-normalised advantages, and their metrics as
    (sum, count) pairs. ``scored[i]``: problem i's ScoredPrompt (completions, rewards, demo rewards)."""
    from ..algorithms.advantages import group_advantages
    from .batch import Sample

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
    from ..algorithms.metrics import all_reduce_metrics, finalize

    sums = {k: (torch.tensor(float(s)), torch.tensor(float(c))) for k, (s, c) in stats.items()}
    return finalize(all_reduce_metrics(sums, groups.dp_group if groups.dp_size > 1 else None))


def split_minibatches(samples: list, num_minibatches: int, micro_batch_tokens: int, packing: bool,
                      pad_to_multiple: int = 1) -> list:
    """Groups stay whole; each minibatch is packed into micro-batches, every one padded to ``pad_to_multiple``
    tokens (distributed.layout.token_pad_multiple): [(micro_batches, samples), ...]."""
    from .batch import pack_micro_batches

    by_group: dict[int, list] = {}
    for s in samples:
        by_group.setdefault(s.group, []).append(s)
    gids = sorted(by_group)
    per = max(1, math.ceil(len(gids) / num_minibatches))
    out = []
    for i in range(0, len(gids), per):
        ss = [s for g in gids[i:i + per] for s in by_group[g]]
        out.append((pack_micro_batches(ss, micro_batch_tokens, packing=packing, pad_to_multiple=pad_to_multiple),
                    ss))
    return out


def attach_old_logprobs(policy: Policy, minibatches: list, settings, source: str = "recompute") -> None:
    """pi_old on every rollout token, computed where it carries information.

    ``recompute``: the first mini-batch is trained before any update of this rollout batch, so its pi_old is its
    own training forward's log-prob, detached (``old_logprob = None``; training/step.py token_batch): no extra
    pass, and with one optimizer step per rollout batch none at all. Later mini-batches need the pre-update policy:
    one forward-only pass over them, now. ``engine``: pi_old is the engine's log-prob everywhere; no pass. Presets
    without rollouts have no ratio to compute: no pass.
    """
    from .step import forward_logprobs

    if source == "engine":
        for mbs, _ in minibatches:
            for mb in mbs:
                mb.old_logprob, mb.old_from_engine = mb.engine_logprob, mb.engine_logprob is not None
        return
    for mbs, _ in minibatches[:1]:
        for mb in mbs:
            mb.old_logprob = None
    if not settings.use_rollouts:
        return
    later = [mb for mbs, _ in minibatches[1:] for mb in mbs]
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


def update_policy(policy: Policy, minibatches: list, settings, cfg: SRFTConfig, step: int) -> dict:
    """One optimizer step per mini-batch; the policy's version moves on with every applied step."""
    from .step import train_minibatch

    settings = settings.at_step(step)  # the step's SFT mix (CHORD's mu), when the preset has one
    num_mb = len(minibatches)
    total = cfg.train.num_steps * num_mb
    merged: dict = {}
    for i, (mbs, _samples) in enumerate(minibatches):
        lr = lr_at(cfg, (step - 1) * num_mb + i, total)
        for g in policy.optimizer.param_groups:
            g["lr"] = lr
        out = train_minibatch(policy.chunks, policy.optimizer, mbs, settings, policy.groups, policy.vocab_size)
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


# --------------------------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption, signals.STOP_SIGNALS) -> no new step; checkpoint the last finished
    step, then end the run with :class:`~megatron_srft.signals.RunStopped`. Read before each step's rollouts and
    after its update, so a signal that arrives during a save or an evaluation does not start another step."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self.signal_name = "a signal on another rank"  # until this rank receives one itself
        if enabled:
            for sig in STOP_SIGNALS:
                try:
                    signal.signal(sig, self._handler)
                except (ValueError, OSError):  # not the main thread
                    pass

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank received the signal (a collective)."""
        return collectives.agree(self.requested)


def _startup_summary(cfg: SRFTConfig, groups: ParallelGroups, problems: Problems, service, pad_multiple: int,
                     micro_batch_tokens: int) -> str:
    p = cfg.parallel
    lines = [
        f"[srft] {len(problems.train)} training problems ({problems.num_filtered} dropped by the length filters), "
        f"{len(problems.eval)} eval problems ({problems.num_eval_filtered} dropped); preset {cfg.algorithm.preset}",
        f"[srft] world {groups.world_size}: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x DP {groups.dp_size}{' + SP' if p.sequence_parallel else ''}; micro-batch {micro_batch_tokens} "
        f"tokens{' (resolved for the device)' if cfg.train.micro_batch_tokens is None else ''} (padded to multiples of {pad_multiple})",
        f"[srft] rollouts: {service.placement.num_engines} engine(s) of rollout TP {cfg.rollout.tensor_parallel_size}"
        f"{'' if service.engine is not None else ' (no generation: verifier only)'}; sleep level "
        f"{cfg.rollout.sleep_level}",
    ]
    lines += [f"[srft] {note}" for note in problems.drop_notes]
    return "\n".join(lines)


def train(cfg: SRFTConfig, *, groups: Optional[ParallelGroups] = None, stop_after: Optional[int] = None,
          engine_factory=None) -> dict:
    """Run training; returns the last step's metrics. ``stop_after`` ends early (tests of resume/kill);
    ``engine_factory`` builds the rollout engines (tests wrap the real one). A stop signal (``_StopFlag``) ends
    the run with :class:`~megatron_srft.signals.RunStopped` after its checkpoint: a stopped run never returns
    as if it had finished."""
    from ..algorithms.presets import resolve
    from ..checkpoint.run_dir import plan_run
    from ..checkpoint.dist import start_checkpoint_writer
    from ..checkpoint.training_state import load_training_checkpoint, save_training_checkpoint
    from ..data.templates import THINKING_TEMPLATES
    from ..distributed.groups import init_distributed
    from ..distributed.layout import config_token_pad_multiple
    from ..rollout.service import RolloutService
    from .metrics import MetricsLogger, PhaseTimer
    from .routing import plan_prompts, route_prompts
    from .step import sync_parameters

    groups = groups or init_distributed(cfg.parallel, seed=cfg.train.seed)
    cfg.validate()  # evaluation settings included: checked now, not at the first evaluation hours later
    settings = resolve(cfg.algorithm)
    if cfg.rollout.tis_cap is not None:
        settings = dataclasses.replace(settings, tis_cap=cfg.rollout.tis_cap)
    run = plan_run(cfg.run_dir, cfg.checkpoint.resume, to_dict(cfg), cfg.checkpoint.allow_changes, rank=groups.rank,
                   world=groups.world_size)
    policy = build_policy(cfg, groups)
    problems = load_problems_for(cfg, policy.tokenizer, need_demos=settings.num_demos > 0)
    sampler = PromptSampler(len(problems.train), cfg.train.prompts_per_step, seed=cfg.data.seed,
                            shuffle=cfg.data.shuffle, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    pad_multiple = config_token_pad_multiple(cfg.parallel, cfg.model)
    run_dir = Path(cfg.run_dir)
    logger = MetricsLogger(run_dir, enabled=groups.is_logging_rank, total_steps=cfg.train.num_steps,
                           logging_cfg=cfg.logging, run_config=to_dict(cfg), run_id=run.run_id)
    start_step = 0
    ckpt = run.resume_from
    if ckpt is not None:
        start_step = load_training_checkpoint(ckpt, policy.chunks, policy.optimizer, rank=groups.rank,
                                              verified=True).step
        policy.version = start_step  # any value that differs from the engines' (they start with dummy weights)
    # A fresh start begins a fresh metrics.jsonl; a resume drops the lines of steps after its checkpoint.
    logger.truncate_after(start_step if ckpt is not None else -1)
    if groups.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))

    need_engine = settings.use_rollouts or bool(problems.eval)
    num_rollouts = cfg.rollout.num_rollouts_per_prompt if settings.use_rollouts else 0
    start_checkpoint_writer()  # its helper process ignores the stop signals; started before they have handlers
    stop = _StopFlag(cfg.checkpoint.save_on_signal)
    stopped_at: Optional[int] = None  # the last finished step, once a stop signal ended the run
    metrics: dict = {}
    num_minibatches = cfg.train.prompts_per_step // cfg.train.prompts_per_minibatch
    meta = {"params_dtype": cfg.model.params_dtype, "config": to_dict(cfg), "run_id": run.run_id}
    completed = start_step == cfg.train.num_steps
    consecutive_skips = 0
    last_saved = ckpt
    saved_step = start_step if ckpt is not None else None

    def save(step: int, *, rotate: bool = True) -> None:
        """``rotate=False`` (the stop signal's save): older checkpoints stay until the next save's rotation, so
        the shutdown window holds nothing but the write itself."""
        nonlocal last_saved, saved_step
        sync_parameters(policy.chunks)  # every shard current before it is written
        last_saved = save_training_checkpoint(run_dir, step, policy.chunks, policy.optimizer, data_cursor=sampler.cursor(step),
                                 metadata=meta, keep_last=cfg.checkpoint.keep_last if rotate else 0,
                                 rank=groups.rank, arch=policy.handle.arch)
        saved_step = step

    def evaluate() -> dict:
        out, _ = rollouts.evaluate(problems.eval, n_samples=cfg.train.eval_n_samples,
                                   temperature=cfg.train.eval_temperature)
        return out

    with RolloutService(cfg, groups, str(policy.model_dir), policy.tokenizer, policy, need_engine=need_engine,
                        arch=policy.handle.arch,
                        require_think=cfg.data.template in THINKING_TEMPLATES,
                        engine_factory=engine_factory) as rollouts:
        if groups.is_logging_rank:
            print(_startup_summary(cfg, groups, problems, rollouts, pad_multiple, policy.micro_batch_tokens), flush=True)
        if start_step == 0 and problems.eval and cfg.train.eval_every:
            metrics = evaluate()
            logger.log(0, metrics)
        for step in range(start_step + 1, cfg.train.num_steps + 1):
            if stop.agreed():  # the signal came during the previous step's save or evaluation: no new step
                stopped_at = step - 1
                if step - 1 > 0 and saved_step != step - 1:
                    save(step - 1, rotate=False)
                break
            timer = PhaseTimer()
            t0 = time.perf_counter()
            step_problems = [problems.train[i] for i in sampler.step_indices(step)]
            plan = plan_prompts(step_problems, sampler.replica_slice(), groups.dp_size, settings)  # expert rows
            with timer("rollout"):
                batch = rollouts.rollouts(plan.generate, step, num_rollouts=num_rollouts,
                                          num_demos=settings.num_demos, replica_slice=plan.generate_slice)
            mine = step_problems[sampler.replica_slice()]
            scored, route_stats = route_prompts(plan, batch.prompts, settings)  # expert rows, HPT's gate
            samples, stats = build_groups(mine, scored, settings, group_offset=groups.dp_rank * len(mine))
            minibatches = split_minibatches(samples, num_minibatches, policy.micro_batch_tokens,
                                            cfg.train.sequence_packing, pad_multiple)
            with timer("old_logprob"):
                attach_old_logprobs(policy, minibatches, settings, cfg.train.old_logprobs)
            with timer("train"):
                train_metrics = update_policy(policy, minibatches, settings, cfg, step)
            metrics = {**reduce_stats({**stats, **route_stats}, groups), **batch.metrics, **train_metrics, **timer.as_metrics()}
            num_tokens = sum(s.num_tokens for s in samples)
            metrics["perf/tokens_per_s"] = num_tokens * groups.dp_size / max(time.perf_counter() - t0, 1e-9)
            metrics["time/step"] = time.perf_counter() - t0
            logger.log(step, metrics)
            skipped = train_metrics["optim/num_skipped"] > 0
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            if consecutive_skips >= cfg.train.max_consecutive_skips:
                raise TrainingError(f"step {step}: {consecutive_skips} consecutive steps had a non-finite loss or "
                                    f"gradient and were skipped (train.max_consecutive_skips); the last checkpoint "
                                    f"is {last_saved}")
            last = step == cfg.train.num_steps
            stopping = stop.agreed()
            # Save, then evaluate: a failing evaluation never costs the step. A step whose update was skipped is
            # not checkpointed on schedule (the next good step is), only when the run ends.
            due = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and not skipped
            if stopping:  # the signal's save: no evaluation, export or rotation in the shutdown window
                save(step, rotate=False)
                stopped_at = step
                break
            if last or due:
                save(step)
            if stop_after is not None and step >= stop_after:
                break
            if problems.eval and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
                with timer("eval"):
                    eval_metrics = evaluate()
                metrics.update(eval_metrics)
                logger.log(step, {**eval_metrics, "time/eval": timer.seconds["eval"]})
            completed = last
        # The final export runs only after the last step (never inside a pre-emption's shutdown window: a signal
        # that came during the last evaluation leaves it to the requeued job, which finds the final checkpoint).
        if completed and cfg.checkpoint.export_hf and stop.agreed():
            stopped_at = cfg.train.num_steps
        elif completed and cfg.checkpoint.export_hf:
            export_final_hf(policy, groups, run_dir / "hf", cfg.model.params_dtype)
    logger.close()
    if stopped_at is not None:
        raise RunStopped(stopped_at, stop.signal_name, last_saved)
    return metrics


def export_final_hf(policy: Policy, groups: ParallelGroups, out_dir: Path, params_dtype: str) -> None:
    """Collective: the live model as an HF directory (safetensors, config, tokenizer), written by rank 0 into a
    temporary sibling and renamed when complete. Tensors are cast to the run's dtype (Megatron's local spec
    keeps norm weights in fp32)."""
    import json

    from ..checkpoint.atomic import atomic_dir
    from ..checkpoint.convert import copy_side_files, write_safetensors
    from ..checkpoint.manifest import write_manifest
    from ..dtypes import DTYPES, torch_dtype

    dtype = torch_dtype(params_dtype)
    items = policy.export()  # parameters made current first (overlapped param gather)
    if groups.rank == 0:
        with atomic_dir(out_dir) as tmp:  # a failed export leaves no temporary directory behind
            write_safetensors(((n, t.to(dtype)) for n, t in items), tmp, 2 << 30)
            hf_cfg = dict(policy.handle.arch.hf_config)
            hf_cfg.pop("torch_dtype", None)
            hf_cfg["dtype"] = DTYPES[params_dtype].torch_name
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            copy_side_files(policy.model_dir, tmp)
            write_manifest(tmp)  # last: sizes + CRC-32 of every file (checkpoint/manifest.py)
    else:
        for _ in items:
            pass
    collectives.barrier()
