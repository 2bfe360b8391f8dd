"""DINOv2 (transformers ``Dinov2Model``) as a frozen Flax NNX encoder: a REPA target encoder.

Supports plain ``Dinov2Model`` Hub folders (``model_type: dinov2``: ``facebook/dinov2-*``),
with the GELU MLP or the SwiGLU FFN (``use_swiglu_ffn``). ``Dinov2WithRegisters``
(``model_type: dinov2_with_registers``) is a different architecture and is refused.

Computation (transformers' eager path, inference mode)::

    tokens = [CLS, conv_p(x) row-major] + [pos_cls, bicubic(pos_grid -> H/p x W/p)]
    tokens = Block^L(tokens)          # pre-norm, LayerScale, MLP or SwiGLU (see vit.py)
    last_hidden_state = LayerNorm(tokens)

The patch position embeddings are stored for ``image_size / patch_size`` squared; any other
grid is obtained as transformers does: torch bicubic (align_corners=False, antialias off) of
the square grid to ``(H // p, W // p)`` in float32 (see resize.py).

REPA target (:meth:`Dinov2Encoder.patch_features`): images in [-1, 1] are mapped to [0, 1],
normalised with the ImageNet mean/std, bicubic-resized (REPA: 224 px per 256 px of input) and
encoded; the patch tokens (no CLS) are the target, gradient stopped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub
from tim_jax.encoders.resize import resize_bicubic
from tim_jax.encoders.vit import (Dense, EncoderWeight, LayerNorm, TorchWeights, Trunk,
                                  ViTConfig, assign, conv_weight_to_patch_kernel, patchify)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: relative-to-scale tolerance of :func:`parity_check` (fp32)
PARITY_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The ``config.json`` fields the computation depends on."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    mlp_ratio: float
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False

    @classmethod
    def from_hub(cls, config: dict) -> "Dinov2Config":
        """Validate a transformers config dict; ValueError naming the unsupported value."""
        model_type = config.get("model_type")
        if model_type != "dinov2":
            raise ValueError(f"expected a Dinov2Model config (model_type 'dinov2'), got "
                             f"model_type {model_type!r}; Dinov2WithRegisters and other "
                             "variants are not supported")
        if not config.get("use_swiglu_ffn", False) and config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r} (only 'gelu')")
        for key in ("image_size", "patch_size"):
            if not isinstance(config.get(key), int):
                raise ValueError(f"config {key} must be an int, got {config.get(key)!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:6] if n not in config]
        if missing:
            raise ValueError(f"DINOv2 config.json lacks {missing}")
        return cls(**{n: config[n] for n in names if n in config})

    @property
    def grid(self) -> int:
        """Side of the stored square position-embedding grid."""
        return self.image_size // self.patch_size

    def vit(self) -> ViTConfig:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:   # transformers' Dinov2SwiGLUFFN rounding
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return ViTConfig(width=self.hidden_size, depth=self.num_hidden_layers,
                         heads=self.num_attention_heads, mlp_hidden=hidden,
                         swiglu=self.use_swiglu_ffn, layerscale=True,
                         qkv_bias=self.qkv_bias, eps=self.layer_norm_eps)


class Dinov2Encoder(nnx.Module):
    """transformers ``Dinov2Model`` forward in NNX (frozen weights, see vit.EncoderWeight)."""

    def __init__(self, config: Dinov2Config, *, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = Dense(p * p * config.num_channels, d, dtype=dtype)
        self.cls_token = EncoderWeight(jnp.zeros((1, d), jnp.float32))
        self.pos_embed = EncoderWeight(jnp.zeros((1 + config.grid ** 2, d), jnp.float32))
        self.trunk = Trunk(config.vit(), dtype=dtype)
        self.norm = LayerNorm(d, eps=config.layer_norm_eps, dtype=jnp.float32)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32) -> "Dinov2Encoder":
        """Build from a transformers Hub folder (``config.json`` + ``model.safetensors``)."""
        config = Dinov2Config.from_hub(hub.read_config(folder))
        model = cls(config, dtype=dtype)
        model.load_torch_state(hub.read_weights(folder), what=f"DINOv2 {Path(folder)}")
        return model

    def load_torch_state(self, state: dict, what: str = "DINOv2") -> None:
        """Load a ``Dinov2Model`` state dict (keys with a ``dinov2.`` prefix, as saved by
        ``Dinov2ForImageClassification``, are accepted; its classifier is ignored)."""
        if any(k.startswith("dinov2.") for k in state):
            state = {k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}
        w = TorchWeights(state, what)
        conv = w.take("embeddings.patch_embeddings.projection.weight")
        assign(self.patch_embed.kernel, None if conv is None else conv_weight_to_patch_kernel(conv),
               "embeddings.patch_embeddings.projection.weight")
        assign(self.patch_embed.bias, w.take("embeddings.patch_embeddings.projection.bias"),
               "embeddings.patch_embeddings.projection.bias")
        cls_tok = w.take("embeddings.cls_token")
        assign(self.cls_token, None if cls_tok is None else cls_tok.reshape(1, -1),
               "embeddings.cls_token")
        pos = w.take("embeddings.position_embeddings")
        if pos is not None and pos.shape[1] != self.pos_embed[...].shape[0]:
            raise ValueError(f"{what}: position_embeddings hold {pos.shape[1] - 1} patch "
                             f"positions, config image_size/patch_size gives "
                             f"{self.config.grid}^2 = {self.config.grid ** 2}")
        assign(self.pos_embed, None if pos is None else pos[0], "embeddings.position_embeddings")
        for i, block in enumerate(self.trunk.blocks):
            pre = f"encoder.layer.{i}"
            block.norm1.load_torch(w, f"{pre}.norm1")
            block.norm2.load_torch(w, f"{pre}.norm2")
            att = f"{pre}.attention.attention"
            parts = [w.take(f"{att}.{n}.weight") for n in ("query", "key", "value")]
            if all(q is not None for q in parts):
                assign(block.attn.qkv.kernel, np.concatenate(parts, 0).T, f"{att}.qkv.weight")
            if block.attn.qkv.bias is not None:
                biases = [w.take(f"{att}.{n}.bias") for n in ("query", "key", "value")]
                if all(q is not None for q in biases):
                    assign(block.attn.qkv.bias, np.concatenate(biases), f"{att}.qkv.bias")
            block.attn.proj.load_torch(w, f"{pre}.attention.output.dense")
            assign(block.ls1, w.take(f"{pre}.layer_scale1.lambda1"), f"{pre}.layer_scale1")
            assign(block.ls2, w.take(f"{pre}.layer_scale2.lambda1"), f"{pre}.layer_scale2")
            if self.config.use_swiglu_ffn:
                block.ffn.w_in.load_torch(w, f"{pre}.mlp.weights_in")
                block.ffn.w_out.load_torch(w, f"{pre}.mlp.weights_out")
            else:
                block.ffn.fc1.load_torch(w, f"{pre}.mlp.fc1")
                block.ffn.fc2.load_torch(w, f"{pre}.mlp.fc2")
        self.norm.load_torch(w, "layernorm")
        # mask_token: pre-training only; classifier: the classification head
        w.finish(ignore=("embeddings.mask_token", "classifier.", "pooler."))

    # -- forward ---------------------------------------------------------------------------
    def position_embeddings(self, grid_h: int, grid_w: int) -> jax.Array:
        """(1 + grid_h*grid_w, D) float32: CLS position then the patch grid, row-major,
        bicubic-interpolated from the stored square grid when the grid differs."""
        s, d = self.config.grid, self.config.hidden_size
        pos = self.pos_embed[...]
        patch = resize_bicubic(pos[1:].reshape(s, s, d), (grid_h, grid_w))
        return jnp.concatenate([pos[:1], patch.reshape(grid_h * grid_w, d)], axis=0)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, H, W, C) NHWC, already normalised -> last_hidden_state
        (B, 1 + (H//p)*(W//p), D) float32: CLS first, then patch tokens row-major."""
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(f"expected pixel_values (B, H, W, {cfg.num_channels}) NHWC, got "
                             f"shape {pixel_values.shape}")
        b, h, w, _ = pixel_values.shape
        p = cfg.patch_size
        if h < p or w < p:
            raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
        x = self.patch_embed(patchify(pixel_values, p))
        cls_tok = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls_tok, x], axis=1)
        x = x + self.position_embeddings(h // p, w // p).astype(x.dtype)
        x = self.trunk(x)
        return self.norm(x)

    def patch_features(self, images: jax.Array, size=None) -> jax.Array:
        """REPA target. images (B, H, W, 3) in [-1, 1] -> patch tokens (B, N, D) float32,
        N = (size_h // p) * (size_w // p); gradient stopped.

        size: resize target in pixels (int or (h, w)); default REPA's rule for square inputs,
        ``224 * (H // 256)`` (256 -> 224, 512 -> 448). Images are normalised with the ImageNet
        mean/std and then bicubic-resized (torch semantics), as REPA does.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3) in [-1, 1], got shape {images.shape}")
        if size is None:
            size = repa_size(*images.shape[1:3])
        x = (images.astype(jnp.float32) + 1.0) / 2.0
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = resize_bicubic(x, size)
        return jax.lax.stop_gradient(self(x)[:, 1:])


def repa_size(height: int, width: int) -> int:
    """REPA's DINOv2 input size for square images: ``224 * (H // 256)`` (256 -> 224,
    512 -> 448); ValueError for other images (pass ``size=`` explicitly)."""
    if height != width or height < 256:
        raise ValueError(f"no default REPA size for {height}x{width} images (REPA's rule "
                         "224 * (H // 256) needs square images of >= 256 px): pass size=")
    return 224 * (height // 256)


def parity_check(folder) -> dict:
    """Run the encoder of ``folder`` (a Dinov2Model Hub folder with ``io.npz``: pixel_values
    NCHW, last_hidden_state) and compare. Returns ``{"last_hidden_state": {"max_abs_err",
    "max_rel_err", "tolerance", "passed"}}``; the relative error is max|diff| / max|ref|."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.is_file():
        raise FileNotFoundError(f"{folder} has no io.npz (reference inputs/outputs)")
    io = np.load(io_path)
    for key in ("pixel_values", "last_hidden_state"):
        if key not in io:
            raise ValueError(f"{io_path} lacks {key!r} (has {sorted(io.files)})")
    model = Dinov2Encoder.from_pretrained(folder)
    forward = nnx.jit(lambda m, x: m(x))
    ours = np.asarray(forward(model, jnp.asarray(io["pixel_values"]).transpose(0, 2, 3, 1)))
    ref = io["last_hidden_state"]
    if ours.shape != ref.shape:
        raise ValueError(f"output shape {ours.shape} differs from the reference {ref.shape}")
    err = float(np.abs(ours - ref).max())
    rel = err / float(np.abs(ref).max())
    return {"last_hidden_state": {"max_abs_err": err, "max_rel_err": rel,
                                  "tolerance": PARITY_TOLERANCE,
                                  "passed": bool(rel <= PARITY_TOLERANCE)}}
