"""``srft score``: per-token log-probs and entropies of given sequences under the Megatron model.

    srft score --ckpt DIR --data IN.jsonl --out OUT.jsonl [--dtype fp32]
    torchrun --nproc-per-node 2 -m megatron_srft score --ckpt DIR --data IN.jsonl --out OUT.jsonl --tp 2

Input rows: ``{"input_ids": [...]}`` or ``{"text": "..."}`` (tokenized with the checkpoint's tokenizer), with an
optional ``"response_start"`` (default 1). Output rows, in input order: ``{"logprobs": [...], "entropy": [...]}``
for the tokens at positions ``response_start .. T-1``: ``logprobs[j] = log p(x_t | x_<t)`` with
``t = response_start + j`` and ``entropy[j] = H(p(. | x_<t))`` over the true vocabulary (padding excluded).
An ``"id"`` field, when present, is copied through.

``--ckpt`` accepts an HF directory, a converted directory, a training checkpoint or its ``model/``.
The forward runs through Megatron's forward-only schedule (``get_forward_backward_func``), so PP works; rows
are split over data-parallel replicas.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.atomic import check_output, write_text_atomic
from ..config import ParallelConfig
from ..data.templates import load_tokenizer
from ..distributed import collectives
from ..distributed.layout import device_memory_bytes
from ..dtypes import DTYPES
from ..errors import UserError
from ..ops.logprob import vocab_parallel_logprob_entropy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="HF dir, converted dir, training checkpoint or its model/.")
    parser.add_argument("--data", required=True, help="Input JSONL: {input_ids | text, response_start?}.")
    parser.add_argument("--out", required=True, help="Output JSONL: {logprobs, entropy} per input row.")
    parser.add_argument("--tp", type=int, default=1, help="Tensor-parallel size.")
    parser.add_argument("--pp", type=int, default=1, help="Pipeline-parallel size.")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="Parameter dtype (default: the checkpoint's).")


def read_rows(path: str | Path, tokenizer_dir: Optional[Path], vocab_size: int) -> list[dict]:
    """Parse and check the input JSONL; returns [{input_ids, response_start, id?}]. Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    tokenizer = None
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise UserError(f"{where}: input_ids: expected a list of integers")
        elif isinstance(row.get("text"), str):
            if tokenizer is None:
                if tokenizer_dir is None:
                    raise UserError(f"{where}: 'text' rows need tokenizer files next to the checkpoint")
                tokenizer = load_tokenizer(tokenizer_dir)
            ids = tokenizer(row["text"])["input_ids"]
        else:
            raise UserError(f"{where}: expected 'input_ids' (list of ints) or 'text' (string)")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise UserError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        start = row.get("response_start", 1)
        if not isinstance(start, int) or not 1 <= start < len(ids):
            raise UserError(f"{where}: response_start: expected an integer in [1, {len(ids) - 1}] "
                            f"(the sequence has {len(ids)} tokens), got {start!r}")
        out = {"input_ids": ids, "response_start": start}
        if "id" in row:
            out["id"] = row["id"]
        rows.append(out)
    return rows


