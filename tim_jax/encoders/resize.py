"""Image / grid resizing with torch ``F.interpolate`` semantics, as separable matrix products.

The REPA encoders resize with torch: images with ``mode='bicubic', align_corners=False``
(antialias off), DINOv2 position embeddings likewise, RADIO position embeddings with
``mode='bilinear', align_corners=True``. Each 1-D pass is a fixed (out, in) weight matrix built
in numpy from the sizes (static under jit), applied with an einsum at HIGHEST precision. The
sizes are given as output sizes (torch's ``size=`` path: source scale ``in / out``), never as a
scale factor.

Arrays are channels-last: ``(..., H, W, C)``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: torch's cubic-convolution coefficient (Keys kernel with a = -0.75)
CUBIC_A = -0.75


def _fma(a, b, c) -> np.float32:
    """float32 a*b + c rounded once (a fused multiply-add): torch's CPU kernels are compiled
    with FMA contraction, so this reproduces their float32 weights more closely."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _cubic_near(t: np.float32) -> np.float32:
    """Keys kernel for |t| <= 1: ((a+2) t - (a+3)) t^2 + 1."""
    a = np.float32(CUBIC_A)
    r = _fma(a + np.float32(2), t, -(a + np.float32(3)))
    return _fma(np.float32(r * t), t, np.float32(1))


def _cubic_far(t: np.float32) -> np.float32:
    """Keys kernel for 1 <= |t| < 2: ((a t - 5a) t + 8a) t - 4a."""
    a = np.float32(CUBIC_A)
    r = _fma(a, t, np.float32(-5) * a)
    r = _fma(r, t, np.float32(8) * a)
    return _fma(r, t, np.float32(-4) * a)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's 1-D bicubic pass, align_corners=False.

    Output sample i reads source position ``(i + 0.5) * in/out - 0.5`` (not clamped), with the
    four taps at floor-1 .. floor+2 clamped into [0, in_size - 1]. Arithmetic in float32 as
    torch does for float32 inputs.
    """
    _check_sizes(in_size, out_size)
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float64)
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        src = _fma(scale, f32(i) + f32(0.5), f32(-0.5))
        i0 = min(int(np.floor(src)), in_size - 1)
        t = f32(min(max(src - f32(i0), 0.0), 1.0))
        t2 = f32(f32(1) - t)
        taps = (_cubic_far(t + f32(1)), _cubic_near(t), _cubic_near(t2), _cubic_far(t2 + f32(1)))
        for k, w in enumerate(taps):
            m[i, min(max(i0 - 1 + k, 0), in_size - 1)] += w
    return m.astype(np.float32)


@functools.lru_cache(maxsize=256)
def bilinear_matrix_align_corners(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's 1-D bilinear pass, align_corners=True.

    Output sample i reads source position ``i * (in - 1) / (out - 1)`` (0 when out == 1): the
    corner samples of input and output coincide.
    """
    _check_sizes(in_size, out_size)
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float64)
    scale = (f32(in_size - 1) / f32(out_size - 1)) if out_size > 1 else f32(0)
    for i in range(out_size):
        src = f32(scale * f32(i))
        i0 = min(int(np.floor(src)), in_size - 1)
        lam = f32(min(max(src - f32(i0), 0.0), 1.0))
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        m[i, i0] += f32(1) - lam
        m[i, i1] += lam
    return m.astype(np.float32)


def _check_sizes(in_size: int, out_size: int) -> None:
    if int(in_size) < 1 or int(out_size) < 1:
        raise ValueError(f"resize sizes must be >= 1, got in={in_size}, out={out_size}")


def _apply(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """Resample the H and W axes of ``x`` (..., H, W, C) with (out, in) matrices; float32 math."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(mh), x, precision=hi)
    x = jnp.einsum("pw,...owc->...opc", jnp.asarray(mw), x, precision=hi)
    return x.astype(dtype)


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resize_bicubic(x: jax.Array, size) -> jax.Array:
    """torch ``F.interpolate(x, size, mode='bicubic', align_corners=False)`` on channels-last x.

    x: (..., H, W, C), any float dtype (computed in float32, returned in x's dtype);
    size: int or (out_h, out_w). Returns (..., out_h, out_w, C). No antialiasing, no clamping
    of the result (bicubic overshoots the input range near edges, as torch's does).
    """
    if x.ndim < 3:
        raise ValueError(f"resize_bicubic expects (..., H, W, C), got shape {x.shape}")
    oh, ow = _size_pair(size)
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (oh, ow):
        return x
    return _apply(x, bicubic_matrix(h, oh), bicubic_matrix(w, ow))


def resize_bilinear_align_corners(x: jax.Array, size) -> jax.Array:
    """torch ``F.interpolate(x, size, mode='bilinear', align_corners=True)`` on channels-last x.

    x: (..., H, W, C); size: int or (out_h, out_w). Returns (..., out_h, out_w, C).
    """
    if x.ndim < 3:
        raise ValueError(f"resize_bilinear_align_corners expects (..., H, W, C), got {x.shape}")
    oh, ow = _size_pair(size)
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (oh, ow):
        return x
    return _apply(x, bilinear_matrix_align_corners(h, oh), bilinear_matrix_align_corners(w, ow))
