"""The TiM training loop: ``run(config, workdir)`` builds the mesh, state, data and
checkpointer (:func:`prepare`), resumes from the newest checkpoint, and steps to
``train.num_steps`` with metrics, sample grids and Orbax checkpoints. The command line is
:mod:`tim_jax.training.cli` (``python -m tim_jax.train``, whose docstring describes the run
directory and exit codes).

The loop never syncs with the host on ordinary steps: metrics stay on device and are fetched at
log steps, before a checkpoint and at the end (and once after the first step, to time the
compilation). Async checkpoint commits are reported as ``checkpoint committed: step N``.
A non-finite loss or grad norm (the step itself refuses such an update) is tracked on device;
the loop stops at the next sync point naming the first bad step (:class:`NonFiniteError`) and
writes no checkpoint after it, so the newest checkpoint is the last good state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from tim_jax import atomic_files
from tim_jax.training import checkpointing
from tim_jax.data import pipeline as data
from tim_jax.training import metrics, repa
from tim_jax.training import optimizer as optim
from tim_jax.training import sharding
from tim_jax.training import state as ts
from tim_jax.training import step as tstep

__all__ = ["run", "prepare", "UsageError", "NonFiniteError", "local_log_dir",
           "validate_loop_config"]

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE = 0, 2, 3

log = logging.getLogger("tim_jax.train")



class UsageError(ValueError):
    """Bad command line or configuration (exit code 2)."""


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient norm (exit code 3)."""


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
        atomic_files.write_text(path, "".join(keep))


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
        repa_encoder = repa.load_repa_encoder(config)
        step_fn = tstep.make_train_step(config, graphdef, mesh, shardings, tx=tx, null=null_cond,
                                        repa=repa_encoder)
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
