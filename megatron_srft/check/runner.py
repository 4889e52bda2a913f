"""The node check's run: the config (the user's or one for a synthesized model), the checks in order on every
rank (each failure one FAIL line, and on to the next), the summary and the ``--out`` file."""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..checkpoint.convert import resolve_source
from ..config import ConfigError, load_config
from ..distributed import collectives as cx
from ..distributed.groups import destroy, device_for_rank
from ..distributed.layout import fp8_unsupported_reason, validate_layout
from .collectives import measure_all_reduce, start_world
from .context import GIB, Context, choose_sizes
from .device import measure_h2d, measure_matmul
from .environment import collect_environment, module_version
from .logprob_op import check_logprob_op
from .measure import free_device_memory
from .results import FAIL, PASS, SKIP, PeerFailed, Result, Skip, append_results, one_line, read_results_file
from .train_step import check_train_step, synthesize_model_dir
from .transformer_engine import check_transformer_engine
from .vllm_engine import check_vllm


def default_shape(on_gpu: bool, quick: bool, gpu_memory_gib: float) -> str:
    """The model built without --config: 1.5B-class on a GPU with >= 60 GiB, 0.5B with --quick or smaller GPUs."""
    if not on_gpu:
        return "tiny"
    return "qwen2.5-1.5b" if gpu_memory_gib >= 60 and not quick else "qwen2.5-0.5b"


def load_check_config(args, world_size: int, te_available: bool, on_gpu: bool, workdir: Path, shape: str,
                      capability: Optional[tuple[int, int]] = None):
    """The user's config (``--config`` + overrides), or one for the synthesized model (overrides apply on top).

    Without Transformer Engine, a config's FP8 / TE settings are switched off here (step 3 then runs the local
    spec and check 6 says why it skips) instead of failing the load: the check is for nodes that may lack TE.
    Likewise FP8 on a card (CUDA ``capability``) that cannot run the config's recipe: step 3 runs without FP8 and
    6b says why it skips.
    """
    user = list(args.overrides)
    if args.config:
        no_te = [] if te_available else ["model.fp8=null", "model.fp8_param=false", "model.transformer_impl=local"]
        cfg = load_config(args.config, user + no_te)
        if cfg.model.fp8 is not None and fp8_unsupported_reason(cfg.model.fp8_recipe, capability):
            cfg.model = dataclasses.replace(cfg.model, fp8=None, fp8_param=False)
        validate_layout(cfg, world_size)
        if not cfg.model.path:
            raise ConfigError("model.path: srft check --config needs the model's directory (its config.json gives "
                              "the shapes; the weights are not loaded)")
        try:  # a bad model.path is the user's to fix: one line, exit 2, before any check
            resolve_source(cfg.model.path)
        except ConfigError as e:
            raise ConfigError(f"model.path: {e}") from None
        return cfg
    if any(o.split("=", 1)[0].strip() == "model.path" for o in user):
        model_path = None
    else:
        model_path = str(synthesize_model_dir(shape, workdir / "model"))
    defaults = [f"model.params_dtype={'bf16' if on_gpu else 'fp32'}", "parallel.timeout_minutes=10",
                "rollout.sleep_level=0",  # the check never puts the engine to sleep
                f"train.prompts_per_step={world_size}", f"train.prompts_per_minibatch={world_size}"]
    if model_path:
        defaults.append(f"model.path={model_path}")
    if on_gpu:  # 1024-token sequences, 2 per micro-batch (the local spec's attention is T^2 in memory)
        defaults += ["data.max_prompt_length=256", "data.max_response_length=768", "train.micro_batch_tokens=2048"]
    else:
        defaults += ["data.max_prompt_length=16", "data.max_response_length=48", "train.micro_batch_tokens=256",
                     "rollout.sync_bucket_mb=16"]
    cfg = load_config(None, defaults + user)
    validate_layout(cfg, world_size)
    return cfg


def run_check(ctx: Context, check: Callable[[Context], Iterator[Result]], cid: str, name: str,
         subs: tuple[tuple[str, str], ...] = ()) -> None:
    """Run one check on every rank and print its lines (rank 0). ``check`` yields its lines as it goes.

    A :class:`Skip` before any line gives one SKIP line ``cid name``; an exception gives a FAIL line for the first
    sub-check (``subs``: (id, name) pairs; else ``cid``) not yet reported, and the command goes on. Any rank's
    FAIL fails the same line on rank 0 (its reason prefixed with the rank).
    """
    results: list[Result] = []
    t0 = time.perf_counter()
    try:
        for r in check(ctx):
            r.seconds, t0 = round(time.perf_counter() - t0, 2), time.perf_counter()
            results.append(r)
    except Skip as e:
        if results:  # a check skips as a whole or not at all; the rest of its lines are missing: say so
            results.append(Result(*next_line(results, subs, cid, name), FAIL, f"skipped part-way: {e}"))
        else:
            results.append(Result(cid, name, SKIP, str(e) or "not applicable here"))
    except Exception as e:  # noqa: BLE001 - one line, and on to the next check
        results.append(Result(*next_line(results, subs, cid, name), FAIL, one_line(e)))
    if ctx.groups is not None and cx.world_size() > 1:
        everyone = cx.all_gather_object([(r.id, r.status, r.detail) for r in results])
        for rank, theirs in enumerate(everyone):
            if rank == ctx.rank:
                continue
            for fid, status, detail in theirs:
                if status != FAIL:
                    continue
                if detail.startswith(PeerFailed.__name__):
                    continue
                mine = next((r for r in results if r.id == fid), None)
                if mine is None:
                    fname = dict(subs).get(fid, name)
                    results.append(Result(fid, fname, FAIL, f"rank {rank}: {detail}"))
                elif mine.status != FAIL or mine.detail.startswith(PeerFailed.__name__):
                    mine.status, mine.detail = FAIL, f"rank {rank}: {detail}"
    for r in results:
        ctx.results.append(r)
        if ctx.is_printer:
            print(r.line(), flush=True)


