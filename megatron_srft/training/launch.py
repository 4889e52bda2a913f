"""The per-node torchrun commands of a single- or multi-node training job (``srft launch``, cli/launch.py, prints
or runs them).

Under SLURM, run it once per node (``srun --ntasks-per-node=1 srft launch --config X.yaml``): every node
computes the same plan from the job's environment and execs its own line. All nodes meet through torchrun's
c10d rendezvous hosted on the first node of the allocation:

    torchrun --nnodes=N --nproc-per-node=G --node-rank=R --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT
             --rdzv-id=$SLURM_JOB_ID [signal forwarding] -m megatron_srft train --config X.yaml [overrides]

The node list comes from ``scontrol show hostnames`` when it exists, else from :func:`expand_hostlist`.
``--dry-run`` prints every node's command and checks the config (and, when the model's config.json is
readable here, the layout) against the world size N x G before anything is queued, shows which ranks train and
which generate (:func:`placement_notes`), and estimates the pre-emption lead time (:func:`estimate_lead`).

Without ``--dry-run`` this process becomes the node's torchrun agent (torchrun's ``run`` in this process, so
the PID that srun signals is torchrun's). When the trainers stop after a forwarded SIGUSR1/SIGTERM with their
checkpoint, the last line is theirs, ``srft launch: stopped at step N by SIGUSR1; checkpoint at PATH (a requeue
resumes from it)``, and the exit status is ``signals.STOPPED_EXIT_CODE`` (75), not torchrun's SignalException.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..config import load_config
from ..distributed.layout import data_parallel_size, memory_per_gpu, split_world, validate_layout
from ..errors import UserError
from ..models.arch import load_arch
from ..signals import STOP_FILE_ENV, STOPPED_EXIT_CODE
from .metrics import parse_metrics_lines

#: torchrun re-raises these in the agent and forwards them to the workers, whose trainer saves a checkpoint
#: and exits on SIGTERM/SIGUSR1 (checkpoint.save_on_signal). SIGUSR1 is what `#SBATCH --signal` sends.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_PORT = 29500
#: Assumed aggregate write bandwidth of the checkpoint file system (GB/s) unless --write-gbs says: a shared
#: parallel file system under other jobs' load, not its peak.
DEFAULT_WRITE_GBS = 1.0
#: Seconds added at each hand-over of the pre-emption chain: trainers and torchrun exiting after the save
#: (inside --shutdown-timeout), then srun, the batch shell and its requeue (inside the --signal lead).
EXIT_MARGIN_S = 30
#: torchrun's wait for the trainers after a forwarded signal: the batch scripts' --signal=B:USR1@300 less the margin.
DEFAULT_SHUTDOWN_TIMEOUT_S = 300 - EXIT_MARGIN_S


# --------------------------------------------------------------------------------------------- host lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1-2],b" -> ["a[1-2]", "b"]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"node list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"node list {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_set(body: str, text: str) -> list[str]:
    """ "01-03,07" -> ["01", "02", "03", "07"]; zero padding follows the width of the range's start."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise UserError(f"node list {text!r}: bad range {item!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"node list {text!r}: range {item!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: "gpu[01-03,07]" -> gpu01 gpu02 gpu03 gpu07; "a[1-2]-ib[0-1],b5" -> 5 hosts.

    Several bracket groups in one name expand as a product, left to right, as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        pieces = re.split(r"(\[[^\]]*\])", name)
        expanded = [""]
        for piece in pieces:
            if piece.startswith("["):
                choices = _expand_range_set(piece[1:-1], nodelist)
            else:
                if "[" in piece or "]" in piece:
                    raise UserError(f"node list {nodelist!r}: unbalanced brackets in {name!r}")
                choices = [piece]
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(expanded)
    if not hosts:
        raise UserError(f"node list {nodelist!r}: no hosts")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` when scontrol exists (SLURM's own parser), else :func:`expand_hostlist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                                 text=True, timeout=60).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class LaunchPlan:
    """Everything the per-node commands are made of; ``commands[i]`` is node i's argv."""

    num_nodes: int
    gpus_per_node: int
    hosts: list[str]
    rdzv_endpoint: str
    rdzv_id: str
    node_rank: int
    commands: list[list[str]] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


