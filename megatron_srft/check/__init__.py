"""The node check (``srft check``, the command in cli/check.py): validate a node and measure it, in minutes, before
a run. Not core: it may import the core, which never imports it. One module per check:

    environment.py        1a  torch / CUDA / NCCL / megatron-core / Transformer Engine / apex / vLLM versions, devices
    device.py             1b  dense matmul rate of this device;  1c  pinned host->device bandwidth (and the memcpy rate)
    collectives.py        2   the distributed world starts; all-reduce bus bandwidth over it
    train_step.py         3a  one Megatron training step: s/step, tokens/s/device, MFU;  3b  MFU vs the datasheet peak
    logprob_op.py         4   fused log-prob + entropy vs the naive op: extra memory and time
    vllm_engine.py        5a  engine start and generation;  5b  weight sync;  5c  engine/trainer mismatch
    transformer_engine.py 6a/6b  step 3 on the TE spec in bf16 and FP8

and what they share: runner.py (the run: config, the checks in order, the summary), context.py (sizes, this
rank's state, skip rules), measure.py (timing and peak memory), results.py (the lines, the ``--out`` file),
calls.py (every call into training/ and rollout/). Performance facts (peaks, FLOPs, MFU) are perf.py's.
"""
