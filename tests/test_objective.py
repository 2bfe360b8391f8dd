"""Tests of tim_jax.objective, driven by analytic fields (no real network).

The central check uses Gaussian data x ~ N(mu, diag(s^2)) under OT-FM, whose exact average
velocity u(x_t, t, r) over [r, t] is closed form: the probability-flow map is affine per
dimension, x_r = m_r + (std_r / std_t) (x_t - m_t) with m_t = (1 - t) mu and
std_t = sqrt((1 - t)^2 s^2 + t^2), so u = (x_t - x_r) / (t - r) (the marginal velocity at r = t).
The objective's target uses the *conditional* velocity z - x, so per row it is not u; what holds is
E[target | x_t] = u. Given x_t the target is affine in the pair (x, z) (the field is affine in x_t
and both the JVP and the DDE points are linear in (x, z)), so that expectation equals the target
evaluated at the posterior-mean pair (x_bar, z_bar), which shares x_t; a Monte-Carlo average over
posterior pairs checks the same claim without the affinity argument.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax import objective as obj
from tim_jax.transports import make_transport

H, W, C = 2, 2, 3
NUM_CLASSES = 5

# jitted entry points (op-by-op eager dispatch would dominate the test time)
target_fn = jax.jit(obj.transition_target, static_argnums=0,
                    static_argnames=("config", "n_diffusion"))
deriv_fn = jax.jit(obj.total_derivative, static_argnums=0, static_argnames=("transport", "method"))
core_fn = jax.jit(obj.transition_loss, static_argnums=0, static_argnames=("config", "n_diffusion"))
sample_fn = jax.jit(obj.sample_t_and_r, static_argnums=(1, 2))


# ---------------------------------------------------------------------------------------------
# analytic Gaussian OT-FM field
def _gauss_stats(t, mu, s):
    t = t.reshape(-1, 1, 1, 1)
    # the floor keeps d std / dr finite at s = 0, r = 0 (a point mass at the data end)
    return (1 - t) * mu, jnp.sqrt(jnp.maximum((1 - t) ** 2 * s**2 + t**2, 1e-30))


def gauss_u(x_t, t, r, mu, s):
    """Exact average velocity over [r, t] of the PF-ODE of Gaussian data (instantaneous at r=t)."""
    m_t, std_t = _gauss_stats(t, mu, s)
    m_r, std_r = _gauss_stats(r, mu, s)
    tt, rr = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    dt = tt - rr
    x_r = m_r + std_r / std_t * (x_t - m_t)
    avg = (x_t - x_r) / jnp.where(dt > 0, dt, 1.0)
    inst = -mu + (tt - (1 - tt) * s**2) / std_t**2 * (x_t - m_t)
    return jnp.where(dt > 0, avg, inst)


def gauss_dudt(x_t, v, t, r, mu, s):
    """Hand-derived total derivative of u along dx_t/dt = v with r fixed (r < t)."""
    m_t, std_t = _gauss_stats(t, mu, s)
    m_r, std_r = _gauss_stats(r, mu, s)
    tt, rr = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    k = std_r / std_t
    x_r = m_r + k * (x_t - m_t)
    dk_dt = -k * (tt - (1 - tt) * s**2) / std_t**2
    dxr_dt = dk_dt * (x_t - m_t) + k * mu            # partial d x_r / dt at fixed x_t
    du_dx = (1 - k) / (tt - rr)
    du_dt = -dxr_dt / (tt - rr) - (x_t - x_r) / (tt - rr) ** 2
    return du_dx * v + du_dt


def gauss_apply(mu, s, calls=None):
    def apply_fn(params, x_t, t, r, cond, *, return_proj=False):
        if calls is not None:
            calls.append(x_t.shape[0])
        return params["scale"] * gauss_u(x_t, t, r, mu, s)
    return apply_fn


def posterior_mean_pair(x_t, t, mu, s):
    """E[x | x_t] and the noise that pairs with it: (x_bar, z_bar) with x_t = (1-t) x + t z."""
    m_t, std_t = _gauss_stats(t, mu, s)
    tt = t.reshape(-1, 1, 1, 1)
    x_bar = mu + (1 - tt) * s**2 / std_t**2 * (x_t - m_t)
    return x_bar, (x_t - (1 - tt) * x_bar) / tt


def _gauss_setup(seed, batch=8):
    """float64 (mu, s, t, r, x_t); rows: 2 with r = t, 1 with r = 0, the rest 0 < r < t."""
    g = np.random.default_rng(seed)
    mu, s = g.normal(size=(H, W, C)), g.uniform(0.3, 1.5, (H, W, C))
    t = g.uniform(0.2, 0.95, batch)
    r = t * g.uniform(0.05, 0.9, batch)
    r[:2], r[-1] = t[:2], 0.0
    return tuple(jnp.asarray(a) for a in (mu, s, t, r, g.normal(size=(batch, H, W, C))))


def _cfg(**kw):
    kw.setdefault("transport", "OT_FM")
    return obj.ObjectiveConfig(**kw)


@pytest.mark.parametrize("derivative", ["jvp", "dde"])
def test_target_is_average_velocity_in_expectation(derivative):
    with jax.enable_x64(True):
        mu, s, t, r, x_t = _gauss_setup(0)
        x_bar, z_bar = jax.jit(posterior_mean_pair)(x_t, t, mu, s)
        u = jax.jit(gauss_u)(x_t, t, r, mu, s)
        params = {"scale": jnp.float64(1.0)}

        def err(delta):
            cfg = _cfg(derivative=derivative, dde_delta=delta)
            tgt = target_fn(gauss_apply(mu, s), params, x_bar, z_bar, t, r, None, config=cfg,
                            n_diffusion=2)
            return float(jnp.max(jnp.abs(tgt - u)))

        if derivative == "jvp":
            assert err(0.005) < 1e-12
        else:  # central difference: O(delta^2) error, ratio ~4 when delta halves
            e1, e2 = err(0.02), err(0.01)
            assert 1e-9 < e1 < 1e-2 and 3.6 < e1 / e2 < 4.4, (e1, e2)
            assert err(0.005) < 5e-4   # official delta


def test_target_average_velocity_monte_carlo():
    """Average of the per-row JVP target over posterior pairs sharing x_t -> u (within 5 s.e.)."""
    n = 8000
    with jax.enable_x64(True):
        mu, s, t, r, x_t = _gauss_setup(1, batch=4)

        @jax.jit
        def mean_and_se(key):
            rep = lambda a: jnp.repeat(a, n, axis=0)
            tt, rr, xt = rep(t), rep(r), rep(x_t)
            m_t, std_t = _gauss_stats(tt, mu, s)
            t4 = tt.reshape(-1, 1, 1, 1)   # x | x_t is Gaussian; z is then fixed by x_t
            post_mean = mu + (1 - t4) * s**2 / std_t**2 * (xt - m_t)
            x = post_mean + s * t4 / std_t * jax.random.normal(key, xt.shape, jnp.float64)
            z = (xt - (1 - t4) * x) / t4
            tgt = obj.transition_target(gauss_apply(mu, s), {"scale": 1.0}, x, z, tt, rr, None,
                                        config=_cfg(derivative="jvp"), n_diffusion=0)
            tgt = tgt.reshape(4, n, H, W, C)
            return tgt.mean(1), tgt.std(1) / np.sqrt(n), gauss_u(x_t, t, r, mu, s)

        mean, se, u = mean_and_se(jax.random.key(2))
        assert float(jnp.max(jnp.abs(mean - u) / se)) < 5.0
        assert float(jnp.max(se)) < 0.05   # the check has teeth


@pytest.mark.parametrize("derivative", ["jvp", "dde"])
def test_total_derivative_matches_hand_derivative(derivative):
    """Per row: dF/dt = du/dx_t . (z - x) + du/dt, the total derivative along the conditional path."""
    with jax.enable_x64(True):
        mu, s, t, r, x_t = _gauss_setup(3)
        t, r, x_t = t[2:-1], r[2:-1], x_t[2:-1]          # generic r < t rows
        x = jnp.asarray(np.random.default_rng(4).normal(size=x_t.shape))
        z = (x_t - (1 - t.reshape(-1, 1, 1, 1)) * x) / t.reshape(-1, 1, 1, 1)
        got = deriv_fn(gauss_apply(mu, s), {"scale": 1.0}, x, z, t, r, None,
                       transport=make_transport("OT_FM"), method=derivative, delta=1e-4)
        want = jax.jit(gauss_dudt)(x_t, z - x, t, r, mu, s)
        tol = 1e-11 if derivative == "jvp" else 1e-6
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("derivative", ["jvp", "dde"])
def test_loss_minimum_at_exact_field(derivative):
    """tim_loss end to end, point-mass data (s = 0: the conditional velocity IS the marginal one,
    so u is the per-row minimiser): the loss ~ 0 and d loss / d scale ~ 0 at scale 1, not at 1.2.
    The guidance-enhanced target with the same exact field as EMA is the same minimum."""
    with jax.enable_x64(True):
        mu = jnp.asarray(np.random.default_rng(5).normal(size=(H, W, C)))
        s = jnp.zeros((H, W, C), jnp.float64)
        transport = make_transport("OT_FM", P_mean=-0.4, enhance_target=True, w_cond=0.75,
                                   w_start=0.3, w_end=0.8)
        cfg = _cfg(transport=transport, derivative=derivative)
        batch = {"x": jnp.broadcast_to(mu, (16, H, W, C)), "cond": jnp.zeros((16,), jnp.int32)}
        fn = lambda p: obj.tim_loss(gauss_apply(mu, s), p, batch, jax.random.key(6), config=cfg,
                                    null_cond=jnp.int32(NUM_CLASSES), ema_params={"scale": 1.0})
        grad_fn = jax.jit(jax.value_and_grad(fn, has_aux=True))
        (loss, m), g = grad_fn({"scale": jnp.float64(1.0)})
        assert float(loss) < 1e-9 and float(m["mse"]) < 1e-20 and float(m["nonfinite_frac"]) == 0
        assert abs(float(g["scale"])) < 1e-6
        (_, m_off), g_off = grad_fn({"scale": jnp.float64(1.2)})
        assert float(g_off["scale"]) > 0.1 and float(m_off["mse"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# a smooth nonlinear field: per-pixel tanh MLP of (x, t, r) with spatial coupling, class
# embedding and a token "projector"
def mlp_params(seed, hidden=8):
    g = np.random.default_rng(seed)
    n = lambda shape, sc: jnp.asarray(sc * g.normal(size=shape), jnp.float32)
    return {"w1": n((C, hidden), 0.7), "wm": n((C, hidden), 0.5), "a": n((hidden,), 1.0),
            "b": n((hidden,), 1.0), "w2": n((hidden, C), 0.7),
            "emb": n((NUM_CLASSES + 1, C), 1.0), "p": n((hidden, 4), 1.0)}


def mlp_apply(calls=None):
    def apply_fn(params, x_t, t, r, cond, *, return_proj=False):
        if calls is not None:  # record at trace time; the cond values arrive when it runs
            entry = {"rows": x_t.shape[0], "proj": return_proj, "cond": None}
            calls.append(entry)
            jax.debug.callback(lambda c: entry.__setitem__("cond", np.asarray(c)), cond)
        pre = (x_t @ params["w1"] + jnp.mean(x_t, axis=(1, 2), keepdims=True) @ params["wm"]
               + t[:, None, None, None] * params["a"] + r[:, None, None, None] * params["b"])
        h = jnp.tanh(pre)
        F = h @ params["w2"] + params["emb"][cond][:, None, None, :]
        if return_proj:
            return F, (h @ params["p"]).reshape(x_t.shape[0], H * W, 4)
        return F
    return apply_fn


_MLP = mlp_apply()


def _data(seed, batch):
    """float32 (x, z) (B, H, W, C) and int32 labels (B,)."""
    g = np.random.default_rng(seed)
    return (jnp.asarray(g.normal(size=(batch, H, W, C)), jnp.float32),
            jnp.asarray(g.normal(size=(batch, H, W, C)), jnp.float32),
            jnp.asarray(g.integers(0, NUM_CLASSES, batch), jnp.int32))


def _times(seed, batch, config=None):
    """(t, r) from the objective's own sampler (jitted)."""
    return sample_fn(jax.random.key(seed), batch, config or _cfg())


