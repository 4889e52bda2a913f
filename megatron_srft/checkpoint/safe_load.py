"""Allow-listed reading of every pickle-bearing file of a checkpoint: nothing in a checkpoint is executed.

A torch_dist checkpoint written by megatron-core 0.16.1 (``dist_checkpointing``, PyTorch's distributed checkpoint
underneath) is unpickled in three places when it is loaded, and torch does not restrict any of them:

==========================  =====================================================================================
``.metadata``               ``pickle.load`` in ``torch.distributed.checkpoint.FileSystemReader.read_metadata``
byte items in ``*.distcp``  ``torch.load(weights_only=False)`` in ``DefaultLoadPlanner.load_bytes``: Megatron's
                            ShardedObjects (``_extra_state``, the distributed optimizer's param groups and bucket
                            sizes) are stored this way
``common.pt``, ``*.pt``     ``torch.load`` with torch's default (weights-only since 2.6, but the environment
                            variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns that off)
==========================  =====================================================================================

Our own files are JSON (``metadata.json``, ``srft_model.json``, ``state.json``) or tensors-only torch files
(``rng/rank_R.pt``). :func:`check_dcp_dir` reads all of the above through the allow-lists below BEFORE any
Megatron/torch load, and :func:`safe_torch_load` loads our own torch files the same way. Anything outside an
allow-list is a :class:`~megatron_srft.errors.CheckpointError` naming the file and the offending global.

Two validators:

- :func:`load_dcp_metadata` unpickles ``.metadata`` into the real torch classes, but only these (dataclasses,
  enums, ``torch.Size``, dtypes, layouts): constructing them runs no code of the file's choosing. The result is
  needed to find the byte items inside the ``*.distcp`` files.
- :func:`check_torch_pickle` walks the ``data.pkl`` of a torch zip file without building anything: every allowed
  global becomes an inert placeholder, so not even an allowed function is called. It only answers "does this
  pickle reference nothing but tensors, containers and primitives?".
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, first_line

# --------------------------------------------------------------------------------------------- allow-lists

_DCP_META = "torch.distributed.checkpoint.metadata"

#: The classes a torch DCP ``.metadata`` pickle is made of (torch 2.13, as written by megatron-core 0.16.1).
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.serialization", "_get_layout"),  # layout by name, from a fixed table of torch.layout objects
    ("torch", "Size"),
    ("collections", "OrderedDict"),
})

#: What a tensors-and-containers torch file may reference (the rebuild functions of plain tensors, storage types,
#: containers). Used for common.pt, the byte items of *.distcp files and our rng/*.pt.
TORCH_FILE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.storage", "UntypedStorage"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("_io", "BytesIO"),  # Transformer Engine versions that keep _extra_state as a BytesIO
    ("io", "BytesIO"),
})

_TORCH_STORAGE_NAMES = frozenset({
    "ByteStorage", "CharStorage", "ShortStorage", "IntStorage", "LongStorage", "HalfStorage", "FloatStorage",
    "DoubleStorage", "BFloat16Storage", "BoolStorage", "ComplexFloatStorage", "ComplexDoubleStorage",
    "UntypedStorage", "QInt8Storage", "QUInt8Storage", "QInt32Storage",
})


def _is_torch_dtype(module: str, name: str) -> bool:
    if module != "torch":
        return False
    return isinstance(getattr(torch, name, None), torch.dtype)


def _allowed(module: str, name: str, allow: frozenset) -> bool:
    return (module, name) in allow or _is_torch_dtype(module, name)


# --------------------------------------------------------------------------------------------- .metadata


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name, DCP_METADATA_GLOBALS):
            raise CheckpointError(f"{self.source}: refusing to load: the pickle references {module}.{name}, "
                                  f"which a checkpoint's metadata never holds (only torch's checkpoint metadata "
                                  f"classes, containers and primitive types are allowed)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: refusing to load: persistent id in checkpoint metadata")


def load_dcp_metadata(path: str | Path):
    """``.metadata`` of a torch DCP directory (or the file itself) -> ``torch.distributed.checkpoint.Metadata``,
    through the allow-list; a missing, foreign or malformed file is a :class:`CheckpointError`."""
    p = Path(path)
    if p.is_dir():
        p = p / ".metadata"
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (the checkpoint's tensor index; incomplete or damaged checkpoint)")
    try:
        with open(p, "rb") as f:
            md = _DCPMetadataUnpickler(f, str(p)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbled pickles raise many types
        raise CheckpointError(f"{p}: not a readable checkpoint index ({e.__class__.__name__}: "
                              f"{first_line(e)})") from None
    if not _is_dcp(md, "Metadata"):
        raise CheckpointError(f"{p}: expected torch checkpoint Metadata, found {type(md).__name__}")
    return md


def _is_dcp(obj, name: str) -> bool:
    """``obj`` is an instance of torch.distributed.checkpoint's metadata class ``name`` (compared by name: the
    classes come from the allow-listed unpickler, and this module does not import torch.distributed)."""
    return type(obj).__module__ == _DCP_META and type(obj).__name__ == name


# --------------------------------------------------------------------------------------------- torch files


class _Inert:
    """What every allowed global becomes while a torch pickle is checked: calls and state are swallowed."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _TorchPickleChecker(pickle.Unpickler):
    def __init__(self, f, source: str, allow: frozenset):
        super().__init__(f)
        self.source, self.allow = source, allow

    def find_class(self, module: str, name: str) -> Any:
        if _allowed(module, name, self.allow) or (module in ("torch", "torch.storage")
                                                   and name in _TORCH_STORAGE_NAMES):
            return _Inert
        raise CheckpointError(f"{self.source}: refusing to load: the pickle references {module}.{name}, which is "
                              f"not a tensor, container or primitive type (nothing from a checkpoint is executed)")

    def persistent_load(self, pid):
        # torch's zip format: ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)
                and isinstance(pid[3], str) and isinstance(pid[4], int)):
            raise CheckpointError(f"{self.source}: refusing to load: unexpected persistent id in a torch file")
        return _Inert()


