"""Run directories that cannot be mixed up: run identity, what a start does with what it finds, rotation.

A run directory holds ONE run at a time::

    RUN_DIR/srft_run.json          {"run_id": "20261125-101500-3fa2c1", "started": ...}: written when a run starts
    RUN_DIR/checkpoints/step_N/    each checkpoint's state.json carries the run_id and the config it ran with
    RUN_DIR/metrics.jsonl, config.yaml, tensorboard/, hf/, plots/, logs/
    RUN_DIR/previous_runs/<run_id>-<time>/   earlier runs moved aside by a fresh start (never deleted)

What a start does (``checkpoint.resume``):

=========  ==================================================================================================
``auto``   resume from the newest intact checkpoint of this run; none at all: start a new run
``must``   as ``auto``, but no checkpoint is an error
``never``  start a new run; a run directory that holds checkpoints is refused (choose another run_dir, ``auto``
           to continue it, or ``fresh``)
``fresh``  start a new run; the previous run's files are first moved to ``previous_runs/`` (nothing is deleted)
=========  ==================================================================================================

Leftovers of a run that never wrote a checkpoint (metrics.jsonl, config.yaml) are moved to ``previous_runs/`` by
any new start. Intact means: the manifest matches (checkpoint/manifest.py), state.json parses, and the model and
optimizer directories are complete. A damaged newest checkpoint is renamed ``step_N.damaged-<time>`` (kept, and
never again taken for a resume point) with a warning naming what was wrong, and the previous one is used.

On resume the saved config is compared with the current one (:func:`compare_configs`): fields that break an exact
resume (:data:`EXACT_RESUME_FIELDS`: data, model, seeds, batch sizes, TP/PP) are an error unless listed in
``checkpoint.allow_changes``; other changes are named in a warning. So is a training file whose contents changed
under the same path (rows, size and CRC-32 saved with each checkpoint: :func:`data_fingerprints`), unless
``data.train_files`` is listed.

Rotation (:func:`rotate_checkpoints`) deletes only checkpoints of this run, older than the newest one just
written, beyond ``keep_last``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data.dataset import fingerprint
from ..distributed import collectives
from ..errors import CheckpointError, ConfigError, UserError
from . import manifest
from .atomic import acquire_lock, release_lock, write_text_atomic
from .safe_load import check_dcp_dir, read_json

RUN_FILE = "srft_run.json"
ARCHIVE_DIR = "previous_runs"
CHECKPOINTS_DIR = "checkpoints"
#: What belongs to a run (moved together to previous_runs/ by a fresh start).
RUN_ARTEFACTS = (CHECKPOINTS_DIR, "metrics.jsonl", "config.yaml", "tensorboard", "hf", "plots", "logs", RUN_FILE)
#: ``checkpoint.resume``'s values (config.py reads them from here: the one list, checked once, by load_config).
RESUME_MODES = ("auto", "must", "never", "fresh")
#: Held (an exclusive POSIX lock) by the one trainer using the run directory; holds that trainer's host, pid and run
#: id. POSIX locks are released by the kernel when their process ends, however it ends (a stale file is simply
#: taken over), and are not inherited by forked children (a checkpoint writer left behind cannot hold the run).
LOCK_FILE = ".srft_lock"
#: Written by a start before it has a run, never the user's: a directory holding only these is still empty.
_START_LEFTOVERS = (LOCK_FILE, ARCHIVE_DIR)
#: The one name of a training checkpoint: ``checkpoints/step_000010`` (:func:`step_dir`); anything else in
#: ``checkpoints/`` (a temporary directory, one set aside) is never taken for a checkpoint.
_STEP_RE = re.compile(r"^step_(\d{6,})$")

#: Config fields (dotted paths; a section name covers all its fields) whose change breaks an exact resume: the
#: resumed run would not repeat the uninterrupted one (data order, model, random streams, batch composition), or
#: the optimizer state could not be loaded (TP/PP layout, optimizer kind).
EXACT_RESUME_FIELDS = (
    "model.path", "model.params_dtype", "model.transformer_impl", "model.fp8", "model.fp8_param",
    "model.make_vocab_size_divisible_by", "model.attention_dropout", "model.hidden_dropout",
    "data.train_files", "data.template", "data.max_prompt_length", "data.max_response_length", "data.shuffle",
    "data.seed", "train.seed", "rollout.seed",
    "train.prompts_per_step", "train.prompts_per_minibatch", "rollout.num_rollouts_per_prompt",
    "algorithm.preset", "algorithm.num_demos_per_prompt",
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
    "parallel.virtual_pipeline_model_parallel_size", "parallel.use_distributed_optimizer", "optimizer.name",
)
#: Fields never compared: where the run lives, how it is checkpointed and logged.
IGNORED_FIELDS = ("run_dir", "checkpoint", "logging")


def _log(msg: str) -> None:
    print(f"[srft] {msg}", flush=True)


def _now() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def new_run_id() -> str:
    """Sortable and unique: start time plus 24 random bits."""
    return f"{_now()}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------------------------- reading


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where the training checkpoint of ``step`` lives: ``RUN_DIR/checkpoints/step_000010``."""
    return checkpoint_root(run_dir) / f"step_{step:06d}"


