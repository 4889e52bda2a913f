"""Side by side on the toy: TRL's GRPOTrainer and our ``grpo`` preset, same model, data and settings.

    python benchmarks/bench_trl.py [--steps 60] [--seeds 1] [--threads N] [--trl-python PYTHON]
                                   [--root runs/demo] [--only ours|trl] [--json FILE]

Both sides start from the demo's warmed-up toy model (``make demo``'s SFT warm-up under ``--root``; built on first
use) and train on its training problems with the settings below, then score greedy answers on the same 200
held-out problems (the demo's eval.jsonl) with the same ``exact`` reward:

    group 7 (rollouts per prompt), responses <= 64 tokens, temperature 1, top-p 1, lr 1e-4 constant, Adam
    (0.9, 0.999, eps 1e-8), no weight decay, grad clip 1.0, no KL, PPO clip 0.2, group-std-normalised
    advantages, sequence-mean of token means, 32 prompts per step, one optimizer step per rollout step,
    60 steps (``--steps`` for fewer), fp32.

TRL: ``GRPOConfig(num_generations=7, per_device_train_batch_size=224, gradient_accumulation_steps=1, beta=0,
epsilon=0.2, loss_type='grpo', scale_rewards='group', num_iterations=1, ...)`` with transformers ``generate``
(TRL's default, one padded batch) on CPU. Ours: ``training.loop.train`` with the demo's RL config (vLLM rollouts).
Each side runs in its own subprocess with the same torch thread count; TRL runs under ``--trl-python`` (an
interpreter with ``trl`` installed, e.g. a separate venv: TRL is an optional extra, never a test dependency),
ours under this interpreter.

Printed for each: median s/step (steps after ``--warmup``; the final evaluation is not part of a step), median
generation and training seconds, tokens/s (prompt + response tokens trained per second), peak RSS of the training
process (VmHWM) and held-out accuracy (greedy, 200 problems). ``run()`` (``make bench``) runs 10 steps, 1 seed, and
is skipped when no interpreter with TRL is found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by benchmarks/run.py
from bench_step import CHILD_COMMON  # noqa: E402 - the shared start of our child scripts
SETTINGS = dict(group=7, max_tokens=64, temperature=1.0, lr=1e-4, clip=0.2, prompts_per_step=32, steps=60)
DEFAULT_TRL_PYTHON = os.environ.get("SRFT_TRL_PYTHON", str(ROOT / ".venv-trl" / "bin" / "python"))

_TRL_CHILD = r"""
import json, os, statistics, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
sys.path.insert(0, args["src"])
from megatron_srft.rewards.exact import exact_score  # pure Python: the same reward as ours
from megatron_srft.data.templates import load_tokenizer  # the toy's character tokenizer, loaded as declared
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0

S = args["settings"]
rows = [json.loads(l) for l in open(args["train_file"]) if l.strip()]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])}
                          for r in rows])

def reward(completions, answer, **kw):
    return [exact_score(c[0]["content"], a) for c, a in zip(completions, answer)]

tok = load_tokenizer(args["model"])  # AutoTokenizer would swap in Qwen2's class, which drops spaces and newlines
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
cfg = GRPOConfig(
    output_dir=args["out"], seed=args["seed"], data_seed=args["seed"], use_cpu=True, bf16=False, fp16=False,
    num_generations=S["group"], per_device_train_batch_size=S["group"] * S["prompts_per_step"],
    gradient_accumulation_steps=1, num_iterations=1, max_completion_length=S["max_tokens"],
    temperature=S["temperature"], top_p=1.0, top_k=0, learning_rate=S["lr"], lr_scheduler_type="constant",
    warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
    beta=0.0, epsilon=S["clip"], loss_type="grpo", scale_rewards="group", max_steps=args["steps"],
    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    log_completions=False,
)
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok)
gen_time = []
original = trainer._generate_and_score_completions
def timed(*a, **k):
    t0 = time.perf_counter()
    out = original(*a, **k)
    gen_time.append(time.perf_counter() - t0)
    return out
trainer._generate_and_score_completions = timed
steps, cpu, logs = [], [], []
class Timer(TrainerCallback):
    def on_step_begin(self, a, state, control, **kw):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
    def on_step_end(self, a, state, control, **kw):
        steps.append(time.perf_counter() - self.t0)
        cpu.append(time.process_time() - self.c0)
    def on_log(self, a, state, control, logs=None, **kw):
        if logs:
            logs_copy = dict(logs)
            logs_copy["step"] = state.global_step
            LOGS.append(logs_copy)
LOGS = logs
trainer.add_callback(Timer())
trainer.train()
train_peak = hwm()

# greedy accuracy on the held-out problems, one left-padded batch
evals = [json.loads(l) for l in open(args["eval_file"]) if l.strip()]
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
         for r in evals]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
