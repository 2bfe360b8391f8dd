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
  * ``checkpoints/<step>/``: Orbax checkpoints (:mod:`tim_jax.checkpointing`): the train state,
    the config and the data-iterator position; every ``ckpt.every_steps`` steps, at the end, and
    on SIGTERM / preemption. A run restarted on the same ``DIR`` resumes from the newest one and
    reproduces the uninterrupted run exactly (same batches, same rngs);
  * ``metrics.jsonl``, ``tb/``: metrics every ``train.log_every`` steps (:mod:`tim_jax.metrics`);
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
                              and SLURM are auto-detected; otherwise set JAX_COORDINATOR_ADDRESS,
                              TIM_NUM_PROCESSES, TIM_PROCESS_ID). See ``launch/README.md``.
  ``TIM_JAX_NO_REEXEC=1``     do not re-exec with the CPU allocator setting (:mod:`tim_jax._allocator`).
  ``TIM_JAX_SLEEP_AFTER_CHECKPOINT=S``  fault-injection hook for preemption tests: after each
                              periodic checkpoint, wait for its commit, print
                              ``checkpoint committed: step N`` and sleep S seconds.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: they would be paid twice
    from tim_jax import _allocator

    _allocator.maybe_reexec()

import contextlib
import dataclasses
import difflib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from ml_collections import config_flags

from tim_jax import _allocator, checkpointing, data, metrics, optim, sharding
from tim_jax import train_state as ts
from tim_jax import train_step as tstep

__all__ = ["main", "run", "prepare", "parse_command_line", "UsageError", "NonFiniteError",
           "validate_loop_config", "maybe_initialize_distributed"]

log = logging.getLogger("tim_jax.train")

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE = 0, 2, 3


class UsageError(ValueError):
    """Bad command line or configuration (exit code 2)."""


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient norm (exit code 3)."""


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


def validate_loop_config(config) -> None:
    """Checks of the sections the loop itself reads (train, ckpt, sample, log)."""
    t, c, s = config.train, config.ckpt, config.sample

    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    need(isinstance(t.num_steps, int) and t.num_steps >= 0,
         f"train.num_steps must be an int >= 0, got {t.num_steps!r}")
    need(isinstance(t.log_every, int) and t.log_every >= 1,
         f"train.log_every must be an int >= 1, got {t.log_every!r}")
    prof = tuple(t.get("profile_steps", ()) or ())
    need(len(prof) in (0, 2) and all(isinstance(p, int) for p in prof) and
         (not prof or 0 <= prof[0] < prof[1]),
         f"train.profile_steps must be () or (start, stop) with 0 <= start < stop, got {prof!r}")
    need(isinstance(c.every_steps, int) and c.every_steps >= 0,
         f"ckpt.every_steps must be an int >= 0 (0: only at the end), got {c.every_steps!r}")
    need(isinstance(c.keep, int) and c.keep >= 1, f"ckpt.keep must be an int >= 1, got {c.keep!r}")
    need(isinstance(s.every_steps, int) and s.every_steps >= 0,
         f"sample.every_steps must be an int >= 0 (0: off), got {s.every_steps!r}")
    if s.every_steps:
        steps = tuple(s.num_steps)
        need(steps and all(isinstance(n, int) and n >= 1 for n in steps),
             f"sample.num_steps must be a tuple of ints >= 1, got {s.num_steps!r}")
        need(isinstance(s.num_images, int) and s.num_images >= 1,
             f"sample.num_images must be an int >= 1, got {s.num_images!r}")
    need(config.model.kind in ("c2i", "t2i"),
         f"model.kind must be 'c2i' or 't2i', got {config.model.kind!r}")


# ----------------------------------------------------------------------------------------------
# process setup
def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when ``TIM_DISTRIBUTED=1`` (before any other jax call)."""
    if os.environ.get("TIM_DISTRIBUTED", "").strip().lower() not in ("1", "true", "yes"):
        return
    kw = {}
    if os.environ.get("TIM_NUM_PROCESSES"):
        kw["num_processes"] = int(os.environ["TIM_NUM_PROCESSES"])
    if os.environ.get("TIM_PROCESS_ID"):
        kw["process_id"] = int(os.environ["TIM_PROCESS_ID"])
    jax.distributed.initialize(**kw)


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


