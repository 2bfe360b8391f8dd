"""The TiM training CLI and loop.

    python -m tim_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.x.y=value ...]

``--config`` is an ml_collections config file (``get_config(arg)``); ``--config.<path>=<value>``
overrides single fields (type-checked against the file's value). Everything is validated before
anything is compiled or written: unknown keys, values of the wrong type, a global batch that
does not split over the devices, a workdir holding a checkpoint of another architecture all
exit with code 2 and a one-paragraph ``error: ...`` message on stderr, leaving the workdir
untouched.

Run directory ``DIR``:
  * ``config.json``: the resolved config (process 0);
  * ``checkpoints/<step>/``: Orbax checkpoints (:mod:`tim_jax.training.checkpointing`): the train state,
    the config and the data-iterator position; every ``ckpt.every_steps`` steps, at the end, and
    on SIGTERM / preemption. A run restarted on the same ``DIR`` resumes from the newest one and
    reproduces the uninterrupted run exactly (same batches, same rngs);
  * ``metrics.jsonl``, ``tb/``: metrics every ``train.log_every`` steps (:mod:`tim_jax.training.metrics`);
    on resume, records after the restored step are dropped (they belong to the lost future);
  * ``samples/``: EMA sample grids every ``sample.every_steps`` steps.
``DIR`` may be a ``gs://`` path (multi-host TPU runs: every host must see the checkpoints; needs
a GCS backend for ``etils.epath``, e.g. ``pip install gcsfs``); the metric and sample files
then go to a local directory instead (:func:`local_log_dir`).

The loop never syncs with the host on ordinary steps: metrics stay on device and are fetched at
log steps, before a checkpoint and at the end (and once after the first step, to time the
compilation). Async checkpoint commits are reported as ``checkpoint committed: step N``.
A non-finite loss or grad norm (the step itself refuses such an update) is tracked on device;
the loop stops at the next sync point, naming the first bad step, with exit code 3, and writes
no checkpoint after it, so the newest checkpoint is the last good state.

Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad configuration / command line,
3 non-finite loss or gradient norm.

Environment:
  ``TIM_DISTRIBUTED=1``       call ``jax.distributed.initialize()`` first (multi-host; TPU pods
                              and SLURM are auto-detected; otherwise set TIM_COORDINATOR_ADDRESS
                              or JAX_COORDINATOR_ADDRESS, TIM_NUM_PROCESSES, TIM_PROCESS_ID).
                              See ``launch/README.md``.
  ``TIM_JAX_NO_REEXEC=1``     do not re-exec with the CPU allocator setting (:mod:`tim_jax.cpu_allocator`).
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Optional, Sequence

import jax
from absl import flags
from ml_collections import config_flags

from tim_jax import cpu_allocator, hardware
from tim_jax.data import pipeline as data
from tim_jax.training.loop import (EXIT_NONFINITE, EXIT_OK, EXIT_USAGE, NonFiniteError,
                                   UsageError, run, validate_loop_config)

__all__ = ["main", "parse_command_line", "validate_loop_config", "maybe_initialize_distributed",
           "EXIT_OK", "EXIT_USAGE", "EXIT_NONFINITE"]

log = logging.getLogger("tim_jax.train")


# ----------------------------------------------------------------------------------------------
# command line
def _override_names(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``[(dotted_key, original_token)]`` of the ``--config.<key>[=v]`` overrides in argv."""
    out = []
    for tok in argv[1:]:
        if tok == "--":
            break
        for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
            if tok.startswith(prefix):
                out.append((tok[len(prefix):].split("=", 1)[0], tok))
                break
    return out


def _check_key(config, dotted: str, token: str) -> None:
    node, walked = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(walked) or "<root>"
            close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
            hint = f" Did you mean {'.'.join(walked + close)!r}?" if close else ""
            raise UsageError(f"unknown config key {dotted!r} (in {token}): {where!r} has no field "
                             f"{part!r}.{hint} Fields of {where!r}: {sorted(map(str, keys))}")
        node = node[part]
        walked.append(part)


