"""``srft launch``: the per-node torchrun commands for a single- or multi-node job (printed, or exec'd).

Under SLURM, run it once per node (``srun --ntasks-per-node=1 srft launch --config X.yaml``): every node
computes the same plan from the job's environment and execs its own line. All nodes meet through torchrun's
c10d rendezvous hosted on the first node of the allocation:

    torchrun --nnodes=N --nproc-per-node=G --node-rank=R --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT
             --rdzv-id=$SLURM_JOB_ID [signal forwarding] -m megatron_srft train --config X.yaml [overrides]

The node list comes from ``scontrol show hostnames`` when it exists, else from :func:`expand_hostlist`.
``--dry-run`` prints every node's command and checks the config (and, when the model's config.json is
readable here, the layout) against the world size N x G before anything is queued.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..errors import UserError

#: torchrun re-raises these in the agent and forwards them to the workers, whose trainer saves a checkpoint
#: and exits on SIGTERM/SIGUSR1 (checkpoint.save_on_signal). SIGUSR1 is what `#SBATCH --signal` sends.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_PORT = 29500


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
                     shutdown_timeout_s: int = 270) -> list[str]:
    """One node's torchrun argv. ``shutdown_timeout_s``: how long torchrun waits for workers to finish their
    signal checkpoint before SIGKILL (keep it under the ``--signal=...@SECONDS`` lead time)."""
    cmd = ["torchrun", f"--nnodes={num_nodes}", f"--nproc-per-node={gpus_per_node}", f"--node-rank={node_rank}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    if forward_signals:
        cmd += [f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}"]
    return cmd + ["-m", "megatron_srft", "train", "--config", config, *overrides]


def torchrun_forwards_signals() -> bool:
    """Whether the installed torchrun has ``--signals-to-handle`` (torch 2.13 has it; older releases may not)."""
    try:
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
                forward_signals: bool = True, shutdown_timeout_s: int = 270) -> LaunchPlan:
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


def check_config(config: str, overrides: list[str], world_size: int) -> list[str]:
    """Load and validate the config at this world size; check the layout when the model's config.json is here.

    Returns notes for the dry-run printout (what was and was not checked).
    """
    from ..config import load_config
    from ..distributed.layout import memory_per_gpu, validate_layout
    from ..models.arch import load_arch

    cfg = load_config(config, overrides)
    validate_layout(cfg, world_size)
    model_json = Path(cfg.model.path) / "config.json"
    if not cfg.model.path or not model_json.is_file():
        return [f"config OK at world size {world_size}; layout not checked ({model_json} is not readable here)"]
    arch = load_arch(cfg.model.path)
    validate_layout(cfg, world_size, arch)
    est = memory_per_gpu(cfg, arch, world_size).as_gib()
    return [f"config and layout OK at world size {world_size}",
            "estimated GiB per GPU (docs/performance.md): " + ", ".join(f"{k} {v}" for k, v in est.items())]


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config passed to `srft train`")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (default: SLURM_JOB_NUM_NODES, else 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="processes per node (default: SLURM_GPUS_ON_NODE)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command and check the config; run nothing")
    p.add_argument("--nodelist", default=None, help="SLURM host list (default: SLURM_JOB_NODELIST)")
    p.add_argument("--rdzv-host", default=None, help="rendezvous host (default: the first node)")
    p.add_argument("--rdzv-port", type=int, default=DEFAULT_PORT, help="rendezvous port on the first node")
    p.add_argument("--rdzv-id", default=None, help="rendezvous id (default: SLURM_JOB_ID)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (default: SLURM_NODEID/SLURM_PROCID)")
    p.add_argument("--shutdown-timeout", type=int, default=270,
                   help="seconds torchrun waits for workers to save after a signal before SIGKILL")
    p.add_argument("--no-validate", action="store_true",
                   help="skip loading the config here (e.g. an FP8 config checked on a machine without a GPU)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (after `--`)")


def main(args) -> int:
    forward = torchrun_forwards_signals()
    plan = plan_launch(config=args.config, overrides=list(args.overrides), env=os.environ, num_nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node, nodelist=args.nodelist, rdzv_host=args.rdzv_host,
                       rdzv_port=args.rdzv_port, rdzv_id=args.rdzv_id, node_rank=args.node_rank,
                       forward_signals=forward, shutdown_timeout_s=args.shutdown_timeout)
    notes = [] if args.no_validate else check_config(args.config, list(args.overrides), plan.world_size)
    if not forward:
        notes.append("this torchrun has no --signals-to-handle: SIGUSR1 would kill it instead of reaching the "
                      "trainer; use a PyTorch release that has it for pre-emption checkpoints")
    if args.dry_run:
        print(f"# {plan.num_nodes} node(s) x {plan.gpus_per_node} GPU(s) = world size {plan.world_size}; "
              f"rendezvous c10d at {plan.rdzv_endpoint}, id {plan.rdzv_id}")
        for note in notes:
            print(f"# {note}")
        for i, (host, cmd) in enumerate(zip(plan.hosts, plan.commands)):
            print(f"# node {i} ({host})")
            print(shlex.join(cmd))
        return 0
    for note in notes:
        print(f"srft launch: {note}", file=sys.stderr)
    cmd = plan.commands[plan.node_rank]
    if shutil.which("torchrun") is None:  # same launcher, reached through the interpreter running us
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    print(f"srft launch: node {plan.node_rank}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # exec keeps this PID, so srun's signals (SIGUSR1 from the batch script's trap) reach torchrun directly.
    os.execvp(cmd[0], cmd)
    return 0  # not reached
