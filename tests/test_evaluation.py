"""Tests of tim_jax.evaluation: Fréchet distance, sliced Wasserstein distance, the small fixed classifier."""
import numpy as np
import pytest
import scipy.linalg

from tim_jax.evaluation import distances as evaluation


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _fd_scipy(mu1, s1, mu2, s2):
    """The classic FID formula with scipy's sqrtm (reference)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 2, 16, 64])
def test_frechet_matches_scipy_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    ours = evaluation.frechet_distance(mu1, s1, mu2, s2)
    ref = _fd_scipy(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-9)


def test_frechet_closed_form_diagonal_and_identity():
    # For commuting (here diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a = np.array([1.0, 4.0, 0.25, 9.0])
    b = np.array([4.0, 1.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2 + 0.0
    assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # identical Gaussians: 0 (also with a singular covariance)
    s = np.diag([1.0, 0.0, 2.0])
    assert evaluation.frechet_distance(np.ones(3), s, np.ones(3), s) == pytest.approx(0.0, abs=1e-12)
    # same covariance, shifted mean: |shift|^2
    rng = np.random.default_rng(0)
    s = _random_spd(rng, 5)
    shift = rng.standard_normal(5)
    assert evaluation.frechet_distance(np.zeros(5), s, shift, s) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_from_features_estimates_closed_form():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 0.5, 0.5, 1.0])
    mu2 = np.array([0.5, 0.0, -0.5, 0.0])
    fa = rng.standard_normal((n, d)) * np.sqrt(a)
    fb = rng.standard_normal((n, d)) * np.sqrt(b) + mu2
    expected = mu2 @ mu2 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Monte-Carlo tolerance: the bias of the plug-in estimate is O(d / n); 2 % is many standard errors here.
    assert evaluation.frechet_distance_from_features(fa, fb) == pytest.approx(expected, rel=0.02)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        evaluation.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        evaluation.feature_statistics(np.zeros((1, 3)))


def test_sliced_wasserstein_zero_for_identical_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 2))
    assert evaluation.sliced_wasserstein(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    # A rigid shift s moves every projection by <s, theta>: SW_2^2 = E[<s, theta>^2] = |s|^2 / D exactly for
    # identical point sets (up to the finite set of projection directions).
    values = [evaluation.sliced_wasserstein(x, x + np.array([s, 0.0]), num_projections=2048) for s in (0.1, 0.5, 2.0)]
    assert values[0] < values[1] < values[2]
    for s, v in zip((0.1, 0.5, 2.0), values):
        assert v == pytest.approx(s / np.sqrt(2.0), rel=0.05)


def test_sliced_wasserstein_unequal_sizes_and_validation():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3000, 3)), rng.standard_normal((1000, 3))
    same = evaluation.sliced_wasserstein(x, y)
    shifted = evaluation.sliced_wasserstein(x, y + 1.0)
    assert same < 0.1 < shifted   # sampling noise vs a shift of |(1,1,1)| / sqrt(3) = 1
    assert shifted == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        evaluation.sliced_wasserstein(x, y[:, :2])
    with pytest.raises(ValueError, match="num_projections"):
        evaluation.sliced_wasserstein(x, y, num_projections=0)


def test_classifier_trains_to_high_heldout_accuracy_on_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    y = d.target
    perm = np.random.default_rng(0).permutation(len(x))
    test, train = perm[:360], perm[360:]
    clf = evaluation.train_classifier(x[train], y[train], num_classes=10, x_heldout=x[test], y_heldout=y[test],
                                      steps=800, seed=0)
    assert clf.heldout_accuracy > 0.95
    feats = clf.features(x[:50])
    assert feats.shape == (50, 64) and feats.dtype == np.float32
    # fixed: the same seed gives the same classifier
    clf2 = evaluation.train_classifier(x[train], y[train], num_classes=10, steps=800, seed=0)
    np.testing.assert_allclose(clf2.features(x[:50]), feats, rtol=1e-5, atol=1e-5)
    # real vs real (two halves) is much closer than real vs class-mean images (what 1-step flow matching makes)
    f_all = clf.features(x)
    means = np.stack([x[y == c].mean(0) for c in range(10)])[y]
    fd_halves = evaluation.frechet_distance_from_features(f_all[perm[:900]], f_all[perm[900:]])
    fd_means = evaluation.frechet_distance_from_features(clf.features(means), f_all)
    assert fd_means > 5 * fd_halves
    with pytest.raises(ValueError, match="inputs of shape"):
        clf.features(x[:5, :4])
    with pytest.raises(ValueError, match="labels must lie"):
        evaluation.train_classifier(x[:10], y[:10] + 10, num_classes=10)
