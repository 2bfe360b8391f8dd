#!/usr/bin/env bash
# Settings shared by the launch/tpu_*.sh scripts. Every value can be overridden from the
# environment (e.g. `TPU_NAME=tim-v5p-64 ACCELERATOR=v5p-64 launch/tpu_create.sh`).
# Sourced, not run. Every tpu_*.sh takes --dry-run (anywhere among its arguments): it prints
# the gcloud commands it would run (one per line, "+ " first) and runs none of them.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${PROJECT:?set PROJECT to your GCP project id}"
: "${ZONE:=us-east5-a}"                    # a zone that has the accelerator type below
: "${TPU_NAME:=tim-tpu}"                   # name of the TPU VM (slice)
: "${ACCELERATOR:=v5p-32}"                 # v4-32, v5p-64, v6e-64, ...: one VM per 4 (v4/v5p) or 4/8 chips
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"     # TPU software version: tpu-ubuntu2204-base (v4),
                                           # v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
: "${REMOTE_DIR:=tim_jax}"                 # checkout directory in $HOME on every worker
: "${REMOTE_VENV:=tim_venv}"               # virtual environment in $HOME on every worker
export PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME_VERSION REMOTE_DIR REMOTE_VENV

# tpu_ssh WORKER COMMAND: run the remote shell COMMAND on one worker (0, 1, ...) or on all.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
    --worker="$1" --command "$2"
}

# tpu_ssh_all COMMAND: the same command on every worker of the slice at once.
tpu_ssh_all() {
  tpu_ssh all "$1"
}
