"""Pallas flash attention (interpret mode on CPU) against a plain float32 softmax attention.

Checked per case: the output, the JVP tangent (``jax.jvp``) and the input gradients
(``jax.vjp`` with a random output cotangent) of ``flash_attention(q, k, v, *, scale)`` against
the reference below, evaluated in float32 (HIGHEST matmul precision) on the same inputs (bf16
inputs are upcast). Tolerance per array: max|diff| <= tol * max|reference|, with
  float32: tol = 1e-5 (the project's bar; only summation order differs);
  bfloat16: tol = 1e-2 — the kernel rounds P (and P*dS) to bf16 before its matmuls, as every
  bf16 flash kernel does, and rounds its outputs to bf16 (unit roundoff 2^-8 = 3.9e-3); the
  tangent's ``acc_t / l - (r / l) o`` form adds one cancellation on top.
Also checked: which Pallas kernels ``jax.jvp`` / ``jax.grad`` / ``jax.checkpoint`` run (counted
in their jaxprs), the clear error for second-order use, and early errors for bad input.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.models.kernels.flash_attention import (flash_attention, flash_attention_supported,
                                                    kernel_calls)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def reference_attention(q, k, v, scale):
    """softmax(scale q k^T) v per head, float32, no mask. q (B,H,Lq,D), k/v (B,H,Lk,D)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    s = s - jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision=jax.lax.Precision.HIGHEST)


def _inputs(seed, b, h, lq, lk, d, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    shapes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)] * 2 + [(b, h, lq, d)]
    q, k, v, tq, tk, tv, ct = (jax.random.normal(kk, s, jnp.float32).astype(dtype)
                               for kk, s in zip(keys, shapes))
    return (q, k, v), (tq, tk, tv), ct


@functools.partial(jax.jit, static_argnums=(0,))
def _all_modes(fn, primals, tangents, ct):
    """Output, JVP tangent and VJP of ``fn`` (one compile per case)."""
    o, do = jax.jvp(fn, primals, tangents)
    _, vjp = jax.vjp(fn, *primals)
    return o, do, vjp(ct.astype(o.dtype))


