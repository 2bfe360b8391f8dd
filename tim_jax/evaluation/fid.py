"""FID and Inception Score from Inception features, the way pytorch-fid and the ADM evaluator compute them.

* :class:`GaussianMoments` -- streaming mean and covariance of features (N, D) in float64, updated batch by
  batch or merged across workers (Chan et al.'s pairwise update: count, mean, centred scatter matrix).
* :func:`fid` -- the Fréchet distance of two Gaussians with ``scipy.linalg.sqrtm`` as in pytorch-fid and the ADM
  evaluator (:func:`tim_jax.evaluation.distances.frechet_distance` with ``method="sqrtm"``).
* :func:`inception_score` -- exp(E_x KL(p(y|x) || p(y))) over the 1008-way softmax, in consecutive splits of
  5000 samples averaged, as the ADM evaluator does.
* :func:`load_reference_statistics` / :func:`save_statistics` -- ``.npz`` with ``mu`` / ``sigma`` (pytorch-fid,
  and ADM reference batches such as ``VIRTUAL_imagenet256_labeled.npz``) or raw activations ``arr_0`` (N, D).
* :func:`accumulate` -- run :class:`~tim_jax.evaluation.inception.FIDInceptionV3` over image batches.

Statistics of ADM reference batches were computed with the TF graph (see the inception module docstring for how
it differs from pytorch-fid's input path); an FID against them is the paper's number only when the sample features
come from that same pipeline.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np

from tim_jax.evaluation.distances import frechet_distance

__all__ = [
    "GaussianMoments",
    "accumulate",
    "fid",
    "fid_from_moments",
    "inception_score",
    "load_reference_statistics",
    "save_statistics",
]


@dataclasses.dataclass(frozen=True)
class GaussianMoments:
    """Running moments of a feature set, float64; immutable (``update`` / ``merge`` return new objects).

    Attributes:
      count: number of feature vectors seen.
      mean: (D,) their mean.
      scatter: (D, D) sum over samples of (x - mean)(x - mean)^T.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "GaussianMoments":
        """Moments of no samples in dimension ``dim``."""
        if int(dim) < 1:
            raise ValueError(f"feature dimension must be >= 1; got {dim}")
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features) -> "GaussianMoments":
        """Moments of one batch of features (N, D)."""
        f = _as_features(features)
        mean = f.mean(axis=0)
        centred = f - mean
        return cls(f.shape[0], mean, centred.T @ centred)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def update(self, features) -> "GaussianMoments":
        """These moments with a batch of features (N, D) added."""
        f = _as_features(features)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dimension {f.shape[1]}, the moments {self.dim}")
        return self.merge(GaussianMoments.of(f)) if f.shape[0] else self

    def merge(self, other: "GaussianMoments") -> "GaussianMoments":
        """Moments of the union of both sample sets (order-independent up to round-off)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {self.dim} and {other.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return GaussianMoments(n, mean, scatter)

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (D, D) (divides by count - 1, as ``np.cov``). Needs count >= 2."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples; have {self.count}")
        return self.scatter / (self.count - 1)

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), float64."""
        return self.mean.copy(), self.covariance()


def _as_features(features) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, D); got {f.shape}")
    return f


def fid(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2): the reference (pytorch-fid / ADM) sqrtm computation.

    mu: (D,), sigma: (D, D); squared feature units.
    """
    return frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm", eps=eps)


def fid_from_moments(a: GaussianMoments, b: GaussianMoments) -> float:
    """FID between the Gaussians of two :class:`GaussianMoments`."""
    return fid(*a.gaussian(), *b.gaussian())


def inception_score(logits, *, split_size: int = 5000) -> float:
    """Inception Score of logits (N, C): mean over consecutive splits of ``split_size`` of exp(mean KL).

    KL(p(y|x) || p(y)) with p(y) the mean softmax of the split; the last split may be shorter. Computed in float64
    with log-softmax. The ADM evaluator (and improved-gan) use the bias-free logits pool3 @ W: build the Inception
    with ``logits_bias=False`` to reproduce their numbers. Ranges from 1 to C.
    """
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N >= 1; got {z.shape}")
    if int(split_size) < 1:
        raise ValueError(f"split_size must be >= 1; got {split_size}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        p = np.exp(part)
        with np.errstate(divide="ignore"):  # classes no sample predicts: masked out below
            log_marginal = np.log(p.mean(axis=0))
        terms = np.where(p > 0, p * (part - np.where(p > 0, log_marginal, 0.0)), 0.0)  # 0 log 0 = 0
        kl = terms.sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def load_reference_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64 from a reference ``.npz``.

    Layouts: ``mu`` + ``sigma`` (pytorch-fid's ``--save-stats``; ADM reference batches, which also carry the images
    as ``arr_0``), or ``arr_0`` holding Inception activations (N, D) whose statistics are computed here. Anything
    else (e.g. ``arr_0`` with images and no ``mu``/``sigma``) raises ValueError naming what the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.files)
        if "mu" in keys and "sigma" in keys:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
            return mu, sigma
        if "arr_0" in keys:
            acts = f["arr_0"]
            if acts.ndim == 2 and np.issubdtype(acts.dtype, np.floating):
                return GaussianMoments.of(acts).gaussian()
            raise ValueError(
                f"{path}: arr_0 has shape {acts.shape} and dtype {acts.dtype}, which looks like images, not "
                "Inception activations (N, D), and the file has no mu/sigma; run the images through "
                "FIDInceptionV3 (see accumulate) to get their statistics")
    raise ValueError(f"{path}: not a FID statistics file; expected keys mu and sigma, or arr_0 with activations "
                     f"(N, D); found {keys}")


def save_statistics(path, mu, sigma) -> Path:
    """Write ``mu`` (D,) and ``sigma`` (D, D) to ``path`` (.npz), the layout :func:`load_reference_statistics` reads."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    path = Path(path)
    np.savez(path, mu=mu, sigma=sigma)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def accumulate(model, batches: Iterable, moments: GaussianMoments | None = None
               ) -> tuple[GaussianMoments, np.ndarray]:
    """Run the FID Inception over image batches (B, H, W, 3) in [0, 1]; returns (moments of the pool3 features,
    logits (N, 1008) float32). Pass ``moments`` to continue an earlier accumulation."""
    from tim_jax.evaluation.inception import FEATURE_DIM, NUM_CLASSES, extract

    moments = GaussianMoments.empty(FEATURE_DIM) if moments is None else moments
    logits = []
    for batch in batches:
        pool, lg = extract(model, batch)
        moments = moments.update(np.asarray(pool))
        logits.append(np.asarray(lg))
    return moments, (np.concatenate(logits) if logits else np.zeros((0, NUM_CLASSES), np.float32))
