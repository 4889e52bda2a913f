"""The colocated rollout service: the engines share the trainer's devices. It implements the rollout seam
(rollout/seam.py: generate, sync, collect, evaluate) and holds everything behind it: which ranks generate, weight
sync, the GPU memory dance, scoring, and moving results.

Every method is a collective: every rank of the world calls it with the same arguments.

- **Placement** (rollout/placement.py): rollout TP r; engine e = ranks [e*r, (e+1)*r). Every rank belongs to one
  engine, so every GPU generates. The step's prompts (a global list, replica-major) are split into balanced
  contiguous shares over the engines; every rank of an engine generates its share SPMD (same prompts, same seeds).
- **Seeds** are a function of (rollout.seed, step, global prompt index) only: sample j of prompt g at step s uses
  ``rollout.seed + 1_000_003 * s + g * n + j``. The tokens do not depend on how many engines there are, and a
  resumed run repeats the uninterrupted one.
- **Scoring**: each engine's leader decodes its completions and scores them (and the demonstrations of its
  prompts) in its own verifier pool, in parallel with the other engines.
- **Exchange**: each leader packs its results into two flat tensors (ints: lengths, finish reasons, token ids;
  floats: log-probs, rewards) and broadcasts them over the world (NCCL on GPU: no pickling, no host staging); every
  rank keeps its replica's prompts, in order.
- **Weights and memory**: ``sync`` offers the trainer's weights at a version; the service knows which version its
  engines hold. Before a generation it wakes the engine's weights, streams the offered ones when they are stale
  (every rank feeds its own engine shard the full HF tensors in buckets; vLLM shards them), then wakes the KV
  cache; after it sleeps at ``rollout.sleep_level``. Level 2 drops the weights, so every wake is followed by a
  sync. A generation or evaluation asked for another version than the one offered is an error.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from ..distributed import collectives
from ..distributed.layout import rollout_sequences_per_engine
from ..rewards.pool import RewardPool
from .base import Completion, engine_class, resolve_engine_settings
from .evaluation import grade, sample
from .placement import Placement
from .seam import RolloutBatch, RolloutRequest, ScoredPrompt, WeightSource
from .sync import stream_weights

#: finish reasons as they travel in the exchange tensors
_FINISH = ("stop", "length", "abort")
#: seed stride per step: larger than any step's prompts x samples
_STEP_SEED_STRIDE = 1_000_003


def step_seed(base_seed: int, step: int) -> int:
    return int(base_seed) + _STEP_SEED_STRIDE * int(step)


# --------------------------------------------------------------------------------------------- exchange codec


def encode(items: Sequence[ScoredPrompt], extra: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack results into (ints int64, floats float64) for a broadcast.

    ints = [P, (C_i, D_i, (len_ij, finish_ij) for j < C_i) for i < P, token ids...];
    floats = [len(extra), extra..., (rewards_i, demo_rewards_i) for i < P, log-probs...].
    """
    head, tokens, scores, logprobs = [len(items)], [], [], []
    for it in items:
        head += [len(it.completions), len(it.demo_rewards)]
        for c in it.completions:
            head += [len(c.token_ids), _FINISH.index(c.finish_reason if c.finish_reason in _FINISH else "stop")]
            tokens += c.token_ids
            logprobs += c.logprobs
        scores += list(it.rewards) + list(it.demo_rewards)
    ints = torch.tensor(head + tokens, dtype=torch.int64)
    floats = torch.tensor([float(len(extra)), *extra, *scores, *logprobs], dtype=torch.float64)
    return ints, floats


def decode(ints: torch.Tensor, floats: torch.Tensor) -> tuple[list[ScoredPrompt], list[float]]:
    """Inverse of :func:`encode`: (items, extra)."""
    iv, fv = ints.tolist(), floats.tolist()
    n_extra = int(fv[0])
    extra, fpos = fv[1:1 + n_extra], 1 + n_extra
    num, pos = iv[0], 1
    shapes = []
    for _ in range(num):
        c, d = iv[pos], iv[pos + 1]
        pos += 2
        comps = [(iv[pos + 2 * j], _FINISH[iv[pos + 2 * j + 1]]) for j in range(c)]
        pos += 2 * c
        shapes.append((comps, d))
    tpos = pos
    score_lists = []
    for comps, d in shapes:
        score_lists.append((fv[fpos:fpos + len(comps)], fv[fpos + len(comps):fpos + len(comps) + d]))
        fpos += len(comps) + d
    items = []
    for (comps, _), (rewards, demo_rewards) in zip(shapes, score_lists):
        completions = []
        for length, finish in comps:
            completions.append(Completion(token_ids=iv[tpos:tpos + length], logprobs=fv[fpos:fpos + length],
                                          finish_reason=finish))
            tpos += length
            fpos += length
        items.append(ScoredPrompt(completions=completions, rewards=rewards, demo_rewards=demo_rewards))
    return items, extra


