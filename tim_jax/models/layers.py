"""Building blocks of the TiM networks (Flax NNX): dense/norm/embedding primitives, the SwiGLU,
the sinusoidal time embedder, patch embedding, 2D RoPE (official layout and grid order), the
interval-aware self-attention, the caption cross-attention and the adaLN final layer.

Conventions (the checkpoint converter relies on them; see ``tim_jax/models/__init__.py``):

* Every parameter is an ``nnx.Param`` holding float32 values. Each carries logical axis names in
  its ``out_sharding`` metadata (the names are documented in ``presets.LOGICAL_AXES``) and is
  created with ``eager_sharding=False``: building a model never needs a mesh; the sharding code
  places the params afterwards from ``nnx.get_partition_spec``.
* ``Dense.kernel`` is (in, out) = the torch ``nn.Linear.weight`` transposed; ``Dense.bias`` is (out,).
* ``LayerNorm.scale`` / ``LayerNorm.bias`` are torch's ``weight`` / ``bias``.
* ``SwiGLU.fc1`` FUSES timm's ``fc1_g`` (gate) and ``fc1_x`` (value):
  ``fc1.kernel = concat([fc1_g.weight.T, fc1_x.weight.T], axis=-1)`` of shape (in, 2*hidden) and
  ``fc1.bias = concat([fc1_g.bias, fc1_x.bias])``: the FIRST ``hidden`` columns are the gate, the
  LAST ``hidden`` the value; ``out = fc2(silu(gate) * value)``.
* ``PatchConv.kernel`` is (p, p, C_in, D) = the torch conv weight (D, C_in, p, p) transposed
  (2, 3, 1, 0); the patch of an NHWC image is flattened in (row, col, channel) order.
* Numerics: ``dtype`` is the compute dtype of the matmuls (float32 or bfloat16). Matmuls
  accumulate in float32; LayerNorms, softmax, RoPE rotation and everything on the conditioning
  path (time embeddings, label table, adaLN modulation MLPs) run in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.autodiff import in_forward_mode
from tim_jax.models.attention import attention
from tim_jax.models.matmul import (einsum_f32, grad_residuals, matmul, matmul_grads,
                                   operand_dtypes)

Array = jax.Array
Axes = tuple  # logical axis names of one parameter, one entry (str or None) per dim

# -------------------------------------------------------------------------------------------
# initialisers (all return float32)

xavier_uniform = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def normal(stddev: float):
    """N(0, stddev^2) initialiser (torch ``nn.init.normal_(w, std=stddev)``)."""
    return jax.nn.initializers.normal(stddev)


def concat_init(*inits, sizes: Sequence[int]):
    """Initialiser of a fused (..., sum(sizes)) kernel whose column blocks are initialised
    independently, each as if it were its own (..., size) kernel (same fan-in/fan-out as the
    separate torch layers). Used for the fused SwiGLU ``fc1`` = [fc1_g | fc1_x]."""

    def init(key, shape, dtype=jnp.float32):
        if shape[-1] != sum(sizes):
            raise ValueError(f"concat_init: last dim {shape[-1]} != sum(sizes) {sum(sizes)}")
        keys = jax.random.split(key, len(inits))
        parts = [f(k, (*shape[:-1], n), dtype) for f, k, n in zip(inits, keys, sizes)]
        return jnp.concatenate(parts, axis=-1)

    return init


class KeyGen:
    """A stream of PRNG keys ``fold_in(key, i)``, i = 0, 1, ... with a plain Python counter.

    The layers draw their init keys with ``rngs.params()``, so they accept an ``nnx.Rngs`` or a
    ``KeyGen``. The networks convert their ``nnx.Rngs`` into a ``KeyGen`` once: drawing ~500
    keys from an ``nnx.Rngs`` under ``jax.eval_shape`` is quadratic in flax 0.12 (every count
    update inspects the tracer's sharding, which walks the whole jaxpr), ~30 s for TiM-XL.
    """

    def __init__(self, key: Array):
        self.key = key
        self.count = 0

    def params(self) -> Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key

    def split(self, n: int) -> Array:
        """n fresh keys, stacked (for vmapped/stacked construction)."""
        return jax.random.split(self.params(), n)


def as_keygen(rngs) -> KeyGen:
    """A ``KeyGen`` from an ``nnx.Rngs`` (one key drawn), an int seed, or a ``KeyGen``."""
    if isinstance(rngs, KeyGen):
        return rngs
    if isinstance(rngs, int):
        return KeyGen(jax.random.key(rngs))
    if isinstance(rngs, nnx.Rngs):
        return KeyGen(rngs.params())
    raise ValueError(f"rngs must be an nnx.Rngs, an int seed or a KeyGen; got {type(rngs)}")


def make_param(init, key, shape: tuple, axes: Axes) -> nnx.Param:
    """A float32 ``nnx.Param`` annotated with logical axis names (no eager sharding)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match param shape {shape}")
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=tuple(axes), eager_sharding=False)