model = trainer.model
model.eval()
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=S["max_tokens"], do_sample=False, pad_token_id=tok.pad_token_id)
comps = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
acc = sum(exact_score(c, str(r["answer"])) for c, r in zip(comps, evals)) / len(evals)
tokens = [l["num_tokens"] for l in logs if "num_tokens" in l]
per_step_tokens = [b - a for a, b in zip([0.0] + tokens, tokens)]
open(args["result"], "w").write(json.dumps({"step_s": steps, "cpu_s": cpu, "generation_s": gen_time,
                                            "tokens": per_step_tokens,
                                            "reward": [l.get("reward") for l in logs if "reward" in l],
                                            "peak_rss_bytes": train_peak, "accuracy": acc}))
"""

_OURS_CHILD = CHILD_COMMON + r"""
def main():
    from megatron_srft.experiments.demo import rl_config
    from megatron_srft.training.loop import train
    from megatron_srft.training.metrics import read_metrics
    root = Path(args["root"])
    groups, toy, start = toy_world(root)
    if args["mode"] == "prepare":
        Path(args["result"]).write_text(json.dumps({"model": str(start), "train_file": str(toy / "train.jsonl"),
                                                    "eval_file": str(root / "eval.jsonl")}))
        return
    S = args["settings"]
    cfg = rl_config(toy, start, Path(args["out"]), "grpo", steps=args["steps"])
    cfg.train.eval_every = 0  # evaluate once, after the last step, on the 200 held-out problems
    cfg.data.eval_files = [str(root / "eval.jsonl")]
    cfg.logging.progress_bar = False
    cfg.data.seed = cfg.train.seed = cfg.rollout.seed = args["seed"]
    assert cfg.rollout.num_rollouts_per_prompt == S["group"] and cfg.train.prompts_per_step == S["prompts_per_step"]
    assert cfg.data.max_response_length == S["max_tokens"] and cfg.optimizer.lr == S["lr"]
    assert cfg.algorithm.clip_eps == S["clip"] and cfg.rollout.temperature == S["temperature"]
    apply_overrides(cfg, args["overrides"])
    cpu = cpu_marks()
    train(cfg, groups=groups)
    rows = read_metrics(Path(args["out"]))
    Path(args["result"]).write_text(json.dumps({"rows": rows, "cpu_marks": cpu, "peak_rss_bytes": hwm(),
                                                "micro_batch_tokens": cfg.train.micro_batch_tokens}))

if __name__ == "__main__":
    main()  # a normal exit: os._exit would orphan the helper processes the run started
