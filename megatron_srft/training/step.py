"""The Megatron adapter: the one place that owns Megatron's loss-scaling contract.

The pure loss (``algorithms.losses.srft_objective``) returns, per micro-batch m on DP rank r, its SHARE
``l_{r,m}`` of the mini-batch loss, normalised with mini-batch-global counts (:func:`compute_normalizers`), so

    L = sum_r sum_m l_{r,m}                                                                       (1)

independently of micro-batching, packing and the DP/PP/TP layout. This module makes Megatron's gradient
equal dL/dtheta exactly. The mode is chosen on purpose: megatron-core 0.16's default,
``TransformerConfig.calculate_per_token_loss = False`` (what ``models.builder`` builds). In that mode

  * the schedule (``forward_step_calc_loss``) takes a loss_func returning ``(loss, reduced)`` and
    back-propagates ``loss * cp_size / M_r`` (M_r = micro-batches on rank r; cp_size = 1 here);
  * Megatron DDP pre-scales each rank's grads by 1 / dp_size and SUMS over DP (or averages in the collective;
    both give the DP mean).

So the loss_func returns ``l_{r,m} * M_r * dp_size`` and the gradient after the DP reduction is

    (1 / dp) * sum_r sum_m (1 / M_r) * d(l_{r,m} * M_r * dp) / dtheta  =  sum_r sum_m dl_{r,m}/dtheta = dL/dtheta.

(The other mode, ``calculate_per_token_loss = True``, divides by a token count that Megatron all-reduces; our
normalisers are already global and per-algorithm, so that division would have to be undone.) The factor is a
power of two in the usual layouts; otherwise it costs one rounding of the scalar loss.

Megatron's schedules read the parallel state globals (set by ``parallel.init_distributed``); everything else
here uses the groups passed in as :class:`ParallelGroups`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from ..algorithms.losses import Normalizers, TokenBatch, srft_objective
from ..algorithms.metrics import accumulate, all_reduce_metrics, finalize, is_max
from ..algorithms.mismatch import mismatch_sums
from ..algorithms.presets import AlgoSettings
from ..distributed import collectives
from ..distributed.groups import ParallelGroups
from ..distributed.layout import token_pad_multiple
from ..ops.logprob import vocab_parallel_logprob_entropy
from .batch import MicroBatch, empty_micro_batch, model_forward

__all__ = ["compute_normalizers", "forward_logprobs", "train_minibatch", "token_batch", "configure_schedule",
           "sync_parameters"]


def sync_parameters(chunks: list) -> None:
    """Make every parameter current on this rank before anything reads it outside a training forward.

    With the distributed optimizer each DP rank updates only its shard; the all-gather that completes the others is
    issued by ``optimizer.step()`` or, with ``overlap_param_gather``, deferred to the forward pre-hooks of the next
    TRAINING forward (and only after ``zero_grad_buffer``). A weight sync, an evaluation, the old-log-prob forward,
    a checkpoint or an HF export in between would read other ranks' shards one step old. A forced, synchronous
    all-gather (Megatron's ``start_param_sync(force_sync=True)``: it waits for an in-flight gather or issues one)
    closes that gap; without overlap it is a no-op.
    """
    for c in chunks:
        ddp_config = getattr(c, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather and ddp_config.use_distributed_optimizer:
            c.start_param_sync(force_sync=True)


def compute_normalizers(micro_batches: Sequence[MicroBatch], settings: AlgoSettings, groups: ParallelGroups,
                        entropies: Optional[Sequence[torch.Tensor]] = None) -> Normalizers:
    """The mini-batch-global denominators (``algorithms.losses.Normalizers``), computed once before the loop.

    Loss tokens and sequences are summed over this rank's micro-batches and all-reduced over DP (the ranks of one
    model replica hold the same micro-batches, so TP/PP need no reduction). ``entropies``: per micro-batch
    entropy [T] (e.g. from :func:`forward_logprobs`), required when ``settings.entropy_granularity`` is
    'batch_mean': mean_entropy = sum(H * mask) / sum(mask) over the whole mini-batch.
    """
    counts = torch.zeros(4, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        mask = mb.loss_mask > 0
        counts[0] += float(mask.sum())
        counts[1] += float(mb.num_sequences)
        if entropies is not None:
            counts[2] += float(torch.where(mask, entropies[i].double().cpu(), 0.0).sum())
        counts[3] += float((mask & mb.is_demo.bool()).sum())
    counts = collectives.all_reduce(counts, "sum", groups.dp_group)
    num_tokens, num_sequences, num_demo_tokens = float(counts[0]), float(counts[1]), float(counts[3])
    mean_entropy = float(counts[2]) / max(num_tokens, 1.0) if entropies is not None else None
    if settings.entropy_granularity == "batch_mean" and mean_entropy is None:
        raise ValueError("compute_normalizers: algorithm.entropy_granularity 'batch_mean' needs the per-token "
                         "entropies of the mini-batch (pass entropies= from forward_logprobs)")
    return Normalizers.for_settings(settings, num_tokens=num_tokens, num_sequences=num_sequences,
                                    mean_entropy=mean_entropy, num_demo_tokens=num_demo_tokens)


def token_batch(mb: MicroBatch, logprob: torch.Tensor, entropy: torch.Tensor) -> TokenBatch:
    """The pure loss's input for one micro-batch: the model's per-token log-probs/entropies plus the batch."""
    dev = logprob.device
    # No stored pi_old: this forward runs before any update of the rollout batch, so pi_old = pi_theta (detached);
    # the ratio is exactly 1 in value and d ratio = d log pi. Saves the old-log-prob pass (training/loop.py).
    old = logprob.detach() if mb.old_logprob is None else mb.old_logprob.to(dev)
    return TokenBatch(
        logprob=logprob, entropy=entropy, old_logprob=old, advantage=mb.advantage.to(dev),
        is_demo=mb.is_demo.to(dev), loss_mask=mb.loss_mask.to(dev), seq_index=mb.seq_index.to(dev),
        seq_num_tokens=mb.seq_num_tokens.to(dev),
        engine_logprob=None if mb.engine_logprob is None else mb.engine_logprob.to(dev),
    )


def configure_schedule(chunks: list, optimizer=None) -> Any:
    """Give the shared TransformerConfig what Megatron's schedules call back into (idempotent).

    finalize_model_grads: DP reduction, TP-replicated (norm) grads, tied-embedding grads across PP stages;
    grad_scale_func: the fp16 loss scale (identity for fp32/bf16); no_sync_func: one DP reduction per mini-batch.
    """
    config = get_model_config(chunks[0])
    if config.calculate_per_token_loss:
        raise ValueError("training.step: expects TransformerConfig.calculate_per_token_loss=False "
                         "(this module's loss-scaling contract; see its docstring)")
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError("training.step: context parallelism is not supported in this release")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
    no_sync = [c.no_sync for c in chunks if hasattr(c, "no_sync")]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else (no_sync or None)
    return config


def _pad_multiple(chunks: list) -> int:
    """The token multiple every micro-batch of this model needs (distributed.layout.token_pad_multiple)."""
    config = get_model_config(chunks[0])
    return token_pad_multiple(bool(config.sequence_parallel), int(config.tensor_model_parallel_size),
                              config.fp8_recipe if getattr(config, "fp8", None) is not None else None)


def _schedule(chunks, micro_batches, forward_step, forward_only: bool):
    config = get_model_config(chunks[0])
    if config.sequence_parallel:
        tp = config.tensor_model_parallel_size
        bad = [mb.num_tokens for mb in micro_batches if mb.num_tokens % tp]
        if bad:
            raise ValueError(f"training.step: sequence parallelism needs micro-batch lengths divisible by TP ({tp}), "
                             f"got {bad[0]}; pack with pack_micro_batches(..., pad_to_multiple) as "
                             "distributed.layout.token_pad_multiple says")
    func = get_forward_backward_func()
    return func(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=chunks,
                num_microbatches=len(micro_batches), seq_length=max(mb.num_tokens for mb in micro_batches),
                micro_batch_size=1, forward_only=forward_only)


def _last_stage_rank(groups: ParallelGroups) -> int:
    return collectives.global_rank(groups.pp_group, groups.pp_size - 1)


def forward_logprobs(chunks: list, micro_batches: Sequence[MicroBatch], groups: ParallelGroups,
                     vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Forward only, through Megatron's pipeline schedule: per micro-batch (logprob [T], entropy [T]) fp32, CPU.

    Values at position t are for target ``mb.targets[t]`` (meaningful where ``loss_mask`` is 1). Available on
    EVERY rank of the model-parallel group: TP ranks agree by construction, the last PP stage broadcasts.
    """
    if not micro_batches:
        return []
    configure_schedule(chunks)
    sync_parameters(chunks)
    results: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model_forward(model, mb)

        def loss_func(logits):
            lp, ent = vocab_parallel_logprob_entropy(logits, mb.targets.to(logits.device), tp_group=groups.tp_group,
                                                     vocab_size=vocab_size)
            results.append(torch.stack([lp, ent]).float())
            return logits.new_zeros(()), {}

        return out, loss_func

    with torch.no_grad():
        _schedule(chunks, list(micro_batches), forward_step, forward_only=True)
    sizes = [mb.num_tokens for mb in micro_batches]
    if groups.is_last_pp_stage:
        flat = torch.cat(results, dim=1)
    else:
        flat = torch.empty(2, sum(sizes), dtype=torch.float32, device=groups.device)
    if groups.pp_size > 1:
        flat = collectives.broadcast(flat, _last_stage_rank(groups), groups.pp_group)
    flat = flat.cpu()
    return [(p[0], p[1]) for p in torch.split(flat, sizes, dim=1)]


