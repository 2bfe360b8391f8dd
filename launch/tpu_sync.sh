#!/usr/bin/env bash
# Copy the current checkout (tracked files of HEAD plus uncommitted changes to them) to
# ~/$REMOTE_DIR on every worker. Run it again after every code change: all hosts must run the
# same code.
#   launch/tpu_sync.sh [--dry-run]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$DRY_RUN" = 1 ]; then
  tarball="${TMPDIR:-/tmp}/tim_jax_src.XXXXXX.tar.gz"   # a dry run creates no file
  print_command sh -c "cd $(shell_quote "$repo") && git ls-files -z | tar --null -czf $(shell_quote "$tarball") -T -"
else
  tarball="$(mktemp -t tim_jax_src.XXXXXX).tar.gz"
  trap 'rm -f "$tarball"' EXIT
  # git ls-files: exactly the tracked files, as they are in the working tree now
  (cd "$repo" && git ls-files -z | tar --null -czf "$tarball" -T -)
fi
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":tim_jax_src.tar.gz --project "$PROJECT" \
  --zone "$ZONE" --worker=all
tpu_ssh_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/tim_jax_src.tar.gz -C ~/$REMOTE_DIR && rm ~/tim_jax_src.tar.gz"
if [ "$DRY_RUN" != 1 ]; then
  echo "synced $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet || echo '+dirty') to $TPU_NAME"
fi
