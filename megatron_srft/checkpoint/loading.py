"""Initial weights of a training run: from an HF directory or from a Megatron checkpoint, at any TP/PP."""

from __future__ import annotations

from pathlib import Path

from ..models.mapping import load_hf_into_model
from .convert import check_hf_dir, resolve_source, verify_converted_root
from .dist import load_model


def load_initial_weights(handle, model_dir: str | Path, groups) -> str:
    """Fill the built model chunks from ``model_dir``; returns the source kind ("hf" or "mcore").

    An HF directory is read tensor by tensor (each rank takes its TP shard of its PP stage's layers); a converted
    directory or training checkpoint is loaded through Megatron's dist_checkpointing (resharded on load).
    """
    source = resolve_source(model_dir)
    if source.kind == "hf":
        check_hf_dir(source.model_dir, handle.arch)  # shards vs index and headers, vocab rows; before any tensor
        load_hf_into_model(handle.chunks, handle.arch, source.model_dir, groups)
    else:
        # manifests verified (split over the ranks), every pickle allow-listed, before Megatron reads anything
        load_model(handle.chunks, source.model_dir, verified=verify_converted_root(source))
    return source.kind