def check_torch_pickle(data: bytes, source: str, allow: frozenset = TORCH_FILE_GLOBALS) -> None:
    """Check a torch file's bytes (the zip format ``torch.save`` writes) against ``allow``; builds nothing."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    except zipfile.BadZipFile:
        raise CheckpointError(f"{source}: not a torch zip file (truncated, damaged, or a legacy/raw pickle, which "
                              f"is never loaded)") from None
    if len(pkls) != 1:
        raise CheckpointError(f"{source}: expected one data.pkl in the torch file, found {len(pkls)}")
    try:
        payload = zf.read(pkls[0])
        _TorchPickleChecker(io.BytesIO(payload), source, allow).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source}: not a readable torch file ({e.__class__.__name__}: {first_line(e)})") \
            from None


def check_torch_file(path: str | Path, allow: frozenset = TORCH_FILE_GLOBALS) -> None:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing") from None
    check_torch_pickle(data, str(p), allow)


def safe_torch_load(path: str | Path):
    """Load one of our tensors-only torch files: checked by :func:`check_torch_file`, then ``torch.load`` with
    ``weights_only=True`` (two independent allow-lists)."""
    check_torch_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------- directories


def _byte_items(md) -> list:
    storage = md.storage_data if isinstance(md.storage_data, dict) else {}
    items = md.state_dict_metadata if isinstance(md.state_dict_metadata, dict) else {}
    return [(idx, info) for idx, info in storage.items()
            if _is_dcp(items.get(getattr(idx, "fqn", None)), "BytesStorageMetadata")]


def read_json(path: Path, what: str):
    """A checkpoint's JSON file (data only: JSON runs nothing); missing or damaged is a one-line CheckpointError
    naming the file; ``what`` says what a missing one means."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(e)}; damaged)") from None


def check_dcp_dir(path: str | Path) -> None:
    """Every pickle a Megatron/torch load of the torch_dist directory ``path`` would unpickle, checked first.

    ``metadata.json`` must be JSON naming the torch_dist backend (other backends read other files);
    ``.metadata`` goes through :func:`load_dcp_metadata`; every byte item it points to inside a ``*.distcp`` file
    and every ``*.pt`` file under ``path`` through :func:`check_torch_pickle`.
    """
    root = Path(path)
    meta_json = root / "metadata.json"
    meta = read_json(meta_json, "not a Megatron dist checkpoint, or an incomplete one")
    backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
    if backend != "torch_dist":
        raise CheckpointError(f"{meta_json}: sharded_backend {backend!r} is not supported (expected 'torch_dist')")
    md = load_dcp_metadata(root)
    handles: dict[str, Any] = {}
    try:
        for idx, info in _byte_items(md):
            if not (isinstance(getattr(info, "offset", None), int) and isinstance(getattr(info, "length", None), int)
                    and isinstance(getattr(info, "relative_path", None), str)):
                raise CheckpointError(f"{root / '.metadata'}: malformed storage entry for item {idx.fqn!r}")
            rel = str(info.relative_path)
            # A relative path that leaves the directory (or is absolute) is never followed.
            if os.path.isabs(rel) or ".." in Path(rel).parts:
                raise CheckpointError(f"{root / '.metadata'}: item {idx.fqn!r} points outside the checkpoint ({rel!r})")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{root / '.metadata'}: item {idx.fqn!r} uses storage transforms "
                                      f"{list(info.transform_descriptors)}, which are not supported")
            file = root / rel
            if rel not in handles:
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing (named by {root / '.metadata'})")
                handles[rel] = open(file, "rb")
            f = handles[rel]
            f.seek(int(info.offset))
            blob = f.read(int(info.length))
            if len(blob) != int(info.length):
                raise CheckpointError(f"{file}: truncated (item {idx.fqn!r} needs bytes {info.offset}.."
                                      f"{info.offset + info.length}, the file has {file.stat().st_size})")
            check_torch_pickle(blob, f"{file} (item {idx.fqn!r})")
    finally:
        for f in handles.values():
            f.close()
    for pt in sorted(root.rglob("*.pt")):
        check_torch_file(pt)
