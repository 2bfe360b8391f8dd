"""The attention layers of the TiM networks (Flax NNX): the interval-aware self-attention and
the caption cross-attention. Every one calls :func:`tim_jax.models.attention.attention` in the
heads-first layout (B, H, L, Dh); q and k go through QK-norm and RoPE in float32
(:func:`tim_jax.models.rope.norm_rope`) before the rounding to the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tim_jax.models.attention import attention
from tim_jax.models.layers import Dense, LayerNorm, resolve_dtype
from tim_jax.models.matmul import matmul
from tim_jax.models.rope import norm_rope, scaled_rope

Array = jax.Array


def project_heads(dense: Dense, x: Array, parts: int, num_heads: int,
                  bias_offset: Array | None = None, out_dtype=None) -> list[Array]:
    """A fused projection (``dense``: in -> parts * H * Dh, columns ordered (parts, H, Dh))
    written straight in the heads-first layout: x (B, L, in) -> ``parts`` arrays (B, H, L, Dh)
    in ``out_dtype`` (default ``dense.dtype``). ``bias_offset`` (B, 1, parts * H * Dh) float32
    is added to the bias before the single rounding (one row per sample, e.g. the
    interval-aware term). The heads-first transpose is part of the product, before the
    rounding."""
    b, n, _ = x.shape
    kernel = dense.kernel[...]
    dh = kernel.shape[-1] // (parts * num_heads)
    bias = None if dense.bias is None else dense.bias[...].astype(jnp.float32)
    if bias_offset is not None:
        bias = bias_offset if bias is None else bias_offset + bias
        bias = bias.reshape(b, parts, num_heads, 1, dh).transpose(1, 0, 2, 3, 4)
    elif bias is not None:
        bias = bias.reshape(parts, 1, num_heads, 1, dh)
    y = matmul("bni,ithd->tbhnd", x, kernel.reshape(-1, parts, num_heads, dh),
               dtype=dense.dtype, precision=dense.precision, bias=bias,
               out_dtype=dense.dtype if out_dtype is None else out_dtype)
    # jnp.split: its backward is ONE concatenation (indexing would add zero-padded parts)
    return [p[0] for p in jnp.split(y, parts, axis=0)]


class SelfAttention(nnx.Module):
    """Official TiM ``Attention``: fused qkv (bias) + the interval-aware projection ``qkv_d`` of
    the Δt embedding (no bias; ``distance_aware``), LayerNorm QK-norm over head_dim (affine,
    eps 1e-5, torch default), 2D RoPE on q and k, softmax attention, output ``proj``.

    qkv columns are ordered (3, heads, head_dim): q = [0, D), k = [D, 2D), v = [2D, 3D).
    """

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: bool, distance_aware: bool,
        attention_impl: str = "xla", dtype=jnp.float32, precision=None, rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_impl = attention_impl
        self.dtype = resolve_dtype(dtype)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.qkv = Dense(dim, 3 * dim, axes=("embed", "heads"), **kw)
        self.qkv_d = (Dense(dim, 3 * dim, axes=("embed", "heads"), use_bias=False, **kw)
                      if distance_aware else None)
        self.q_norm = LayerNorm(self.head_dim, eps=1e-5, rngs=rngs) if qk_norm else None
        self.k_norm = LayerNorm(self.head_dim, eps=1e-5, rngs=rngs) if qk_norm else None
        self.proj = Dense(dim, dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, rope: tuple[Array, Array], delta: Array | None = None) -> Array:
        """x (B, L, D) in dtype; rope = (cos, sin) (L, head_dim); delta (B, 1, D) float32 Δt
        embedding (used when distance_aware). Returns (B, L, D) in dtype."""
        b, n, d = x.shape
        # the interval-aware term W_d·emb(Δt) is one bias row per sample of the qkv matmul
        offset = None
        if self.qkv_d is not None:
            offset = matmul("bji,io->bjo", delta, self.qkv_d.kernel[...], dtype=self.dtype,
                            precision=self.qkv_d.precision)
        # q and k go on in float32 (QK-norm, RoPE); only v is rounded to the compute dtype
        q, k, v = project_heads(self.qkv, x, 3, self.num_heads, offset,
                                out_dtype=jnp.float32)                    # (B, H, L, Dh)
        v = v.astype(self.dtype)
        q = norm_rope(q, self.q_norm, *scaled_rope(rope, self.head_dim), self.dtype)
        k = norm_rope(k, self.k_norm, *rope, self.dtype)
        o = attention(q, k, v, impl=self.attention_impl, scale=1.0)
        o = o.transpose(0, 2, 1, 3).reshape(b, n, d)
        return self.proj(o)


class CrossAttention(nnx.Module):
    """Official t2i ``CrossAttention``: q from the image tokens, fused kv from the caption tokens
    (both with bias), LayerNorm QK-norm (eps 1e-5), RoPE on q ONLY (keys are not rotated), no
    mask, output ``proj``. kv columns are ordered (2, heads, head_dim)."""

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: bool, attention_impl: str = "xla",
        dtype=jnp.float32, precision=None, rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_impl = attention_impl
        self.dtype = resolve_dtype(dtype)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.q = Dense(dim, dim, axes=("embed", "heads"), **kw)
        self.kv = Dense(dim, 2 * dim, axes=("embed", "kv"), **kw)
        self.q_norm = LayerNorm(self.head_dim, eps=1e-5, rngs=rngs) if qk_norm else None
        self.k_norm = LayerNorm(self.head_dim, eps=1e-5, rngs=rngs) if qk_norm else None
        self.proj = Dense(dim, dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, y: Array, rope: tuple[Array, Array]) -> Array:
        """x (B, N, D) image tokens, y (B, M, D) caption tokens; rope tables (N, head_dim).
        Returns (B, N, D) in dtype."""
        b, n, d = x.shape
        (q,) = project_heads(self.q, x, 1, self.num_heads, out_dtype=jnp.float32)  # -> RoPE
        k, v = project_heads(self.kv, y, 2, self.num_heads)
        q = norm_rope(q, self.q_norm, *scaled_rope(rope, self.head_dim), self.dtype)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.astype(self.dtype)
        o = attention(q, k, v, impl=self.attention_impl, scale=1.0)
        o = o.transpose(0, 2, 1, 3).reshape(b, n, d)
        return self.proj(o)


