"""Per-sample loss weights of the transition intervals (the official ``time_weighting``).

The weight of a training pair (t, r) is a decreasing function of a "distance" ``d``:

  * base ``"t_and_r"``: ``d = w(t) - w(r)`` (the interval length); ``"t_only"``: ``d = w(t)``;
  * warp ``w``: ``"plain"`` (identity), ``"tangent"`` (``tan``, for TrigFlow-like times) or
    ``"sigmoid"`` (``t / (1 - t)``, the OT-FM noise-to-signal ratio);
  * type: ``"constant"`` 1, ``"reciprocal"`` 1/(d + sigma_d), ``"sqrt"`` 1/sqrt(d + sigma_d),
    ``"square"`` 1/(d + sigma_d)^2, ``"Soft-Min-SNR"`` 1/(d^2 + sigma_d^2),

with ``sigma_d`` the transport's data scale. The first ``n_diffusion`` rows of a batch are the
diffusion rows (r == t) and always get weight 1.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "WEIGHT_TYPES",
    "WARPS",
    "BASES",
    "validate_time_weighting",
    "warp_from_flags",
    "time_weighting",
]

WEIGHT_TYPES = ("constant", "reciprocal", "sqrt", "square", "Soft-Min-SNR")
WARPS = ("plain", "tangent", "sigmoid")
BASES = ("t_and_r", "t_only")


def validate_time_weighting(weight_type: str, warp: str = "plain", base: str = "t_and_r") -> None:
    """Raise ValueError naming the field and its allowed values for an unknown setting."""
    for field, value, allowed in (
        ("weight_type", weight_type, WEIGHT_TYPES),
        ("warp", warp, WARPS),
        ("base", base, BASES),
    ):
        if value not in allowed:
            raise ValueError(f"time weighting {field}={value!r} is not one of {list(allowed)}")


def warp_from_flags(weight_time_tangent: bool = False, weight_time_sigmoid: bool = False) -> str:
    """The warp name for the official boolean flags (tangent wins when both are set, as there)."""
    if weight_time_tangent:
        return "tangent"
    if weight_time_sigmoid:
        return "sigmoid"
    return "plain"


def time_weighting(
    t: Any,
    r: Any,
    *,
    sigma_d: float,
    weight_type: str = "constant",
    warp: str = "plain",
    base: str = "t_and_r",
    n_diffusion: Any = 0,
) -> jax.Array:
    """Per-sample interval weights, shape (B,).

    Args:
      t, r: times, any shape with B elements (flattened), r <= t, in the transport's units.
      sigma_d: the transport's data scale (``transport.sigma_d``).
      weight_type, warp, base: see the module docstring (validated; ValueError otherwise).
      n_diffusion: number of leading diffusion rows (Python int or int scalar array) that get
        weight 1.

    Returns:
      float array (B,) in the dtype of t (at least float32).
    """
    validate_time_weighting(weight_type, warp, base)
    t = jnp.ravel(jnp.asarray(t))
    r = jnp.ravel(jnp.asarray(r))
    dtype = jnp.result_type(t.dtype, r.dtype, jnp.float32)
    t, r = t.astype(dtype), r.astype(dtype)
    if warp == "tangent":
        t, r = jnp.tan(t), jnp.tan(r)
    elif warp == "sigmoid":
        t, r = t / (1.0 - t), r / (1.0 - r)
    d = t - r if base == "t_and_r" else t
    if weight_type == "constant":
        w = jnp.ones_like(d)
    elif weight_type == "reciprocal":
        w = 1.0 / (d + sigma_d)
    elif weight_type == "sqrt":
        w = 1.0 / jnp.sqrt(d + sigma_d)
    elif weight_type == "square":
        w = 1.0 / jnp.square(d + sigma_d)
    else:  # "Soft-Min-SNR"
        w = 1.0 / (d * d + sigma_d**2)
    is_diffusion = jnp.arange(w.shape[0]) < n_diffusion
    return jnp.where(is_diffusion, jnp.ones_like(w), w)
