"""``srft launch``: the per-node torchrun commands for a single- or multi-node job (printed, or exec'd).

Under SLURM, run it once per node (``srun --ntasks-per-node=1 srft launch --config X.yaml``): every node computes
the same plan from the job's environment and runs its own line; ``--dry-run`` prints every node's command and
checks the config. The plan, the checks and the node's torchrun agent are training/launch.py's.
"""

from __future__ import annotations

import os
import shlex
import sys

from ..training.launch import (DEFAULT_PORT, DEFAULT_SHUTDOWN_TIMEOUT_S, DEFAULT_WRITE_GBS, check_config,
                               plan_launch, run_node, torchrun_forwards_signals)


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
    p.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="seconds torchrun waits for workers to save after a signal before SIGKILL")
    p.add_argument("--write-gbs", type=float, default=DEFAULT_WRITE_GBS,
                   help="aggregate checkpoint write bandwidth (GB/s) assumed by the dry run's pre-emption estimate")
    p.add_argument("--no-validate", action="store_true",
                   help="skip loading the config here (e.g. an FP8 config checked on a machine without a GPU)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (after `--`)")


def main(args) -> int:
    forward = torchrun_forwards_signals()
    plan = plan_launch(config=args.config, overrides=list(args.overrides), env=os.environ, num_nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node, nodelist=args.nodelist, rdzv_host=args.rdzv_host,
                       rdzv_port=args.rdzv_port, rdzv_id=args.rdzv_id, node_rank=args.node_rank,
                       forward_signals=forward, shutdown_timeout_s=args.shutdown_timeout)
    notes = [] if args.no_validate else check_config(args.config, list(args.overrides), plan.world_size,
                                                     shutdown_timeout_s=args.shutdown_timeout,
                                                     write_gbs=args.write_gbs, gpus_per_node=plan.gpus_per_node)
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
    print(f"srft launch: node {plan.node_rank}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return run_node(cmd)
