"""Frozen pre-norm ViT layers shared by the REPA target encoders (DINOv2, RADIO).

Every weight is an :class:`EncoderWeight`, not an ``nnx.Param``: an optimizer built over
``nnx.Param`` never sees them, so an encoder can sit next to a trained model and stay frozen.
Weights are float32 and start as zeros: they are always overwritten by a loader (see
:func:`assign`). Matmuls run in the configured compute dtype (float32 default, bfloat16 option);
LayerNorm and softmax run in float32.

Block (the DINOv2 / timm ``Block`` computation)::

    h   = x + ls1 * Attn(LN1(x))
    out = h + ls2 * FFN(LN2(h))

with ``ls*`` a per-channel LayerScale (or none), FFN a GELU MLP or a SwiGLU. Token arrays are
(B, N, D).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class EncoderWeight(nnx.Variable):
    """A pretrained, frozen encoder weight (deliberately not an ``nnx.Param``)."""


def assign(var: EncoderWeight, value, name: str) -> None:
    """Write ``value`` into ``var`` after checking the shape; ValueError naming ``name``.
    A None value (a missing key, recorded by :class:`TorchWeights`) is skipped."""
    if value is None:
        return
    value = np.asarray(value, np.float32)
    if tuple(var[...].shape) != tuple(value.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(var[...].shape)} (config and checkpoint disagree)")
    var.set_value(jnp.asarray(value))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Transformer trunk hyper-parameters (tokens of width ``width``)."""
    width: int
    depth: int
    heads: int
    mlp_hidden: int           # hidden width of the FFN (per branch for SwiGLU)
    swiglu: bool = False      # SwiGLU FFN (DINOv2 ``use_swiglu_ffn``) instead of GELU MLP
    layerscale: bool = True   # per-channel LayerScale on both residual branches
    qkv_bias: bool = True
    eps: float = 1e-6         # LayerNorm epsilon

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H//p)*(W//p), p*p*C), patches row-major, inner order (ky, kx, c).
    Trailing rows/columns that do not fill a patch are dropped (as a stride-p conv does)."""
    b, h, w, c = x.shape
    gh, gw = h // p, w // p
    x = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, p * p * c)


def conv_weight_to_patch_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight (D, C, p, p) -> (p*p*C, D) matching :func:`patchify`'s order."""
    d = w.shape[0]
    return np.asarray(w).transpose(2, 3, 1, 0).reshape(-1, d)


class Dense(nnx.Module):
    """y = x @ kernel + bias; kernel (d_in, d_out) (torch's Linear weight transposed)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, dtype=jnp.float32):
        self.kernel = EncoderWeight(jnp.zeros((d_in, d_out), jnp.float32))
        self.bias = EncoderWeight(jnp.zeros((d_out,), jnp.float32)) if bias else None
        self.dtype = dtype

    def load_torch(self, weights: "TorchWeights", prefix: str) -> None:
        """Read ``{prefix}.weight`` (out, in) and ``{prefix}.bias`` from a torch state dict."""
        w = weights.take(f"{prefix}.weight")
        assign(self.kernel, None if w is None else w.T, f"{prefix}.weight")
        if self.bias is not None:
            assign(self.bias, weights.take(f"{prefix}.bias"), f"{prefix}.bias")

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = EncoderWeight(jnp.ones((dim,), jnp.float32))
        self.bias = EncoderWeight(jnp.zeros((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def load_torch(self, weights: "TorchWeights", prefix: str) -> None:
        assign(self.scale, weights.take(f"{prefix}.weight"), f"{prefix}.weight")
        assign(self.bias, weights.take(f"{prefix}.bias"), f"{prefix}.bias")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (columns: q | k | v, each head-major)."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32):
        self.heads = cfg.heads
        self.qkv = Dense(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias, dtype=dtype)
        self.proj = Dense(cfg.width, cfg.width, dtype=dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]                       # (B, N, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return self.proj(out)


class MLP(nnx.Module):
    """fc2(GELU(fc1(x))), exact (erf) GELU as torch's ``nn.GELU()`` / transformers' "gelu"."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32):
        self.fc1 = Dense(cfg.width, cfg.mlp_hidden, dtype=dtype)
        self.fc2 = Dense(cfg.mlp_hidden, cfg.width, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLU(nnx.Module):
    """w_out(silu(a) * b) with (a, b) = split(w_in(x)) — DINOv2's SwiGLU FFN."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32):
        self.w_in = Dense(cfg.width, 2 * cfg.mlp_hidden, dtype=dtype)
        self.w_out = Dense(cfg.mlp_hidden, cfg.width, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(self.w_in(x), 2, axis=-1)
        return self.w_out(jax.nn.silu(a) * b)


class Block(nnx.Module):
    """Pre-norm transformer block with optional LayerScale (see module docstring)."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32):
        self.norm1 = LayerNorm(cfg.width, eps=cfg.eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.eps, dtype=dtype)
        self.ffn = SwiGLU(cfg, dtype=dtype) if cfg.swiglu else MLP(cfg, dtype=dtype)
        ones = jnp.ones((cfg.width,), jnp.float32)
        self.ls1 = EncoderWeight(ones) if cfg.layerscale else None
        self.ls2 = EncoderWeight(ones) if cfg.layerscale else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = self.attn(self.norm1(x))
        if self.ls1 is not None:
            h = h * self.ls1[...].astype(self.dtype)
        x = x + h
        h = self.ffn(self.norm2(x))
        if self.ls2 is not None:
            h = h * self.ls2[...].astype(self.dtype)
        return x + h


class Trunk(nnx.Module):
    """``depth`` blocks applied in order: (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32):
        self.blocks = nnx.List([Block(cfg, dtype=dtype) for _ in range(cfg.depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class TorchWeights:
    """A torch state dict being consumed by a loader.

    ``take(key)`` pops a tensor, or records the key as missing and returns None (``assign``
    skips None), so that :meth:`finish` can report every missing and every unused key at once.
    """

    def __init__(self, weights: dict, what: str):
        self.left = dict(weights)
        self.missing: list[str] = []
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self.left

    def take(self, key: str):
        if key not in self.left:
            self.missing.append(key)
            return None
        return self.left.pop(key)

    def finish(self, ignore: tuple[str, ...] = ()) -> None:
        """ValueError naming missing keys and keys no layer used (``ignore``: key prefixes
        that are expected and deliberately unused)."""
        unused = sorted(k for k in self.left if not k.startswith(tuple(ignore)))
        if not self.missing and not unused:
            return
        def show(keys):
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        parts = []
        if self.missing:
            parts.append(f"missing weights: {show(self.missing)}")
        if unused:
            parts.append(f"unused weights: {show(unused)}")
        raise ValueError(f"{self.what}: checkpoint does not fit the config; " + "; ".join(parts))