def checkpoint_step(path: Path) -> Optional[int]:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(run_dir: str | Path) -> list[Path]:
    """``checkpoints/step_N`` directories that hold a state.json, oldest first (``.tmp`` leftovers ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir()
             if checkpoint_step(p) is not None and p.is_dir() and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def read_state(path: str | Path) -> dict:
    """``state.json`` of a training checkpoint; a missing or damaged one is a one-line CheckpointError."""
    state_file = Path(path) / "state.json"
    state = read_json(state_file, "incomplete or not a training checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("data_cursor"), int):
        raise CheckpointError(f"{state_file}: expected an object with integer 'step' and 'data_cursor'")
    return state


def read_run_file(run_dir: str | Path) -> Optional[dict]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            raise ValueError
        return data
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a valid run file (expected JSON with a 'run_id' string)") from None


def checkpoint_run_id(path: Path) -> Optional[str]:
    """The run id in a checkpoint's state.json (None: written before run ids existed, or unreadable)."""
    try:
        rid = json.loads((path / "state.json").read_text()).get("run_id")
    except Exception:
        return None
    return rid if isinstance(rid, str) else None


def _has_artefacts(run_dir: Path) -> list[str]:
    return [n for n in RUN_ARTEFACTS if (run_dir / n).exists()]


def _only_failure_logs(path: Path) -> bool:
    """``logs/`` holding only what a failed start writes there (cli/failures.py: error logs, failure markers)."""
    return path.name == "logs" and path.is_dir() and not path.is_symlink() and all(
        p.is_file() and (p.name.startswith(".failure-") or (p.name.startswith("error-") and p.name.endswith(".log")))
        for p in path.iterdir())


def _not_ours(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that no start of ours wrote (empty: the directory may hold a new run)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in _START_LEFTOVERS and not _only_failure_logs(p))


def _wrote_nothing(run_dir: Path) -> bool:
    """A start that failed before its first metrics or checkpoint: its run file, config.yaml and error logs are
    all it left (nothing to keep in previous_runs/)."""
    present = set(_has_artefacts(run_dir))
    return present <= {RUN_FILE, "config.yaml", "logs"} and ("logs" not in present
                                                             or _only_failure_logs(run_dir / "logs"))


# --------------------------------------------------------------------------------------------- one trainer per run

def lock_run_dir(run_dir: str | Path, run_id: Optional[str] = None) -> Path:
    """Take (or, in the process that holds it, update) the exclusive lock of ``run_dir`` (atomic.acquire_lock);
    returns the lock file. Taken before anything in the directory is read or moved; held until
    :func:`release_run_dir` or the end of the process. A second trainer gets one line naming the holder (host,
    pid, run id)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        acquire_lock(path, f"{run_dir}:", run_id=run_id)
    except UserError as e:
        raise CheckpointError(f"{e}, or choose another run_dir") from None
    return path


def release_run_dir(run_dir: str | Path) -> None:
    """Release the lock this process holds on ``run_dir`` (no-op when it holds none). The file stays: a later
    trainer takes it over."""
    release_lock(Path(run_dir) / LOCK_FILE)


# --------------------------------------------------------------------------------------------- moving aside


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to a sibling ``NAME.<why>-<time>`` that no listing takes for a checkpoint; returns it."""
    dest = path.parent / f"{path.name}.{why}-{_now()}"
    n = 1
    while dest.exists():
        dest = path.parent / f"{path.name}.{why}-{_now()}-{n}"
        n += 1
    path.rename(dest)
    return dest


