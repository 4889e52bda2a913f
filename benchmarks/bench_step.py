"""One toy RL step broken into its phases, and inside them the costs that are ours.

    python benchmarks/bench_step.py [--preset grpo] [--steps 8] [--warmup 2] [--threads N] [--root runs/demo]
                                    [--src DIR] [--set key=value ...] [--no-profile]

The step is the demo's (``megatron_srft.experiments.demo``): the warmed-up toy model (``make demo``'s SFT warm-up under
``--root``, built on first use, ~10 min on 2 cores), 32 prompts x 7 rollouts, 64-token responses, temperature 1,
lr 1e-4, one optimizer step per rollout step, no evaluation. Each measurement runs ``training.loop.train`` in a
fresh subprocess (its own interpreter, so peak RSS is the training process's own: VmHWM):

1. plain: the phase medians over the steps after ``--warmup`` from metrics.jsonl (``time/<phase>``), the
   process CPU seconds per step (robust when other processes share the cores), tokens/s and peak RSS;
2. profiled (cProfile): per step, the cumulative seconds of the functions that are ours (packing, the Python
   per-token work, the loss, metric reductions, the CPU layer's function mode, host syncs) and of vLLM's request
   scheduling next to its model execution. cProfile slows Python-heavy code more than kernels: read the profiled
   column as shares of the profiled step, not as seconds of a plain step.

``--src`` runs another checkout's package (before/after comparisons). ``run()`` is what ``make bench`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (label, file substring, function name): the costs reported from the profile, per step. A function missing
#: here is simply absent from the report, so tests/test_benchmarks.py checks that each one is defined where named.
OURS = [
    ("rollout: our generate() wrapper, vLLM included", "megatron_srft/rollout/vllm_engine.py", "generate"),
    ("rollout: vLLM LLM.generate", "vllm/entrypoints/llm.py", "generate"),
    ("rollout: vLLM scheduler.schedule", "vllm/v1/core/sched/scheduler.py", "schedule"),
    ("rollout: vLLM scheduler.update_from_output", "vllm/v1/core/sched/scheduler.py", "update_from_output"),
    ("rollout: vLLM output processing", "vllm/v1/engine/output_processor.py", "process_outputs"),
    # (vLLM's CPUModelRunner inherits execute_model from GPUModelRunner: profiled under the GPU runner's file)
    ("rollout: vLLM model runner execute_model", "vllm/v1/worker/gpu_model_runner.py", "execute_model"),
    ("rollout: vLLM sample_tokens", "vllm/v1/worker/gpu_model_runner.py", "sample_tokens"),
    ("reward: verifier scoring", "megatron_srft/rollout/service.py", "_score"),
    ("groups: build_groups (advantages)", "megatron_srft/training/loop.py", "build_groups"),
    ("packing: pack_micro_batches", "megatron_srft/training/batch.py", "pack_micro_batches"),
    ("packing: _build (per-sequence tensors)", "megatron_srft/training/batch.py", "_build"),
    ("old log-probs: attach_old_logprobs", "megatron_srft/training/loop.py", "attach_old_logprobs"),
    ("train: train_minibatch", "megatron_srft/training/step.py", "train_minibatch"),
    ("train: Megatron schedule (fwd+bwd, all micro-batches)", "megatron_srft/training/step.py", "_schedule"),
    ("train: model_forward", "megatron_srft/training/batch.py", "model_forward"),
    ("train: attention core per segment", "megatron_srft/models/local_spec.py", "_segments"),
    ("train: RMSNorm", "megatron_srft/models/local_spec.py", "forward"),
    ("train: log-prob + entropy op (fwd)", "megatron_srft/ops/logprob.py", "forward"),
    ("train: log-prob + entropy op (bwd)", "megatron_srft/ops/logprob.py", "backward"),
    ("train: loss srft_objective", "megatron_srft/algorithms/losses.py", "srft_objective"),
    ("train: token_batch", "megatron_srft/training/step.py", "token_batch"),
    ("train: compute_normalizers", "megatron_srft/training/step.py", "compute_normalizers"),
    ("metrics: accumulate", "megatron_srft/algorithms/metrics.py", "accumulate"),
    ("metrics: _reduce_metrics", "megatron_srft/training/step.py", "_reduce_metrics"),
    ("metrics: finalize", "megatron_srft/algorithms/metrics.py", "finalize"),
    ("metrics: reduce_stats", "megatron_srft/training/loop.py", "reduce_stats"),
    ("metrics: logger.log", "megatron_srft/training/metrics.py", "log"),
    ("train: optimizer step", "megatron/core/optimizer/optimizer.py", "step"),
    ("sync: stream_weights", "megatron_srft/rollout/sync.py", "stream_weights"),
]
#: Host syncs and per-op overheads: (label, cProfile's name for a C function, or (file, function)); tottime.
OVERHEADS = [
    ("host sync: Tensor.item", "{method 'item' of 'torch._C.TensorBase' objects}"),
    ("host sync: Tensor.tolist", "{method 'tolist' of 'torch._C.TensorBase' objects}"),
    ("CPU layer: function-mode overhead (own time)", ("megatron_srft/distributed/cpu_compat.py", "__torch_function__")),
]

#: The start of every benchmark child script that trains the toy with our loop (bench_step, bench_trl's "ours").
CHILD_COMMON = r"""
import json, os, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0

