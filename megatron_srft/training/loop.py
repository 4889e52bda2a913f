"""The SRFT training loop. It reads like the algorithm:

    for each step:
        prompts  = sample_prompts(step)                 # this DP rank's share, a pure function of (seed, step)
        rollouts = generate_rollouts(prompts)           # vLLM, on the model-parallel group's leader
        rewards  = score(rollouts)                      # verifier in worker processes, with timeouts
        samples  = build_groups(prompts, rollouts, rewards)   # + demonstrations, group advantages
        attach_old_logprobs(samples)                    # pi_old for the PPO ratio, and engine mismatch
        for minibatch in split(samples): update(minibatch)
        sync_weights()                                  # Megatron shards -> vLLM
        log / evaluate / checkpoint

Every random choice is a function of (seed, step) so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, SRFTConfig, to_dict
from ..distributed.groups import ParallelGroups


# --------------------------------------------------------------------------------------------- state


@dataclass
class Policy:
    """The trained model and everything that moves with it."""

    handle: object  # models.builder.ModelHandle
    optimizer: object
    tokenizer: object
    model_dir: Path  # HF config + tokenizer (and initial weights) that the rollout engine starts from

    @property
    def chunks(self):
        return self.handle.chunks

    @property
    def vocab_size(self) -> int:
        return self.handle.arch.vocab_size


@dataclass
class Problems:
    train: list  # list[data.dataset.TokenizedProblem]
    eval: list
    num_filtered: int = 0


# --------------------------------------------------------------------------------------------- set-up


def build_policy(cfg: SRFTConfig, groups: ParallelGroups) -> Policy:
    from ..data.templates import load_tokenizer
    from ..distributed.layout import validate_layout
    from ..models.arch import load_arch
    from ..models.builder import build_model, build_optimizer
    from ..checkpoint.loading import load_initial_weights

    model_dir = Path(cfg.model.path)
    if not cfg.model.path or not model_dir.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory (an HF model or a converted checkpoint)")
    arch = load_arch(model_dir)
    # Every layout rule against the model's shapes, before anything is built: sequence lengths vs the model's
    # positions and the micro-batch budget, rollout TP vs heads, TP/PP vs heads and layers.
    validate_layout(cfg, arch, groups.world_size)
    handle = build_model(arch, cfg.model, cfg.parallel)
    load_initial_weights(handle, model_dir, groups)
    # After the weights: the optimizer copies its fp32 master weights from the model when it is built.
    optimizer = build_optimizer(handle, cfg.optimizer, cfg.model, cfg.parallel)
    tokenizer = load_tokenizer(model_dir)
    return Policy(handle=handle, optimizer=optimizer, tokenizer=tokenizer, model_dir=model_dir)


def load_problems_for(cfg: SRFTConfig, tokenizer, *, need_demos: bool) -> Problems:
    from ..data.dataset import load_problems, tokenize_problems

    def load(files, require_demo):
        out, dropped = [], 0
        for f in files:
            probs = load_problems(f, require_demo=require_demo)
            toks = tokenize_problems(probs, tokenizer, cfg.data.template, cfg.data.max_prompt_length,
                                     cfg.data.max_response_length)
            dropped += len(probs) - len(toks)
            out.extend(toks)
        return out, dropped

    if not cfg.data.train_files:
        raise ConfigError("data.train_files: expected at least one .jsonl or .parquet file")
    train, dropped = load(cfg.data.train_files, need_demos)
    if not train:
        raise ConfigError(f"data.train_files: no usable problems after length filters ({dropped} dropped)")
    evals, _ = load(cfg.data.eval_files, False)
    return Problems(train=train, eval=evals, num_filtered=dropped)


class PromptSampler:
    """Which problems step s uses: epoch-wise seeded permutations, a pure function of (seed, step)."""

    def __init__(self, num_problems: int, prompts_per_step: int, *, seed: int, shuffle: bool, dp_rank: int,
                 dp_size: int) -> None:
        self.num_problems, self.per_step = num_problems, prompts_per_step
        self.seed, self.shuffle, self.dp_rank, self.dp_size = seed, shuffle, dp_rank, dp_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_problems)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_problems)

    def indices(self, step: int) -> list[int]:
        """Global indices for ``step`` (1-based), then this DP rank's contiguous share."""
        start = (step - 1) * self.per_step
        idx = [int(self._order((start + i) // self.num_problems)[(start + i) % self.num_problems])
               for i in range(self.per_step)]
        share = self.per_step // self.dp_size
        return idx[self.dp_rank * share:(self.dp_rank + 1) * share]

    def cursor(self, step: int) -> int:
        return step * self.per_step


# --------------------------------------------------------------------------------------------- the steps


def _mp_leader(groups: ParallelGroups) -> tuple[bool, int]:
    """The model-parallel group's rank 0 owns the rollout engine; returns (am_leader, leader's global rank)."""
    if groups.mp_group is None or groups.world_size == 1:
        return True, 0
    return dist.get_rank(groups.mp_group) == 0, dist.get_global_rank(groups.mp_group, 0)


def _broadcast_in_mp_group(obj, groups: ParallelGroups):
    """The leader's Python object on every rank of its model-parallel group (TP x PP ranks use one batch)."""
    if groups.world_size == 1 or groups.mp_group is None or dist.get_world_size(groups.mp_group) == 1:
        return obj
    _, src = _mp_leader(groups)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=groups.mp_group)
    return box[0]


def generate_rollouts(engine, problems: list, cfg: SRFTConfig, step: int, groups: ParallelGroups,
                      num_rollouts: int) -> list:
    """G completions per problem from the engine (leader only), shared with the model-parallel group."""
    out = None
    if engine is not None and num_rollouts > 0:
        seed = cfg.rollout.seed + 1_000_003 * step + 7919 * groups.dp_rank
        out = engine.generate([p.prompt_ids for p in problems], n=num_rollouts, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p,
                              max_tokens=cfg.rollout.max_tokens or cfg.data.max_response_length,
                              stop_token_ids=None, seed=seed)
        out = [[(list(c.token_ids), list(c.logprobs) if c.logprobs is not None else None, c.finish_reason)
                for c in comps] for comps in out]
    return _broadcast_in_mp_group(out, groups) if num_rollouts > 0 else [[] for _ in problems]


def score_rollouts(pool, tokenizer, problems: list, rollouts: list, groups: ParallelGroups,
                   num_demos: int) -> tuple[list, list, int]:
    """Rewards for every rollout and every demo (the demo is scored by the same verifier). Leader only."""
    am_leader, _ = _mp_leader(groups)
    result = None
    if am_leader:
        texts, answers = [], []
        for p, comps in zip(problems, rollouts):
            for ids, _, _ in comps:
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
                answers.append(p.answer)
            for _ in range(num_demos):
                texts.append(tokenizer.decode(p.demo_ids, skip_special_tokens=True))
                answers.append(p.answer)
        scores, num_timeouts = pool.score(texts, answers) if texts else ([], 0)
        roll_r, demo_r, i = [], [], 0
        for comps in rollouts:
            roll_r.append(scores[i:i + len(comps)])
            i += len(comps)
            demo_r.append(scores[i:i + num_demos])
            i += num_demos
        result = (roll_r, demo_r, num_timeouts)
    return _broadcast_in_mp_group(result, groups)


def build_groups(problems: list, rollouts: list, rollout_rewards: list, demo_rewards: list, settings,
                 group_offset: int) -> tuple[list, dict]:
    """Samples of the augmented groups (rollouts + demos) with group-normalised advantages."""
    from ..algorithms.advantages import group_advantages
    from .batch import Sample

    samples, rewards, group_ids = [], [], []
    for g, (p, comps, rr, dr) in enumerate(zip(problems, rollouts, rollout_rewards, demo_rewards)):
        gid = group_offset + g
        for (ids, engine_lp, _), r in zip(comps, rr):
            if not ids:
                continue  # an empty completion has no token to learn from
            samples.append(Sample(prompt_ids=list(p.prompt_ids), response_ids=list(ids), advantage=0.0,
                                  is_demo=False, group=gid, reward=float(r), engine_logprobs=engine_lp))
            rewards.append(float(r))
            group_ids.append(gid)
        for r in dr:
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
    per_group: dict[int, list[float]] = {}
    for s in samples:
        per_group.setdefault(s.group, []).append(s.reward)
    stats = {
        "reward/sum": (sum(s.reward for s in roll), len(roll)),
        "accuracy/rollout": (sum(s.reward > 0.5 for s in roll), len(roll)),
        "accuracy/demo": (sum(s.reward > 0.5 for s in samples if s.is_demo), sum(s.is_demo for s in samples)),
        "response/length_mean": (sum(len(s.response_ids) for s in roll), len(roll)),
        "groups/all_equal_fraction": (sum(len(set(v)) == 1 for v in per_group.values()), len(per_group)),
    }
    return samples, stats


def attach_old_logprobs(policy: Policy, minibatches: list, groups: ParallelGroups) -> dict:
    """pi_old on every response token (before any update of this step), and engine/trainer mismatch."""
    from .step import forward_logprobs

    diff_sum, diff_max, n = 0.0, 0.0, 0
    for mbs, _samples in minibatches:
        outs = forward_logprobs(policy.chunks, mbs, groups, policy.vocab_size)
        for mb, (lp, _ent) in zip(mbs, outs):
            mb.old_logprob = lp.detach()
            if mb.engine_logprob is not None:
                mask = mb.loss_mask.bool() & ~mb.is_demo.bool()
                if mask.any():
                    d = (mb.engine_logprob[mask] - lp.detach()[mask]).abs()
                    diff_sum += float(d.sum())
                    diff_max = max(diff_max, float(d.max()))
                    n += int(mask.sum())
    return {"mismatch/mean_abs": (diff_sum, n), "mismatch/max_abs_max": (diff_max, 1)}


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


def update_policy(policy: Policy, minibatches: list, settings, cfg: SRFTConfig, groups: ParallelGroups,
                  step: int) -> dict:
    from .step import train_minibatch

    num_mb = len(minibatches)
    total = cfg.train.num_steps * num_mb
    merged: dict = {}
    for i, (mbs, _samples) in enumerate(minibatches):
        lr = lr_at(cfg, (step - 1) * num_mb + i, total)
        for g in policy.optimizer.param_groups:
            g["lr"] = lr
        out = train_minibatch(policy.chunks, policy.optimizer, mbs, settings, groups, policy.vocab_size)
        for k, v in out.items():
            merged.setdefault(_metric_name(k), []).append(float(v))
        merged.setdefault("optim/lr", []).append(lr)
    return {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in merged.items()}


def _metric_name(key: str) -> str:
    """The loss adapter's flat names -> the run's namespaced metric names (loss_sft -> loss/sft, ...)."""
    for prefix, space in (("loss_", "loss/"), ("entropy_", "entropy/"), ("w_", "weight/")):
        if key.startswith(prefix):
            return space + key[len(prefix):]
    return {"loss": "loss/minibatch", "grad_norm": "optim/grad_norm"}.get(key, f"train/{key}")


def reduce_stats(stats: dict, groups: ParallelGroups) -> dict[str, float]:
    """(sum, count) pairs -> means over all DP ranks (``*_max`` keys -> max)."""
    keys = sorted(stats)
    if not keys:
        return {}
    sums = torch.tensor([float(stats[k][0]) for k in keys], dtype=torch.float64)
    counts = torch.tensor([float(stats[k][1]) for k in keys], dtype=torch.float64)
    if groups.dp_size > 1:
        is_max = torch.tensor([k.endswith("_max") for k in keys])
        maxes = torch.where(is_max, sums, torch.full_like(sums, -math.inf))
        sums = torch.where(is_max, torch.zeros_like(sums), sums)
        dist.all_reduce(sums, group=groups.dp_group)
        dist.all_reduce(counts, group=groups.dp_group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=groups.dp_group)
        sums = torch.where(is_max, maxes, sums)
    out = {}
    for k, s, c in zip(keys, sums.tolist(), counts.tolist()):
        name = k[:-4] if k.endswith("_max") and k.startswith("mismatch/") else k
        if k.endswith("_max"):
            out[name] = s if c > 0 else float("nan")
        else:
            out[k.replace("/sum", "/mean")] = s / c if c > 0 else float("nan")
    return out


def split_minibatches(samples: list, num_minibatches: int, micro_batch_tokens: int, packing: bool) -> list:
    """Groups stay whole; each minibatch is packed into micro-batches: [(micro_batches, samples), ...]."""
    from .batch import pack_micro_batches

    by_group: dict[int, list] = {}
    for s in samples:
        by_group.setdefault(s.group, []).append(s)
    gids = sorted(by_group)
    per = max(1, math.ceil(len(gids) / num_minibatches))
    out = []
    for i in range(0, len(gids), per):
        ss = [s for g in gids[i:i + per] for s in by_group[g]]
        out.append((pack_micro_batches(ss, micro_batch_tokens, packing=packing), ss))
    return out


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_policy(engine, pool, tokenizer, problems: list, cfg: SRFTConfig, groups: ParallelGroups) -> dict:
    """Greedy (or sampled) accuracy on held-out problems, on the global rank 0's engine."""
    result = {}
    if groups.rank == 0 and engine is not None and problems:
        n = cfg.train.eval_n_samples
        outs = engine.generate([p.prompt_ids for p in problems], n=n, temperature=cfg.train.eval_temperature,
                               top_p=1.0, max_tokens=cfg.rollout.max_tokens or cfg.data.max_response_length,
                               stop_token_ids=None, seed=cfg.rollout.seed)
        texts, answers = [], []
        for p, comps in zip(problems, outs):
            for c in comps:
                texts.append(tokenizer.decode(list(c.token_ids), skip_special_tokens=True))
                answers.append(p.answer)
        scores, _ = pool.score(texts, answers)
        result = {"eval/accuracy": float(np.mean([s > 0.5 for s in scores])) if scores else float("nan")}
    if groups.world_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


# --------------------------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) -> checkpoint at the end of the current step, then exit."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                try:
                    signal.signal(sig, self._handler)
                except (ValueError, OSError):  # not the main thread
                    pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, groups: ParallelGroups) -> bool:
        if groups.world_size == 1:
            return self.requested
        t = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def train(cfg: SRFTConfig, *, groups: Optional[ParallelGroups] = None, stop_after: Optional[int] = None) -> dict:
    """Run training; returns the last step's metrics. ``stop_after`` ends early (tests of resume/kill)."""
    from ..distributed import groups as parallel
    from ..algorithms.presets import resolve
    from ..checkpoint.run_dir import plan_run
    from ..checkpoint.training_state import load_training_checkpoint, save_training_checkpoint
    from ..data.templates import THINKING_TEMPLATES
    from ..rewards import RewardPool
    from .metrics import MetricsLogger, PhaseTimer

    groups = groups or parallel.init_distributed(cfg.parallel, seed=cfg.train.seed)
    cfg.validate(groups.world_size)
    settings = resolve(cfg.algorithm)
    if cfg.rollout.tis_cap is not None:
        settings = dataclasses.replace(settings, tis_cap=cfg.rollout.tis_cap)
    run = plan_run(cfg.run_dir, cfg.checkpoint.resume, to_dict(cfg), cfg.checkpoint.allow_changes, rank=groups.rank,
                   world=groups.world_size)
    policy = build_policy(cfg, groups)
    problems = load_problems_for(cfg, policy.tokenizer, need_demos=settings.num_demos > 0)
    sampler = PromptSampler(len(problems.train), cfg.train.prompts_per_step, seed=cfg.data.seed,
                            shuffle=cfg.data.shuffle, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    run_dir = Path(cfg.run_dir)
    logger = MetricsLogger(run_dir, enabled=groups.is_logging_rank, total_steps=cfg.train.num_steps,
                           tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                           log_every=cfg.logging.log_every)
    start_step = 0
    ckpt = run.resume_from
    if ckpt is not None:
        start_step = load_training_checkpoint(ckpt, policy.chunks, policy.optimizer, rank=groups.rank,
                                              verified=True).step
    # A fresh start begins a fresh metrics.jsonl; a resume drops the lines of steps after its checkpoint.
    logger.truncate_after(start_step if ckpt is not None else -1)
    if groups.is_logging_rank:
        print(f"[srft] {len(problems.train)} training problems ({problems.num_filtered} dropped by the length "
              f"filters), {len(problems.eval)} eval problems; preset {cfg.algorithm.preset}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))

    am_leader, _ = _mp_leader(groups)
    need_engine = settings.use_rollouts or bool(problems.eval)
    # vLLM creates its process groups with torch.distributed.new_group, a collective over the whole world:
    # every rank builds its engine in lockstep. Only the model-parallel leader's engine receives weights and
    # generates; the others stay idle (on GPU the engines form rollout-TP groups instead, docs/rollout.md).
    engine = _make_engine(cfg, policy, groups) if need_engine else None
    if engine is not None and not am_leader:
        engine.sleep()
    rollout_engine = engine if am_leader else None
    stop = _StopFlag(cfg.checkpoint.save_on_signal)
    metrics: dict = {}
    num_minibatches = cfg.train.prompts_per_step // cfg.train.prompts_per_minibatch
    meta = {"params_dtype": cfg.model.params_dtype, "config": to_dict(cfg), "run_id": run.run_id}
    with RewardPool(cfg.train.reward, timeout_s=cfg.train.reward_timeout_s, num_workers=cfg.train.reward_workers,
                    require_think=cfg.data.template in THINKING_TEMPLATES) if am_leader else _NullPool() as pool:
        if need_engine:
            sync_weights_to_engine(policy, rollout_engine, groups, cfg)
        if start_step == 0 and problems.eval and cfg.train.eval_every:
            metrics = evaluate_policy(rollout_engine, pool, policy.tokenizer, problems.eval, cfg, groups)
            logger.log(0, metrics)
        for step in range(start_step + 1, cfg.train.num_steps + 1):
            timer = PhaseTimer()
            t0 = time.perf_counter()
            batch = [problems.train[i] for i in sampler.indices(step)]
            with timer("rollout"):
                rollouts = generate_rollouts(rollout_engine, batch, cfg, step, groups,
                                             cfg.rollout.num_rollouts_per_prompt if settings.use_rollouts else 0)
            with timer("reward"):
                roll_r, demo_r, num_timeouts = score_rollouts(pool, policy.tokenizer, batch, rollouts, groups,
                                                              settings.num_demos)
            samples, stats = build_groups(batch, rollouts, roll_r, demo_r, settings,
                                          group_offset=groups.dp_rank * len(batch))
            stats["reward/timeouts_max"] = (float(num_timeouts), 1)
            minibatches = split_minibatches(samples, num_minibatches, cfg.train.micro_batch_tokens,
                                            cfg.train.sequence_packing)
            with timer("old_logprob"):
                stats.update(attach_old_logprobs(policy, minibatches, groups))
            with timer("train"):
                train_metrics = update_policy(policy, minibatches, settings, cfg, groups, step)
            with timer("sync"):
                if need_engine:
                    sync_weights_to_engine(policy, rollout_engine, groups, cfg)
            metrics = {**reduce_stats(stats, groups), **train_metrics, **timer.as_metrics()}
            num_tokens = sum(s.num_tokens for s in samples)
            metrics["perf/tokens_per_s"] = num_tokens * groups.dp_size / max(time.perf_counter() - t0, 1e-9)
            if problems.eval and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                  or step == cfg.train.num_steps):
                with timer("eval"):
                    metrics.update(evaluate_policy(rollout_engine, pool, policy.tokenizer, problems.eval, cfg, groups))
            metrics["time/step"] = time.perf_counter() - t0
            logger.log(step, metrics)
            last = step == cfg.train.num_steps
            stopping = stop.agreed(groups)
            if last or stopping or (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0):
                save_training_checkpoint(run_dir, step, policy.chunks, policy.optimizer,
                                         data_cursor=sampler.cursor(step), metadata=meta,
                                         keep_last=cfg.checkpoint.keep_last, rank=groups.rank,
                                         arch=policy.handle.arch)
            if stopping or (stop_after is not None and step >= stop_after):
                break
        if cfg.checkpoint.export_hf:
            export_final_hf(policy, groups, run_dir / "hf", cfg.model.params_dtype)
    logger.close()
    if engine is not None:
        engine.close()
    return metrics


class _NullPool:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_engine(cfg: SRFTConfig, policy: Policy, groups: ParallelGroups):
    from ..rollout.vllm_engine import RolloutEngine

    dtype = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else cfg.model.params_dtype
    max_len = cfg.rollout.max_model_len or (cfg.data.max_prompt_length + cfg.data.max_response_length)
    # Dummy weights: the first sync (right after start-up) brings the trainer's, so a converted Megatron
    # checkpoint (config + tokenizer, no safetensors) starts an engine just as well as an HF directory.
    return RolloutEngine(cfg.rollout, str(policy.model_dir), dtype=dtype, seed=cfg.rollout.seed, max_model_len=max_len,
                         load_format="dummy")


def sync_weights_to_engine(policy: Policy, engine, groups: ParallelGroups, cfg: SRFTConfig) -> dict:
    """Collective over all ranks: gather each tensor; the leader's engine loads it, the other ranks only take
    part in the gathers (their copy is dropped at once)."""
    from ..models.mapping import export_hf_weights
    from ..rollout.sync import sync_weights

    if engine is not None:
        return sync_weights(policy.chunks, policy.handle.arch, groups, engine, cfg.rollout.sync_bucket_mb)
    with torch.no_grad():
        for _ in export_hf_weights(policy.chunks, policy.handle.arch, groups):
            pass
    return {}


def export_final_hf(policy: Policy, groups: ParallelGroups, out_dir: Path, params_dtype: str) -> None:
    """Collective: the live model as an HF directory (safetensors, config, tokenizer), written by rank 0 into a
    temporary sibling and renamed when complete. Tensors are cast to the run's dtype (Megatron's local spec
    keeps norm weights in fp32)."""
    import json
    import shutil

    from ..checkpoint.atomic import replace_dir
    from ..checkpoint.convert import copy_side_files, write_safetensors
    from ..checkpoint.manifest import write_manifest
    from ..models.builder import torch_dtype
    from ..models.mapping import export_hf_weights

    dtype = torch_dtype(params_dtype)
    with torch.no_grad():
        items = export_hf_weights(policy.chunks, policy.handle.arch, groups)
        if groups.rank == 0:
            tmp = out_dir.parent / f".{out_dir.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_safetensors(((n, t.to(dtype)) for n, t in items), tmp, 2 << 30)
            hf_cfg = dict(policy.handle.arch.hf_config)
            hf_cfg.pop("torch_dtype", None)
            hf_cfg["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[params_dtype]
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            copy_side_files(policy.model_dir, tmp)
            write_manifest(tmp)  # last: sizes + CRC-32 of every file (checkpoint/manifest.py)
            replace_dir(tmp, out_dir)
        else:
            for _ in items:
                pass
    if groups.world_size > 1:
        dist.barrier()