"""


def _run_child(python: str, code: str, payload: dict, tag: str, cwd: Path, env_extra: dict) -> dict:
    """Run ``code`` under ``python``; it writes its result as JSON to ``payload['result']``."""
    name = f"{tag}_{payload.get('mode', 'train')}_{payload.get('seed', 0)}"
    script, result, log = cwd / f"{tag}_child.py", cwd / f"{name}.json", cwd / f"{name}.log"
    script.write_text(code)
    payload = dict(payload, result=str(result))
    env = dict(os.environ, OMP_NUM_THREADS=str(payload["threads"]), **env_extra)
    # Output to a file, not a pipe: helper processes a run leaves behind must not keep us waiting.
    with open(log, "w") as f:
        proc = subprocess.run([python, str(script), json.dumps(payload)], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=str(cwd))
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"bench_trl: the {tag} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ours(args, seed: int, tmp: Path) -> dict:
    out = tmp / f"ours_{seed}"
    payload = {"mode": "train", "root": str(Path(args.root).resolve()), "out": str(out), "steps": args.steps,
               "seed": seed, "threads": args.threads, "settings": SETTINGS, "overrides": list(args.set)}
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = _run_child(sys.executable, _OURS_CHILD, payload, "ours", tmp, env)
    rows = [row for row in r["rows"] if "time/step" in row]
    kept = rows[args.warmup:] or rows
    step = [row["time/step"] - row.get("time/eval", 0.0) for row in kept]
    marks = r["cpu_marks"]
    cpu = [b - a for a, b in zip(marks, marks[1:])][max(0, args.warmup - 1):]
    evals = [row["eval/accuracy"] for row in r["rows"] if row.get("eval/accuracy") is not None]
    return {"median_s_per_step": _median(step), "median_cpu_s_per_step": _median(cpu[:-1] or cpu),
            "median_generation_s": _median([row.get("time/rollout") for row in kept]),
            "median_training_s": _median([row.get("time/train", 0.0) + row.get("time/old_logprob", 0.0)
                                         for row in kept]),
            "median_tokens_per_s": _median([row.get("perf/tokens_per_s") for row in kept]),
            "peak_rss_gb": r["peak_rss_bytes"] / 1e9, "accuracy": evals[-1] if evals else None,
            "micro_batch_tokens": r["micro_batch_tokens"],
            "reward_first_last": [rows[0].get("reward/mean"), rows[-1].get("reward/mean")] if rows else None}


def _trl(args, seed: int, tmp: Path, data: dict) -> dict:
    payload = {"out": str(tmp / f"trl_{seed}"), "steps": args.steps, "seed": seed, "threads": args.threads,
               "settings": SETTINGS, "src": str(ROOT), **data}
    r = _run_child(args.trl_python, _TRL_CHILD, payload, "trl", tmp, {})
    w = args.warmup
    step, gen, tokens = r["step_s"][w:] or r["step_s"], r["generation_s"][w:] or r["generation_s"], r["tokens"][w:]
    return {"median_s_per_step": _median(step), "median_cpu_s_per_step": _median(r["cpu_s"][w:] or r["cpu_s"]),
            "median_generation_s": _median(gen),
            "median_training_s": _median([s - g for s, g in zip(step, gen)]),
            "median_tokens_per_s": _median([t / s for t, s in zip(tokens, step)]),
            "peak_rss_gb": r["peak_rss_bytes"] / 1e9, "accuracy": r["accuracy"],
            "reward_first_last": [r["reward"][0], r["reward"][-1]] if r["reward"] else None}


def trl_available(python: str) -> bool:
    if not python or not (Path(python).exists() or shutil.which(python)):
        return False
    return subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def measure(args) -> dict:
    result = {"settings": SETTINGS | {"steps": args.steps}, "threads": args.threads, "warmup_steps": args.warmup,
              "seeds": list(range(1, args.seeds + 1)), "ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench_trl.") as tmp:
        tmp = Path(tmp)
        data = _run_child(sys.executable, _OURS_CHILD,
                          {"mode": "prepare", "root": str(Path(args.root).resolve()), "threads": args.threads},
                          "ours", tmp, {"PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        for seed in result["seeds"]:
            if args.only in (None, "trl"):
                result["trl"].append(_trl(args, seed, tmp, data))
                print(f"[bench_trl] TRL  seed {seed}: {json.dumps(result['trl'][-1])}", flush=True)
            if args.only in (None, "ours"):
                result["ours"].append(_ours(args, seed, tmp))
                print(f"[bench_trl] ours seed {seed}: {json.dumps(result['ours'][-1])}", flush=True)
    for side in ("ours", "trl"):
        runs = result[side]
        if runs:
            result[f"{side}_summary"] = {k: _median([r[k] for r in runs]) for k in
                                         ("median_s_per_step", "median_cpu_s_per_step", "median_generation_s",
                                          "median_training_s", "median_tokens_per_s", "peak_rss_gb", "accuracy")}
            result[f"{side}_summary"]["accuracy_per_seed"] = [r["accuracy"] for r in runs]
    if result.get("ours_summary") and result.get("trl_summary"):
        o, t = result["ours_summary"], result["trl_summary"]
        result["speedup_ours_over_trl"] = t["median_s_per_step"] / o["median_s_per_step"]
        result["target_s_per_step"] = t["median_s_per_step"] / 1.5
    return result


def _print(result: dict) -> None:
    print(f"\nside by side ({result['threads']} thread(s), steps {result['settings']['steps']}, seeds "
          f"{result['seeds']}):")
    print(f"{'':6s} {'s/step':>8s} {'CPU s/step':>10s} {'gen s':>7s} {'train s':>8s} {'tokens/s':>9s} "
          f"{'peak RSS GB':>11s} {'accuracy':>9s}")
    for side in ("ours", "trl"):
        s = result.get(f"{side}_summary")
        if s:
            print(f"{side:6s} {s['median_s_per_step']:8.3f} {s['median_cpu_s_per_step']:10.3f} "
                  f"{s['median_generation_s']:7.3f} {s['median_training_s']:8.3f} {s['median_tokens_per_s']:9.0f} "
                  f"{s['peak_rss_gb']:11.2f} {s['accuracy']:9.1%}")
    if "speedup_ours_over_trl" in result:
        print(f"TRL s/step / ours: {result['speedup_ours_over_trl']:.2f} (target >= 1.5, i.e. ours <= "
              f"{result['target_s_per_step']:.3f} s/step)")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=SETTINGS["steps"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON,
                   help="interpreter with trl installed (default $SRFT_TRL_PYTHON, else .venv-trl/bin/python: "
                        "make bench-trl builds it)")
    p.add_argument("--root", default=str(ROOT / "runs" / "demo"), help="make demo's root (toy + SFT warm-up)")
    p.add_argument("--only", choices=["ours", "trl"])
    p.add_argument("--set", action="append", default=[], help="config override for our side (key.sub=value)")
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def run() -> dict:
    """``make bench``: 10 steps, 1 seed; skipped (with the reason) when no interpreter with TRL is found."""
    args = parse(["--steps", "10"])
    if not trl_available(args.trl_python):
        return {"trl/skipped": f"no interpreter with trl at {args.trl_python} (set SRFT_TRL_PYTHON)"}
    r = measure(args)
    out = {}
    for side in ("ours", "trl"):
        for k, v in r.get(f"{side}_summary", {}).items():
            out[f"trl/{side}_{k}"] = v
    out["trl/speedup_ours_over_trl"] = r.get("speedup_ours_over_trl")
    out["trl/steps"] = args.steps
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.only != "ours" and not trl_available(args.trl_python):
        print(f"bench_trl: no interpreter with trl at {args.trl_python}; install the extra (pip install "
              f"'megatron-srft[trl]') into a separate venv and pass --trl-python, or use --only ours", file=sys.stderr)
        return 2
    t0 = time.time()
    result = measure(args)
    result["wall_s"] = time.time() - t0
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
