"""Hand-written backward passes used with the XLA:CPU layouts (:mod:`tim_jax.models.cpu_layouts`).

Each function computes exactly what its plain counterpart computes (the dispatching callers
are ``layers.SwiGLU``, ``rope.norm_rope`` and the ``"xla"`` attention) and carries a
``jax.custom_vjp`` whose backward pass XLA:CPU runs in fewer, cheaper passes than autodiff's
(reasons and figures: ``docs/cpu-performance.md``). Callers use them only when
``cpu_layouts.custom_backward()`` is true, never under ``jax.jvp``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tim_jax.models import cpu_layouts as cpu
from tim_jax.models.cpu_layouts import einsum_f32
from tim_jax.models.matmul import matmul_grads, operand_dtypes

Array = jax.Array
f32 = jnp.float32


# -------------------------------------------------------------------------------------------
# SwiGLU input projection + activation: x (M, in) @ kernel (in, 2H) -> silu(gate) * value (M, H)


def silu_glu(h: Array, bias: Array | None = None) -> Array:
    """``silu(gate) * value`` of ``h = [gate | value]`` (..., 2H) (+ ``bias`` (2H,), added to
    each half) in float32, rounded to ``h.dtype``."""
    gate, value = jnp.split(h.astype(f32), 2, axis=-1)
    if bias is not None:
        b_gate, b_value = jnp.split(bias, 2)
        gate, value = gate + b_gate, value + b_value
    return (jax.nn.silu(gate) * value).astype(h.dtype)


def _silu_glu_grad(h: Array, g: Array) -> Array:
    """The gradient of :func:`silu_glu` w.r.t. ``h`` (..., 2H) in one elementwise pass over a
    (..., 2, H) view, rounded once to ``h.dtype``."""
    hh = h.reshape(*h.shape[:-1], 2, h.shape[-1] // 2).astype(f32)
    gate, value = hh[..., :1, :], hh[..., 1:, :]
    g = g.astype(f32)[..., None, :]
    sig = jax.nn.sigmoid(gate)
    dgate = g * value * sig * (1.0 + gate * (1.0 - sig))
    dvalue = g * gate * sig
    first = jax.lax.broadcasted_iota(jnp.int32, hh.shape, hh.ndim - 2) == 0
    return jnp.where(first, dgate, dvalue).astype(h.dtype).reshape(h.shape)


def _dense_glu_forward(x, kernel, bias, dtype, precision):
    """(activation in dtype, float32 pre-activation): the bias is added inside the activation,
    not to the product (XLA:CPU would fold it into the dot as a materialised broadcast)."""
    h = einsum_f32("mi,io->mo", x, kernel, dtype, precision)
    if bias is None:
        return silu_glu(h).astype(dtype), h
    b = bias.astype(f32)
    return silu_glu(h, b).astype(dtype), h + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dense_silu_glu(x, kernel, bias, dtype, precision, in_dtypes):
    """``silu_glu(x @ kernel + bias)`` with the (M, 2H) pre-activation kept in float32 (no
    rounding pass over the widest activation); the backward keeps it in ``dtype``.
    ``in_dtypes``: ``matmul.operand_dtypes(x, kernel, bias)``."""
    del in_dtypes
    return _dense_glu_forward(x, kernel, bias, dtype, precision)[0]


def _dense_glu_fwd(x, kernel, bias, dtype, precision, in_dtypes):
    del in_dtypes
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    x_res, x = cpu.grad_residuals("mi,io->mo", x, kernel, dtype=dtype)
    y, h = _dense_glu_forward(x, kernel, bias, dtype, precision)
    return y, (x_res, kernel, h.astype(dtype))


def _dense_glu_bwd(dtype, precision, in_dtypes, res, g):
    x, kernel, h = res
    return matmul_grads("mi,io->mo", x, kernel, _silu_glu_grad(h, g), dtype=dtype,
                        precision=precision, in_dtypes=in_dtypes)


dense_silu_glu.defvjp(_dense_glu_fwd, _dense_glu_bwd)


def dense_silu_glu_op(x, kernel, bias, dtype, precision):
    """:func:`dense_silu_glu` with its static ``in_dtypes`` filled in."""
    return dense_silu_glu(x, kernel, bias, dtype, precision, operand_dtypes(x, kernel, bias))


# -------------------------------------------------------------------------------------------
# QK-norm + RoPE: x (B, H, L, Dh) float32 -> rope(LayerNorm(x)) in dtype


def standardize(x: Array, eps: float) -> tuple[Array, Array]:
    """``(xhat, rstd)`` of float32 x over the last axis (biased variance, as torch)."""
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    return xc * rstd, rstd


def _rotate_half(x: Array) -> Array:
    xp = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-xp[..., 1], xp[..., 0]], axis=-1).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def norm_rope(x, scale, bias, cos, sin, eps, dtype):
    """``rope(layer_norm(x) * scale + bias)`` rounded to ``dtype``; the backward writes the
    rotation's transpose ``g*cos - rotate_half(g*sin)`` and the LayerNorm gradient out."""
    return _norm_rope_fwd(x, scale, bias, cos, sin, eps, dtype)[0]