def torchrun_command(*, num_nodes: int, gpus_per_node: int, node_rank: int, rdzv_endpoint: str, rdzv_id: str,
                     config: str, overrides: list[str], forward_signals: bool = True,
                     shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> list[str]:
    """One node's torchrun argv. ``shutdown_timeout_s``: how long torchrun waits for workers to finish their
    signal checkpoint before SIGKILL (keep it under the ``--signal=...@SECONDS`` lead time)."""
    cmd = ["torchrun", f"--nnodes={num_nodes}", f"--nproc-per-node={gpus_per_node}", f"--node-rank={node_rank}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    if forward_signals:
        cmd += [f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}"]
    return cmd + ["-m", "megatron_srft", "train", "--config", config, *overrides]


def torchrun_forwards_signals() -> bool:
    """Whether the installed torchrun has ``--signals-to-handle`` (torch 2.13 has it; older releases may not)."""
    try:  # lazy: keeps torch out of `srft launch --help`; a torch without torchrun answers False
        from torch.distributed.run import get_args_parser
    except Exception:
        return False
    return any("--signals-to-handle" in a.option_strings for a in get_args_parser()._actions)


def _env_int(env: Mapping[str, str], names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        raw = env.get(name)
        if raw:
            m = re.match(r"\d+", raw)  # SLURM_GPUS_ON_NODE may read "8", SLURM_JOB_NUM_NODES "4"
            if not m:
                raise UserError(f"environment variable {name}: expected an integer, got {raw!r}")
            return int(m.group(0))
    return None


def plan_launch(*, config: str, overrides: list[str], env: Mapping[str, str], num_nodes: Optional[int] = None,
                gpus_per_node: Optional[int] = None, nodelist: Optional[str] = None, rdzv_host: Optional[str] = None,
                rdzv_port: int = DEFAULT_PORT, rdzv_id: Optional[str] = None, node_rank: Optional[int] = None,
                forward_signals: bool = True, shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S) -> LaunchPlan:
    """Resolve flags against the SLURM environment ``env`` (flags win) and build every node's command."""
    num_nodes = num_nodes or _env_int(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")) or 1
    gpus_per_node = gpus_per_node or _env_int(env, ("SLURM_GPUS_ON_NODE",))
    if not gpus_per_node:
        raise UserError("--gpus-per-node: not given and SLURM_GPUS_ON_NODE is not set")
    if num_nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes / --gpus-per-node: expected >= 1, got {num_nodes} / {gpus_per_node}")
    nodelist = nodelist or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        hosts = slurm_hostnames(nodelist)
        if len(hosts) != num_nodes:
            raise UserError(f"--nodes: {num_nodes} nodes requested but the node list {nodelist!r} has "
                            f"{len(hosts)} hosts")
    elif num_nodes == 1:
        hosts = [rdzv_host or "localhost"]
    elif rdzv_host:
        hosts = [rdzv_host] + [f"<node {i}>" for i in range(1, num_nodes)]
    else:
        raise UserError(f"--rdzv-host: {num_nodes} nodes need the rendezvous host (or SLURM_JOB_NODELIST)")
    endpoint = f"{rdzv_host or hosts[0]}:{rdzv_port}"
    rdzv_id = rdzv_id or env.get("SLURM_JOB_ID") or "srft"
    if node_rank is None:
        node_rank = _env_int(env, ("SLURM_NODEID", "SLURM_PROCID")) or 0
    if not 0 <= node_rank < num_nodes:
        raise UserError(f"--node-rank: {node_rank} is outside 0..{num_nodes - 1}")
    commands = [torchrun_command(num_nodes=num_nodes, gpus_per_node=gpus_per_node, node_rank=i,
                                 rdzv_endpoint=endpoint, rdzv_id=rdzv_id, config=config, overrides=overrides,
                                 forward_signals=forward_signals, shutdown_timeout_s=shutdown_timeout_s)
                for i in range(num_nodes)]
    return LaunchPlan(num_nodes=num_nodes, gpus_per_node=gpus_per_node, hosts=hosts, rdzv_endpoint=endpoint,
                      rdzv_id=rdzv_id, node_rank=node_rank, commands=commands)


def check_config(config: str, overrides: list[str], world_size: int, *,
                 shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S, write_gbs: float = DEFAULT_WRITE_GBS,
                 gpus_per_node: Optional[int] = None) -> list[str]:
    """Load and validate the config at this world size; check the layout when the model's config.json is here.

    Returns notes for the dry-run printout (what was and was not checked, :func:`placement_notes` and
    :func:`estimate_lead`).
    """
    cfg = load_config(config, overrides)
    validate_layout(cfg, world_size)
    placement = placement_notes(cfg, world_size, gpus_per_node)
    model_json = Path(cfg.model.path) / "config.json"
    if not cfg.model.path or not model_json.is_file():
        return [f"config OK at world size {world_size}; layout not checked ({model_json} is not readable here)",
                *placement, *estimate_lead(cfg, None, shutdown_timeout_s, write_gbs)]
    arch = load_arch(cfg.model.path)
    validate_layout(cfg, world_size, arch)
    num_trainers, num_engine_ranks = split_world(cfg.rollout, world_size)
    est = memory_per_gpu(cfg, arch, num_trainers).as_gib()  # DP is over the training ranks
    if num_engine_ranks:  # a training rank holds no engine; an engine rank holds only vLLM's share
        vllm = est.pop("vllm")
        memory = ("estimated GiB per training GPU (docs/performance.md): "
                  + ", ".join(f"{k} {v}" for k, v in est.items()) + f"; per engine GPU: vllm {vllm}")
    else:
        memory = "estimated GiB per GPU (docs/performance.md): " + ", ".join(f"{k} {v}" for k, v in est.items())
    return [f"config and layout OK at world size {world_size}", *placement, memory,
            *estimate_lead(cfg, arch, shutdown_timeout_s, write_gbs)]


def _ranks(first: int, count: int) -> str:
    return f"rank {first}" if count == 1 else f"ranks {first}-{first + count - 1}"


def placement_notes(cfg, world_size: int, gpus_per_node: Optional[int] = None) -> list[str]:
    """Dry-run lines: which ranks train and which generate (docs/rollout.md, "Placement"); call after
    :func:`validate_layout`. Disaggregated, the engine ranks are the last ``rollout.num_engine_ranks`` of the world;
    with ``gpus_per_node`` the lines say which nodes hold them and warn when a node holds both roles."""
    r, p = cfg.rollout, cfg.parallel
    rtp = r.tensor_parallel_size
    num_trainers, num_engine_ranks = split_world(r, world_size)
    dp = data_parallel_size(p, num_trainers)
    model = (f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
             f"CP {p.context_parallel_size} x DP {dp}")
    if not num_engine_ranks:
        return [f"placement colocated: all {world_size} ranks train ({model}) and generate "
                f"({world_size // rtp} engine(s) of rollout TP {rtp}); on-policy (max_staleness 0)"]
    staleness = ("on-policy (max_staleness 0)" if r.max_staleness == 0 else
                 f"one-step-off (max_staleness {r.max_staleness}, TIS cap {r.effective_tis_cap:g})")
    lines = [f"placement disaggregated: {num_trainers} training {_ranks(0, num_trainers)} ({model}); "
             f"{num_engine_ranks} engine {_ranks(num_trainers, num_engine_ranks)} "
             f"({num_engine_ranks // rtp} engine(s) of rollout TP {rtp}); {staleness}"]
    if gpus_per_node:
        nodes = world_size // gpus_per_node
        if num_engine_ranks % gpus_per_node == 0:
            first = nodes - num_engine_ranks // gpus_per_node
            lines.append(f"placement: the engines fill nodes {first}-{nodes - 1}" if first < nodes - 1 else
                         f"placement: the engines fill node {first}")
        else:
            lines.append(f"placement: node {num_trainers // gpus_per_node} holds both training and engine ranks "
                         f"({num_engine_ranks} engine ranks are not whole nodes of {gpus_per_node}): they share its "
                         f"host memory and network")
    return lines


def checkpoint_bytes(cfg, arch) -> int:
    """Bytes of one training checkpoint: the whole model's weights plus its optimizer state, by
    memory_per_gpu's per-parameter rule applied to an unsplit model (TP = PP = DP = 1)."""
    whole = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1))
    est = memory_per_gpu(whole, arch, 1)
    return est.weights + est.optimizer


def _longest_phases(run_dir: str) -> Optional[tuple[float, float, Optional[float]]]:
    """(longest time/step, time/eval, time/generate or None) in RUN_DIR/metrics.jsonl, or None when there is none
    here."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        rows = parse_metrics_lines(path) if path.is_file() else []
    except Exception:  # an unreadable file only means no measurement here
        rows = []
    steps = [float(r["time/step"]) for r in rows if isinstance(r.get("time/step"), (int, float))]
    evals = [float(r["time/eval"]) for r in rows if isinstance(r.get("time/eval"), (int, float))]
    gens = [float(r["time/generate"]) for r in rows if isinstance(r.get("time/generate"), (int, float))]
    return (max(steps), max(evals, default=0.0), max(gens, default=None)) if steps else None


def estimate_lead(cfg, arch, shutdown_timeout_s: int, write_gbs: float) -> list[str]:
    """The pre-emption lead time for this config, as dry-run notes (docs/cluster.md, "Pre-emption").

    After a stop signal the trainer finishes the step it is in (or the evaluation it is in) and writes one
    checkpoint, so torchrun must wait (--shutdown-timeout) at least max(step, evaluation) + one save + a margin,
    and SLURM's --signal lead must exceed that by another margin. The save is the checkpoint's size (weights and
    optimizer state, from the model's shapes) over an assumed write bandwidth; the step and evaluation times are
    the longest in RUN_DIR/metrics.jsonl when this run has one here (they cannot be derived from a config).
    One-step-off (``rollout.max_staleness`` 1): the checkpoint holds the batch the engines are generating, so the
    stop also waits for that generation: one more time/generate.
    """
    one_step_off = cfg.rollout.max_staleness > 0
    parts, known = [], 0.0
    if arch is None:
        parts.append("checkpoint size unknown (the model's config.json is not readable here)")
    else:
        size = checkpoint_bytes(cfg, arch)
        save_s = size / (write_gbs * 1e9)
        known += save_s
        parts.append(f"one checkpoint {size / 1e9:.1f} GB (weights + optimizer state) written at an assumed "
                     f"{write_gbs:g} GB/s aggregate (--write-gbs): {save_s:.0f} s")
    phases = _longest_phases(cfg.run_dir)
    if phases is None:
        parts.append(f"step and evaluation times not measured (no {Path(cfg.run_dir) / 'metrics.jsonl'} here): "
                     f"add the longest time/step or time/eval of a first run"
                     + (" and, one-step-off, its longest time/generate" if one_step_off else ""))
    else:
        known += max(phases[:2])
        parts.append(f"longest step {phases[0]:.0f} s, evaluation {phases[1]:.0f} s ({cfg.run_dir}/metrics.jsonl)")
        if one_step_off and phases[2] is not None:
            known += phases[2]
            parts.append(f"one-step-off: + the in-flight generation, longest {phases[2]:.0f} s (time/generate), "
                         f"saved with the checkpoint")
        elif one_step_off:
            parts.append("one-step-off: + the in-flight generation, not measured (no time/generate there)")
    need = int(math.ceil((known + EXIT_MARGIN_S) / 10.0) * 10)
    unknown = arch is None or phases is None or (one_step_off and phases[2] is None)
    plus = " + what is unknown above" if unknown else ""
    lines = ["pre-emption: " + "; ".join(parts),
             f"pre-emption: --shutdown-timeout >= {need} s{plus} ({EXIT_MARGIN_S} s margin to exit); "
             f"#SBATCH --signal=B:USR1@{need + EXIT_MARGIN_S}{plus} (torchrun's wait + {EXIT_MARGIN_S} s for "
             f"srun and the requeue)"]
    if not plus and shutdown_timeout_s < need:
        lines.append(f"pre-emption: --shutdown-timeout {shutdown_timeout_s} is below that: the trainers would be "
                     f"killed before their checkpoint is complete")
    return lines


def run_torchrun(argv: list[str]) -> Optional[signal.Signals]:
    """torchrun's agent in this process (``argv`` without "torchrun"), so srun's signals reach it at this PID.
    Returns the signal it received and forwarded to the trainers (it then waited for them), None when they all
    finished; raises torchrun's ChildFailedError when a trainer failed."""
    # torch is imported only when a node runs: the dry run and the argument checks stay quick
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as e:
        return signal.Signals(e.sigval)
    return None


def run_node(cmd: list[str]) -> int:
    """Run this node's torchrun command; its exit status. A stop line that the trainers left in the stop file
    (cli/train.py) becomes this command's last line, with ``STOPPED_EXIT_CODE``."""
    # torch only when a node runs (as in run_torchrun)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    stop_dir = Path(tempfile.mkdtemp(prefix="srft-launch-"))
    stop_file = stop_dir / "stopped"
    os.environ[STOP_FILE_ENV] = str(stop_file)  # the trainers inherit it through torchrun
    failed: Optional[ChildFailedError] = None
    received: Optional[signal.Signals] = None
    try:
        try:
            received = run_torchrun(cmd[1:])
        except ChildFailedError as e:  # trainers exited non-zero without torchrun receiving a signal
            failed = e
        stop_line = stop_file.read_text().strip() if stop_file.is_file() else ""
    finally:
        shutil.rmtree(stop_dir, ignore_errors=True)
        os.environ.pop(STOP_FILE_ENV, None)
    if stop_line:
        print(f"srft launch: {stop_line}", file=sys.stderr, flush=True)
        return STOPPED_EXIT_CODE
    if failed is not None:
        print(str(failed).rstrip(), file=sys.stderr)  # torchrun's summary of the failed ranks
        print("srft launch: error: a trainer failed (its one-line error and torchrun's summary are above)",
              file=sys.stderr, flush=True)
        return 1
    if received is not None:
        print(f"srft launch: error: torchrun received {received.name} and forwarded it; the trainers exited "
              f"without a stop checkpoint (see their messages above)", file=sys.stderr, flush=True)
        return 128 + int(received)
    return 0
