"""perf.py: the datasheet table, model FLOPs in PaLM's convention, MFU."""

from __future__ import annotations

import pytest

from megatron_srft.perf import H100_SXM_BF16_DENSE_TFLOPS, datasheet_peak, mfu, model_flops
from tests.distributed.test_layout import QWEN25_7B, arch


@pytest.mark.parametrize("name,label,peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA GH200 480GB", "H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
])
def test_datasheet_peak_known_cards(name, label, peak):
    assert datasheet_peak(name) == (label, peak)


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090", "cpu"])
def test_datasheet_peak_unknown_cards(name):
    assert datasheet_peak(name) is None


def test_model_flops_palm_convention():
    a = arch(QWEN25_7B)
    n = a.num_params(matmul_only=True)
    # 7.62e9 total minus the 0.545e9 input embedding
    assert abs(n - (7.6156e9 - 152064 * 3584)) / n < 1e-3
    lens = [1000, 3000]
    attn = 12 * a.num_layers * a.num_attention_heads * a.head_dim * (1000 ** 2 + 3000 ** 2)
    assert model_flops(a, lens) == 6 * n * 4000 + attn
    assert model_flops(a, lens, forward_only=True) == 2 * n * 4000 + attn / 3
    # 8 GPUs sustaining exactly the peak for one second do 8 x 989e12 FLOPs: MFU 1
    assert mfu(8 * H100_SXM_BF16_DENSE_TFLOPS * 1e12, 1.0, 8) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 8)
