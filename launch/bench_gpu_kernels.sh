#!/usr/bin/env bash
# One GPU session's measurements of the Pallas attention kernels and of the whole TiM-XL/2 train
# step, every stage time-bounded so the script ends within ~8 minutes on one H100/H200:
#
#   0. setup: GPU check, missing packages from ./.whl (or pip), jax sees the GPU     (<= 60 s)
#   1. python -m tim_jax.bench.attention_kernels: flash vs cudnn vs xla vs blocked,
#      256..16384 tokens, head dim 72 then 64, forward / fwd_bwd / jvp               (KERNEL_S)
#   2. python -m tim_jax.bench.step_mfu: XL/2 step at global batch 256 (micro 32),
#      dde and jvp with the fastest attention of stage 1 at 256 tokens x 72, then
#      the same with xla for comparison while time is left; 2 traced steps each      (STEP_S)
#   3. python -m tim_jax.bench official: tim_jax vs the official torch step, XL/2,
#      only if OFFICIAL_REPO is set (TORCH_PYTHON defaults to PYTHON) and >= 90 s
#      are left: within 8 minutes that needs a smaller STEP_S, or a second call with
#      STAGES=official                                                               (OFFICIAL_S)
#   4. summary.md; logs and traces packed into extras.tar.gz
#
#   launch/bench_gpu_kernels.sh [--dry-run] [--fetch-wheels] [--help]
#
# Environment: OUT_DIR (default $OUT under the device tool, else ./bench_gpu_out), PYTHON
# (python3), STAGES (kernels,step,official: the stages to run), TOTAL_S (470: the whole
# script), KERNEL_S (170), STEP_S (240), OFFICIAL_S (150),
# CONFIG (configs/c2i_xl2_256.py:synthetic), BATCH (256), MICRO (32), OFFICIAL_REPO, TORCH_PYTHON,
# OFFICIAL_BATCH (32: the official per-GPU batch; `official` has no accumulation), NO_INSTALL
# (1: never pip install), PACK (1 when
# $OUT is set: at most 8 files come back from the device tool, 2 folders deep).
#
# Device tool (no network there; its python3 has jax+CUDA, torch, flax, optax, orbax, but not
# ml_collections, grain, array_record, portpicker): here, first
#     echo /.whl/ >> .git/info/exclude && launch/bench_gpu_kernels.sh --fetch-wheels
# (cp312 manylinux wheels of those four into ./.whl), and for stage 3
#     echo /.official/ >> .git/info/exclude && cp -r /path/to/WZDTHU-TiM .official
# then ONE call:  run(command="OFFICIAL_REPO=.official bash launch/bench_gpu_kernels.sh",
#                     carry=[".whl", ".official"], timeout_s=560)
# Results come back in $OUT: attention_kernels.{json,md}, step_mfu.{json,md}, official_xl2.json,
# summary.md, run.log, extras.tar.gz (stage logs, traces).
#
# Recording the results:
#   * docs/benchmarks.md: add a "GPU attention kernels" section with the date, commit, card
#     (attention_kernels.json "device"), jax version, and paste attention_kernels.md (drop rows
#     you do not need; keep the FLOP-counting line) and step_mfu.md (step time, img/s, MFU vs
#     the bf16 peak measured in the same run, top ops). State the settings (tokens per call,
#     batch/micro-batch) as the tables print them.
#   * FLASH_MEASURED_WINS (tim_jax/models/attention.py): attention_kernels.json
#     "suggested_flash_measured_wins" is {backend: fewest tokens from which flash beat xla (or
#     blocked, which xla is above 2048^2 logits) in fwd_bwd AND jvp at every larger measured size,
#     at head dim 72}. If it is {"gpu": N} with N not null, set FLASH_MEASURED_WINS = {"gpu": N}
#     and cite the docs/benchmarks.md table in the comment; null: leave the dict empty. Check
#     step_mfu.md too: "auto" should only pick flash where the whole step got faster as well.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
DRY=0
FETCH=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-kernels,step,official}
TOTAL_S=${TOTAL_S:-470}
KERNEL_S=${KERNEL_S:-170}
STEP_S=${STEP_S:-240}
OFFICIAL_S=${OFFICIAL_S:-150}
CONFIG=${CONFIG:-configs/c2i_xl2_256.py:synthetic}
BATCH=${BATCH:-256}
MICRO=${MICRO:-32}
OFFICIAL_BATCH=${OFFICIAL_BATCH:-32}
OUT_DIR=${OUT_DIR:-${OUT:-$ROOT/bench_gpu_out}}
if [ -n "${OUT:-}" ]; then PACK=${PACK:-1}; else PACK=${PACK:-0}; fi
WHEELS="ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0"

