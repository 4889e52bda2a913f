"""The demo behind ``make demo`` (command: cli/demo.py): SRFT training for real on a 2-core CPU, in minutes.

1. builds the toy task (`srft make-toy`): a tiny Qwen2 with a character tokenizer, arithmetic chains with worked
   demonstrations, a held-out test split;
2. warms the random model up with a short plain SFT on the demonstrations (preset `sft`) and exports it to HF;
3. trains it with SRFT (preset `srft`: vLLM rollouts, verifier rewards, the four-term loss, weight sync) and
   evaluates the held-out split greedily before, during and after;
4. prints accuracy before and after and where the metrics and plots are.

``--reproduce`` (``make reproduce-toy``, :func:`run_reproduce`) runs the multi-seed study of the paper's three
claims (experiments/study.py): sft, grpo, luffy, two-stage sft_then_rl and srft from one warm start with equal
steps, exact and imperfect demonstrations, in- and out-of-distribution tests, and writes docs/toy_results.md with
its plots.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..checkpoint.atomic import write_text_atomic
from ..config import ParallelConfig, load_config
from ..distributed import groups as parallel
from ..training.loop import train
from ..training.metrics import read_metrics
from ..training.plots import plot_run
from .study import run_study
from .study_plan import StudySpec
from .toy import make_toy

#: The demo's settings. SFT warm-up: enough to be clearly above 0 on held-out problems but far from 100%.
WARMUP = dict(steps=600, lr=1e-3, prompts_per_step=32)
RL = dict(steps=60, lr=1e-4, prompts_per_step=32, rollouts=7, eval_every=10, num_eval=200)


def _common(toy: Path, run_dir: Path, model: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.path={model}", "model.params_dtype=fp32",
        f"data.train_files=[{toy / 'train.jsonl'}]", "data.template=chat",
        "data.max_prompt_length=32", "data.max_response_length=64",
        "train.reward=exact", "train.reward_workers=1", "train.micro_batch_tokens=1024",
        "rollout.dtype=fp32",
        "optimizer.clip_grad=1.0", "optimizer.weight_decay=0.0",
        "checkpoint.resume=never", "checkpoint.save_every=0", "checkpoint.keep_last=1",
    ]


def warmup_config(toy: Path, out: Path, steps: int = WARMUP["steps"]):
    return load_config(None, _common(toy, out, toy / "model") + [
        "algorithm.preset=sft", f"train.num_steps={steps}", f"optimizer.lr={WARMUP['lr']}",
        f"train.prompts_per_step={WARMUP['prompts_per_step']}",
        f"train.prompts_per_minibatch={WARMUP['prompts_per_step']}", "checkpoint.export_hf=true",
    ])


def rl_config(toy: Path, start: Path, out: Path, preset: str, steps: int = RL["steps"]):
    eval_file = out.parent / "eval.jsonl"
    return load_config(None, _common(toy, out, start) + [
        f"algorithm.preset={preset}", f"train.num_steps={steps}", f"optimizer.lr={RL['lr']}",
        f"train.prompts_per_step={RL['prompts_per_step']}", f"train.prompts_per_minibatch={RL['prompts_per_step']}",
        f"rollout.num_rollouts_per_prompt={RL['rollouts']}", "rollout.temperature=1.0",
        f"data.eval_files=[{eval_file}]", f"train.eval_every={RL['eval_every']}", "train.eval_temperature=0.0",
    ])


def _eval_subset(toy: Path, out: Path, n: int) -> Path:
    lines = (toy / "test.jsonl").read_text().splitlines()[:n]
    path = out / "eval.jsonl"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/accuracy"]) for r in read_metrics(run_dir) if r.get("eval/accuracy") is not None]


def prepare(root: Path, groups):
    """Toy task + SFT warm-up (reused if already there). Returns (toy_dir, warm-start HF dir)."""
    toy = root / "toy"
    if not (toy / "toy.json").is_file():
        make_toy(toy, overwrite=True)
    warm = root / "sft_warmup"
    if not (warm / "hf" / "config.json").is_file():
        print(f"[demo] SFT warm-up: {WARMUP['steps']} steps on demonstrations", flush=True)
        train(warmup_config(toy, warm), groups=groups)
    _eval_subset(toy, root, RL["num_eval"])
    return toy, warm / "hf"


def run_demo(root: Path) -> int:
    """The demo: toy, SFT warm-up, SRFT with evaluation; 0 when the held-out accuracy rose."""
    t0 = time.time()
    groups = parallel.init_distributed(ParallelConfig(), seed=1234)
    toy, start = prepare(root, groups)
    run = root / "srft"
    print(f"[demo] SRFT: {RL['steps']} steps, {RL['prompts_per_step']} prompts x ({RL['rollouts']} rollouts + 1 demo)",
          flush=True)
    train(rl_config(toy, start, run, "srft"), groups=groups)
    curve = _eval_curve(run)
    plots = plot_run(run)
    before, after = curve[0][1], curve[-1][1]
    print("")
    print(f"[demo] held-out accuracy (greedy, {RL['num_eval']} problems): before SRFT {before:.1%} -> after "
          f"{after:.1%}   ({' -> '.join(f'{a:.0%}' for _, a in curve)})")
    print(f"[demo] metrics: {run / 'metrics.jsonl'}   plots: {plots[0].parent if plots else '-'}")
    print(f"[demo] took {time.time() - t0:.0f}s")
    return 0 if after > before else 1


def run_reproduce(root: Path, doc: Path, **given) -> int:
    """The multi-seed study of the paper's claims (experiments/study.py); writes ``doc`` and its plots. ``given``:
    :class:`StudySpec` fields to change (None = the spec's default)."""
    spec = dataclasses.replace(StudySpec(), **{k: v for k, v in given.items() if v is not None})
    run_study(root / "study", doc, spec)
    return 0
