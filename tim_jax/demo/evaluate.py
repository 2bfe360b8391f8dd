"""Sampling the trained models and scoring the samples.

``digits``: the Fréchet distance (``fd``) between generated and real images in the feature space of a small MLP
classifier trained on the real data in the same run (its held-out accuracy is reported), and the class accuracy
(``class_acc``) of the generated images under that classifier. ``gmm``: the sliced Wasserstein distance (``swd``)
to a fresh sample of the true mixture. The evaluation does not depend on the run's seed, so runs compare.
"""
from __future__ import annotations

import time

import numpy as np

from tim_jax.demo.data import Dataset, sample_gmm

METRIC_DOCS = {
    "fd": "Fréchet distance to the real digits in the classifier's feature space (lower is better)",
    "class_acc": "fraction of generated images the classifier assigns to their conditioning class",
    "swd": "sliced 2-Wasserstein distance to a fresh sample of the true mixture (lower is better)",
}
EVAL_SEED = 0   # the evaluation (classifier, split, reference sample) is the same for every run seed


def generate(apply_fn, params, transport, labels: np.ndarray, shape, *, num_steps: int, mode: str, seed: int,
             null_label: int, chunk: int = 2000) -> np.ndarray:
    """Samples (N, *shape) float32 for ``labels`` (N,) from noise drawn with ``seed`` (same noise for any model).

    ``mode``: "transition" (TiM: r = next time) or "diffusion" (Euler on the velocity), see
    :func:`tim_jax.sampler.sample`.
    """
    import jax
    import jax.numpy as jnp

    from tim_jax.sampler import sample

    z = np.asarray(jax.random.normal(jax.random.key(seed), (len(labels), *shape), jnp.float32))
    out = []
    for i in range(0, len(labels), chunk):
        x = sample(apply_fn, params, jnp.asarray(z[i : i + chunk]), jnp.asarray(labels[i : i + chunk]),
                   jnp.int32(null_label), transport=transport, num_steps=num_steps, mode=mode)
        out.append(np.asarray(x))
    return np.concatenate(out)


class Evaluator:
    """Quality metrics of generated samples for one dataset (see METRIC_DOCS): ``evaluator(x, labels) -> dict``.

    ``info`` holds what was set up: for digits the classifier's held-out accuracy and the real-vs-real FD of two
    disjoint halves of the data (the noise floor); for gmm the SWD between two fresh true samples.
    """

    def __init__(self, data: Dataset, seed: int = EVAL_SEED):
        from tim_jax.evaluation import distances

        self.data, self.seed, self.info = data, seed, {}
        if data.name == "digits":
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(data.x))
            n_test = len(perm) // 5
            test, train = perm[:n_test], perm[n_test:]
            t0 = time.perf_counter()
            self.clf = distances.train_classifier(data.x[train], data.y[train], num_classes=data.num_classes,
                                                  x_heldout=data.x[test], y_heldout=data.y[test], seed=seed)
            self.real_features = self.clf.features(data.x)
            half = len(perm) // 2
            self.info = {
                "classifier_heldout_accuracy": self.clf.heldout_accuracy,
                "classifier_train_rows": int(len(train)),
                "classifier_heldout_rows": int(n_test),
                "classifier_seconds": time.perf_counter() - t0,
                "fd_real_halves": distances.frechet_distance_from_features(
                    self.real_features[perm[:half]], self.real_features[perm[half:]]),
            }
        else:
            self.reference = sample_gmm(8000, seed=20_000 + seed)[0].reshape(-1, 2)
            other = sample_gmm(8000, seed=30_000 + seed)[0].reshape(-1, 2)
            self.info = {"swd_real_vs_real": distances.sliced_wasserstein(other, self.reference, seed=seed)}

    def __call__(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from tim_jax.evaluation import distances

        if self.data.name == "digits":
            x = np.clip(samples, -1.0, 1.0)
            return {"fd": distances.frechet_distance_from_features(self.clf.features(x), self.real_features),
                    "class_acc": self.clf.accuracy(x, labels)}
        return {"swd": distances.sliced_wasserstein(samples.reshape(-1, 2), self.reference, seed=self.seed)}
