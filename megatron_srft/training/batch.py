"""Samples -> packed micro-batches, and the one model call that consumes them.

A sequence k is ``prompt_ids + response_ids`` (P_k + R_k tokens). The model at position t predicts token t+1, so
the per-token tensors of a micro-batch are indexed by the *predicting* position:

    targets[t]    = tokens[t + 1]                       (0 at a sequence's last position)
    loss_mask[t]  = 1  iff  tokens[t + 1] is a response token, i.e. P_k - 1 <= t - start_k <= P_k + R_k - 2
    old_logprob[t], engine_logprob[t] = the sample's value for response token (t - start_k) - (P_k - 1)

so the response token j of sequence k is predicted at position start_k + P_k - 1 + j. Every per-token tensor is
flat [T]; ``tokens`` and ``position_ids`` are [1, T] (one packed row), as Megatron's GPTModel expects.

Packing is first-fit-decreasing by length into micro-batches of at most ``micro_batch_tokens`` tokens; a longer
sequence gets a micro-batch of its own. Sequences in one row never attend to each other: the row goes to the
model in THD format (``PackedSeqParams`` with the cumulative sequence lengths) on both layer specs, Transformer
Engine's and our local one (models/local_spec.py attends per segment: memory grows with sum L_k^2, not T^2).
Megatron's THD RoPE restarts at every sequence, so a packed sequence sees the positions it would see alone;
packed and unpacked logits agree up to float rounding (tested). :func:`block_causal_mask` is the equivalent
dense [T, T] mask, kept as the reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from ..distributed import cpu_compat
from ..models.builder import unwrap

__all__ = [
    "Sample",
    "MicroBatch",
    "MiniBatch",
    "pack_micro_batches",
    "empty_micro_batch",
    "block_causal_mask",
    "packed_seq_params",
    "model_forward",
    "per_sequence_values",
]

#: token id used for padding positions (they carry loss_mask 0, so its value never matters).
PAD_ID = 0


@dataclass
class Sample:
    """One sequence of a mini-batch: a rollout or a demonstration, with its sequence-level advantage.

    ``old_logprobs`` / ``engine_logprobs``: one value per response token (len == len(response_ids)), from the
    trainer's pre-update forward and from the rollout engine; None when not (yet) known.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    is_demo: bool
    group: int
    reward: float
    old_logprobs: Optional[list[float]] = None
    engine_logprobs: Optional[list[float]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def check(self, where: str) -> None:
        if len(self.prompt_ids) < 1:
            raise ValueError(f"{where}: prompt_ids is empty (the first response token needs a predicting position)")
        if len(self.response_ids) < 1:
            raise ValueError(f"{where}: response_ids is empty")
        for name in ("old_logprobs", "engine_logprobs"):
            vals = getattr(self, name)
            if vals is not None and len(vals) != len(self.response_ids):
                raise ValueError(f"{where}: {name} has {len(vals)} values, expected one per response token "
                                 f"({len(self.response_ids)})")


@dataclass
class MicroBatch:
    """One packed row of sequences. Per-token tensors are [T] (T = num_tokens, padding included).

    cu_seqlens [S + 1] int32: segment boundaries (S = num_sequences, plus one trailing padding segment when the
    row is padded), so cu_seqlens[-1] == T. seq_index [T]: the sequence's position in the list given to
    :func:`pack_micro_batches` (-1 on padding). seq_num_tokens [T]: number of loss tokens (= response length) of
    the token's sequence (0 on padding). loss_mask [T] float 0/1; is_demo [T] bool; advantage, old_logprob,
    engine_logprob [T] float32 (0 where unknown or masked).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    advantage: torch.Tensor
    is_demo: torch.Tensor
    seq_index: torch.Tensor
    seq_num_tokens: torch.Tensor
    old_logprob: torch.Tensor
    engine_logprob: Optional[torch.Tensor]
    num_sequences: int  # real sequences (padding segment not counted)
    max_seqlen: int  # longest segment, for THD attention kernels
    old_from_engine: bool = False  # old_logprob holds the engine's log-probs (train.old_logprobs = engine)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


@dataclass
class MiniBatch:
    """The share of one optimizer step that this rank trains: whole groups of samples, packed into micro-batches
    (training/loop.py ``split_minibatches``)."""

    micro_batches: list[MicroBatch]


def _build(samples: Sequence[Sample], indices: Sequence[int], pad_to: int) -> MicroBatch:
    """Concatenate ``samples[i] for i in indices`` into one row of ``pad_to`` (>= total length) tokens.

    Built from whole-row operations (a handful of tensor ops per micro-batch, not per sequence): with
    segment k = [start_k, start_k + L_k) and position p = t - start_k,
    targets[t] = tokens[t + 1] except at each segment's last position, loss_mask[t] = P_k - 1 <= p <= P_k + R_k - 2,
    and the per-sequence values (advantage, is_demo, seq_index, R_k) are repeated over their segment.
    """
    seqs = [samples[i] for i in indices]
    prompt_lens = [len(s.prompt_ids) for s in seqs]
    resp_lens = [len(s.response_ids) for s in seqs]
    lens = [p + r for p, r in zip(prompt_lens, resp_lens)]
    total = sum(lens)
    T = max(pad_to, total)
    pad = T - total
    flat: list[int] = []
    for s in seqs:
        flat.extend(s.prompt_ids)
        flat.extend(s.response_ids)
    flat.extend([PAD_ID] * pad)
    tokens = torch.tensor(flat, dtype=torch.long)
    # segments: the sequences, plus a trailing padding segment (it attends only to itself)
    seg_lens = lens + ([pad] if pad else [])
    cu = [0]
    for n in seg_lens:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    seg_len_t = torch.tensor(seg_lens, dtype=torch.long)

    def per_token(values: list, dtype) -> torch.Tensor:
        """One value per sequence (0 for the padding segment), repeated over its segment: [T]."""
        vals = torch.tensor(values + ([0] if pad else []), dtype=dtype)
        return torch.repeat_interleave(vals, seg_len_t, output_size=T)

    starts = torch.tensor(cu[:-1], dtype=torch.long)
    position_ids = torch.arange(T) - torch.repeat_interleave(starts, seg_len_t, output_size=T)
    P, R = per_token(prompt_lens, torch.long), per_token(resp_lens, torch.long)
    # response token j (0 <= j < R) is predicted at position P - 1 + j of its sequence
    loss_mask = ((position_ids >= P - 1) & (position_ids <= P + R - 2)).to(torch.float32)
    targets = torch.empty_like(tokens)
    targets[:-1] = tokens[1:]
    ends = cu_seqlens[1:len(seqs) + 1].long() - 1
    targets[ends] = PAD_ID  # a sequence's last position predicts nothing
    if pad:
        targets[total:] = PAD_ID
    advantage = per_token([float(s.advantage) for s in seqs], torch.float32)
    is_demo = per_token([bool(s.is_demo) for s in seqs], torch.bool)
    seq_index = torch.repeat_interleave(torch.tensor(list(indices) + ([-1] if pad else []), dtype=torch.long),
                                        seg_len_t, output_size=T)
    seq_num_tokens = R

    def response_values(name: str) -> Optional[torch.Tensor]:
        if all(getattr(s, name) is None for s in seqs):
            return None
        vals: list[float] = []
        for s, r in zip(seqs, resp_lens):
            v = getattr(s, name)
            vals.extend(v if v is not None else [0.0] * r)
        out = torch.zeros(T, dtype=torch.float32)
        out[loss_mask > 0] = torch.tensor(vals, dtype=torch.float32)  # loss positions are the response tokens, in order
        return out

    old_logprob = response_values("old_logprobs")
    if old_logprob is None:
        old_logprob = torch.zeros(T, dtype=torch.float32)
    engine_logprob = response_values("engine_logprobs")
    return MicroBatch(tokens=tokens[None], position_ids=position_ids[None], cu_seqlens=cu_seqlens, targets=targets,
                      loss_mask=loss_mask, advantage=advantage, is_demo=is_demo, seq_index=seq_index,
                      seq_num_tokens=seq_num_tokens, old_logprob=old_logprob, engine_logprob=engine_logprob,
                      num_sequences=len(indices), max_seqlen=max(seg_lens))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_micro_batches(samples: Sequence[Sample], micro_batch_tokens: int, *, packing: bool = True,
                       pad_to_multiple: int = 1) -> list[MicroBatch]:
    """Pack ``samples`` into micro-batches of at most ``micro_batch_tokens`` tokens each.

    packing=True: first-fit-decreasing by sequence length (ties keep input order, so the result is
    deterministic); a sequence longer than the budget gets a micro-batch of its own. packing=False: one sequence
    per micro-batch, every row padded to the longest sequence (the padded reference layout).
    ``pad_to_multiple`` pads each row's length up to a multiple (sequence parallelism needs T % TP == 0).
    """
    if micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens: expected >= 1, got {micro_batch_tokens}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple: expected >= 1, got {pad_to_multiple}")
    for i, s in enumerate(samples):
        s.check(f"samples[{i}]")
    if not samples:
        return []
    if not packing:
        longest = _round_up(max(s.num_tokens for s in samples), pad_to_multiple)
        return [_build(samples, [i], longest) for i in range(len(samples))]
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].num_tokens, i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = samples[i].num_tokens
        for b, load in enumerate(loads):
            if load + n <= micro_batch_tokens:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [_build(samples, b, _round_up(load, pad_to_multiple)) for b, load in zip(bins, loads)]


def empty_micro_batch(num_tokens: int = 1) -> MicroBatch:
    """A micro-batch with nothing to learn (loss_mask 0) that lets a DP rank without data join the collectives.
    ``num_tokens``: the layout's pad multiple (sequence parallelism splits even an empty row over TP)."""
    zeros = torch.zeros(num_tokens, dtype=torch.long)
    return MicroBatch(tokens=zeros[None], position_ids=torch.arange(num_tokens)[None],
                      cu_seqlens=torch.tensor([0, num_tokens], dtype=torch.int32), targets=zeros.clone(),
                      loss_mask=torch.zeros(num_tokens), advantage=torch.zeros(num_tokens),
                      is_demo=torch.zeros(num_tokens, dtype=torch.bool), seq_index=torch.full((num_tokens,), -1),
                      seq_num_tokens=torch.zeros(num_tokens, dtype=torch.long), old_logprob=torch.zeros(num_tokens),
                      engine_logprob=None, num_sequences=0, max_seqlen=num_tokens)


def block_causal_mask(cu_seqlens: torch.Tensor, num_tokens: int, device=None) -> torch.Tensor:
    """[1, 1, T, T] bool, True = masked: query i sees key j iff j <= i and both lie in the same segment."""
    bounds = cu_seqlens.to(device=device, dtype=torch.long)
    segment = torch.bucketize(torch.arange(num_tokens, device=device), bounds[1:], right=True)  # [T]
    pos = torch.arange(num_tokens, device=device)
    allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def packed_seq_params(mb: MicroBatch, device=None):
    """THD ``PackedSeqParams`` of a micro-batch: its segment boundaries (the trailing padding segment included)."""
    cu = mb.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)


