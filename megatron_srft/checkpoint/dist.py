"""Model checkpoints in Megatron's distributed format (torch_dist), loadable at any TP/PP layout.

Layout of a model checkpoint directory ``PATH/``::

    PATH/                 Megatron dist_checkpointing files (torch_dist: *.distcp, .metadata, common.pt,
                          metadata.json)
    PATH/srft_model.json  our metadata: family, padded_vocab_size, params_dtype, num_layers, hf_config, step, ...
    PATH/srft_manifest.json  size + CRC-32 of every file above, written last (checkpoint/manifest.py)

Loading checks every pickle the load would unpickle against allow-lists first (checkpoint/safe_load.py) and
verifies the manifest: a damaged or hostile checkpoint is a one-line CheckpointError naming the file.

Global tensor shapes do not depend on the layout (the vocab padding is TP-independent, see
docs/architecture.md), so Megatron reshards on load: save at TP=2, load at PP=2.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from ..distributed import collectives
from ..dtypes import dtype_name
from ..errors import CheckpointError, ConfigError, first_line
from ..models.builder import unwrap
from ..signals import children_ignore_stop_signals
from . import manifest
from .atomic import die_with_parent, forked_children_die_with_this_process, fresh_dir, replace_dir, temp_sibling
from .manifest import write_manifest_collective
from .safe_load import check_dcp_dir

META_FILE = "srft_model.json"


def _rank() -> int:
    return collectives.rank()


def _barrier() -> None:
    collectives.barrier()


def _sharded_state_dict(chunks: list) -> dict:
    # The outer keys are not stored: ShardedTensor keys are global names (layer offsets applied), which is
    # what makes the checkpoint independent of TP/PP/VPP. Always from the bare GPTModel: Megatron's DDP
    # wrapper has no sharded_state_dict of its own and would prefix every key with "module.".
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def model_metadata(chunks: list, arch=None) -> dict:
    """Shape facts about the model (padded vocab, dtype, layers) plus the HF config when ``arch`` is given."""
    model = unwrap(chunks[0])
    dtype = next(model.parameters()).dtype
    meta = {"padded_vocab_size": int(model.vocab_size), "params_dtype": dtype_name(dtype) or str(dtype),
            "num_layers": int(model.config.num_layers)}
    if arch is not None:
        meta.update(family=arch.family, architecture=arch.architecture, hf_config=arch.hf_config)
    return meta


def _own_storage_for_views(sharded_sd: dict, chunks: list) -> None:
    """Give every ShardedTensor that is a view its own storage, and free each parameter once all of its views
    have been copied. For a model that is saved and then discarded (conversion) only.

    Why: Megatron splits SwiGLU's fused fc1 [gate; up] into two ShardedTensors that are views of the parameter,
    and its filesystem writer clones every view before writing anything: a second copy of all fc1 weights (about
    half of a 7B model) would be resident at once. Copying here one parameter at a time and dropping the original
    keeps the peak at one parameter beyond the model.
    """
    apply_factories(sharded_sd)
    params = {p.untyped_storage().data_ptr(): p for c in chunks for p in unwrap(c).parameters()}
    views: dict[int, list] = {}
    for sh in nested_values(sharded_sd):
        if isinstance(sh, ShardedTensor) and torch.is_tensor(sh.data):
            storage = sh.data.untyped_storage()
            if storage.size() != sh.data.numel() * sh.data.element_size():
                views.setdefault(storage.data_ptr(), []).append(sh)
    for ptr, shs in views.items():
        for sh in shs:
            sh.data = sh.data.clone()
        if ptr in params:
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype)


def start_checkpoint_writer() -> None:
    """Start the process behind Megatron's checkpoint write-results queue now, ignoring the stop signals.

    megatron-core creates that queue (a ``multiprocessing`` Manager: a spawned server process) at the first
    ``dist_checkpointing.save`` of a process and keeps it for the process's life. torchrun forwards a stop signal
    to the trainer's whole process group, and a manager killed by it breaks every later save (``Broken pipe``):
    so the manager is started inside :func:`~megatron_srft.signals.children_ignore_stop_signals`. The training
    loop calls this at start-up, before its stop handlers exist, so that no signal can fall into the ignored
    window; :func:`save_model` calls it too (a no-op once the queue exists). A megatron-core without this
    private queue needs nothing.
    """
    forked_children_die_with_this_process()  # the writers forked at each save end with this process (kill -9)
    get_queue = getattr(filesystem_async, "_get_write_results_queue", None)
    if get_queue is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    with children_ignore_stop_signals():
        if hasattr(filesystem_async, "_results_queue"):  # ctx.Manager() as megatron-core's, dying with us
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=die_with_parent, initargs=(os.getpid(),))  # no orphan after a kill -9
            filesystem_async._results_queue = manager.Queue()
        else:
            get_queue()


def save_model(chunks: list, path: str | Path, metadata: Optional[dict] = None, *, arch=None,
               atomic: bool = True, consume: bool = False) -> Path:
    """Collective (every rank calls it): save the model chunks as a torch_dist checkpoint at ``path``.

    ``metadata`` (JSON-serialisable: step, ...) is written to ``path/srft_model.json`` together with
    :func:`model_metadata` (pass ``arch`` so that ``srft convert mcore-to-hf`` needs no other file).
    ``atomic``: write to the sibling ``.PATH.tmp`` (atomic.temp_sibling) and rename when complete (False when the
    caller already writes into its own temporary directory).
    ``consume``: the model is not used afterwards (conversion): its memory is given up during the save, which
    keeps the peak near one copy of the model (see :func:`_own_storage_for_views`).
    """
    path = Path(path)
    target = temp_sibling(path) if atomic else path
    if _rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh_dir(target)  # a leftover or a planted symlink is removed, never followed
    _barrier()
    meta = {**model_metadata(chunks, arch), **(metadata or {})}
    sharded_sd = _sharded_state_dict(chunks)
    if consume:
        _own_storage_for_views(sharded_sd, chunks)
    start_checkpoint_writer()
    dist_checkpointing.save(sharded_sd, str(target))
    if _rank() == 0:
        (target / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    write_manifest_collective(target)  # last: its presence says every file above is complete
    if atomic and _rank() == 0:
        replace_dir(target, path)
    _barrier()
    return path


def read_metadata(path: str | Path) -> dict:
    """``srft_model.json`` of a model checkpoint (``{}`` when absent)."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return {}
    try:
        out = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{meta}: not valid UTF-8 (damaged)") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{meta}: expected a JSON object")
    return out


