"""Interval loss weights: parity with the official ``time_weighting`` and input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parity_path

from tim_jax.time_weighting import (
    BASES,
    WARPS,
    WEIGHT_TYPES,
    time_weighting,
    validate_time_weighting,
    warp_from_flags,
)

SIGMA_D = 1.0  # the fixtures use the OT-FM transport's sigma_d


def test_parity_every_type_warp_base():
    data = np.load(parity_path("time_weights") / "time_weights.npz")
    t, r = jnp.asarray(data["t"]), jnp.asarray(data["r"])
    assert float(t[0]) == float(r[0])  # the first row is a diffusion row
    seen = 0
    for wt in WEIGHT_TYPES:
        for warp in WARPS:
            for base in BASES:
                ref = data[f"{wt}/{warp}/{base}"]
                got = time_weighting(
                    t, r, sigma_d=SIGMA_D, weight_type=wt, warp=warp, base=base, n_diffusion=1
                )
                assert got.shape == ref.shape and got.dtype == jnp.float32
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f"{wt}/{warp}/{base}")
                seen += 1
    # every fixture entry (besides t, r) was checked
    assert seen == len(data.files) - 2 == 30


def test_diffusion_rows_and_traced_count():
    t = jnp.array([0.5, 0.5, 0.9, 0.4])
    r = jnp.array([0.5, 0.5, 0.1, 0.0])
    w = time_weighting(t, r, sigma_d=0.5, weight_type="square", n_diffusion=2)
    np.testing.assert_allclose(w, [1.0, 1.0, 1 / (0.8 + 0.5) ** 2, 1 / (0.4 + 0.5) ** 2], rtol=1e-6)
    # sigma_d enters every type (the fixtures have sigma_d = 1, where sigma_d^2 == sigma_d); t - r = 0.8
    for wt, want in [("reciprocal", 1 / 1.3), ("sqrt", 1 / np.sqrt(1.3)), ("square", 1 / 1.69),
                     ("Soft-Min-SNR", 1 / (0.64 + 0.25)), ("constant", 1.0)]:
        got = time_weighting(t, r, sigma_d=0.5, weight_type=wt)
        np.testing.assert_allclose(got[2], want, rtol=1e-6, err_msg=wt)
    # n_diffusion may be traced (jit) and t, r may be expanded like x
    f = jax.jit(lambda n: time_weighting(t[:, None, None], r[:, None, None], sigma_d=0.5,
                                         weight_type="reciprocal", n_diffusion=n))
    np.testing.assert_allclose(f(0)[2:], [1 / 1.3, 1 / 0.9], rtol=1e-6)
    np.testing.assert_allclose(f(3)[:3], 1.0)


def test_warp_flags_follow_official_priority():
    assert warp_from_flags(False, False) == "plain"
    assert warp_from_flags(True, False) == "tangent"
    assert warp_from_flags(False, True) == "sigmoid"
    assert warp_from_flags(True, True) == "tangent"  # official: tangent checked first


def test_bad_names():
    t = jnp.array([0.5])
    with pytest.raises(ValueError, match=r"weight_type='soft-min-snr'.*Soft-Min-SNR"):
        time_weighting(t, t, sigma_d=1.0, weight_type="soft-min-snr")
    with pytest.raises(ValueError, match=r"warp='log'.*tangent"):
        time_weighting(t, t, sigma_d=1.0, warp="log")
    with pytest.raises(ValueError, match=r"base='r_only'.*t_and_r"):
        validate_time_weighting("constant", "plain", "r_only")
