"""Flash-attention forward kernel: online softmax over key blocks, float32 accumulation.

Grid (B, H, Lq_pad / block_q): one program per query block of one head; it keeps its q tile,
loops over the key/value blocks (``lax.fori_loop``) with the running max ``m``, the running
sum ``l`` and the unnormalised output ``acc``, and writes ``o = acc / l`` in q's dtype and the
base-2 log-sum-exp ``lse = m + log2(l)`` (float32), which the backward kernels use to rebuild
the probabilities ``P = exp2(s * scale * log2(e) - lse)`` without a softmax pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tim_jax.models.kernels import flash_attention_common as fc


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *lse_refs, scale: float, block_k: int,
                    kv_len: int):
    """q_ref (block_q, Dp); k_ref/v_ref (Lk_pad, Dp); o_ref (block_q, Dp); lse_ref (block_q,) or
    (block_q, 1) (see ``rows_as_column``)."""
    block_q, dp = q_ref.shape
    kv_len_padded = k_ref.shape[0]
    q = q_ref[...]
    c = scale * fc.LOG2E

    def body(j, carry):
        acc, m, l = carry
        keys = fc.block_slice(j, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        s = fc.dot_nt(q, k) * c
        s = fc.mask_tail_keys(s, j * block_k, kv_len, kv_len_padded)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + fc.dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (jnp.zeros((block_q, dp), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(0, kv_len_padded // block_k, body, init)
    o_ref[...] = (acc * (1.0 / l)[:, None]).astype(o_ref.dtype)
    if lse_refs:
        lse_refs[0][...] = (m + jnp.log2(l)).reshape(lse_refs[0].shape)


def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, cfg: fc.FlashConfig, *,
                  return_lse: bool = True):
    """Softmax attention ``o`` (B, H, Lq, Dh) in q's dtype, and with ``return_lse`` also the
    base-2 log-sum-exp of the scaled logits, (B, H, Lq) float32."""
    b, h, lq, dh = q.shape
    g = fc.geometry(cfg, lq, k.shape[2], dh)
    qp = fc.pad_to(q, g.lq_pad, g.dp)
    kp, vp = fc.pad_to(k, g.lk_pad, g.dp), fc.pad_to(v, g.lk_pad, g.dp)
    out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype)]
    out_specs = [fc.tile_block(g.block_q, g.dp)]
    if return_lse:
        rows = (b, h, g.lq_pad, 1) if fc.rows_as_column(cfg) else (b, h, g.lq_pad)
        out_shape.append(jax.ShapeDtypeStruct(rows, jnp.float32))
        out_specs.append(fc.row_block(g.block_q, cfg))
    kernel = functools.partial(_forward_kernel, scale=cfg.scale, block_k=g.block_k, kv_len=g.lk)
    outs = fc.call(
        kernel, cfg=cfg, head_dim_padded=g.dp, grid=(b, h, g.lq_pad // g.block_q),
        in_specs=[fc.tile_block(g.block_q, g.dp), fc.tile_full(g.lk_pad, g.dp),
                  fc.tile_full(g.lk_pad, g.dp)],
        out_specs=out_specs, out_shape=out_shape, name="flash_attention_fwd")(qp, kp, vp)
    o = fc.unpad(outs[0], lq, dh)
    if not return_lse:
        return o
    return o, fc.unpad(fc.rows_from_kernel_layout(outs[1]), lq)