# --------------------------------------------------------------------------------------------- the service


class RolloutService:
    """The colocated :class:`~megatron_srft.rollout.seam.Rollouts`: engines on every rank, verifier pools on every
    engine leader, and the collectives between them.

    Args:
        cfg: the whole SRFTConfig (rollout, train.reward*, data lengths, model dtype).
        groups: ParallelGroups of the trainer.
        model_dir: HF config + tokenizer the engines start from (weights arrive through the first sync).
        tokenizer: decodes completions and demonstrations for the verifier.
        weights: the trainer's :class:`~megatron_srft.rollout.seam.WeightSource` (:meth:`sync` offers it at each
            version); None = no trainer (`srft eval`): the engines load the weights in ``model_dir`` themselves and
            are never synced.
        need_engine: build engines (False: no rollouts and no evaluation; only the demos are scored).
        arch: the model's ArchSpec (caps the engine's context, sizes its CPU KV cache).
        require_think: the verifier grades only the text after </think>.
        engine_factory: ``factory(**kwargs) -> Engine`` (tests wrap the real engine to record its calls); default:
            the class registered for ``rollout.engine``.
    """

    def __init__(self, cfg, groups, model_dir: str, tokenizer, weights: Optional[WeightSource], *, need_engine: bool,
                 arch, require_think: bool,
                 engine_factory: Optional[Callable] = None) -> None:
        self.cfg, self.groups, self.tokenizer, self.weights = cfg, groups, tokenizer, weights
        self.rank = groups.rank
        replicas = collectives.all_gather_object(groups.dp_rank)
        self.placement = Placement(cfg.rollout.tensor_parallel_size, tuple(int(r) for r in replicas))
        self.engine_id = self.placement.engine_of(self.rank)
        self.is_leader = self.placement.is_leader(self.rank)
        # Without a trainer there is nobody to give the memory to, and level 2 would drop weights nobody reloads.
        self.sleep_level = int(cfg.rollout.sleep_level) if weights is not None else 0
        self.max_tokens = cfg.rollout.max_tokens or cfg.data.max_response_length
        self._synced_version: Optional[int] = None  # the version the engines hold
        self._offered: Optional[tuple[WeightSource, int]] = None  # the last sync's weights and version
        self._request: Optional[RolloutRequest] = None  # generate()'s, until collect()
        self._sync_s = 0.0
        self.engine = None
        if need_engine:
            settings = resolve_engine_settings(cfg.rollout, cfg.model.params_dtype, arch,
                                               cfg.data.max_prompt_length + cfg.data.max_response_length,
                                               num_seqs=rollout_sequences_per_engine(cfg, groups.world_size))
            factory = engine_factory or engine_class(cfg.rollout.engine)
            # vLLM builds its groups with torch.distributed.new_group, a world collective: every rank builds its
            # engine shard here, in lockstep. Dummy weights under a trainer: the first sync brings the trainer's, so
            # a converted Megatron checkpoint (config + tokenizer, no safetensors) starts an engine as well as an HF
            # directory.
            self.engine = factory(cfg=cfg.rollout, model_dir=str(model_dir), dtype=settings.dtype,
                                  seed=settings.seed, max_model_len=settings.max_model_len,
                                  kv_cache_bytes=settings.kv_cache_bytes,
                                  load_format="auto" if weights is None else "dummy")
        self.pool = None
        if self.is_leader:
            self.pool = RewardPool(cfg.train.reward, timeout_s=cfg.train.reward_timeout_s,
                                   num_workers=cfg.train.reward_workers, require_think=require_think)

    # ------------------------------------------------------------------------------------------ weights and memory

    def sync(self, weights: WeightSource, version: int) -> None:
        """Offer the trainer's weights at ``version``: the engines load them before their next generation (and not
        at all when nothing generates before the next sync). Collective."""
        if weights.version != version:
            raise RuntimeError(f"rollout service: sync offered version {version}, the weights are at "
                               f"{weights.version}")
        self._offered = (weights, version)

    def _ready(self, version: Optional[int]) -> None:
        """The engines awake with the weights of ``version`` (None: their own, no trainer) before a generation.
        Collective (streaming the weights is). Adds the seconds spent streaming to the step's ``time/sync``."""
        if self.engine is None:
            return
        if version is None and self.weights is not None:
            raise RuntimeError("rollout service: a trainer's rollouts name the policy version they sample from")
        self.engine.wake_up(["weights"])  # the KV cache only after the update: never both beside the buckets
        if version is not None:
            if self._offered is None or self._offered[1] != version:
                offered = None if self._offered is None else self._offered[1]
                raise RuntimeError(f"rollout service: asked to generate with policy version {version}, but the last "
                                   f"sync offered {offered}")
            weights = self._offered[0]
            if weights.version != version:  # the trainer moved on between the sync and this generation
                raise RuntimeError(f"rollout service: the weights offered at version {version} are now at "
                                   f"{weights.version}; sync again before generating")
            if self._synced_version != version:
                start = time.perf_counter()
                stream_weights(weights.export(), self.engine, self.cfg.rollout.sync_bucket_mb)
                self._synced_version = version
                self._sync_s += time.perf_counter() - start
        self.engine.wake_up(["kv_cache"])

    def _rest(self) -> None:
        """After a generation: give the device memory back to training."""
        if self.engine is None or self.sleep_level == 0:
            return
        self.engine.sleep(self.sleep_level)
        if self.sleep_level == 2:
            self._synced_version = None  # level 2 dropped the weights: the next wake must reload them

    # ------------------------------------------------------------------------------------------ rollouts

    def generate(self, request: RolloutRequest) -> None:
        """Record the step's request; the engines generate in :meth:`collect`, after the step's :meth:`sync`."""
        if self._request is not None:
            raise RuntimeError(f"rollout service: step {self._request.step}'s results were never collected")
        self._request = request
        self._sync_s = 0.0

    def collect(self, step: int) -> RolloutBatch:
        """Collective. Every engine generates its share of the request's prompts with the policy at its version,
        its leader scores them, and every rank receives its replica's part, in order."""
        request = self._request
        if request is None or request.step != step:
            raise RuntimeError(f"rollout service: collect({step}) without generate() for that step")
        self._request = None
        problems, num_rollouts, num_demos = request.problems, request.num_rollouts, request.num_demos
        t0 = time.perf_counter()
        shares = self.placement.shares(len(problems))
        share = shares[self.engine_id]
        mine = [problems[g] for g in share]
        gen_s, outs = 0.0, [[] for _ in mine]
        if num_rollouts > 0 and self.engine is not None:
            self._ready(request.version)
            t_gen = time.perf_counter()
            if mine:
                outs = self.engine.generate(
                    [p.prompt_ids for p in mine], n=num_rollouts, temperature=self.cfg.rollout.temperature,
                    top_p=self.cfg.rollout.top_p, max_tokens=self.max_tokens, stop=self.cfg.rollout.stop or None,
                    seeds=[step_seed(self.cfg.rollout.seed, step) + g * num_rollouts for g in share])
            gen_s = time.perf_counter() - t_gen
            self._rest()
        t_score = time.perf_counter()
        items, timeouts = self._score(mine, outs, num_demos) if self.is_leader else ([], 0)
        score_s = time.perf_counter() - t_score
        t_x = time.perf_counter()
        gen_tokens = float(sum(len(c.token_ids) for comps in outs for c in comps))
        wanted = range(len(problems))[request.replica_slice]
        results, extras = self._exchange(shares, items, [gen_tokens, gen_s, float(timeouts)], wanted)
        exchange_s = time.perf_counter() - t_x
        tokens = [x[0] for x in extras]
        metrics = {
            "rollout/num_engines": float(sum(1 for s in shares if len(s) > 0)) if num_rollouts > 0 else 0.0,
            "rollout/tokens_per_engine_max": max(tokens),
            "rollout/tokens_per_engine_min": min(tokens),
            "perf/rollout_tokens_per_s": sum(tokens) / max(max(x[1] for x in extras), 1e-9),  # a timing: perf/
            "reward/timeouts": float(sum(x[2] for x in extras)),
            "time/sync": self._sync_s, "time/generate": gen_s, "time/reward": score_s, "time/exchange": exchange_s,
            "time/rollout_total": time.perf_counter() - t0,
        }
        return RolloutBatch(prompts=[results[g] for g in wanted], metrics=metrics)

    def _score(self, problems: Sequence, outs: list, num_demos: int) -> tuple[list[ScoredPrompt], int]:
        """Leader only: rewards of every completion and of each prompt's demonstrations (same verifier)."""
        texts, answers = [], []
        for p, comps in zip(problems, outs):
            for c in comps:
                texts.append(self.tokenizer.decode(list(c.token_ids), skip_special_tokens=True))
                answers.append(p.answer)
            if num_demos:
                demo = self.tokenizer.decode(p.demo_ids, skip_special_tokens=True)
                texts += [demo] * num_demos
                answers += [p.answer] * num_demos
        scores, timeouts = self.pool.score(texts, answers) if texts else ([], 0)
        items, i = [], 0
        for comps in outs:
            k = len(comps)
            items.append(ScoredPrompt(completions=list(comps), rewards=scores[i:i + k],
                                      demo_rewards=scores[i + k:i + k + num_demos]))
            i += k + num_demos
        return items, timeouts

    def _exchange(self, shares: list[range], items: list[ScoredPrompt], extra: list[float],
                  wanted: range) -> tuple[dict[int, ScoredPrompt], list[list[float]]]:
        """Every engine leader's scored items to every rank. Returns ({global index: item} for the indices in
        ``wanted``, each engine's ``extra`` floats). One all-gather of the packed sizes, then two broadcasts per
        engine (ints, floats) from its leader; a rank decodes only the engines that served prompts it wants."""
        empty_i, empty_f = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
        ints, floats = encode(items, extra) if self.is_leader else (empty_i, empty_f)
        sizes = collectives.all_gather(torch.tensor([ints.numel(), floats.numel()], dtype=torch.int64))
        out: dict[int, ScoredPrompt] = {}
        extras: list[list[float]] = []
        for e in range(self.placement.num_engines):
            src = self.placement.leader(e)
            if src == self.rank:
                got_i, got_f = collectives.broadcast(ints, src), collectives.broadcast(floats, src)
            else:
                n_int, n_float = (int(v) for v in sizes[src].tolist())
                got_i = collectives.broadcast(torch.empty(n_int, dtype=torch.int64), src)
                got_f = collectives.broadcast(torch.empty(n_float, dtype=torch.float64), src)
            share = shares[e]
            if share and share.start < wanted.stop and wanted.start < share.stop:
                decoded, ext = decode(got_i, got_f)
                out.update((g, item) for g, item in zip(share, decoded) if g in wanted)
            else:
                ext = got_f[1:1 + int(got_f[0])].tolist()
            extras.append(ext)
        return out, extras

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, problems: Sequence, *, version: Optional[int], n_samples: int, temperature: float,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 keep_records: bool = False) -> tuple[dict[str, float], Optional[list]]:
        """Collective: every engine samples (rollout/evaluation.py ``sample``: the one evaluation generation) and
        grades its share of ``problems`` (the same list on every rank) with the policy at ``version`` (None: the
        engines' own weights, no trainer).

        Returns (metrics, records): ``eval/accuracy`` (samples scoring >= 0.5), ``eval/response_length``,
        ``eval/num_engines``, ``eval/reward_timeouts`` on every rank; with ``keep_records`` the per-problem
        records of rollout.evaluation.grade, in problem order, on global rank 0 (None elsewhere).
        """
        if self.engine is None:
            raise RuntimeError("rollout service: evaluate() needs engines (built with need_engine=True)")
        shares = self.placement.shares(len(problems))
        share = shares[self.engine_id]
        mine = [problems[g] for g in share]
        self._ready(version)
        outs = sample(self.engine, mine, self.tokenizer, first_index=share.start if mine else 0, n_samples=n_samples,
                      temperature=temperature, top_p=top_p, max_tokens=self.max_tokens,
                      seed=self.cfg.rollout.seed if seed is None else seed, stop=self.cfg.rollout.stop)
        self._rest()
        records, timeouts = grade(mine, outs, self.tokenizer, self.pool, keep_text=keep_records) \
            if self.is_leader else ([], 0)
        correct = sum(s >= 0.5 for r in records for s in r["scores"])
        count = sum(len(r["scores"]) for r in records)
        tokens = sum(sum(r["num_tokens"]) for r in records)
        correct, count, tokens, timeouts = collectives.sum_floats([correct, count, tokens, timeouts])
        metrics = {"eval/accuracy": correct / count if count else float("nan"),
                   "eval/response_length": tokens / count if count else float("nan"),
                   "eval/num_engines": float(sum(1 for s in shares if len(s) > 0)),
                   "eval/reward_timeouts": timeouts}
        if not keep_records:
            return metrics, None
        parts = collectives.gather_object(list(zip(share, records)) if self.is_leader else [], 0,
                                          self.groups.cpu_group)
        if parts is None:
            return metrics, None
        by_index = dict(item for part in parts for item in part)
        return metrics, [by_index[g] for g in range(len(problems))]

    # ------------------------------------------------------------------------------------------ life cycle

    def pending(self) -> Optional[bytes]:
        """Colocated engines never sample ahead of the step being trained: nothing is pending."""
        return None

    def restore_pending(self, data: bytes) -> list[int]:
        """A one-step-off checkpoint's batch is not used here: its step is sampled again, on-policy."""
        return []

    def describe(self) -> str:
        return (f"{self.placement.num_engines} engine(s) of rollout TP {self.cfg.rollout.tensor_parallel_size}"
                f"{'' if self.engine is not None else ' (no generation: verifier only)'}; sleep level "
                f"{self.cfg.rollout.sleep_level}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> "RolloutService":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