@pytest.mark.parametrize("name", ["OT_FM", "TrigFlow", "EDM"])
def test_dde_agrees_with_jvp(name):
    """On a nonlinear field, also through a non-identity c_noise (EDM): DDE = JVP + O(delta^2)."""
    transport = make_transport(name)
    t = jnp.asarray(transport.T_min + np.random.default_rng(7).uniform(0.1, 1.0, 6) * min(
        transport.T_max - transport.T_min, 2.0), jnp.float32)
    r = t * jnp.linspace(0.1, 0.9, 6)
    x, z, y = _data(8, 6)
    params = mlp_params(9)

    def deriv(method, delta=0.005, f64=False):
        args = (params, x, z, t, r)
        if f64:
            args = jax.tree.map(lambda a: a.astype(jnp.float64), args)
        return deriv_fn(_MLP, *args, y, transport=transport, method=method, delta=delta)

    jvp, dde = deriv("jvp"), deriv("dde")
    scale = float(jnp.max(jnp.abs(jvp)))
    assert scale > 0.1
    np.testing.assert_allclose(dde, jvp, atol=2e-3 * scale, rtol=0)
    with jax.enable_x64(True):  # f64: the gap shrinks as delta^2
        ref = deriv("jvp", f64=True)
        e1, e2 = (float(jnp.max(jnp.abs(deriv("dde", dl, True) - ref))) for dl in (0.02, 0.01))
        assert 3.5 < e1 / e2 < 4.5, (e1, e2)


