#!/usr/bin/env bash
# Create the TPU VM slice described in launch/tpu_env.sh.
#   PROJECT=my-proj launch/tpu_create.sh [--spot] [--dry-run]
# --spot creates a preemptible (spot) slice: training survives preemption because the train
# CLI checkpoints on SIGTERM and resumes from the newest checkpoint when relaunched. Other
# arguments go to `gcloud compute tpus tpu-vm create` as they are.
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
run gcloud compute tpus tpu-vm create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION" "$@"
