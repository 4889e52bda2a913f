"""Shared by the parallel-invariance tests: a tiny HF model, a rank-side run at any layout, plain CE loss.

``run_layout`` runs inside a rank (spawned by ``tests.dist.run_ranks``): it starts Megatron at the given TP/PP
(DP = world / (TP * PP)), builds the model from the HF directory, splits the samples over DP, trains one
mini-batch with ``train_minibatch`` and returns what the tests compare, as full (unsharded) HF-named tensors.
Plain cross-entropy is the real objective with :data:`CE`'s settings, on samples that are all demonstrations.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

VOCAB = 112  # padded to 128 by make_vocab_size_divisible_by=64: exercises the padded-column masking


def make_model_dir(path) -> str:
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    make_tiny_hf_model(path, family="qwen2", seed=0, vocab_size=VOCAB, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=256, tie_word_embeddings=True)
    return str(path)


def make_samples(n: int = 8, seed: int = 0, group_size: int = 4):
    """Groups of ``group_size`` with one demo each, mixed rewards, varied lengths, old/engine log-probs set."""
    from megatron_srft.training.batch import Sample

    rng = random.Random(seed)
    out = []
    for k in range(n):
        P, R = rng.randint(2, 7), rng.randint(2, 11)
        is_demo = k % group_size == 0
        out.append(Sample(prompt_ids=[rng.randint(4, VOCAB - 1) for _ in range(P)],
                          response_ids=[rng.randint(4, VOCAB - 1) for _ in range(R)],
                          advantage=rng.choice([-1.0, -0.5, 0.5, 1.0]), is_demo=is_demo, group=k // group_size,
                          reward=float(rng.random() < 0.5),
                          old_logprobs=[-rng.uniform(3.5, 5.5) for _ in range(R)],
                          engine_logprobs=[-rng.uniform(3.5, 5.5) for _ in range(R)]))
    return out


#: (preset, overrides) of plain next-token NLL, token-mean over the whole mini-batch, sum(-logp * mask) / N, when
#: every sample is a demonstration: the SFT term with w = 1 and the verl token-mean aggregation
CE = ("sft", {"aggregation": "token_mean"})


def setup_rank(hf_dir: str, tp: int, pp: int, *, use_distributed_optimizer: bool = True,
               sequence_parallel: bool = False):
    """Start Megatron at TP x PP (optionally with sequence parallelism) on this rank; returns
    (groups, handle, optimizer, arch)."""
    from megatron_srft.config import ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_srft.models.arch import load_arch
    from megatron_srft.models.builder import build_model, build_optimizer
    from megatron_srft.models.mapping import load_hf_into_model
    from megatron_srft.distributed.groups import init_distributed

    pcfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          use_distributed_optimizer=use_distributed_optimizer, sequence_parallel=sequence_parallel)
    mcfg = ModelConfig(params_dtype="fp32", transformer_impl="local", make_vocab_size_divisible_by=64)
    groups = init_distributed(pcfg, seed=1234)
    arch = load_arch(hf_dir)
    handle = build_model(arch, mcfg, pcfg)
    load_hf_into_model(handle.chunks, arch, hf_dir, groups)  # before the optimizer copies master weights
    # Megatron's distributed optimizer is Adam-only. Adam's first step is -lr * g / (|g| + eps) (bias-corrected
    # moments are g and g^2); with lr = eps = 1e4 that is -g * (1 - |g|/1e4 + ...): linear in the gradient to
    # ~1e-5 relative, so parameters after one step compare gradients (Adam's usual eps would compare sign(g)).
    ocfg = OptimizerConfig(name="adam", lr=1e4, adam_eps=1e4, clip_grad=0.0)
    opt = build_optimizer(handle, ocfg, mcfg, pcfg)
    return groups, handle, opt, arch


def full_params(handle, arch, groups) -> dict[str, torch.Tensor]:
    from megatron_srft.models.mapping import export_hf_weights

    return {n: t.detach().cpu().clone() for n, t in export_hf_weights(handle.chunks, arch, groups)}


def run_layout(hf_dir: str, tp: int, pp: int, samples, micro_batch_tokens: int, *, packing: bool = True,
               preset: str = CE[0], algo_overrides: Optional[dict] = None,
               want_logits: bool = False, sequence_parallel: bool = False) -> dict:
    """One mini-batch on this rank's layout. Returns loss, grad_norm, metrics, params after the step (rank 0 of
    each replica returns them; others return None for the tensors to keep pickles small), and ``norm_grads``:
    every norm weight's gradient after the step's reductions, on every rank (under sequence parallelism each
    TP rank's norm sees its slice of the sequence; the step must sum them over TP).
    With ``sequence_parallel`` the rows are padded to a multiple of TP (the sequence is split over TP).
    ``preset`` and ``algo_overrides``: the objective's settings (default :data:`CE`)."""
    from megatron_srft.algorithms.presets import resolve
    from megatron_srft.config import AlgorithmConfig
    from megatron_srft.training.batch import pack_micro_batches
    from megatron_srft.training.step import forward_logprobs, train_minibatch

    groups, handle, opt, arch = setup_rank(hf_dir, tp, pp, sequence_parallel=sequence_parallel)
    if preset == CE[0] and algo_overrides is None:
        algo_overrides = CE[1]
    # every DP rank its strided share (the objective's normalisers are global, so any split gives the same step)
    shards = [list(range(r, len(samples), groups.dp_size)) for r in range(groups.dp_size)]
    mine = [samples[i] for i in shards[groups.dp_rank]]
    mbs = pack_micro_batches(mine, micro_batch_tokens, packing=packing,
                             pad_to_multiple=tp if sequence_parallel else 1)
    out: dict = {"dp_size": groups.dp_size, "num_micro_batches": len(mbs)}
    lp = forward_logprobs(handle.chunks, mbs, groups, arch.vocab_size)
    # per-sample log-probs, keyed by the global sample index, so any layout can be compared
    from megatron_srft.training.batch import per_sequence_values

    per_seq = per_sequence_values(mbs, [p for p, _ in lp], len(mine))
    out["seq_logprobs"] = {shards[groups.dp_rank][k]: v for k, v in enumerate(per_seq)}
    if want_logits:
        out["logits"] = _full_logits(handle, mbs[0], groups)
    settings = resolve(AlgorithmConfig(preset=preset, **(algo_overrides or {})))
    metrics = train_minibatch(handle.chunks, opt, mbs, settings, groups, arch.vocab_size)
    out["metrics"] = metrics
    out["norm_grads"] = _norm_grads(handle)
    params = full_params(handle, arch, groups)
    out["params"] = params if groups.rank == 0 else None
    return to_numpy(out)


def _norm_grads(handle) -> dict:
    """{name: main_grad} of the norm weights (replicated over TP), after finalize_model_grads' reductions."""
    from megatron_srft.models.builder import unwrap

    out = {}
    for chunk in handle.chunks:
        for name, p in unwrap(chunk).named_parameters():
            if "layernorm" in name and getattr(p, "main_grad", None) is not None:
                out[name] = (p.main_grad.detach().clone(), bool(getattr(p, "sequence_parallel", False)))
    return out


def to_numpy(obj):
    """Tensors -> numpy arrays, recursively: a torch tensor sent through a multiprocessing queue travels as a
    shared-memory handle that dies with the exiting rank process; numpy arrays are pickled by value."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def _full_logits(handle, mb, groups) -> Optional[torch.Tensor]:
    """Logits [T, V_padded] of one micro-batch (TP shards gathered); None except on the last PP stage."""
    from megatron_srft.training.batch import model_forward

    if not groups.is_last_pp_stage or groups.pp_size > 1:
        return None
    with torch.no_grad():
        local = model_forward(handle.chunks[0], mb)
    if groups.tp_size > 1:
        parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=groups.tp_group)
        local = torch.cat(parts, dim=-1)
    return local.detach().cpu()
