"""Training checkpoints: model, optimizer (incl. fp32 master weights), LR/step, RNG states, data position.

Layout of ``RUN_DIR/checkpoints/step_000010/``::

    model/        Megatron dist checkpoint of the model (checkpoint.dist.save_model; `srft convert mcore-to-hf`
                  reads it, and it loads at any TP/PP)
    optimizer/    Megatron dist checkpoint of the optimizer state (same TP/PP/DP layout to resume)
    rng/rank_R.pt per-rank RNG states (tensors only: checked by safe_load, then loaded with weights_only=True)
    state.json    step, data cursor, run_id, config snapshot, data_fingerprints (rows, bytes, CRC-32 per train file)
    srft_manifest.json  size + CRC-32 of state.json, rng/* and the manifests of model/ and optimizer/ (written last)

A checkpoint is written to ``.step_000010.tmp-<run_id>`` (atomic.temp_sibling) on every rank and renamed by rank 0
after a barrier, so a killed run never leaves a directory that looks complete. Where a step's checkpoint lives, which
one a run resumes from, and which ones rotation may delete (only this run's, older than the newest), is decided in
checkpoint/run_dir.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing

from ..errors import CheckpointError, first_line
from ..models.builder import unwrap
from . import manifest
from .atomic import fresh_dir, replace_dir, temp_sibling
from .dist import _barrier, check_readable, load_model, save_model
from .safe_load import check_torch_file, safe_torch_load
from .run_dir import checkpoint_root, data_fingerprints, read_state, rotate_checkpoints, set_aside, step_dir

# The distributed optimizer's state is saved per DP shard ("dp_reshardable": fully parallel, no gather on one
# rank); a resumed run keeps the TP/PP layout (DP may change). The model itself reshards to any layout.
_OPTIM_META = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class ResumeState:
    step: int
    data_cursor: int
    extra: dict


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
             "python": torch.from_numpy(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#: the rollouts' batches sampled ahead of the checkpoint's step (rollout/seam.py ``pending``), beside state.json
PENDING_ROLLOUTS = "rollouts_pending.safetensors"


def save_training_checkpoint(run_dir: str | Path, step: int, chunks, optimizer, *, data_cursor: int,
                             metadata: dict, keep_last: int, rank: int, arch=None,
                             extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. ``extra_files``: name -> bytes that
    rank 0 writes beside state.json (listed in the manifest; e.g. the rollouts' pending batches).

    ``metadata["run_id"]`` (checkpoint/run_dir.py) marks the checkpoint as this run's: rotation then deletes only
    this run's checkpoints older than this one, keeping the newest ``keep_last``.
    """
    root = checkpoint_root(run_dir)
    final = step_dir(run_dir, step)
    tmp = temp_sibling(final, metadata.get("run_id") or "norun")  # another run's never collides
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        fresh_dir(tmp)  # a leftover or a planted symlink is removed, never followed
        (tmp / "rng").mkdir()
    _barrier()
    save_model(chunks, tmp / "model", metadata={**metadata, "step": step}, arch=arch, atomic=False)
    model_sd = unwrap(chunks[0]).sharded_state_dict()  # maps optimizer state to params by identity
    opt_dir = tmp / "optimizer"
    if rank == 0:
        opt_dir.mkdir(exist_ok=True)
    _barrier()
    dist_checkpointing.save(optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_META), str(opt_dir))
    manifest.write_manifest_collective(opt_dir)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        state = {"step": step, "data_cursor": data_cursor, **metadata}
        state.setdefault("data_fingerprints", data_fingerprints(metadata.get("config") or {}))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    manifest.write_manifest_collective(tmp)  # last: lists state.json, rng/* and the model/ and optimizer/ manifests
    if rank == 0:
        run_id = metadata.get("run_id")
        if final.exists():
            try:
                same_run = read_state(final).get("run_id") == run_id
            except Exception:
                same_run = False
            if not same_run:  # never delete what is not ours: another run's (or an unreadable) step_N goes aside
                set_aside(final, "replaced")
        replace_dir(tmp, final)
        rotate_checkpoints(run_dir, run_id, keep_last, newest=final)
    _barrier()
    return final


def _ensure_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state until its first step, and Megatron's sharded_state_dict needs one
    to describe what it loads into: fill it with placeholders (zero grads, one step), replaced by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):  # DistributedOptimizer
            opt._init_optimizer_states_with_dummy_values()
        elif getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, getattr(opt, "config", None))


def _restore_adam_steps(optimizer, opt_sd: dict) -> None:
    """Set torch Adam's per-parameter ``step`` to the saved optimizer-step count, one tensor per parameter.

    Megatron without Apex/TE keeps Adam's step in the param groups of its checkpoint, but on load the
    dp_reshardable path copies the placeholder state's step back over it, and the non-sharded path shares one
    tensor across all parameters (torch then increments it once per parameter). Either corrupts the bias
    correction 1 - beta^t, so a resumed run would not repeat the uninterrupted one.
    """
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    sds = [opt_sd] if len(opts) == 1 else [opt_sd[i] for i in range(len(opts))]
    for opt, sd in zip(opts, sds):
        inner = getattr(opt, "optimizer", None)
        groups = (sd.get("optimizer") or {}).get("param_groups") or []
        steps = {g["step"] for g in groups if "step" in g}
        if inner is None or len(steps) != 1:
            continue
        (step,) = steps
        for state in inner.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)


def load_training_checkpoint(path: str | Path, chunks, optimizer, *, rank: int, verified: bool = False) -> ResumeState:
    """Collective. Restores model, optimizer, this rank's RNG; returns step and data cursor.

    Nothing is loaded before the checkpoint's manifest is verified (skipped when the caller ``verified`` it, as
    checkpoint/run_dir.py's plan_run does) and every pickle in it passed the allow-lists (checkpoint/safe_load.py).
    """
    path = Path(path)
    state = read_state(path)
    if not verified:
        manifest.verify_or_warn_collective(path)
    check_readable(path / "optimizer", verified=True)
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        check_torch_file(rng_file)
    load_model(chunks, path / "model", verified=True)
    model_sd = unwrap(chunks[0]).sharded_state_dict()  # maps optimizer state to params by identity
    _ensure_optimizer_state(optimizer)
    try:
        opt_sd = dist_checkpointing.load(optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                      metadata=_OPTIM_META), str(path / "optimizer"))
    except Exception as e:  # Megatron's errors name internal keys: say what the user can change
        saved = (state.get("config") or {}).get("parallel") or {}
        raise CheckpointError(
            f"{path / 'optimizer'}: the optimizer state does not fit this run (it reloads only at the TP/PP layout "
            f"it was saved with: tensor_model_parallel_size={saved.get('tensor_model_parallel_size', '?')}, "
            f"pipeline_model_parallel_size={saved.get('pipeline_model_parallel_size', '?')}, and the same model; "
            f"to change the layout start a new run from {path / 'model'}, which reshards) "
            f"[{e.__class__.__name__}: {first_line(e, 200, empty='')}]") from e
    with torch.no_grad():  # Megatron copies into the fp32 master params (leaves that require grad) in place
        optimizer.load_state_dict(opt_sd)
    _restore_adam_steps(optimizer, opt_sd)
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(safe_torch_load(rng_file))
    return ResumeState(step=int(state["step"]), data_cursor=int(state["data_cursor"]), extra=state)
