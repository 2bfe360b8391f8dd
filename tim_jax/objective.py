"""The TiM transition training objective: (t, r) sampling, dF/dt (DDE | JVP), loss and metrics.

For a batch of clean data x and noise z, rows are drawn at times r <= t and the network
F(x_t, t, r) is regressed onto the transition target of the transport (OT-FM:
``v_t - (t - r) dF/dt`` with the conditional velocity ``v_t = z - x``), where dF/dt is the total
time derivative of the network's own output along the conditional path with r fixed, under
stop-gradient. Numerics follow the official ``TransitionSchedule.__call__`` (WZDTHU/TiM); the
deliberate differences are listed in :class:`ObjectiveConfig`.

Row layout of a batch of B (static counts, from the static batch size, as officially):
``[0, n_diffusion)`` have r = t (flow matching), ``[B - n_consistency, B)`` have r = T_min (one-step
maps) and the rows in between keep a generic r < t (transitions). The derivative is computed only
for rows ``[n_diffusion, B)``; for r = t rows it is 0 (the target multiplies it by zero anyway).

Network contract (docs/design.md): ``apply_fn(params, x_t, c_noise(t), c_noise(r), cond,
return_proj=False)``, NHWC, returns F or ``(F, h_proj)``. All loss arithmetic runs in float32 (in
float64 when the data are float64 under jax x64, which the analytic tests use).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from tim_jax import time_weighting
from tim_jax.autodiff import forward_mode
from tim_jax.transports import Transport, expand_like, make_transport

Array = jax.Array
PyTree = Any
ApplyFn = Callable[..., Any]

DERIVATIVES = ("dde", "jvp")
COSINE_EPS = 1e-8        # torch.nn.functional.cosine_similarity default eps
_NAN_TO_NUM = dict(nan=0.0, posinf=1e5, neginf=-1e5)   # as the official loss

__all__ = [
    "ObjectiveConfig", "row_counts", "sample_t_and_r", "drop_cond", "interpolate",
    "total_derivative", "guidance_predictions", "transition_target", "cosine_similarity",
    "per_sample_loss", "repa_loss", "transition_loss", "tim_loss",
]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static settings of the TiM objective (frozen and hashable: a static ``jax.jit`` argument).

    transport: a :class:`~tim_jax.transports.Transport` or its name (built with defaults).
      The guidance-enhanced target is configured ON THE TRANSPORT, as officially
      (``enhance_target``, ``w_gt``, ``w_cond``, ``w_start``, ``w_end``; e.g. the C2I ``_mg``
      recipe is ``make_transport("OT_FM", P_mean=-0.4, enhance_target=True, w_cond=0.75,
      w_start=0.3, w_end=0.8)``); it then needs ``ema_params`` in :func:`tim_loss`.
    diffusion_ratio, consistency_ratio: fractions of rows with r = t and with r = T_min.
    derivative: "dde" (central difference, step ``dde_delta`` in raw t) or "jvp" (forward mode).
    weight_type, weight_warp, weight_base: the interval weight (:mod:`tim_jax.time_weighting`).
    use_dir_loss: add the channel-wise directional (1 - cosine) term to the per-row loss.
    adaptive_eps: the adaptive weight is ``1 / (stop_grad(loss_i) + adaptive_eps)`` (official
      ``10e-6``).
    repa_coeff: weight of the REPA projection loss (0 disables it and the projector output).
    label_dropout: probability that a row's condition is replaced by ``null_cond``.

    Differences from the official code, all no-ops for the shipped OT-FM configs: the EMA
    guidance forward passes ``c_noise(t)`` once (officially twice, a bug for transports whose
    c_noise is not the identity), and when the two ratios' rounded counts overlap (possible only
    when they sum to 1) the diffusion rows win instead of being silently overwritten.
    """

    transport: Union[Transport, str] = "OT_FM"
    diffusion_ratio: float = 0.5
    consistency_ratio: float = 0.1
    derivative: str = "dde"
    dde_delta: float = 0.005
    weight_type: str = "sqrt"
    weight_warp: str = "tangent"
    weight_base: str = "t_and_r"
    use_dir_loss: bool = True
    adaptive_eps: float = 1e-5
    repa_coeff: float = 1.0
    label_dropout: float = 0.1

    def __post_init__(self):
        if isinstance(self.transport, str):
            object.__setattr__(self, "transport", make_transport(self.transport))
        elif not isinstance(self.transport, Transport):
            raise ValueError(f"transport must be a Transport or a transport name, got "
                             f"{type(self.transport).__name__}")
        for name in ("diffusion_ratio", "consistency_ratio", "label_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.diffusion_ratio + self.consistency_ratio > 1.0:
            raise ValueError(f"diffusion_ratio + consistency_ratio must be <= 1, got "
                             f"{self.diffusion_ratio} + {self.consistency_ratio}")
        if self.derivative not in DERIVATIVES:
            raise ValueError(f"derivative must be one of {DERIVATIVES}, got {self.derivative!r}")
        if not self.dde_delta > 0:
            raise ValueError(f"dde_delta must be > 0, got {self.dde_delta}")
        if not self.adaptive_eps > 0:
            raise ValueError(f"adaptive_eps must be > 0, got {self.adaptive_eps}")
        if not self.repa_coeff >= 0:
            raise ValueError(f"repa_coeff must be >= 0, got {self.repa_coeff}")
        for name, allowed in (("weight_type", time_weighting.WEIGHT_TYPES),
                              ("weight_warp", time_weighting.WARPS),
                              ("weight_base", time_weighting.BASES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got "
                                 f"{getattr(self, name)!r}")

    @property
    def enhance_target(self) -> bool:
        """Whether the target's velocity is guidance-enhanced (a property of the transport)."""
        return bool(self.transport.enhance_target)


# ----------------------------------------------------------------------------------------------
# small pytree helpers
def _ftype(x: Array):
    """The loss dtype for data ``x``: at least float32 (bf16 -> f32, f64 stays f64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _rows(tree: PyTree, start: int) -> PyTree:
    return jax.tree.map(lambda a: a[start:], tree)


def _stack(*trees: PyTree) -> PyTree:
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *trees)


def _null_like(cond: PyTree, null_cond: PyTree) -> PyTree:
    """``null_cond`` broadcast per leaf to the shapes (and dtypes) of ``cond``."""
    return jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape),
                        cond, null_cond)


def _call(apply_fn: ApplyFn, params, x_t, t, r, cond, transport: Transport, dtype, proj=False):
    """One network evaluation at raw times (t, r): c_noise first, output cast to ``dtype``."""
    out = apply_fn(params, x_t, transport.c_noise(t), transport.c_noise(r), cond,
                   return_proj=proj)
    if proj:
        return out[0].astype(dtype), out[1].astype(dtype)
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# building blocks
def row_counts(batch_size: int, config: ObjectiveConfig) -> tuple[int, int]:
    """Static ``(n_diffusion, n_consistency)`` for a batch size (Python ``round``, as official)."""
    n_diffusion = round(config.diffusion_ratio * batch_size)
    n_consistency = min(round(config.consistency_ratio * batch_size), batch_size - n_diffusion)
    return n_diffusion, n_consistency


def sample_t_and_r(rng: Array, batch_size: int, config: ObjectiveConfig, dtype=jnp.float32):
    """Training times ``(t, r)``, each (B,): t = max and r = min of two ``transport.sample_t``
    draws, then r = t on the first n_diffusion rows and r = T_min on the last n_consistency."""
    transport = config.transport
    t1, t2 = (transport.sample_t(k, (batch_size,), dtype) for k in jax.random.split(rng))
    t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
    n_diffusion, n_consistency = row_counts(batch_size, config)
    row = jnp.arange(batch_size)
    r = jnp.where(row < n_diffusion, t, r)
    r = jnp.where(row >= batch_size - n_consistency, jnp.asarray(transport.T_min, dtype), r)
    return t, r


def drop_cond(rng: Array, cond: PyTree, null_cond: PyTree, rate: float) -> tuple[PyTree, Array]:
    """Replace each row's condition by ``null_cond`` with probability ``rate``.

    ``cond`` leaves have leading dim B; ``null_cond`` has the same tree structure with leaves
    broadcastable to one row (e.g. ``jnp.int32(num_classes)`` or caption features (L, D)).
    Returns ``(dropped_cond, drop_mask (B,) bool)``.
    """
    batch_size = jax.tree.leaves(cond)[0].shape[0]
    drop = jax.random.uniform(rng, (batch_size,)) < rate
    pick = lambda c, n: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)),
                                  jnp.asarray(n, c.dtype), c)
    return jax.tree.map(pick, cond, null_cond), drop


def interpolate(transport: Transport, x: Array, noise: Array, t: Array) -> tuple[Array, Array]:
    """The conditional path and its velocity at t (B,): ``(x_t, v_t)``, each shaped like x."""
    alpha, sigma, d_alpha, d_sigma = (expand_like(a, x) for a in transport.interpolant(t))
    return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise


def total_derivative(apply_fn: ApplyFn, params, x: Array, noise: Array, t: Array, r: Array,
                     cond: PyTree, *, transport: Transport, method: str = "dde",
                     delta: float = 0.005) -> Array:
    """dF(x_t, t, r)/dt along the conditional path x_t = alpha_t x + sigma_t noise, r fixed.

    Shapes: x, noise (B, H, W, C); t, r (B,) raw times; returns (B, H, W, C) in the loss dtype,
    under stop-gradient (no gradient reaches ``params``).
      "dde": ``(F(x_{t+d}, t+d, r) - F(x_{t-d}, t-d, r)) / (2 d)`` with x_{t+-d} built from the same
        x, noise and cond (t +- d is not clamped, as officially); both points in ONE apply_fn call
        on 2B stacked rows, without the projector.
      "jvp": ``jax.jvp`` of ``(x_t, t, r) -> F(x_t, c_noise(t), c_noise(r))`` with tangents
        (v_t, 1, 0): the chain rule through c_noise is part of the differentiated function.
    """
    dtype = _ftype(x)
    params = jax.lax.stop_gradient(params)
    x, noise, t, r = x.astype(dtype), noise.astype(dtype), t.astype(dtype), r.astype(dtype)
    if method == "dde":
        t_pm = jnp.concatenate([t + delta, t - delta])
        x_pm, _ = interpolate(transport, jnp.concatenate([x, x]), jnp.concatenate([noise, noise]),
                              t_pm)
        F = _call(apply_fn, params, x_pm, t_pm, jnp.concatenate([r, r]), _stack(cond, cond),
                  transport, dtype)
        F_plus, F_minus = jnp.split(F, 2)
        dF = (F_plus - F_minus) / (2.0 * delta)
    elif method == "jvp":
        x_t, v_t = interpolate(transport, x, noise, t)
        fn = lambda xt, tt, rr: _call(apply_fn, params, xt, tt, rr, cond, transport, dtype)
        with forward_mode():  # the network's custom-VJP ops become plain autodiff
            _, dF = jax.jvp(fn, (x_t, t, r), (v_t, jnp.ones_like(t), jnp.zeros_like(r)))
    else:
        raise ValueError(f"method must be one of {DERIVATIVES}, got {method!r}")
    return jax.lax.stop_gradient(dF)


def guidance_predictions(apply_fn: ApplyFn, ema_params, x_t: Array, t: Array, cond: PyTree,
                         null_cond: PyTree, *, transport: Transport):
    """``(F_cond, F_uncond)``: the (EMA) network at r = t with ``cond`` and with ``null_cond``.

    One apply_fn call on the 2B stacked rows (B rows, unconditional only, when the transport's
    ``w_cond`` is 0; F_cond is then None, i.e. 0 in the target). Under stop-gradient.
    """
    dtype = _ftype(x_t)
    ema_params = jax.lax.stop_gradient(ema_params)
    null = _null_like(cond, null_cond)
    if transport.w_cond == 0:
        F_uncond = _call(apply_fn, ema_params, x_t, t, t, null, transport, dtype)
        return None, jax.lax.stop_gradient(F_uncond)
    tt = jnp.concatenate([t, t])
    F = _call(apply_fn, ema_params, jnp.concatenate([x_t, x_t]), tt, tt, _stack(cond, null),
              transport, dtype)
    return tuple(jax.lax.stop_gradient(f) for f in jnp.split(F, 2))


def transition_target(apply_fn: ApplyFn, params, x: Array, noise: Array, t: Array, r: Array,
                      cond: PyTree, *, config: ObjectiveConfig, n_diffusion: int,
                      F_cond: Optional[Array] = None, F_uncond: Optional[Array] = None) -> Array:
    """The regression target (B, H, W, C) under stop-gradient; rows [0, n_diffusion) have r = t
    and skip the derivative. ``F_cond`` / ``F_uncond`` enable the guidance-enhanced velocity."""
    dtype = _ftype(x)
    x, noise, t, r = x.astype(dtype), noise.astype(dtype), t.astype(dtype), r.astype(dtype)
    x_t, v_t = interpolate(config.transport, x, noise, t)
    dF = jnp.zeros_like(x)
    if n_diffusion < x.shape[0]:
        s = n_diffusion
        dF_rows = total_derivative(apply_fn, params, x[s:], noise[s:], t[s:], r[s:],
                                   _rows(cond, s), transport=config.transport,
                                   method=config.derivative, delta=config.dde_delta)
        dF = dF.at[s:].set(dF_rows)
    target = config.transport.target(x_t, v_t, x, noise, t, r, dF, F_cond, F_uncond)
    return jax.lax.stop_gradient(target)


def cosine_similarity(a: Array, b: Array, axis: int = -1, eps: float = COSINE_EPS) -> Array:
    """torch's cosine similarity: ``sum(a / max(|a|, eps) * b / max(|b|, eps))`` along ``axis``."""
    def unit(v):
        sq = jnp.sum(v * v, axis=axis, keepdims=True)
        big = sq > eps * eps        # double-where: finite gradients for all-zero vectors
        norm = jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), eps)
        return v / norm
    return jnp.sum(unit(a) * unit(b), axis=axis)