@torch.no_grad()
def score_sequences(chunks: list, sequences: list[list[int]], groups, vocab_size: int
                    ) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Log-prob and entropy of every next token, one sequence per micro-batch, forward-only schedule.

    Args:
        chunks: this rank's model chunks; sequences: token ids (each >= 2 tokens), the same list on every rank
            of this model replica; vocab_size: the true vocabulary (padded logit columns are excluded).
    Returns:
        On the last pipeline stage: per sequence (logprob [T-1], entropy [T-1]) for tokens 1..T-1 (fp32).
        Other stages: None.
    """
    # lazy, as checkpoint.convert and groups below: Megatron stays out of `srft score --help`
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = groups.device
    batches = [torch.tensor(s, dtype=torch.long, device=device)[None] for s in sequences]

    def forward_step(data_iterator, model):
        ids = next(data_iterator)  # [1, T]
        num_tokens = ids.shape[1]
        position_ids = torch.arange(num_tokens, device=device)[None]
        causal_mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device), 1)[None, None]
        output = model(ids, position_ids, causal_mask)  # last stage: logits [1, T, V_local]

        def collect(logits, non_loss_data=True):
            # position t predicts token t + 1: logits[:-1] scored against ids[1:]
            logp, ent = vocab_parallel_logprob_entropy(logits[0, :-1], ids[0, 1:], tp_group=groups.tp_group,
                                                       vocab_size=vocab_size)
            return logp.float().cpu(), ent.float().cpu()

        return output, collect

    if not batches:
        return [] if groups.is_last_pp_stage else None
    for c in chunks:
        c.eval()
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=chunks, num_microbatches=len(batches),
        seq_length=max(b.shape[1] for b in batches), micro_batch_size=1, forward_only=True,
        collect_non_loss_data=True)
    return list(results) if groups.is_last_pp_stage else None




def score_device(source, pcfg, params_dtype: Optional[str], cuda_available: bool,
                 gpu_memory_bytes: Optional[int], local_rank: int = 0) -> torch.device:
    """Where this rank's model is scored: its GPU when CUDA is available, else CPU (groups.device_for). A model
    whose weights at ``pcfg``'s TP/PP exceed one GPU (``gpu_memory_bytes``) is refused in one line naming --tp/--pp."""
    from ..checkpoint.convert import weights_bytes_per_rank
    from ..distributed.groups import device_for

    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    return device_for("score", cuda_available, local_rank,
                      model_bytes=weights_bytes_per_rank(source, pcfg, params_dtype) if cuda_available else None,
                      device_memory_bytes=gpu_memory_bytes, field="--tp/--pp",
                      fix=f"that is at TP={tp} PP={pp}: split it over more GPUs, torchrun --nproc-per-node N -m "
                          f"megatron_srft score ... --tp N")


def main(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import build_and_load, resolve_source
    from ..distributed.groups import destroy, init_distributed

    if args.tp < 1 or args.pp < 1:
        raise UserError(f"--tp/--pp: expected integers >= 1, got {args.tp}/{args.pp}")
    source = resolve_source(args.ckpt)  # bad paths fail before any process group exists
    check_output(Path(args.out), [Path(args.ckpt), source.root, Path(args.data)])
    pcfg = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    groups = init_distributed(pcfg)
    try:
        cuda = torch.cuda.is_available()
        # a model too large for its GPUs is refused before it is built (build_and_load places it); after the start-up,
        # which made this rank's GPU the current device
        score_device(source, pcfg, args.dtype, cuda, device_memory_bytes(True) if cuda else None)
        tok_dir = source.root if (source.root / "tokenizer_config.json").is_file() else None
        rows = read_rows(args.data, tok_dir, source.arch.vocab_size)
        handle = build_and_load(source, pcfg, groups, params_dtype=args.dtype, purpose="score")
        mine = list(range(groups.dp_rank, len(rows), groups.dp_size))
        scored = score_sequences(handle.chunks, [rows[i]["input_ids"] for i in mine], groups,
                                 source.arch.vocab_size)
        local = []
        if scored is not None and groups.tp_rank == 0:
            for i, (logp, ent) in zip(mine, scored):
                s = rows[i]["response_start"] - 1
                local.append((i, logp[s:].tolist(), ent[s:].tolist()))
        gathered = collectives.all_gather_object(local)
        if groups.rank == 0:
            by_index = {i: (lp, ent) for part in gathered for i, lp, ent in part}
            out_rows = []
            for i, row in enumerate(rows):
                lp, ent = by_index[i]
                out_rows.append({**({"id": row["id"]} if "id" in row else {}), "logprobs": lp, "entropy": ent})
            write_text_atomic(Path(args.out), "".join(json.dumps(row) + "\n" for row in out_rows))
            print(f"srft score: wrote {len(out_rows)} rows to {args.out}")
        collectives.barrier()
    finally:
        destroy()
    return 0
