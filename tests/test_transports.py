"""Transports: parity with the official PyTorch transports (float64), sampling distributions,
internal consistency, dtype behaviour and input validation."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parity_path

from tim_jax.transports import (
    EDM,
    OT_FM,
    TRANSPORTS,
    VE_SDE,
    Transport,
    VP_SDE,
    TrigFlow,
    expand_like,
    make_transport,
)

NAMES = ["OT_FM", "TrigFlow", "EDM", "VP_SDE", "VE_SDE"]
DERIVED = {"VP_SDE": ("T_max", "T_min"), "VE_SDE": ("T_max", "T_min")}
QUANTITIES = ["x_t", "v_t", "c_noise_t", "target", "target_enhanced", "x_r"]


def _fixture():
    path = parity_path("transports")
    data = np.load(path / "transports.npz")
    cfg = json.loads((path / "transports.json").read_text())
    return data, cfg


def _official_kwargs(name, cfg):
    """Constructor values from transports.json minus the ones derived by the constructor."""
    kw = dict(cfg[name])
    for k in DERIVED.get(name, ()):
        kw.pop(k)
    return kw


def _compute_all(tr, tr_enh, g):
    """Every fixture quantity from the fixture inputs ``g(key)``."""
    t, r, x, z = g("t"), g("r"), g("x"), g("z")
    alpha, sigma, d_alpha, d_sigma = tr.interpolant(expand_like(t, x))
    return {
        "x_t": alpha * x + sigma * z,
        "v_t": d_alpha * x + d_sigma * z,
        "c_noise_t": tr.c_noise(t),
        "target": tr.target(g("x_t"), g("v_t"), x, z, t, r, g("dF")),
        "target_enhanced": tr_enh.target(
            g("x_t"), g("v_t"), x, z, t, r, g("dF"), g("F_cond"), g("F_uncond")
        ),
        "x_r": tr.transition(g("x_t"), t, r, g("F")),
    }


@pytest.mark.parametrize("name", NAMES)
def test_parity_float64(name):
    data, cfg = _fixture()
    kw = _official_kwargs(name, cfg)
    with jax.enable_x64(True):
        tr = make_transport(name, **kw)
        tr_enh = make_transport(name, **{**kw, "enhance_target": True})
        # the constructor values round-trip (derived T_max / T_min included)
        assert tr.T_max == pytest.approx(cfg[name]["T_max"])
        assert tr.T_min == pytest.approx(cfg[name]["T_min"])
        out = _compute_all(tr, tr_enh, lambda k: jnp.asarray(data[f"{name}/{k}"]))
        for q in QUANTITIES:
            ref = data[f"{name}/{q}"]
            got = np.asarray(out[q])
            assert got.dtype == np.float64, (name, q, got.dtype)
            assert got.shape == ref.shape, (name, q)
            # relative to the quantity's scale (EDM targets reach ~1e3)
            err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref)))
            assert err < 1e-10, f"{name}/{q}: scaled max error {err:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_parity_float32_nhwc(name):
    """Without x64 everything stays float32, NHWC layouts give the same numbers."""
    data, cfg = _fixture()
    kw = _official_kwargs(name, cfg)
    tr = make_transport(name, **kw)
    tr_enh = make_transport(name, **{**kw, "enhance_target": True})

    def g(k):
        a = data[f"{name}/{k}"].astype(np.float32)
        return jnp.asarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)

    out = _compute_all(tr, tr_enh, g)
    for q in QUANTITIES:
        ref = data[f"{name}/{q}"]
        ref = ref.transpose(0, 2, 3, 1) if ref.ndim == 4 else ref
        got = np.asarray(out[q])
        assert got.dtype == np.float32, (name, q, got.dtype)
        # float32 inputs and float32 arithmetic; EDM's target amplifies rounding of t, r
        scale = max(1.0, np.max(np.abs(ref)))
        tol = 2e-4 if (name, q) in {("EDM", "target"), ("EDM", "target_enhanced")} else 2e-5
        err = np.max(np.abs(got - ref)) / scale
        assert err < tol, f"{name}/{q}: scaled max error {err:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_sample_t_quantiles(name):
    """1%..99% quantiles of 200k draws match the official ones within Monte-Carlo error.

    For the p-quantile of n draws the standard error is sqrt(p (1 - p) / n) * dq/dp; the two
    independent estimates differ by sqrt(2) times that. dq/dp is estimated from the reference
    quantiles by finite differences. We allow 5 standard errors (plus float32 rounding).
    """
    data, cfg = _fixture()
    tr = make_transport(name, **_official_kwargs(name, cfg))
    ref = data[f"{name}/sample_t_quantiles"].astype(np.float64)
    n = 200_000
    draws = np.asarray(tr.sample_t(jax.random.key(1234), (n,)), dtype=np.float64)
    assert draws.shape == (n,)
    assert np.all(draws >= min(tr.T_min, 0.0)) and np.all(np.isfinite(draws))
    p = np.arange(1, 100) / 100.0
    got = np.quantile(draws, p)
    dq_dp = np.gradient(ref, p)
    se = np.sqrt(p * (1 - p) / n) * dq_dp
    tol = 5 * np.sqrt(2) * se + 1e-6 * np.abs(ref)
    bad = np.abs(got - ref) > tol
    assert not bad.any(), (
        f"{name}: quantiles {p[bad]} got {got[bad]} ref {ref[bad]} tol {tol[bad]}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_interpolant_derivatives_match_autodiff(name):
    """d_alpha / d_sigma are the time derivatives of alpha / sigma (checked with jax.grad)."""
    tr = make_transport(name)
    lo, hi = max(tr.T_min, 1e-3), tr.T_max * 0.99
    ts = jnp.linspace(lo + (hi - lo) * 0.01, hi, 17)
    alpha, sigma, d_alpha, d_sigma = tr.interpolant(ts)
    ga = jax.vmap(jax.grad(lambda s: tr.interpolant(s)[0]))(ts)
    gs = jax.vmap(jax.grad(lambda s: tr.interpolant(s)[1]))(ts)
    np.testing.assert_allclose(d_alpha, ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_sigma, gs, rtol=1e-4, atol=1e-6)
    assert alpha.shape == sigma.shape == d_alpha.shape == d_sigma.shape == ts.shape


@pytest.mark.parametrize("name", NAMES)
def test_transition_identity_and_composition_with_exact_field(name):
    """r == t is the identity; with F the *exact* average field of a point mass the transition
    lands on the path (x_r = alpha_r x + sigma_r z), for every transport."""
    tr = make_transport(name)
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, 4, 4, 2))
    z = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    t = jnp.array([0.9, 0.6, 0.3]) * (tr.T_max - tr.T_min) + tr.T_min
    r = jnp.array([0.5, 0.1, 0.3]) * (tr.T_max - tr.T_min) + tr.T_min
    r = jnp.minimum(r, t)
    a_t, s_t, _, _ = tr.interpolant(expand_like(t, x))
    a_r, s_r, _, _ = tr.interpolant(expand_like(r, x))
    x_t = a_t * x + s_t * z
    x_r = a_r * x + s_r * z
    # the F that maps x_t to x_r exactly: solve x_r = A x_t + B F for this transport by probing
    zero_F = tr.transition(x_t, t, r, jnp.zeros_like(x_t))
    unit_F = tr.transition(x_t, t, r, jnp.ones_like(x_t)) - zero_F
    same = tr.transition(x_t, t, t, jax.random.normal(jax.random.key(2), x_t.shape))
    np.testing.assert_allclose(same, x_t, rtol=1e-5, atol=1e-5)
    # transitions are affine in F (the property the sampler relies on)
    F = jax.random.normal(jax.random.key(3), x_t.shape)
    np.testing.assert_allclose(
        tr.transition(x_t, t, r, F), zero_F + unit_F * F, rtol=1e-4, atol=1e-4
    )
    # strict steps (rows 0, 1) can reach the exact x_r with F = (x_r - A x_t) / B
    F_exact = (x_r - zero_F) / jnp.where(unit_F == 0, 1.0, unit_F)
    np.testing.assert_allclose(
        tr.transition(x_t, t, r, F_exact)[:2], x_r[:2], rtol=1e-4, atol=1e-3
    )


def test_enhanced_target_window_and_missing_outputs():
    tr = OT_FM(enhance_target=True, w_gt=0.5, w_cond=0.2, w_start=0.2, w_end=0.6)
    shape = (3, 2, 2, 1)
    v = jnp.full(shape, 1.0)
    Fc = jnp.full(shape, 10.0)
    Fu = jnp.full(shape, 100.0)
    zeros = jnp.zeros(shape)
    t = jnp.array([0.1, 0.2, 0.6])  # outside, on the inclusive lower edge, on the upper edge
    out = tr.target(zeros, v, zeros, zeros, t, t, zeros, Fc, Fu)
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1:], 0.5 + 2.0 + 30.0, rtol=1e-6)
    # F_cond missing counts as 0 (official when w_cond == 0)
    out = tr.target(zeros, v, zeros, zeros, t, t, zeros, None, Fu)
    np.testing.assert_allclose(out[1:], 0.5 + 30.0, rtol=1e-6)
    # no network outputs, or enhancement off: the plain target
    np.testing.assert_allclose(tr.target(zeros, v, zeros, zeros, t, t, zeros), 1.0)
    plain = dataclasses.replace(tr, enhance_target=False)
    np.testing.assert_allclose(plain.target(zeros, v, zeros, zeros, t, t, zeros, Fc, Fu), 1.0)


def test_ot_fm_stochastic_transition():
    tr = OT_FM()
    x_t = jnp.ones((2, 3))
    F = jnp.full((2, 3), 0.5)
    noise = jnp.full((2, 3), 2.0)
    t, r, s = 0.8, 0.6, 0.3
    got = tr.transition(x_t, t, r, F, s_ratio=s, noise=noise)
    dt = t - r
    z_hat = 1.0 + (1 - t) * 0.5
    want = 1.0 - dt * 0.5 - s * z_hat * dt + np.sqrt(2 * s * t * dt) * 2.0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a traced zero ratio is exactly the deterministic step
    got0 = jax.jit(lambda s: tr.transition(x_t, t, r, F, s_ratio=s, noise=noise))(0.0)
    np.testing.assert_array_equal(got0, tr.transition(x_t, t, r, F))
    with pytest.raises(ValueError, match="noise"):
        tr.transition(x_t, t, r, F, s_ratio=0.2)


def test_hashable_static_and_jit():
    tr = make_transport("EDM", P_mean=-1.0)
    assert hash(tr) == hash(make_transport("EDM", P_mean=-1.0))
    assert tr == EDM(P_mean=-1.0) and tr != EDM()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tr.P_mean = 0.0  # type: ignore[misc]

    @jax.jit
    def f(x, t):
        return tr.c_noise(t), tr.transition(x, t, t * 0.5, x)

    c, y = f(jnp.ones((2, 4, 4, 3)), jnp.array([1.0, 2.0]))
    assert c.shape == (2,) and y.shape == (2, 4, 4, 3)
    g = jax.jit(lambda x, t, transport: transport.c_noise(t), static_argnames="transport")
    np.testing.assert_allclose(g(0, jnp.array([2.0]), transport=tr), np.log(2.0) / 4, rtol=1e-6)
    # scalar t broadcasts over any rank
    assert tr.transition(jnp.ones((2, 5)), 3.0, 1.0, jnp.ones((2, 5))).shape == (2, 5)


GUIDANCE = ("enhance_target", "w_gt", "w_cond", "w_start", "w_end")


@pytest.mark.parametrize("name", NAMES)
def test_guidance_fields_are_the_shared_ones(name):
    """Every transport takes the five guidance fields of the common base, with the same defaults (enhancement off,
    the plain velocity), as constructor overrides; they are part of equality and the hash (static jit argument)."""
    fields = [f.name for f in dataclasses.fields(TRANSPORTS[name])]
    assert fields[: len(GUIDANCE)] == list(GUIDANCE)
    assert [getattr(make_transport(name), f) for f in GUIDANCE] == [False, 1.0, 0.0, 0.0, 1.0]
    guided = make_transport(name, enhance_target=True, w_gt=0.5, w_cond=0.25, w_start=0.1, w_end=0.2)
    assert [getattr(guided, f) for f in GUIDANCE] == [True, 0.5, 0.25, 0.1, 0.2]
    assert guided != make_transport(name) and guided == dataclasses.replace(make_transport(name), **{
        f: getattr(guided, f) for f in GUIDANCE})
    assert hash(guided) == hash(make_transport(name, enhance_target=True, w_gt=0.5, w_cond=0.25, w_start=0.1,
                                               w_end=0.2))
    with pytest.raises(TypeError, match="common base"):
        Transport()


def test_defaults_match_official():
    assert (OT_FM().P_mean, OT_FM().P_std, OT_FM().T_max, OT_FM().T_min) == (0.0, 1.0, 1.0, 0.0)
    assert (TrigFlow().P_mean, TrigFlow().P_std, TrigFlow().sigma_d, TrigFlow().T_max) == (
        -1.0, 1.6, 0.5, 1.57)
    assert (EDM().P_mean, EDM().P_std, EDM().T_max, EDM().T_min) == (-1.2, 1.2, 80.0, 0.01)
    assert (VP_SDE().T_max, VP_SDE().T_min, VP_SDE().T) == (1.0, 1e-5, 1000)
    assert (VE_SDE().T_max, VE_SDE().T_min) == (100.0, 0.02)
    assert sorted(TRANSPORTS) == sorted(NAMES)
    assert make_transport("ot_fm") == OT_FM()  # case-insensitive lookup


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown transport 'Rectified'.*OT_FM"):
        make_transport("Rectified")
    with pytest.raises(ValueError, match=r"unknown VP_SDE field\(s\) \['T_max'\].*beta_min"):
        make_transport("VP_SDE", T_max=2.0)
    with pytest.raises(ValueError, match="P_std"):
        make_transport("OT_FM", P_std=0.0)
    with pytest.raises(ValueError, match="T_max must be > T_min"):
        make_transport("TrigFlow", T_min=2.0)
    with pytest.raises(ValueError, match="w_start"):
        make_transport("EDM", w_start=5.0, w_end=1.0)
    with pytest.raises(ValueError, match="only implemented for the OT_FM"):
        make_transport("EDM").transition(jnp.ones(2), 1.0, 0.5, jnp.ones(2), s_ratio=0.1)
    with pytest.raises(ValueError, match="time must be"):
        expand_like(jnp.ones((2, 3)), jnp.ones((2, 3, 4)))
