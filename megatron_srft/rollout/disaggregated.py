"""Disaggregated rollouts: engines on ranks of their own, generating while the trainers train.

With ``rollout.placement: disaggregated`` the launched world splits (distributed/groups.py ``init_roles``): the
first ranks train (Megatron TP x PP x DP over them alone), the last ``rollout.num_engine_ranks`` run vLLM only, as
the colocated service runs it (rollout/service.py, over the engine ranks' own world: placement, seeds, scoring by
each engine's leader, exchange). Nothing of Megatron is built on an engine rank. A *bridge* group joins training
rank 0 (bridge rank 0) and every engine rank (bridge rank 1 + engine rank; engine rank 0 is bridge rank 1).

Protocol. Training rank 0 sends commands; the engines run one at a time, in order, and answer:

- ``generate``: a step's prompts (token ids, demonstrations and answers travel with it: engines read no dataset),
  the policy version to sample them from, and whether that version's weights follow. The engines generate, score
  and answer with the scored results (the colocated exchange codec: two flat tensors) and their metrics.
- ``evaluate``: problems, version, sampling settings; the answer is the ``eval/*`` metrics.
- ``stop``: the engines shut down.

Weights follow a command when the engines do not hold its version: the export's HF-named tensors, cast to the
engines' dtype, in buckets of ``rollout.sync_bucket_mb`` (one JSON header of names, dtypes and shapes, then one
flat buffer per bucket; an empty header ends the stream), broadcast from training rank 0 over the bridge's device
backend (NCCL on GPU, gloo on CPU). Each host holds at most one bucket beyond its model: the sender builds one flat
bucket at a time from the export, the receivers feed views of it to vLLM's in-place reload as it arrives.

At most one command is outstanding, and the trainer sends the next only after the answer to the last one: neither
side ever blocks on a message the other sends later, so the order of the messages alone cannot deadlock.

Staleness (``rollout.max_staleness``). The loop asks for step n's batch at version v = the policy's version at
that moment (training/loop.py ``generate``). On-policy (0), step n is asked for after step n - 1's update. One-step-
off (1), step n + 1 is asked for before step n's update, so it is sampled with the weights step n trains from
(theta_{n-1}), while step n trains: generation and training overlap, and every batch is at most one step behind
the policy that trains on it (``rollout/staleness_*``). The engine's log-probs are the behaviour policy; pi_old is
the trainer's own log-prob at training time; truncated importance sampling (``rollout.tis_cap``, 2 by default when
``max_staleness`` > 0) corrects for the difference.

Resume. A one-step-off checkpoint is saved with the batch already asked for the next step (:meth:`pending`, waited
for and stored in the checkpoint, a few MB); a resumed run trains it instead of asking again, so it repeats the
uninterrupted run exactly (sampling seeds depend on (seed, step, prompt) only).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections import deque
from typing import Optional, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..data.dataset import TokenizedProblem
from ..data.templates import THINKING_TEMPLATES, load_tokenizer
from ..distributed import collectives
from ..distributed.collectives import Bridge
from ..distributed.groups import ParallelGroups, Role
from ..distributed.layout import validate_layout
from ..dtypes import dtype_name, torch_dtype
from ..models.arch import load_arch
from ..signals import STOP_SIGNALS
from .seam import RolloutBatch, RolloutRequest, WeightSource
from .service import RolloutService, decode, encode
from .sync import MiB

#: the bridge rank of training rank 0 (commands, weights) and of engine rank 0 (answers)
TRAINER, ENGINES = 0, 1


def _dtype(spelled: str) -> torch.dtype:
    """A torch dtype from its spelling in a message ("torch.bfloat16"): one of the table's (dtypes.py), never eval."""
    name = dtype_name(spelled)
    if name is None:
        raise RuntimeError(f"disaggregated rollouts: unexpected dtype {spelled!r} in a message")
    return torch_dtype(name)


def _problem(p: TokenizedProblem) -> dict:
    return dataclasses.asdict(p)


# --------------------------------------------------------------------------------------------- weights


