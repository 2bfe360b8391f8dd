#!/usr/bin/env bash
# Follow the training log of one worker (default 0):  launch/tpu_logs.sh [WORKER]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --worker="${1:-0}" \
  --command 'tail -n 100 -f ~/tim_logs/train_$(hostname).log'
