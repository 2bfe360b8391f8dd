"""Building blocks of the TiM networks (Flax NNX): dense/norm/embedding primitives, the SwiGLU,
the sinusoidal time embedder, patch embedding, the adaLN final layer and the REPA projector.
The attention layers are in ``attention_layers.py``, RoPE in ``rope.py``.

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

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tim_jax.models import cpu_fused
from tim_jax.models.cpu_layouts import custom_backward
from tim_jax.models.matmul import matmul

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
    """Maps the config value ('float32' | 'bfloat16' | 'auto', or a jnp dtype) to a dtype;
    'auto' is :func:`tim_jax.hardware.default_compute_dtype` (bf16 where it is native)."""
    if isinstance(dtype, str):
        if dtype == "auto":
            from tim_jax.hardware import default_compute_dtype

            dtype = default_compute_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: {sorted(_DTYPES) + ['auto']}")
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
    y = cpu_fused.standardize(x.astype(jnp.float32), eps)[0]
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


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
    """``silu(gate) * value`` of a fused ``[gate | value]`` projection ``dense(x)``: x (..., in)
    -> (..., H) in ``dense.dtype``, the activation in float32. With the CPU layouts it is
    ``cpu_fused.dense_silu_glu`` (float32 pre-activation, a hand-written backward)."""
    x2 = x.reshape(-1, x.shape[-1])
    bias = None if dense.bias is None else dense.bias[...]
    if custom_backward():
        y = cpu_fused.dense_silu_glu_op(x2, dense.kernel[...], bias, dense.dtype, dense.precision)
    else:
        y = cpu_fused.silu_glu(dense(x2))
    return y.reshape(*x.shape[:-1], y.shape[-1])


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
