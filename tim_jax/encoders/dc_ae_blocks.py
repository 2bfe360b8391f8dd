"""Layers of the deep-compression autoencoder (DC-AE, diffusers ``AutoencoderDC``) in NNX.

Feature maps are NHWC (B, H, W, C). Every weight is an :class:`AEWeight` (frozen, not an
``nnx.Param``) stored float32 under the torch attribute name of the layer it mirrors, so that a
diffusers state-dict key is the module path (see ``dc_ae.AutoencoderDC.load_torch_state``).
Conv weights are stored HWIO (kh, kw, C_in / groups, C_out), Linear weights (d_in, d_out).
Convolutions and matmuls run in the compute dtype (float32 default, bfloat16 option; float32
runs at HIGHEST precision so accelerators do not drop to TF32); RMSNorm, BatchNorm and the
multi-scale ReLU attention always run in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS = {  # diffusers ``get_activation`` names; gelu is torch's exact (erf) nn.GELU
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
LINEAR_ATTENTION_EPS = 1e-15  # diffusers SanaMultiscaleLinearAttention eps
NORM_EPS = 1e-5               # RMSNorm / BatchNorm eps used throughout AutoencoderDC


class AEWeight(nnx.Variable):
    """A pretrained, frozen autoencoder weight (deliberately not an ``nnx.Param``)."""


def precision_for(dtype):
    """HIGHEST for float32 compute (exact fp32 on GPU/TPU), DEFAULT for bfloat16."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def activation(name: str, field: str):
    """The activation called ``name``; ValueError naming the config ``field`` otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported; supported activations: "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def pixel_unshuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """(B, H*r, W*r, C) -> (B, H, W, C*r*r), channel c*r*r + i*r + j <- pixel (r*h+i, r*w+j)
    of channel c (torch ``F.pixel_unshuffle`` order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """(B, H, W, C*r*r) -> (B, H*r, W*r, C), the inverse of :func:`pixel_unshuffle`."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


class Conv2d(nnx.Module):
    """torch ``nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups)`` on NHWC maps."""

    def __init__(self, c_in: int, c_out: int, k: int, *, stride: int = 1, groups: int = 1,
                 bias: bool = True, dtype=jnp.float32):
        if c_in % groups or c_out % groups:
            raise ValueError(f"conv {c_in}->{c_out} channels is not divisible into {groups} groups")
        self.weight = AEWeight(jnp.zeros((k, k, c_in // groups, c_out), jnp.float32))
        self.bias = AEWeight(jnp.zeros((c_out,), jnp.float32)) if bias else None
        self.stride, self.groups, self.pad, self.dtype = stride, groups, k // 2, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.weight[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((self.pad, self.pad),) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            precision=precision_for(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Dense(nnx.Module):
    """torch ``nn.Linear(d_in, d_out, bias=False)`` on the last axis; weight (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, *, dtype=jnp.float32):
        self.weight = AEWeight(jnp.zeros((d_in, d_out), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.weight[...].astype(self.dtype),
                       precision=precision_for(self.dtype))


class RMSNorm(nnx.Module):
    """x * rsqrt(mean_c(x^2) + eps) * weight + bias over channels, in float32."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.weight = AEWeight(jnp.ones((dim,), jnp.float32))
        self.bias = AEWeight(jnp.zeros((dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + NORM_EPS)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


class BatchNorm(nnx.Module):
    """Inference BatchNorm2d with the stored running statistics, in float32."""

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.weight = AEWeight(jnp.ones((dim,), jnp.float32))
        self.bias = AEWeight(jnp.zeros((dim,), jnp.float32))
        self.running_mean = AEWeight(jnp.zeros((dim,), jnp.float32))
        self.running_var = AEWeight(jnp.ones((dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var[...] + NORM_EPS) * self.weight[...]
        y = (x.astype(jnp.float32) - self.running_mean[...]) * inv + self.bias[...]
        return y.astype(self.dtype)


def make_norm(norm_type: str, dim: int, field: str, *, dtype=jnp.float32):
    """RMSNorm or BatchNorm by diffusers name; ValueError naming the config ``field``."""
    if norm_type == "rms_norm":
        return RMSNorm(dim, dtype=dtype)
    if norm_type == "batch_norm":
        return BatchNorm(dim, dtype=dtype)
    raise ValueError(f"{field}={norm_type!r} is not supported; supported: {list(NORM_TYPES)}")


class ResBlock(nnx.Module):
    """x + norm(conv2(act(conv1(x)))), 3x3 convs, channels constant."""

    def __init__(self, channels: int, norm_type: str, act_fn: str, *, field: str,
                 dtype=jnp.float32):
        self.conv1 = Conv2d(channels, channels, 3, dtype=dtype)
        self.conv2 = Conv2d(channels, channels, 3, bias=False, dtype=dtype)
        self.norm = make_norm(norm_type, channels, f"{field} norm type", dtype=dtype)
        self.act = activation(act_fn, f"{field} act_fn")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv2(self.act(self.conv1(x)))) + x


class MultiscaleProjection(nnx.Module):
    """Depthwise k x k conv then a 1x1 conv grouped per head (3 * heads groups), no biases."""

    def __init__(self, channels: int, heads: int, k: int, *, dtype=jnp.float32):
        self.proj_in = Conv2d(channels, channels, k, groups=channels, bias=False, dtype=dtype)
        self.proj_out = Conv2d(channels, channels, 1, groups=3 * heads, bias=False, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_in(x))


def relu_linear_attention(q, k, v, eps: float = LINEAR_ATTENTION_EPS):
    """q, k, v (B, N, G, d) -> (B, N, G, d): sum_m v_m (k_m.q_n) / (sum_m k_m.q_n + eps),
    as diffusers computes it: v padded with a row of ones, (v_pad k^T) q, then the last row
    divides the others. Cost linear in N."""
    prec = jax.lax.Precision.HIGHEST
    v_pad = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    kv = jnp.einsum("bngd,bnge->bgde", k, v_pad, precision=prec)
    out = jnp.einsum("bngd,bgde->bnge", q, kv, precision=prec)
    return out[..., :-1] / (out[..., -1:] + eps)


def relu_quadratic_attention(q, k, v, eps: float = LINEAR_ATTENTION_EPS):
    """The same function through the (G, N, N) score matrix, normalised over keys; diffusers
    uses it when H*W <= attention_head_dim."""
    prec = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bmgd,bngd->bgmn", k, q, precision=prec)
    s = s / (jnp.sum(s, axis=2, keepdims=True) + eps)
    return jnp.einsum("bmge,bgmn->bnge", v, s, precision=prec)


class MultiscaleLinearAttention(nnx.Module):
    """diffusers ``SanaMultiscaleLinearAttention`` (mult 1, residual): q|k|v projections, extra
    multi-scale copies of them, ReLU linear attention per group of ``head_dim`` channels,
    output projection, norm, + x. (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes, norm_type: str, *,
                 field: str, dtype=jnp.float32):
        heads = channels // head_dim
        if heads < 1:
            raise ValueError(f"attention_head_dim={head_dim} exceeds the {channels} channels of "
                             f"{field}")
        inner = heads * head_dim
        self.head_dim, self.dtype = head_dim, dtype
        self.to_q = Dense(channels, inner, dtype=dtype)
        self.to_k = Dense(channels, inner, dtype=dtype)
        self.to_v = Dense(channels, inner, dtype=dtype)
        self.to_qkv_multiscale = nnx.List(
            [MultiscaleProjection(3 * inner, heads, k, dtype=dtype) for k in kernel_sizes])
        self.to_out = Dense(inner * (1 + len(kernel_sizes)), channels, dtype=dtype)
        self.norm_out = make_norm(norm_type, channels, f"{field} norm type", dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        d = self.head_dim
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        qkv = jnp.concatenate([qkv] + [p(qkv) for p in self.to_qkv_multiscale], axis=-1)
        # torch reshapes channels into groups of 3*d consecutive channels: (q | k | v) per group
        qkv = qkv.astype(jnp.float32).reshape(b, h * w, -1, 3 * d)
        q, k, v = jax.nn.relu(qkv[..., :d]), jax.nn.relu(qkv[..., d:2 * d]), qkv[..., 2 * d:]
        attend = relu_linear_attention if h * w > d else relu_quadratic_attention
        out = attend(q, k, v).reshape(b, h, w, -1).astype(self.dtype)
        return self.norm_out(self.to_out(out)) + x


class GLUMBConv(nnx.Module):
    """x + RMSNorm(point(a * silu(g))), (a, g) = split(depthwise3x3(silu(inverted1x1(x))));
    hidden width 4 * channels."""

    def __init__(self, channels: int, *, dtype=jnp.float32):
        hidden = 4 * channels
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1, dtype=dtype)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, groups=2 * hidden, dtype=dtype)
        self.conv_point = Conv2d(hidden, channels, 1, bias=False, dtype=dtype)
        self.norm = RMSNorm(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        a, gate = jnp.split(y, 2, axis=-1)
        return self.norm(self.conv_point(a * jax.nn.silu(gate))) + x


class EfficientViTBlock(nnx.Module):
    """Multi-scale linear attention then GLUMBConv, both residual."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes, norm_type: str, *,
                 field: str, dtype=jnp.float32):
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type,
                                              field=field, dtype=dtype)
        self.conv_out = GLUMBConv(channels, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.attn(x))


class DownBlock(nnx.Module):
    """Halve H and W: a stride-2 3x3 conv (or a 3x3 conv to c_out/4 then pixel-unshuffle),
    plus, with ``shortcut``, the pixel-unshuffled input averaged over groups of channels."""

    def __init__(self, c_in: int, c_out: int, *, unshuffle: bool, shortcut: bool, field: str,
                 dtype=jnp.float32):
        if unshuffle and c_out % 4:
            raise ValueError(f"{field}: pixel_unshuffle downsampling needs output channels "
                             f"divisible by 4, got {c_out}")
        if shortcut and (4 * c_in) % c_out:
            raise ValueError(f"{field}: the downsampling shortcut needs 4*{c_in} channels to "
                             f"divide into {c_out} groups")
        self.unshuffle, self.shortcut = unshuffle, shortcut
        self.group = 4 * c_in // c_out
        self.conv = Conv2d(c_in, c_out // 4 if unshuffle else c_out, 3,
                           stride=1 if unshuffle else 2, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        if self.unshuffle:
            y = pixel_unshuffle(y)
        if self.shortcut:
            s = pixel_unshuffle(x)
            y = y + s.reshape(*s.shape[:-1], -1, self.group).mean(-1)
        return y


class UpBlock(nnx.Module):
    """Double H and W: nearest x2 then a 3x3 conv (or a 3x3 conv to 4*c_out then
    pixel-shuffle), plus, with ``shortcut``, the channel-repeated input pixel-shuffled."""

    def __init__(self, c_in: int, c_out: int, *, interpolate: bool, shortcut: bool, field: str,
                 dtype=jnp.float32):
        if shortcut and (4 * c_out) % c_in:
            raise ValueError(f"{field}: the upsampling shortcut needs 4*{c_out} channels to be "
                             f"a multiple of {c_in}")
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = 4 * c_out // c_in
        self.conv = Conv2d(c_in, c_out if interpolate else 4 * c_out, 3, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.interpolate:
            y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        else:
            y = pixel_shuffle(self.conv(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1))
        return y
