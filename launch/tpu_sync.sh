#!/usr/bin/env bash
# Copy the current checkout (tracked files of HEAD plus uncommitted changes to them) to
# ~/$REMOTE_DIR on every worker. Run it again after every code change: all hosts must run the
# same code.
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="$(mktemp -t tim_jax_src.XXXXXX).tar.gz"
trap 'rm -f "$tarball"' EXIT
# git ls-files: exactly the tracked files, as they are in the working tree now
(cd "$repo" && git ls-files -z | tar --null -czf "$tarball" -T -)
gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":tim_jax_src.tar.gz --project "$PROJECT" \
  --zone "$ZONE" --worker=all
tpu_ssh_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/tim_jax_src.tar.gz -C ~/$REMOTE_DIR && rm ~/tim_jax_src.tar.gz"
echo "synced $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet || echo '+dirty') to $TPU_NAME"
