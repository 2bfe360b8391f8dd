"""Reference statistics (mu, sigma of the Inception pool3 features of real images) for FID.

Three sources:
  * a statistics ``.npz`` (``mu``/``sigma``, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``, or
    activations ``arr_0`` (N, D)): :func:`reference_from_npz`;
  * images in an ``.npz`` (``arr_0`` (N, H, W, 3) uint8, e.g. the images of an ADM reference batch)
    run through our Inception: :func:`reference_from_image_npz` -- FID on both sides with the
    same network;
  * a record directory of ``python -m tim_jax.prepare`` whose records carry the crop as
    ``image`` bytes (PNG/JPEG): :func:`reference_from_records`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tim_jax.evaluation.fid import GaussianMoments, load_reference_statistics

__all__ = ["reference_from_npz", "reference_from_image_npz", "reference_from_records",
           "FeatureRunner", "check_reference_file"]


def check_reference_file(path, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics file, or FileNotFoundError / ValueError naming the problem
    (wrong keys, an images-only file, a dimension other than ``dim``)."""
    path = Path(path)
    try:
        mu, sigma = load_reference_statistics(path)
    except ValueError as e:
        raise ValueError(f"--ref: {e}. For a file holding only images (arr_0 uint8), use "
                         "--ref-images instead") from None
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"--ref {path}: statistics of dimension {mu.shape[0]}, but the Inception "
                         f"pool3 features have {dim}")
    return mu, sigma


reference_from_npz = check_reference_file


class FeatureRunner:
    """Feature network over uint8 image batches, data parallel over a 1-D mesh (padded batches
    of ``rows``, a multiple of the device count)."""

    def __init__(self, features, *, mesh=None, batch_size: int = 256):
        self.features = features
        self.mesh = mesh if mesh is not None else jax.sharding.Mesh(
            np.array(jax.local_devices()), ("data",))
        n = int(self.mesh.devices.size)
        self.rows = int(math.ceil(int(batch_size) / n)) * n
        self._batch = NamedSharding(self.mesh, P(self.mesh.axis_names[0]))
        self._state = jax.device_put(features.state, NamedSharding(self.mesh, P()))
        self._fn = jax.jit(features.apply)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W, 3) uint8 -> (pool (n, D), logits (n, K)) float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        pools, logits = [], []
        for s in range(0, len(images), self.rows):
            part = images[s:s + self.rows]
            keep = len(part)
            if keep < self.rows:
                part = np.concatenate([part, np.repeat(part[-1:], self.rows - keep, 0)])
            p, lg = self._fn(self._state, jax.device_put(part, self._batch))
            pools.append(np.asarray(p)[:keep])
            logits.append(np.asarray(lg)[:keep])
        return np.concatenate(pools), np.concatenate(logits)

    def moments(self, batches: Iterable[np.ndarray], progress=None) -> GaussianMoments:
        """Moments of the pool features of every image of ``batches`` (uint8 (n, H, W, 3))."""
        moments = None
        for images in batches:
            pool, _ = self(images)
            moments = (GaussianMoments.empty(pool.shape[1]) if moments is None
                       else moments).update(pool)
            if progress is not None:
                progress.update(len(images))
        if moments is None or moments.count < 2:
            raise ValueError("reference statistics need at least 2 images")
        return moments


def reference_from_image_npz(path, runner: FeatureRunner, *, limit: int | None = None,
                             progress=None) -> GaussianMoments:
    """Moments of the images ``arr_0`` (N, H, W, 3) uint8 of an ``.npz`` (first ``limit``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ref-images {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"--ref-images {path}: no arr_0 (found {f.files})")
        images = f["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"--ref-images {path}: arr_0 is {images.dtype} {images.shape}, not uint8 "
                         "images (N, H, W, 3)")
    n = len(images) if limit is None else min(int(limit), len(images))
    step = runner.rows * 8
    return runner.moments((images[s:min(s + step, n)] for s in range(0, n, step)), progress)


def _record_images(directory, limit: int | None) -> Iterator[np.ndarray]:
    """The ``image`` field of the records of a prepared directory, decoded to uint8 RGB."""
    import grain
    from PIL import Image

    from tim_jax.data.records import decode_record, read_manifest, shard_paths

    manifest = read_manifest(directory)
    fields = manifest.get("fields")
    if fields is not None and "image" not in fields:
        raise ValueError(f"--ref-from-records {directory}: the records carry no 'image' field "
                         f"(fields: {sorted(fields)}); prepare them again with --keep-images")
    source = grain.sources.ArrayRecordDataSource([str(p) for p in shard_paths(directory)])
    n = len(source) if limit is None else min(int(limit), len(source))
    for i in range(n):
        rec = decode_record(source[i])
        if "image" not in rec:
            raise ValueError(f"--ref-from-records {directory}: record {i} has no 'image' field")
        yield np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"), np.uint8)


def _same_shape_batches(images: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Stack consecutive images into batches of at most ``size``, cutting where the shape
    changes (native-resolution crops)."""
    batch = []
    for im in images:
        if batch and (len(batch) == size or im.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(im)
    if batch:
        yield np.stack(batch)


def reference_from_records(directory, runner: FeatureRunner, *, limit: int | None = None,
                           progress=None) -> GaussianMoments:
    """Moments of the record crops (``image`` bytes) of a prepared directory (first ``limit``)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--ref-from-records {directory} is not a directory")
    return runner.moments(_same_shape_batches(_record_images(directory, limit), runner.rows * 4),
                          progress)
