"""blocked_attention against a plain float32 softmax attention written here: values, input
gradients (custom_vjp), JVP inside forward_mode (and the gradient of that JVP), and compiled
memory linear in tokens.

Tolerances (max |diff| <= tol * max |ref|, per output):
* float32: 1e-5 (the project's bar); blocked and plain differ only in summation order.
* bfloat16 inputs: 1e-2 for values, 2e-2 for gradients (measured: <= 3.4e-3 and 6.9e-3). The
  reference runs in float32 on the same bf16 values; blocked_attention rounds the
  probabilities (and dS) to bf16 before the products and o / dq / dk / dv to bf16 at the end,
  each rounding a relative 2^-9 (~2e-3), accumulated over a few products.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.autodiff import forward_mode
from tim_jax.models.blocked_attention import (BLOCKED_THRESHOLD_LOGITS, blocked_attention,
                                              use_blocked)

F32_TOL = 1e-5
BF16_TOL = {"value": 1e-2, "grad": 2e-2}


def reference(q, k, v, scale):
    """Plain softmax attention, everything float32 at full matmul precision."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision="highest") * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, precision="highest")


def _inputs(b, h, lq, lk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, h, n, d)) * s, dtype)
               for n, s in ((lq, 1.5), (lk, 1.5), (lk, 1.0)))
    w = jnp.asarray(rng.standard_normal((b, h, lq, d)), jnp.float32)  # cotangent / weights
    return q, k, v, w


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


# (Lq, Lk, block_k, block_q): Lq != Lk, lengths not multiples of the blocks, a key block larger
# than the sequence, query blocks (padded), one query block larger than Lq.
SHAPES = [
    (40, 40, 16, None),
    (37, 53, 16, None),
    (53, 37, 8, 16),
    (24, 10, 64, None),
    (33, 70, 32, 64),
]


def _loss(fn, w):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)


@pytest.mark.parametrize("dtype,lq,lk,block_k,block_q",
                         [("float32", *s) for s in SHAPES]
                         + [("bfloat16", *s) for s in (SHAPES[1], SHAPES[2], SHAPES[4])])
def test_values_and_gradients(dtype, lq, lk, block_k, block_q):
    dtype = jnp.dtype(dtype)
    q, k, v, w = _inputs(2, 3, lq, lk, 8, dtype)
    scale = 8 ** -0.5

    def blocked(q, k, v):
        return blocked_attention(q, k, v, scale=scale, block_k=block_k, block_q=block_q)

    def plain(q, k, v):
        return reference(q, k, v, scale)

    @jax.jit
    def run(q, k, v):
        grads = jax.grad(_loss(blocked, w), argnums=(0, 1, 2))(q, k, v)
        grads_ref = jax.grad(_loss(plain, w), argnums=(0, 1, 2))(q, k, v)
        return blocked(q, k, v), plain(q, k, v), grads, grads_ref

    o, o_ref, grads, grads_ref = run(q, k, v)
    assert o.shape == q.shape and o.dtype == dtype
    tol_v = F32_TOL if dtype == jnp.float32 else BF16_TOL["value"]
    tol_g = F32_TOL if dtype == jnp.float32 else BF16_TOL["grad"]
    assert _rel_err(o, o_ref) <= tol_v
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape
        assert _rel_err(g, g_ref) <= tol_g, f"d{name}"


@pytest.mark.parametrize("lq,lk,block_k,block_q,with_grad",
                         [(*SHAPES[1], True), (*SHAPES[2], False)])
def test_jvp_in_forward_mode(lq, lk, block_k, block_q, with_grad):
    """jax.jvp inside forward_mode(), and (with_grad) reverse mode through that JVP (training
    with the JVP derivative does both)."""
    q, k, v, w = _inputs(1, 2, lq, lk, 8, jnp.float32, seed=1)
    tangents = (w * 0.5, jnp.flip(k, axis=2), v * -0.3)
    scale = 0.4

    def blocked(q, k, v):
        return blocked_attention(q, k, v, scale=scale, block_k=block_k, block_q=block_q)

    def plain(q, k, v):
        return reference(q, k, v, scale)

    def jvp_loss(fn):
        def f(q, k, v):
            with forward_mode():
                o, t = jax.jvp(fn, (q, k, v), (q * 0.7, k, v))
            return jnp.sum((o + t) * w)
        return f

    @jax.jit
    def run(q, k, v):
        with forward_mode():
            out = jax.jvp(blocked, (q, k, v), tangents)
        out_ref = jax.jvp(plain, (q, k, v), tangents)
        if not with_grad:
            return out, out_ref, (), ()
        grads = jax.grad(jvp_loss(blocked), argnums=(0, 1, 2))(q, k, v)
        grads_ref = jax.grad(jvp_loss(plain), argnums=(0, 1, 2))(q, k, v)
        return out, out_ref, grads, grads_ref

    (o, t), (o_ref, t_ref), grads, grads_ref = run(q, k, v)
    assert _rel_err(o, o_ref) <= F32_TOL
    assert _rel_err(t, t_ref) <= F32_TOL
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert _rel_err(g, g_ref) <= F32_TOL, f"d{name} of the JVP"


