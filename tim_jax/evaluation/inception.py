"""The FID Inception v3 of pytorch-fid (a port of the TF FID graph, "2015-12-05") in Flax NNX.

Images are channels-last: ``(B, H, W, 3)`` float in [0, 1]. :class:`FIDInceptionV3` returns the
pool3 features ``(B, 2048)`` (the FID feature space) and the logits ``(B, 1008)`` (the TF graph
has 1008 classes), both float32.

Input handling is pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``:
:func:`resize_bilinear` to 299 x 299 with torch's ``F.interpolate(mode='bilinear',
align_corners=False)`` semantics (half-pixel centres, source index clamped at 0, no antialias),
then ``2 x - 1``. The network is torchvision's Inception3 with pytorch-fid's FID patches: the
3x3 average pools of Mixed_5b-d (FIDInceptionA), Mixed_6b-e (FIDInceptionC) and Mixed_7b
(FIDInceptionE_1) exclude the zero padding from the count (TF semantics), and Mixed_7c
(FIDInceptionE_2) max-pools its pool branch. BatchNorm (eps 0.001) is folded into the preceding
convolution at load time, in float64, and stored as float32 conv weights + bias.

Weights (never downloaded at run time): pytorch-fid's release file
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Convert it once with :func:`convert_pytorch_fid_weights` (needs torch), then load the
safetensors with :func:`from_safetensors` (no torch). Tensor names and layouts stay torch's.

How the ADM evaluator differs (WZDTHU/TiM ``projects/evaluate/adm_evaluator.py``, the
evaluator behind the paper's ImageNet numbers; it runs the TF graph ``classify_image_graph_def.pb``
with TensorFlow):

* Input: NHWC float32 holding uint8 values in [0, 255], fed at ``ExpandDims:0``.
* Resize: the graph's own ``ResizeBilinear`` to 299 x 299 with TF 1.x legacy semantics
  (``align_corners=False`` *without* half-pixel centres): output pixel ``i`` reads source
  ``i * in / out`` (upper neighbour clamped to the last row/column), whereas torch reads
  ``(i + 0.5) * in / out - 0.5`` (clamped at 0). For 256 -> 299 the TF sampling grid is shifted
  by up to half a source pixel towards the top-left; both agree when the input is already
  299 x 299 and neither antialiases.
* Normalisation: ``(x - 128) / 128`` on [0, 255] values, not pytorch-fid's ``2 x / 255 - 1``.
* Inception Score: softmax of ``pool3 @ W`` **without** the fc bias (improved-gan's recipe); build
  the model with ``logits_bias=False`` to reproduce it. sFID (``mixed_6/conv``, first 7 channels)
  is not provided here.
So FIDs from this module equal pytorch-fid's and differ slightly from ADM-evaluator FIDs.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["FID_WEIGHTS_URL", "FIDInceptionV3", "convert_pytorch_fid_weights", "extract",
           "from_safetensors", "from_state_dict", "load_state_dict", "resize_bilinear",
           "torch_state_dict_shapes"]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3
MIN_INPUT_SIZE = 75  # smallest H, W the stem and the stride-2 reductions accept


# --- torch-exact bilinear resize (align_corners=False) ----------------------------------------


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's 1-D bilinear pass, align_corners=False.

    Output i reads source ``s = (i + 0.5) * in/out - 0.5`` clamped below at 0, lerping rows
    ``floor(s)`` and ``floor(s) + 1`` (the latter clamped to in - 1). As in torch's CPU kernel
    for float32: the ratio in/out is a float32, and ``s`` is rounded to float32 once (the kernel's
    multiply-add is fused), which reproduces torch's weights bit for bit.
    """
    if int(in_size) < 1 or int(out_size) < 1:
        raise ValueError(f"resize sizes must be >= 1, got in={in_size}, out={out_size}")
    scale = float(np.float32(in_size) / np.float32(out_size))
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = np.float32(scale * (i + 0.5) - 0.5)  # exact product in float64, one rounding
        src = max(src, np.float32(0.0))
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam1 = np.float32(min(max(src - np.float32(i0), np.float32(0.0)), np.float32(1.0)))
        m[i, i0] += np.float32(1.0) - lam1
        m[i, i1] += lam1
    return m


def resize_bilinear(images: jax.Array, size) -> jax.Array:
    """torch ``F.interpolate(x, size, mode='bilinear', align_corners=False)``, channels-last.

    images: (..., H, W, C) float; size: int or (out_h, out_w). Returns (..., out_h, out_w, C) in
    float32 (two separable passes at HIGHEST matmul precision; no antialias).
    """
    if images.ndim < 3:
        raise ValueError(f"resize_bilinear expects (..., H, W, C), got shape {images.shape}")
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = images.shape[-3], images.shape[-2]
    x = images.astype(jnp.float32)
    if (h, w) == (oh, ow):
        return x
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(bilinear_matrix(h, oh)), x, precision=hi)
    return jnp.einsum("pw,...owc->...opc", jnp.asarray(bilinear_matrix(w, ow)), x, precision=hi)