class _StopRequest:
    """SIGTERM (single process) or the JAX preemption sync point (multi-process) -> stop."""

    def __init__(self, manager):
        self._manager = manager
        self.signalled = False
        self._prev = None
        self._multi = jax.process_count() > 1
        # In multi-process runs the JAX preemption service owns SIGTERM (all processes must
        # agree on the step to stop at); a Python handler would replace its notifier.
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True

    def __call__(self, step: int) -> bool:
        if self.signalled:
            return True
        return self._multi and self._manager.reached_preemption(step)

    def restore(self) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None


@jax.jit
def _track_nonfinite(tracker, finite, loss, grad_norm, step):
    """Device-side record of the first non-finite step: (step or -1, loss, grad_norm)."""
    first = (tracker[0] < 0) & (finite < 0.5)
    return (jnp.where(first, jnp.int32(step), tracker[0]), jnp.where(first, loss, tracker[1]),
            jnp.where(first, grad_norm, tracker[2]))


def local_log_dir(workdir: str) -> str:
    """Where metrics, TensorBoard events, samples and profiles go: the workdir itself, or for a
    remote workdir (``gs://bucket/run``) ``$TIM_LOCAL_LOGDIR/<run>`` (default
    ``/tmp/tim_jax_logs/<run>``) on the host, since those writers append to local files."""
    if "://" not in workdir:
        return workdir
    root = os.environ.get("TIM_LOCAL_LOGDIR", "/tmp/tim_jax_logs")
    return os.path.join(root, workdir.rstrip("/").rsplit("/", 1)[-1])


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records with step > last_step (a resumed run rewrites that future)."""
    import json

    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _sample_inputs(config, null_cond):
    """(cond, null_cond) for the sample hook, or None when it cannot sample (t2i: too few captions in a batch)."""
    n = int(config.sample.num_images)
    if config.model.kind == "c2i":
        k = int(config.model.num_classes)
        return np.arange(n, dtype=np.int32) % k, null_cond
    it = data.make_train_iterator(config, process_index=0, process_count=1)
    cond = next(it)["cond"]
    if len(cond) < n:
        log.warning("sample hook off: a batch has fewer than sample.num_images=%d captions", n)
        return None
    return cond[:n], null_cond


# ----------------------------------------------------------------------------------------------
# the run
@dataclasses.dataclass
class _Plan:
    """Everything decided before the first compile (see :func:`prepare`)."""

    config: Any
    workdir: str
    mesh: Any
    tx: Any
    abstract: Any          # TrainState of ShapeDtypeStructs with their target shardings
    graphdef: Any
    train_step: Callable
    host_iter: Any
    resume_step: Optional[int]
    null_cond: Any         # the null condition of label/caption dropout and CFG (tstep.null_cond)


def prepare(config, workdir: str, model_fn: Optional[Callable] = None) -> _Plan:
    """Validate ``config`` against the devices and ``workdir``; build (not compile) the step.

    Raises :class:`UsageError` naming the problem; compiles nothing and writes nothing.
    """
    try:
        validate_loop_config(config)
        mesh = sharding.make_mesh(config)
        sharding.check_batch_size(int(config.data.global_batch_size), mesh,
                                  int(config.optim.grad_accum_steps))
        tx, _ = optim.make_optimizer(config)
        abstract, shardings, graphdef = ts.abstract_train_state(config, mesh, model_fn=model_fn, tx=tx)
        # c2i: the extra label; t2i: the encoded empty prompt (data.null_caption)
        null_cond = tstep.null_cond(config, data.load_null_caption(config))
        step_fn = tstep.make_train_step(config, graphdef, mesh, shardings, tx=tx, null=null_cond)
        host_iter = data.make_train_iterator(config)
        resume_step = checkpointing.latest_step(workdir)
        if resume_step is not None and not config.ckpt.resume:
            raise UsageError(f"{workdir} already holds checkpoints (newest: step {resume_step}) and "
                             "ckpt.resume is False: use a new --workdir or --config.ckpt.resume=True")
        if resume_step is not None:
            with checkpointing.Checkpointer(workdir, read_only=True) as probe:
                probe.check_compatible(config, abstract)
    except UsageError:
        raise
    except ValueError as e:  # the builders' own config checks
        raise UsageError(str(e)) from None
    return _Plan(config, workdir, mesh, tx, abstract, graphdef, step_fn, host_iter, resume_step, null_cond)


def _make_sample_hook(plan: _Plan, writer) -> Optional[metrics.SampleHook]:
    config = plan.config
    if int(config.sample.every_steps) <= 0 or not len(config.ema.decays):
        return None
    inputs = _sample_inputs(config, plan.null_cond)
    if inputs is None:
        return None
    from tim_jax.models.functional import make_apply_fn

    m = config.model
    return metrics.SampleHook(
        make_apply_fn(plan.graphdef), tstep.make_objective_config(config).transport, config.sample,
        shape=(int(m.input_size), int(m.input_size), int(m.in_channels)),
        cond=inputs[0], null_cond=inputs[1], seed=int(config.seed),
        out_dir=os.path.join(local_log_dir(plan.workdir), "samples"), writer=writer,
        enabled=jax.process_index() == 0, mesh=plan.mesh)


def run(config, workdir: str, *, model_fn: Optional[Callable] = None, stream=None) -> int:
    """Train ``config`` in ``workdir`` (resuming from its newest checkpoint); returns an exit code.

    Raises :class:`UsageError` (a ValueError) for bad configuration, before compiling or
    writing anything, and :class:`NonFiniteError` when a step is not finite. ``model_fn``
    (``rngs -> nnx.Module``) replaces ``presets.build_model(config.model)``.
    """
    plan = prepare(config, workdir, model_fn)
    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as resources:
        ckpt = resources.enter_context(checkpointing.Checkpointer(
            workdir, every_steps=int(config.ckpt.every_steps), keep=int(config.ckpt.keep),
            keep_steps=tuple(config.ckpt.get("keep_steps", ()) or ()),
            async_save=bool(config.ckpt.async_save)))
        log_dir = local_log_dir(workdir)
        if is_main:
            (epath.Path(workdir) / "config.json").write_text(
                config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
        batch_sh = sharding.batch_sharding(plan.mesh)
        batches = data.DevicePrefetcher(plan.host_iter, lambda b: data.to_global(b, batch_sh),
                                        size=int(config.data.get("prefetch", 2)))
        t0 = time.perf_counter()
        if plan.resume_step is not None:
            start = plan.resume_step
            state = ckpt.restore(plan.abstract, data_iter=batches)
            if int(jax.device_get(state.step)) != start:
                raise RuntimeError(f"checkpoint {start} holds state.step={int(jax.device_get(state.step))}")
            log.info("resumed from %s at step %d (%.1fs)", ckpt.directory, start, time.perf_counter() - t0)
        else:
            start = 0
            state, _, _ = ts.create_train_state(config, plan.mesh, model_fn=model_fn, tx=plan.tx)
            log.info("initialised a new run in %s (%.1fs)", workdir, time.perf_counter() - t0)
        if is_main:
            _truncate_jsonl(os.path.join(log_dir, "metrics.jsonl"), start)
        writer = resources.enter_context(metrics.MetricWriter(
            log_dir, enabled=is_main, tensorboard=bool(config.log.tensorboard),
            jsonl=bool(config.log.jsonl), total_steps=int(config.train.num_steps), initial_step=start,
            purge_step=start + 1 if start else None, stream=stream))
        hook = _make_sample_hook(plan, writer)
        _train_loop(plan, state, start, batches, ckpt, writer, hook)
    return EXIT_OK


def _train_loop(plan: _Plan, state, start: int, batches, ckpt, writer, hook) -> None:
    """Steps ``start + 1 .. train.num_steps`` (see the module docstring for the sync points)."""
    config, workdir = plan.config, plan.workdir
    num_steps = int(config.train.num_steps)
    every = int(config.ckpt.every_steps)
    keep_steps = set(int(s) for s in (config.ckpt.get("keep_steps", ()) or ()))
    log_every = int(config.train.log_every)
    check_finite = bool(config.train.get("check_finite", True))
    prof = tuple(config.train.get("profile_steps", ()) or ())
    sleep_after_ckpt = float(os.environ.get("TIM_JAX_SLEEP_AFTER_CHECKPOINT", "0") or 0)
    first_ema = ts.ema_key(config.ema.decays[0]) if len(config.ema.decays) else None
    tracker = jax.device_put((np.int32(-1), np.float32(0.0), np.float32(0.0)),
                             sharding.replicated(plan.mesh))  # (first bad step, loss, grad norm)
    tput = metrics.Throughput(int(config.data.global_batch_size), start)
    pending: list[int] = []  # async saves not yet reported as committed

    def report_commits(block: bool = False):
        if not pending or (not block and ckpt.is_saving()):
            return
        ckpt.wait()
        for s in pending:
            writer.write_text(f"checkpoint committed: step {s}")
        pending.clear()

    def assert_finite():
        bad, loss, gnorm = (np.asarray(v) for v in jax.device_get(tracker))
        if int(bad) >= 0:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {int(bad)} (loss={float(loss)}, "
                f"grad_norm={float(gnorm)}); that update was not applied and training stopped. "
                f"Newest checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")

    if start >= num_steps:
        log.info("nothing to do: the newest checkpoint is step %d >= train.num_steps=%d", start, num_steps)
        return
    log.info("training steps %d -> %d: global batch %d on mesh %s", start, num_steps,
             int(config.data.global_batch_size), dict(plan.mesh.shape))
    stop = _StopRequest(ckpt.manager)
    tracing = False
    step = start
    t_loop = time.perf_counter()
    try:
        while step < num_steps:
            if prof and step == prof[0]:
                jax.profiler.start_trace(os.path.join(local_log_dir(workdir), "profile"))
                tracing = True
            state, step_metrics = plan.train_step(state, next(batches))
            step += 1
            if step == start + 1:  # the only sync off the log/save steps: compile time
                jax.block_until_ready(step_metrics)
                log.info("first step (compile + run) took %.1fs", time.perf_counter() - t_loop)
                if step % log_every and step != num_steps:
                    tput.reset(step)  # else this log reports the first step, compile included
            if check_finite:
                tracker = _track_nonfinite(tracker, step_metrics["finite"], step_metrics["loss"],
                                           step_metrics["grad_norm"], step)
            if tracing and step == prof[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            stopping = stop(step)
            periodic = (every > 0 and step % every == 0) or step in keep_steps
            save_now = periodic or stopping or step == num_steps
            log_now = step % log_every == 0 or step == num_steps or stopping
            if check_finite and (log_now or save_now):
                assert_finite()  # before anything is written for this step
            if log_now:
                scalars = metrics.fetch(step_metrics)
                scalars.pop("finite", None)
                scalars.update(tput(step))
                writer.write(step, scalars)
            if save_now:
                t_save = time.perf_counter()
                if ckpt.save(step, state, config=config, data_iter=batches, force=True):
                    pending.append(step)
                    log.info("checkpoint %d started (%.2fs blocking)", step, time.perf_counter() - t_save)
                if periodic and sleep_after_ckpt > 0:
                    report_commits(block=True)
                    time.sleep(sleep_after_ckpt)
                tput.reset(step)
            if hook is not None and hook.due(step):
                for path in hook(step, state.ema_params[first_ema]):
                    log.info("wrote %s", path)
                tput.reset(step)
            report_commits()
            if stopping:
                writer.write_text(f"stop requested (SIGTERM/preemption): saved step {step}, exiting")
                break
    finally:
        stop.restore()
        if tracing:
            jax.profiler.stop_trace()
        report_commits(block=True)


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (``python -m tim_jax.train`` / ``tim-train``). Returns the exit code.

    With ``argv=None`` (a real command line) the process first re-execs itself with the CPU
    allocator setting (:func:`tim_jax._allocator.maybe_reexec`) and exits with the code.
    """
    real_cli = argv is None
    if real_cli:
        _allocator.maybe_reexec()
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
