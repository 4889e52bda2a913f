"""The one home of torch.distributed calls (besides start-up in :mod:`.groups`).

Every helper puts its tensors on the GROUP's device before the collective and hands the result back on the
caller's device: NCCL rejects CPU tensors (a CPU tensor reaching an NCCL all-reduce fails at the first step of a
GPU run), while gloo accepts CPU tensors and so hides that mistake in every CPU test. Routing all collectives
through here makes that class of bug impossible rather than fixed one call at a time; a test fails if any other
module of the package imports torch.distributed.

``group=None`` means the default (world) group. Single-rank groups and an uninitialised world are no-ops, so
callers never special-case world size 1.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# --------------------------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: Optional[ProcessGroup] = None) -> int:
    """This process's rank in ``group`` (0 without a distributed world)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Optional[ProcessGroup] = None) -> int:
    """Ranks in ``group`` (1 without a distributed world)."""
    return dist.get_world_size(group) if is_initialized() else 1


def global_rank(group: Optional[ProcessGroup], group_rank: int) -> int:
    """The global rank of ``group``'s member ``group_rank`` (the identity for the world group)."""
    if group is None or not is_initialized():
        return group_rank
    return dist.get_global_rank(group, group_rank)


def group_ranks(group: Optional[ProcessGroup]) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    return [global_rank(group, r) for r in range(world_size(group))]


def device_of(group: Optional[ProcessGroup] = None) -> torch.device:
    """The device a collective on ``group`` needs its tensors on: the current CUDA device for NCCL, else CPU."""
    if not is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _single(group: Optional[ProcessGroup]) -> bool:
    return world_size(group) == 1


# --------------------------------------------------------------------------------------------- tensors


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` (op: sum | max | min). Returns the result on ``tensor``'s device; the input
    is updated in place when it already lives on the group's device."""
    if _single(group):
        return tensor
    dev = device_of(group)
    work = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(work, op=_OPS[op], group=group)
    if work is tensor:
        return tensor
    return work.to(tensor.device)


def all_gather(tensor: torch.Tensor, group: Optional[ProcessGroup] = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (equal shapes), in group-rank order, on ``tensor``'s device."""
    if _single(group):
        return [tensor]
    dev = device_of(group)
    work = tensor.contiguous().to(dev)
    parts = [torch.empty_like(work) for _ in range(world_size(group))]
    dist.all_gather(parts, work, group=group)
    return parts if dev == tensor.device else [p.to(tensor.device) for p in parts]


def broadcast(tensor: torch.Tensor, src: int, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """``src``'s (GLOBAL rank) ``tensor`` on every rank of ``group``. Every rank passes a tensor of the right shape
    and dtype; the result comes back on its device (in place when it already lives on the group's device)."""
    if _single(group):
        return tensor
    dev = device_of(group)
    work = tensor if tensor.device == dev and tensor.is_contiguous() else tensor.contiguous().to(dev)
    dist.broadcast(work, src=src, group=group)
    if work is tensor:
        return tensor
    out = work.to(tensor.device)
    tensor.copy_(out)
    return tensor


def barrier(group: Optional[ProcessGroup] = None) -> None:
    if not _single(group):
        dist.barrier(group=group)


# --------------------------------------------------------------------------------------------- Python objects


def broadcast_object(obj: Any, src: int, group: Optional[ProcessGroup] = None) -> Any:
    """``src``'s (GLOBAL rank) picklable object on every rank of ``group``; other ranks pass anything (ignored).

    For control data (metadata, small results). Bulk token data goes through tensors
    (see rollout/placement.py), which NCCL moves without pickling.
    """
    if _single(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=device_of(group))
    return box[0]


def all_gather_object(obj: Any, group: Optional[ProcessGroup] = None) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order."""
    if _single(group):
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst: int = 0, group: Optional[ProcessGroup] = None) -> Optional[list[Any]]:
    """Every rank's picklable ``obj`` on ``dst`` (GLOBAL rank), in group-rank order; None on the other ranks.

    Use a gloo group (``ParallelGroups.cpu_group``) for bulky objects so that nothing is staged on the GPU.
    """
    if _single(group):
        return [obj]
    out: Optional[list[Any]] = [None] * world_size(group) if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def agree(flag: bool, group: Optional[ProcessGroup] = None) -> bool:
    """True on every rank when ``flag`` is true on ANY rank of ``group`` (e.g. a stop request seen by one rank)."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, "max", group).item() > 0)


def sum_floats(values: Sequence[float], group: Optional[ProcessGroup] = None) -> list[float]:
    """Element-wise sums of a list of floats over ``group`` (fp64, one collective)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return all_reduce(t, "sum", group).tolist()


# --------------------------------------------------------------------------------------------- life cycle


@contextlib.contextmanager
def keep_default_group():
    """Make ``torch.distributed.destroy_process_group()`` of the DEFAULT group a no-op inside this block.

    vLLM's EngineCore.shutdown ends with ``destroy_process_group()``. Colocated, the default group is the trainer's
    world and must outlive the engine (the demo and the study run several trainings in one process); vLLM's own
    sub-groups are still destroyed.
    """
    original = dist.destroy_process_group

    def destroy_unless_default(group=None):
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = original


# --------------------------------------------------------------------------------------------- the bridge


class Bridge:
    """A group across the two worlds of a disaggregated run: training rank 0 (bridge rank 0) and every engine rank
    (bridge rank 1 + its engine rank), outside both worlds' default groups (distributed/groups.py builds it from the
    launcher's store). Two backends: ``cpu`` (gloo) carries commands and results; ``device`` carries the weights
    (NCCL between GPUs; on CPU the gloo one). Every member calls each method in the same order (a collective)."""

    def __init__(self, rank: int, size: int, cpu, device_backend, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self._cpu, self._device = cpu, device_backend

    def broadcast(self, tensor: torch.Tensor, root: int, *, bulk: bool = False) -> torch.Tensor:
        """``root``'s (bridge rank) ``tensor`` on every member, in place; ``bulk`` moves it on the device backend
        (the tensor must then live on :attr:`device`), else it must be a CPU tensor."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        backend = self._device if bulk else self._cpu
        backend.broadcast([tensor], opts).wait()
        return tensor

    def broadcast_bytes(self, data: Optional[bytes], root: int) -> bytes:
        """``root``'s bytes on every member (others pass None): the length, then the payload."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        self.broadcast(size, root)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None and self.rank == root
               else torch.empty(int(size.item()), dtype=torch.uint8))
        if buf.numel():
            self.broadcast(buf, root)
        return buf.numpy().tobytes()

    def close(self) -> None:
        for backend in {id(self._cpu): self._cpu, id(self._device): self._device}.values():
            try:
                backend.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit; a member may be gone already
                pass