_PRECISIONS = {
    None: None,
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}


def resolve_precision(precision):
    """Maps the config value (None | 'default' | 'high' | 'highest') to a ``jax.lax.Precision``."""
    if isinstance(precision, jax.lax.Precision):
        return precision
    if precision not in _PRECISIONS:
        raise ValueError(
            f"matmul_precision={precision!r}; allowed: {sorted(k for k in _PRECISIONS if k)} or None"
        )
    return _PRECISIONS[precision]


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
    """Maps the config value ('float32' | 'bfloat16', or a jnp dtype) to a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={d}; allowed: {sorted(_DTYPES)}")
    return d


# -------------------------------------------------------------------------------------------
# primitives


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis.

    kernel (in, out), bias (out,), both float32. The matmul runs in ``dtype`` with float32
    accumulation (:func:`tim_jax.models.matmul.matmul`, so its gradients also run in ``dtype``);
    the result is returned in ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = True,
        kernel_init=xavier_uniform,
        bias_init=zeros,
        dtype=jnp.float32,
        precision=None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = resolve_dtype(dtype)
        self.precision = resolve_precision(precision)
        self.kernel = make_param(kernel_init, rngs.params(), (in_features, out_features), axes)
        self.bias = (
            make_param(bias_init, rngs.params(), (out_features,), axes[1:]) if use_bias else None
        )

    def __call__(self, x: Array) -> Array:
        y = matmul("mi,io->mo", x.reshape(-1, x.shape[-1]), self.kernel[...], dtype=self.dtype,
                   precision=self.precision, out_dtype=self.dtype,
                   bias=None if self.bias is None else self.bias[...])
        return y.reshape(*x.shape[:-1], self.out_features)


def layer_norm(x: Array, eps: float, scale: Array | None = None, bias: Array | None = None) -> Array:
    """LayerNorm over the last axis in float32 (biased variance, as torch). Returns float32."""
    y = _standardize(x.astype(jnp.float32), eps)[0]
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def _standardize(x: Array, eps: float) -> tuple[Array, Array]:
    """``(xhat, rstd)`` of float32 x over the last axis: ``xhat = (x - mean) * rstd``,
    ``rstd = rsqrt(var + eps)`` (biased variance; rstd keeps the axis as size 1)."""
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    return xc * rstd, rstd


class LayerNorm(nnx.Module):
    """Affine LayerNorm over the last axis (torch ``nn.LayerNorm(dim, eps)``): float32 in the
    math and in the result. ``scale`` (dim,) = torch weight (init 1), ``bias`` (dim,) (init 0)."""

    def __init__(self, dim: int, *, eps: float, axes: Axes = ("norm",), rngs: nnx.Rngs):
        self.eps = float(eps)
        self.scale = make_param(ones, rngs.params(), (dim,), axes)
        self.bias = make_param(zeros, rngs.params(), (dim,), axes)

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class Embed(nnx.Module):
    """Lookup table ``embedding`` (num, dim), float32. Out-of-range ids give NaN rows."""

    def __init__(self, num: int, dim: int, *, axes: Axes, init=normal(0.02), rngs: nnx.Rngs):
        self.num = num
        self.embedding = make_param(init, rngs.params(), (num, dim), axes)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0, mode="fill", fill_value=jnp.nan)


class Sequential(nnx.List):
    """An ``nnx.List`` applied in order: ``Sequential([Dense, jax.nn.silu, Dense])``. Elements
    are indexed like torch's ``nn.Sequential`` so param paths read ('mlp', 0, 'kernel')."""

    def __call__(self, x: Array) -> Array:
        for f in self:
            x = f(x)
        return x


