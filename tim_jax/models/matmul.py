"""THE matmul of the TiM networks: ``matmul(spec, a, b, dtype=..., bias=..., out_dtype=...)``.

A two-operand einsum with both operands cast to the compute ``dtype``, float32 accumulation, an
optional bias added in float32 and one rounding to ``out_dtype``. Every Dense layer, the patch
embedding and the attention projections go through it.

Its ``jax.custom_vjp`` fixes the dtype policy of the backward pass on every backend: autodiff
of ``dot(bf16, bf16) -> f32`` gives a float32 cotangent and ``dot(f32, bf16)`` gradient
products; here the cotangent is cast to ``dtype`` first (as torch autocast does), the gradient
products are ``dtype x dtype -> float32`` and each gradient comes back in its operand's dtype
(a float32 weight cast inside gets an unrounded float32 gradient; the bias gradient is summed
in float32). With XLA:CPU layouts on (:mod:`tim_jax.models.cpu_layouts`), the gradient products
also use that module's operand layouts.

``jax.jvp`` cannot pass through a ``custom_vjp``: inside :func:`tim_jax.autodiff.forward_mode`
the op is the plain einsum. Specs are explicit ``"A,B->C"`` einsums in which every index of an
operand appears in the other operand or in the output, so ``dA = einsum("C,B->A", g, b)`` and
``dB = einsum("A,C->B", a, g)``. ``bias`` may be one row per sample (``(B, 1, N)``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tim_jax.autodiff import in_forward_mode
from tim_jax.models import cpu_layouts as cpu
from tim_jax.models.cpu_layouts import einsum_f32, index_sizes, parse_spec

Array = jax.Array


def _forward(spec, a, b, bias, dtype, precision, out_dtype):
    def product(a):
        y = einsum_f32(spec, a, b, dtype, precision)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(out_dtype)

    chunks = cpu.row_chunks(spec, a, b, bias)
    if chunks == 1:
        return product(a)
    y = jax.lax.map(product, a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]))
    return y.reshape(chunks * y.shape[1], *y.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6, 7))
def _mm(spec, a, b, bias, dtype, precision, out_dtype, in_dtypes):
    del in_dtypes  # static a, b dtypes and bias (dtype, shape), for the backward
    return _forward(spec, a, b, bias, dtype, precision, out_dtype)


def _mm_fwd(spec, a, b, bias, dtype, precision, out_dtype, in_dtypes):
    del in_dtypes
    a, b = a.astype(dtype), b.astype(dtype)   # the residuals: operands in the compute dtype
    a_res = a
    if cpu.cpu_layouts():
        a_res, a = cpu.grad_residuals(spec, a, b, dtype=dtype)
    return _forward(spec, a, b, bias, dtype, precision, out_dtype), (a_res, b)


def _mm_bwd(spec, dtype, precision, out_dtype, in_dtypes, res, g):
    del out_dtype
    return matmul_grads(spec, *res, g, dtype=dtype, precision=precision, in_dtypes=in_dtypes)


def operand_dtypes(a: Array, b: Array, bias: Array | None) -> tuple:
    """The static ``in_dtypes`` of :func:`matmul_grads`: ``(a dtype, b dtype, bias_info)``,
    ``bias_info`` None or ``(bias dtype, bias shape)``, taken before the operands are cast."""
    return (jnp.dtype(a.dtype), jnp.dtype(b.dtype),
            None if bias is None else (jnp.dtype(bias.dtype), tuple(bias.shape)))


def matmul_grads(spec: str, a: Array, b: Array, g: Array, *, dtype, precision=None,
                 in_dtypes) -> tuple:
    """The backward pass of :func:`matmul`: ``(da, db, dbias)`` for the cotangent ``g``.

    ``a``: the first residual (the operand in ``dtype``; with CPU layouts, as
    ``cpu_layouts.grad_residuals`` prepared it); ``b``: the second operand in ``dtype``;
    ``in_dtypes``: :func:`operand_dtypes` of the original operands. Each gradient comes back
    in its operand's original dtype."""
    sa, sb, out = parse_spec(spec)
    a_dtype, b_dtype, bias_info = in_dtypes
    dbias = None
    if bias_info is not None:
        bias_dtype, bias_shape = bias_info
        lead = g.ndim - len(bias_shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(bias_shape[:-1])
                                          if n == 1)
        dbias = g.astype(jnp.float32).sum(axis=axes).reshape(bias_shape).astype(bias_dtype)
    g = g.astype(dtype)
    if not cpu.cpu_layouts():
        da = einsum_f32(f"{out},{sb}->{sa}", g, b, dtype, precision)
        db = einsum_f32(f"{sa},{out}->{sb}", a, g, dtype, precision)
        return da.astype(a_dtype), db.astype(b_dtype), dbias
    plan = cpu.weight_grad_plan(spec, dtype, {**dict(zip(out, g.shape)),
                                              **dict(zip(sb, b.shape))})
    # an output written in another order than dot_general's (the heads-first projections) is
    # transposed back once here, not inside each of the two gradient products
    canon = cpu.canonical_output(sa, sb, out)
    if canon != out:
        g = jnp.transpose(g, [out.index(c) for c in canon])
        out = canon
    da = cpu.grad_einsum_f32(f"{out},{sb}->{sa}", g, b, dtype, precision).astype(a_dtype)
    if plan is None:
        db = cpu.grad_einsum_f32(f"{sa},{out}->{sb}", a, g, dtype, precision)
    else:
        db = cpu.weight_grad(spec, a, g, out, plan, dtype, precision)
    return da, db.astype(b_dtype), dbias


_mm.defvjp(_mm_fwd, _mm_bwd)


def matmul(spec: str, a: Array, b: Array, *, dtype=jnp.float32, precision=None,
           bias: Array | None = None, out_dtype=jnp.float32) -> Array:
    """``(einsum(spec, a, b) + bias).astype(out_dtype)``: operands cast to ``dtype``, float32
    accumulation, the bias added in float32 before the single rounding. ``bias`` is (N,) for an
    output (..., N), or any shape that broadcasts to the output with its last axis full."""
    spec = spec.replace(" ", "")
    sa, sb, out = parse_spec(spec)
    if len(sa) != a.ndim or len(sb) != b.ndim:
        raise ValueError(f"matmul spec {spec!r} does not fit operands of shapes {a.shape}, "
                         f"{b.shape}")
    if bias is not None:
        sizes = index_sizes(sa, sb, a, b)
        out_shape = tuple(sizes[i] for i in out)
        fits = (0 < bias.ndim <= len(out_shape) and bias.shape[-1] == out_shape[-1] and all(
            n in (1, m) for n, m in zip(bias.shape[::-1], out_shape[::-1])))
        if not fits:
            raise ValueError(f"matmul bias of shape {bias.shape} must be ({sizes[out[-1]]},) or "
                             f"broadcast to the output shape {out_shape} with its last axis "
                             f"full (e.g. one row per sample, index {out[-1]!r} last)")
    dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype)
    if in_forward_mode():
        return _forward(spec, a, b, bias, dtype, precision, out_dtype)
    return _mm(spec, a, b, bias, dtype, precision, out_dtype, operand_dtypes(a, b, bias))