def archive_run(run_dir: str | Path) -> Optional[Path]:
    """Move the run files of ``run_dir`` (:data:`RUN_ARTEFACTS`) to ``previous_runs/<run_id>-<time>/``.

    Returns the archive directory (None when there was nothing to move). Renames only: nothing is deleted.
    """
    run_dir = Path(run_dir)
    present = _has_artefacts(run_dir)
    if not present or _wrote_nothing(run_dir):  # a failed start's leftovers are taken over, not piled up
        return None
    try:
        old_id = (read_run_file(run_dir) or {}).get("run_id") or "unknown"
    except CheckpointError:
        old_id = "unknown"
    dest = run_dir / ARCHIVE_DIR / f"{old_id}-moved-{_now()}"
    n = 1
    while dest.exists():
        dest = run_dir / ARCHIVE_DIR / f"{old_id}-moved-{_now()}-{n}"
        n += 1
    dest.mkdir(parents=True)
    for name in present:
        (run_dir / name).rename(dest / name)
    return dest


def start_new_run(run_dir: str | Path) -> str:
    """Write ``srft_run.json`` with a new run id (the directory must hold no other run's files)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    write_text_atomic(run_dir / RUN_FILE,
                      json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    return run_id


# --------------------------------------------------------------------------------------------- config comparison


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _covered(path: str, patterns) -> bool:
    return any(p == "*" or path == p or path.startswith(p + ".") for p in patterns)


@dataclass
class ConfigChanges:
    breaking: list[str] = field(default_factory=list)  # "field (old -> new)", break an exact resume
    allowed: list[str] = field(default_factory=list)  # breaking ones listed in checkpoint.allow_changes
    other: list[str] = field(default_factory=list)  # everything else that changed


def compare_configs(saved: dict, current: dict, allow_changes=()) -> ConfigChanges:
    """Fields that differ between the config a checkpoint was saved with and the current one.

    Fields missing on either side (a config written by another version) are not compared.
    """
    a, b = _flatten(saved or {}), _flatten(current or {})
    out = ConfigChanges()
    for key in sorted(set(a) & set(b)):
        if _covered(key, IGNORED_FIELDS) or a[key] == b[key]:
            continue
        text = f"{key} ({a[key]!r} -> {b[key]!r})"
        if _covered(key, EXACT_RESUME_FIELDS):
            (out.allowed if _covered(key, allow_changes) else out.breaking).append(text)
        else:
            out.other.append(text)
    return out


def data_fingerprints(config: dict) -> dict[str, dict]:
    """``{path: fingerprint}`` of the config's training files (data/dataset.py ``fingerprint``): saved with every
    checkpoint, compared on resume (:func:`compare_data`)."""
    return {str(f): fingerprint(f) for f in ((config.get("data") or {}).get("train_files") or [])}


def _describe_fp(fp: dict) -> str:
    if fp.get("missing"):
        return "missing"
    return f"{fp.get('rows')} rows, {fp.get('bytes')} bytes, crc32 {fp.get('crc32')}"


def compare_data(saved: Optional[dict], config: dict) -> list[str]:
    """Training files whose contents differ from those a checkpoint was saved with ("path (old -> new)"). A
    checkpoint without fingerprints (older versions) and files not named on both sides (a path change is a
    config change) are not compared."""
    if not isinstance(saved, dict):
        return []
    current = data_fingerprints(config)
    return [f"data.train_files: {path} changed ({_describe_fp(saved[path])} -> {_describe_fp(fp)})"
            for path, fp in current.items() if isinstance(saved.get(path), dict) and saved[path] != fp]


# --------------------------------------------------------------------------------------------- verification


def checkpoint_problems(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share of what is wrong with the training checkpoint ``path`` (empty: intact).

    Every rank checks every ``world``-th file against the manifest; rank 0 also checks the structure (state.json,
    model/, optimizer/) and that every pickle is allow-listed.
    """
    problems: list[str] = []
    try:
        state = read_state(path)
        # Written before manifests and run ids existed: every manifest that does exist (model/'s, optimizer/'s) is
        # verified, and what none covers is named in a warning.
        legacy = "run_id" not in state and not manifest.has_manifest(path)
    except CheckpointError as e:
        legacy = False
        if rank == 0:
            problems.append(str(e))
    if legacy:
        found, unverified = manifest.verify_present_part(path, rank, world)
        problems += found
        if rank == 0 and not found:
            manifest.warn_unverified(unverified)
    else:
        problems += manifest.verify_part(path, rank, world)
    if rank == 0:
        for sub in ("model", "optimizer"):
            d = path / sub
            if not d.is_dir():
                problems.append(f"{d}: missing")
                continue
            try:
                check_dcp_dir(d)  # also: metadata.json and .metadata present
            except CheckpointError as e:
                problems.append(str(e))
    return sorted(set(problems))


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the run's id, and the intact checkpoint to resume from (None: a new run)."""

    run_id: str
    resume_from: Optional[Path] = None
    archived: Optional[Path] = None  # where a previous run's files went
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (set-aside path, what was wrong)
    changes: Optional[ConfigChanges] = None


