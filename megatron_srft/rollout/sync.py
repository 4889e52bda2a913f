"""Weight sync: Megatron shards -> full HF tensors -> buckets -> the rollout engine.

``export_hf_weights`` (models/mapping.py) yields one full HF tensor at a time (TP shards gathered, owned PP
stage broadcast, vocab padding trimmed); every rank of the model-parallel group iterates it in lockstep, since
each step is a collective. We group the stream into buckets of at most ``bucket_mb`` MiB and hand each bucket
to the engine before pulling the next, so the extra memory is one bucket (plus what the engine buffers for
a layer whose tensors have not all arrived), never a second copy of the model. A tensor larger than the
bucket travels alone (the bucket then holds exactly that tensor).

If the engine fails part-way, the rest of the export is drained before the error propagates, so the other
ranks (which keep gathering) are not left waiting in a collective.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

MiB = 1 << 20


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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

    Returns stats: bytes (total), num_tensors, num_buckets, seconds, bytes_per_second, bucket_bytes, and
    peak_extra_bytes = the largest bucket held at once (the sync's extra memory beyond the model itself).
    """
    bucket_bytes = int(bucket_mb * MiB)
    stats = {"bytes": 0, "num_tensors": 0, "num_buckets": 0, "peak_extra_bytes": 0, "bucket_bytes": bucket_bytes}
    source = iter(named_tensors)

    def flattened():
        for bucket in iter_buckets(source, bucket_bytes):
            size = sum(tensor_bytes(t) for _, t in bucket)
            stats["num_buckets"] += 1
            stats["peak_extra_bytes"] = max(stats["peak_extra_bytes"], size)
            stats["bytes"] += size
            stats["num_tensors"] += len(bucket)
            while bucket:  # hand over and drop our reference, so the engine alone decides when it is freed
                yield bucket.pop(0)

    start = time.perf_counter()
    engine.wake_up(tags=["weights"])  # GPU: weights back first; the KV cache only after the update
    try:
        engine.update_weights(flattened())
    except BaseException:
        for _ in source:  # keep the collectives of the other ranks going, then report our failure
            pass
        raise
    engine.wake_up(tags=["kv_cache"])
    stats["seconds"] = time.perf_counter() - start
    stats["bytes_per_second"] = stats["bytes"] / max(stats["seconds"], 1e-9)
    return stats


def sync_weights(chunks, arch, groups, engine, bucket_mb: int) -> dict:
    """Push the Megatron model's current weights into the rollout engine; every rank calls it.

    chunks: this rank's model chunks; arch: the ArchSpec; groups: ParallelGroups; engine: this rank's
    :class:`~megatron_srft.rollout.engine.RolloutEngine`. Returns :func:`stream_weights`'s stats.
    """
    from ..models.mapping import export_hf_weights

    with torch.no_grad():
        return stream_weights(export_hf_weights(chunks, arch, groups), engine, bucket_mb)