def per_sample_loss(F: Array, target: Array, *, use_dir_loss: bool = True) -> dict[str, Array]:
    """Per-row losses, each (B,): ``mse`` (mean over H, W, C), ``dir`` (mean over H, W of
    1 - cosine over channels, the LAST axis; zeros when off) and ``loss = mse + dir``, with
    NaN -> 0 and +-inf -> +-1e5 as officially; ``finite`` flags rows whose raw MSE was finite."""
    axes = tuple(range(1, F.ndim))
    err = F - target
    raw_mse = jnp.mean(err * err, axis=axes)
    mse = jnp.nan_to_num(raw_mse, **_NAN_TO_NUM)
    if use_dir_loss:
        cos = cosine_similarity(F, target, axis=-1)
        direction = jnp.nan_to_num(jnp.mean(1.0 - cos, axis=axes[:-1]), **_NAN_TO_NUM)
    else:
        direction = jnp.zeros_like(mse)
    return {"mse": mse, "dir": direction, "loss": mse + direction,
            "finite": jnp.isfinite(raw_mse)}


def repa_loss(h_proj: Array, repa_target: Array) -> Array:
    """REPA: mean over rows and tokens of ``1 - cosine(h_proj, repa_target)`` (last axis)."""
    h_proj = h_proj.astype(_ftype(h_proj))
    per_row = jnp.mean(1.0 - cosine_similarity(h_proj, repa_target.astype(h_proj.dtype)),
                       axis=tuple(range(1, h_proj.ndim - 1)))
    return jnp.mean(jnp.nan_to_num(per_row, **_NAN_TO_NUM))


