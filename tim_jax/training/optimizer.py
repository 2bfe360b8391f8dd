"""Optimizer of the TiM train step: global-norm clipping + AdamW with a learning-rate schedule.

Official recipe (WZDTHU/TiM trainers): AdamW(b1 0.9, b2 0.95, eps 1e-6, weight decay 0.01 on
every parameter), lr 1e-4 quoted at batch 256 and scaled linearly with the global batch
(``scale_lr``), constant, gradient-norm clipping at 1.0.

Public API
----------
``effective_lr(config)``     -> float: optim.lr, times global_batch_size / base_batch_size when
                                optim.scale_lr
``make_schedule(config)``    -> optax schedule: step (int, the optimizer step = TrainState.step)
                                -> lr (float32). "constant" (optionally with a linear warm-up from
                                0 over warmup_steps) | "warmup_cosine" (linear warm-up to the peak,
                                cosine decay to end_lr_ratio * peak at decay_steps)
``make_optimizer(config)``   -> (tx, schedule): chain(clip_by_global_norm(grad_clip),
                                adamw(schedule, ...)). With the XLA:CPU layouts
                                (``tim_jax.models.cpu_layouts``) the clip and AdamW are the
                                two functions below (a ``SkipsNonFinite``); elsewhere optax's
``clip_by_global_norm(max_norm)`` -> optax's clip rule as one scalar factor; it takes the norm
                                the caller already has: ``tx.update(..., grad_norm=norm)``
``adamw_skipping_nonfinite(...)`` -> ``optax.adamw`` (same state, same arithmetic) that takes
                                ``tx.update(..., finite=flag)``: exactly no update and an
                                unchanged state when the flag is False, without a ``lax.cond``
``SkipsNonFinite``           -> the marker type of such a transformation (what make_optimizer
                                returns): the train step passes ``finite`` instead of a cond

Gradient accumulation is NOT done here (no ``optax.MultiSteps``): the train step averages the
micro-batch gradients itself inside one jit, so one optimizer update = one TrainState.step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_cosine")

__all__ = ["SCHEDULES", "effective_lr", "make_schedule", "make_optimizer",
           "clip_by_global_norm", "adamw_skipping_nonfinite", "SkipsNonFinite"]


def effective_lr(config: Any) -> float:
    """Peak learning rate: ``optim.lr`` scaled by ``data.global_batch_size / optim.base_batch_size``
    when ``optim.scale_lr`` (the official ``scale_lr``)."""
    op = config.optim
    if not op.lr > 0:
        raise ValueError(f"optim.lr must be > 0, got {op.lr}")
    if not op.scale_lr:
        return float(op.lr)
    if not op.base_batch_size > 0:
        raise ValueError(f"optim.base_batch_size must be > 0, got {op.base_batch_size}")
    return float(op.lr) * config.data.global_batch_size / op.base_batch_size


def make_schedule(config: Any) -> Callable[[Any], Any]:
    """The lr schedule of ``config.optim`` (see the module docstring); values are float32."""
    op = config.optim
    peak = effective_lr(config)
    warmup = int(op.warmup_steps)
    if warmup < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {op.warmup_steps}")
    if op.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    if op.schedule == "warmup_cosine":
        decay = int(op.decay_steps) if int(op.decay_steps) > 0 else int(config.train.num_steps)
        if decay <= warmup:
            raise ValueError(f"optim.decay_steps (or train.num_steps when -1) = {decay} must exceed "
                             f"optim.warmup_steps = {warmup} for schedule 'warmup_cosine'")
        if not 0.0 <= op.end_lr_ratio <= 1.0:
            raise ValueError(f"optim.end_lr_ratio must be in [0, 1], got {op.end_lr_ratio}")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=decay,
            end_value=peak * float(op.end_lr_ratio))
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {op.schedule!r}")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping as ``optax.clip_by_global_norm(max_norm)`` (same empty state, same
    rule), shaped for a memory-bound update on XLA:CPU: the norm can come from the caller as
    the extra argument ``grad_norm`` (the train step has it), and the scaling is one scalar
    factor ``min(1, max_norm / norm)`` (as torch's ``clip_grad_norm_``; within 1 ulp of
    optax's per-element division). Without ``grad_norm`` it computes the norm itself."""
    max_norm = float(max_norm)

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else jnp.asarray(grad_norm)
        if norm.ndim != 0:
            raise ValueError(f"grad_norm must be a scalar, got shape {norm.shape}")
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


class SkipsNonFinite(optax.GradientTransformationExtraArgs):
    """A transformation whose ``update(..., finite=flag)`` returns exactly zero updates and the
    state unchanged when ``flag`` is False (a bool scalar). The train step then applies the
    update unconditionally (with the EMA and step count masked the same way) instead of under
    ``lax.cond`` (slower on XLA:CPU; ``docs/cpu-performance.md``)."""