if [ $FETCH = 1 ]; then  # on a machine with network: wheels for the device's Python 3.12
  mkdir -p .whl
  # shellcheck disable=SC2086
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi

run() {  # run NAME SECONDS CMD...: time-bounded stage, output teed to logs/NAME.log
  local name=$1 secs=$2; shift 2
  echo "=== stage $name (timeout ${secs}s): $*"
  [ $DRY = 1 ] && return 0
  local t0=$SECONDS
  timeout -k 15 "$secs" "$@" 2>&1 | tee "$OUT_DIR/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== stage $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  return "$rc"
}
left() { echo $((TOTAL_S - SECONDS)); }
want() { [[ ",$STAGES," == *",$1,"* ]] || { echo "=== stage $2: not in STAGES=$STAGES"; false; }; }
bounded() {  # bounded WANT RESERVE: min(WANT, time left - RESERVE), at least 0
  local l=$(( $(left) - $2 )); [ "$l" -lt 0 ] && l=0; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}

export TIM_JAX_NO_REEXEC=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tim_jax_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}

if [ $DRY = 0 ]; then
  mkdir -p "$OUT_DIR/logs"
  exec > >(tee "$OUT_DIR/run.log") 2>&1
fi
echo "bench_gpu_kernels: out $OUT_DIR, budget ${TOTAL_S}s, $(date -u +%FT%TZ)," \
     "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---- 0. setup ---------------------------------------------------------------------------------
