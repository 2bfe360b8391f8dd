"""Flash-attention backward kernels (FlashAttention-2 style, no atomics).

Given the residuals q, k, v, o, the base-2 log-sum-exp ``lse`` of the forward kernel and the
output cotangent ``do``, with ``delta = rowsum(do * o)`` (float32, computed by XLA) and
``P = exp2(c * q k^T - lse)`` (``c = scale * log2(e)``) rebuilt block by block:

* dq kernel, grid (B, H, Lq_pad / block_q): loops over key blocks,
  ``dq = scale * sum_j (P * (do v^T - delta)) k``;
* dk/dv kernel, grid (B, H, Lk_pad / block_k): loops over query blocks,
  ``dv = sum_i P^T do`` and ``dk = scale * sum_i (P * (do v^T - delta))^T q``.

Padded key rows are zero, so they add nothing to dq; padded query rows have ``do = 0`` and so
add nothing to dk/dv; the padded rows of the results are sliced off. Gradients come back in the
input dtypes (float32 accumulation inside).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tim_jax.models.kernels import flash_attention_common as fc


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale: float,
               block_k: int):
    """q/do/dq refs (block_q, Dp); k/v refs (Lk_pad, Dp); lse/delta refs (block_q[, 1])."""
    q, do = q_ref[...], do_ref[...]
    lse, delta = fc.column(lse_ref[...]), fc.column(delta_ref[...])
    c = scale * fc.LOG2E

    def body(j, dq):
        keys = fc.block_slice(j, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        p = jnp.exp2(fc.dot_nt(q, k) * c - lse)
        ds = p * (fc.dot_nt(do, v) - delta)
        return dq + fc.dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, k_ref.shape[0] // block_k, body,
                       jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale: float, block_q: int):
    """k/v/dk/dv refs (block_k, Dp); q/do refs (Lq_pad, Dp); lse/delta refs (Lq_pad[, 1])."""
    k, v = k_ref[...], v_ref[...]
    c = scale * fc.LOG2E

    def body(i, carry):
        dk, dv = carry
        rows = fc.block_slice(i, block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        lse = fc.column(lse_ref[rows])
        delta = fc.column(delta_ref[rows])
        p = jnp.exp2(fc.dot_nt(q, k) * c - lse)                  # (block_q, block_k)
        dv = dv + fc.dot_tn(p.astype(do.dtype), do)
        ds = p * (fc.dot_nt(do, v) - delta)
        dk = dk + fc.dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(q, k, v, o, lse, do, cfg: fc.FlashConfig, *, need_dq: bool = True,
                   need_dkv: bool = True):
    """``(dq, dk, dv)`` of softmax attention for the output cotangent ``do``.

    q, o, do (B, H, Lq, Dh); k, v (B, H, Lk, Dh); lse (B, H, Lq) float32 base 2 (from
    :func:`flash_forward`). ``dq`` is None unless ``need_dq``, ``dk``/``dv`` are None unless
    ``need_dkv`` (the kernel that is not needed is not run).
    """
    b, h, lq, dh = q.shape
    g = fc.geometry(cfg, lq, k.shape[2], dh)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    qp, dop = fc.pad_to(q, g.lq_pad, g.dp), fc.pad_to(do.astype(q.dtype), g.lq_pad, g.dp)
    kp, vp = fc.pad_to(k, g.lk_pad, g.dp), fc.pad_to(v, g.lk_pad, g.dp)
    lse_p, delta_p = (fc.rows_to_kernel_layout(fc.pad_to(x, g.lq_pad), cfg) for x in (lse, delta))
    dq = dk = dv = None
    if need_dq:
        bq = g.block_q_bwd
        kernel = functools.partial(_dq_kernel, scale=cfg.scale, block_k=g.block_k_bwd)
        dq = fc.call(
            kernel, cfg=cfg, head_dim_padded=g.dp, grid=(b, h, g.lq_pad // bq),
            in_specs=[fc.tile_block(bq, g.dp), fc.tile_full(g.lk_pad, g.dp),
                      fc.tile_full(g.lk_pad, g.dp), fc.tile_block(bq, g.dp),
                      fc.row_block(bq, cfg), fc.row_block(bq, cfg)],
            out_specs=fc.tile_block(bq, g.dp),
            out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
            name="flash_attention_dq")(qp, kp, vp, dop, lse_p, delta_p)
        dq = fc.unpad(dq, lq, dh)
    if need_dkv:
        bk = g.block_k_bwd
        kernel = functools.partial(_dkdv_kernel, scale=cfg.scale, block_q=g.block_q_bwd)
        dk, dv = fc.call(
            kernel, cfg=cfg, head_dim_padded=g.dp, grid=(b, h, g.lk_pad // bk),
            in_specs=[fc.tile_full(g.lq_pad, g.dp), fc.tile_block(bk, g.dp),
                      fc.tile_block(bk, g.dp), fc.tile_full(g.lq_pad, g.dp),
                      fc.row_full(g.lq_pad, cfg), fc.row_full(g.lq_pad, cfg)],
            out_specs=[fc.tile_block(bk, g.dp), fc.tile_block(bk, g.dp)],
            out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                       jax.ShapeDtypeStruct(vp.shape, v.dtype)],
            name="flash_attention_dkdv")(qp, kp, vp, dop, lse_p, delta_p)
        dk, dv = fc.unpad(dk, k.shape[2], dh), fc.unpad(dv, k.shape[2], dh)
    return dq, dk, dv
