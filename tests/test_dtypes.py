"""The one precision table: every spelling of a precision comes from megatron_srft.dtypes."""

from __future__ import annotations

import typing

import torch

from megatron_srft.config import ModelConfig, RolloutConfig
from megatron_srft.dtypes import DTYPES, dtype_name, torch_dtype


def test_names_round_trip_through_torch():
    for name, precision in DTYPES.items():
        dtype = torch_dtype(name)
        assert dtype.itemsize == precision.bytes and str(dtype) == f"torch.{precision.torch_name}"
        assert dtype_name(dtype) == dtype_name(precision.torch_name) == dtype_name(name) == name
    assert dtype_name(torch.float64) is None and dtype_name("int8") is None


def test_the_config_fields_name_the_table():
    assert typing.get_args(typing.get_type_hints(ModelConfig)["params_dtype"]) == tuple(DTYPES)
    assert typing.get_args(typing.get_type_hints(RolloutConfig)["dtype"]) == ("auto", *DTYPES)