# --- Building blocks --------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBN(nnx.Module):
    """torchvision's BasicConv2d (conv without bias, BatchNorm eps 0.001, ReLU), BN folded.

    The folded conv carries a bias; :func:`load_state_dict` fills both from the torch tensors
    (parameters start at zero: this network is only ever loaded, never trained).
    (B, H, W, in_ch) -> (B, H', W', out_ch) in the compute dtype.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0, *, dtype, rngs):
        ph, pw = _pair(padding)
        precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        self.conv = nnx.Conv(in_ch, out_ch, _pair(kernel), _pair(stride),
                             padding=((ph, ph), (pw, pw)), use_bias=True, dtype=dtype,
                             param_dtype=jnp.float32, precision=precision,
                             kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool over H, W of (B, H, W, C); padding counts as -inf (torch max_pool2d)."""
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 pads)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 'same' average pool that divides by the number of real (unpadded) inputs.

    torch ``avg_pool2d(k=3, s=1, p=1, count_include_pad=False)``: the TF average pool.
    (B, H, W, C) -> same shape, summed in float32.
    """
    h, w = x.shape[1], x.shape[2]
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, 3, 3, 1),
                                  (1, 1, 1, 1), pads)
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    count = (rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None]
    return (total / count).astype(x.dtype)


class InceptionA(nnx.Module):
    """FIDInceptionA (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1."""

    def __init__(self, in_ch: int, pool_features: int, *, dtype, rngs):
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        self.branch1x1 = c(in_ch, 64, 1)
        self.branch5x5_1 = c(in_ch, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(in_ch, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(in_ch, pool_features, 1)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision InceptionB (Mixed_6a), the 35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int, *, dtype, rngs):
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        self.branch3x3 = c(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(in_ch, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (Mixed_6b-e): factorised 7x7 branches, avgpool(excl. pad)-1x1."""

    def __init__(self, in_ch: int, channels_7x7: int, *, dtype, rngs):
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = c(in_ch, 192, 1)
        self.branch7x7_1 = c(in_ch, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(in_ch, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(in_ch, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, d, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision InceptionD (Mixed_7a), the 17 -> 8 reduction."""

    def __init__(self, in_ch: int, *, dtype, rngs):
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        self.branch3x3_1 = c(in_ch, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(in_ch, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (Mixed_7b, ``pool='avg'``, padding excluded) / _2 (Mixed_7c, ``pool='max'``)."""

    def __init__(self, in_ch: int, pool: str, *, dtype, rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        self.branch1x1 = c(in_ch, 320, 1)
        self.branch3x3_1 = c(in_ch, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(in_ch, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(in_ch, 192, 1)

    def __call__(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, padding=1)
        return jnp.concatenate(
            [self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
             self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


# --- The network ------------------------------------------------------------------------------


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID Inception v3 up to pool3, plus the 1008-way fc head.

    Args:
      resize_input: resize to 299 x 299 first (torch bilinear, align_corners=False).
      normalize_input: map [0, 1] to [-1, 1] (2 x - 1).
      logits_bias: add the fc bias to the logits (torch's fc); False gives the bias-free logits
        of the ADM evaluator's / improved-gan's Inception Score.
      dtype: compute dtype of the convolutions (float32 or bfloat16); params stay float32 and
        the pooled features and logits are float32.
    Attribute names are torchvision's, so torch state-dict keys map one to one.
    """

    def __init__(self, *, resize_input: bool = True, normalize_input: bool = True,
                 logits_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"FIDInceptionV3 dtype must be float32 or bfloat16, got {dtype}")
        self.resize_input, self.normalize_input = resize_input, normalize_input
        self.logits_bias, self.dtype = logits_bias, dtype
        c = functools.partial(ConvBN, dtype=dtype, rngs=rngs)
        kw = dict(dtype=dtype, rngs=rngs)
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, param_dtype=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST,
                             kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) in [0, 1] -> pool3 features (B, 2048) float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects images of shape (B, H, W, 3), got "
                             f"{images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        elif min(x.shape[1], x.shape[2]) < MIN_INPUT_SIZE:
            raise ValueError(f"without resize_input, H and W must be >= {MIN_INPUT_SIZE}; got "
                             f"{x.shape[1:3]}")
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def logits(self, pool: jax.Array) -> jax.Array:
        """pool3 features (B, 2048) -> logits (B, 1008) float32 (bias per ``logits_bias``)."""
        out = jnp.matmul(pool.astype(jnp.float32), self.fc.kernel.get_value(),
                         precision=jax.lax.Precision.HIGHEST)
        return out + self.fc.bias.get_value() if self.logits_bias else out

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, 3) in [0, 1] -> (pool3 (B, 2048), logits (B, 1008)), float32."""
        pool = self.features(images)
        return pool, self.logits(pool)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def extract(model: FIDInceptionV3, images) -> tuple[jax.Array, jax.Array]:
    """Jitted ``model(images)``: (B, H, W, 3) in [0, 1] -> (pool3 (B, 2048), logits (B, 1008))."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, jnp.asarray(images))


# --- Weights: torch state-dict names and layouts ----------------------------------------------


def _conv_layers(model) -> list[tuple[str, ConvBN]]:
    return [(".".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if isinstance(m, ConvBN)]


def _abstract_model(**kwargs) -> FIDInceptionV3:
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0), **kwargs))


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor pytorch-fid's FID Inception state dict must hold, with its torch shape.

    Conv weights are (out, in, kh, kw), BatchNorm vectors (out,), fc (1008, 2048) and (1008,).
    ``num_batches_tracked`` counters are not listed (they are ignored).
    """
    return dict(_state_dict_shapes())


@functools.lru_cache(maxsize=1)
def _state_dict_shapes() -> tuple:
    model = _abstract_model()  # the layout does not depend on dtype or the input options
    shapes = {}
    for name, layer in _conv_layers(model):
        kh, kw, cin, cout = layer.conv.kernel.shape
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{stat}"] = (cout,)
    shapes["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return tuple(shapes.items())


def _check_tensors(tensors: dict, expected: dict) -> None:
    names = {k for k in tensors if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unexpected:
        raise KeyError(f"not a pytorch-fid FID Inception state dict: {len(missing)} missing "
                       f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for k, shape in expected.items():
        if tuple(np.shape(tensors[k])) != tuple(shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(np.shape(tensors[k]))}, expected {shape}")


def load_state_dict(model: FIDInceptionV3, tensors: dict) -> FIDInceptionV3:
    """Fill ``model`` (in place, also works on an abstract one) from torch-layout tensors.

    BatchNorm is folded in float64: w' = w * gamma / sqrt(var + 0.001), b' = beta - mean * that
    scale; stored float32 in flax's (kh, kw, in, out) layout. Returns ``model``.
    """
    _check_tensors(tensors, torch_state_dict_shapes())
    get = lambda k: np.asarray(tensors[k], np.float64)  # noqa: E731
    for name, layer in _conv_layers(model):
        scale = get(f"{name}.bn.weight") / np.sqrt(get(f"{name}.bn.running_var") + BN_EPS)
        kernel = get(f"{name}.conv.weight") * scale[:, None, None, None]
        bias = get(f"{name}.bn.bias") - get(f"{name}.bn.running_mean") * scale
        layer.conv.kernel.set_value(jnp.asarray(kernel.transpose(2, 3, 1, 0).astype(np.float32)))
        layer.conv.bias.set_value(jnp.asarray(bias.astype(np.float32)))
    model.fc.kernel.set_value(jnp.asarray(get("fc.weight").T.astype(np.float32)))
    model.fc.bias.set_value(jnp.asarray(get("fc.bias").astype(np.float32)))
    return model


def from_state_dict(tensors: dict, **kwargs) -> FIDInceptionV3:
    """A :class:`FIDInceptionV3` (keyword args as its constructor, minus rngs) from torch tensors."""
    _check_tensors(tensors, torch_state_dict_shapes())  # fail before building the model
    return load_state_dict(_abstract_model(**kwargs), tensors)


def from_safetensors(path, **kwargs) -> FIDInceptionV3:
    """Load the model from a safetensors file written by :func:`convert_pytorch_fid_weights`.

    Keyword args as :class:`FIDInceptionV3` (``dtype``, ``logits_bias``, ...). No torch needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}; download {FID_WEIGHTS_URL} and convert "
            "it once with tim_jax.evaluation.inception.convert_pytorch_fid_weights(pth, out)")
    from safetensors.numpy import load_file

    return from_state_dict(load_file(str(path)), **kwargs)


def convert_pytorch_fid_weights(pth, out_safetensors) -> Path:
    """One-off conversion of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` to safetensors.

    Needs torch (imported here only). Drops ``num_batches_tracked``, checks every name and shape,
    writes float32 tensors under their torch names. Returns the output path.
    """
    pth, out = Path(pth), Path(out_safetensors)
    if not pth.is_file():
        raise FileNotFoundError(f"{pth} does not exist; download it from {FID_WEIGHTS_URL}")
    try:
        import torch
    except ImportError as e:
        raise ImportError("convert_pytorch_fid_weights needs torch to read the .pth file "
                          "(a one-off step; the converted safetensors loads without torch)") from e
    from safetensors.numpy import save_file

    state = torch.load(str(pth), map_location="cpu", weights_only=True)
    tensors = {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in state.items()
               if not k.endswith("num_batches_tracked")}
    _check_tensors(tensors, torch_state_dict_shapes())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out
