#!/usr/bin/env bash
# One-time setup on every worker: a virtual environment with tim_jax and jax[tpu].
# Extra pip requirements can be passed as arguments (default `gcsfs`, for gs:// workdirs, which
# multi-host runs need so that every host sees the same checkpoints).
#   launch/tpu_setup.sh [--dry-run] [gcsfs ...]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
extra="${*:-gcsfs}"
tpu_ssh_all "set -e; python3 -m venv ~/$REMOTE_VENV && . ~/$REMOTE_VENV/bin/activate && \
pip install -q --upgrade pip && pip install -q -e ~/$REMOTE_DIR'[tpu]' $extra && \
python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
