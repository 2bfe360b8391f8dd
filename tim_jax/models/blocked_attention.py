"""Blocked softmax attention in pure XLA: online softmax over key blocks, linear memory in tokens.

Layout (the one of :mod:`tim_jax.models.attention`)::

    q: (B, H, Lq, Dh)    k: (B, H, Lk, Dh)    v: (B, H, Lk, Dh)    ->    o: (B, H, Lq, Dh)

The same values as plain softmax attention without mask, but the (Lq, Lk) logits are never
materialised: a ``lax.scan`` walks over key blocks of ``block_k`` keys, keeping per query row a
running max ``m``, a running sum ``l`` and an unnormalised accumulator (all float32), and
divides by ``l`` at the end. ``block_q`` (optional) also splits the queries (``lax.map`` over
query blocks), so the working set is (B, H, block_q, block_k) instead of (B, H, Lq, block_k).
Logits, softmax statistics and accumulators are float32; the products take q/k/v (and the
probabilities, rounded) in their dtype with float32 results; ``o`` has q's dtype.

Lengths need not be multiples of the blocks: keys are padded to a multiple of ``block_k`` and
the pad gets ``-inf`` logits; queries are padded with zeros and their rows dropped. A block
larger than the sequence shrinks to the sequence.

Gradients: a ``jax.custom_vjp`` that keeps only ``(q, k, v, o, logsumexp)`` and recomputes the
probabilities block by block in the backward pass (FlashAttention-2 algebra,
``D = rowsum(dO * O)``, ``dS = P * (dP - D)``), so reverse mode is linear in tokens too.
``jax.jvp`` cannot pass through a ``custom_vjp``: inside :func:`tim_jax.autodiff.forward_mode`
the function is the plain differentiable scan instead (forward mode through a scan stays
linear in memory). Works on every backend (no Pallas, no cuDNN).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tim_jax.autodiff import in_forward_mode

Array = jax.Array
f32 = jnp.float32

# Above this many logits per (batch, head) -- Lq * Lk -- use_blocked() picks the blocked path.
# At or below 2048 x 2048 the plain path's float32 logits are <= 16 MiB per (batch, head) and
# the blocked path (block_k = 1024: at most two key blocks) saves at most about half of the
# attention memory while giving up the single large GEMM pair; above it the plain path's memory
# grows with Lq * Lk (4x per doubling of the tokens) while the blocked one grows with Lq
# (python -m tim_jax.bench.attention_memory measures both).
BLOCKED_THRESHOLD_LOGITS = 2048 * 2048


def use_blocked(lq: int, lk: int) -> bool:
    """Whether to use :func:`blocked_attention` for ``lq`` queries and ``lk`` keys: true when
    ``lq * lk`` exceeds :data:`BLOCKED_THRESHOLD_LOGITS` (2048 x 2048 tokens), where the plain
    path's quadratic float32 logits (16 MiB per batch element and head) start to dominate."""
    return lq * lk > BLOCKED_THRESHOLD_LOGITS


def _einsum(spec: str, a: Array, b: Array, precision) -> Array:
    """``einsum`` on inputs in their dtype with a float32 result."""
    return jnp.einsum(spec, a, b, preferred_element_type=f32, precision=precision)