def test_row_layout_and_sampling():
    cfg = _cfg()
    assert obj.row_counts(10, cfg) == (5, 1)
    assert obj.row_counts(3, _cfg(diffusion_ratio=0.5, consistency_ratio=0.5)) == (2, 1)
    t, r = _times(10, 10, cfg)
    t, r = np.asarray(t), np.asarray(r)
    np.testing.assert_array_equal(r[:5], t[:5])
    assert r[-1] == 0.0 and np.all(r[5:9] < t[5:9]) and np.all(r[5:9] > 0)
    assert np.all((t > 0) & (t < 1))
    # t = max of two draws: its median exceeds the single-draw median of sigmoid(N(0, 1)) = 0.5
    t_big, _ = _times(11, 4000, cfg)
    assert 0.61 < float(jnp.median(t_big)) < 0.66   # P(t < m) = P(draw < m)^2 = 0.5 at 0.633


def test_diffusion_rows_are_flow_matching_and_skip_the_derivative():
    calls = []
    x, z, y = _data(12, 10)
    cfg = _cfg(derivative="dde")
    t, r = _times(13, 10, cfg)
    params = mlp_params(14)
    tgt = target_fn(mlp_apply(calls), params, x, z, t, r, y, config=cfg, n_diffusion=5)
    np.testing.assert_array_equal(tgt[:5], (z - x)[:5])
    assert not np.allclose(tgt[5:], (z - x)[5:])
    assert [c["rows"] for c in calls] == [2 * 5] and not calls[0]["proj"]  # ONE call, both points
    calls.clear()
    jax.eval_shape(functools.partial(obj.transition_target, mlp_apply(calls), config=cfg,
                                     n_diffusion=10), params, x, z, t, t, y)
    assert calls == []                                  # all rows r = t: no evaluation


