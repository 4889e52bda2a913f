"""Weight sync: Megatron shards -> full HF tensors -> buckets -> the rollout engine.

``export_hf_weights`` (models/mapping.py) yields one full HF tensor at a time (TP shards gathered, owned PP
stage broadcast, vocab padding trimmed); every rank of the model-parallel group iterates it in lockstep, since
each step is a collective. We group the stream into buckets of at most ``bucket_mb`` MiB and hand each bucket
to the engine before pulling the next, so the extra memory is one bucket (plus what the engine buffers for
a layer whose tensors have not all arrived), never a second copy of the model. A tensor larger than the
bucket travels alone (the bucket then holds exactly that tensor).

Tensors leave in the engine's dtype (``Engine.weight_dtype``), cast one at a time before they are bucketed: a
trainer in fp32 beside a bf16 engine sends bf16 (half the bytes), and vLLM, which would convert a tensor of
another dtype itself, does not print its dtype warning for every tensor at every sync.

If the engine fails part-way, the rest of the export is drained before the error propagates, so the other
ranks (which keep gathering) are not left waiting in a collective.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

from ..models.mapping import export_hf_weights

MiB = 1 << 20


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def to_dtype(named_tensors: Iterable[tuple[str, torch.Tensor]],
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with each tensor in ``dtype`` (lazy; a tensor already in ``dtype`` passes as it is, uncopied)."""
    for name, tensor in named_tensors:
        yield name, tensor.to(dtype)


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of (name, tensor) into consecutive lists of total size <= ``bucket_bytes``.

    Order is preserved; a tensor bigger than ``bucket_bytes`` forms a bucket of its own. Lazy: at most one
    bucket is held at a time (the next tensor is pulled only when the current bucket is handed out or full).
    """
    if bucket_bytes < 1:
        raise ValueError(f"iter_buckets: bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def stream_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], engine, bucket_mb: int) -> dict:
    """Stream (hf_name, full tensor) pairs into ``engine.update_weights`` in buckets of <= ``bucket_mb`` MiB.

    The engine's weights must be awake (the rollout service wakes them first and the KV cache after). Each
    tensor is cast to ``engine.weight_dtype`` first; bucket sizes and byte counts are those of the cast tensors.

    Returns stats: bytes (total), num_tensors, num_buckets, seconds, bytes_per_second, bucket_bytes, and
    peak_extra_bytes = the largest bucket held at once (the sync's extra memory beyond the model itself).
    """
    bucket_bytes = int(bucket_mb * MiB)
    stats = {"bytes": 0, "num_tensors": 0, "num_buckets": 0, "peak_extra_bytes": 0, "bucket_bytes": bucket_bytes}
    source = iter(named_tensors)

    def flattened():
        for bucket in iter_buckets(to_dtype(source, engine.weight_dtype), bucket_bytes):
            size = sum(tensor_bytes(t) for _, t in bucket)
            stats["num_buckets"] += 1
            stats["peak_extra_bytes"] = max(stats["peak_extra_bytes"], size)
            stats["bytes"] += size
            stats["num_tensors"] += len(bucket)
            for i, item in enumerate(bucket):
                bucket[i] = None  # drop our reference: the engine alone decides when the tensor is freed
                yield item
                del item

    start = time.perf_counter()
    try:
        engine.update_weights(flattened())
    except BaseException:
        for _ in source:  # keep the collectives of the other ranks going, then report our failure
            pass
        raise
    stats["seconds"] = time.perf_counter() - start
    stats["bytes_per_second"] = stats["bytes"] / max(stats["seconds"], 1e-9)
    return stats


def sync_weights(chunks, arch, groups, engine, bucket_mb: int) -> dict:
    """Push the Megatron model's current weights into the rollout engine; every rank calls it.

    chunks: this rank's model chunks; arch: the ArchSpec; groups: ParallelGroups; engine: this rank's
    :class:`~megatron_srft.rollout.base.Engine`. Returns :func:`stream_weights`'s stats.
    """
    with torch.no_grad():
        return stream_weights(export_hf_weights(chunks, arch, groups), engine, bucket_mb)


# ---------------------------------------------------------------------------------------------------------------
# Engines in another process (GPU): vLLM's weight-transfer engines.
#
# The colocated engine above lives in the trainer's process (external_launcher / uni), so a sync is a function
# call that reads the trainer's tensors directly; no transport is needed, on CPU or GPU. When the engine runs in
# its own processes, vLLM's weight-transfer API (vllm/distributed/weight_transfer) moves the tensors:
#   "ipc"  - same GPUs, other process: CUDA IPC handles of the trainer's tensors (packed into buffers),
#   "nccl" - disaggregated GPUs: an NCCL group {trainer rank 0} + engine workers, packed broadcasts.
# Both take a `WeightSource` (names/dtypes/shapes up front, then the tensors in the same order) and a client
# with four control-plane calls (vLLM's `VLLMWeightSyncClient`: `LLM.collective_rpc` of the worker methods of the
# same names, then `reset_prefix_cache`). `megatron_weight_source` adapts ours to that API:
#
#   from vllm.config import WeightTransferConfig     # engine built with weight_transfer_config=...(backend=...)
#   from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
#   from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
#   sender = WeightTransferTrainerFactory.trainer_init(IPCTrainerInitInfo(rank=groups.rank, packed=True),
#                                                      client=<a VLLMWeightSyncClient over llm>, source=source)
#   sender.send_weights()            # every trainer rank, every step (the export is a collective)
#
# (NCCLTrainerInitInfo(rank=..., master_address=..., master_port=..., world_size=1 + engine workers) for NCCL.)
# ---------------------------------------------------------------------------------------------------------------


def megatron_weight_source(chunks, arch, groups, dtype: torch.dtype | None = None):
    """A vLLM ``WeightSource`` over :func:`export_hf_weights` (every rank iterates it in lockstep).

    ``dtype``: the engine's (vLLM's ``model_config.dtype``); the tensors are cast to it before they leave, as in
    :func:`stream_weights`. None sends the trainer's own dtype.
    ``metadata()`` runs one export pass on first use (a collective on every rank, as vLLM's contract allows
    for Megatron sources) and caches the names, dtypes and full shapes; each iteration is a fresh export.
    """
    # lazy: vLLM is an optional dependency (extras cpu / gpu); this module serves every rollout engine
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    def export():
        named = export_hf_weights(chunks, arch, groups)
        return named if dtype is None else to_dtype(named, dtype)

    class MegatronWeightSource(WeightSource):
        def __init__(self):
            self._meta = None

        def metadata(self):
            if self._meta is None:
                with torch.no_grad():
                    self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in export()]
            return self._meta

        def __iter__(self):
            with torch.no_grad():
                yield from export()

    return MegatronWeightSource()
