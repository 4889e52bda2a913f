"""HF <-> Megatron (torch_dist) conversion, and building a model from either kind of directory.

A converted directory (``srft convert hf-to-mcore``) is self-contained::

    OUT/config.json            the HF config (architecture, sizes, rope)
    OUT/tokenizer*.json ...    tokenizer files, chat template, generation config (copied as they were)
    OUT/model/                 torch_dist checkpoint of the model + srft_model.json (see checkpoint/dist.py)

Memory: the Megatron model is built on CPU, also on a GPU machine (``conversion_device``: conversion copies
tensors and computes nothing, so it needs no GPU memory, converts a model larger than one GPU and stays bit-exact),
without initialisation (``perform_initialization=False``: empty tensors), and filled HF tensor by HF tensor, so
the peak is about the model's bytes plus one tensor of host memory.

Nothing is trusted on the way in or out (docs/reliability.md): the output may not be, contain or lie inside an
input; every output directory gets a manifest (checkpoint/manifest.py) written last; an input's manifest is
verified, and HF shards are checked against the index and their safetensors headers (sizes, offsets, shapes,
the embedding rows against ``vocab_size``) before any tensor is read, and each tensor's values (finite,
``|w| <=`` models.mapping.MAX_ABS_WEIGHT) as it is converted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from safetensors.torch import save_file

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..distributed.groups import device_for, groups_from_megatron
from ..dtypes import DTYPES, dtype_name
from ..errors import CheckpointError, UserError
from ..models import builder
from ..models.arch import ArchSpec, arch_from_hf_config, load_arch
from ..models.mapping import HFWeights, check_hf_names, check_weight_values, export_hf_weights, load_hf_into_model
from . import dist as dist_ckpt
from . import manifest
from .atomic import acquire_lock, check_output, fresh_dir, release_lock, replace_dir, temp_sibling
from .safe_load import check_dcp_dir, read_json

#: Files copied next to the weights in both directions (tokenizer and generation settings; never executed).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER_BYTES = 100 << 20


@dataclass
class ModelSource:
    """Where a model comes from: an HF directory, or a Megatron checkpoint (``model_dir``) under ``root``."""

    kind: str  # "hf" | "mcore"
    root: Path  # the directory the user named (HF dir, converted dir or training checkpoint)
    model_dir: Path  # HF dir, or the torch_dist directory
    arch: ArchSpec
    meta: dict  # srft_model.json ({} for HF)


def resolve_source(path: str | Path) -> ModelSource:
    """Accept an HF dir, a converted dir (``DIR/model``), a training checkpoint (``CKPT/model``) or ``.../model``."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: not a directory")
    if dist_ckpt.is_model_checkpoint(p / "model"):
        root, model_dir = p, p / "model"
    elif dist_ckpt.is_model_checkpoint(p):
        root, model_dir = (p.parent if p.name == "model" else p), p
    elif (p / "config.json").is_file():
        return ModelSource("hf", p, p, load_arch(p), {})
    else:
        raise ConfigError(f"{p}: neither an HF model directory (config.json) nor a Megatron checkpoint "
                          f"(model/ or metadata.json)")
    meta = dist_ckpt.read_metadata(model_dir)
    if meta.get("hf_config"):
        arch = arch_from_hf_config(meta["hf_config"], str(model_dir / dist_ckpt.META_FILE))
    elif (root / "config.json").is_file():
        arch = load_arch(root)
    else:
        raise ConfigError(f"{model_dir}: no hf_config in {dist_ckpt.META_FILE} and no {root / 'config.json'}")
    return ModelSource("mcore", root, model_dir, arch, meta)


def _hf_dtype(arch: ArchSpec) -> str:
    name = arch.hf_config.get("dtype") or arch.hf_config.get("torch_dtype") or "bfloat16"
    return dtype_name(name) or "bf16"


def model_settings(source: ModelSource, params_dtype: Optional[str] = None,
                   make_vocab_size_divisible_by: Optional[int] = None) -> tuple[str, int]:
    """(params dtype, vocab padding multiple) of a model built from ``source``: ``params_dtype`` None = the
    checkpoint's (metadata) or the HF config's dtype; a Megatron checkpoint's padding is taken from its metadata."""
    dtype = params_dtype or source.meta.get("params_dtype") or _hf_dtype(source.arch)
    divisible = make_vocab_size_divisible_by
    if divisible is None:
        # padded = ceil(V / d) * d with d = padded reproduces the saved padding exactly.
        divisible = int(source.meta.get("padded_vocab_size") or 128)
    return dtype, divisible