def is_model_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / "metadata.json").is_file() and ((p / ".metadata").is_file() or (p / "common.pt").is_file())


def _load_in_place(chunks: list, path: Path) -> None:
    """Load straight into the parameters' storage, for one process with one chunk (conversion).

    With Megatron's factories applied beforehand, SwiGLU's fc1 halves are requested as views of the parameter and
    no merge (a concatenated copy of every fc1, about half of a 7B model) is made after loading. A value that the
    loader returns in new storage is copied into its view.
    """
    sharded_sd = _sharded_state_dict(chunks)
    apply_factories(sharded_sd)
    views: list = []

    def collect(node):
        if isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)
        elif isinstance(node, ShardedTensor):
            views.append(node.data)  # taken before the load, which may replace the request's entries

    collect(sharded_sd)
    state = dist_checkpointing.load(sharded_sd, str(path))

    def pairs(request, result, out):
        if isinstance(request, dict):
            for k, v in request.items():
                pairs(v, result[k], out)
        elif isinstance(request, list):
            for v, r in zip(request, result):
                pairs(v, r, out)
        elif isinstance(request, ShardedTensor):
            out.append(result)

    loaded: list = []
    pairs(sharded_sd, state, loaded)
    if len(loaded) != len(views):  # the loader changed the request's structure: never guess
        raise ConfigError(f"{path}: loaded {len(loaded)} tensors for {len(views)} requested")
    with torch.no_grad():
        for view, value in zip(views, loaded):
            if value.data_ptr() != view.data_ptr():
                view.copy_(value)


