"""Distributed start-up from torchrun's environment, and the process groups handed to the rest of the code.

``init_distributed`` is the only place that reads megatron's ``parallel_state`` globals; everything below it
receives a :class:`ParallelGroups` (the groups and sizes it needs) as an argument, so tests can build one
for any layout on gloo ranks without stubs.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from . import cpu_compat
from .collectives import Bridge
from .layout import data_parallel_size, split_world
from ..config import ConfigError, ParallelConfig
from ..errors import UserError


@dataclass
class ParallelGroups:
    """Process groups and this rank's coordinates. ``None`` groups mean 'single rank' (no communication)."""

    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    mp_group: Optional[dist.ProcessGroup]  # TP x PP: ranks that hold one model replica
    #: the whole world on gloo, for Python-object collectives that should not touch the GPU (None = the default
    #: group, which is gloo already on CPU)
    cpu_group: Optional[dist.ProcessGroup] = None
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, got {raw!r}") from None


#: Where a command builds its Megatron model: True = this rank's GPU when CUDA is available (the model computes),
#: False = CPU always (the model's tensors are only read or written: conversion, and the weight source that
#: `srft generate` syncs into its engine). Conversion copies tensors without arithmetic, so on CPU it stays bit-exact
#: and converts a model larger than any one GPU (a 70B model in bf16 is 141 GB).
MODEL_RUNS_ON_GPU = {"train": True, "score": True, "convert": False, "generate": False}


def check_fits(model_bytes: int, memory_bytes: int, field: str, fix: str, memory: str = "one GPU") -> None:
    """A model whose weights alone exceed the memory it is given cannot start: a UserError, one line naming
    ``field`` (what to set) and ending with ``fix``. Pure."""
    if model_bytes > memory_bytes:
        gib = 1024 ** 3
        raise UserError(f"{field}: the model's weights alone need about {model_bytes / gib:.1f} GiB per GPU, more "
                        f"than the {memory_bytes / gib:.1f} GiB of {memory}; {fix}")


def device_for(purpose: str, cuda_available: bool, local_rank: int = 0, *, model_bytes: Optional[int] = None,
               device_memory_bytes: Optional[int] = None, field: str = "", fix: str = "") -> torch.device:
    """The device a model built for ``purpose`` (a :data:`MODEL_RUNS_ON_GPU` key) lives on; pure.

    ``model_bytes`` (this rank's weights) and ``device_memory_bytes`` (one GPU's memory), when both are given, are
    checked for a GPU placement (:func:`check_fits` with ``field`` and ``fix``).
    """
    if purpose not in MODEL_RUNS_ON_GPU:
        raise ValueError(f"device_for: purpose must be one of {sorted(MODEL_RUNS_ON_GPU)}, got {purpose!r}")
    if not (cuda_available and MODEL_RUNS_ON_GPU[purpose]):
        return torch.device("cpu")
    if model_bytes is not None and device_memory_bytes is not None:
        check_fits(model_bytes, device_memory_bytes, field or purpose, fix)
    return torch.device("cuda", local_rank)


def device_for_rank() -> torch.device:
    """This training rank's device: its GPU (LOCAL_RANK) when CUDA is available, else CPU."""
    return device_for("train", torch.cuda.is_available(), _env_int("LOCAL_RANK", 0))


_ROLE: Optional["Role"] = None  # this process's part once the world is split (init_roles); kept like the world


@dataclass(frozen=True)
class Role:
    """This process's part in a disaggregated run (distributed.layout.split_world): the first ``num_trainers``
    ranks of the launched world train, the rest run engines. ``rank``: the launched world's rank."""

    is_engine: bool
    rank: int
    world_size: int
    num_trainers: int
    bridge: Optional[Bridge]  # training rank 0 and every engine rank; None on the other training ranks

    @property
    def num_engine_ranks(self) -> int:
        return self.world_size - self.num_trainers