def weights_bytes_per_rank(source: ModelSource, pcfg: ParallelConfig, params_dtype: Optional[str] = None) -> int:
    """This rank's share of the model's weights at ``pcfg``'s TP/PP (the most loaded pipeline stage)."""
    dtype, divisible = model_settings(source, params_dtype)
    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    return source.arch.num_params(tp, pp, source.arch.padded_vocab_size(divisible, tp)) * DTYPES[dtype].bytes


def build_and_load(source: ModelSource, pcfg: ParallelConfig, groups, params_dtype: Optional[str] = None,
                   make_vocab_size_divisible_by: Optional[int] = None, wrap_ddp: bool = False, *,
                   purpose: str = "train"):
    """Build this rank's model for ``pcfg`` without initialisation and load the weights (any TP/PP).

    ``params_dtype`` and the vocab padding: see :func:`model_settings`. The model lives where
    :func:`~megatron_srft.distributed.groups.device_for` puts a model built for ``purpose`` ("convert" and
    "generate": CPU, even on a GPU machine). Returns a :class:`~megatron_srft.models.builder.ModelHandle`.
    """
    dtype, divisible = model_settings(source, params_dtype, make_vocab_size_divisible_by)
    mcfg = ModelConfig(params_dtype=dtype, make_vocab_size_divisible_by=divisible, transformer_impl="auto")
    arch = source.arch
    device = device_for(purpose, torch.cuda.is_available(), groups.device.index or 0)
    tf_config = builder.transformer_config(arch, mcfg, pcfg, device)
    tf_config.perform_initialization = False  # weights come from the checkpoint: skip the random init
    model = builder.build_gpt(arch, mcfg, pcfg, pp_rank=groups.pp_rank, pre_process=groups.is_first_pp_stage,
                              post_process=groups.is_last_pp_stage, tf_config=tf_config, device=device)
    if source.kind == "hf":
        check_hf_dir(source.model_dir, arch)
        load_hf_into_model([model], arch, source.model_dir, groups)
    else:
        dist_ckpt.load_model([model], source.model_dir, in_place=groups.world_size == 1,
                             verified=verify_converted_root(source))
    chunks = [model]
    if wrap_ddp:
        chunks = [DistributedDataParallel(config=tf_config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=pcfg.use_distributed_optimizer), module=model)]
    return builder.ModelHandle(chunks=chunks, arch=arch, tf_config=tf_config,
                               padded_vocab_size=arch.padded_vocab_size(divisible, pcfg.tensor_model_parallel_size))


def verify_converted_root(source: ModelSource) -> bool:
    """Collective: verify the manifest of a converted directory's root (config, tokenizer, model/ recursively).

    Returns True when the model directory was verified with it. A training checkpoint's root is not verified here
    (its manifest also covers the optimizer state, which a model load does not read): its model/ is, by the load.
    """
    if source.kind != "mcore" or source.root == source.model_dir or not manifest.has_manifest(source.root) \
            or (source.root / "state.json").exists():
        return False
    problems = manifest.verify_collective(source.root)
    if problems:
        raise CheckpointError(manifest.summarize(problems))
    return True


def _inputs_of(source: ModelSource, given: Path) -> list[Path]:
    paths = [given, source.root, source.model_dir]
    if source.meta.get("source"):
        paths.append(Path(source.meta["source"]))  # side files may be copied from there
    return paths


def _check_out(out: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse an output that is, contains or lies inside an input (atomic.check_output) before anything is deleted;
    a non-empty output needs ``overwrite``, and is replaced only when it is an earlier conversion's output (it
    holds our manifest): a directory this command did not write is never removed."""
    check_output(out, inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")
        if not out.is_dir() or not manifest.has_manifest(out):
            raise UserError(f"--out {out}: exists and is not the output of an earlier conversion (no "
                            f"{manifest.MANIFEST}); --overwrite replaces only what srft convert wrote: choose a new "
                            f"directory")


def _out_lock(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _prepare_out(out: Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Lock ``out`` for this conversion (a second one into it is one line naming the first), check it, and
    create its temporary sibling fresh."""
    out.parent.mkdir(parents=True, exist_ok=True)
    acquire_lock(_out_lock(out), f"--out {out}: another conversion into it is under way;")
    tmp = temp_sibling(out)
    try:
        _check_out(out, overwrite, inputs)
        fresh_dir(tmp)
    except BaseException:
        _abandon_out(tmp, out)
        raise
    return tmp


