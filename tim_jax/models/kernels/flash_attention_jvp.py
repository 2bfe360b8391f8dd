"""Flash-attention forward-mode kernel: the output and its tangent in one pass.

With S = scale q k^T, P = softmax(S), O = P v and tangents (dq, dk, dv) (Lu & Song 2024, sCM):

    dS = scale (dq k^T + q dk^T)
    dO = P dv + (P * dS) v - rowsum(P * dS) * O

Grid (B, H, Lq_pad / block_q); each program loops over key blocks with the online softmax and
rescales four running quantities by the same ``exp2(m_old - m_new)``: ``sum p`` (l),
``sum p v`` (acc_o), ``sum p*dS`` (r) and ``sum p dv + (p*dS) v`` (acc_t). At the end
``O = acc_o / l`` and ``dO = acc_t / l - (r / l) O``. Tangents that are symbolically zero are
left out statically (``has``), with their matmuls. Outputs in q's dtype, float32 inside.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tim_jax.models.kernels import flash_attention_common as fc


def _jvp_kernel(*refs, scale: float, block_k: int, kv_len: int, has: tuple[bool, bool, bool]):
    """refs: q (block_q, Dp), k, v (Lk_pad, Dp), then the present tangents among
    dq (block_q, Dp), dk, dv (Lk_pad, Dp), then the outputs o, do (block_q, Dp)."""
    q_ref, k_ref, v_ref, *rest = refs
    it = iter(rest)
    dq_ref = next(it) if has[0] else None
    dk_ref = next(it) if has[1] else None
    dv_ref = next(it) if has[2] else None
    o_ref, do_ref = it
    block_q, dp = q_ref.shape
    kv_len_padded = k_ref.shape[0]
    q = q_ref[...]
    dq = dq_ref[...] if has[0] else None
    c = scale * fc.LOG2E

    def body(j, carry):
        acc_o, acc_t, m, l, r = carry
        keys = fc.block_slice(j, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        s = fc.mask_tail_keys(fc.dot_nt(q, k) * c, j * block_k, kv_len, kv_len_padded)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])                   # 0 on padded keys
        l = alpha * l + jnp.sum(p, axis=1)
        acc_o = acc_o * alpha[:, None] + fc.dot_nn(p.astype(v.dtype), v)
        acc_t = acc_t * alpha[:, None]
        if has[0] or has[1]:
            ds = fc.dot_nt(dq, k) if has[0] else None      # padded keys: k = dk = 0, so ds = 0
            if has[1]:
                term = fc.dot_nt(q, dk_ref[keys, :])
                ds = term if ds is None else ds + term
            pds = p * (ds * scale)
            r = alpha * r + jnp.sum(pds, axis=1)
            acc_t = acc_t + fc.dot_nn(pds.astype(v.dtype), v)
        if has[2]:
            dv = dv_ref[keys, :]
            acc_t = acc_t + fc.dot_nn(p.astype(dv.dtype), dv)
        return acc_o, acc_t, m_new, l, r

    zeros_t = jnp.zeros((block_q, dp), jnp.float32)
    zeros_r = jnp.zeros((block_q,), jnp.float32)
    init = (zeros_t, zeros_t, jnp.full((block_q,), -jnp.inf, jnp.float32), zeros_r, zeros_r)
    acc_o, acc_t, _, l, r = lax.fori_loop(0, kv_len_padded // block_k, body, init)
    inv_l = 1.0 / l
    o = acc_o * inv_l[:, None]
    o_ref[...] = o.astype(o_ref.dtype)
    do_ref[...] = (acc_t * inv_l[:, None] - (r * inv_l)[:, None] * o).astype(do_ref.dtype)


def flash_jvp(q, k, v, tangents, cfg: fc.FlashConfig, has: tuple[bool, bool, bool]):
    """``(o, do)``: attention and its tangent, both (B, H, Lq, Dh) in q's dtype.

    ``tangents`` holds the tangents of q, k, v that are present (``has``), in that order, each
    shaped and typed like its primal.
    """
    b, h, lq, dh = q.shape
    g = fc.geometry(cfg, lq, k.shape[2], dh)
    qp = fc.pad_to(q, g.lq_pad, g.dp)
    kp, vp = fc.pad_to(k, g.lk_pad, g.dp), fc.pad_to(v, g.lk_pad, g.dp)
    it = iter(tangents)
    args, specs = [qp, kp, vp], [fc.tile_block(g.block_q, g.dp), fc.tile_full(g.lk_pad, g.dp),
                                 fc.tile_full(g.lk_pad, g.dp)]
    for present, length, spec in ((has[0], g.lq_pad, fc.tile_block(g.block_q, g.dp)),
                                  (has[1], g.lk_pad, fc.tile_full(g.lk_pad, g.dp)),
                                  (has[2], g.lk_pad, fc.tile_full(g.lk_pad, g.dp))):
        if present:
            args.append(fc.pad_to(next(it), length, g.dp))
            specs.append(spec)
    kernel = functools.partial(_jvp_kernel, scale=cfg.scale, block_k=g.block_k, kv_len=g.lk,
                               has=tuple(has))
    sds = jax.ShapeDtypeStruct(qp.shape, q.dtype)
    o, do = fc.call(
        kernel, cfg=cfg, head_dim_padded=g.dp, grid=(b, h, g.lq_pad // g.block_q),
        in_specs=specs, out_specs=[fc.tile_block(g.block_q, g.dp)] * 2, out_shape=[sds, sds],
        name="flash_attention_jvp")(*args)
    return fc.unpad(o, lq, dh), fc.unpad(do, lq, dh)