echo "=== stage setup: GPU, packages (./.whl or pip), jax backend"
if [ $DRY = 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  need="import ml_collections, grain, array_record, portpicker, flax, optax, orbax.checkpoint"
  if [ "${NO_INSTALL:-0}" = 1 ]; then
    :
  elif ! "$PYTHON" -c "$need" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tim_jax_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tim_jax_site"
    else
      timeout 120 "$PYTHON" -m pip install -q --retries 1 --timeout 10 -e "$ROOT" \
        || echo "pip install failed"
    fi
  fi
  if [ "${NO_INSTALL:-0}" != 1 ] &&
     ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "jax has no GPU backend: installing the cuda extra"
    timeout 300 "$PYTHON" -m pip install -q --retries 1 --timeout 10 -e "$ROOT[cuda]" \
      || echo "cuda extra install failed"
  fi
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
  "$PYTHON" -c "$need" || { echo "missing packages (see the header: --fetch-wheels)"; exit 1; }
fi

# ---- 1. the kernels alone ---------------------------------------------------------------------
if want kernels attention_kernels; then
  T=$(bounded "$KERNEL_S" 200)
  run attention_kernels "$T" "$PYTHON" -m tim_jax.bench.attention_kernels --out "$OUT_DIR" \
    --budget-s $((T > 60 ? T - 45 : T / 2))
fi

# ---- 2. the whole step: dde and jvp with the fastest attention at 256 tokens x 72 ------------
pick() {  # pick MODE: the fastest impl of attention_kernels.json at 256x72 (xla if none)
  "$PYTHON" - "$OUT_DIR/attention_kernels.json" "$1" <<'EOF' 2>/dev/null || echo xla
import json, sys
best = json.load(open(sys.argv[1])).get("best", {}).get("256x72", {}).get(sys.argv[2], "xla")
print(best if best in ("xla", "blocked", "flash", "cudnn") else "xla")
EOF
}
if [ $DRY = 1 ]; then
  BEST_DDE="<fastest fwd_bwd at 256x72>" BEST_JVP="<fastest jvp at 256x72>"
else
  BEST_DDE=$(pick fwd_bwd) BEST_JVP=$(pick jvp)
fi
VARIANTS="dde:$BEST_DDE,jvp:$BEST_JVP"
[ "$BEST_DDE" != xla ] && VARIANTS="$VARIANTS,dde:xla"
[ "$BEST_JVP" != xla ] && VARIANTS="$VARIANTS,jvp:xla"
if want step step_mfu; then
  T=$(bounded "$STEP_S" 20)
  run step_mfu "$T" "$PYTHON" -m tim_jax.bench.step_mfu --config "$CONFIG" --batch "$BATCH" \
    --micro-batch "$MICRO" --variants "$VARIANTS" --peak-n 8192 --trace-steps 2 \
    --out "$OUT_DIR" --budget-s $((T > 120 ? T - 110 : 1))
fi

# ---- 3. side by side with the official torch step ---------------------------------------------
if ! want official official_xl2; then
  :
elif [ -n "${OFFICIAL_REPO:-}" ]; then
  T=$(bounded "$OFFICIAL_S" 10)
  if [ "$T" -ge 90 ] || [ $DRY = 1 ]; then
    XLA_PYTHON_CLIENT_PREALLOCATE=false run official_xl2 "$T" "$PYTHON" -m tim_jax.bench official \
      --config "$CONFIG" --config.data.global_batch_size="$OFFICIAL_BATCH" --torch-device cuda \
      --peak_n 8192 --rounds 2 --round-steps 2 --official-repo "$OFFICIAL_REPO" \
      --torch-python "${TORCH_PYTHON:-$PYTHON}" --json "$OUT_DIR/official_xl2.json"
  else
    echo "=== stage official_xl2: skipped, ${T}s left"
  fi
else
  echo "=== stage official_xl2: skipped (set OFFICIAL_REPO, and TORCH_PYTHON if not \$PYTHON)"
fi

# ---- 4. summary and packing -------------------------------------------------------------------
echo "=== stage summary: $OUT_DIR/summary.md$([ "$PACK" = 1 ] && echo ', extras.tar.gz')"
[ $DRY = 1 ] && exit 0
{
  echo "# bench_gpu_kernels $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  for f in attention_kernels.md step_mfu.md; do
    echo; if [ -f "$OUT_DIR/$f" ]; then cat "$OUT_DIR/$f"; else echo "($f: not written)"; fi
  done
  if [ -f "$OUT_DIR/official_xl2.json" ]; then
    echo; echo "official side by side: speedup $("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['speedup'],3), 'x; jax', round(r['jax']['step_s']['median'],4), 's/step; torch', round(r['torch']['step_s']['median'],4), 's/step')" "$OUT_DIR/official_xl2.json")"
  fi
} > "$OUT_DIR/summary.md" 2>&1
if [ "$PACK" = 1 ]; then
  cd "$OUT_DIR" || exit 1
  rm -f ./*.tmp  # a stage killed while writing its JSON
  extras=$(ls -d logs trace_* 2>/dev/null)
  # shellcheck disable=SC2086
  if [ -n "$extras" ]; then
    tar czf extras.tar.gz $extras
    if [ "$(stat -c %s extras.tar.gz)" -gt 15000000 ]; then  # 16 MiB per file comes back
      tar czf extras.tar.gz --exclude='*.xplane.pb' $extras
    fi
    if [ "$(stat -c %s extras.tar.gz)" -gt 15000000 ]; then tar czf extras.tar.gz logs; fi
    rm -rf $extras
  fi
  ls -la "$OUT_DIR"
fi
echo "bench_gpu_kernels: done after ${SECONDS}s"
