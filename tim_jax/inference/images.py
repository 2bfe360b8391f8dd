"""Image-side helpers of the sampling pipeline: valid sizes, decoded pixels -> uint8, grids.

Pixel conversion follows the official sample scripts: decoded images x (about [-1, 1]) become
``clamp(255 * (x + 1) / 2, 0, 255)`` cast to uint8 (truncation, not rounding).
"""
from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["size_step", "check_size", "nearest_sizes", "parse_size", "to_uint8", "image_grid",
           "slug"]


def size_step(spatial_factor: int, patch_size: int) -> int:
    """Pixels per token side: an image side must be a multiple of VAE factor x patch size."""
    return int(spatial_factor) * int(patch_size)


def nearest_sizes(value: int, step: int) -> list[int]:
    """The valid sizes (positive multiples of ``step``) nearest to ``value``: the one below and
    the one above (just ``step`` when ``value < step``)."""
    below = (int(value) // step) * step
    return [s for s in (below, below + step) if s > 0] or [step]


def check_size(height: int, width: int, spatial_factor: int, patch_size: int) -> tuple[int, int]:
    """(latent h, latent w) of a height x width image, or ValueError naming the nearest valid
    sizes when a side is not a positive multiple of spatial_factor x patch_size."""
    step = size_step(spatial_factor, patch_size)
    problems = []
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0 or v % step:
            near = " or ".join(str(s) for s in nearest_sizes(max(int(v), 0), step))
            problems.append(f"{name} {v} (nearest valid: {near})")
    if problems:
        raise ValueError(
            f"image size {width}x{height} (WxH) is not valid: sides must be positive multiples of "
            f"{step} = VAE factor {spatial_factor} x patch size {patch_size}; bad: "
            + "; ".join(problems))
    return height // spatial_factor, width // spatial_factor


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (or one number for a square) -> (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX\*]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 1024x768) or one number")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    return h, w


def to_uint8(decoded) -> np.ndarray:
    """Decoded images (..., 3) float about [-1, 1] -> uint8 as the official scripts do."""
    x = np.asarray(decoded, np.float32)
    return np.clip(255.0 * ((x + 1.0) / 2.0), 0.0, 255.0).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2,
               background: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 grid, filled
    row-major; ``ncols`` defaults to min(N, ceil(sqrt(N)))."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = max(1, min(n, int(ncols or math.ceil(math.sqrt(n)))))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), background, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: lowercase words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    out = "-".join(words)[:limit].strip("-")
    return out or "prompt"