def _to_host(metric_sums: dict, loss_sum: torch.Tensor) -> tuple[dict, float]:
    """The device-side (sum, count) metrics and loss as CPU tensors, in ONE device-to-host copy per mini-batch."""
    names = sorted(metric_sums)
    flat = torch.stack([loss_sum.double()] + [v.double() for n in names for v in metric_sums[n]]).cpu()
    return {n: (flat[1 + 2 * i].float(), flat[2 + 2 * i].float()) for i, n in enumerate(names)}, float(flat[0])


def _reduce_metrics(metrics: dict, loss_sum: float, groups: ParallelGroups) -> tuple[dict, float]:
    """The last stage's (sum, count) metrics and loss, broadcast over PP, then reduced over DP (SUM, and MAX for
    ``*_max`` names, per algorithms.metrics). Metric names may differ between DP ranks (e.g. a rank without
    engine log-probs): the union is used, a missing metric counting as (0, 0)."""
    if groups.pp_size > 1:
        metrics, loss_sum = collectives.broadcast_object((metrics, loss_sum) if groups.is_last_pp_stage else None,
                                                         _last_stage_rank(groups), groups.pp_group)
    if groups.dp_size > 1:
        names = collectives.all_gather_object(sorted(metrics), groups.dp_group)
        for name in sorted(set().union(*names)):
            if name not in metrics:
                empty = torch.tensor(float("-inf") if is_max(name) else 0.0)
                metrics[name] = (empty, torch.tensor(1.0 if is_max(name) else 0.0))
        metrics = all_reduce_metrics(metrics, groups.dp_group)
        (loss_sum,) = collectives.sum_floats([loss_sum], groups.dp_group)
    return metrics, loss_sum