def adamw_skipping_nonfinite(learning_rate: Callable[[Any], Any], *, b1: float, b2: float,
                             eps: float, weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mu_dtype=float32)``
    (the same state tree: ScaleByAdamState, EmptyState, ScaleByScheduleState; the same
    arithmetic, so the same updates when finite) whose ``update`` takes the extra argument
    ``finite``. When it is False the gradients are replaced by 0 and every coefficient is
    switched so that the step is an exact no-op within the same elementwise passes: the
    moments as ``1 * m + 0 * 0``, the counts not incremented, the update ``0 * u`` (u stays
    finite: the bias correction uses ``count + 1`` even then). ``params`` is required."""
    b1, b2, eps, weight_decay = float(b1), float(b2), float(eps), float(weight_decay)
    reference = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                            mu_dtype=jnp.float32)

    def update_fn(updates, state, params=None, *, finite=True, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("adamw_skipping_nonfinite needs params (weight decay)")
        adam, decay_state, schedule_state = state
        ok = jnp.asarray(finite, bool)
        coef = lambda value, skip: jnp.where(ok, value, skip).astype(jnp.float32)  # noqa: E731
        c1, a1, c2, a2 = coef(1.0 - b1, 0.0), coef(b1, 1.0), coef(1.0 - b2, 0.0), coef(b2, 1.0)
        g = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        mu = jax.tree.map(lambda g, m: c1 * g + a1 * m, g, adam.mu)            # as optax
        nu = jax.tree.map(lambda g, v: c2 * (g ** 2) + a2 * v, g, adam.nu)
        count = optax.safe_increment(adam.count)        # the bias correction's count, >= 1
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        step_size = jnp.where(ok, -learning_rate(schedule_state.count), 0.0)
        new = jax.tree.map(
            lambda m, v, p: jnp.asarray(step_size, m.dtype) * (
                m / (jnp.sqrt(v) + eps) + weight_decay * p), mu_hat, nu_hat, params)
        keep = lambda inc, old: jnp.where(ok, inc, old)  # noqa: E731
        new_state = (optax.ScaleByAdamState(count=keep(count, adam.count), mu=mu,
                                            nu=optax.tree.cast_like(nu, adam.nu)),
                     decay_state,
                     optax.ScaleByScheduleState(count=keep(
                         optax.safe_increment(schedule_state.count), schedule_state.count)))
        return new, new_state

    return optax.GradientTransformationExtraArgs(reference.init, update_fn)


def make_optimizer(config: Any, *, cpu_variant: bool | None = None
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """``(tx, schedule)``: ``chain(clip_by_global_norm(optim.grad_clip), adamw(schedule))``.

    With the XLA:CPU layouts (``cpu_variant=None``: ``cpu_layouts.cpu_layouts()``) these are
    :func:`clip_by_global_norm` and :func:`adamw_skipping_nonfinite`, and ``tx`` is a
    :class:`SkipsNonFinite` (``tx.update(..., grad_norm=norm, finite=flag)``); elsewhere they
    are ``optax.clip_by_global_norm`` and ``optax.adamw`` (the same state tree and updates),
    and the train step guards a non-finite step with ``lax.cond``.

    The clip is left out when ``optim.grad_clip <= 0``. Weight decay applies to every parameter,
    as officially (torch AdamW over ``model.parameters()``). ``tx`` is a static object: the
    train state holds only its state (``tx.init(params)``).
    """
    op = config.optim
    for name in ("b1", "b2"):
        if not 0.0 <= op[name] < 1.0:
            raise ValueError(f"optim.{name} must be in [0, 1), got {op[name]}")
    if not op.eps > 0:
        raise ValueError(f"optim.eps must be > 0, got {op.eps}")
    if op.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {op.weight_decay}")
    schedule = make_schedule(config)
    if cpu_variant is None:
        from tim_jax.models.cpu_layouts import cpu_layouts

        cpu_variant = cpu_layouts()
    hp = dict(b1=float(op.b1), b2=float(op.b2), eps=float(op.eps),
              weight_decay=float(op.weight_decay))
    if cpu_variant:
        adamw, clip = adamw_skipping_nonfinite(schedule, **hp), clip_by_global_norm
    else:
        adamw = optax.adamw(schedule, mu_dtype=jnp.float32, **hp)
        clip = optax.clip_by_global_norm
    tx = optax.chain(clip(float(op.grad_clip)), adamw) if op.grad_clip > 0 else adamw
    return (SkipsNonFinite(tx.init, tx.update) if cpu_variant else tx), schedule
