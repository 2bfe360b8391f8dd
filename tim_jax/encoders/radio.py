"""NVIDIA RADIO (v2.5, timm-ViT backbone with RADIO's CPE patch generator) as a frozen Flax NNX
encoder: the REPA target encoder of the official TiM recipe (``radio-v2.5-b_half.pth.tar``).

Weights: a folder written by :func:`tim_jax.encoders.radio_convert.convert_radio_checkpoint`
(``config.json`` + ``model.safetensors``; the conversion alone needs torch, once).

Computation (RADIO's ``RADIOModel.forward`` in eval mode)::

    x      = (images - mean) / std                   # input conditioner, images in [0, 1]
    tokens = Linear(patches(x)) + pos(H/p, W/p)      # patches: non-overlapping p x p, row-major
    tokens = [cls_0..cls_{T-1}, reg_0..reg_{R-1}, tokens]   (then LayerNorm if patch_norm)
    y      = Block^L(tokens)  (then the final norm only if the checkpoint kept it)
    summary  = y[:, summary_idxs].flatten      (B, len(summary_idxs) * D)
    features = y[:, T + R:]                    (B, N, D)  (then the feature normaliser if any)

Position embeddings are stored on a ``max_grid`` (cpe_max_size / p squared). For another input
grid (gh, gw) in CPE mode they are bilinearly resized (align_corners=True) to
``max(gh, gw)`` squared and the top-left gh x gw window is kept; a grid equal to ``max_grid``
uses them as stored.

REPA target as the official TiM trainer takes it (:meth:`RadioEncoder.patch_features`): images
in [-1, 1] -> (x + 1) / 2 -> torch-bicubic resize to (tokens per side * p) -> ``features``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub
from tim_jax.encoders.resize import resize_bicubic, resize_bilinear_align_corners
from tim_jax.encoders.vit import (Dense, EncoderWeight, LayerNorm, TorchWeights, Trunk,
                                  ViTConfig, assign, conv_weight_to_patch_kernel, patchify)

#: relative-to-scale tolerance of :func:`parity_check` (fp32)
PARITY_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class RadioConfig:
    """The converted ``config.json`` (see radio_convert.radio_config for each field)."""
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    max_grid: tuple
    num_cls_tokens: int
    num_registers: int
    summary_idxs: tuple
    cpe_mode: bool = True
    qkv_bias: bool = True
    layerscale: bool = False
    layer_norm_eps: float = 1e-6
    patch_norm: bool = False
    patch_norm_eps: float = 1e-5
    embedder_bias: bool = False
    final_norm: bool = False
    feature_normalizer: bool = False

    @classmethod
    def from_hub(cls, config: dict) -> "RadioConfig":
        if config.get("model_type") != "radio_vit":
            raise ValueError(f"expected a converted RADIO folder (model_type 'radio_vit'), got "
                             f"model_type {config.get('model_type')!r}; convert the .pth.tar with "
                             "tim_jax.encoders.radio_convert first")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:9] if n not in config]
        if missing:
            raise ValueError(f"RADIO config.json lacks {missing}")
        values = {n: config[n] for n in names if n in config}
        values["max_grid"] = tuple(values["max_grid"])
        values["summary_idxs"] = tuple(values["summary_idxs"])
        bad = [i for i in values["summary_idxs"] if not 0 <= i < values["num_cls_tokens"]]
        if bad:
            raise ValueError(f"summary_idxs {bad} outside the {values['num_cls_tokens']} "
                             "class tokens")
        return cls(**values)

    @property
    def num_skip(self) -> int:
        """Class + register tokens ahead of the patch tokens."""
        return self.num_cls_tokens + self.num_registers

    def vit(self) -> ViTConfig:
        return ViTConfig(width=self.embed_dim, depth=self.depth, heads=self.num_heads,
                         mlp_hidden=self.mlp_hidden, swiglu=False, layerscale=self.layerscale,
                         qkv_bias=self.qkv_bias, eps=self.layer_norm_eps)


class RadioEncoder(nnx.Module):
    """RADIO ViT forward in NNX (frozen weights, see vit.EncoderWeight)."""

    def __init__(self, config: RadioConfig, *, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        d, p = config.embed_dim, config.patch_size
        rows, cols = config.max_grid
        self.norm_mean = EncoderWeight(jnp.zeros((3,), jnp.float32))
        self.norm_std = EncoderWeight(jnp.ones((3,), jnp.float32))
        self.embedder = Dense(p * p * 3, d, bias=config.embedder_bias, dtype=dtype)
        self.pos_embed = EncoderWeight(jnp.zeros((rows * cols, d), jnp.float32))
        self.prefix_tokens = EncoderWeight(jnp.zeros((config.num_skip, d), jnp.float32))
        self.patch_norm = (LayerNorm(d, eps=config.patch_norm_eps, dtype=dtype)
                           if config.patch_norm else None)
        self.trunk = Trunk(config.vit(), dtype=dtype)
        self.norm = LayerNorm(d, eps=config.layer_norm_eps) if config.final_norm else None
        if config.feature_normalizer:
            self.feat_mean = EncoderWeight(jnp.zeros((d,), jnp.float32))
            self.feat_tx = EncoderWeight(jnp.eye(d, dtype=jnp.float32))
        else:
            self.feat_mean = self.feat_tx = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32) -> "RadioEncoder":
        """Build from a converted folder (``config.json`` + ``model.safetensors``)."""
        config = RadioConfig.from_hub(hub.read_config(folder))
        model = cls(config, dtype=dtype)
        model.load_torch_state(hub.read_weights(folder), what=f"RADIO {Path(folder)}")
        return model

    def load_torch_state(self, state: dict, what: str = "RADIO") -> None:
        """Load the converted tensors (RADIO's names, ``base_model.`` dropped)."""
        cfg, w = self.config, TorchWeights(state, what)
        pos = w.take("patch_generator.pos_embed")
        if pos is not None and pos.shape[1] != self.pos_embed[...].shape[0]:
            rows, cols = cfg.max_grid
            raise ValueError(f"{what}: pos_embed holds {pos.shape[1]} positions, config max_grid "
                             f"{rows}x{cols} needs {rows * cols}")
        assign(self.pos_embed, None if pos is None else pos[0], "patch_generator.pos_embed")
        tok = w.take("patch_generator.cls_token.token")
        if tok is not None and tok.shape[0] != cfg.num_skip:
            raise ValueError(f"{what}: cls_token.token has {tok.shape[0]} rows, config gives "
                             f"{cfg.num_cls_tokens} class + {cfg.num_registers} register tokens")
        assign(self.prefix_tokens, tok, "patch_generator.cls_token.token")
        emb = w.take("patch_generator.embedder.weight")       # (D, 3*p*p), inner order (c, y, x)
        if emb is not None:
            p = cfg.patch_size
            emb = conv_weight_to_patch_kernel(emb.reshape(emb.shape[0], 3, p, p))
        assign(self.embedder.kernel, emb, "patch_generator.embedder.weight")
        if self.embedder.bias is not None:
            assign(self.embedder.bias, w.take("patch_generator.embedder.bias"),
                   "patch_generator.embedder.bias")
        if self.patch_norm is not None:
            self.patch_norm.load_torch(w, "patch_generator.patch_normalizer")
        for i, block in enumerate(self.trunk.blocks):
            pre = f"blocks.{i}"
            block.norm1.load_torch(w, f"{pre}.norm1")
            block.norm2.load_torch(w, f"{pre}.norm2")
            block.attn.qkv.load_torch(w, f"{pre}.attn.qkv")
            block.attn.proj.load_torch(w, f"{pre}.attn.proj")
            block.ffn.fc1.load_torch(w, f"{pre}.mlp.fc1")
            block.ffn.fc2.load_torch(w, f"{pre}.mlp.fc2")
            if cfg.layerscale:   # timm's LayerScale names it gamma, RADIO's copy grandma
                for var, ls in ((block.ls1, "ls1"), (block.ls2, "ls2")):
                    key = next((f"{pre}.{ls}.{n}" for n in ("grandma", "gamma")
                                if f"{pre}.{ls}.{n}" in w), f"{pre}.{ls}.gamma")
                    assign(var, w.take(key), key)
        if self.norm is not None:
            self.norm.load_torch(w, "norm")
        for var, key in ((self.norm_mean, "input_conditioner.norm_mean"),
                         (self.norm_std, "input_conditioner.norm_std")):
            value = w.take(key)
            assign(var, None if value is None else value.reshape(3), key)
        if self.feat_mean is not None:
            assign(self.feat_mean, w.take("feature_normalizer.mean"), "feature_normalizer.mean")
            assign(self.feat_tx, w.take("feature_normalizer.tx"), "feature_normalizer.tx")
        w.finish()

    # -- forward ---------------------------------------------------------------------------
    def position_embeddings(self, grid_h: int, grid_w: int) -> jax.Array:
        """(grid_h * grid_w, D) float32 patch position embeddings for an input grid (eval)."""
        cfg = self.config
        rows, cols = cfg.max_grid
        pos = self.pos_embed[...]
        if (rows, cols) == (grid_h, grid_w):
            return pos
        grid = pos.reshape(rows, cols, -1)
        if cfg.cpe_mode:
            side = max(grid_h, grid_w)
            grid = resize_bilinear_align_corners(grid, (side, side))[:grid_h, :grid_w]
        else:
            grid = grid[:grid_h, :grid_w]
            grid = resize_bilinear_align_corners(grid, (grid_h, grid_w))
        return grid.reshape(grid_h * grid_w, -1)

    def tokens(self, x: jax.Array) -> jax.Array:
        """Conditioned images (B, H, W, 3) -> all output tokens (B, num_skip + N, D)."""
        p = self.config.patch_size
        b, h, w, _ = x.shape
        t = self.embedder(patchify(x, p))
        t = t + self.position_embeddings(h // p, w // p).astype(t.dtype)
        prefix = jnp.broadcast_to(self.prefix_tokens[...].astype(t.dtype),
                                  (b,) + self.prefix_tokens[...].shape)
        t = jnp.concatenate([prefix, t], axis=1)
        if self.patch_norm is not None:
            t = self.patch_norm(t)
        t = self.trunk(t)
        return self.norm(t) if self.norm is not None else t.astype(jnp.float32)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, 3) NHWC in [0, 1], H and W multiples of the patch size ->
        (summary (B, len(summary_idxs) * D), features (B, (H/p)*(W/p), D)), float32."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3) NHWC in [0, 1], got {images.shape}")
        h, w = images.shape[1:3]
        p = cfg.patch_size
        if h % p or w % p or h == 0 or w == 0:
            near = (max(p, round(h / p) * p), max(p, round(w / p) * p))
            raise ValueError(f"RADIO input {h}x{w} is not a multiple of the patch size {p}; "
                             f"nearest supported resolution {near[0]}x{near[1]}")
        x = (images.astype(jnp.float32) - self.norm_mean[...]) / self.norm_std[...]
        y = self.tokens(x)
        summary = y[:, :cfg.num_cls_tokens][:, np.asarray(cfg.summary_idxs)]
        features = y[:, cfg.num_skip:]
        if self.feat_mean is not None:
            features = jnp.einsum("bnd,ed->bne", features - self.feat_mean[...], self.feat_tx[...],
                                  precision=jax.lax.Precision.HIGHEST)
        return summary.reshape(summary.shape[0], -1), features

    def patch_features(self, images: jax.Array, size=None, num_tokens: int | None = None):
        """REPA target. images (B, H, W, 3) in [-1, 1] -> features (B, N, D) float32,
        gradient stopped, as the official TiM trainer computes it.

        size: resize target in pixels (int or (h, w), multiples of the patch size); default
        (TiM's rule) sqrt(num_tokens) * patch_size. num_tokens: the token count the REPA
        projector produces; a different count from RADIO is a ValueError naming both.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3) in [-1, 1], got {images.shape}")
        p = self.config.patch_size
        if size is None:
            if num_tokens is None:
                raise ValueError("pass size= (pixels) or num_tokens= (TiM's token count)")
            side = math.isqrt(int(num_tokens))
            if side * side != num_tokens:
                raise ValueError(f"num_tokens {num_tokens} is not a square: pass size=(h, w)")
            size = side * p
        sh, sw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if num_tokens is not None and (sh // p) * (sw // p) != num_tokens:
            raise ValueError(f"RADIO gives {(sh // p) * (sw // p)} patch tokens at {sh}x{sw} px "
                             f"but {num_tokens} tokens were expected (the REPA projector's "
                             "token count)")
        x = resize_bicubic((images.astype(jnp.float32) + 1.0) / 2.0, (sh, sw))
        _, features = self(x)
        return jax.lax.stop_gradient(features)


def parity_check(folder) -> dict:
    """Run ``folder`` (converted weights + ``io.npz`` with ``CASE/images`` NCHW in [0, 1],
    ``CASE/summary``, ``CASE/features``) and compare each output. Returns
    ``{"CASE/OUTPUT": {"max_abs_err", "max_rel_err", "tolerance", "passed"}}``."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.is_file():
        raise FileNotFoundError(f"{folder} has no io.npz (reference inputs/outputs)")
    io = np.load(io_path)
    cases = sorted({k.split("/")[0] for k in io.files if k.endswith("/summary")})
    if not cases:
        raise ValueError(f"{io_path} has no CASE/summary entries (has {sorted(io.files)[:6]})")
    model = RadioEncoder.from_pretrained(folder)
    forward = nnx.jit(lambda m, x: m(x))
    report = {}
    for case in cases:
        ours = forward(model, jnp.asarray(io[f"{case}/images"]).transpose(0, 2, 3, 1))
        for name, value in zip(("summary", "features"), ours):
            ref = io[f"{case}/{name}"]
            value = np.asarray(value)
            if value.shape != ref.shape:
                raise ValueError(f"{case}/{name}: shape {value.shape} differs from the reference "
                                 f"{ref.shape}")
            err = float(np.abs(value - ref).max())
            rel = err / float(np.abs(ref).max())
            report[f"{case}/{name}"] = {"max_abs_err": err, "max_rel_err": rel,
                                        "tolerance": PARITY_TOLERANCE,
                                        "passed": bool(rel <= PARITY_TOLERANCE)}
    return report