def grads_are_finite(chunks: list, groups: ParallelGroups) -> bool:
    """Whether every gradient on every rank is finite (one flag per rank, all-reduced over the world).

    Megatron's optimizer skips a non-finite step only under the fp16 loss scaler; in bf16/fp32 a NaN gradient
    would be clipped into NaN weights. Reads the DDP gradient buffers (after finalize_model_grads, so each rank
    holds its reduced shard), or ``main_grad`` / ``grad`` of unwrapped chunks.
    """
    flags = []  # device-side: one host copy at the end
    for c in chunks:
        buffers = list(getattr(c, "buffers", []) or []) + list(getattr(c, "expert_parallel_buffers", []) or [])
        grads = [b.grad_data for b in buffers] or [
            g for prm in c.parameters()
            if (g := (prm.main_grad if getattr(prm, "main_grad", None) is not None else prm.grad)) is not None]
        flags += [torch.isfinite(g).all() for g in grads]
    finite_here = bool(torch.stack(flags).all().cpu()) if flags else True
    return not collectives.agree(not finite_here)


def train_minibatch(chunks: list, optimizer, micro_batches: Sequence[MicroBatch], settings: AlgoSettings,
                    groups: ParallelGroups, vocab_size: int) -> dict[str, float]:
    """One optimizer step on this rank's micro-batches of a mini-batch; returns metrics reduced over DP.

    The loss is ``algorithms.losses.srft_objective`` with the mini-batch's :func:`compute_normalizers` (with
    ``entropy_granularity='batch_mean'`` they cost one extra forward pass). Gradient = d(sum of loss shares over micro-batches and DP)/dtheta exactly (module doc).
    A DP rank without micro-batches runs one empty micro-batch (loss 0) so the collectives line up.
    A micro-batch without stored ``old_logprob`` uses its own forward's log-prob as pi_old (see token_batch).

    Losses and metrics accumulate on the device and reach the host once, after the schedule (a host sync inside
    a micro-batch's loss function would stall the pipeline).

    Returns ``loss`` (the mini-batch loss, eq. (1)), every metric finalised (sum/count, or max for ``*_max``
    names; see algorithms.metrics), ``mismatch_*`` (engine vs trainer pi_old on rollout tokens, when the engine's
    log-probs are known), ``grad_norm`` (before clipping), ``num_skipped`` (1 when the update was not applied:
    a non-finite loss or gradient anywhere, or the fp16 scaler's inf/nan) and ``num_micro_batches`` (this rank's).
    """
    mbs = list(micro_batches) or [empty_micro_batch(_pad_multiple(chunks))]
    entropies = None
    if settings.entropy_granularity == "batch_mean":
        # the mini-batch mean of H under the current weights: one extra forward pass
        entropies = [ent for _, ent in forward_logprobs(chunks, micro_batches, groups, vocab_size)]
    norm = compute_normalizers(list(micro_batches), settings, groups, entropies=entropies)
    configure_schedule(chunks, optimizer)
    for c in chunks:
        if hasattr(c, "zero_grad_buffer"):
            c.zero_grad_buffer()
    optimizer.zero_grad()

    num_mb = len(mbs)
    undo_schedule = float(num_mb * groups.dp_size)  # cancels the schedule's 1/M_r and DDP's 1/dp (module doc)
    loss_sum = torch.zeros((), dtype=torch.float64, device=groups.device)
    metric_sums: dict = {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model_forward(model, mb)

        def loss_func(logits):
            nonlocal loss_sum
            lp, ent = vocab_parallel_logprob_entropy(logits, mb.targets.to(logits.device), tp_group=groups.tp_group,
                                                     vocab_size=vocab_size)
            batch = token_batch(mb, lp, ent)
            loss, metrics = srft_objective(batch, settings, norm)
            loss_sum = loss_sum + loss.detach().double().to(loss_sum.device)
            accumulate(metric_sums, metrics)
            if batch.engine_logprob is not None:
                # engine vs trainer: pi_old, or (pi_old being the engine's own) this forward's log-prob
                rollout = batch.loss_mask.bool() & ~batch.is_demo.bool()
                trainer = lp.detach() if mb.old_from_engine else batch.old_logprob
                accumulate(metric_sums, mismatch_sums(batch.engine_logprob, trainer, rollout))
            return loss * undo_schedule, {}

        return out, loss_func

    _schedule(chunks, mbs, forward_step, forward_only=False)
    finite = grads_are_finite(chunks, groups)
    if finite:
        update_successful, grad_norm, _ = optimizer.step()
    else:  # never apply (or clip into the weights) a non-finite gradient; the loop counts and limits skips
        update_successful, grad_norm = False, float("nan")
        optimizer.zero_grad()

    host_metrics, host_loss = _to_host(metric_sums, loss_sum) if metric_sums else ({}, float(loss_sum))
    reduced, total_loss = _reduce_metrics(host_metrics, host_loss, groups)
    out = finalize(reduced)
    out["loss"] = total_loss  # sum of the shares over micro-batches and DP = the mini-batch loss, eq. (1)
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    out["num_skipped"] = 0.0 if update_successful else 1.0
    out["num_micro_batches"] = float(num_mb)
    return out
