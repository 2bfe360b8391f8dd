"""The text-conditional TiM network (official ``tim/models/t2i/tim_model.py``) in Flax NNX.

Same trunk as c2i (``backbone.TiMBackbone``) with two differences:

* conditioning: c = E_t + E_Δ (no pooled text); the caption features (B, M, cap_feat_dim) go
  through ``y_embedder`` = LayerNorm(cap_feat_dim, affine, eps 1e-5) then SwiGLU(cap_feat_dim ->
  4D -> D) per token, and enter the blocks only through cross-attention;
* each block has a cross-attention sub-block between self-attention and the MLP, with 9
  modulation vectors: x += g_c * CrossAttn(modulate(LN_i(x), shift_c, scale_c), LN_t(y)), where
  LN_i / LN_t are affine-free LayerNorms (eps 1e-6), queries are RoPE-rotated, keys are not, and
  no text mask is applied (official behaviour).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tim_jax.models import layers as L
from tim_jax.models.attention_layers import CrossAttention, SelfAttention
from tim_jax.models.backbone import AdaLNBlock, TiMBackbone, mlp_hidden_features, require

Array = jax.Array


class CaptionEmbedder(nnx.Module):
    """Official ``CaptionEmbedder``: ``mlp(norm(cap_feats))``, norm = affine LayerNorm
    (eps 1e-5), mlp = SwiGLU(cap_feat_dim -> 4D -> D) with N(0, 0.02) weights. Runs per token in
    the compute dtype (the norm in float32)."""

    def __init__(self, cap_feat_dim: int, hidden_size: int, *, dtype, precision, rngs: nnx.Rngs):
        self.cap_feat_dim = cap_feat_dim
        self.norm = L.LayerNorm(cap_feat_dim, eps=1e-5, axes=("cond",), rngs=rngs)
        self.mlp = L.SwiGLU(
            cap_feat_dim, 4 * hidden_size, hidden_size, in_axis="cond",
            fc1_init=L.normal(0.02), fc2_init=L.normal(0.02), dtype=dtype, precision=precision,
            rngs=rngs)

    def __call__(self, cap_feats: Array) -> Array:
        return self.mlp(self.norm(cap_feats))


class TiMT2IBlock(AdaLNBlock):
    """t2i block: adaLN-Zero (SwiGLU D -> lora -> 9D, float32, fc2 zero-init) around
    self-attention, caption cross-attention and the SwiGLU MLP."""

    def __init__(self, hidden_size: int, num_heads: int, *, mlp_ratio: float, qk_norm: bool,
                 distance_aware: bool, lora_hidden_size: int, attention_impl: str, dtype,
                 precision, rngs: nnx.Rngs):
        self.dtype = L.resolve_dtype(dtype)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm,
                                    distance_aware=distance_aware,
                                    attention_impl=attention_impl, **kw)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm,
                                           attention_impl=attention_impl, **kw)
        self.mlp = L.SwiGLU(hidden_size, mlp_hidden_features(hidden_size, mlp_ratio),
                            hidden_size, **kw)
        self.adaLN_modulation = L.SwiGLU(
            hidden_size, lora_hidden_size, 9 * hidden_size, fc2_init=L.zeros,
            dtype=jnp.float32, precision=precision, rngs=rngs)

    def __call__(self, x: Array, y: Array, c: Array, delta: Array, rope) -> Array:
        """x (B, N, D) float32; y (B, M, D) caption tokens; c, delta (B, 1, D) float32."""
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3) = jnp.split(self.adaLN_modulation(c), 9, axis=-1)
        y_n = L.layer_norm(y, 1e-6).astype(self.dtype)
        x = self._sub(x, sh1, sc1, g1, lambda h: self.attn(h, rope, delta))
        x = self._sub(x, sh2, sc2, g2, lambda h: self.cross_attn(h, y_n, rope))
        return self._sub(x, sh3, sc3, g3, self.mlp)


class TiMT2I(TiMBackbone):
    """Text-conditional TiM (the 865M flagship at the official size). Call:
    ``model(x_t, t, r, cap_feats, return_proj=False)`` with x_t (B, H, W, C) NHWC, t, r (B,)
    float32, cap_feats (B, M, cap_feat_dim) float (e.g. Gemma-3-1B last hidden states; the CFG
    null condition is the encoding of the empty caption). Returns F (B, H, W, C) float32, or
    (F, h_proj (B, N, z_dim) float32)."""

    def __init__(self, *, cap_feat_dim: int = 1152, rngs: nnx.Rngs | int, **trunk):
        """``trunk``: the :class:`TiMBackbone` arguments; the t2i defaults differ in
        input_size 16, patch_size 1, in_channels 32 (DC-AE f32c32 latents)."""
        require(isinstance(cap_feat_dim, int) and cap_feat_dim >= 1,
                f"cap_feat_dim={cap_feat_dim!r} must be a positive int")
        trunk = {"input_size": 16, "patch_size": 1, "in_channels": 32, **trunk}
        super().__init__(
            block_factory=TiMT2IBlock,
            y_embedder_factory=lambda hidden_size, keys: CaptionEmbedder(
                cap_feat_dim, hidden_size, dtype=trunk.get("dtype", "float32"),
                precision=L.resolve_precision(trunk.get("matmul_precision")), rngs=keys),
            rngs=rngs, **trunk)
        self.cap_feat_dim = cap_feat_dim

    def __call__(self, x: Array, t, r, cap_feats, *, return_proj: bool = False):
        cap_feats = jnp.asarray(cap_feats)
        if cap_feats.ndim != 3 or cap_feats.shape[0] != x.shape[0] \
                or cap_feats.shape[-1] != self.cap_feat_dim:
            raise ValueError(
                f"t2i cond must be caption features (B, M, cap_feat_dim)=({x.shape[0]}, M, "
                f"{self.cap_feat_dim}); got {tuple(cap_feats.shape)}")
        if not jnp.issubdtype(cap_feats.dtype, jnp.floating):
            raise ValueError(f"t2i cond must be floating point; got dtype {cap_feats.dtype}")

        def cond_fn(emb_t, delta):
            return emb_t + delta, (self.y_embedder(cap_feats),)

        return self._forward(x, t, r, cond_fn=cond_fn, return_proj=return_proj)