class SwiGLU(nnx.Module):
    """timm ``SwiGLU``: ``fc2(silu(fc1_g(x)) * fc1_x(x))`` with fc1_g/fc1_x FUSED into ``fc1``.

    fc1.kernel (in, 2*hidden) = [gate | value] (gate = the first ``hidden`` columns),
    fc2.kernel (hidden, out). Runs in ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        in_axis: str | None = "embed",
        hidden_axis: str | None = "mlp",
        out_axis: str | None = "embed",
        fc1_init=xavier_uniform,
        fc2_init=xavier_uniform,
        fc2_bias_init=zeros,
        dtype=jnp.float32,
        precision=None,
        rngs: nnx.Rngs,
    ):
        self.hidden_features = hidden_features
        self.fc1 = Dense(
            in_features, 2 * hidden_features, axes=(in_axis, hidden_axis),
            kernel_init=concat_init(fc1_init, fc1_init, sizes=(hidden_features, hidden_features)),
            dtype=dtype, precision=precision, rngs=rngs,
        )
        self.fc2 = Dense(
            hidden_features, out_features, axes=(hidden_axis, out_axis), kernel_init=fc2_init,
            bias_init=fc2_bias_init, dtype=dtype, precision=precision, rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        return self.fc2(dense_silu_glu(self.fc1, x))


def dense_silu_glu(dense: Dense, x: Array) -> Array:
    """``silu_glu(dense(x))`` for a fused ``[gate | value]`` projection: x (..., in) ->
    (..., H) in ``dense.dtype``, with the pre-activation ``h = x @ kernel + bias`` (..., 2H)
    kept in float32 and the result rounded once.

    Rounding ``h`` to bf16 and reading it back costs two memory-bound passes over the widest
    activation of the block (S/2: (4096, 2048)), about as long as its matmul on the CPU: the
    forward of the SwiGLU MLP alone (fc1 + activation) 17.2 -> 9.8 ms, the S/2 forward pass
    598 -> 506 ms (jax 0.10.2, 2-core Xeon). The backward pass (a ``custom_vjp``) keeps
    ``h`` rounded to the compute dtype, applies the :func:`silu_glu` gradient and then the
    matmul's (:func:`tim_jax.models.matmul.matmul_grads`). Inside
    :func:`tim_jax.autodiff.forward_mode` it is plain autodiff of the same forward."""
    x2 = x.reshape(-1, x.shape[-1])
    kernel = dense.kernel[...]
    bias = None if dense.bias is None else dense.bias[...]
    if in_forward_mode():
        y = _dense_glu_forward(x2, kernel, bias, dense.dtype, dense.precision)[0]
    else:
        y = _dense_glu(x2, kernel, bias, dense.dtype, dense.precision,
                       operand_dtypes(x2, kernel, bias))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _dense_glu_forward(x, kernel, bias, dtype, precision):
    """(silu_glu output in dtype, pre-activation float32) of x (M, in) @ kernel (in, 2H).

    The bias is added inside the activation (and again for the returned pre-activation), not
    to the matmul result: added there, XLA:CPU folds it into the YNNPACK dot's epilogue,
    which reads it as a materialised (M, 2H) broadcast (S/2: 32 MB written and read per
    block)."""
    h = einsum_f32("mi,io->mo", x, kernel, dtype, precision)
    if bias is None:
        return _silu_glu(h).astype(dtype), h
    b = bias.astype(jnp.float32)
    return _silu_glu(h, b).astype(dtype), h + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense_glu(x, kernel, bias, dtype, precision, in_dtypes):
    del in_dtypes  # static (x dtype, kernel dtype, bias (dtype, shape)) for the backward
    return _dense_glu_forward(x, kernel, bias, dtype, precision)[0]


def _dense_glu_fwd(x, kernel, bias, dtype, precision, in_dtypes):
    del in_dtypes
    x, kernel = x.astype(dtype), kernel.astype(dtype)   # cast once, reused by the backward
    x_res, x = grad_residuals("mi,io->mo", x, kernel, dtype=dtype)
    y, h = _dense_glu_forward(x, kernel, bias, dtype, precision)
    return y, (x_res, kernel, h.astype(dtype))


def _dense_glu_bwd(dtype, precision, in_dtypes, res, g):
    x, kernel, h = res
    (dh,) = _silu_glu_bwd(h, g)
    return matmul_grads("mi,io->mo", x, kernel, dh, dtype=dtype, precision=precision,
                        in_dtypes=in_dtypes)


_dense_glu.defvjp(_dense_glu_fwd, _dense_glu_bwd)


def silu_glu(h: Array) -> Array:
    """``silu(gate) * value`` for ``h = [gate | value]`` (..., 2H) -> (..., H), computed in
    float32 and rounded once to ``h.dtype``.

    Its backward (a ``custom_vjp``) is one elementwise pass that writes the (..., 2H) gradient
    in ``h.dtype``. Plain autodiff of the two slices builds it from two
    zero-padded halves and, for bfloat16, rounds after every op. Inside
    :func:`tim_jax.autodiff.forward_mode` (``jax.jvp``) it is plain autodiff."""
    if in_forward_mode():
        return _silu_glu(h)
    return _silu_glu_vjp(h)


def _silu_glu(h: Array, bias: Array | None = None) -> Array:
    """``silu(gate) * value`` of ``h`` (+ ``bias`` (2H,), added to each half after the split)
    in float32, rounded to ``h.dtype``."""
    gate, value = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    if bias is not None:
        b_gate, b_value = jnp.split(bias, 2)
        gate, value = gate + b_gate, value + b_value
    return (jax.nn.silu(gate) * value).astype(h.dtype)


@jax.custom_vjp
def _silu_glu_vjp(h: Array) -> Array:
    return _silu_glu(h)


def _silu_glu_fwd(h):
    return _silu_glu(h), h


def _silu_glu_bwd(h, g):
    # Both halves of the gradient in one elementwise pass over a (..., 2, H) view: a select
    # between the gate and the value formula, rounded once to h.dtype (a concatenation would
    # be a separate float32 copy on XLA:CPU).
    hh = h.reshape(*h.shape[:-1], 2, h.shape[-1] // 2).astype(jnp.float32)
    gate, value = hh[..., :1, :], hh[..., 1:, :]
    g = g.astype(jnp.float32)[..., None, :]
    sig = jax.nn.sigmoid(gate)
    dgate = g * value * sig * (1.0 + gate * (1.0 - sig))
    dvalue = g * gate * sig
    first = jax.lax.broadcasted_iota(jnp.int32, hh.shape, hh.ndim - 2) == 0
    return (jnp.where(first, dgate, dvalue).astype(h.dtype).reshape(h.shape),)


_silu_glu_vjp.defvjp(_silu_glu_fwd, _silu_glu_bwd)


# -------------------------------------------------------------------------------------------
# embedders


def timestep_embedding(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """GLIDE sinusoidal embedding of (B,) times -> (B, dim) float32, ordered [cos | sin].

    freqs_k = exp(-ln(max_period) * k / half), k < half = dim // 2; odd ``dim`` appends a zero.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """Scalar time -> (B, D) float32: ``mlp = [Linear(256, D), SiLU, Linear(D, D)]`` on the
    256-dim sinusoid. Runs entirely in float32 (conditioning path)."""

    def __init__(
        self, hidden_size: int, *, frequency_embedding_size: int = 256, kernel_init=xavier_uniform,
        precision=None, rngs: nnx.Rngs,
    ):
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = Sequential([
            Dense(frequency_embedding_size, hidden_size, axes=(None, "embed"),
                  kernel_init=kernel_init, precision=precision, rngs=rngs),
            jax.nn.silu,
            Dense(hidden_size, hidden_size, axes=("mlp", "embed"),
                  kernel_init=kernel_init, precision=precision, rngs=rngs),
        ])

    def __call__(self, t: Array) -> Array:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class PatchConv(nnx.Module):
    """Conv2d with kernel = stride = p on NHWC input, written as patchify + matmul (exact).

    kernel (p, p, C_in, D), bias (D,). (B, H, W, C) -> (B, H/p * W/p, D), tokens row-major over
    (H/p, W/p) exactly as torch ``conv(x).flatten(2).transpose(1, 2)``.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, dtype, precision,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.dtype = resolve_dtype(dtype)
        self.precision = resolve_precision(precision)
        # Official init: xavier-uniform on the (D, C*p*p) view -> fan_in C*p*p, fan_out D.
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        shape = (patch_size, patch_size, in_channels, hidden_size)
        self.kernel = make_param(init, rngs.params(), shape, (None, None, "patch", "embed"))
        self.bias = make_param(zeros, rngs.params(), (hidden_size,), ("embed",))

    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        b, h, w, c = x.shape
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        kernel = self.kernel[...].reshape(p * p * c, -1)
        return matmul("bni,io->bno", x, kernel, dtype=self.dtype, precision=self.precision,
                      bias=self.bias[...], out_dtype=self.dtype)


