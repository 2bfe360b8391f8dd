#!/usr/bin/env bash
# Delete the TPU VM slice (checkpoints in a gs:// workdir are kept).
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
gcloud compute tpus tpu-vm delete "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --quiet
