#!/usr/bin/env bash
# The project's test command: installs tim_jax with its test extra into the active Python
# environment (or a fresh ./.venv when none is active) and runs the test suite.
# README and CI both call this script, so they cannot drift.
#   launch/test.sh [--dry-run] [pytest arguments ...]
# Test files run in TIM_JAX_TEST_WORKERS parallel processes (pytest-xdist; see below).
# --dry-run prints the commands (venv, pip install, pytest with its environment) and runs none.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry_run_args "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then run python3 -m venv .venv; fi
  if [ "$DRY_RUN" = 1 ]; then
    print_command . .venv/bin/activate
  else
    # shellcheck disable=SC1091
    . .venv/bin/activate
  fi
fi
if [ "$DRY_RUN" = 1 ]; then
  run python -m pip install -q --upgrade pip
else
  python -m pip install -q --upgrade pip >/dev/null
fi
run python -m pip install -q -e ".[test]"
cache="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/tim_jax_jax_cache}"
# Test files run in parallel worker processes (pytest-xdist, one file per worker at a time):
# TIM_JAX_TEST_WORKERS, default min(4, CPUs, GiB of RAM / 6); 1, or -n/-p in the arguments,
# runs them in this process as plain pytest does.
workers="${TIM_JAX_TEST_WORKERS:-$(python3 - <<'PY'
import os
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
try:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
except (ValueError, OSError):
    mem_gib = 6
print(max(1, min(4, cpus, int(mem_gib // 6))))
PY
)}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
  for a in "$@"; do
    case "$a" in -n|-n*|--numprocesses*|-p|-pno:xdist) parallel=() ;; esac
  done
fi
run_exec env JAX_COMPILATION_CACHE_DIR="$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 python -m pytest ${parallel[@]+"${parallel[@]}"} "$@"