class PatchEmbed(nnx.Module):
    """timm ``PatchEmbed`` (bias, no norm, strict_img_size=False): validates the input and
    applies ``proj``. Any H, W divisible by the patch size are accepted."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, dtype, precision,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = PatchConv(patch_size, in_channels, hidden_size, dtype=dtype,
                              precision=precision, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        check_image(x, self.patch_size, self.in_channels)
        return self.proj(x)


def check_image(x, patch_size: int, in_channels: int) -> None:
    """Raises ValueError unless x is (B, H, W, in_channels) with H, W divisible by patch_size."""
    if x.ndim != 4:
        raise ValueError(f"x_t must be NHWC (B, H, W, C); got shape {tuple(x.shape)}")
    _, h, w, c = x.shape
    if c != in_channels:
        raise ValueError(
            f"x_t has {c} channels (shape {tuple(x.shape)}, NHWC) but the model has "
            f"in_channels={in_channels}")
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"x_t spatial size H={h}, W={w} must be divisible by patch_size={patch_size}")


def unpatchify(x: Array, h: int, w: int, patch_size: int, channels: int) -> Array:
    """(B, h*w, p*p*C) tokens (row-major over (h, w); each token in (p_row, p_col, C) order, as
    the official ``unpatchify``) -> (B, h*p, w*p, C) NHWC."""
    b = x.shape[0]
    p = patch_size
    x = x.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, channels)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation ``x * (1 + scale) + shift`` (official ``funcs.modulate``)."""
    return x * (1.0 + scale) + shift