def _describe_steps(ckpts: list[Path]) -> str:
    steps = [checkpoint_step(p) for p in ckpts]
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"


def _plan_on_rank0(run_dir: Path, mode: str) -> dict:
    """The file-system part of the decision (rank 0): candidates to verify, or a new run."""
    run_file = read_run_file(run_dir)
    dir_run = run_file["run_id"] if run_file else None
    ckpts = step_dirs(run_dir)
    if mode == "fresh" or not ckpts:
        if mode == "must":
            raise ConfigError(f"checkpoint.resume: 'must' but no complete checkpoint in {checkpoint_root(run_dir)}")
        if run_file is None and not ckpts:
            foreign = _not_ours(run_dir)
            if foreign:  # the user's own files: a new run there would move them
                raise ConfigError(
                    f"run_dir: {run_dir} is not empty and is not a run directory (no {RUN_FILE}; it holds "
                    f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose a new or empty directory")
        return {"candidates": [], "dir_run": None}
    if mode == "never":
        raise ConfigError(
            f"checkpoint.resume: 'never' but {run_dir} holds checkpoints of run {dir_run or '(unnamed)'} "
            f"({_describe_steps(ckpts)}); a new run there would mix with it: choose another run_dir, "
            f"'auto' to continue it, or 'fresh' to move it to {run_dir / ARCHIVE_DIR} and start over")
    # A checkpoint without a run id (older version, or an unreadable state.json) counts as this run's: if it is
    # damaged, the verification below says so.
    named = sorted({i for i in map(checkpoint_run_id, ckpts) if i is not None})
    foreign = [i for i in named if i != dir_run] if dir_run else named[1:]
    if foreign:
        raise ConfigError(
            f"checkpoint.resume: {checkpoint_root(run_dir)} holds checkpoints of more than one run "
            f"({', '.join(sorted(set(([dir_run] if dir_run else []) + named)))}); move the ones that do not belong "
            f"there, or use checkpoint.resume=fresh to move them all to {run_dir / ARCHIVE_DIR}")
    ours = ckpts
    return {"candidates": [str(p) for p in reversed(ours)], "dir_run": dir_run}


def plan_run(run_dir: str | Path, mode: str, config: dict, allow_changes=(), *, rank: int = 0,
             world: int = 1) -> RunPlan:
    """Collective (every rank calls it, with the same arguments): decide how this start uses ``run_dir``.

    ``mode``: ``checkpoint.resume``; ``config``: the current config as a dict (``config.to_dict``);
    ``allow_changes``: ``checkpoint.allow_changes``. Rank 0 does every rename; the decision (or the one-line
    error) is the same on every rank. Returns a :class:`RunPlan`; pass ``resume_from`` with ``verified=True`` to
    :func:`~megatron_srft.checkpoint.training_state.load_training_checkpoint` and ``run_id`` in the metadata of
    every checkpoint this run saves.
    """
    if not str(run_dir).strip():  # Path("") is the current directory: never a run directory by accident
        raise ConfigError("run_dir: empty; name the run's directory (it is created if missing)")
    run_dir = Path(run_dir)

    def on_rank0(fn):
        """Run fn on rank 0; its result, or its error (raised on every rank), everywhere."""
        box: dict = {}
        failure: Optional[BaseException] = None
        if rank == 0:
            try:
                box = {"ok": fn()}
            except Exception as e:  # every rank must leave the collective below, then raise the same error
                failure = e
                box = {"err": (type(e).__name__, str(e))}
        box = collectives.broadcast_object(box, 0) if world > 1 else box
        if failure is not None:
            raise failure
        if "err" in box:
            kind, msg = box["err"]
            raise (ConfigError if kind == "ConfigError" else CheckpointError)(msg)
        return box["ok"]

    def lock_then_plan() -> dict:
        lock_run_dir(run_dir)  # before anything is read or moved: one trainer per run directory
        return _plan_on_rank0(run_dir, mode)

    first = on_rank0(lock_then_plan)
    damaged: list[tuple[Path, str]] = []
    chosen: Optional[Path] = None
    for cand in map(Path, first["candidates"]):
        mine = checkpoint_problems(cand, rank, world)
        parts = collectives.all_gather_object(mine) if world > 1 else [mine]
        problems = sorted({p for part in parts for p in part})
        if not problems:
            chosen = cand
            break
        damaged.append((cand, manifest.summarize(problems)))
    if chosen is None and damaged:
        newest, why = damaged[0]
        raise CheckpointError(f"{checkpoint_root(run_dir)}: no intact checkpoint to resume from ({newest.name}: "
                              f"{why}); repair it, or use checkpoint.resume=fresh to move them aside and start over")

    def finish() -> dict:
        out: dict = {"damaged": []}
        for cand, why in damaged:  # newer than the chosen one: kept under a name no listing takes
            aside = set_aside(cand, "damaged")
            _log(f"warning: checkpoint {cand} is damaged ({why}); moved to {aside.name}, resuming from "
                 f"{chosen.name}")
            out["damaged"].append((str(aside), why))
        if chosen is not None:
            state = read_state(chosen)
            changes = compare_configs(state.get("config") or {}, config, allow_changes)
            data_changes = compare_data(state.get("data_fingerprints"), config)  # same path, other contents
            (changes.allowed if _covered("data.train_files", allow_changes) else changes.breaking).extend(data_changes)
            if changes.breaking:
                raise ConfigError(
                    f"checkpoint.resume: the config differs from the one {chosen} was saved with in fields that "
                    f"break an exact resume: {', '.join(changes.breaking)}; list them in checkpoint.allow_changes "
                    f"if deliberate, or use checkpoint.resume=fresh to start over")
            if changes.allowed:
                _log(f"warning: resuming with deliberately changed settings (checkpoint.allow_changes): "
                     f"{', '.join(changes.allowed)}")
            if changes.other:
                _log(f"note: resuming with changed settings: {', '.join(changes.other)}")
            run_id = state.get("run_id") or first["dir_run"]
            if run_id is None:  # a run directory from before run ids: adopt it
                run_id = start_new_run(run_dir)
            elif not (run_dir / RUN_FILE).is_file():
                write_text_atomic(run_dir / RUN_FILE, json.dumps({"run_id": run_id, "started": None}, indent=1))
            out.update(run_id=run_id, resume_from=str(chosen), changes=changes.__dict__)
            lock_run_dir(run_dir, run_id)
            _log(f"resuming run {run_id} from {chosen}")
            return out
        archived = archive_run(run_dir)
        if archived is not None:
            _log(f"moved the previous run's files in {run_dir} to {archived}")
        out.update(run_id=start_new_run(run_dir), resume_from=None, archived=str(archived) if archived else None)
        lock_run_dir(run_dir, out["run_id"])
        return out

    res = on_rank0(finish)
    return RunPlan(run_id=res["run_id"], resume_from=Path(res["resume_from"]) if res.get("resume_from") else None,
                   archived=Path(res["archived"]) if res.get("archived") else None,
                   damaged=[(Path(p), w) for p, w in res["damaged"]],
                   changes=ConfigChanges(**res["changes"]) if res.get("changes") else None)


# --------------------------------------------------------------------------------------------- rotation


def rotate_checkpoints(run_dir: str | Path, run_id: Optional[str], keep_last: int, newest: Path) -> list[Path]:
    """Delete checkpoints of run ``run_id`` that are older than ``newest`` (the one just written and complete),
    keeping the newest ``keep_last`` of this run (``newest`` included). Another run's checkpoint, one with a
    higher step, or one whose state.json cannot be read is never touched. Returns what was deleted."""
    newest_step = checkpoint_step(Path(newest))
    if newest_step is None or keep_last < 1:
        return []
    older = [p for p in step_dirs(run_dir)
             if checkpoint_step(p) < newest_step and checkpoint_run_id(p) == run_id
             and (run_id is not None or checkpoint_run_id(p) is None)]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    deleted = []
    for p in doomed:
        if p.is_symlink():  # not ours to delete (nor what it points to): said, not silently skipped
            _log(f"note: checkpoint rotation skips {p}: it is a symlink (to {os.readlink(p)}); remove it yourself "
                 f"if it is no longer needed")
            continue
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    return deleted
