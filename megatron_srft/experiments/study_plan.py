"""The toy study's plan (experiments/study.py runs it): its settings (:class:`StudySpec`), its data files, and its
training stages (:class:`Job`), each with the signature that decides whether a finished stage is reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..algorithms.presets import resolve
from ..checkpoint.atomic import write_text_atomic
from ..config import AlgorithmConfig
from ..errors import UserError
from .recipes import RECIPES, STAGES
from .toy import ToySettings, corrupt_demonstrations, make_toy

CONDITIONS = ("exact", "noisy")


@dataclass(frozen=True)
class StudySpec:
    recipes: tuple[str, ...] = ("sft", "dft", "grpo", "luffy", "sft_then_rl", "chord_mu", "chord_phi", "hpt", "srft",
                                "grpo_one_step_off", "srft_one_step_off")
    conditions: tuple[str, ...] = CONDITIONS
    seeds: tuple[int, ...] = (1, 2, 3)
    demo_error_rate: float = 0.3        # noisy condition: fraction of demonstrations with one slip
    steps: int = 40                     # optimizer steps per stage (one mini-batch per step)
    prompts_per_step: int = 16
    rollouts: int = 7                   # on-policy samples per prompt (+ 1 demonstration where a preset uses it)
    lr: float = 1e-4
    eval_every: int = 10
    warmup_steps: int = 500             # ID warm start ~65%, held-out operands ~12% (600: ID ~82%, saturating)
    warmup_lr: float = 1e-3
    warmup_prompts_per_step: int = 32
    max_prompt_length: int = 32
    max_response_length: int = 96      # rollouts and evaluation (OOD chains need ~65 tokens)
    jobs: int = 2                       # worker processes
    # a mu schedule that decays (CHORD-mu: 200 steps in its released run) is rescaled so that warm-up + decay span
    # one stage's ``steps``: mu goes from its peak to its valley within the study's budget, as it does in the
    # released run; applied from each preset's resolved settings, the same rule for every recipe
    fit_mu_schedule: bool = True
    # OOD (the headline split): additions of operands 13..19 are held out of every training, warm-up and ID
    # problem; the longer chains (5..6 operations) are a second out-of-distribution column
    toy: ToySettings = field(default_factory=lambda: ToySettings(num_train=4000, num_test=200, num_ood_test=200,
                                                                 held_out_plus_min=13, num_held_out_test=200))

    def check(self) -> None:
        bad = [r for r in self.recipes if r not in RECIPES]
        if bad:
            raise UserError(f"--recipes: unknown {', '.join(bad)}; expected some of {', '.join(RECIPES)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise UserError(f"--conditions: unknown {', '.join(bad)}; expected some of {', '.join(CONDITIONS)}")
        if not self.seeds or self.steps < 1 or self.jobs < 1:
            raise UserError("study: expected at least one seed, steps >= 1 and jobs >= 1")
        if self.toy.num_held_out_test < 1:
            raise UserError("study: the toy needs its out-of-distribution split (held_out_plus_min set, "
                            "num_held_out_test >= 1)")


@dataclass(frozen=True)
class Job:
    """One training stage: train ``stages[-1]`` from ``start`` and evaluate the result."""

    key: str                      # run directory under ROOT/runs
    stages: tuple[str, ...]       # the stage chain (recipes.STAGES) up to and including this stage
    condition: str                # exact | noisy | any (the chain uses no demonstrations)
    seed: int
    start: str                    # HF directory the stage starts from
    deps: tuple[str, ...]         # jobs that must be done first (the stage that exports ``start``)
    overrides: tuple[str, ...]    # the run's config (load_config overrides)
    signature: str = ""           # hash of everything the result depends on: data, overrides, the parent's signature
    num_ranks: int = 1            # local ranks (2: a training rank and an engine rank, one step off)


# --------------------------------------------------------------------------------------------- data and jobs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_data(root: Path, spec: StudySpec) -> dict[str, Path]:
    """The toy (reused when its settings match) and the study's files: warm-up / train (exact, noisy) / test
    splits. Returns name -> path."""
    toy = root / "toy"
    want = dataclasses.asdict(spec.toy)
    if not (toy / "toy.json").is_file() or json.loads((toy / "toy.json").read_text()) != want:
        make_toy(toy, spec.toy, overwrite=True)
    train = _read_jsonl(toy / "train.jsonl")
    half = len(train) // 2
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {"model": toy / "model", "warmup": data / "warmup.jsonl", "exact": data / "train_exact.jsonl",
             "noisy": data / "train_noisy.jsonl", **test_files(root, spec)}
    _write_jsonl(files["warmup"], train[:half])
    _write_jsonl(files["exact"], train[half:])
    _write_jsonl(files["noisy"], corrupt_demonstrations(train[half:], spec.demo_error_rate, spec.toy.seed))
    return files


def test_files(root: Path, spec: StudySpec) -> dict[str, Path]:
    """The evaluation splits, name -> file: ``id`` (held-out problems like the training ones), ``ood`` (the
    held-out operands) and, when the toy has them, ``long`` (longer chains)."""
    toy = root / "toy"
    files = {"id": toy / "test.jsonl", "ood": toy / "test_held_out.jsonl"}
    if spec.toy.num_ood_test:
        files["long"] = toy / "test_ood.jsonl"
    return files


def fitted_mu_schedule(spec: StudySpec, preset: str) -> list[str]:
    """Overrides that rescale a decaying mu schedule's warm-up and decay to span ``spec.steps`` (none when the
    preset's mu does not decay or ``spec.fit_mu_schedule`` is off)."""
    s = resolve(AlgorithmConfig(preset=preset))
    span = s.mu_warmup_steps + s.mu_decay_steps
    if not spec.fit_mu_schedule or s.sft_mix_schedule == "none" or s.mu_decay_steps == 0:
        return []
    warm = round(s.mu_warmup_steps * spec.steps / span)
    return [f"algorithm.mu_warmup_steps={warm}", f"algorithm.mu_decay_steps={spec.steps - warm}"]


