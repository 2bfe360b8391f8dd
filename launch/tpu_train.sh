#!/usr/bin/env bash
# Launch training on every worker of the slice, in the background (survives ssh disconnects).
#   launch/tpu_train.sh [--dry-run] CONFIG WORKDIR [--config.x.y=value ...]
#   launch/tpu_train.sh configs/debug_cpu.py gs://my-bucket/tim/debug --config.train.num_steps=100
# WORKDIR must be visible to every host (a gs:// bucket path); metrics, TensorBoard events and
# sample grids are written on worker 0 under ~/tim_logs/<run>. Relaunching the same command
# resumes from the newest checkpoint in WORKDIR. Stop with launch/tpu_stop.sh (SIGTERM: the run
# saves a checkpoint first).
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
if [ $# -lt 2 ]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.x.y=value ...]" >&2; exit 2
fi
config="$1"; workdir="$2"; shift 2
train="python -m tim_jax.train --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")"
for a in "$@"; do train+=" $(printf '%q' "$a")"; done
# TIM_DISTRIBUTED=1: jax.distributed.initialize() (the TPU slice is auto-detected).
# TIM_JAX_NO_REEXEC=1: the glibc allocator setting is for XLA:CPU, not needed on TPU hosts.
tpu_ssh_all "cd ~/$REMOTE_DIR && . ~/$REMOTE_VENV/bin/activate && mkdir -p ~/tim_logs && \
TIM_DISTRIBUTED=1 TIM_JAX_NO_REEXEC=1 TIM_LOCAL_LOGDIR=~/tim_logs \
nohup $train > ~/tim_logs/train_\$(hostname).log 2>&1 < /dev/null & echo \$! > ~/tim_logs/train.pid; \
echo \"\$(hostname): pid \$(cat ~/tim_logs/train.pid), log ~/tim_logs/train_\$(hostname).log\""