def _finish_out(tmp: Path, out: Path) -> None:
    manifest.write_manifest(tmp)  # last: sizes + CRC-32 of every file, model/'s own manifest included
    replace_dir(tmp, out)
    release_lock(_out_lock(out), remove=True)


def _abandon_out(tmp: Path, out: Path) -> None:
    """A failed conversion: its temporary directory removed and ``out`` unlocked; ``out`` as it was."""
    shutil.rmtree(tmp, ignore_errors=True)
    release_lock(_out_lock(out), remove=True)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, data offset) of a safetensors file, checked against the file's size; no tensor is read.

    Every tensor's dtype, shape and byte range must agree, and the ranges must lie inside the file: a truncated
    or garbled shard is a CheckpointError naming the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: damaged or truncated safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not an object)")
    data_len = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
            expected = numel * _ST_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: damaged safetensors header entry for {name!r}") from None
        if not (0 <= begin <= end) or end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r}: {dtype}{list(shape)} needs {expected} bytes, the header "
                                  f"gives {end - begin}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end}, the file has "
                                  f"{size}")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise CheckpointError(f"{path}: {data_len - end_max} bytes beyond the last tensor (damaged or not a "
                              f"safetensors file)")
    return header, 8 + n


def check_hf_dir(hf_dir: str | Path, arch: ArchSpec, *, verify_manifest: bool = True) -> None:
    """Before any tensor is read: the directory's manifest (when it has one, as our exports do; it reads every
    byte, so ``verify_manifest=False`` skips it in cheap pre-flight checks), every shard's header against the file
    and the index, and the embedding rows against the config's ``vocab_size``."""
    hf_dir = Path(hf_dir)
    if verify_manifest and manifest.has_manifest(hf_dir):
        manifest.verify(hf_dir)
    if (hf_dir / HFWeights.INDEX).is_file() or not (hf_dir / HFWeights.SINGLE).is_file():
        weight_map = HFWeights(hf_dir).weight_map  # the index (JSON only; no shard is opened)
    else:
        header, _ = read_safetensors_header(hf_dir / HFWeights.SINGLE)
        weight_map = {k: HFWeights.SINGLE for k in header if k != "__metadata__"}
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    shapes: dict[str, list] = {}
    for fname, names in sorted(by_file.items()):
        header, _ = read_safetensors_header(hf_dir / fname)
        for name in names:
            if name not in header:
                raise CheckpointError(f"{hf_dir / fname}: has no tensor {name!r}, which "
                                      f"{HFWeights.INDEX} places in it")
            shapes[name] = header[name]["shape"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in shapes and int(shapes[name][0]) != arch.vocab_size:
            rows = int(shapes[name][0])
            effect = (f"converting would drop {rows - arch.vocab_size} rows of real tokens" if rows > arch.vocab_size
                      else "the embedding lacks rows for some token ids")
            raise CheckpointError(f"{hf_dir / 'config.json'}: vocab_size={arch.vocab_size} but {name} has {rows} "
                                  f"rows ({effect}); set vocab_size to {rows}")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files found in ``src``; a JSON one that does not parse is an error naming
    it (an unreadable tokenizer is never copied into an output that reports success)."""
    for name in SIDE_FILES:
        if name.endswith(".json") and (src / name).is_file():
            read_json(src / name, "the tokenizer would not load from it; repair or remove it")
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def preflight_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, overwrite: bool) -> ModelSource:
    """Every input check that needs no model (architecture, index, shards, tensor names, output dir)."""
    source = resolve_source(hf_dir)
    if source.kind != "hf":
        raise ConfigError(f"{hf_dir}: expected an HF model directory, found a Megatron checkpoint")
    _check_out(Path(out_dir), overwrite, (Path(hf_dir),))
    check_hf_dir(hf_dir, source.arch, verify_manifest=False)  # headers before names; the load verifies the manifest
    check_hf_names(source.arch, HFWeights(hf_dir).names())
    return source


def preflight_mcore_to_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool) -> ModelSource:
    source = resolve_source(ckpt)
    if source.kind != "mcore":
        raise ConfigError(f"{ckpt}: expected a Megatron checkpoint (DIR/model or a torch_dist dir), found an HF dir")
    _check_out(Path(out_dir), overwrite, tuple(_inputs_of(source, Path(ckpt))))
    check_dcp_dir(source.model_dir)  # nothing in it is unpickled before this (cheap: no tensor is read)
    return source


def conversion_device() -> torch.device:
    """Where both conversions build the model: CPU, whatever GPUs this machine has (groups.MODEL_RUNS_ON_GPU)."""
    return device_for("convert", torch.cuda.is_available())


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, overwrite: bool = False,
                make_vocab_size_divisible_by: int = 128) -> Path:
    """Convert an HF directory to ``OUT/{config.json, tokenizer files, model/}`` (one process, world size 1).

    Call inside an initialised 1-rank world (:func:`megatron_srft.distributed.groups.init_distributed`).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    source = preflight_hf_to_mcore(hf_dir, out, overwrite)
    tmp = _prepare_out(out, overwrite, (hf_dir,))
    try:
        handle = build_and_load(source, ParallelConfig(), groups_from_megatron(conversion_device()),
                                params_dtype=dtype or _hf_dtype(source.arch),
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by, purpose="convert")
        dist_ckpt.save_model(handle.chunks, tmp / "model", {"source": str(hf_dir.resolve())},
                             arch=source.arch, atomic=False, consume=True)
        del handle
        shutil.copyfile(hf_dir / "config.json", tmp / "config.json")
        copy_side_files(hf_dir, tmp)
        _finish_out(tmp, out)
    except BaseException:
        _abandon_out(tmp, out)
        raise
    return out


def write_safetensors(items, out: Path, max_shard_bytes: int) -> dict:
    """Write (name, tensor) items as ``model-0000K-of-0000N.safetensors`` + index; returns the index."""
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = total = 0

    def flush():
        nonlocal buf, buf_bytes
        if buf:
            save_file(buf, str(out / f".shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(buf))
            buf, buf_bytes = {}, 0

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if buf and buf_bytes + nbytes > max_shard_bytes:
            flush()
        buf[name] = tensor.detach().to("cpu").contiguous().clone()  # own storage: safetensors rejects sharing
        buf_bytes += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for k, names in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f".shard-{k:05d}.safetensors", out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return index


def write_hf_model(out: Path, items: Iterable[tuple[str, torch.Tensor]], arch: ArchSpec, dtype: str,
                   side_file_dirs: Sequence[Path], max_shard_bytes: int = 2 << 30) -> list[str]:
    """The one HF export (``srft convert mcore-to-hf`` and a training run's final ``RUN/hf``).

    Writes into ``out`` (a temporary directory its caller renames when complete, after the manifest): ``items``
    ((HF name, full tensor), consumed lazily) cast to ``dtype`` as sharded safetensors + index (the files use one
    dtype; checkpoints written before the local spec's norms followed params_dtype hold those norms in fp32),
    config.json (the architecture's HF config with ``dtype``), and the tokenizer and generation files of the first
    of ``side_file_dirs`` that has any. Returns the names of the side files copied.
    """
    torch_name = DTYPES.get(dtype, DTYPES["bf16"]).torch_name
    cast = getattr(torch, torch_name)
    write_safetensors(((n, t.to(cast)) for n, t in items), out, max_shard_bytes)
    hf_cfg = dict(arch.hf_config)
    hf_cfg.pop("torch_dtype", None)
    hf_cfg["dtype"] = torch_name
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    for src in side_file_dirs:
        copied = copy_side_files(src, out)
        if copied:
            return copied
    return []


def mcore_to_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False,
                max_shard_bytes: int = 2 << 30) -> Path:
    """Convert a Megatron checkpoint (converted dir, training checkpoint, or its ``model/``) to an HF directory.

    Call inside an initialised 1-rank world. Writes sharded safetensors + index, config.json and the
    tokenizer files found next to the checkpoint.
    """
    source = preflight_mcore_to_hf(ckpt, out_dir, overwrite)
    out = Path(out_dir)
    tmp = _prepare_out(out, overwrite, tuple(_inputs_of(source, Path(ckpt))))
    try:
        groups = groups_from_megatron(conversion_device())
        handle = build_and_load(source, ParallelConfig(), groups, purpose="convert")
        items = ((n, check_weight_values(n, t, source.model_dir))
                 for n, t in export_hf_weights(handle.chunks, source.arch, groups))
        side_dirs = [source.root]
        if source.meta.get("source") and Path(source.meta["source"]).is_dir():
            side_dirs.append(Path(source.meta["source"]))
        copied = write_hf_model(tmp, items, source.arch, source.meta.get("params_dtype") or "bf16", side_dirs,
                                max_shard_bytes)
        del handle
        if not any(n.startswith("tokenizer") for n in copied):
            print(f"srft convert: warning: no tokenizer files next to {source.root}; copy them into {out}")
        _finish_out(tmp, out)
    except BaseException:
        _abandon_out(tmp, out)
        raise
    return out