# ----------------------------------------------------------------------------------------------
# the loss
def transition_loss(apply_fn: ApplyFn, params, x: Array, noise: Array, t: Array, r: Array,
                    cond: PyTree, *, config: ObjectiveConfig, n_diffusion: int,
                    ema_params=None, ema_cond: PyTree = None, null_cond: PyTree = None,
                    repa_target: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """The deterministic core of :func:`tim_loss` for given noise, times and conditions.

    x, noise (B, H, W, C); t, r (B,) with r = t exactly on rows [0, n_diffusion); ``cond`` the
    (label-dropped) condition of the online network and its derivative; ``ema_cond`` the true
    condition for the EMA guidance (only used with an enhanced transport); ``repa_target``
    (B, N, z_dim) or None. Returns ``(loss, metrics)`` as :func:`tim_loss`.
    """
    transport = config.transport
    dtype = _ftype(x)
    x, noise, t, r = x.astype(dtype), noise.astype(dtype), t.astype(dtype), r.astype(dtype)
    batch_size = x.shape[0]

    x_t, _ = interpolate(transport, x, noise, t)
    F_cond = F_uncond = None
    if transport.enhance_target:
        if ema_params is None or ema_cond is None or null_cond is None:
            raise ValueError("the transport has enhance_target=True: the guidance-enhanced "
                             "target needs ema_params (and ema_cond, null_cond)")
        F_cond, F_uncond = guidance_predictions(apply_fn, ema_params, x_t, t, ema_cond,
                                                null_cond, transport=transport)
    target = transition_target(apply_fn, params, x, noise, t, r, cond, config=config,
                               n_diffusion=n_diffusion, F_cond=F_cond, F_uncond=F_uncond)

    use_repa = repa_target is not None and config.repa_coeff > 0
    out = _call(apply_fn, params, x_t, t, r, cond, transport, dtype, proj=use_repa)
    F, h_proj = out if use_repa else (out, None)

    parts = per_sample_loss(F, target, use_dir_loss=config.use_dir_loss)
    loss_i = parts["loss"]
    weight = time_weighting.time_weighting(
        t, r, sigma_d=transport.sigma_d, weight_type=config.weight_type, warp=config.weight_warp,
        base=config.weight_base, n_diffusion=n_diffusion).astype(dtype)
    adaptive = 1.0 / (jax.lax.stop_gradient(loss_i) + config.adaptive_eps)
    weighted_loss = jnp.mean(weight * adaptive * loss_i)
    proj = repa_loss(h_proj, repa_target) if use_repa else jnp.zeros((), dtype)
    loss = weighted_loss + config.repa_coeff * proj

    _, n_consistency = row_counts(batch_size, config)
    frac = lambda n: jnp.asarray(n / batch_size, jnp.float32)
    metrics = {
        "loss": loss,
        "weighted_loss": weighted_loss,
        "denoising_loss": jnp.mean(loss_i),
        "mse": jnp.mean(parts["mse"]),
        "dir_loss": jnp.mean(parts["dir"]),
        "proj_loss": proj,
        "time_weight": jnp.mean(weight),
        "nonfinite_frac": 1.0 - jnp.mean(parts["finite"].astype(jnp.float32)),
        "frac_diffusion": frac(n_diffusion),
        "frac_transition": frac(batch_size - n_diffusion - n_consistency),
        "frac_consistency": frac(n_consistency),
    }
    return loss, metrics


def tim_loss(apply_fn: ApplyFn, params, batch: dict, rng: Array, *, config: ObjectiveConfig,
             null_cond: PyTree, ema_params=None) -> tuple[Array, dict[str, Array]]:
    """The TiM training loss of one batch: a pure, jittable function differentiable in ``params``.

    batch: ``{"x": (B, H, W, C) clean data, "cond": pytree with leading dim B, optional
    "repa_target": (B, N, z_dim), optional "noise": (B, H, W, C) to fix the noise}``.
    rng: drawn into (t, r), noise and label dropout. ``null_cond``: the null condition (a pytree
    like one row of cond). ``ema_params``: required when the transport enhances the target.

    Returns ``(loss, metrics)``: scalar float32 ``loss = mean_i(w_i a_i L_i) + repa_coeff * REPA``
    and the scalar metrics loss, weighted_loss, denoising_loss (mean unweighted L_i), mse,
    dir_loss, proj_loss, time_weight (mean w_i), nonfinite_frac (fraction of rows whose NaN/inf
    MSE the official nan_to_num replaced), frac_null_cond and the row fractions
    frac_diffusion / frac_transition / frac_consistency.
    """
    x = batch["x"]
    dtype = _ftype(x)
    batch_size = x.shape[0]
    k_time, k_noise, k_drop = jax.random.split(rng, 3)
    t, r = sample_t_and_r(k_time, batch_size, config, dtype)
    noise = batch.get("noise")
    if noise is None:
        noise = jax.random.normal(k_noise, x.shape, dtype)
    cond, dropped = batch["cond"], jnp.zeros((batch_size,), bool)
    if config.label_dropout > 0:
        cond, dropped = drop_cond(k_drop, cond, null_cond, config.label_dropout)
    n_diffusion, _ = row_counts(batch_size, config)
    loss, metrics = transition_loss(
        apply_fn, params, x, noise, t, r, cond, config=config, n_diffusion=n_diffusion,
        ema_params=ema_params, ema_cond=batch["cond"], null_cond=null_cond,
        repa_target=batch.get("repa_target"))
    metrics["frac_null_cond"] = jnp.mean(dropped.astype(jnp.float32))
    return loss, metrics
