"""The demo's two datasets (no download: both ship with the installed packages).

``digits``: the UCI handwritten digits bundled with scikit-learn (1,797 grey 8x8 images, 10 classes), NHWC
(N, 8, 8, 1) float32 in [-1, 1]. ``gmm``: a 4x4 grid of Gaussians in 2-D, two classes in a checkerboard, stored as
(N, 1, 1, 2) "images" so that the same train step and sampler serve both.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tim_jax.demo.settings import DATASETS, DemoError

GMM_GRID = 4          # modes on a GMM_GRID x GMM_GRID grid
GMM_SPACING = 1.0     # distance between neighbouring modes
GMM_STD = 0.1         # per-mode standard deviation
GMM_TRAIN_ROWS = 20_000


@dataclasses.dataclass
class Dataset:
    """Training data (x (N, H, W, C) float32, y (N,) int32) and what evaluation needs."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: images (1797, 8, 8, 1) float32 in [-1, 1] (0..16 / 8 - 1), labels (1797,) int32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return x, d.target.astype(np.int32)


def sample_gmm(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of the 2-D toy mixture: (n, 1, 1, 2) float32 and labels (n,) int32.

    Modes at ((i - 1.5) * GMM_SPACING, (j - 1.5) * GMM_SPACING) for i, j in 0..3, equally likely, isotropic std
    GMM_STD; class (i + j) % 2 (checkerboard), so each class mean is the origin, where no data lives.
    """
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, GMM_GRID, n), rng.integers(0, GMM_GRID, n)
    centers = np.stack([i, j], -1) * GMM_SPACING - (GMM_GRID - 1) / 2 * GMM_SPACING
    x = centers + GMM_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32).reshape(n, 1, 1, 2), ((i + j) % 2).astype(np.int32)


def load_dataset(name: str, seed: int) -> Dataset:
    """The training set of ``name`` (the gmm sample depends on ``seed``; digits is fixed)."""
    if name == "digits":
        x, y = load_digits_dataset()
        return Dataset(name, x, y, 10)
    if name == "gmm":
        x, y = sample_gmm(GMM_TRAIN_ROWS, seed=10_000 + seed)
        return Dataset(name, x, y, 2)
    raise DemoError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def sample_labels(data: Dataset, n: int) -> np.ndarray:
    """Balanced class labels (n,), class-major: n // num_classes of each class, the remainder spread from class 0."""
    per = np.full(data.num_classes, n // data.num_classes)
    per[: n % data.num_classes] += 1
    return np.repeat(np.arange(data.num_classes, dtype=np.int32), per)