def _norm_rope_fwd(x, scale, bias, cos, sin, eps, dtype):
    xhat, rstd = standardize(x, eps)
    z = xhat * scale + bias
    y = (z * cos + _rotate_half(z) * sin).astype(dtype)
    return y, (xhat, rstd, scale, cos, sin)


def _norm_rope_bwd(eps, dtype, res, g):
    xhat, rstd, scale, cos, sin = res
    g = g.astype(f32)
    dz = g * cos - _rotate_half(g * sin)          # rotate_half^T = -rotate_half
    batch_axes = tuple(range(dz.ndim - 1))
    dxhat = dz * scale
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    return (dx, jnp.sum(dz * xhat, axis=batch_axes), jnp.sum(dz, axis=batch_axes),
            jnp.zeros_like(cos), jnp.zeros_like(sin))


norm_rope.defvjp(_norm_rope_fwd, _norm_rope_bwd)


# -------------------------------------------------------------------------------------------
# softmax attention: q (B, H, Lq, Dh), k, v (B, H, Lk, Dh) -> o (B, H, Lq, Dh)


def attention_forward(q, k, v, scale):
    """o in q.dtype, normalised after the PV product, plus the backward's residuals: the
    unnormalised probabilities ``e = exp(s - max)`` in the compute dtype and their row sums
    ``l`` (B, H, Lq, 1) float32."""
    dt = q.dtype
    s = einsum_f32("bhqd,bhkd->bhqk", q, k, dt) * scale
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    l = jnp.sum(e, axis=-1, keepdims=True)
    e = e.astype(dt)
    o = (einsum_f32("bhqk,bhkd->bhqd", e, v, dt) / l).astype(dt)
    return o, e, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q, k, v, scale):
    """:func:`attention_forward`'s output with the FlashAttention algebra as backward (no
    tiling): ``P = e / l`` kept in the compute dtype, ``dS = P * (dP - rowsum(dO * O))``."""
    return attention_forward(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
    o, e, l = attention_forward(q, k, v, scale)
    return o, (q, k, v, o, e, l)


def _attention_bwd(scale, res, g):
    q, k, v, o, e, l = res
    dt = q.dtype
    inv_l = 1.0 / l
    g32 = g.astype(f32)
    g_l = (g32 * inv_l).astype(dt)                                     # dO / l
    d_l = jnp.sum(g32 * o.astype(f32), axis=-1, keepdims=True) * inv_l  # rowsum(dO*O) / l
    dv = cpu.grad_einsum_f32("bhqk,bhqd->bhkd", e, g_l, dt)            # P^T dO
    dp_l = cpu.dp_product(g_l, v, dt)                                  # dP / l
    ds = (e.astype(f32) * (dp_l - d_l)).astype(dt)                     # P * (dP - D)
    dq = einsum_f32("bhqk,bhkd->bhqd", ds, k, dt) * scale
    dk = cpu.grad_einsum_f32("bhqk,bhqd->bhkd", ds, q, dt) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)
