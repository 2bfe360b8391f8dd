"""Any-step sampler of Transition Models (the official ``TransitionSchedule.sample``).

From pure noise ``z`` at ``t = T_max`` to data at ``t = T_min`` over a decreasing time grid
``t_0 = T_max > t_1 > ... > t_N = T_min`` (uniform ``linspace`` by default, any ``N >= 1``, or a
custom schedule). Each step queries the network once and applies the transport's one-step
transition ``x_{t_k} -> x_{t_{k+1}}``:

  * ``mode="transition"``: F = F_theta(x, t_k, r = t_{k+1}), the average velocity over the step;
  * ``mode="diffusion"`` (the official 'ddiffusion'): F = F_theta(x, t_k, r = t_k), the
    instantaneous velocity, i.e. plain Euler on the probability-flow ODE.

Classifier-free guidance ``F = F_u + s (F_c - F_u)`` is applied only where ``s > 1`` and
``cfg_low * T_max < t_k < cfg_high * T_max`` (strict, as officially: with the defaults the first
step, t = T_max, is never guided). Guided steps evaluate the conditional and unconditional rows in
one network call on 2B rows; the other steps run B rows only (``lax.cond``).

Stochasticity (OT-FM only) is skipped on the first and the last step of the grid. For the
uniform grid in transition mode this is the official condition (t_k < T_max and t_{k+1} > T_min);
in diffusion mode the official code tests r = t_k instead of t_{k+1} and so also perturbs the last
step, which we do not.

The loop is a ``lax.scan`` over the steps inside one ``jax.jit``: one compilation per (step
count, network, transport, mode, dtype, guided-or-not); schedule values, cfg scale / window and
the stochasticity ratio are traced and do not recompile. The state ``x`` is kept in
``state_dtype`` (float32 default; float64 reproduces the official float64 state and needs jax x64);
the network is called with ``x`` cast to ``z.dtype`` and float32 times, its output is cast back to
``state_dtype`` for the transition. The time grid is computed in float64 on the host and stored
in float32 (the official grid is cast to the noise dtype the same way).
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.transports import Transport

__all__ = ["sample", "time_grid", "MODES"]

MODES = ("transition", "diffusion")
_MODE_ALIASES = {"ddiffusion": "diffusion"}  # the official spelling


def time_grid(transport: Transport, num_steps: int) -> np.ndarray:
    """The uniform grid ``linspace(T_max, T_min, num_steps + 1)``, computed in float64, as float32."""
    return np.linspace(transport.T_max, transport.T_min, num_steps + 1, dtype=np.float64).astype(
        np.float32
    )


def _is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _x64_enabled() -> bool:
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.dtype(jnp.float64)


def _validate_scalar(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """Check a concrete real scalar against [lo, hi] (or open ends); tracers pass unchecked."""
    if not _is_concrete(value):
        return
    v = np.asarray(value)
    if v.shape != () or not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    v = float(v)
    bad = (
        (lo is not None and (v <= lo if lo_open else v < lo))
        or (hi is not None and (v >= hi if hi_open else v > hi))
        or not np.isfinite(v)
    )
    if bad:
        lb = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
        ub = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb or '(-inf'}, {ub or 'inf)'}; got {v}")


def sample(
    apply_fn: Callable,
    params: Any,
    z: jax.Array,
    cond: Any,
    null_cond: Any,
    *,
    transport: Transport,
    num_steps: Optional[int] = None,
    cfg_scale: float = 1.0,
    cfg_low: float = 0.0,
    cfg_high: float = 1.0,
    stochasticity_ratio: float = 0.0,
    mode: str = "transition",
    schedule: Optional[Any] = None,
    rng: Optional[jax.Array] = None,
    return_trajectory: bool = False,
    state_dtype: Any = jnp.float32,
):
    """Generate samples from noise with a transition model.

    Args:
      apply_fn: ``apply_fn(params, x_t, t, r, cond) -> F`` (docs/design.md network contract): x_t
        (B, ...) in ``z.dtype``, t and r float32 (B,) already through ``transport.c_noise``.
        Static for jit: pass the same function object to reuse the compilation.
      params: the network parameters (any pytree).
      z: initial noise (B, ...) (NHWC images or any rank), floating; its dtype is the network
        input dtype.
      cond: per-row condition pytree with leading dim B (c2i labels (B,), t2i features (B, L, D)).
      null_cond: the unconditional condition, same structure, leaves broadcastable to ``cond``'s
        (e.g. a scalar null label); may be None when ``cfg_scale <= 1``.
      transport: the time parameterisation (``tim_jax.transports``).
      num_steps: number of steps N >= 1 on the uniform grid from T_max to T_min. With
        ``schedule`` it may be omitted (must equal ``len(schedule) - 1`` if given).
      cfg_scale: guidance scale s >= 0; guidance only where s > 1.
      cfg_low, cfg_high: guidance window as fractions of T_max, applied where
        ``cfg_low * T_max < t < cfg_high * T_max`` (strict); cfg_low < cfg_high.
      stochasticity_ratio: in [0, 1); > 0 adds the OT-FM stochastic term on every step except
        the first (t = T_max) and the last (next time = T_min). Needs ``rng`` and OT_FM.
      mode: "transition" (r = next time) or "diffusion" (r = t, Euler; 'ddiffusion' accepted).
      schedule: optional explicit strictly decreasing times (N+1,) in transport units, first
        = start time (noise), last = end time; replaces the uniform grid (stored as float32).
      rng: PRNG key, required when stochasticity_ratio > 0.
      return_trajectory: also return every state.
      state_dtype: dtype of the sampler state (float32; float64 needs jax x64 enabled).

    Returns:
      the final state (B, ...) in ``state_dtype``, or with ``return_trajectory``
      ``(final, trajectory)`` with trajectory (N + 1, B, ...) starting with ``z``.
    """
    # ---- validation (before anything is traced or compiled) ---------------------------------
    if not isinstance(transport, Transport):
        raise ValueError(f"transport must be a tim_jax.transports.Transport, got {type(transport)}")
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    if num_steps is not None and (
        isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1
    ):
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    t_steps = _resolve_schedule(transport, num_steps, schedule)

    _validate_scalar("cfg_scale", cfg_scale, lo=0.0)
    _validate_scalar("cfg_low", cfg_low)
    _validate_scalar("cfg_high", cfg_high)
    if _is_concrete(cfg_low) and _is_concrete(cfg_high) and not float(cfg_low) < float(cfg_high):
        raise ValueError(f"cfg_low must be < cfg_high, got cfg_low={cfg_low}, cfg_high={cfg_high}")
    cfg_possible = not _is_concrete(cfg_scale) or float(cfg_scale) > 1.0
    if cfg_possible and null_cond is None:
        raise ValueError("null_cond is required when cfg_scale > 1 (classifier-free guidance)")
    use_cfg = cfg_possible and null_cond is not None

    _validate_scalar("stochasticity_ratio", stochasticity_ratio, lo=0.0, hi=1.0, hi_open=True)
    stochastic = not _is_concrete(stochasticity_ratio) or float(stochasticity_ratio) > 0.0
    if stochastic:
        if rng is None:
            raise ValueError("rng is required when stochasticity_ratio > 0")
        if not transport.supports_stochasticity:
            raise ValueError(
                f"stochasticity_ratio > 0 is only supported by transports "
                f"{['OT_FM']}, not {transport.name}"
            )

    z = jnp.asarray(z)
    if z.ndim < 1 or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"z must be a floating array (B, ...), got {z.dtype} {z.shape}")
    try:
        state_dtype = jnp.dtype(state_dtype)
    except TypeError as e:
        raise ValueError(f"state_dtype must be a floating dtype, got {state_dtype!r}") from e
    if not jnp.issubdtype(state_dtype, jnp.floating):
        raise ValueError(f"state_dtype must be a floating dtype (float32, float64), got {state_dtype}")
    if state_dtype == jnp.float64 and not _x64_enabled():
        raise ValueError(
            "state_dtype=float64 needs 64-bit jax: enable it with "
            "jax.config.update('jax_enable_x64', True) or the jax.enable_x64(True) context"
        )

    # ---- traced hyper-parameters (no recompilation when they change) ------------------------
    f32 = jnp.float32
    T_max = float(transport.T_max)
    if _is_concrete(cfg_low) and _is_concrete(cfg_high):
        # the window bounds are products in float64 on the host, compared in float32 (official)
        cfg_lo = jnp.asarray(np.float32(float(cfg_low) * T_max))
        cfg_hi = jnp.asarray(np.float32(float(cfg_high) * T_max))
    else:
        cfg_lo = (jnp.asarray(cfg_low) * T_max).astype(f32)
        cfg_hi = (jnp.asarray(cfg_high) * T_max).astype(f32)
    return _sample_core(
        apply_fn,
        params,
        z,
        cond,
        null_cond if use_cfg else None,
        t_steps,
        jnp.asarray(cfg_scale, f32),
        cfg_lo,
        cfg_hi,
        jnp.asarray(stochasticity_ratio, f32),
        rng if stochastic else None,
        transport=transport,
        mode=mode,
        use_cfg=use_cfg,
        stochastic=stochastic,
        return_trajectory=bool(return_trajectory),
        state_dtype=state_dtype,
    )


def _resolve_schedule(transport: Transport, num_steps, schedule) -> jax.Array:
    """The float32 time grid (N+1,), validated."""
    if schedule is None:
        if num_steps is None:
            raise ValueError("give num_steps (an integer >= 1) or an explicit schedule")
        return jnp.asarray(time_grid(transport, int(num_steps)))
    if not _is_concrete(schedule):
        sched = jnp.asarray(schedule)
        if sched.ndim != 1 or sched.shape[0] < 2:
            raise ValueError(f"schedule must be 1-D with >= 2 times, got shape {sched.shape}")
        if num_steps is not None and sched.shape[0] != num_steps + 1:
            raise ValueError(f"schedule has {sched.shape[0]} times but num_steps={num_steps}")
        return sched.astype(jnp.float32)
    sched = np.asarray(schedule, dtype=np.float64)
    if sched.ndim != 1 or sched.shape[0] < 2:
        raise ValueError(f"schedule must be 1-D with >= 2 times, got shape {sched.shape}")
    if num_steps is not None and sched.shape[0] != num_steps + 1:
        raise ValueError(
            f"schedule has {sched.shape[0]} times, so num_steps must be {sched.shape[0] - 1} "
            f"(or None), got {num_steps}"
        )
    sched32 = sched.astype(np.float32)
    if not np.all(np.isfinite(sched)) or not np.all(np.diff(sched32) < 0):
        raise ValueError(f"schedule must be finite and strictly decreasing (in float32), got {sched}")
    return jnp.asarray(sched32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn", "transport", "mode", "use_cfg", "stochastic", "return_trajectory", "state_dtype",
    ),
)
def _sample_core(
    apply_fn,
    params,
    z,
    cond,
    null_cond,
    t_steps,
    cfg_scale,
    cfg_lo,
    cfg_hi,
    s_ratio,
    rng,
    *,
    transport,
    mode,
    use_cfg,
    stochastic,
    return_trajectory,
    state_dtype,
):
    """The jitted sampling loop; arguments validated by :func:`sample`."""
    net_dtype = z.dtype
    batch = z.shape[0]
    num_steps = t_steps.shape[0] - 1

    def net(x_in, t_net, r_net, c):
        rows = x_in.shape[0]
        t_in = jnp.full((rows,), t_net, jnp.float32)
        r_in = jnp.full((rows,), r_net, jnp.float32)
        return apply_fn(params, x_in, t_in, r_in, c)

    if use_cfg:
        both_cond = jax.tree.map(
            lambda c, n: jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)], axis=0),
            cond,
            null_cond,
        )

    def velocity(x_in, t_cur, r_cur):
        t_net = transport.c_noise(t_cur).astype(jnp.float32)
        r_net = transport.c_noise(r_cur).astype(jnp.float32)
        if not use_cfg:
            return net(x_in, t_net, r_net, cond)

        def guided(x_in):
            F = net(jnp.concatenate([x_in, x_in], axis=0), t_net, r_net, both_cond)
            F_c, F_u = F[:batch], F[batch:]
            return (F_u + cfg_scale.astype(F.dtype) * (F_c - F_u)).astype(F.dtype)

        def plain(x_in):
            return net(x_in, t_net, r_net, cond)

        apply_cfg = (cfg_scale > 1.0) & (t_cur > cfg_lo) & (t_cur < cfg_hi)
        return jax.lax.cond(apply_cfg, guided, plain, x_in)

    def step(x_cur, xs):
        i, t_cur, t_next, key = xs
        r_cur = t_next if mode == "transition" else t_cur
        F = velocity(x_cur.astype(net_dtype), t_cur, r_cur).astype(state_dtype)
        t_s, t_n = t_cur.astype(state_dtype), t_next.astype(state_dtype)
        if stochastic:
            # never on the first step (from T_max) nor the last one (to T_min)
            on = (i > 0) & (i < num_steps - 1)
            s = jnp.where(on, s_ratio, jnp.float32(0.0)).astype(state_dtype)
            noise = jax.random.normal(key, x_cur.shape, state_dtype)
            x_next = transport.transition(x_cur, t_s, t_n, F, s_ratio=s, noise=noise)
        else:
            x_next = transport.transition(x_cur, t_s, t_n, F)
        x_next = x_next.astype(state_dtype)
        return x_next, (x_next if return_trajectory else None)

    keys = jax.random.split(rng, num_steps) if stochastic else None
    x0 = z.astype(state_dtype)
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    x_final, traj = jax.lax.scan(step, x0, (steps, t_steps[:-1], t_steps[1:], keys))
    if return_trajectory:
        return x_final, jnp.concatenate([x0[None], traj], axis=0)
    return x_final
