# The body every fahr sbatch template shares (pretrain.sbatch, finetune.sbatch): sourced, never run.
#
# The template sets COMMAND (a training command: pretrain, finetune-age, finetune-survival) and leaves
# its Hydra overrides in "$@". This file sets up the environment, finds the run directory (the same
# on every requeue: experiment name + config hash), sends the job's log there
# (<run_dir>/slurm/<job id>.out, appended by every attempt) and starts one `fahr $COMMAND` process per
# task with srun.
#
# Environment it reads (all optional):
#   FAHR            the fahr command; e.g. FAHR="/path/to/venv/bin/fahr" or "python -m fahr.cli.main"
#   NCCL_*, GLOO_*  the network (see below and slurm/README.md, "Network")

# The start (strict bash, working directory, $FAHR, OMP_NUM_THREADS) is preamble.sh, shared with shards.sbatch.
source "$(dirname "${BASH_SOURCE[0]}")/preamble.sh"
: "${COMMAND:?the template must set COMMAND before sourcing common.sh}"

# ---- network: NCCL between GPUs and nodes ------------------------------------------------------
# Set these in your environment when your cluster needs them; defaults are NCCL's.
#   NCCL_SOCKET_IFNAME  interface for NCCL's bootstrap/TCP traffic, e.g. "ib0" or "^lo,docker" (exclude)
#   NCCL_IB_HCA         InfiniBand adapters to use, e.g. "mlx5_0,mlx5_1"; NCCL_IB_DISABLE=1 forces TCP
#   NCCL_IB_GID_INDEX   RoCE clusters usually need 3
#   NCCL_DEBUG          WARN (default here); INFO prints the chosen transports: the first thing to read
#                       when a multi-node job hangs at start-up
#   GLOO_SOCKET_IFNAME  the same as NCCL_SOCKET_IFNAME for gloo (CPU runs, some barriers)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies makes the others fail instead of waiting forever in a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# ---- the run directory and the log --------------------------------------------------------------
# `fahr run-dir` composes the config exactly as the command will; overrides it cannot compose stop
# the job here, with fahr's one-line message in the first log (%x-%j.out).
RUN_DIR=$($FAHR run-dir "$COMMAND" "$@") || {
    echo "fahr: the run directory could not be found (the overrides above are refused); nothing was started" >&2
    exit 2
}
mkdir -p "$RUN_DIR/slurm"
LOG="$RUN_DIR/slurm/${SLURM_JOB_ID:-local}.out"
echo "fahr: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) logging to $LOG"
exec >>"$LOG" 2>&1
echo "=== $(date -Is) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES:-1} node(s)" \
     "x ${SLURM_NTASKS_PER_NODE:-?} task(s) on ${SLURM_JOB_NODELIST:-?}"
echo "=== $FAHR $COMMAND $*"

# One task per GPU; Lightning reads SLURM_PROCID/LOCALID/NTASKS. --kill-on-bad-exit: one failed
# rank ends the step instead of leaving the others blocked in a collective. --label: "<rank>: " prefixes.
srun --kill-on-bad-exit=1 --label $FAHR "$COMMAND" "$@"
