#!/usr/bin/env bash
# Settings shared by the launch/tpu_*.sh scripts. Every value can be overridden from the
# environment (e.g. `TPU_NAME=tim-v5p-64 ACCELERATOR=v5p-64 launch/tpu_create.sh`).
# Sourced, not run.
: "${PROJECT:?set PROJECT to your GCP project id}"
: "${ZONE:=us-east5-a}"                    # a zone that has the accelerator type below
: "${TPU_NAME:=tim-tpu}"                   # name of the TPU VM (slice)
: "${ACCELERATOR:=v5p-32}"                 # v4-32, v5p-64, v6e-64, ...: one VM per 4 (v4/v5p) or 4/8 chips
: "${RUNTIME_VERSION:=v2-alpha-tpuv5}"     # TPU software version: tpu-ubuntu2204-base (v4),
                                           # v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
: "${REMOTE_DIR:=tim_jax}"                 # checkout directory in $HOME on every worker
: "${REMOTE_VENV:=tim_venv}"               # virtual environment in $HOME on every worker
export PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME_VERSION REMOTE_DIR REMOTE_VENV

# gcloud ssh/scp to every worker of the slice at once.
tpu_ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --worker=all \
    --command "$1"
}