def send_weights(bridge: Optional[Bridge], named_tensors, dtype: torch.dtype, bucket_mb: int) -> dict:
    """Trainer side of a weight sync: every training rank iterates the export (a collective); training rank 0
    (``bridge`` not None) copies each tensor, cast to ``dtype``, into one bucket buffer and broadcasts the bucket
    when the next tensor would not fit (a tensor larger than the bucket goes alone). Beyond the model, rank 0 holds
    the bucket and the one tensor in flight. Returns bytes and seconds (rank 0's)."""
    start, sent = time.perf_counter(), 0
    if bridge is None:
        for _ in named_tensors:
            pass
        return {"bytes": 0, "seconds": time.perf_counter() - start}
    capacity = int(bucket_mb * MiB)
    bucket = torch.empty(capacity, dtype=torch.uint8, device=bridge.device)
    header: list = []
    used = 0

    def flush(flat: torch.Tensor, entries: list) -> int:
        bridge.broadcast_bytes(json.dumps(entries).encode(), TRAINER)
        bridge.broadcast(flat, TRAINER, bulk=True)
        return flat.numel()

    for name, tensor in named_tensors:
        data = tensor.detach().to(device=bridge.device, dtype=dtype).reshape(-1).view(torch.uint8)
        entry = [name, str(dtype), list(tensor.shape)]
        if used and used + data.numel() > capacity:
            sent += flush(bucket[:used], header)
            header, used = [], 0
        if data.numel() > capacity:  # too large for any bucket: on its own
            sent += flush(data, [entry])
            continue
        bucket[used:used + data.numel()].copy_(data)
        header.append(entry)
        used += data.numel()
        del data, tensor
    if used:
        sent += flush(bucket[:used], header)
    bridge.broadcast_bytes(b"[]", TRAINER)
    return {"bytes": sent, "seconds": time.perf_counter() - start}


class BridgeWeights:
    """Engine side of a weight sync: a :class:`~megatron_srft.rollout.seam.WeightSource` whose export receives
    the trainer's buckets from the bridge (lazily, as the engine's reload pulls them)."""

    def __init__(self, bridge: Bridge, version: int) -> None:
        self.bridge, self._version = bridge, version

    @property
    def version(self) -> int:
        return self._version

    def export(self):
        while True:
            header = json.loads(self.bridge.broadcast_bytes(None, TRAINER))
            if not header:
                return
            dtypes = [_dtype(d) for _, d, _ in header]
            sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
                     for (_, _, shape), dt in zip(header, dtypes)]
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.bridge.device)
            self.bridge.broadcast(flat, TRAINER, bulk=True)
            offset = 0
            for (name, _, shape), dt, size in zip(header, dtypes, sizes):
                yield name, flat[offset:offset + size].view(dt).reshape(shape)
                offset += size
            del flat


# --------------------------------------------------------------------------------------------- the trainer's side


@dataclasses.dataclass
class _Answer:
    """A generation's scored results as they came over the bridge: the whole step (every replica's prompts)."""

    version: int
    staleness: int  # training steps between the sampling policy and the training one (the request's)
    ints: torch.Tensor
    floats: torch.Tensor
    metrics: dict