def parse_command_line(argv: Sequence[str]):
    """argv (with argv[0]) -> ``(config, workdir)``; raises :class:`UsageError` on bad input.

    Every ``--config.<key>`` override is checked against the config file's fields first (so a
    typo names the field and the closest valid one), then applied by ml_collections, which
    checks the value's type.
    """
    argv = list(argv)
    base_argv = [a for a in argv if not any(a.startswith(p) for p in
                                             ("--config.", "-config.", "--noconfig.", "-noconfig."))]

    def parse(args):
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "ml_collections config file[:arg]",
                                        flag_values=fv, lock_config=True, sys_argv=list(args))
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)",
                            flag_values=fv)
        try:
            fv(args, known_only=False)
        except flags.Error as e:
            raise UsageError(f"bad command line: {e}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"bad command line: {e}") from None
        return fv

    fv = parse(base_argv)
    if fv["config"].value is None:
        raise UsageError("--config=<configs/file.py[:arg]> is required")
    if not fv["workdir"].value:
        raise UsageError("--workdir=<run directory> is required")
    for key, token in _override_names(argv):
        _check_key(fv["config"].value, key, token)
    fv = parse(argv)
    workdir = fv["workdir"].value
    if "://" not in workdir:
        workdir = os.path.abspath(os.path.expanduser(workdir))
    return fv["config"].value, workdir


# ----------------------------------------------------------------------------------------------
# process setup
def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when ``TIM_DISTRIBUTED=1`` (before any other jax call).

    Reads ``TIM_COORDINATOR_ADDRESS`` (else jax reads ``JAX_COORDINATOR_ADDRESS``),
    ``TIM_NUM_PROCESSES`` and ``TIM_PROCESS_ID``; unset ones are auto-detected (TPU, SLURM).
    Several processes on the CPU backend (tests, debugging) use gloo collectives and no
    persistent compilation cache: jax writes that cache from process 0 only and keys it by
    device ids, so process 0 would load executables while the others compile them, and the
    first collective would outwait gloo's fixed 30 s connection deadline.
    """
    if os.environ.get("TIM_DISTRIBUTED", "").strip().lower() not in ("1", "true", "yes"):
        return
    kw = {}
    if os.environ.get("TIM_COORDINATOR_ADDRESS"):
        kw["coordinator_address"] = os.environ["TIM_COORDINATOR_ADDRESS"]
    if os.environ.get("TIM_NUM_PROCESSES"):
        kw["num_processes"] = int(os.environ["TIM_NUM_PROCESSES"])
    if os.environ.get("TIM_PROCESS_ID"):
        kw["process_id"] = int(os.environ["TIM_PROCESS_ID"])
    cpu = cpu_allocator.cpu_backend_expected()
    if cpu and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    if cpu and jax.process_count() > 1:
        jax.config.update("jax_enable_compilation_cache", False)


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler bound to whatever ``sys.stderr`` is at emit time (not the one at setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging() -> None:
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    root = logging.getLogger("tim_jax")
    root.setLevel(level)
    if not root.handlers:
        h = _CurrentStderrHandler()
        h.setFormatter(logging.Formatter(
            f"%(asctime)s [p{jax.process_index()}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.propagate = False



# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``python -m tim_jax.train`` / ``tim-train``). Returns the exit code.

    With ``argv=None`` (a real command line) the process first re-execs itself with the CPU
    allocator setting (:func:`tim_jax.cpu_allocator.maybe_reexec`) and exits with the code.
    """
    real_cli = argv is None
    if real_cli:
        cpu_allocator.maybe_reexec()
        argv = sys.argv
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__)
        return EXIT_OK
    maybe_initialize_distributed()
    _setup_logging()
    log.info("GLIBC_TUNABLES=%s", os.environ.get("GLIBC_TUNABLES", "<unset>"))
    data.ensure_absl_flags_parsed()  # Grain worker processes read absl flags
    try:
        config, workdir = parse_command_line(argv)
        log.info(hardware.resolve_config_dtype(config))
        code = run(config, workdir)
    except UsageError as e:  # raised before anything is compiled or written
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    if real_cli:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