def toy_world(root):
    # (groups, toy dir, warm-start model) of the demo's toy, prepared once under root
    from megatron_srft.experiments.demo import prepare
    from megatron_srft.config import ParallelConfig
    from megatron_srft.distributed import groups as parallel
    groups = parallel.init_distributed(ParallelConfig(), seed=1234)
    toy, start = prepare(Path(root), groups)
    return groups, toy, start

def apply_overrides(cfg, overrides):
    from megatron_srft.typed_yaml import merge, parse_override
    for ov in overrides:
        keys, value = parse_override(ov)
        for k in reversed(keys):
            value = {k: value}
        merge(cfg, value, "", "--set: ")

def cpu_marks():
    # process CPU seconds at every logged step (next to the loop's wall-clock phases), filled as the run logs
    from megatron_srft.training import metrics as M
    marks, original_log = [], M.MetricsLogger.log
    def log(self, step, metrics):
        marks.append(time.process_time())
        return original_log(self, step, metrics)
    M.MetricsLogger.log = log
    return marks
"""

_CHILD = CHILD_COMMON + r"""
def main():
    from megatron_srft.experiments.demo import rl_config
    groups, toy, start = toy_world(args["root"])
    if args["mode"] == "prepare":
        Path(args["result"]).write_text("{}")
        return
    cfg = rl_config(toy, start, Path(args["out"]), args["preset"], steps=args["steps"])
    cfg.data.eval_files, cfg.train.eval_every, cfg.logging.progress_bar = [], 0, False
    apply_overrides(cfg, args["overrides"])
    cpu = cpu_marks()
    from megatron_srft.training.loop import train
    if args["mode"] == "profile":
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        train(cfg, groups=groups)
        prof.disable()
        prof.dump_stats(args["prof"])
    else:
        train(cfg, groups=groups)
    Path(args["result"]).write_text(json.dumps({"cpu_marks": cpu, "peak_rss_bytes": hwm(),
                                                "micro_batch_tokens": cfg.train.micro_batch_tokens}))

if __name__ == "__main__":
    main()  # a normal exit: os._exit would orphan the helper processes the run started
