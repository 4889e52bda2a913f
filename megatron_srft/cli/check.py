"""``srft check``: validate a node and measure it, in minutes, before a run.

    srft check [--config X.yaml] [--quick] [--out results.json] [key.sub=value ...]
    torchrun --nproc-per-node 8 -m megatron_srft check            # every local GPU

Each check prints one line ``ID NAME PASS|FAIL|SKIP detail`` on global rank 0, in this order
(docs/performance.md explains every line):

    1a environment    torch / CUDA / NCCL / megatron-core / Transformer Engine / apex / vLLM versions, devices
    1b matmul         dense matmul rate of this device (bf16 on GPU, fp32 on CPU): several sizes, the best
    1c host->device   pinned host-to-device copy bandwidth (SKIP without CUDA)
    2  all-reduce     all-reduce bus bandwidth over the world (NCCL on GPU, gloo on CPU)
    3a train step     one Megatron training step (our builder + training/step.py, SRFT objective):
                      s/step, tokens/s/device, MFU against 1b's measured rate
    3b MFU datasheet  the same MFU against the card's datasheet dense bf16 peak (SKIP for cards not in the table)
    4  logprob op     fused log-prob + entropy (ops/logprob.py) vs the naive op: extra memory and time
    5a vllm engine    engine start and generation throughput                        (one SKIP line without vLLM)
    5b weight sync    step 3's model into the engine, GB/s against the device memcpy rate
    5c mismatch       engine vs trainer log-probs of the engine's samples
    6a/6b TE step     step 3 on the Transformer Engine spec in bf16 and FP8, and the speed-up  (one SKIP line
                      without TE; 6b SKIPs on a card that cannot run the FP8 recipe)

A failing check prints FAIL with a one-line reason and the command goes on; the exit code is 1 when any check
failed. Without ``--config`` the model is Qwen2.5-1.5B-shaped on a GPU with >= 60 GiB (0.5B-shaped with
``--quick`` or on smaller GPUs) and tiny on CPU, with random weights; with ``--config`` it is the config's model
and layout (shapes from ``model.path``'s config.json; weights are not loaded). The results are appended to the
``--out`` JSON file with the card, driver, versions and date.

Every collective goes through :mod:`megatron_srft.distributed.collectives`, which puts tensors on the group's
device; every timing is bracketed by ``torch.cuda.synchronize`` on GPU; memory is
``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) on CPU.

The checks live in :mod:`megatron_srft.check`, one module each.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config: check its model (shapes from model.path) and layout.")
    parser.add_argument("--quick", action="store_true",
                        help="Smaller sizes and fewer repeats (under a minute on CPU).")
    parser.add_argument("--out", default="srft_check.json",
                        help="JSON file the results are appended to (default: %(default)s). A benchmarks file "
                             "({'runs': {...}}, e.g. benchmarks/results.json) gets an entry runs['check/<card>'].")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, e.g. model.path=/m")


def main(args) -> int:
    from ..check.runner import run  # lazy: keeps Megatron (distributed/groups.py) out of `srft check --help`

    return run(args)