def _apply_calls(cfg, batch, ema=True, null=jnp.int32(NUM_CLASSES), run=jax.eval_shape):
    """The apply_fn calls of one tim_loss, traced (eval_shape) or run (jax.jit)."""
    calls = []
    params = mlp_params(15)
    fn = functools.partial(obj.tim_loss, mlp_apply(calls), config=cfg,
                           ema_params=params if ema else None)
    jax.block_until_ready(run(fn)(params, batch, jax.random.key(16), null_cond=null)
                          if run is jax.jit else run(fn, params, batch, jax.random.key(16),
                                                     null_cond=null))
    return calls


def test_apply_calls_per_configuration():
    x, _, y = _data(17, 10)
    repa = jnp.ones((10, H * W, 4))
    batch = {"x": x, "cond": y, "repa_target": repa}
    calls = _apply_calls(_cfg(derivative="dde"), batch)
    assert [(c["rows"], c["proj"]) for c in calls] == [(10, False), (10, True)]
    calls = _apply_calls(_cfg(derivative="jvp", repa_coeff=0.0), batch)
    assert [(c["rows"], c["proj"]) for c in calls] == [(5, False), (10, False)]
    guided = make_transport("OT_FM", enhance_target=True, w_cond=0.75, w_start=0.3, w_end=0.8)
    calls = _apply_calls(_cfg(transport=guided), {"x": x, "cond": y})
    assert [(c["rows"], c["proj"]) for c in calls] == [(20, False), (10, False), (10, False)]
    unguided_cond = make_transport("OT_FM", enhance_target=True, w_gt=0.5, w_cond=0.0)
    calls = _apply_calls(_cfg(transport=unguided_cond), {"x": x, "cond": y})
    assert [c["rows"] for c in calls] == [10, 10, 10]     # w_cond = 0: unconditional rows only
    with pytest.raises(ValueError, match="ema_params"):
        _apply_calls(_cfg(transport=guided), {"x": x, "cond": y}, ema=False)


