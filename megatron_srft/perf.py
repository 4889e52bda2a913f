"""Performance facts, in one home: the cards' datasheet peaks, model FLOPs per pass, MFU.

Shared by ``srft check`` (its MFU lines), training's arithmetic and benchmarks/. The FLOPs convention is PaLM's
(docs/performance.md derives it). Pure arithmetic on a model's shapes (an ``ArchSpec``, passed in): it imports
nothing of the package.
"""

from __future__ import annotations

from typing import Optional

#: Dense (no 2:4 sparsity) BF16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched in order against
#: ``torch.cuda.get_device_name()`` (case-insensitive): every string in ``needs`` present, none of ``excludes``.
#: NVL variants are left out on purpose (their datasheets quote other figures): they get a datasheet SKIP.
KNOWN_CARDS: tuple[tuple[str, float, tuple[str, ...], tuple[str, ...]], ...] = (
    # label,       peak,  needs,             excludes
    ("H100 PCIe", 756.0, ("h100", "pcie"), ("nvl",)),
    ("H100 SXM", 989.0, ("h100",), ("nvl", "pcie")),  # "NVIDIA H100 80GB HBM3"
    ("H200", 989.0, ("h200",), ("nvl",)),  # "NVIDIA H200", also GH200 (an H100-class GPU)
    ("A100", 312.0, ("a100",), ()),  # SXM4 and PCIe, 40 and 80 GB: same tensor-core peak
)

#: NVIDIA H100 SXM dense BF16 tensor-core peak (the datasheet's 1,979 TFLOP/s is with 2:4 sparsity): the
#: default peak of :func:`mfu`, read from :data:`KNOWN_CARDS`.
H100_SXM_BF16_DENSE_TFLOPS = next(peak for label, peak, _, _ in KNOWN_CARDS if label == "H100 SXM")


def datasheet_peak(device_name: str) -> Optional[tuple[str, float]]:
    """(label, dense bf16 TFLOP/s) of a card in :data:`KNOWN_CARDS`, None for others (and for CPUs)."""
    name = device_name.lower()
    for label, peak, needs, excludes in KNOWN_CARDS:
        if all(s in name for s in needs) and not any(s in name for s in excludes):
            return label, peak
    return None


def model_flops(arch, seq_lens: list[int], forward_only: bool = False) -> float:
    """Model FLOPs of one pass over sequences of these lengths, in PaLM's convention (arXiv 2204.02311, App. B).

    N = ``arch.num_params(matmul_only=True)`` (models/arch.py): the weights every token multiplies through.
    Training (forward + backward): 6*N per token plus attention 12*L*(H*Q)*T per token of a length-T sequence,
    i.e. 12*L*H*Q*T^2 per sequence (packed sequences attend only within themselves, so T is each one's own
    length). Forward only (e.g. old-policy log-probs): 2*N and 4*L*H*Q*T^2. Recomputation is not counted
    (this is model FLOPs, not hardware FLOPs), and the causal mask is not halved, as in PaLM.
    """
    mult = 2 if forward_only else 6
    tokens = sum(seq_lens)
    hq = arch.num_attention_heads * arch.head_dim
    attention = 2 * mult * arch.num_layers * hq * sum(t * t for t in seq_lens)
    return float(mult * arch.num_params(matmul_only=True) * tokens + attention)


def mfu(flops: float, seconds: float, num_gpus: int, peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per GPU over the GPU's dense peak."""
    if seconds <= 0 or num_gpus < 1:
        raise ValueError(f"mfu: expected seconds > 0 and num_gpus >= 1, got {seconds}, {num_gpus}")
    return flops / (seconds * num_gpus * peak_tflops * 1e12)
