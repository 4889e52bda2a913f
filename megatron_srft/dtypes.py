"""Precision names in one table: the "fp32" / "bf16" / "fp16" of configs, command lines and checkpoint metadata, and
what each is to torch, to Hugging Face's config.json and to vLLM.

The table is torch-free so that config checks and the layout arithmetic read it without importing torch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Precision(NamedTuple):
    torch_name: str  # torch's name (``torch.<name>``), also the spelling of config.json's ``dtype`` and vLLM's
    bytes: int  # bytes per element


#: our name -> its precision
DTYPES: dict[str, Precision] = {
    "fp32": Precision("float32", 4),
    "bf16": Precision("bfloat16", 2),
    "fp16": Precision("float16", 2),
}


def torch_dtype(name: str):
    """The ``torch.dtype`` of our precision ``name``."""
    import torch  # on first use only: the table's readers that never build tensors do not pay torch's import

    return getattr(torch, DTYPES[name].torch_name)


def dtype_name(dtype) -> Optional[str]:
    """Our name for a ``torch.dtype``, a torch dtype name ("bfloat16", "torch.bfloat16") or our name itself; None for
    other dtypes."""
    spelled = str(dtype).removeprefix("torch.")
    if spelled in DTYPES:
        return spelled
    return next((name for name, p in DTYPES.items() if p.torch_name == spelled), None)
