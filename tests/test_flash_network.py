"""The Pallas flash kernels on the hot path of a whole TiM network (interpret mode on CPU):
``attention_impl="flash"`` gives the same output, parameter gradients and ``jax.jvp`` tangent as
the XLA attention, and the network's ``jax.jvp`` runs the forward-mode kernel (counted in the
jaxpr) instead of falling back to quadratic-memory attention. ``"auto"`` picks the kernel only
where a measurement recorded that it wins.

Tolerances: fp32, 1e-5 of the output scale (the kernels' online softmax sums in another order).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.autodiff import forward_mode
from tim_jax.models import attention as A
from tim_jax.models import abstract_model, make_apply_fn, model_config
from tim_jax.models.kernels.flash_attention import kernel_calls

DEPTH = 1


def _net(impl):
    """The c2i_tiny network at depth 1 (the kernel is the same in every block) with every
    parameter random (the official init zeroes the output layer, which would make any attention
    "match"); the same parameters for every ``impl``."""
    cfg = model_config("c2i_tiny", attention_impl=impl, depth=DEPTH, encoder_depth=1)
    graphdef, shapes = abstract_model(cfg)
    rng = np.random.default_rng(2)   # numpy: a jitted draw per leaf compiles for seconds
    params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype),
                          shapes)
    return make_apply_fn(graphdef), params


def _inputs():
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (2, 8, 8, 4))
    v = jax.random.normal(k[1], (2, 8, 8, 4))
    t = jnp.array([0.9, 0.5])
    r = jnp.array([0.3, 0.0])
    y = jnp.array([1, 10], jnp.int32)
    return x, v, t, r, y


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_flash_network_output_gradient_and_jvp_equal_xla():
    x, v, t, r, y = _inputs()
    results = {}
    for impl in ("xla", "xla_softmax", "flash"):
        apply_fn, params = _net(impl)
        # jitted: eager (op-by-op) interpret-mode kernels take several times longer
        out = jax.jit(apply_fn)(params, x, t, r, y)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(apply_fn(p, x, t, r, y) ** 2)))(params)
        with forward_mode():
            _, tangent = jax.jit(lambda x: jax.jvp(lambda x: apply_fn(params, x, t, r, y),
                                                   (x,), (v,)))(x)
        results[impl] = (out, grads, tangent)
    (o1, g1, t1), (_, g0, _), (o2, g2, t2) = (results[k] for k in ("xla", "xla_softmax", "flash"))
    assert _rel(o2, o1) < 1e-5
    assert _rel(t2, t1) < 1e-5
    # parameter gradients: within 1e-5 of their scale, or within 4x the float32 disagreement
    # of the two XLA attentions (another softmax order) on the same leaf
    for a, b, c in zip(*(map(np.asarray, jax.tree.leaves(g)) for g in (g2, g1, g0))):
        noise = float(np.max(np.abs(c - b)))
        scale = max(float(np.max(np.abs(b))), 1e-6)
        assert float(np.max(np.abs(a - b))) <= max(1e-5 * scale, 4 * noise), (noise, scale)


def test_network_jvp_goes_through_the_jvp_kernel():
    x, v, t, r, y = _inputs()
    apply_fn, params = _net("flash")
    depth = DEPTH
    with forward_mode():
        jaxpr = jax.make_jaxpr(
            lambda x, v: jax.jvp(lambda x: apply_fn(params, x, t, r, y), (x,), (v,)))(x, v)
    calls = kernel_calls(jaxpr)
    assert calls.get("flash_attention_jvp", 0) == depth, calls
    assert calls.get("flash_attention_fwd", 0) == 0, calls   # the JVP kernel yields the primal
    grad_jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(apply_fn(p, x, t, r, y))))(params)
    calls = kernel_calls(grad_jaxpr)
    assert calls.get("flash_attention_fwd", 0) == depth and calls.get("flash_attention_dq") == depth


def test_auto_picks_flash_only_where_measured(monkeypatch):
    q = jnp.zeros((1, 2, 16, 16))
    assert A.auto_impl(q, q) == "xla"                      # nothing measured on this backend
    monkeypatch.setitem(A.FLASH_MEASURED_WINS, jax.default_backend(), 16)
    assert A.auto_impl(q, q) == "flash"
    assert A.auto_impl(q[:, :, :8], q) == "xla"            # below the measured length
    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.standard_normal((1, 2, 16, 16)), jnp.float32) for _ in range(3)]
    np.testing.assert_allclose(A.attention(*qkv, impl="auto"), A.attention(*qkv, impl="xla"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_flash_matches_xla_on_gpu():
    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.standard_normal((2, 4, 300, 72)), jnp.bfloat16) for _ in range(3)]
    ref = A.attention(*qkv, impl="xla").astype(jnp.float32)
    out = A.attention(*qkv, impl="flash").astype(jnp.float32)
    assert _rel(out, ref) < 2e-2


def test_xla_attention_switches_to_blocked_above_the_threshold(monkeypatch):
    """impl="xla" runs the blocked (linear-memory) attention above the logits threshold, with
    the same values; below it, the plain einsums."""
    from tim_jax.models import blocked_attention as B

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 40, 16)), jnp.float32) for _ in range(3))
    plain = A.attention(q, k, v, impl="xla")
    monkeypatch.setattr(B, "BLOCKED_THRESHOLD_LOGITS", 40 * 40 - 1)
    jaxpr = str(jax.make_jaxpr(lambda q: A.attention(q, k, v, impl="xla"))(q))
    assert "scan" in jaxpr                      # the blocked path (a scan over key blocks)
    np.testing.assert_allclose(A.attention(q, k, v, impl="xla"), plain, rtol=1e-5, atol=1e-6)