def _split_blocks(x: Array, block: int, axis_len: int) -> Array:
    """(B, H, L, Dh) -> (n, B, H, block, Dh), zero-padding L up to n * block."""
    n = -(-axis_len // block)
    pad = n * block - axis_len
    if pad:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    b, h, _, d = x.shape
    return x.reshape(b, h, n, block, d).transpose(2, 0, 1, 3, 4)


def _merge_blocks(x: Array, length: int) -> Array:
    """(n, B, H, block, ...) -> (B, H, length, ...), dropping the pad."""
    n, b, h, block = x.shape[:4]
    x = jnp.moveaxis(x, 0, 2).reshape(b, h, n * block, *x.shape[4:])
    return x[:, :, :length]


def _key_valid(lk: int, block_k: int) -> Array | None:
    """(n_k, block_k) bool: which padded key positions are real keys; None without pad."""
    n_k = -(-lk // block_k)
    if n_k * block_k == lk:
        return None
    return (jnp.arange(n_k * block_k) < lk).reshape(n_k, block_k)


def _block_logits(q: Array, k_blk: Array, valid: Array | None, scale: float, precision) -> Array:
    """Float32 logits (B, H, bq, bk) of one key block; pad keys get -inf."""
    s = _einsum("bhqd,bhkd->bhqk", q, k_blk, precision) * scale
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    return s


def _forward_rows(q, k_blocks, v_blocks, valid, scale, precision):
    """Online softmax of the queries ``q`` (B, H, bq, Dh) over all key blocks.

    ``k_blocks``/``v_blocks``: (n_k, B, H, bk, Dh); ``valid``: (n_k, bk) bool or None.
    Returns (o (B, H, bq, Dh) in q's dtype, logsumexp (B, H, bq) float32).
    """
    b, h, bq, d = q.shape

    def step(carry, blk):
        m, l, acc = carry
        if valid is None:
            k_blk, v_blk = blk
            s = _block_logits(q, k_blk, None, scale, precision)
        else:
            k_blk, v_blk, ok = blk
            s = _block_logits(q, k_blk, ok, scale, precision)
        # The output does not depend on the choice of m (it cancels), so no tangent/cotangent
        # flows through it.
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = _einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk, precision)
        acc = alpha[..., None] * acc + pv
        return (m_new, l, acc), None

    init = (jnp.full((b, h, bq), -jnp.inf, f32), jnp.zeros((b, h, bq), f32),
            jnp.zeros((b, h, bq, d), f32))
    xs = (k_blocks, v_blocks) if valid is None else (k_blocks, v_blocks, valid)
    # Rematerialised step: reverse mode through this scan (only reached as the gradient of a
    # forward-mode JVP; plain reverse mode uses the custom_vjp) saves the carries per key
    # block, not the (bq, bk) probabilities.
    (m, l, acc), _ = lax.scan(jax.checkpoint(step, prevent_cse=False), init, xs)
    o = (acc / l[..., None]).astype(q.dtype)
    return o, m + jnp.log(l)


def _blocks(q, k, v, block_k, block_q):
    """Effective block sizes and the blocked key/value tensors."""
    lq, lk = q.shape[2], k.shape[2]
    bk = min(block_k, lk)
    bq = lq if block_q is None else min(block_q, lq)
    return bq, bk, _split_blocks(k, bk, lk), _split_blocks(v, bk, lk), _key_valid(lk, bk)


def _forward(q, k, v, scale, block_k, block_q, precision):
    """(o (B, H, Lq, Dh), logsumexp (B, H, Lq) float32); differentiable in both modes."""
    lq = q.shape[2]
    bq, _, k_blocks, v_blocks, valid = _blocks(q, k, v, block_k, block_q)
    rows = functools.partial(_forward_rows, k_blocks=k_blocks, v_blocks=v_blocks, valid=valid,
                             scale=scale, precision=precision)
    if bq == lq:
        return rows(q)
    o, lse = lax.map(rows, _split_blocks(q, bq, lq))
    return _merge_blocks(o, lq), _merge_blocks(lse[..., None], lq)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _blocked_vjp(q, k, v, scale, block_k, block_q, precision):
    return _forward(q, k, v, scale, block_k, block_q, precision)[0]


def _blocked_fwd(q, k, v, scale, block_k, block_q, precision):
    o, lse = _forward(q, k, v, scale, block_k, block_q, precision)
    return o, (q, k, v, o, lse)


def _blocked_bwd(scale, block_k, block_q, precision, res, g):
    """FlashAttention-2 backward: outer scan over key blocks (emitting dK_j, dV_j), inner scan
    over query blocks (accumulating dK_j, dV_j, emitting the dQ_i contributions)."""
    q, k, v, o, lse = res
    lq, lk = q.shape[2], k.shape[2]
    dt = q.dtype
    bq, bk, k_blocks, v_blocks, valid = _blocks(q, k, v, block_k, block_q)
    g = g.astype(dt)
    delta = jnp.sum(g.astype(f32) * o.astype(f32), axis=-1)            # D = rowsum(dO * O)
    # Query-side tensors split into (n_q, B, H, bq, ...); pad rows have dO = 0, so they add
    # nothing to dK/dV (their lse = 0 keeps exp finite).
    q_b = _split_blocks(q, bq, lq)
    g_b = _split_blocks(g, bq, lq)
    lse_b = _split_blocks(lse[..., None], bq, lq)[..., 0]
    delta_b = _split_blocks(delta[..., None], bq, lq)[..., 0]

    def key_step(dq, blk):
        if valid is None:
            k_blk, v_blk = blk
            ok = None
        else:
            k_blk, v_blk, ok = blk

        def query_step(carry, rows):
            dk_j, dv_j = carry
            q_i, g_i, lse_i, d_i = rows
            s = _block_logits(q_i, k_blk, ok, scale, precision)
            p = jnp.exp(s - lse_i[..., None])                          # (B, H, bq, bk) f32
            dv_j = dv_j + _einsum("bhqk,bhqd->bhkd", p.astype(dt), g_i, precision)
            dp = _einsum("bhqd,bhkd->bhqk", g_i, v_blk, precision)
            ds = (p * (dp - d_i[..., None])).astype(dt)
            dk_j = dk_j + _einsum("bhqk,bhqd->bhkd", ds, q_i, precision)
            dq_i = _einsum("bhqk,bhkd->bhqd", ds, k_blk, precision)
            return (dk_j, dv_j), dq_i

        zeros = jnp.zeros(k_blk.shape, f32)
        (dk_j, dv_j), dq_parts = lax.scan(query_step, (zeros, zeros),
                                          (q_b, g_b, lse_b, delta_b))
        return dq + dq_parts, (dk_j * scale, dv_j)

    xs = (k_blocks, v_blocks) if valid is None else (k_blocks, v_blocks, valid)
    dq, (dk, dv) = lax.scan(key_step, jnp.zeros(q_b.shape, f32), xs)
    dq = _merge_blocks(dq * scale, lq)
    return (dq.astype(q.dtype), _merge_blocks(dk, lk).astype(k.dtype),
            _merge_blocks(dv, lk).astype(v.dtype))


_blocked_vjp.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: Array, k: Array, v: Array, *, scale: float, block_k: int = 1024,
                      block_q: int | None = None, precision=None) -> Array:
    """Softmax attention over key blocks of ``block_k`` (and query blocks of ``block_q``, if
    given) with an online softmax; layout and dtypes in the module docstring.

    q (B, H, Lq, Dh), k/v (B, H, Lk, Dh) -> o (B, H, Lq, Dh) in q's dtype. ``scale`` multiplies
    the logits. ``precision``: passed to every product (``None``: the backend default).
    Reverse mode uses a block-recomputing ``custom_vjp``; inside
    :func:`tim_jax.autodiff.forward_mode` the plain scan is used, so ``jax.jvp`` works.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"blocked_attention expects (B, H, L, Dh) q/k/v; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[2] == 0:
        raise ValueError("blocked_attention needs at least one key (Lk = 0)")
    if int(block_k) < 1 or (block_q is not None and int(block_q) < 1):
        raise ValueError(f"block sizes must be >= 1; got block_k={block_k}, block_q={block_q}")
    block_k = int(block_k)
    block_q = None if block_q is None else int(block_q)
    scale = float(scale)
    if q.shape[2] == 0:
        return jnp.zeros(q.shape, q.dtype)
    if in_forward_mode():
        return _forward(q, k, v, scale, block_k, block_q, precision)[0]
    return _blocked_vjp(q, k, v, scale, block_k, block_q, precision)
