"""FID Inception v3 parity with pytorch-fid, and the FID / IS statistics.

Fixture: tests/fixtures/parity/fid_inception/io.npz (see MAKE.md there), pytorch-fid 0.3.0 on torch 2.13 CPU fp32
with seeded random weights. The weights are not stored: the recipe in _make/make_fid_inception.py recreates them,
this test writes them to a safetensors file and loads it with the runtime loader.
"""
import ast
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.evaluation import fid as fidlib
from tim_jax.evaluation import inception as inc
from tim_jax.evaluation.distances import frechet_distance

PARITY = Path(__file__).parent / "fixtures" / "parity"
FIXTURE = PARITY / "fid_inception" / "io.npz"
RECIPE = PARITY / "_make" / "make_fid_inception.py"
TOL_FP32 = 1e-5  # max |diff| <= TOL * max |ref|, the project's fp32 bar
TOL_BF16 = 3e-2  # bf16 convolutions (8-bit mantissa) through ~50 layers


def _load_recipe():
    spec = importlib.util.spec_from_file_location("make_fid_inception", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def io():
    assert FIXTURE.is_file(), f"missing parity fixture {FIXTURE}"
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def torch_shapes(io):
    return {str(k): ast.literal_eval(str(s)) for k, s in zip(io["state_dict_keys"], io["state_dict_shapes"])}


@pytest.fixture(scope="module")
def weights_file(torch_shapes, tmp_path_factory):
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("fid_inception") / "pt_inception_random.safetensors"
    save_file(_load_recipe().make_weights(torch_shapes), str(path))
    return path


@pytest.fixture(scope="module")
def outputs_fp32(io, weights_file):
    model = inc.from_safetensors(weights_file)
    pool, logits = inc.extract(model, io["images"].transpose(0, 2, 3, 1))
    return model, np.asarray(pool), np.asarray(logits)


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------------------------------------
# Inception
# ------------------------------------------------------------------------------------------------------------------


def test_state_dict_names_and_shapes_match_pytorch_fid(torch_shapes):
    assert inc.torch_state_dict_shapes() == torch_shapes


def test_pool_and_logits_match_pytorch_fid(io, outputs_fp32):
    _, pool, logits = outputs_fp32
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.dtype == np.float32 and logits.dtype == np.float32
    assert _rel_err(pool, io["pool"]) <= TOL_FP32
    assert _rel_err(logits, io["logits"]) <= TOL_FP32


def test_bias_free_logits(io, outputs_fp32, torch_shapes):
    model, pool, _ = outputs_fp32
    fc_bias = _load_recipe().make_weights({"fc.bias": torch_shapes["fc.bias"]})["fc.bias"]
    model.logits_bias = False
    try:
        unbiased = np.asarray(model.logits(jnp.asarray(pool)))
    finally:
        model.logits_bias = True
    assert _rel_err(unbiased, io["logits"] - fc_bias) <= TOL_FP32


def test_bfloat16_block(outputs_fp32):
    """Fast variant: the last block (InceptionE, max-pool branch) with the loaded weights in bf16 compute."""
    model = outputs_fp32[0]
    block = nnx.eval_shape(lambda: inc.InceptionE(2048, "max", dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    nnx.update(block, nnx.state(model.Mixed_7c))
    x = jnp.asarray(np.random.default_rng(0).uniform(0.0, 2.0, (1, 8, 8, 2048)), jnp.float32)
    ours, ref = nnx.jit(lambda b, r, v: (b(v.astype(jnp.bfloat16)), r(v)))(block, model.Mixed_7c, x)
    assert ours.dtype == jnp.bfloat16 and block.branch1x1.conv.kernel.get_value().dtype == jnp.float32
    assert _rel_err(np.asarray(ours.astype(jnp.float32)), np.asarray(ref)) <= TOL_BF16


@pytest.mark.slow
def test_bfloat16_option(io, weights_file):
    """The whole network in bf16 against pytorch-fid (fp32)."""
    model = inc.from_safetensors(weights_file, dtype=jnp.bfloat16)
    pool, logits = inc.extract(model, io["images"].transpose(0, 2, 3, 1))
    assert pool.dtype == jnp.float32 and logits.dtype == jnp.float32
    assert _rel_err(pool, io["pool"]) <= TOL_BF16
    assert _rel_err(logits, io["logits"]) <= TOL_BF16


@pytest.mark.parametrize("case", ["fid_299", "up_mixed", "down", "to_one"])
def test_resize_matches_torch_bilinear(io, case):
    x, y = io[f"resize/{case}/x"], io[f"resize/{case}/y"]
    ours = np.asarray(inc.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), y.shape[2:]))
    # weights are bit-exact with torch's; only the summation order differs (a few float32 ulps)
    assert np.abs(ours.transpose(0, 3, 1, 2) - y).max() <= 1e-6 * np.abs(y).max()


def test_loader_errors(tmp_path, torch_shapes):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inc.from_safetensors(tmp_path / "absent.safetensors")
    zeros = {k: np.zeros(s, np.float32) for k, s in torch_shapes.items()}
    del zeros["Mixed_6b.branch7x7_2.bn.running_var"]
    with pytest.raises(KeyError, match="1 missing"):
        inc.from_state_dict(zeros)
    zeros["Mixed_6b.branch7x7_2.bn.running_var"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match="running_var"):
        inc.from_state_dict(zeros)
    abstract = nnx.eval_shape(lambda: inc.FIDInceptionV3(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        abstract.features(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="dtype"):
        nnx.eval_shape(lambda: inc.FIDInceptionV3(dtype=jnp.float16, rngs=nnx.Rngs(0)))


def test_convert_needs_torch_or_converts(tmp_path):
    fake = tmp_path / "weights.pth"
    fake.write_bytes(b"not a checkpoint")
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ImportError, match="torch"):
            inc.convert_pytorch_fid_weights(fake, tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="download"):
        inc.convert_pytorch_fid_weights(tmp_path / "absent.pth", tmp_path / "out.safetensors")


# ------------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------------


def _features(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.5 + rng.standard_normal(d)


def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = fidlib.GaussianMoments.of(_features()).gaussian()
    assert abs(fidlib.fid(mu, sigma, mu, sigma)) <= 1e-9 * np.trace(sigma)


def test_fid_of_a_shifted_copy_is_the_squared_shift():
    f = _features()
    shift = np.random.default_rng(1).standard_normal(f.shape[1])
    a, b = fidlib.GaussianMoments.of(f), fidlib.GaussianMoments.of(f + shift)
    assert fidlib.fid_from_moments(a, b) == pytest.approx(shift @ shift, rel=1e-7)


def test_fid_closed_form_for_diagonal_covariances_and_eigh_route():
    rng = np.random.default_rng(2)
    va, vb = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    ma, mb = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert fidlib.fid(ma, np.diag(va), mb, np.diag(vb)) == pytest.approx(expected, rel=1e-10)
    # a full-covariance case: the reference sqrtm route and the symmetric eigh route agree
    sa, sb = np.cov(_features(seed=3), rowvar=False), np.cov(_features(seed=4), rowvar=False)
    mc = rng.standard_normal(24)
    assert fidlib.fid(mc, sa, np.zeros(24), sb) == pytest.approx(frechet_distance(mc, sa, np.zeros(24), sb), rel=1e-8)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(ma, np.diag(va), mb, np.diag(vb), method="svd")


def test_streaming_moments_equal_one_shot():
    f = _features(n=1000, d=20) + 1e4  # a large mean: the centred update keeps the covariance exact
    m = fidlib.GaussianMoments.empty(20)
    for lo, hi in [(0, 1), (1, 1), (1, 37), (37, 500), (500, 1000)]:
        m = m.update(f[lo:hi])
    assert m.count == 1000
    np.testing.assert_allclose(m.mean, f.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(m.covariance(), np.cov(f, rowvar=False), rtol=1e-8, atol=1e-10)
    merged = fidlib.GaussianMoments.of(f[600:]).merge(fidlib.GaussianMoments.of(f[:600]))
    np.testing.assert_allclose(merged.covariance(), m.covariance(), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="dimension"):
        m.update(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="at least 2"):
        fidlib.GaussianMoments.of(f[:1]).covariance()


def test_inception_score():
    assert fidlib.inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
    # split 1: 10 confident, distinct classes -> IS 10; split 2: 10 confident, same class -> IS 1
    confident = np.full((20, 1008), -1e3)
    confident[np.arange(10), np.arange(10)] = 0.0
    confident[10:, 5] = 0.0
    assert fidlib.inception_score(confident, split_size=10) == pytest.approx(5.5, rel=1e-9)
    assert fidlib.inception_score(confident[:10], split_size=5000) == pytest.approx(10.0, rel=1e-9)
    with pytest.raises(ValueError, match="logits"):
        fidlib.inception_score(np.zeros(10))


def test_reference_statistics_npz_layouts(tmp_path):
    f = _features(n=200, d=12).astype(np.float32)
    mu, sigma = f.astype(np.float64).mean(axis=0), np.cov(f.astype(np.float64), rowvar=False)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    # ADM reference batch layout: images in arr_0 plus the statistics
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    got_mu, got_sigma = fidlib.load_reference_statistics(tmp_path / "adm.npz")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    # raw activations
    np.savez(tmp_path / "acts.npz", arr_0=f)
    got_mu, got_sigma = fidlib.load_reference_statistics(tmp_path / "acts.npz")
    np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-12)
    # saved statistics round-trip
    out = fidlib.save_statistics(tmp_path / "stats.npz", mu, sigma)
    np.testing.assert_array_equal(fidlib.load_reference_statistics(out)[1], sigma)
    # errors
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    with pytest.raises(ValueError, match="images"):
        fidlib.load_reference_statistics(tmp_path / "images_only.npz")
    np.savez(tmp_path / "other.npz", features=f)
    with pytest.raises(ValueError, match="found"):
        fidlib.load_reference_statistics(tmp_path / "other.npz")
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="sigma"):
        fidlib.load_reference_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        fidlib.load_reference_statistics(tmp_path / "absent.npz")


def test_accumulate_matches_extract(io, outputs_fp32):
    model, pool, logits = outputs_fp32
    images = io["images"].transpose(0, 2, 3, 1)
    moments, got_logits = fidlib.accumulate(model, [images])  # the fixture's shape: no recompilation
    assert moments.count == 2
    np.testing.assert_allclose(moments.mean, pool.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moments.covariance(), np.cov(pool.astype(np.float64), rowvar=False),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_logits, logits)
    again, none = fidlib.accumulate(model, [], moments)
    assert again is moments and none.shape == (0, 1008)