def _common(spec: StudySpec, run_dir: Path, model: Path | str, train_file: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.path={model}", "model.params_dtype=fp32",
        f"data.train_files=[{train_file}]", "data.template=chat",
        f"data.max_prompt_length={spec.max_prompt_length}", f"data.max_response_length={spec.max_response_length}",
        "train.reward=exact", "train.reward_workers=1", "train.micro_batch_tokens=1024",
        "rollout.dtype=fp32", "rollout.cpu_kvcache_space_gib=1",
        "optimizer.clip_grad=1.0", "optimizer.weight_decay=0.0",
        "checkpoint.resume=never", "checkpoint.save_every=0", "checkpoint.keep_last=1", "checkpoint.export_hf=true",
        "logging.progress_bar=false", "logging.log_every=1000000",
    ]


def _signature(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_signature(spec: StudySpec) -> str:
    """The study's data files are a pure function of these (prepare_data)."""
    return _signature(dataclasses.asdict(spec.toy), spec.demo_error_rate)


def warmup_job(spec: StudySpec, root: Path, files: dict[str, Path]) -> Job:
    p = spec.warmup_prompts_per_step
    over = _common(spec, root / "runs" / "warmup", files["model"], files["warmup"]) + [
        "algorithm.preset=sft", f"train.num_steps={spec.warmup_steps}", f"optimizer.lr={spec.warmup_lr}",
        f"train.prompts_per_step={p}", f"train.prompts_per_minibatch={p}", "data.seed=0",
    ]
    return Job("warmup", ("sft",), "exact", 0, str(files["model"]), (), tuple(over),
               _signature(_data_signature(spec), over, spec.max_response_length))


def study_jobs(spec: StudySpec, root: Path, files: dict[str, Path]) -> list[Job]:
    """Every stage the spec's recipes need, deduplicated: a stage chain shared by two recipes (``sft`` and
    ``sft_then_rl``'s first stage) runs once; a chain that uses no demonstrations runs once per seed."""
    def uses_demos(stage: str) -> bool:
        return resolve(AlgorithmConfig(preset=STAGES[stage].preset)).num_demos > 0

    warm = root / "runs" / "warmup" / "hf"
    jobs: dict[str, Job] = {"warmup": warmup_job(spec, root, files)}
    for condition in spec.conditions:
        for seed in spec.seeds:
            for recipe in spec.recipes:
                stages = RECIPES[recipe]
                for i in range(len(stages)):
                    chain = stages[: i + 1]
                    cond = condition if any(uses_demos(p) for p in chain) else "any"
                    key = job_key(cond, chain, seed)
                    if key in jobs:
                        continue
                    parent = job_key(condition if any(uses_demos(p) for p in chain[:-1]) else "any", chain[:-1],
                                     seed) if i else "warmup"
                    start = warm if i == 0 else root / "runs" / parent / "hf"
                    run_dir = root / "runs" / key
                    p = spec.prompts_per_step
                    stage = STAGES[chain[-1]]
                    over = _common(spec, run_dir, start, files["exact" if cond == "any" else cond]) + [
                        f"algorithm.preset={stage.preset}", f"train.num_steps={spec.steps}", f"optimizer.lr={spec.lr}",
                        f"train.prompts_per_step={p}", f"train.prompts_per_minibatch={p}",
                        f"rollout.num_rollouts_per_prompt={spec.rollouts}", "rollout.temperature=1.0",
                        f"data.eval_files=[{files['id']}]", f"train.eval_every={spec.eval_every}",
                        "train.eval_temperature=0.0", f"data.seed={seed}", f"rollout.seed={seed}",
                        f"train.seed={seed}", *fitted_mu_schedule(spec, stage.preset), *stage.overrides,
                    ]
                    sig = _signature(jobs[parent].signature, over, spec.max_response_length)
                    jobs[key] = Job(key, chain, cond, seed, str(start), (parent,), tuple(over), sig, stage.num_ranks)
    del jobs["warmup"]
    return list(jobs.values())


def job_key(condition: str, chain: Sequence[str], seed: int) -> str:
    return f"{condition}/{'-'.join(chain)}/seed{seed}"


def recipe_run(spec: StudySpec, recipe: str, condition: str, seed: int) -> list[str]:
    """The job keys of a recipe's stages in a condition, first to last."""
    stages = RECIPES[recipe]
    keys = []
    for i in range(len(stages)):
        chain = stages[: i + 1]
        demos = any(resolve(AlgorithmConfig(preset=STAGES[p].preset)).num_demos > 0 for p in chain)
        keys.append(job_key(condition if demos else "any", chain, seed))
    return keys