def init_roles(rollout_cfg, pcfg: ParallelConfig) -> Role:
    """Split torchrun's world into a training world and an engine world, each with its own default group, and the
    bridge between them (disaggregated placement; docs/rollout.md).

    Both worlds rendezvous through the launcher's store under their own prefixes, so neither sees the other's
    ranks: Megatron builds TP x PP x DP over the training ranks alone, vLLM's ``external_launcher`` its engine groups
    over the engine ranks alone. Afterwards RANK and WORLD_SIZE describe this process's own world (what Megatron
    and vLLM read); :attr:`Role.rank` keeps the launched one. LOCAL_RANK still names this rank's GPU. The split
    and the bridge live as long as the process's world (:func:`destroy`): later runs in the process reuse them.
    """
    global _ROLE
    if _ROLE is not None and dist.is_initialized():  # a second run in this process (the study, tests): the same split
        if split_world(rollout_cfg, _ROLE.world_size)[0] != _ROLE.num_trainers:
            raise UserError(f"rollout.num_engine_ranks: this process's world is already split into "
                            f"{_ROLE.num_trainers} training and {_ROLE.num_engine_ranks} engine ranks")
        return _ROLE
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    num_trainers, num_engine_ranks = split_world(rollout_cfg, world_size)
    if dist.is_initialized():
        raise UserError("disaggregated placement: torch.distributed was started before the worlds were split")
    timeout = datetime.timedelta(minutes=pcfg.timeout_minutes)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError("rollout.placement disaggregated: start the run with torchrun or srft launch (MASTER_ADDR "
                        "and MASTER_PORT are not set)")
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    is_engine = rank >= num_trainers
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    device = torch.device("cuda", _env_int("LOCAL_RANK", 0)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if cuda else "gloo")
    own_rank, own_size = (rank - num_trainers, num_engine_ranks) if is_engine else (rank, num_trainers)
    dist.init_process_group(backend=backend, store=dist.PrefixStore("srft/engines/" if is_engine else "srft/train/",
                                                                    store),
                            rank=own_rank, world_size=own_size, timeout=timeout)
    os.environ.update(RANK=str(own_rank), WORLD_SIZE=str(own_size))
    bridge = None
    if is_engine or rank == 0:
        bridge_rank, bridge_size = (1 + own_rank if is_engine else 0), 1 + num_engine_ranks
        cpu = dist.ProcessGroupGloo(dist.PrefixStore("srft/bridge/", store), bridge_rank, bridge_size, timeout)
        weights = cpu
        if cuda:  # the weights move GPU to GPU
            weights = dist.ProcessGroupNCCL(dist.PrefixStore("srft/bridge-nccl/", store), bridge_rank, bridge_size)
        bridge = Bridge(bridge_rank, bridge_size, cpu, weights, device)
    _ROLE = Role(is_engine=is_engine, rank=rank, world_size=world_size, num_trainers=num_trainers, bridge=bridge)
    return _ROLE


def init_distributed(pcfg: ParallelConfig, seed: int = 1234, purpose: str = "train") -> ParallelGroups:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's parallel state for TP/PP/DP.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them; a single process
    without them runs as world size 1 on a free local port. The world size must be divisible by TP x PP x CP:
    that is checked before any group is created. ``purpose`` places the model (:func:`device_for`): a CPU model on a
    machine with GPUs (conversion) leaves CUDA untouched, no device set and no CUDA generator seeded.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    data_parallel_size(pcfg, world_size)

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    device = device_for(purpose, cuda, _env_int("LOCAL_RANK", 0))
    on_gpu = device.type == "cuda"
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise ConfigError("parallel.backend: 'nccl' needs CUDA GPUs (and a model on them); use 'gloo' or 'auto' "
                          "on CPU")
    if on_gpu:
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method=_init_method(),
                                timeout=datetime.timedelta(minutes=pcfg.timeout_minutes))
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=pcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=pcfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=None,  # one model chunk per stage (config.py rejects more)
            context_parallel_size=pcfg.context_parallel_size,
            expert_model_parallel_size=pcfg.expert_model_parallel_size,
            distributed_timeout_minutes=pcfg.timeout_minutes,
        )
    if on_gpu or not cuda:  # (without CUDA the CPU layer maps Megatron's CUDA generators onto the CPU one)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:  # a CPU model beside GPUs is filled from a checkpoint, never initialised at random nor run with dropout
        torch.manual_seed(seed)
    return groups_from_megatron(device)


_CPU_GROUP: Optional[dist.ProcessGroup] = None


def _cpu_world_group() -> Optional[dist.ProcessGroup]:
    """A gloo group over the whole world when the default backend is not gloo (created once: a world collective)."""
    global _CPU_GROUP
    if "gloo" in str(dist.get_backend()).lower():
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def groups_from_megatron(device: Optional[torch.device] = None) -> ParallelGroups:
    """Collect the groups Megatron created into a :class:`ParallelGroups`."""
    return ParallelGroups(
        cpu_group=_cpu_world_group(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        mp_group=mpu.get_model_parallel_group(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_size=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device or device_for_rank(),
    )


def _init_method() -> str:
    """torchrun's rendezvous (env://) when it set one; otherwise a free local port for a world of one. The port is
    not written into the environment: a child process (a test's `srft` subprocess) would inherit it while this
    process still listens on it."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return "env://"
    return f"tcp://127.0.0.1:{_free_port()}"


def ensure_launcher_env() -> None:
    """A world and the rank variables for a process that has neither (`srft generate`, tests, notebooks).

    vLLM's ``external_launcher`` executor reads RANK and LOCAL_RANK and builds its groups on top of an initialised
    torch.distributed world. Under torchrun (and after :func:`init_distributed`) the world exists; a plain process
    gets a gloo world of one on a free local port.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=0, world_size=1, init_method=_init_method())
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", "0")


def destroy() -> None:
    global _CPU_GROUP, _ROLE
    _CPU_GROUP = None
    if _ROLE is not None and _ROLE.bridge is not None:
        _ROLE.bridge.close()
    _ROLE = None
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
