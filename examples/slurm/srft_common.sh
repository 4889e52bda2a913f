# shellcheck shell=bash
# Sourced by srft_single_node.sbatch and srft_multi_node.sbatch: the cluster environment for NCCL and the
# pre-emption-aware launch (SIGUSR1 -> checkpoint -> requeue). Every variable can be set before `sbatch`
# (sbatch exports the submitting shell's environment by default); the values here are defaults only.

# ---------------------------------------------------------------------------------------------- GPU / NCCL
# Megatron's tensor-parallel communication overlap relies on kernels being queued in issue order on one
# hardware queue; CUDA_DEVICE_MAX_CONNECTIONS=1 guarantees that (Megatron warns without it when TP/SP overlap).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NCCL_DEBUG=INFO prints the chosen transport at start-up: look for "NET/IB" (InfiniBand, good) rather than
# "NET/Socket" (TCP fallback, ~10x slower across nodes). WARN keeps logs quiet once that is confirmed.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# NCCL_IB_HCA: the InfiniBand HCAs (and ports) NCCL may use, e.g. "mlx5_0:1,mlx5_1:1"; "=mlx5_0,..." matches
#   exactly, "^mlx5_4" excludes (e.g. a storage NIC). Unset = every HCA NCCL finds. `ibstat` lists them.
# NCCL_SOCKET_IFNAME: the interface for NCCL's bootstrap and socket fallback, e.g. "ib0", "bond0" or
#   "^lo,docker" (exclude). Unset = NCCL picks one; set it when nodes have several networks.
# NCCL_IB_GID_INDEX: set (often 3) only on RoCE fabrics; not needed on native InfiniBand.
# These are left as the site configured them; export them before `sbatch` to override, for example:
#   NCCL_IB_HCA="mlx5_0:1,mlx5_3:1,mlx5_4:1,mlx5_5:1" NCCL_SOCKET_IFNAME=ib0 sbatch ...
#   (GLOO_SOCKET_IFNAME then follows NCCL_SOCKET_IFNAME, below)
# The collective timeout itself is parallel.timeout_minutes in the config.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail fast on a hung peer
# GLOO_SOCKET_IFNAME: the interface of the gloo groups (vLLM builds some at engine start, across nodes; our
#   result gathers and Megatron's gloo groups use them too). Without it gloo resolves the hostname, which on
#   multi-homed nodes can pick a management network the other nodes cannot reach: the first step then hangs.
#   Defaults to NCCL_SOCKET_IFNAME when that names interfaces (gloo has no "^exclude" syntax).
if [[ -z "${GLOO_SOCKET_IFNAME:-}" && -n "${NCCL_SOCKET_IFNAME:-}" && "${NCCL_SOCKET_IFNAME}" != ^* ]]; then
    export GLOO_SOCKET_IFNAME="$NCCL_SOCKET_IFNAME"
fi
# Do not set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: vLLM's sleep mode (rollout.sleep_level > 0)
# uses its own CUDA memory pool, which rejects expandable segments.

# ---------------------------------------------------------------------------------------------- container
# pyxis/enroot: CONTAINER_IMAGE="registry.example.com#megatron-srft:0.1.0" (pyxis's "#" separates the
# registry) or a squashfs made by `enroot import`. Empty = run on the host's Python environment.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"   # extra "src:dst[,src:dst]" (models, data); the work dir is mounted
SRFT_BIN="${SRFT_BIN:-srft}"               # the `srft` entry point on the compute nodes (or in the image)
# Extra `srft launch` flags, e.g. "--shutdown-timeout 800 --rdzv-port 29600". The trainer checkpoints at the end
# of the step it is in when SIGUSR1 arrives, so the --signal lead time (300 s in the sbatch headers) and
# --shutdown-timeout (270 s by default) must cover one step plus one checkpoint save: raise both for long steps.
# `srft launch --dry-run --config X.yaml` prints both for a config (docs/cluster.md, "Pre-emption").
SRFT_LAUNCH_ARGS="${SRFT_LAUNCH_ARGS:-}"

srft_on_usr1() {
    # SLURM sends SIGUSR1 to this batch shell (--signal=B:USR1@300). srun relays signals it receives to its
    # tasks; each task is `srft launch`, which runs torchrun's agent in its own process, and torchrun
    # (--signals-to-handle) forwards it to the trainers, which checkpoint and exit with status 75
    # (checkpoint.save_on_signal; `srft launch` ends with their one "stopped at step N" line). Then requeue.
    echo "srft: $(date -Is) SIGUSR1: forwarding to the trainers for a checkpoint, then requeue" >&2
    SRFT_REQUEUE=1
    if [[ -n "${SRFT_SRUN_PID:-}" ]]; then
        kill -USR1 "$SRFT_SRUN_PID" 2>/dev/null || true
    fi
}

srft_run() {
    # usage: srft_run CONFIG.yaml [key.sub=value ...]
    # One srun task per node; each runs `srft launch`, which runs that node's torchrun command.
    local config="$1"
    shift
    local -a srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none)
    local -a launch_args=()
    read -r -a launch_args <<< "$SRFT_LAUNCH_ARGS"
    if [[ -n "$CONTAINER_IMAGE" ]]; then
        srun_args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD"
                    --container-mounts="$PWD:$PWD${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
    fi
    echo "srft: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-localhost}]," \
         "restart count ${SLURM_RESTART_COUNT:-0}, config $config" >&2
    SRFT_REQUEUE=0
    trap srft_on_usr1 USR1
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4 (RHEL 7's 4.2)
    srun "${srun_args[@]}" "$SRFT_BIN" launch --gpus-per-node "$GPUS_PER_NODE" ${launch_args[@]+"${launch_args[@]}"} \
        --config "$config" -- "$@" &
    SRFT_SRUN_PID=$!
    local rc=0
    while true; do
        # `wait` returns early (status > 128) when the trap fires; keep waiting until srun itself has exited,
        # so the trainers have finished writing their checkpoint before the job is requeued.
        if wait "$SRFT_SRUN_PID"; then rc=0; else rc=$?; fi
        kill -0 "$SRFT_SRUN_PID" 2>/dev/null || break
    done
    trap - USR1
    if [[ "$SRFT_REQUEUE" == 1 ]]; then
        echo "srft: $(date -Is) step exited with $rc after SIGUSR1; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
