#!/usr/bin/env bash
# Stop the run started by launch/tpu_train.sh on every worker: SIGTERM to the recorded pid
# (the JAX preemption service makes every host save the same step, then exit), then wait up to
# TIMEOUT seconds (default 300) for the processes to finish. Only our own pid is signalled.
#   launch/tpu_stop.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
timeout_s="${TIMEOUT:-300}"
tpu_ssh_all "f=~/tim_logs/train.pid; [ -f \$f ] || { echo \"\$(hostname): no run\"; exit 0; }; \
pid=\$(cat \$f); kill -TERM \$pid 2>/dev/null || true; \
for i in \$(seq $timeout_s); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; \
if kill -0 \$pid 2>/dev/null; then echo \"\$(hostname): \$pid still running\"; else rm -f \$f; echo \"\$(hostname): stopped\"; fi"