class DisaggregatedRollouts:
    """The trainer's :class:`~megatron_srft.rollout.seam.Rollouts` when engines run on ranks of their own (module
    docstring). Every training rank runs the same state machine; only training rank 0 talks to the bridge, and
    what it receives reaches the other training ranks by a broadcast over the training world.

    Args:
        cfg: the whole SRFTConfig. groups: the training world's ParallelGroups. role: from ``init_roles``.
        weights: the trainer's WeightSource (the Policy).
    """

    def __init__(self, cfg, groups: ParallelGroups, role: Role, weights: WeightSource) -> None:
        self.cfg, self.groups, self.weights = cfg, groups, weights
        self.bridge = role.bridge if groups.rank == 0 else None
        self.num_engine_ranks = role.num_engine_ranks
        hello = json.loads(self.bridge.broadcast_bytes(None, ENGINES)) if self.bridge is not None else {}
        hello = collectives.broadcast_object(hello, 0, groups.cpu_group)
        self.engine_dtype = _dtype(hello["weight_dtype"])
        self._describe = hello["describe"]
        self.engine_version: Optional[int] = None  # the version the engines hold
        self._offered: Optional[tuple[WeightSource, int]] = None
        self._queue: deque[RolloutRequest] = deque()  # asked for, not yet sent
        self._requests: dict[int, RolloutRequest] = {}  # every step asked for and not yet collected
        self._outstanding: Optional[RolloutRequest] = None  # the command the engines work on
        self._answers: dict[int, _Answer] = {}
        self._sync = {"bytes": 0.0, "seconds": 0.0}  # weight syncs since the last collect
        self._closed = False

    # -- the seam

    def generate(self, request: RolloutRequest) -> None:
        if request.step in self._requests:
            raise RuntimeError(f"disaggregated rollouts: step {request.step} was asked for twice")
        self._requests[request.step] = request
        if request.step not in self._answers:  # else restored from a checkpoint (restore_pending)
            self._queue.append(request)
        self._pump()

    def sync(self, weights: WeightSource, version: int) -> None:
        if weights.version != version:
            raise RuntimeError(f"disaggregated rollouts: sync offered version {version}, the weights are at "
                               f"{weights.version}")
        self._offered = (weights, version)
        self._pump()

    def collect(self, step: int) -> RolloutBatch:
        request = self._requests.get(step)
        if request is None:
            raise RuntimeError(f"disaggregated rollouts: collect({step}) without generate() for that step")
        t0 = time.perf_counter()
        while step not in self._answers:
            if self._outstanding is None:
                raise RuntimeError(f"disaggregated rollouts: step {step} waits for version {request.version}, "
                                   "which was never offered (sync)")
            self._receive()
            self._pump()
        wait = time.perf_counter() - t0
        del self._requests[step]
        answer = self._answers.pop(step)
        items, _ = decode(answer.ints, answer.floats)
        staleness = float(answer.staleness)
        sync_s = self._sync["seconds"]
        metrics = {**answer.metrics, "time/trainer_wait": wait, "time/weight_sync": sync_s,
                   "rollout/weight_sync_gbps": self._sync["bytes"] / max(sync_s, 1e-9) / 1e9 if sync_s else 0.0,
                   "rollout/staleness_mean": staleness, "rollout/staleness_max": staleness}
        self._sync = {"bytes": 0.0, "seconds": 0.0}
        return RolloutBatch(prompts=items[request.replica_slice], metrics=metrics)

    def evaluate(self, problems: Sequence, *, version: Optional[int], n_samples: int, temperature: float,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 keep_records: bool = False) -> tuple[dict[str, float], Optional[list]]:
        if keep_records:
            raise RuntimeError("disaggregated rollouts: per-problem records are `srft eval`'s (colocated engines)")
        while self._outstanding is not None:  # the batch in flight first: one command at a time
            self._receive()
        weights_follow = self._weights_needed(version)
        self._command({"kind": "evaluate", "version": version, "weights": weights_follow,
                       "problems": [_problem(p) for p in problems], "n_samples": n_samples,
                       "temperature": temperature, "top_p": top_p, "seed": seed})
        if weights_follow:
            self._push(version)
        metrics = json.loads(self.bridge.broadcast_bytes(None, ENGINES)) if self.bridge is not None else None
        metrics = collectives.broadcast_object(metrics, 0, self.groups.cpu_group)
        self._pump()
        return metrics, None

    def pending(self) -> Optional[bytes]:
        """Every batch asked for and not yet collected, once answered, as safetensors bytes for the checkpoint (on
        every training rank); None when there is none. Collective: waits for the generation in flight."""
        while self._outstanding is not None or self._queue:
            if self._outstanding is None:
                self._pump()
                if self._outstanding is None:
                    break  # waits for a version not offered yet: nothing sampled, nothing to keep
            self._receive()
        if not self._answers:
            return None
        tensors, meta = {}, []
        for step, a in sorted(self._answers.items()):
            tensors[f"{step}.ints"], tensors[f"{step}.floats"] = a.ints.contiguous(), a.floats.contiguous()
            meta.append({"step": step, "version": a.version, "staleness": a.staleness, "metrics": a.metrics})
        return save_tensors(tensors, metadata={"batches": json.dumps(meta)})

    def restore_pending(self, data: bytes) -> list[int]:
        """The batches of :meth:`pending` (a checkpoint's), answered already: their steps are not asked again.
        Returns their steps."""
        tensors = load_tensors(data)
        meta = json.loads(_safetensors_metadata(data).get("batches", "[]"))
        for m in meta:
            step = int(m["step"])
            self._answers[step] = _Answer(version=int(m["version"]), staleness=int(m["staleness"]),
                                          ints=tensors[f"{step}.ints"], floats=tensors[f"{step}.floats"],
                                          metrics=dict(m["metrics"]))
        return sorted(self._answers)

    def describe(self) -> str:
        return (f"disaggregated: {self.num_engine_ranks} engine rank(s): {self._describe}; at most "
                f"{self.cfg.rollout.max_staleness} step(s) stale")

    def close(self) -> None:
        """Collective over the training ranks: the answer in flight is awaited, then the engines stop."""
        if self._closed:
            return
        self._closed = True
        try:
            while self._outstanding is not None:
                self._receive()
        finally:
            self._command({"kind": "stop"})  # the bridge stays: it lives as long as the world (groups.destroy)

    # -- the state machine

    def _weights_needed(self, version: Optional[int]) -> bool:
        if version is None:
            raise RuntimeError("disaggregated rollouts: a trainer's rollouts name the policy version they sample from")
        if self.engine_version == version:
            return False
        if not self._offered_at(version):
            raise RuntimeError(f"disaggregated rollouts: version {version} is needed but the last sync offered "
                               f"{None if self._offered is None else self._offered[1]}")
        return True

    def _offered_at(self, version: int) -> bool:
        """The last sync offered ``version``, and the trainer's weights are still at it (no update since)."""
        return self._offered is not None and self._offered[1] == version and self._offered[0].version == version

    def _pump(self) -> None:
        """Send the next asked-for step when the engines are free and its weights are at hand."""
        while self._outstanding is None and self._queue:
            request = self._queue[0]
            uses_weights = request.num_rollouts > 0
            if uses_weights and self.engine_version != request.version and not self._offered_at(request.version):
                return  # the version's sync comes later
            self._queue.popleft()
            weights_follow = uses_weights and self.engine_version != request.version
            self._command({"kind": "generate", "step": request.step, "version": request.version,
                           "weights": weights_follow, "problems": [_problem(p) for p in request.problems],
                           "num_rollouts": request.num_rollouts, "num_demos": request.num_demos})
            if weights_follow:
                self._push(request.version)
            self._outstanding = request

    def _push(self, version: int) -> None:
        stats = send_weights(self.bridge, self._offered[0].export(), self.engine_dtype,
                             self.cfg.rollout.sync_bucket_mb)
        self.engine_version = version
        self._sync["bytes"] += stats["bytes"]
        self._sync["seconds"] += stats["seconds"]

    def _command(self, command: dict) -> None:
        if self.bridge is not None:
            self.bridge.broadcast_bytes(json.dumps(command).encode(), TRAINER)

    def _receive(self) -> None:
        """The answer to the outstanding generate command, on every training rank."""
        request, self._outstanding = self._outstanding, None
        if self.bridge is not None:
            header = json.loads(self.bridge.broadcast_bytes(None, ENGINES))
            ints = self.bridge.broadcast(torch.empty(header["num_ints"], dtype=torch.int64), ENGINES)
            floats = self.bridge.broadcast(torch.empty(header["num_floats"], dtype=torch.float64), ENGINES)
            sizes = torch.tensor([ints.numel(), floats.numel()], dtype=torch.int64)
        else:
            header, sizes = None, torch.zeros(2, dtype=torch.int64)
        header = collectives.broadcast_object(header, 0, self.groups.cpu_group)
        sizes = collectives.broadcast(sizes, 0)
        if self.bridge is None:
            ints = torch.empty(int(sizes[0]), dtype=torch.int64)
            floats = torch.empty(int(sizes[1]), dtype=torch.float64)
        ints, floats = collectives.broadcast(ints, 0), collectives.broadcast(floats, 0)
        if header["step"] != request.step:
            raise RuntimeError(f"disaggregated rollouts: the engines answered step {header['step']}, "
                               f"expected {request.step}")
        self._answers[request.step] = _Answer(version=request.version, staleness=request.staleness, ints=ints,
                                              floats=floats, metrics=header["metrics"])


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, then the JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size].decode("utf-8")).get("__metadata__", {}) or {}