def _core_inputs(seed, batch=10):
    x, z, y = _data(seed, batch)
    return (x, z) + _times(seed, batch) + (y,)


def test_gradient_flows_only_through_the_prediction():
    x, z, t, r, y = _core_inputs(18)
    params = mlp_params(19)
    cfg = _cfg(repa_coeff=0.0)
    apply_fn = _MLP
    got = jax.jit(jax.grad(lambda p: obj.transition_loss(apply_fn, p, x, z, t, r, y, config=cfg,
                                                         n_diffusion=5)[0]))(params)
    target = target_fn(apply_fn, params, x, z, t, r, y, config=cfg, n_diffusion=5)
    w = obj.time_weighting.time_weighting(t, r, sigma_d=1.0, weight_type="sqrt", warp="tangent",
                                          n_diffusion=5)

    def reference(p):  # target and adaptive weight as constants
        L = obj.per_sample_loss(apply_fn(p, (1 - t)[:, None, None, None] * x
                                         + t[:, None, None, None] * z, t, r, y), target)["loss"]
        return jnp.mean(w * L / (jax.lax.stop_gradient(L) + 1e-5))

    want = jax.jit(jax.grad(reference))(params)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(jnp.abs(want["a"]).max()) > 1e-3


def test_repa_term():
    x, z, t, r, y = _core_inputs(20)
    params = mlp_params(21)
    repa = jnp.asarray(np.random.default_rng(22).normal(size=(10, H * W, 4)), jnp.float32)
    loss, m = core_fn(_MLP, params, x, z, t, r, y, config=_cfg(repa_coeff=0.5), n_diffusion=5,
                      repa_target=repa)
    x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * z
    _, h = jax.jit(functools.partial(_MLP, return_proj=True))(params, x_t, t, r, y)
    h, g = np.asarray(h, np.float64), np.asarray(repa, np.float64)
    cos = (h * g).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(g, axis=-1))
    np.testing.assert_allclose(m["proj_loss"], np.mean(1 - cos), rtol=1e-5)
    np.testing.assert_allclose(loss, m["weighted_loss"] + 0.5 * m["proj_loss"], rtol=1e-6)
    _, m0 = core_fn(_MLP, params, x, z, t, r, y, config=_cfg(repa_coeff=0.0), n_diffusion=5,
                    repa_target=repa)
    assert float(m0["proj_loss"]) == 0.0