# -------------------------------------------------------------------------------------------
# 2D RoPE (official FiT/TiM ``VisionRotaryEmbedding``, custom_freqs='normal', theta=10000)


def rope_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token RoPE coordinates (g0, g1) of an h x w token grid (tokens row-major over h rows
    of w columns), in the OFFICIAL order: the grid is built with
    ``meshgrid(arange(h), arange(w), indexing='xy')`` and flattened, which gives, for token k,
    ``g0 = k mod h`` and ``g1 = k div h``. For a square grid that is (column, row); for a
    non-square grid it is NOT the true (column, row) layout, but the trained weights depend on it,
    so it is reproduced as is."""
    k = np.arange(h * w)
    return k % h, k // h


def rope_tables(h: int, w: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) tables of shape (h*w, head_dim), float32 numpy, computed at trace time.

    Per axis ``dim = head_dim // 2`` channels with frequencies ``theta ** (-2j / dim)``,
    j < dim // 2, each repeated twice (interleaved pairs: channel 2j and 2j+1 share frequency j).
    The first ``dim`` channels rotate with coordinate g0, the last ``dim`` with g1 (see
    ``rope_grid``). Frequencies and angles are float32 as in the official code.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be divisible by 4 for the 2D RoPE")
    dim = head_dim // 2
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    freqs = freqs.astype(np.float32)
    g0, g1 = rope_grid(h, w)
    a0 = np.repeat(g0.astype(np.float32)[:, None] * freqs[None], 2, axis=-1)
    a1 = np.repeat(g1.astype(np.float32)[:, None] * freqs[None], 2, axis=-1)
    ang = np.concatenate([a0, a1], axis=-1).astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate_half(x: Array) -> Array:
    """Interleaved-pair rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    xp = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-xp[..., 1], xp[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (..., L, Dh) rotated by tables (L, Dh): ``x * cos + rotate_half(x) * sin`` (float32)."""
    x = x.astype(jnp.float32)
    return x * cos + rotate_half(x) * sin


def scaled_rope(rope: tuple[Array, Array], head_dim: int) -> tuple[Array, Array]:
    """The query's RoPE tables (L, Dh) times the softmax scale ``head_dim ** -0.5``, so that the
    query leaves :func:`norm_rope` already scaled and the attention runs with ``scale=1.0``
    (the same logits: ``(s q) k^T = s (q k^T)``; exact in bf16 when the scale is a power of 2,
    as for Dh = 64). XLA:CPU writes a scale applied to the logits out as a (B, H, Lq, Lk)
    float32 broadcast that every attention fusion reads; in the tables it costs nothing.
    The whole S/2 step 1.039x (paired, in one process)."""
    s = head_dim ** -0.5
    return rope[0] * s, rope[1] * s


def norm_rope(x: Array, norm: LayerNorm | None, cos: Array, sin: Array, dtype) -> Array:
    """The attention's query/key path: ``apply_rope(norm(x), cos, sin)`` rounded to ``dtype``.

    x (B, H, L, Dh) float32, ``norm`` the QK-norm over Dh (or None: RoPE only), tables
    (L, Dh); returns (B, H, L, Dh) in ``dtype``. The backward pass (a ``custom_vjp``) is
    written out: the rotation's transpose ``g * cos - rotate_half(g * sin)``, then the
    LayerNorm gradient from the saved normalised input, where plain autodiff builds the
    transpose of the pair interleave from slices and concatenations. With the SwiGLU bias
    change this made the whole step 1.03x faster for S/2 and B/4 (paired, in one process).
    Inside :func:`tim_jax.autodiff.forward_mode` it is plain autodiff of the same math.
    """
    cos, sin = jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)
    if norm is None or in_forward_mode():
        y = x if norm is None else norm(x)
        return apply_rope(y, cos, sin).astype(dtype)
    return _norm_rope(x.astype(jnp.float32), norm.scale[...].astype(jnp.float32),
                      norm.bias[...].astype(jnp.float32), cos, sin, norm.eps, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _norm_rope(x, scale, bias, cos, sin, eps, dtype):
    return _norm_rope_fwd(x, scale, bias, cos, sin, eps, dtype)[0]


def _norm_rope_fwd(x, scale, bias, cos, sin, eps, dtype):
    xhat, rstd = _standardize(x, eps)
    y = apply_rope(xhat * scale + bias, cos, sin).astype(dtype)
    return y, (xhat, rstd, scale, cos, sin)


def _norm_rope_bwd(eps, dtype, res, g):
    xhat, rstd, scale, cos, sin = res
    g = g.astype(jnp.float32)
    dz = g * cos - rotate_half(g * sin)          # rotate_half^T = -rotate_half
    batch_axes = tuple(range(dz.ndim - 1))
    dxhat = dz * scale
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    return (dx, jnp.sum(dz * xhat, axis=batch_axes), jnp.sum(dz, axis=batch_axes),
            jnp.zeros_like(cos), jnp.zeros_like(sin))


_norm_rope.defvjp(_norm_rope_fwd, _norm_rope_bwd)


# -------------------------------------------------------------------------------------------
# attention layers (every one calls ``attention.attention``; layout heads-first (B, H, L, Dh))


def project_heads(dense: Dense, x: Array, parts: int, num_heads: int,
                  bias_offset: Array | None = None, out_dtype=None) -> list[Array]:
    """A fused projection (``dense``: in -> parts * H * Dh, columns ordered (parts, H, Dh))
    written straight in the heads-first layout: x (B, L, in) -> ``parts`` arrays (B, H, L, Dh)
    in ``out_dtype`` (default ``dense.dtype``). ``bias_offset`` (B, 1, parts * H * Dh) float32
    is added to the bias before the single rounding (one row per sample, e.g. the
    interval-aware term).

    The (B, L, H, Dh) -> (B, H, L, Dh) transpose happens on the float32 matmul result, before
    the rounding. Transposing the rounded bf16 projection instead makes XLA:CPU upcast the
    attention matmuls that read it to float32 (measured: 4 of the 6 attention matmuls of a
    forward+backward pass, 1.2-2x slower)."""
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
        # q and k go on in float32 (QK-norm, RoPE): the projection is not rounded to the compute
        # dtype and read back for them, only v is (S/2 step 1.02-1.04x, B/4 1.06x, paired)
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


class FinalLayer(nnx.Module):
    """adaLN final layer: ``linear(modulate(LN(x), shift, scale))`` with (shift, scale) from a
    SwiGLU(D -> D/2 -> 2D) on c (float32; fc2 and ``linear`` zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, dtype,
                 precision, rngs: nnx.Rngs):
        self.dtype = resolve_dtype(dtype)
        self.linear = Dense(
            hidden_size, patch_size * patch_size * out_channels, axes=("embed", "patch"),
            kernel_init=zeros, dtype=dtype, precision=precision, rngs=rngs)
        self.adaLN_modulation = SwiGLU(
            hidden_size, hidden_size // 2, 2 * hidden_size, fc2_init=zeros,
            dtype=jnp.float32, precision=precision, rngs=rngs)

    def __call__(self, x: Array, c: Array) -> Array:
        """x (B, L, D), c (B, 1, D) float32 -> (B, L, p*p*C) float32."""
        shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
        h = modulate(layer_norm(x, 1e-6), shift, scale).astype(self.dtype)
        return self.linear(h).astype(jnp.float32)


def projector(hidden_size: int, projector_dim: int, z_dim: int, *, dtype, precision,
              rngs: nnx.Rngs) -> Sequential:
    """REPA projector (official ``build_mlp``): Linear(D, P), SiLU, Linear(P, P), SiLU,
    Linear(P, z) — indices 0, 2, 4 as in the torch ``nn.Sequential``."""
    kw = dict(dtype=dtype, precision=precision, rngs=rngs)
    return Sequential([
        Dense(hidden_size, projector_dim, axes=("embed", "proj"), **kw),
        jax.nn.silu,
        Dense(projector_dim, projector_dim, axes=("proj", None), **kw),
        jax.nn.silu,
        Dense(projector_dim, z_dim, axes=("proj", None), **kw),
    ])