def _without_absent_extra_state(sharded_sd: dict, path: Path) -> dict:
    """Drop the requests for ``_extra_state`` that the checkpoint does not hold.

    Transformer Engine's modules carry ``_extra_state`` (FP8 scaling bookkeeping), which Megatron requests as
    ShardedObjects; a checkpoint written with the local spec (conversion on CPU, CPU runs) has none, and
    dist_checkpointing would refuse the whole load for their absence. Such modules keep their freshly initialised
    state. Weights are never dropped, and extra state the checkpoint does hold (an FP8 run's resume) is loaded.
    """
    def extra_state_key(node) -> Optional[str]:
        """The key the checkpoint's metadata lists ``node`` under, for an ``_extra_state`` request (else None).

        Megatron keys ShardedObjects by ``unique_key`` (``...linear_qkv._extra_state/shard_0_1``), not ``key``."""
        key = getattr(node, "key", None)
        if not (isinstance(key, str) and "_extra_state" in key):
            return None
        return getattr(node, "unique_key", key)

    def keys(node) -> list:
        if isinstance(node, dict):
            return [k for v in node.values() for k in keys(v)]
        if isinstance(node, list):
            return [k for v in node for k in keys(v)]
        key = extra_state_key(node)
        return [] if key is None else [key]

    wanted = keys(sharded_sd)
    if not wanted:
        return sharded_sd
    keep = set(load_sharded_metadata(str(path))) | {None}  # None: not an _extra_state request

    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if extra_state_key(v) in keep}
        if isinstance(node, list):
            return [prune(v) for v in node]
        return node

    return prune(sharded_sd)


def check_readable(path: str | Path, *, verified: bool = False) -> None:
    """Collective: everything a load of the torch_dist directory ``path`` will read is intact (its manifest, unless
    the caller ``verified`` it already) and holds nothing executable (safe_load). Raises CheckpointError."""
    path = Path(path)
    if not verified:
        manifest.verify_or_warn_collective(path)
    check_dcp_dir(path)


def _load_failure(e: BaseException) -> str:
    """The first line of what went wrong in a failed load (torch wraps per-rank failures in ``e.failures``)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))
        if isinstance(e, tuple):  # (exception, traceback) in some torch versions
            e = e[0]
    if isinstance(e, KeyError) and e.args:
        return f"the checkpoint has no tensor {e.args[0]!r}"
    return first_line(e, 300)


def load_model(chunks: list, path: str | Path, *, in_place: bool = False, verified: bool = False) -> dict:
    """Collective: load a torch_dist model checkpoint into the chunks (any TP/PP layout). Returns its metadata.

    The directory is checked first (:func:`check_readable`; ``verified``: its manifest was verified already)."""
    path = Path(path)
    if not is_model_checkpoint(path):
        raise ConfigError(f"{path}: not a Megatron dist checkpoint (no metadata.json / .metadata)")
    check_readable(path, verified=verified)
    meta = read_metadata(path)
    padded = int(unwrap(chunks[0]).vocab_size)
    if "padded_vocab_size" in meta and int(meta["padded_vocab_size"]) != padded:
        raise ConfigError(f"{path / META_FILE}: padded_vocab_size {meta['padded_vocab_size']} != the model's "
                          f"{padded}; set model.make_vocab_size_divisible_by as when it was saved")
    try:
        if in_place and len(chunks) == 1:
            _load_in_place(chunks, path)
            return meta
        state = dist_checkpointing.load(_without_absent_extra_state(_sharded_state_dict(chunks), path),
                                       str(path))
    except (CheckpointingException, CheckpointException) as e:  # e.g. a tensor of another global shape
        raise CheckpointError(f"{path}: does not fit the model being loaded (another architecture or size? "
                              f"{_load_failure(e)})") from e
    for i, c in enumerate(chunks):
        # DDP's load_state_dict returns nothing: load into the wrapped GPTModel (same tensors, copied in place).
        result = unwrap(c).load_state_dict(state if len(chunks) == 1 else state[f"model{i}"], strict=False)
        # _extra_state (TE / fp8 bookkeeping) may legitimately differ between layer specs; weights may not.
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise ConfigError(f"{path}: checkpoint has no tensor for model parameter {missing[0]!r}")
    return meta
