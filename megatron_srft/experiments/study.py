"""The toy study behind ``make reproduce-toy``: can the paper's three claims be seen on the CPU toy task?

Claims (arXiv 2506.19767): (1) SRFT beats SFT, GRPO, LUFFY and two-stage SFT->RL in-domain; (2) SRFT
generalises best out of distribution; (3) SRFT's rollout entropy stays flat while GRPO's collapses.

Design (every number below is a :class:`StudySpec` field, written into the report):

- Task: the toy arithmetic chains (experiments/toy.py). One toy, split once: the first half of its training problems
  warms a random tiny model up with plain SFT (the "base model" every run starts from); the second half is the
  study's training set, with its demonstrations exact (condition ``exact``) or with a stated fraction carrying one
  arithmetic slip and a wrong final answer (condition ``noisy``: imperfect the way distilled traces are).
- Test splits: in-distribution = held-out chains like the training ones (2..max_ops operations, no held-out
  operand); out-of-distribution = chains of the same lengths that add a held-out operand (``+d`` with
  d >= held_out_plus_min, which no training, warm-up or ID problem adds); longer chains = max_ops + 1 ..
  max_ops + 2 operations without held-out operands (a second OOD column). Greedy accuracy (exact reward) on each,
  after training, on the exported model.
- Budget: equal steps. Every stage trains the same number of optimizer steps on the same prompts in the same order
  (one mini-batch per step, the same learning rate); recipes differ only in their objective. ``sft_then_rl``'s
  SFT stage is the ``sft`` run itself, and its GRPO stage gets the same steps again, as in the paper's two-stage
  baseline. Wall time and generated tokens are reported, so the cost of each recipe is visible.
- Seeds: each (recipe, condition) cell runs with several seeds (prompt order and rollout sampling); results are
  mean +/- sample std over seeds. Recipes that use no demonstrations (``grpo``) do not depend on the condition and
  are run once per seed.

Jobs run in ``spec.jobs`` worker processes (each a world of one process with its own engines), a stage as soon as
the stage it starts from is done. A job whose ``result.json`` records the same signature (a hash of its data, its
settings and the signature of the stage it starts from) is not run again, so an interrupted study resumes where it
stopped and a changed setting re-runs exactly the stages that depend on it.

This module runs the study; its plan (settings, data, stages) is study_plan.py's, its report study_report.py's.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..checkpoint.atomic import write_text_atomic
from ..config import ParallelConfig, RolloutConfig, load_config
from ..data.dataset import load_problems, tokenize_problems
from ..data.templates import load_tokenizer
from ..distributed import groups as parallel
from ..models.arch import load_arch
from ..rewards.pool import RewardPool
from ..rollout.base import resolve_engine_settings
from ..rollout.evaluation import evaluate
from ..rollout.vllm_engine import VllmEngine
from ..training.loop import train
from .ranks import train_on_ranks
from .study_plan import Job, StudySpec, prepare_data, study_jobs, test_files, warmup_job
from .study_report import write_report


# --------------------------------------------------------------------------------------------- running a job

_GROUPS = None  # this process's ParallelGroups (a world of one), made once


def _groups():
    global _GROUPS
    if _GROUPS is None:
        _GROUPS = parallel.init_distributed(ParallelConfig(), seed=1234)
    return _GROUPS


def _worker_init() -> None:
    """A worker process: one thread (two workers share two cores), its own free port for its world of one."""
    os.environ.pop("MASTER_PORT", None)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.set_num_threads(1)
    _groups()


def evaluate_model(model_dir: Path, files: dict[str, Path], spec: StudySpec) -> dict[str, float]:
    """Greedy accuracy and mean response length of an HF model on each file (name -> path)."""
    tok = load_tokenizer(model_dir)
    problems = {name: tokenize_problems(load_problems(f), tok, "chat", spec.max_prompt_length, sys.maxsize)
                for name, f in files.items()}
    rollout = RolloutConfig(dtype="fp32")
    settings = resolve_engine_settings(rollout, "fp32", load_arch(model_dir),
                                       spec.max_prompt_length + spec.max_response_length)
    out: dict[str, float] = {}
    with RewardPool("exact", timeout_s=10.0, num_workers=1, require_think=False) as pool, \
            VllmEngine(rollout, str(model_dir), dtype=settings.dtype, seed=0, max_model_len=settings.max_model_len,
                       kv_cache_bytes=settings.kv_cache_bytes) as engine:
        for name, probs in problems.items():
            _, summary = evaluate(engine, probs, tok, pool, n_samples=1, temperature=0.0,
                                  max_tokens=spec.max_response_length, seed=0)
            out[f"acc_{name}"] = summary["all"]["avg@1"]
            out[f"length_{name}"] = summary["all"]["mean_response_tokens"]
            out[f"num_{name}"] = len(probs)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (reward workers), user + system."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_job(job: Job, root: str, spec: StudySpec) -> dict:
    """Train one stage and evaluate its export; ``RUN/result.json`` (reused when it records the same settings)."""
    run_dir = Path(root) / "runs" / job.key
    result_path = run_dir / "result.json"
    if result_path.is_file():
        old = json.loads(result_path.read_text())
        if job.signature and old.get("signature") == job.signature:
            return old
    cfg = load_config(None, list(job.overrides))
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if job.num_ranks > 1:  # a world split into a training and an engine rank: launched as users launch it
        train_on_ranks(list(job.overrides), job.num_ranks, run_dir.parent / f"{run_dir.name}.train.log")
    else:
        train(cfg, groups=_groups())
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    evals = evaluate_model(run_dir / "hf", test_files(Path(root), spec), spec)
    result = {"key": job.key, "stages": list(job.stages), "condition": job.condition, "seed": job.seed,
              "start": job.start, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1, **evals,
              "cpu_seconds": _cpu_seconds() - cpu0, "finished_at": time.time(), "load_average": os.getloadavg()[0],
              "signature": job.signature, "overrides": list(job.overrides)}
    write_text_atomic(result_path, json.dumps(result, indent=1) + "\n")
    return result


def run_jobs(jobs: list[Job], root: Path, spec: StudySpec, log=print) -> dict[str, dict]:
    """Run ``jobs`` respecting their dependencies, in ``spec.jobs`` worker processes (in this process when 1)."""
    done: dict[str, dict] = {}
    pending = {j.key: j for j in jobs}
    total = len(jobs)
    t0 = time.perf_counter()

    def report(r: dict) -> None:
        log(f"[study] {len(done)}/{total} {r['key']}: {r['train_seconds']:.0f}s train, ID {r['acc_id']:.1%}, "
            f"OOD {r['acc_ood']:.1%}" + (f", longer {r['acc_long']:.1%}" if "acc_long" in r else "")
            + f" ({time.perf_counter() - t0:.0f}s elapsed)")

    def ready() -> list[Job]:
        out = [j for j in pending.values() if all(d in done for d in j.deps)]
        # stages others wait for first, then the longer RL stages before SFT stages
        needed = {d for j in pending.values() for d in j.deps}
        return sorted(out, key=lambda j: (j.key not in needed, j.stages[-1] == "sft", j.key))

    if spec.jobs <= 1:
        while pending:
            batch = ready()
            if not batch:
                raise RuntimeError(f"study: unresolvable dependencies among {sorted(pending)}")
            job = batch[0]
            del pending[job.key]
            done[job.key] = run_job(job, str(root), spec)
            report(done[job.key])
        return done

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=spec.jobs, mp_context=ctx, initializer=_worker_init) as pool:
        running: dict[cf.Future, str] = {}
        while pending or running:
            for job in ready():
                if len(running) >= spec.jobs:
                    break
                del pending[job.key]
                running[pool.submit(run_job, job, str(root), spec)] = job.key
            if not running:
                raise RuntimeError(f"study: unresolvable dependencies among {sorted(pending)}")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                done[key] = fut.result()  # a failed job raises here, with its traceback
                report(done[key])
    return done


# --------------------------------------------------------------------------------------------- entry point


def run_study(root: str | Path, doc: str | Path, spec: StudySpec = StudySpec(), log=print) -> dict:
    """Data, warm-up, every stage, the report. Returns {"results": key -> result, "doc": path, "jobs": [Job],
    "files": name -> path}."""
    spec.check()
    root = Path(root)
    doc = Path(doc)
    t0 = time.perf_counter()
    files = prepare_data(root, spec)
    warm = warmup_job(spec, root, files)
    jobs = [warm] + study_jobs(spec, root, files)
    log(f"[study] {len(jobs)} training stages: {len(spec.recipes)} recipes x {len(spec.conditions)} conditions x "
        f"{len(spec.seeds)} seeds, {spec.steps} steps each, {spec.jobs} worker(s)")
    results = run_jobs(jobs, root, spec, log=log)
    path = write_report(spec, root, results, doc, warm=results["warmup"])
    log(f"[study] wrote {path} in {(time.perf_counter() - t0) / 60:.1f} minutes")
    return {"results": results, "doc": path, "jobs": jobs, "files": files}
