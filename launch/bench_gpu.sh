#!/usr/bin/env bash
# Side-by-side training-speed benchmark on one GPU: the tim_jax step (JAX on its default backend,
# the GPU) against the official PyTorch step on CUDA (bf16 autocast, TF32 allowed), interleaved,
# for TiM-B/4 and TiM-S/2 at global batch 256. Runs `python -m tim_jax.bench official` (see
# tim_jax/bench/cli.py) once per config.
#
#   launch/bench_gpu.sh [OFFICIAL_REPO [TORCH_PYTHON]] [extra bench flags, e.g. --rounds 6]
#   OFFICIAL_REPO=/path/to/TiM TORCH_PYTHON=/venv/bin/python OUT_DIR=out launch/bench_gpu.sh
#   launch/bench_gpu.sh --dry-run ...   # print the commands, run nothing, write nothing
#
# OFFICIAL_REPO: a checkout of the official TiM (WZDTHU/TiM); required.
# TORCH_PYTHON:  an interpreter with a CUDA build of torch, timm and einops (default: python3).
# PYTHON:        the interpreter with tim_jax and a CUDA jax installed (default: python3).
# OUT_DIR:       where official_<config>.log / .json are written (default: ./bench_gpu_out).
# Relative paths are taken from the current directory; the benchmark itself runs from the repo
# root. A config that fails does not stop the next one; the exit code is 1 if any failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
if [ $# -gt 0 ] && [[ $1 != -* ]]; then OFFICIAL_REPO=$1; shift; fi
if [ $# -gt 0 ] && [[ $1 != -* ]]; then TORCH_PYTHON=$1; shift; fi
: "${OFFICIAL_REPO:?give the official TiM checkout as the first argument or OFFICIAL_REPO=...}"
OFFICIAL_REPO=$(cd "$OFFICIAL_REPO" && pwd)
resolve() {  # resolve VAR: the absolute path of ${VAR:-python3} (bench needs a file path)
  local want=${!1:-python3} path
  path=$(command -v "$want") || { echo "$1=$want: not found" >&2; exit 2; }
  [[ $path == /* ]] || path=$PWD/$path
  printf -v "$1" '%s' "$path"
}
resolve TORCH_PYTHON
resolve PYTHON
OUT_DIR=${OUT_DIR:-./bench_gpu_out}
if [ "$DRY_RUN" = 1 ]; then
  [[ $OUT_DIR == /* ]] || OUT_DIR=$PWD/${OUT_DIR#./}
else
  mkdir -p "$OUT_DIR"
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
fi
cd "$(dirname "$0")/.."

export TIM_JAX_NO_REEXEC=1                  # the glibc allocator setting is for XLA:CPU only
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory for the torch process beside JAX
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  print_command nvidia-smi -L
elif command -v nvidia-smi >/dev/null; then
  nvidia-smi -L
fi

rc=0
for config in configs/c2i_b4_256.py:synthetic configs/c2i_s2_256.py; do
  name=$(basename "${config%%:*}" .py)
  cmd=("$PYTHON" -m tim_jax.bench official --config "$config" \
      --config.data.global_batch_size=256 --torch-device cuda --peak_n 8192 \
      --official-repo "$OFFICIAL_REPO" --torch-python "$TORCH_PYTHON" \
      --json "$OUT_DIR/official_$name.json" "$@")
  if [ "$DRY_RUN" = 1 ]; then
    print_command env TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 "${cmd[@]}"
    continue
  fi
  echo "=== $name -> $OUT_DIR/official_$name.{log,json}"
  if ! "${cmd[@]}" 2>&1 | tee "$OUT_DIR/official_$name.log"; then
    echo "=== $name FAILED (see $OUT_DIR/official_$name.log)" >&2
    rc=1
  fi
done
exit $rc
