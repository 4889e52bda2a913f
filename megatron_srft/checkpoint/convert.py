"""HF <-> Megatron (torch_dist) conversion, and building a model from either kind of directory.

A converted directory (``srft convert hf-to-mcore``) is self-contained::

    OUT/config.json            the HF config (architecture, sizes, rope)
    OUT/tokenizer*.json ...    tokenizer files, chat template, generation config (copied as they were)
    OUT/model/                 torch_dist checkpoint of the model + srft_model.json (see checkpoint/dist.py)

Memory: the Megatron model is built without initialisation (``perform_initialization=False``: empty
tensors) and filled HF tensor by HF tensor, so the peak is about the model's bytes plus one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..models.arch import ArchSpec, arch_from_hf_config, load_arch
from . import dist as dist_ckpt

#: Files copied next to the weights in both directions (tokenizer and generation settings; never executed).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    return _HF_DTYPES.get(str(name), "bf16")


def build_and_load(source: ModelSource, pcfg: ParallelConfig, groups, params_dtype: Optional[str] = None,
                   make_vocab_size_divisible_by: Optional[int] = None, wrap_ddp: bool = False):
    """Build this rank's model for ``pcfg`` without initialisation and load the weights (any TP/PP).

    ``params_dtype`` None = the checkpoint's (metadata) or the HF config's dtype. The vocab padding of a
    Megatron checkpoint is taken from its metadata. Returns a :class:`~megatron_srft.models.builder.ModelHandle`.
    """
    from ..models import builder
    from ..models.mapping import load_hf_into_model

    dtype = params_dtype or source.meta.get("params_dtype") or _hf_dtype(source.arch)
    divisible = make_vocab_size_divisible_by
    if divisible is None:
        # padded = ceil(V / d) * d with d = padded reproduces the saved padding exactly.
        divisible = int(source.meta.get("padded_vocab_size") or 128)
    mcfg = ModelConfig(params_dtype=dtype, make_vocab_size_divisible_by=divisible, transformer_impl="auto")
    arch = source.arch
    tf_config = builder.transformer_config(arch, mcfg, pcfg)
    tf_config.perform_initialization = False  # weights come from the checkpoint: skip the random init
    model = builder.build_gpt(arch, mcfg, pcfg, pp_rank=groups.pp_rank, pre_process=groups.is_first_pp_stage,
                              post_process=groups.is_last_pp_stage, tf_config=tf_config)
    if source.kind == "hf":
        load_hf_into_model([model], arch, source.model_dir, groups)
    else:
        dist_ckpt.load_model([model], source.model_dir, in_place=groups.world_size == 1)
    chunks = [model]
    if wrap_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        chunks = [DistributedDataParallel(config=tf_config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=pcfg.use_distributed_optimizer), module=model)]
    return builder.ModelHandle(chunks=chunks, arch=arch, tf_config=tf_config,
                               padded_vocab_size=arch.padded_vocab_size(divisible, pcfg.tensor_model_parallel_size))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    _check_out(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish_out(tmp: Path, out: Path) -> None:
    from .atomic import replace_dir

    replace_dir(tmp, out)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def preflight_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, overwrite: bool) -> ModelSource:
    """Every input check that needs no model (architecture, index, shards, tensor names, output dir)."""
    from ..models.mapping import HFWeights, check_hf_names

    source = resolve_source(hf_dir)
    if source.kind != "hf":
        raise ConfigError(f"{hf_dir}: expected an HF model directory, found a Megatron checkpoint")
    check_hf_names(source.arch, HFWeights(hf_dir).names())
    _check_out(Path(out_dir), overwrite)
    return source


def preflight_mcore_to_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool) -> ModelSource:
    source = resolve_source(ckpt)
    if source.kind != "mcore":
        raise ConfigError(f"{ckpt}: expected a Megatron checkpoint (DIR/model or a torch_dist dir), found an HF dir")
    _check_out(Path(out_dir), overwrite)
    return source


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, overwrite: bool = False,
                make_vocab_size_divisible_by: int = 128) -> Path:
    """Convert an HF directory to ``OUT/{config.json, tokenizer files, model/}`` (one process, world size 1).

    Call inside an initialised 1-rank world (:func:`megatron_srft.distributed.groups.init_distributed`).
    """
    from ..distributed.groups import groups_from_megatron

    hf_dir, out = Path(hf_dir), Path(out_dir)
    source = preflight_hf_to_mcore(hf_dir, out, overwrite)
    tmp = _prepare_out(out, overwrite)
    try:
        handle = build_and_load(source, ParallelConfig(), groups_from_megatron(),
                                params_dtype=dtype or _hf_dtype(source.arch),
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        dist_ckpt.save_model(handle.chunks, tmp / "model", {"source": str(hf_dir.resolve())},
                             arch=source.arch, atomic=False, consume=True)
        del handle
        shutil.copyfile(hf_dir / "config.json", tmp / "config.json")
        copy_side_files(hf_dir, tmp)
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_config_for_export(source: ModelSource, dtype: str) -> dict:
    cfg = dict(source.arch.hf_config)
    cfg["dtype"] = _TORCH_NAMES.get(dtype, "bfloat16")
    cfg.pop("torch_dtype", None)
    return cfg


def write_safetensors(items, out: Path, max_shard_bytes: int) -> dict:
    """Write (name, tensor) items as ``model-0000K-of-0000N.safetensors`` + index; returns the index."""
    from safetensors.torch import save_file

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


def mcore_to_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False,
                max_shard_bytes: int = 2 << 30) -> Path:
    """Convert a Megatron checkpoint (converted dir, training checkpoint, or its ``model/``) to an HF directory.

    Call inside an initialised 1-rank world. Writes sharded safetensors + index, config.json and the
    tokenizer files found next to the checkpoint.
    """
    from ..models.mapping import export_hf_weights
    from ..distributed.groups import groups_from_megatron

    source = preflight_mcore_to_hf(ckpt, out_dir, overwrite)
    out = Path(out_dir)
    tmp = _prepare_out(out, overwrite)
    try:
        groups = groups_from_megatron()
        handle = build_and_load(source, ParallelConfig(), groups)
        dtype = source.meta.get("params_dtype") or "bf16"
        # Megatron's local-spec norms stay fp32 whatever params_dtype is; the HF files use one dtype.
        torch_dtype = getattr(torch, _TORCH_NAMES.get(dtype, "bfloat16"))
        items = ((n, t.to(torch_dtype)) for n, t in export_hf_weights(handle.chunks, source.arch, groups))
        write_safetensors(items, tmp, max_shard_bytes)
        del handle
        (tmp / "config.json").write_text(json.dumps(_hf_config_for_export(source, dtype), indent=2))
        copied = copy_side_files(source.root, tmp)
        if not copied and source.meta.get("source") and Path(source.meta["source"]).is_dir():
            copied = copy_side_files(Path(source.meta["source"]), tmp)
        if not any(n.startswith("tokenizer") for n in copied):
            print(f"srft convert: warning: no tokenizer files next to {source.root}; copy them into {out}")
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
