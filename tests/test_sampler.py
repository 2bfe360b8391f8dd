"""Any-step sampler, checked with analytic fields (no network).

For Gaussian data x ~ N(mu, diag(s^2)) and a path x_t = alpha_t x + sigma_t z, the marginal at t
is N(alpha_t mu, v_t) per dimension with v_t = alpha_t^2 s^2 + sigma_t^2, and the flow map of the
probability-flow ODE is the monotone affine map x_r = m_r + sqrt(v_r / v_t) (x_t - m_t). The
exact transition-model output is then the F that the transport's one-step transition turns into
that x_r (OT-FM: F = (x_t - x_r) / (t - r); at r = t the instantaneous velocity). A sampler fed
this field must map z to mu + s z exactly (up to T_max not being exactly pure noise).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax import sampler as sampler_mod
from tim_jax.sampler import sample, time_grid
from tim_jax.transports import OT_FM, TrigFlow, make_transport

SHAPE = (2, 2, 2)  # tiny NHWC "images"
NUM_CLASSES = 3  # label 2 plays the null class


def _params():
    mu = jnp.stack([jnp.linspace(-1.0, 1.0, 8), jnp.linspace(2.0, 0.5, 8), jnp.zeros(8)])
    s = jnp.linspace(0.3, 1.4, 8)
    return {"mu": mu.reshape((NUM_CLASSES,) + SHAPE), "s": s.reshape(SHAPE)}


def _expand(t, x):
    return t.reshape((-1,) + (1,) * (x.ndim - 1))


def make_exact_field(transport, log=None, trace_counter=None):
    """apply_fn(params, x_t, c_t, c_r, labels) = exact F for class-conditional Gaussian data.

    ``log`` (list) receives (rows, t, x dtype) per executed call; ``trace_counter`` (list)
    gets one entry per trace.
    """
    assert transport.c_noise(jnp.float32(0.3)) == jnp.float32(0.3)  # identity c_noise used here

    def apply_fn(params, x_t, t, r, cond):
        if trace_counter is not None:
            trace_counter.append(1)
        if log is not None:
            rows, dt = x_t.shape[0], str(x_t.dtype)
            jax.debug.callback(lambda tt: log.append((rows, float(tt), dt)), t[0])
        assert t.dtype == jnp.float32 and r.dtype == jnp.float32 and t.shape == (x_t.shape[0],)
        mu = params["mu"][cond]
        s = params["s"]
        t, r = _expand(t, x_t), _expand(r, x_t)
        x = x_t.astype(jnp.float32)

        def marg(u):
            a, sg, da, dsg = transport.interpolant(u)
            return a * mu, a * a * s * s + sg * sg, da, dsg, a

        m_t, v_t, da, dsg, a_t = marg(t)
        m_r, v_r, *_ = marg(r)
        x_r = m_r + jnp.sqrt(v_r / v_t) * (x - m_t)
        # F with transition(x_t, t, r, F) == x_r (transitions are affine in F)
        base = transport.transition(x, t, r, jnp.zeros_like(x))
        slope = transport.transition(x, t, r, jnp.ones_like(x)) - base
        strict = (t > r) & (slope != 0)
        F = (x_r - base) / jnp.where(strict, slope, 1.0)
        if isinstance(transport, OT_FM):
            # r == t: F is the instantaneous velocity dx/dt = dm/dt + (dv/dt) / (2 v) (x - m)
            # (x_r = x_t - (t - r) F, so F = dx/dt)
            dv = 2 * a_t * da * s * s + 2 * transport.interpolant(t)[1] * dsg
            vel = da * mu + dv / (2 * v_t) * (x - m_t)
            F = jnp.where(t > r, F, vel)
        return F

    return apply_fn


def _labels(n, key=0):
    return jax.random.randint(jax.random.key(key), (n,), 0, NUM_CLASSES - 1)


def _expected(params, z, labels, transport=OT_FM()):
    """Exact image of z (treated as x at T_max) at T_min under the PF-ODE flow map."""
    mu, s = params["mu"][labels], params["s"]
    a1, s1, _, _ = transport.interpolant(jnp.float32(transport.T_max))
    a0, s0, _, _ = transport.interpolant(jnp.float32(transport.T_min))
    v1 = a1 * a1 * s * s + s1 * s1
    v0 = a0 * a0 * s * s + s0 * s0
    return a0 * mu + jnp.sqrt(v0 / v1) * (z - a1 * mu)


def _noise(n, key=1):
    return jax.random.normal(jax.random.key(key), (n,) + SHAPE, jnp.float32)


OT = OT_FM()
FIELD = make_exact_field(OT)  # module-level: one apply_fn object -> compilations are reused


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_transition_mode_exact_and_moments(num_steps):
    params, n = _params(), 4096
    z, y = _noise(n), jnp.zeros((n,), jnp.int32)
    x = sample(FIELD, params, z, y, None, transport=OT, num_steps=num_steps)
    assert x.shape == z.shape and x.dtype == jnp.float32
    np.testing.assert_allclose(x, _expected(params, z, y), atol=5e-6 * num_steps + 2e-6)
    # the samples have the data distribution's mean and (diagonal) covariance
    flat = np.asarray(x, np.float64).reshape(n, -1)
    mu, s = np.asarray(params["mu"][0]).ravel(), np.asarray(params["s"]).ravel()
    assert np.all(np.abs(flat.mean(0) - mu) < 4 * s / np.sqrt(n))
    cov = np.cov(flat, rowvar=False)
    tol = 4 * np.outer(s, s) * np.sqrt(2.0 / n) + 4 * np.outer(s, s) / np.sqrt(n)
    assert np.all(np.abs(cov - np.diag(s**2)) < tol)


def test_diffusion_mode_converges_first_order():
    params, n = _params(), 512
    z, y = _noise(n), _labels(n)
    want = _expected(params, z, y)
    errs = {}
    for steps in (25, 100, 400):
        x = sample(FIELD, params, z, y, None, transport=OT, num_steps=steps, mode="diffusion")
        errs[steps] = float(jnp.max(jnp.abs(x - want)))
    assert errs[400] < 0.02
    # Euler: error ~ 1/N
    assert 3.0 < errs[25] / errs[100] < 5.0 and 3.0 < errs[100] / errs[400] < 5.0
    # 'ddiffusion' is the official spelling of the same mode
    x = sample(FIELD, params, z, y, None, transport=OT, num_steps=25, mode="ddiffusion")
    assert float(jnp.max(jnp.abs(x - want))) == pytest.approx(errs[25])


def test_trajectory_on_exact_marginals_and_custom_schedule():
    params, n = _params(), 64
    z, y = _noise(n), _labels(n)
    schedule = [1.0, 0.9, 0.45, 0.2, 0.0]
    x, traj = sample(FIELD, params, z, y, None, transport=OT, schedule=schedule,
                     return_trajectory=True)
    assert traj.shape == (5, n) + SHAPE and traj.dtype == jnp.float32
    np.testing.assert_array_equal(traj[0], z)
    np.testing.assert_array_equal(traj[-1], x)
    mu, s = params["mu"][y], params["s"]
    for k, tk in enumerate(schedule):
        v = (1 - tk) ** 2 * s * s + tk**2
        np.testing.assert_allclose(traj[k], (1 - tk) * mu + jnp.sqrt(v) * z, atol=1e-5)
    # a schedule that stops early ends on that time's marginal
    x_half = sample(FIELD, params, z, y, None, transport=OT, schedule=np.array([1.0, 0.5]))
    np.testing.assert_allclose(x_half, 0.5 * mu + jnp.sqrt(0.25 * s * s + 0.25) * z, atol=1e-5)
    # the uniform grid is linspace in float64 cast to float32
    np.testing.assert_array_equal(time_grid(OT, 3), np.float32([1.0, 2 / 3, 1 / 3, 0.0]))


def test_other_transport_trigflow():
    tr = TrigFlow()
    field = make_exact_field(tr)
    params, n = _params(), 256
    z, y = _noise(n), _labels(n)
    for steps in (1, 3):
        x = sample(field, params, z, y, None, transport=tr, num_steps=steps)
        np.testing.assert_allclose(x, _expected(params, z, y, tr), atol=2e-5)


def _manual(field, params, z, y, y_null, steps, guided_times, scale):
    """Reference loop: F = F_u + scale (F_c - F_u) at the given times only."""
    ts = time_grid(OT, steps)
    x = z
    n = z.shape[0]

    @jax.jit
    def step(x, t, r, w_u):
        F = field(params, x, t, r, y)
        Fu = field(params, x, t, r, y_null)
        return OT.transition(x, t, r, F + w_u * (Fu - F))

    for t, r in zip(ts[:-1], ts[1:]):
        # F_u + scale (F_c - F_u) = F_c + (1 - scale) (F_u - F_c)
        w_u = (1.0 - scale) if float(t) in guided_times else 0.0
        x = step(x, jnp.full((n,), t), jnp.full((n,), r), w_u)
    return x


def test_cfg_window_is_strict_and_batched():
    log = []
    field = make_exact_field(OT, log=log)
    params, n = _params(), 8
    z, y = _noise(n), _labels(n)
    y_null = jnp.int32(NUM_CLASSES - 1)  # scalar null label broadcasts over the rows

    def run(**kw):
        log.clear()
        x = sample(field, params, z, y, y_null, transport=OT, num_steps=4, **kw)
        jax.block_until_ready(x)
        jax.effects_barrier()
        return x, sorted(((t, rows) for rows, t, _ in log), reverse=True)

    # grid 1, .75, .5, .25: window (0.25, 0.75) strictly contains only t = 0.5
    x, calls = run(cfg_scale=3.0, cfg_low=0.25, cfg_high=0.75)
    assert calls == [(1.0, n), (0.75, n), (0.5, 2 * n), (0.25, n)]
    np.testing.assert_allclose(x, _manual(field, params, z, y, jnp.full((n,), 2), 4, {0.5}, 3.0),
                               atol=1e-5)
    # default window (0, 1): every step but the first (t = T_max is not < 1)
    x, calls = run(cfg_scale=3.0)
    assert calls == [(1.0, n), (0.75, 2 * n), (0.5, 2 * n), (0.25, 2 * n)]
    np.testing.assert_allclose(
        x, _manual(field, params, z, y, jnp.full((n,), 2), 4, {0.75, 0.5, 0.25}, 3.0), atol=1e-5)
    # guidance has an effect (the field depends on the label)
    x_plain, calls = run(cfg_scale=1.0)
    assert calls == [(1.0, n), (0.75, n), (0.5, n), (0.25, n)]
    assert float(jnp.max(jnp.abs(x - x_plain))) > 0.1
    # cfg_scale <= 1 needs no null condition
    sample(field, params, z, y, None, transport=OT, num_steps=2, cfg_scale=0.5)


def test_stochasticity_skips_first_and_last_step():
    params, n, steps = _params(), 16, 5
    z, y = _noise(n), _labels(n)
    kw = dict(transport=OT, num_steps=steps, stochasticity_ratio=0.5, return_trajectory=True)
    x, traj = sample(FIELD, params, z, y, None, rng=jax.random.key(7), **kw)
    ts = time_grid(OT, steps)
    det_step = jax.jit(lambda x, t, r: OT.transition(x, t, r, FIELD(params, x, t, r, y)))
    jumps = []
    for k in range(steps):
        t, r = jnp.full((n,), ts[k]), jnp.full((n,), ts[k + 1])
        jumps.append(float(jnp.max(jnp.abs(traj[k + 1] - det_step(traj[k], t, r)))))
    assert jumps[0] < 1e-6 and jumps[-1] < 1e-6, jumps
    assert min(jumps[1:-1]) > 1e-2, jumps
    # reproducible for a key, different for another
    x2, _ = sample(FIELD, params, z, y, None, rng=jax.random.key(7), **kw)
    x3, _ = sample(FIELD, params, z, y, None, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(x, x2)
    assert float(jnp.max(jnp.abs(x - x3))) > 1e-2
    # a 2-step run has no step where stochasticity applies: identical to deterministic
    xs = sample(FIELD, params, z, y, None, transport=OT, num_steps=2, stochasticity_ratio=0.5,
                rng=jax.random.key(0))
    np.testing.assert_array_equal(xs, sample(FIELD, params, z, y, None, transport=OT, num_steps=2))


def test_float64_state_reproduces_official_semantics():
    log = []
    field = make_exact_field(OT, log=log)
    params, n, steps = _params(), 8, 3
    z, y = _noise(n), _labels(n)
    with pytest.raises(ValueError, match="state_dtype=float64 needs 64-bit jax"):
        sample(field, params, z, y, None, transport=OT, num_steps=steps, state_dtype=jnp.float64)
    with jax.enable_x64(True):
        x, traj = sample(field, params, z, y, None, transport=OT, num_steps=steps,
                         state_dtype=jnp.float64, return_trajectory=True)
        jax.effects_barrier()
        assert x.dtype == jnp.float64 and traj.dtype == jnp.float64
        assert {dt for _, _, dt in log} == {"float32"}  # the network ran in z's dtype
        # official loop: float64 state, float32 network input and times, F cast to float64
        ts = time_grid(OT, steps)
        ref = np.asarray(z, np.float64)
        for t, r in zip(ts[:-1], ts[1:]):
            F = field(params, jnp.asarray(ref, jnp.float32), jnp.full((n,), t), jnp.full((n,), r), y)
            ref = ref - (np.float64(t) - np.float64(r)) * np.asarray(F, np.float64)
        np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=1e-6)


def test_one_compile_per_step_count():
    traces = []
    field = make_exact_field(OT, trace_counter=traces)
    params, n = _params(), 8
    y, y_null = _labels(n), jnp.full((n,), 2)
    run = functools.partial(sample, field, params, cond=y, null_cond=y_null, transport=OT)
    cache0 = sampler_mod._sample_core._cache_size()
    run(_noise(n, 1), num_steps=3, cfg_scale=2.0)
    first = len(traces)
    assert first > 0
    # new values of z, cfg scale / window, stochasticity-free schedule values: no retrace
    run(_noise(n, 2), num_steps=3, cfg_scale=4.0, cfg_low=0.1, cfg_high=0.6)
    run(_noise(n, 3), schedule=[1.0, 0.8, 0.1, 0.0], cfg_scale=1.5)
    assert len(traces) == first
    assert sampler_mod._sample_core._cache_size() == cache0 + 1
    run(_noise(n, 4), num_steps=4, cfg_scale=2.0)
    assert len(traces) == 2 * first
    assert sampler_mod._sample_core._cache_size() == cache0 + 2


def test_whole_sampler_jittable():
    params, n = _params(), 8
    z, y = _noise(n), _labels(n)
    kw = dict(transport=OT, num_steps=3, cfg_scale=2.0)
    jitted = jax.jit(functools.partial(sample, FIELD, **kw))
    np.testing.assert_allclose(
        jitted(params, z, y, jnp.full((n,), 2)), sample(FIELD, params, z, y, jnp.full((n,), 2), **kw),
        atol=1e-6)
    # traced cfg values and schedule inside a user's jit
    f = jax.jit(lambda s, lo, sched: sample(FIELD, params, z, y, jnp.full((n,), 2), transport=OT,
                                            cfg_scale=s, cfg_low=lo, schedule=sched))
    np.testing.assert_allclose(
        f(2.0, 0.0, jnp.asarray(time_grid(OT, 3))),
        sample(FIELD, params, z, y, jnp.full((n,), 2), **kw), atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(num_steps=2.5), "num_steps must be an integer >= 1"),
        (dict(num_steps=True), "num_steps must be an integer >= 1"),
        (dict(), "give num_steps"),
        (dict(num_steps=2, cfg_low=0.5, cfg_high=0.5), "cfg_low must be < cfg_high"),
        (dict(num_steps=2, cfg_scale=-1.0), r"cfg_scale must be in \[0.0"),
        (dict(num_steps=2, stochasticity_ratio=1.0, rng=jax.random.key(0)),
         r"stochasticity_ratio must be in \[0.0, 1.0\)"),
        (dict(num_steps=2, stochasticity_ratio=-0.1), "stochasticity_ratio must be in"),
        (dict(num_steps=2, stochasticity_ratio=0.2), "rng is required"),
        (dict(num_steps=2, mode="euler"), r"mode='euler' is not one of \['transition', 'diffusion'\]"),
        (dict(schedule=[1.0, 0.5, 0.5, 0.0]), "strictly decreasing"),
        (dict(schedule=[0.0, 1.0]), "strictly decreasing"),
        (dict(schedule=[1.0]), ">= 2 times"),
        (dict(schedule=[1.0, 0.5, 0.0], num_steps=3), "num_steps must be 2"),
        (dict(num_steps=2, cfg_scale=2.0, null_cond=None), "null_cond is required"),
        (dict(num_steps=2, state_dtype=jnp.int32), "state_dtype must be a floating dtype"),
        (dict(num_steps=2, transport="OT_FM"), "transport must be a"),
    ],
)
def test_bad_inputs(kw, match):
    params, n = _params(), 4
    args = dict(transport=OT, null_cond=jnp.full((n,), 2))
    args.update(kw)
    null = args.pop("null_cond")
    with pytest.raises(ValueError, match=match):
        sample(FIELD, params, _noise(n), _labels(n), null, **args)


def test_stochasticity_needs_ot_fm():
    with pytest.raises(ValueError, match="only supported by transports"):
        sample(FIELD, _params(), _noise(4), _labels(4), None, transport=make_transport("EDM"),
               num_steps=3, stochasticity_ratio=0.1, rng=jax.random.key(0))