def test_enhanced_target_matches_hand_computation():
    transport = make_transport("OT_FM", enhance_target=True, w_gt=0.9, w_cond=0.75, w_start=0.3,
                               w_end=0.8)
    cfg = _cfg(transport=transport, derivative="jvp", repa_coeff=0.0)
    x, z, _, _, y = _core_inputs(23)
    t = jnp.array([0.1, 0.35, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.79, 0.95])
    r = jnp.where(jnp.arange(10) < 5, t, 0.5 * t).at[-1].set(0.0)
    dropped = y.at[jnp.array([2, 6, 9])].set(NUM_CLASSES)         # in- and out-of-window rows
    params, ema = mlp_params(24), mlp_params(25)
    null = jnp.int32(NUM_CLASSES)
    loss, m = core_fn(_MLP, params, x, z, t, r, dropped, config=cfg, n_diffusion=5,
                      ema_params=ema, ema_cond=y, null_cond=null)

    @jax.jit
    def by_hand(params, ema):
        e = lambda a: a[:, None, None, None]
        f = _MLP
        x_t, v = e(1 - t) * x + e(t) * z, z - x
        F_c, F_u = f(ema, x_t, t, t, y), f(ema, x_t, t, t, jnp.full_like(y, NUM_CLASSES))
        inside = e((t >= 0.3) & (t <= 0.8))
        v_hat = jnp.where(inside, 0.9 * v + 0.75 * F_c + (1 - 0.9 - 0.75) * F_u, v)
        fn = lambda xt, tt: f(params, xt, tt, r, dropped)
        F, dF = jax.jvp(fn, (x_t, t), (v, jnp.ones_like(t)))
        parts = obj.per_sample_loss(F, v_hat - e(t - r) * dF)
        w = obj.time_weighting.time_weighting(t, r, sigma_d=1.0, weight_type="sqrt",
                                              warp="tangent", n_diffusion=5)
        plain_mse = obj.per_sample_loss(F, v - e(t - r) * dF)["mse"].mean()
        return jnp.mean(w * parts["loss"] / (parts["loss"] + 1e-5)), parts["mse"].mean(), plain_mse

    want, want_mse, plain_mse = by_hand(params, ema)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["mse"], want_mse, rtol=1e-5)
    assert abs(float(plain_mse) - float(m["mse"])) > 1e-3   # the guidance changed the target


