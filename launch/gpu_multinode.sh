#!/usr/bin/env bash
# Multi-node (or single-node) GPU training: one process per node driving all its GPUs.
#
# Under SLURM (one task per node; jax detects the cluster from the SLURM variables):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh CONFIG WORKDIR [overrides]
# Without a scheduler, run on every node with the coordinator (node 0) address and this node's rank:
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=4 NODE_RANK=0 launch/gpu_multinode.sh CONFIG WORKDIR [overrides]
# --dry-run (anywhere among the arguments) prints the command with its environment and runs nothing.
#
# WORKDIR must be on storage every node sees (NFS, Lustre or gs://). A relaunch resumes from the
# newest checkpoint; SIGTERM (scancel, preemption) saves a checkpoint first.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
if [ $# -lt 2 ]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.x.y=value ...]" >&2; exit 2
fi
config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
envs=(
  TIM_DISTRIBUTED=1                      # jax.distributed.initialize() before anything else
  TIM_JAX_NO_REEXEC=1                    # the glibc allocator setting is for XLA:CPU only
  XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
)
if [ -z "${SLURM_JOB_ID:-}" ]; then
  : "${COORDINATOR:?set COORDINATOR=host:port of node 0 (or run under SLURM)}"
  : "${NUM_NODES:?set NUM_NODES}"
  : "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}"
  envs+=(JAX_COORDINATOR_ADDRESS="$COORDINATOR" TIM_NUM_PROCESSES="$NUM_NODES" TIM_PROCESS_ID="$NODE_RANK")
fi
run_exec env "${envs[@]}" python -m tim_jax.train --config="$config" --workdir="$workdir" "$@"