# --------------------------------------------------------------------------------------------- the engines' side


class _IgnoreStopSignals:
    """An engine rank outlives a stop signal (SLURM's, forwarded by torchrun to every rank): the trainers finish
    the step, wait for the batch in flight, save, and only then send ``stop``. A handler that does nothing, not
    SIG_IGN, so that processes started later do not inherit the disposition."""

    def __init__(self) -> None:
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handler(self, signum, frame) -> None:
        pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def serve(cfg, role: Role) -> dict:
    """An engine rank's whole run: build the engines over the engine ranks' world, then answer the trainer's
    commands until ``stop``. Returns {}: a run's metrics, and its stop line after a stop signal, are the
    trainers'."""
    cfg.validate()
    model_dir = str(cfg.model.path)
    arch = load_arch(model_dir)
    validate_layout(cfg, role.world_size, arch)
    bridge = role.bridge
    groups = ParallelGroups(tp_group=None, pp_group=None, dp_group=None, mp_group=None, rank=bridge.rank - ENGINES,
                            world_size=role.num_engine_ranks, device=bridge.device)
    # Engines of their own keep their memory: nothing trains on these devices, so they never sleep.
    engine_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sleep_level=0))
    tokenizer = load_tokenizer(model_dir)
    signals = _IgnoreStopSignals()
    service = RolloutService(engine_cfg, groups, model_dir, tokenizer, BridgeWeights(bridge, -1), need_engine=True,
                             arch=arch, require_think=cfg.data.template in THINKING_TEMPLATES)
    try:
        lead = bridge.rank == ENGINES
        hello = {"weight_dtype": str(service.engine.weight_dtype), "describe": service.describe()}
        bridge.broadcast_bytes(json.dumps(hello).encode() if lead else None, ENGINES)
        idle = 0.0
        while True:
            t_idle = time.perf_counter()
            command = json.loads(bridge.broadcast_bytes(None, TRAINER))
            idle += time.perf_counter() - t_idle
            kind = command["kind"]
            if kind == "stop":
                break
            version = command["version"]
            if command["weights"]:  # read inside the generation, before it (the service's _ready)
                service.sync(BridgeWeights(bridge, version), version)
            problems = [TokenizedProblem(**p) for p in command["problems"]]
            if kind == "generate":
                step = command["step"]
                service.generate(RolloutRequest(step=step, problems=problems, replica_slice=slice(None),
                                                version=version, num_rollouts=command["num_rollouts"],
                                                num_demos=command["num_demos"]))
                batch = service.collect(step)
                ints, floats = encode(batch.prompts)
                header = {"step": step, "num_ints": ints.numel(), "num_floats": floats.numel(),
                          "metrics": {**batch.metrics, "time/engine_wait": idle}}
                t_idle = time.perf_counter()
                bridge.broadcast_bytes(json.dumps(header).encode() if lead else None, ENGINES)
                bridge.broadcast(ints, ENGINES)
                bridge.broadcast(floats, ENGINES)
                idle = time.perf_counter() - t_idle  # the answer waited for the trainer: idle, counted next time
            elif kind == "evaluate":
                metrics, _ = service.evaluate(problems, version=version, n_samples=command["n_samples"],
                                              temperature=command["temperature"], top_p=command["top_p"],
                                              seed=command["seed"])
                bridge.broadcast_bytes(json.dumps(metrics).encode() if lead else None, ENGINES)
            else:
                raise RuntimeError(f"engine rank: unknown command {kind!r}")
    finally:
        service.close()
        signals.restore()
    return {}
