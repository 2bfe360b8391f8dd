"""Image loading and the official TiM crops, in PIL + numpy (no JAX): input side of
:mod:`tim_jax.data.prepare`.

* :func:`open_rgb`: decode a file / bytes / array fully and convert it to RGB the way the
  official loader does (torchvision's ``default_loader``: ``PIL.Image.open(f).convert("RGB")``:
  alpha is dropped, not composited; palette, grayscale and CMYK go through PIL's converters;
  EXIF orientation is not applied). Returns a note naming the original mode when it converted.
* :func:`adm_center_crop`: ADM's ``center_crop_arr`` (the official C2I preprocessing and the
  official trainer's REPA images): halve with a BOX filter while the short side is at least
  twice ``size``, BICUBIC-resize so the short side is ``size`` (round() of each side, so images
  smaller than the crop are UPSAMPLED), then the centre ``size`` x ``size`` crop.
* :func:`native_size` / :func:`native_resize`: the official native-resolution preprocessing
  (``image_nr_latent_c2i.py``'s ``native_resolution_resize``): no crop; an image of area under
  ``max_area`` keeps its size with each side floored to a multiple of ``multiple`` (at least one
  multiple); a larger one is scaled to area ``max_area`` at its aspect ratio, then floored the
  same way. BICUBIC resize to that size (each side moves by less than one ``multiple``, except
  where a side is under one multiple: it is upsampled to one).
Pixels are (H, W, 3) uint8.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Extensions the official ImageFolder accepts (compared case-insensitively)."""


def open_rgb(source) -> tuple[Image.Image, str | None]:
    """A fully decoded RGB PIL image from a path, ``bytes`` or a uint8 array ((H, W), (H, W, 1),
    (H, W, 3) or (H, W, 4)), and a note (``"converted CMYK to RGB"``) or None. Raises on
    unreadable or truncated data (``OSError`` / ``ValueError`` from PIL)."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            raise ValueError(f"image array of dtype {arr.dtype}, expected uint8")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"image array of shape {arr.shape}, expected (H, W[, 1|3|4])")
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        img = Image.open(fp)
        img.load()  # decode now: a corrupt or truncated file fails here, not later
    note = None
    if img.mode != "RGB":
        note = f"converted {img.mode} to RGB"
        with warnings.catch_warnings():  # "Palette images with Transparency ..." is expected
            warnings.simplefilter("ignore")
            img = img.convert("RGB")
    return img, note


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop of an RGB image to (size, size, 3) uint8 (see the module docstring)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size),
                     resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def native_size(width: int, height: int, multiple: int, max_area: int) -> tuple[int, int]:
    """(new_width, new_height) of the official native-resolution resize: both multiples of
    ``multiple``, area at most ``max(max_area, multiple**2)``.

    Follows the official formula (area under the cap: each side floored to a multiple, at least
    one; otherwise ``side = sqrt(max_area)``, ``new_w = sqrt(w / h) * side``,
    ``new_h = new_w * h / w``, each floored). One deviation, for degenerate aspect ratios only
    (beyond ``max_area / multiple**2`` : 1, where a side is under one ``multiple``): the official
    code raises a side of 0 to one multiple (or crashes on it) and so can exceed the cap; here
    the long side is then shortened until the area fits.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    if width * height < max_area:
        w_cells, h_cells = max(1, width // multiple), max(1, height // multiple)
    else:
        new_w = math.sqrt(width / height) * math.sqrt(max_area)
        new_h = new_w * height / width
        w_cells, h_cells = max(1, int(new_w / multiple)), max(1, int(new_h / multiple))
    cap_cells = max(1, max_area // (multiple * multiple))
    if w_cells * h_cells > cap_cells:  # only when one side is a single multiple
        if w_cells >= h_cells:
            w_cells = max(1, cap_cells // h_cells)
        else:
            h_cells = max(1, cap_cells // w_cells)
    return w_cells * multiple, h_cells * multiple


def native_resize(img: Image.Image, multiple: int, max_area: int) -> np.ndarray:
    """The official native-resolution resize of an RGB image, (H', W', 3) uint8."""
    new_w, new_h = native_size(img.size[0], img.size[1], multiple, max_area)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img))


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG (lossless) or JPEG (``quality``) bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    else:
        raise ValueError(f"unknown image format {fmt!r} (png or jpeg)")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes (a record's ``image``) -> (H, W, 3) uint8."""
    img = Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB"))