"""


def _child(mode: str, args, out: Path, prof: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(args.src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    result, log = out.parent / f"{mode}.result.json", out.parent / f"{mode}.log"
    payload = {"mode": mode, "root": str(Path(args.root).resolve()), "out": str(out), "preset": args.preset,
               "steps": args.steps, "threads": args.threads, "overrides": list(args.set), "prof": str(prof),
               "result": str(result)}
    script = out.parent / "bench_step_child.py"
    script.write_text(_CHILD)
    # Output to a file, not a pipe: helper processes the run leaves behind must not keep us waiting.
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(script), json.dumps(payload)], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=str(out.parent))
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"bench_step: the {mode} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def _phases(run_dir: Path, warmup: int) -> tuple[dict, list[dict]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    kept = rows[warmup:] if len(rows) > warmup else rows
    keys = sorted({k for r in kept for k in r if k.startswith("time/")})
    return {k[len("time/"):]: statistics.median(r.get(k, 0.0) for r in kept) for k in keys}, rows


def _profile_table(prof: Path, steps: int) -> dict[str, dict]:
    import pstats

    stats = pstats.Stats(str(prof)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    profiled_step = None
    out: dict[str, dict] = {}
    for (file, _line, name), (_cc, nc, tt, ct, _callers) in stats.items():
        if file.endswith("megatron_srft/training/loop.py") and name == "train":
            profiled_step = ct / steps
        for label, where, func in OURS:
            if name == func and where in file:
                row = out.setdefault(label, {"calls_per_step": 0.0, "s_per_step": 0.0})
                row["calls_per_step"] += nc / steps
                row["s_per_step"] += ct / steps
        for label, key in OVERHEADS:
            hit = name == key if isinstance(key, str) else (key[0] in file and name == key[1])
            if hit:
                row = out.setdefault(label, {"calls_per_step": 0.0, "s_per_step": 0.0})
                row["calls_per_step"] += nc / steps
                row["s_per_step"] += tt / steps
    for row in out.values():
        row["share_of_profiled_step"] = row["s_per_step"] / profiled_step if profiled_step else None
    out["(profiled train() per step, start-up included)"] = {"s_per_step": profiled_step}
    return out


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_step.") as tmp:
        tmp = Path(tmp)
        _child("prepare", args, tmp / "prepare")
        plain = _child("plain", args, tmp / "plain")
        phases, rows = _phases(tmp / "plain", args.warmup)
        marks = plain["cpu_marks"]
        cpu_steps = [b - a for a, b in zip(marks, marks[1:])][max(0, args.warmup - 1):]
        tokens = [r.get("perf/tokens_per_s", 0.0) for r in rows[args.warmup:]]
        result = {
            "preset": args.preset, "steps": args.steps, "warmup_steps": args.warmup, "threads": args.threads,
            "micro_batch_tokens": plain.get("micro_batch_tokens"), "overrides": list(args.set),
            "median_s_per_step": phases.get("step"), "phases_median_s": phases,
            "median_cpu_s_per_step": statistics.median(cpu_steps) if cpu_steps else None,
            "median_tokens_per_s": statistics.median(tokens) if tokens else None,
            "peak_rss_gb": plain["peak_rss_bytes"] / 1e9,
            "rollout_accuracy_per_step": [r.get("accuracy/rollout") for r in rows],
        }
        if args.profile:
            prof = tmp / "step.prof"
            _child("profile", args, tmp / "profiled", prof)
            result["profile_per_step"] = _profile_table(prof, args.steps)
    return result


def _print(result: dict) -> None:
    print(f"\n{result['preset']}: median {result['median_s_per_step']:.3f} s/step (CPU {result['median_cpu_s_per_step']:.3f}"
          f" s/step), {result['median_tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_gb']:.2f} GB, "
          f"micro_batch_tokens {result['micro_batch_tokens']}, {result['threads']} thread(s)")
    for k, v in sorted(result["phases_median_s"].items(), key=lambda kv: -kv[1]):
        print(f"  phase {k:<14s} {v:8.3f} s")
    prof = result.get("profile_per_step")
    if prof:
        print("  profiled (cProfile; cumulative s per step, calls per step, share of the profiled step):")
        for label, row in prof.items():
            share = row.get("share_of_profiled_step")
            print(f"    {label:<58s} {row['s_per_step']:8.3f} s  {row.get('calls_per_step', 0):9.0f} calls  "
                  + (f"{share:6.1%}" if share is not None else ""))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="grpo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    p.add_argument("--root", default=str(ROOT / "runs" / "demo"), help="make demo's root (toy + SFT warm-up)")
    p.add_argument("--src", default=str(ROOT), help="the checkout whose megatron_srft runs")
    p.add_argument("--set", action="append", default=[], help="config override key.sub=value (repeatable)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def run() -> dict:
    """``make bench``: 6 grpo steps (2 warm-up), profiled; flat numbers for benchmarks/results.json."""
    args = parse(["--steps", "6", "--warmup", "2"])
    r = measure(args)
    out = {f"step/{k}": v for k, v in r.items() if k not in ("phases_median_s", "profile_per_step")}
    out.update({f"step/phase_{k}_s": v for k, v in r["phases_median_s"].items()})
    for label, row in (r.get("profile_per_step") or {}).items():
        out[f"step/profiled/{label}"] = round(row["s_per_step"], 4) if row.get("s_per_step") else row.get("s_per_step")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.time()
    result = measure(args)
    result["wall_s"] = time.time() - t0
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
