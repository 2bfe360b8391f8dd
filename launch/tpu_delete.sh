#!/usr/bin/env bash
# Delete the TPU VM slice (checkpoints in a gs:// workdir are kept).
#   launch/tpu_delete.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --quiet
