"""A small MLP transition network for toy data (2-D point clouds stored as 1x1x2 "images").

:class:`MLPTiM` follows the tim_jax network contract (see ``docs/design.md``): an NNX module whose state is only
``nnx.Param``s, called as ``model(x_t, t, r, cond)`` with NHWC ``x_t`` of shape (B, H, W, C), times ``t, r`` of
shape (B,) (already passed through ``transport.c_noise``) and int32 class labels ``cond`` of shape (B,) where label
``num_classes`` is the null (unconditional) class; it returns F of shape (B, H, W, C) in float32. Like the TiM
networks it embeds t and the interval t - r separately (decoupled time embedding) and sums them with the label
embedding into one conditioning vector that modulates every residual block (adaLN-style scale/shift/gate).

The time features are sinusoids of t with frequencies 1 .. ``max_time_freq`` (radians per unit of t): smooth
enough for the finite-difference (DDE) time derivative of the TiM objective, whose half-step is 0.005.

Use ``tim_jax.models.functional.make_apply_fn`` or the module directly; ``return_proj=True`` is not supported
(there is no REPA projector), so train it with ``repa_coeff = 0``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MLPTiM", "time_features"]


def time_features(t: jax.Array, dim: int, max_freq: float) -> jax.Array:
    """Sinusoidal features of t (B,) -> (B, dim) float32, [cos | sin] at frequencies geomspace(1, max_freq)."""
    if dim % 2:
        raise ValueError(f"time feature dim must be even; got {dim}")
    freqs = jnp.exp(jnp.linspace(0.0, math.log(max_freq), dim // 2, dtype=jnp.float32))
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Non-affine LayerNorm over the last axis, in float32."""
    x = x.astype(jnp.float32)
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


class _TimeEmbed(nnx.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, freq_dim: int, max_freq: float, *, rngs: nnx.Rngs):
        self.freq_dim, self.max_freq = freq_dim, max_freq
        self.fc1 = nnx.Linear(freq_dim, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(time_features(t, self.freq_dim, self.max_freq))))


class _Block(nnx.Module):
    """h + gate(c) * MLP(LN(h) * (1 + scale(c)) + shift(c)); modulation zero-initialised (identity at init)."""

    def __init__(self, width: int, mlp_ratio: float, *, rngs: nnx.Rngs):
        hidden = int(width * mlp_ratio)
        self.mod = nnx.Linear(width, 3 * width, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.mod(jax.nn.silu(c)), 3, axis=-1)
        y = _layer_norm(h) * (1.0 + scale) + shift
        return h + gate * self.fc2(jax.nn.silu(self.fc1(y)))


class MLPTiM(nnx.Module):
    """Class-conditional MLP transition network F(x_t, t, r, label) for small data of shape (H, W, C).

    Args:
      data_shape: per-example (H, W, C), e.g. (1, 1, 2) for 2-D points.
      num_classes: number of real classes; the label table has num_classes + 1 rows (the last is null).
      width: hidden width of the residual stream.
      depth: number of residual blocks.
      mlp_ratio: block MLP hidden width / width.
      freq_dim: number of sinusoidal time features (even).
      max_time_freq: highest time frequency, radians per unit t.
      rngs: NNX rngs for the initialisers.
    """

    def __init__(
        self,
        data_shape: tuple[int, int, int] = (1, 1, 2),
        num_classes: int = 1,
        *,
        width: int = 128,
        depth: int = 3,
        mlp_ratio: float = 2.0,
        freq_dim: int = 32,
        max_time_freq: float = 32.0,
        rngs: nnx.Rngs,
    ):
        if len(data_shape) != 3 or min(data_shape) < 1:
            raise ValueError(f"data_shape must be a positive (H, W, C); got {data_shape}")
        if num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"num_classes, width and depth must be >= 1; got {num_classes}, {width}, {depth}")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = num_classes
        d = math.prod(self.data_shape)
        self.inp = nnx.Linear(d, width, rngs=rngs)
        self.t_embed = _TimeEmbed(width, freq_dim, max_time_freq, rngs=rngs)
        self.d_embed = _TimeEmbed(width, freq_dim, max_time_freq, rngs=rngs)
        self.y_embed = nnx.Embed(num_classes + 1, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([_Block(width, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, d, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array, cond: jax.Array, *, return_proj: bool = False):
        """x_t (B, H, W, C), t and r (B,), cond int labels (B,) -> F (B, H, W, C) float32."""
        if return_proj:
            raise ValueError("MLPTiM has no REPA projector: return_proj must be False (use repa_coeff = 0)")
        if tuple(x_t.shape[1:]) != self.data_shape:
            raise ValueError(f"x_t must have shape (B, *{self.data_shape}); got {x_t.shape}")
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        r = jnp.broadcast_to(jnp.asarray(r, jnp.float32), (b,))
        c = self.t_embed(t) + self.d_embed(t - r) + self.y_embed(cond.astype(jnp.int32))
        h = self.inp(x_t.reshape(b, -1).astype(jnp.float32))
        for block in self.blocks:
            h = block(h, c)
        return self.out(_layer_norm(h)).reshape(x_t.shape).astype(jnp.float32)
