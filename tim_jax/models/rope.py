"""2D rotary position embedding of the TiM networks (official FiT/TiM ``VisionRotaryEmbedding``,
``custom_freqs='normal'``, theta 10000), in the official layout and grid order.

Tables are float32 numpy arrays computed at trace time from static shapes (never stored as
parameters). Tokens are row-major over an h x w grid; each head's Dh channels rotate in
interleaved pairs, the first Dh/2 with the grid coordinate g0 and the last Dh/2 with g1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.models import cpu_fused
from tim_jax.models.cpu_layouts import custom_backward

Array = jax.Array


def rope_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token coordinates (g0, g1) of an h x w token grid in the OFFICIAL order: the grid is
    ``meshgrid(arange(h), arange(w), indexing='xy')`` flattened, so token k has ``g0 = k mod h``
    and ``g1 = k div h``. For a square grid that is (column, row); for a non-square grid it is
    not the true layout, but the trained weights depend on it, so it is reproduced as is."""
    k = np.arange(h * w)
    return k % h, k // h


def rope_tables(h: int, w: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) tables (h*w, head_dim) float32: per axis ``dim = head_dim // 2`` channels
    with frequencies ``theta ** (-2j / dim)``, j < dim // 2, each repeated twice."""
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be divisible by 4 for the 2D RoPE")
    dim = head_dim // 2
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    freqs = freqs.astype(np.float32)
    g0, g1 = rope_grid(h, w)
    a0 = np.repeat(g0.astype(np.float32)[:, None] * freqs[None], 2, axis=-1)
    a1 = np.repeat(g1.astype(np.float32)[:, None] * freqs[None], 2, axis=-1)
    ang = np.concatenate([a0, a1], axis=-1).astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate_half(x: Array) -> Array:
    """Interleaved-pair rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    xp = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-xp[..., 1], xp[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (..., L, Dh) rotated by tables (L, Dh): ``x * cos + rotate_half(x) * sin`` (float32)."""
    x = x.astype(jnp.float32)
    return x * cos + rotate_half(x) * sin


def scaled_rope(rope: tuple[Array, Array], head_dim: int) -> tuple[Array, Array]:
    """The query's tables times the softmax scale ``head_dim ** -0.5``: the query leaves
    :func:`norm_rope` scaled and the attention runs with ``scale=1.0`` (the same logits)."""
    s = head_dim ** -0.5
    return rope[0] * s, rope[1] * s


def norm_rope(x: Array, norm, cos: Array, sin: Array, dtype) -> Array:
    """The attention's query/key path ``apply_rope(norm(x), cos, sin)`` rounded to ``dtype``.

    x (B, H, L, Dh) float32; ``norm`` a ``layers.LayerNorm`` over Dh (QK-norm) or None; tables
    (L, Dh). Returns (B, H, L, Dh) in ``dtype``. With the CPU layouts it is
    ``cpu_fused.norm_rope`` (same values, a hand-written backward)."""
    cos, sin = jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)
    if norm is None or not custom_backward():
        y = x if norm is None else norm(x)
        return apply_rope(y, cos, sin).astype(dtype)
    return cpu_fused.norm_rope(x.astype(jnp.float32), norm.scale[...].astype(jnp.float32),
                               norm.bias[...].astype(jnp.float32), cos, sin, norm.eps, dtype)