def model_forward(model, mb: MicroBatch):
    """Run one micro-batch through this rank's model chunk.

    The row goes in as THD with its cumulative sequence lengths on both layer specs: Transformer Engine's fused
    attention and our local core (models/local_spec.py: attention per segment, no [T, T] mask) attend within
    each sequence, and Megatron's THD RoPE restarts positions at every sequence.

    On the last pipeline stage returns logits [T, V_local] (this rank's vocab shard); on other stages returns
    the hidden states Megatron sends downstream ([T, 1, H], or [T/TP, 1, H] with sequence parallelism).
    Non-first stages take their input from ``set_input_tensor`` (the schedule does that); ``tokens`` is unused
    there.
    """
    inner = unwrap(model)
    device = next(inner.parameters()).device
    tokens = mb.tokens.to(device)
    position_ids = mb.position_ids.to(device)
    params = packed_seq_params(mb, device)
    # Outside the CPU layer's function mode (a no-op on GPU): the mode redirects Megatron's set-up and schedule
    # code, and costs Python time on every torch call; the forward needs no redirect (its allocations go through
    # torch.cuda.current_device(), a CPU device on the CPU path) and backward never ran under the mode (autograd
    # does not carry it). Measured: about 10% of the toy's forward time (docs/benchmarks.md).
    with cpu_compat.suspended():
        out = model(input_ids=tokens, position_ids=position_ids, attention_mask=None, packed_seq_params=params)
    if getattr(inner, "post_process", True):
        return out[0]  # GPTModel returns [1, T, V_local] batch-first logits
    return out


def per_sequence_values(micro_batches: Sequence[MicroBatch], values: Sequence[torch.Tensor],
                        num_samples: int) -> list[torch.Tensor]:
    """Scatter per-token ``values[i]`` [T_i] of each micro-batch back to per-sample response-token tensors.

    Returns a list of ``num_samples`` tensors [R_k] (in the order the samples were packed), e.g. old log-probs
    to store in ``Sample.old_logprobs`` or engine/trainer mismatch per sequence.
    """
    out: list[Optional[torch.Tensor]] = [None] * num_samples
    for mb, v in zip(micro_batches, values):
        v = v.detach().to("cpu")
        for s in range(mb.num_sequences):
            a, b = int(mb.cu_seqlens[s]), int(mb.cu_seqlens[s + 1])
            k = int(mb.seq_index[a])
            sel = mb.loss_mask[a:b] > 0
            out[k] = v[a:b][sel]
    missing = [k for k, t in enumerate(out) if t is None]
    if missing:
        raise ValueError(f"per_sequence_values: samples {missing[:5]} are in none of the micro-batches")
    return out  # type: ignore[return-value]
