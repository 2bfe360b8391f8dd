#!/usr/bin/env bash
# Follow the training log of one worker (default 0):  launch/tpu_logs.sh [WORKER] [--dry-run]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
tpu_ssh "${1:-0}" 'tail -n 100 -f ~/tim_logs/train_$(hostname).log'
