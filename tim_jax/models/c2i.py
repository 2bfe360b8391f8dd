"""The class-conditional TiM network (official ``tim/models/c2i/tim_model.py``) in Flax NNX:
the shared trunk (``backbone.TiMBackbone``) with a label embedding added to the conditioning
vector and blocks of adaLN-Zero around interval-aware self-attention and the SwiGLU MLP.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tim_jax.models import layers as L
from tim_jax.models.attention_layers import SelfAttention
from tim_jax.models.backbone import (NEW_CONDITIONS, AdaLNBlock, TiMBackbone,
                                     mlp_hidden_features, require)

Array = jax.Array

__all__ = ["NEW_CONDITIONS", "LabelEmbedder", "TiMBlock", "TiMC2I"]


class TiMBlock(AdaLNBlock):
    """c2i block: adaLN-Zero around interval-aware self-attention and the SwiGLU MLP.

    adaLN_modulation = SwiGLU(D -> lora_hidden_size -> 6D) on c (float32, fc2 zero-init) giving
    (shift, scale, gate) for attention then MLP. MLP = SwiGLU(D -> int(D*mlp_ratio)*2//3 -> D).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, mlp_ratio: float, qk_norm: bool,
                 distance_aware: bool, lora_hidden_size: int, attention_impl: str, dtype,
                 precision, rngs: nnx.Rngs):
        self.dtype = L.resolve_dtype(dtype)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm,
                                    distance_aware=distance_aware,
                                    attention_impl=attention_impl, **kw)
        self.mlp = L.SwiGLU(hidden_size, mlp_hidden_features(hidden_size, mlp_ratio),
                            hidden_size, **kw)
        self.adaLN_modulation = L.SwiGLU(
            hidden_size, lora_hidden_size, 6 * hidden_size, fc2_init=L.zeros,
            dtype=jnp.float32, precision=precision, rngs=rngs)

    def __call__(self, x: Array, c: Array, delta: Array, rope) -> Array:
        """x (B, N, D) float32, c and delta (B, 1, D) float32, rope (cos, sin) (N, Dh)."""
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.adaLN_modulation(c), 6, axis=-1)
        x = self._sub(x, sh1, sc1, g1, lambda h: self.attn(h, rope, delta))
        return self._sub(x, sh2, sc2, g2, self.mlp)


class LabelEmbedder(nnx.Module):
    """Official ``LabelEmbedder``: ``embedding_table`` with num_classes (+1 null row when
    class_dropout_prob > 0) rows, N(0, 0.02) init. Label dropout is done by the objective."""

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float, *,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        rows = num_classes + int(class_dropout_prob > 0)
        self.embedding_table = L.Embed(rows, hidden_size, axes=("vocab", "embed"),
                                       init=L.normal(0.02), rngs=rngs)

    def __call__(self, labels: Array) -> Array:
        return self.embedding_table(labels)


class TiMC2I(TiMBackbone):
    """Class-conditional TiM. Constructor arguments use the official names; see
    ``presets.py`` for the official sizes. Call: ``model(x_t, t, r, labels, return_proj=False)``
    with x_t (B, H, W, C) NHWC, t, r (B,) float32, labels (B,) int (``num_classes`` = null class,
    present when class_dropout_prob > 0). Returns F (B, H, W, C) float32, or (F, h_proj) with
    h_proj (B, N, z_dim) float32."""

    def __init__(self, *, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 rngs: nnx.Rngs | int, **trunk):
        """``trunk``: the :class:`TiMBackbone` arguments (official names and defaults)."""
        require(isinstance(num_classes, int) and num_classes >= 1,
                f"num_classes={num_classes!r} must be a positive int")
        super().__init__(
            block_factory=TiMBlock,
            y_embedder_factory=lambda hidden_size, keys: LabelEmbedder(
                num_classes, hidden_size, class_dropout_prob, rngs=keys),
            rngs=rngs, **trunk)
        self.num_classes = num_classes

    def __call__(self, x: Array, t, r, y, *, return_proj: bool = False):
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"c2i cond must be integer class labels; got dtype {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"c2i cond must have shape (B,)=({x.shape[0]},); got {tuple(y.shape)}")

        def cond_fn(emb_t, delta):
            return emb_t + delta + self.y_embedder(y)[:, None, :], ()

        return self._forward(x, t, r, cond_fn=cond_fn, return_proj=return_proj)