def _assert_close(name, got, ref, tol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
    assert err <= tol * scale, f"{name}: max|diff| {err:.3g} > {tol:g} * max|ref| {scale:.3g}"


CASES = {
    # name: (B, H, Lq, Lk, Dh, dtype, blocks (q, k, q_bwd, k_bwd))
    "odd_cross_dh72_f32": (1, 2, 37, 53, 72, jnp.float32, (16, 32, 32, 16)),
    "self_multiblock_dh64_f32": (2, 1, 64, 64, 64, jnp.float32, (16, 16, 16, 16)),
    "odd_cross_dh72_bf16": (1, 2, 37, 53, 72, jnp.bfloat16, (16, 16, 16, 16)),
    "tiny_lengths_f32": (1, 1, 1, 5, 8, jnp.float32, (16, 16, 16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    b, h, lq, lk, d, dtype, (bq, bk, bqb, bkb) = CASES[case]
    primals, tangents, ct = _inputs(0, b, h, lq, lk, d, dtype)
    scale = d ** -0.5
    flash = functools.partial(flash_attention, scale=scale, block_q=bq, block_k=bk,
                              block_q_bwd=bqb, block_k_bwd=bkb)
    ref = functools.partial(reference_attention, scale=scale)
    o, do, grads = _all_modes(flash, primals, tangents, ct)
    up = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
    o_r, do_r, grads_r = _all_modes(ref, up(primals), up(tangents), ct.astype(jnp.float32))
    assert o.dtype == dtype and do.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = TOL[dtype]
    _assert_close("o", o, o_r, tol)
    _assert_close("jvp tangent", do, do_r, tol)
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
        _assert_close(name, g, g_r, tol)


def _small():
    primals, tangents, _ = _inputs(1, 1, 1, 20, 24, 16, jnp.float32)
    return functools.partial(flash_attention, scale=0.25, block_q=16, block_k=16), primals, tangents


def _count_pallas_eqns(jaxpr) -> int:
    """pallas_call equations in a jaxpr and its sub-jaxprs (not inside the flash primitives)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "pallas_call"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_pallas_eqns(getattr(sub, "jaxpr", sub))
    return n


def test_kernels_run_per_mode():
    f, primals, tangents = _small()
    fwd = jax.make_jaxpr(f)(*primals)
    assert _count_pallas_eqns(fwd.jaxpr) == 1
    assert kernel_calls(fwd) == {"flash_attention_fwd": 1}
    # jax.jvp: only the one-pass JVP kernel (bound through the JVP primitive).
    jvp = jax.make_jaxpr(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    assert "flash_attention_jvp" in {e.primitive.name for e in jvp.eqns}
    assert kernel_calls(jvp) == {"flash_attention_jvp": 1}
    # jax.grad: forward kernel, then the dq and dk/dv kernels (the latter two are pallas_call
    # equations of the grad jaxpr itself, from the transpose rule).
    loss = lambda *a: jnp.sum(f(*a) * jnp.arange(16.0))
    grad = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(*primals)
    assert kernel_calls(grad) == {"flash_attention_fwd": 1, "flash_attention_dq": 1,
                                  "flash_attention_dkdv": 1}
    assert _count_pallas_eqns(grad.jaxpr) == 2
    # Gradient w.r.t. q only: the dk/dv kernel is not run.
    assert kernel_calls(jax.make_jaxpr(jax.grad(loss))(*primals)) == {
        "flash_attention_fwd": 1, "flash_attention_dq": 1}
    # jax.checkpoint with the default policy: the forward kernel is recomputed for backward.
    remat = jax.make_jaxpr(jax.grad(jax.checkpoint(loss), (0, 1, 2)))(*primals)
    assert kernel_calls(remat) == {"flash_attention_fwd": 2, "flash_attention_dq": 1,
                                   "flash_attention_dkdv": 1}


def test_checkpoint_and_stop_gradient_jvp_match_reference():
    """TiM's use: a loss with a stop-gradient JVP, under jax.checkpoint, differentiated."""
    f, (q, k, v), (tq, tk, tv) = _small()
    ref = functools.partial(reference_attention, scale=0.25)

    def loss(fn, q):
        _, t = jax.jvp(fn, (jax.lax.stop_gradient(q), k, v), (tq, tk, tv))
        return jnp.sum(jnp.sin(jax.checkpoint(fn)(q, k, v)) * jax.lax.stop_gradient(t))

    got, want = jax.jit(jax.grad(functools.partial(loss, f)))(q), jax.grad(
        functools.partial(loss, ref))(q)
    _assert_close("dq", got, want, TOL[jnp.float32])


def test_second_order_is_a_clear_error():
    f, primals, tangents = _small()
    tangent_sum = lambda q: jnp.sum(jax.jvp(f, (q, *primals[1:]), tangents)[1])
    with pytest.raises(NotImplementedError, match="second-order autodiff"):
        jax.grad(tangent_sum)(primals[0])
    with pytest.raises(NotImplementedError, match="second-order autodiff"):
        jax.hessian(lambda q: jnp.sum(f(q, *primals[1:])))(primals[0])


def test_bad_input_errors():
    q = jnp.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="must be \\(B, H, L, Dh\\)"):
        flash_attention(q[0], q, q, scale=1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q, scale=1.0)
    with pytest.raises(ValueError, match="expected q"):
        flash_attention(q, jnp.zeros((1, 2, 8, 8)), jnp.zeros((1, 2, 8, 8)), scale=1.0)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, scale=1.0, block_q=24)
    with pytest.raises(ValueError, match="GPU or TPU"):
        flash_attention(q, q, q, scale=1.0, interpret=False)


def test_supported():
    assert flash_attention_supported("cpu", jnp.float32, 72)
    assert flash_attention_supported("gpu", jnp.bfloat16, 64)
    assert flash_attention_supported("cuda", "float16", 72)
    assert not flash_attention_supported("gpu", jnp.bfloat16, 512)
    assert not flash_attention_supported("gpu", jnp.int32, 64)
    assert not flash_attention_supported("tpu", jnp.bfloat16, 128)