def next_line(results: list[Result], subs: tuple[tuple[str, str], ...], cid: str, name: str) -> tuple[str, str]:
    """(id, name) of the first sub-check not yet reported (``cid``, ``name`` for a single-line check)."""
    done = {r.id for r in results}
    return next(((i, n) for i, n in subs if i not in done), (cid, name))


def _entry(ctx: Context, seconds: float) -> dict:
    counts = {k: sum(r.status == k for r in ctx.results) for k in (PASS, FAIL, SKIP)}
    p = ctx.cfg.parallel
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "srft check" + (" --quick" if ctx.args.quick else "") + (f" --config {ctx.args.config}"
                                                                           if ctx.args.config else ""),
        "quick": bool(ctx.args.quick),
        "config": ctx.args.config,
        "model": ctx.sizes.model_shape if not ctx.args.config else ctx.cfg.model.path,
        "card": ctx.machine.get("card") or "cpu",
        "driver": ctx.machine.get("driver"),
        "machine": ctx.machine,
        "versions": ctx.versions,
        "world_size": ctx.world_size,
        "layout": {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                   "dp": ctx.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)},
        "seconds": round(seconds, 1),
        "summary": counts,
        "checks": [dataclasses.asdict(r) for r in ctx.results],
    }

def run(args) -> int:
    """``srft check``: every check in order on every rank, the lines printed on rank 0, the results appended to
    ``--out``; 1 when any check failed."""
    started = time.perf_counter()
    # vLLM logs to stdout; keep the check's lines readable (set VLLM_LOGGING_LEVEL to see more)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    on_gpu = torch.cuda.is_available()
    device = device_for_rank()
    gpu_ok = on_gpu and device.index < torch.cuda.device_count()
    if gpu_ok:
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_mem = torch.cuda.get_device_properties(device).total_memory / GIB if gpu_ok else 0.0
    te = bool(on_gpu and module_version("transformer_engine"))
    capability = tuple(torch.cuda.get_device_capability(device)) if gpu_ok else None
    read_results_file(Path(args.out))  # before the run: results that could not be written would be lost
    workdir = Path(tempfile.mkdtemp(prefix="srft_check_"))
    try:
        shape = default_shape(on_gpu, args.quick, gpu_mem)
        cfg = load_check_config(args, world_size, te, on_gpu, workdir, shape, capability)
        sizes = choose_sizes(on_gpu, args.quick, cfg.parallel.pipeline_model_parallel_size)
        sizes.model_shape = shape if cfg.model.path == str(workdir / "model") else None  # synthesized?
        ctx = Context(args=args, cfg=cfg, sizes=sizes, on_gpu=on_gpu, device=device, workdir=workdir,
                      rank=int(os.environ.get("RANK", "0")), world_size=world_size, capability=capability)
        start_world(ctx)
        if ctx.is_printer:
            p = cfg.parallel
            print(f"srft check: {world_size} rank(s) on {'GPU' if on_gpu else 'CPU'}, TP "
                  f"{p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size}, "
                  f"{'quick' if args.quick else 'full'} sizes, model {sizes.model_shape or cfg.model.path}, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
        run_check(ctx, collect_environment, "1a", "environment")
        run_check(ctx, measure_matmul, "1b", "matmul")
        run_check(ctx, measure_h2d, "1c", "host->device")
        run_check(ctx, measure_all_reduce, "2", "all-reduce")
        world = _skip_without_world if ctx.world_error else None
        run_check(ctx, world or check_train_step, "3", "train step", (("3a", "train step"), ("3b", "MFU datasheet")))
        run_check(ctx, world or check_logprob_op, "4", "logprob op")
        run_check(ctx, world or check_vllm, "5", "vllm",
             (("5a", "vllm engine"), ("5b", "weight sync"), ("5c", "mismatch")))
        run_check(ctx, world or check_transformer_engine, "6", "TE step",
                  (("6a", "TE bf16 step"), ("6b", "TE FP8 step")))
        ctx.handle = None
        free_device_memory()
        entry = _entry(ctx, time.perf_counter() - started)
        failed = entry["summary"][FAIL]
        if ctx.is_printer:
            append_results(Path(args.out), entry)
            print(f"srft check: {entry['summary'][PASS]} PASS, {failed} FAIL, {entry['summary'][SKIP]} SKIP in "
                  f"{entry['seconds']:.0f} s; appended to {args.out}", flush=True)
        return 1 if failed else 0
    finally:
        try:
            destroy()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _skip_without_world(ctx: Context) -> Iterator[Result]:
    raise Skip("needs the distributed world, which did not start (see 2)")
    yield  # a generator, like every check
