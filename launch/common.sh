#!/usr/bin/env bash
# Helpers shared by the launch/*.sh scripts: the --dry-run switch and command printing.
# Sourced, not run:
#   source "$(dirname "$0")/common.sh"
#   dry_run_args "$@"; set -- "${ARGS[@]}"    # drops --dry-run (anywhere) and sets DRY_RUN=1
#   run gcloud compute tpus tpu-vm ...         # runs it, or with DRY_RUN=1 only prints it
#
# A dry run prints every command it would execute, one per line, prefixed with "+ " and quoted
# so that the line is valid shell (Python's shlex.split gives the argv back); it executes
# nothing, writes nothing and needs no credentials. DRY_RUN=1 in the environment does the same.

DRY_RUN="${DRY_RUN:-0}"

# dry_run_args ARGS...: ARGS without any --dry-run, in the array ARGS; --dry-run sets DRY_RUN=1.
dry_run_args() {
  ARGS=()
  local a
  for a in "$@"; do
    if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else ARGS+=("$a"); fi
  done
}

# shell_quote WORD: WORD as one shell word (bare when safe, else in single quotes).
shell_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]; then
    printf '%s' "$s"
  else
    local sq="'\\''"
    printf "'%s'" "${s//\'/$sq}"
  fi
}

# print_command ARGV...: "+ " and the quoted argv on one line (stdout).
print_command() {
  local out="+" a
  for a in "$@"; do out+=" $(shell_quote "$a")"; done
  printf '%s\n' "$out"
}

# run ARGV...: execute ARGV, or print it when DRY_RUN=1. Environment assignments go in front
# through `env` (run env A=1 B=2 cmd ...) so that the dry run shows them too.
run() {
  if [ "$DRY_RUN" = 1 ]; then print_command "$@"; else "$@"; fi
}

# run_exec ARGV...: like run, but replaces the shell (exec) when not a dry run.
run_exec() {
  if [ "$DRY_RUN" = 1 ]; then print_command "$@"; exit 0; else exec "$@"; fi
}