def test_label_dropout_rate_and_pytree_conditions():
    n, rate = 20000, 0.1
    cond = {"label": jnp.arange(n) % NUM_CLASSES, "cap": jnp.ones((n, 3, 2))}
    null = {"label": jnp.int32(NUM_CLASSES), "cap": jnp.full((3, 2), -1.0)}
    got, drop = jax.jit(obj.drop_cond, static_argnums=3)(jax.random.key(26), cond, null, rate)
    frac = float(drop.mean())
    assert abs(frac - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert bool(jnp.all(jnp.where(drop, got["label"] == NUM_CLASSES, got["label"] == cond["label"])))
    assert bool(jnp.all(jnp.where(drop[:, None, None], got["cap"] == -1.0, got["cap"] == 1.0)))
    # inside tim_loss: the online network (main forward and DDE) sees the dropped labels, the EMA
    # guidance the true ones
    x, _, y = _data(27, 64)
    guided = make_transport("OT_FM", enhance_target=True, w_cond=0.75)
    calls = _apply_calls(_cfg(transport=guided, label_dropout=0.5), {"x": x, "cond": y},
                         run=jax.jit)
    ema_call, dde_call, main_call = calls
    np.testing.assert_array_equal(ema_call["cond"][:64], y)
    assert bool(jnp.all(ema_call["cond"][64:] == NUM_CLASSES))
    used = main_call["cond"]
    assert 10 < int(jnp.sum(used == NUM_CLASSES)) < 54
    np.testing.assert_array_equal(dde_call["cond"], jnp.concatenate([used[32:], used[32:]]))


def test_jit_and_grad_compile():
    x, _, y = _data(28, 8)
    batch = {"x": x, "cond": y, "repa_target": jnp.ones((8, H * W, 4))}
    params = mlp_params(29)
    cfg = _cfg(transport=make_transport("OT_FM", enhance_target=True, w_cond=0.75))

    @functools.partial(jax.jit, static_argnames=("config",))
    def step(p, batch, rng, config):
        return jax.value_and_grad(obj.tim_loss, argnums=1, has_aux=True)(
            mlp_apply(), p, batch, rng, config=config, null_cond=jnp.int32(NUM_CLASSES),
            ema_params=p)

    (loss, m), g = step(params, batch, jax.random.key(30), cfg)
    assert loss.dtype == jnp.float32 and all(np.isfinite(v) for v in m.values())
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    assert set(m) >= {"loss", "weighted_loss", "denoising_loss", "mse", "dir_loss", "proj_loss",
                      "time_weight", "frac_diffusion", "frac_transition", "frac_consistency"}
    np.testing.assert_allclose([m["frac_diffusion"], m["frac_transition"], m["frac_consistency"]],
                               [0.5, 0.375, 0.125])
    np.testing.assert_allclose(loss, m["weighted_loss"] + m["proj_loss"], rtol=1e-6)
    # bf16 data: the loss is still computed (and returned) in float32
    (loss16, m16), g16 = jax.eval_shape(functools.partial(step, config=cfg), params,
                                        {**batch, "x": x.astype(jnp.bfloat16)}, jax.random.key(30))
    assert loss16.dtype == m16["mse"].dtype == g16["w1"].dtype == jnp.float32


def test_cosine_similarity_and_directional_term():
    a, b, _ = _data(31, 2)
    a = a.at[0, 0, 0].set(0.0)            # a zero vector: torch gives cosine 0, not NaN
    an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # torch >= 1.12: x1 / max(|x1|, eps) . x2 / max(|x2|, eps); channels are the NHWC last axis
    na = np.maximum(np.linalg.norm(an, axis=-1, keepdims=True), 1e-8)
    nb = np.maximum(np.linalg.norm(bn, axis=-1, keepdims=True), 1e-8)
    cos = ((an / na) * (bn / nb)).sum(-1)
    got_cos, parts, g, bad = jax.jit(lambda a, b: (
        obj.cosine_similarity(a, b), obj.per_sample_loss(a, b),
        jax.grad(lambda v: obj.per_sample_loss(v, b)["loss"].sum())(a),
        obj.per_sample_loss(a.at[1].set(jnp.nan), b)))(a, b)
    np.testing.assert_allclose(got_cos, cos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(parts["dir"], (1 - cos).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(parts["mse"], ((an - bn) ** 2).mean((1, 2, 3)), rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(bad["loss"][1]) == 0.0 and np.isfinite(float(bad["loss"][0]))
    assert not bool(bad["finite"][1]) and bool(bad["finite"][0])


@pytest.mark.parametrize("kw, field", [
    ({"diffusion_ratio": 1.2}, "diffusion_ratio"),
    ({"consistency_ratio": -0.1}, "consistency_ratio"),
    ({"diffusion_ratio": 0.7, "consistency_ratio": 0.4}, "diffusion_ratio \\+ consistency_ratio"),
    ({"derivative": "fd"}, "derivative"),
    ({"dde_delta": 0.0}, "dde_delta"),
    ({"weight_type": "cubic"}, "weight_type"),
    ({"weight_warp": "tanh"}, "weight_warp"),
    ({"weight_base": "r_only"}, "weight_base"),
    ({"label_dropout": 1.5}, "label_dropout"),
    ({"adaptive_eps": 0.0}, "adaptive_eps"),
    ({"repa_coeff": -1.0}, "repa_coeff"),
    ({"transport": "DDPM"}, "transport"),
])
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        obj.ObjectiveConfig(**kw)


def test_config_is_hashable_and_builds_transport_by_name():
    a, b = obj.ObjectiveConfig(transport="OT_FM"), obj.ObjectiveConfig(transport="OT_FM")
    assert a == b and hash(a) == hash(b) and a.transport.name == "OT_FM"
    assert not a.enhance_target
