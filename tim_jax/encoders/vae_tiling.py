"""Tiled decoding: decode a large latent in overlapping tiles and blend the seams.

``decode_tiled(decode_fn, latents, tile=64, overlap=16)`` cuts the latent (B, h, w, C) into
tiles of ``tile`` x ``tile`` latent cells whose starts are ``tile - overlap`` apart (the last
tile of a row/column is placed flush with the edge, so every tile has the same shape and
``decode_fn`` compiles once), decodes each tile, and accumulates the decoded tiles on the host
with separable weights that ramp linearly across each overlap (the two weights sum to one at
every pixel), then divides by the accumulated weight. The spatial factor f is read from the
first decoded tile (decoded size / tile size), so any autoencoder works.

Memory: the device holds one tile's decode at a time; the host holds the output
(B, h*f, w*f, c) float32. Because the VAE decoders' GroupNorm statistics and mid-block attention
are computed per tile, a tiled decode is close to, but not equal to, the untiled one; away from
seams each output pixel is exactly the decode of the one tile that covers it.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: every ``tile - overlap`` cells, the last flush with the
    end; one tile of the whole axis when ``length <= tile``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def blend_weights(starts: list[int], tile: int, length: int, factor: int) -> list[np.ndarray]:
    """Per-tile 1-D weights in output pixels (each ``tile*factor`` long): 1 where a tile is
    alone, a linear ramp across each overlap with a neighbour (tile i ramps down, i+1 ramps up,
    the two summing to one)."""
    size = min(tile, length) * factor
    out = []
    for i, s in enumerate(starts):
        w = np.ones(size, np.float32)
        a, b = s * factor, s * factor + size
        if i > 0:                                   # overlap with the previous tile
            end_prev = starts[i - 1] * factor + size
            n = end_prev - a
            w[:n] = np.minimum(w[:n], (np.arange(n, dtype=np.float32) + 0.5) / n)
        if i + 1 < len(starts):                     # overlap with the next tile
            start_next = starts[i + 1] * factor
            n = b - start_next
            w[size - n:] = np.minimum(w[size - n:],
                                      1.0 - (np.arange(n, dtype=np.float32) + 0.5) / n)
        out.append(w)
    return out


def decode_tiled(decode_fn, latents, *, tile: int = 64, overlap: int = 16) -> np.ndarray:
    """Decode ``latents`` (B, h, w, C) tile by tile with ``decode_fn`` ((B, t, t, C) ->
    (B, t*f, t*f, c), e.g. a codec's jitted ``decode``); returns (B, h*f, w*f, c) float32 numpy.

    tile: tile side in latent cells (tiles shrink to the latent on smaller axes);
    overlap: latent cells shared by neighbouring tiles, ``0 <= overlap < tile``.
    Not jit-able itself (a host loop); ``decode_fn`` is called with one tile shape.
    """
    if latents.ndim != 4:
        raise ValueError(f"expected latents (B, h, w, C) NHWC, got shape {latents.shape}")
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, "
                         f"overlap={overlap}")
    b, h, w, _ = latents.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    out = acc = wy = wx = None
    factor = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            piece = np.asarray(decode_fn(jnp.asarray(latents[:, r:r + th, c:c + tw])),
                               np.float32)
            if factor is None:
                factor = piece.shape[1] // th
                if piece.shape[1] != th * factor or piece.shape[2] != tw * factor or factor < 1:
                    raise ValueError(f"decode_fn mapped a {th}x{tw} tile to "
                                     f"{piece.shape[1]}x{piece.shape[2]}: not an integer "
                                     "upscaling")
                out = np.zeros((b, h * factor, w * factor, piece.shape[3]), np.float32)
                acc = np.zeros((h * factor, w * factor, 1), np.float32)
                wy = blend_weights(rows, tile, h, factor)
                wx = blend_weights(cols, tile, w, factor)
            weight = (wy[i][:, None] * wx[j][None, :])[:, :, None]
            ys = slice(r * factor, r * factor + piece.shape[1])
            xs = slice(c * factor, c * factor + piece.shape[2])
            out[:, ys, xs] += piece * weight
            acc[ys, xs] += weight
    return out / acc