def _compiled_bytes(fn, *shapes):
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    stats = jax.jit(fn).lower(*specs).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.argument_size_in_bytes
            + stats.output_size_in_bytes, stats.temp_size_in_bytes)


def _grad_program(attn):
    def f(q, k, v, g):
        return jax.vjp(attn, q, k, v)[1](g)
    return f


def test_memory_linear_in_tokens():
    """4x the tokens: the blocked forward and gradient compile to < 6x the memory (quadratic
    would be 16x); the plain gradient (which saves its probabilities, so XLA:CPU cannot fuse its
    logits away) grows > 10x under the same measure, so the measure sees quadratic memory."""
    b, h, d, bk = 1, 2, 16, 64
    small, large = 512, 2048
    scale = d ** -0.5

    def blocked(q, k, v):
        return blocked_attention(q, k, v, scale=scale, block_k=bk)

    def plain(q, k, v):
        return reference(q, k, v, scale)

    def shapes(n, count):
        return [(b, h, n, d)] * count

    fwd_small, _ = _compiled_bytes(blocked, *shapes(small, 3))
    fwd_large, fwd_large_temp = _compiled_bytes(blocked, *shapes(large, 3))
    assert fwd_large < 6 * fwd_small, (fwd_small, fwd_large)
    # The per-block logits (B, H, L, block_k) float32 are in the count: the test is not vacuous.
    assert fwd_large_temp >= b * h * large * bk * 4

    grad_small, _ = _compiled_bytes(_grad_program(blocked), *shapes(small, 4))
    grad_large, _ = _compiled_bytes(_grad_program(blocked), *shapes(large, 4))
    assert grad_large < 6 * grad_small, (grad_small, grad_large)

    plain_small, _ = _compiled_bytes(_grad_program(plain), *shapes(small, 4))
    plain_large, _ = _compiled_bytes(_grad_program(plain), *shapes(large, 4))
    assert plain_large > 10 * plain_small, (plain_small, plain_large)


def test_query_blocks_bound_the_working_set():
    """With block_q the temporaries no longer grow with Lq x block_k."""
    shape = (1, 2, 2048, 16)

    def temp(block_q):
        return _compiled_bytes(
            lambda q, k, v: blocked_attention(q, k, v, scale=0.25, block_k=256, block_q=block_q),
            shape, shape, shape)[1]

    assert temp(256) < temp(None) / 2


def test_use_blocked_threshold():
    assert BLOCKED_THRESHOLD_LOGITS == 2048 * 2048
    assert not use_blocked(1024, 1024)
    assert not use_blocked(2048, 2048)
    assert use_blocked(4096, 4096)
    assert use_blocked(16384, 16384)
    assert use_blocked(2048, 4096)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(1, 2, 8, 4), k=(1, 2, 8, 4), v=(1, 2, 9, 4)), "incompatible"),
    (dict(q=(2, 8, 4), k=(2, 8, 4), v=(2, 8, 4)), r"\(B, H, L, Dh\)"),
    (dict(q=(1, 2, 8, 4), k=(1, 2, 0, 4), v=(1, 2, 0, 4)), "at least one key"),
    (dict(q=(1, 2, 8, 4), k=(1, 2, 8, 4), v=(1, 2, 8, 4), block_k=0), "block sizes"),
])
def test_bad_input_errors(kwargs, match):
    arrays = {n: jnp.zeros(kwargs.pop(n)) for n in ("q", "k", "v")}
    with pytest.raises(ValueError, match=match):
        blocked_attention(arrays["q"], arrays["k"], arrays["v"], scale=1.0, **kwargs)
