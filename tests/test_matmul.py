"""The custom-VJP network ops (tim_jax.models.matmul.matmul, the CPU-layout ops of
tim_jax.models.cpu_fused through layers.dense_silu_glu and rope.norm_rope) against plain
autodiff: same values and gradients in float32 (tight), bfloat16 gradients computed in bfloat16
(dtype and accuracy), forward mode only inside tim_jax.autodiff.forward_mode, and a whole network
whose gradient equals the plain-autodiff gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.autodiff import forward_mode, in_forward_mode
from tim_jax.models import cpu_fused
from tim_jax.models import cpu_layouts as cpu
from tim_jax.models import layers as L
from tim_jax.models import rope as R
from tim_jax.models.attention_layers import SelfAttention
from tim_jax.models.cpu_layouts import use_cpu_layouts
from tim_jax.models.matmul import matmul

# (spec, shape of a, shape of b, bias?) -- the network's specs; M = 12 (even: the split path of
# the weight gradient), 7 (odd: the unsplit path); the attention specs contract over 8 keys.
CASES = [
    ("mi,io->mo", (12, 6), (6, 5), True),
    ("mi,io->mo", (7, 6), (6, 5), False),
    ("bni,io->bno", (2, 6, 4), (4, 3), True),
    ("bhqd,bhkd->bhqk", (2, 3, 8, 4), (2, 3, 8, 4), False),
    ("bhqk,bhkd->bhqd", (2, 3, 8, 8), (2, 3, 8, 4), False),
    # heads-first projection: output order != dot_general's, two contracted indices (b, n)
    # in the weight gradient
    ("bni,ithd->tbhnd", (2, 6, 4), (4, 3, 2, 5), True),
]


def _operands(shape_a, shape_b, bias, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal(shape_a), jnp.float32)
    b = jnp.asarray(rng.standard_normal(shape_b), jnp.float32)
    c = jnp.asarray(rng.standard_normal(shape_b[-1]), jnp.float32) if bias else None
    return a, b, c


def _sum_to(g, shape):
    """Sum g over the axes a bias of ``shape`` was broadcast along (numpy)."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1)
    return g.sum(axes).reshape(shape)


def _plain(spec, a, b, c, dtype=jnp.float32):
    y = jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return y if c is None else y + c


@pytest.mark.parametrize("spec,sa,sb,bias", CASES)
def test_float32_value_and_gradients_equal_plain_autodiff(spec, sa, sb, bias, layouts):
    a, b, c = _operands(sa, sb, bias)
    out_shape = jax.eval_shape(lambda: _plain(spec, a, b, c)).shape
    w = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)

    def loss(fn, a, b, c):
        return jnp.sum(fn(a, b, c) * w)

    ours = lambda a, b, c: matmul(spec, a, b, bias=c)  # noqa: E731
    ref = lambda a, b, c: _plain(spec, a, b, c)  # noqa: E731
    np.testing.assert_allclose(ours(a, b, c), ref(a, b, c), rtol=1e-6, atol=1e-6)
    argnums = (0, 1, 2) if bias else (0, 1)
    g_ours = jax.jit(jax.grad(lambda *x: loss(ours, *x), argnums))(a, b, c)
    g_ref = jax.jit(jax.grad(lambda *x: loss(ref, *x), argnums))(a, b, c)
    for go, gr in zip(g_ours, g_ref):
        assert go.dtype == jnp.float32 and go.shape == gr.shape
        np.testing.assert_allclose(go, gr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,sa,sb,bias", CASES)
def test_bfloat16_gradients_run_in_bfloat16_and_match_float64(spec, sa, sb, bias, layouts):
    """bf16 compute: the activation gradient comes back in the activation's dtype (bf16), the
    float32 weight's gradient in float32 without an intermediate bf16 rounding; values match a
    float64 reference on the bf16-rounded operands and cotangent to bf16 accuracy."""
    a, b, c = _operands(sa, sb, bias)
    a16 = a.astype(jnp.bfloat16)
    out = matmul(spec, a16, b, dtype=jnp.bfloat16, bias=c, out_dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    g = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape), jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b, c: matmul(spec, a, b, dtype=jnp.bfloat16, bias=c,
                                            out_dtype=jnp.bfloat16), a16, b, c)
    da, db, dc = vjp(g)
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    a64, b64, g64 = f64(a16), f64(b.astype(jnp.bfloat16)), f64(g)
    ins, o = spec.split("->")
    s_a, s_b = ins.split(",")
    np.testing.assert_allclose(f64(da), np.einsum(f"{o},{s_b}->{s_a}", g64, b64),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(f64(db), np.einsum(f"{s_a},{o}->{s_b}", a64, g64),
                               rtol=1e-5, atol=1e-5)
    if bias:
        assert dc.dtype == jnp.float32
        np.testing.assert_allclose(f64(dc), _sum_to(g64, c.shape), rtol=1e-6)
    np.testing.assert_allclose(
        f64(out), np.einsum(spec, a64, b64) + (0 if c is None else f64(c)), rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("spec,sizes,dtype,plan", [
    ("mi,io->mo", dict(m=12, i=6, o=5), jnp.bfloat16, ("iz,zo->io", "m")),
    # heads-first projection: the tokens (b, n) are merged into one contracted index
    ("bni,ithd->tbhnd", dict(b=2, n=6, i=4, t=3, h=2, d=5), jnp.bfloat16,
     ("iz,zthd->ithd", "bn")),
    ("bhqd,bhkd->bhqk", dict(b=2, h=3, q=8, d=4, k=8), jnp.bfloat16,
     ("bhdz,bhzk->bhkd", "q")),
    ("mi,io->mo", dict(m=7, i=6, o=5), jnp.bfloat16, None),    # odd: no (n/2, 2) split
    ("mi,io->mo", dict(m=12, i=6, o=5), jnp.float32, None),    # float32: Eigen takes a^T
])
def test_weight_gradient_plan(spec, sizes, dtype, plan):
    assert cpu.weight_grad_plan(spec, dtype, sizes) == plan


@pytest.mark.parametrize("rows,dtype,transposed", [
    (12, jnp.bfloat16, True), (7, jnp.bfloat16, False), (12, jnp.float32, False)])
def test_bfloat16_weight_gradient_residual_is_saved_transposed(rows, dtype, transposed):
    """The VJP of a bf16 matmul saves its first operand already transposed for the weight
    gradient (contracted rows last: (in, rows)), written in the forward pass; odd row counts
    and float32 keep the operand as is. The gradient values are checked by the tests above."""
    a = jnp.ones((rows, 6), dtype)
    b = jnp.ones((6, 5), jnp.float32)
    _, vjp = jax.vjp(lambda a, b: matmul("mi,io->mo", a, b, dtype=dtype), a, b)
    shapes = [x.shape for x in jax.tree.leaves(vjp) if x.ndim == 2]
    assert ((6, rows) in shapes) == transposed
    assert ((rows, 6) in shapes) == (not transposed)
    with use_cpu_layouts(False):  # the GPU/TPU path: the operand is saved as is
        _, vjp = jax.vjp(lambda a, b: matmul("mi,io->mo", a, b, dtype=dtype), a, b)
    shapes = [x.shape for x in jax.tree.leaves(vjp) if x.ndim == 2]
    assert (6, rows) not in shapes and (rows, 6) in shapes


def test_forward_mode_is_needed_for_jvp_and_gives_the_plain_tangent():
    a, b, _ = _operands((4, 3), (3, 2), False)
    f = lambda a: matmul("mi,io->mo", a, b)  # noqa: E731
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (a,), (a,))
    assert not in_forward_mode()
    with forward_mode():
        assert in_forward_mode()
        _, tangent = jax.jvp(f, (a,), (a,))
    assert not in_forward_mode()
    np.testing.assert_allclose(tangent, a @ b, rtol=1e-6)


@pytest.mark.parametrize("bias_shape", [(2, 1, 5), (1, 1, 5), (2, 7, 5)])
def test_broadcast_bias_per_sample_value_and_gradient(bias_shape):
    """A bias row per sample (B, 1, N) (the interval-aware qkv term) or any shape broadcasting
    to the output with its last axis full: added before the single rounding; its gradient is
    the cotangent summed over the broadcast axes."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((2, 7, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    c = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 7, 5)), jnp.float32)
    ours = lambda a, b, c: jnp.sum(matmul("bni,io->bno", a, b, bias=c) * w)  # noqa: E731
    ref = lambda a, b, c: jnp.sum((jnp.einsum("bni,io->bno", a, b) + c) * w)  # noqa: E731
    np.testing.assert_allclose(ours(a, b, c), ref(a, b, c), rtol=1e-5)
    for go, gr in zip(jax.grad(ours, (0, 1, 2))(a, b, c), jax.grad(ref, (0, 1, 2))(a, b, c)):
        assert go.shape == gr.shape
        np.testing.assert_allclose(go, gr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(4,), (2, 5), (2, 1, 5), (7, 1)])
def test_bias_that_does_not_fit_the_output_is_rejected(bias_shape):
    a, b = jnp.ones((3, 7, 4)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match="bias of shape"):
        matmul("bni,io->bno", a, b, bias=jnp.ones(bias_shape))


@pytest.mark.parametrize("spec", ["...i,io->...o", "mi,io", "ab,bc,cd->ad", "mii,io->mo"])
def test_bad_specs_are_rejected(spec):
    x = jnp.ones((2, 2, 2))
    with pytest.raises(ValueError, match="spec"):
        matmul(spec, x, x)


def test_silu_glu_and_its_written_out_gradient_equal_plain_autodiff():
    """cpu_fused.silu_glu equals silu(gate) * value; cpu_fused._silu_glu_grad (the one-pass
    gradient of the CPU SwiGLU backward) equals autodiff's, in f32 and rounded once in bf16."""
    h = jnp.asarray(np.random.default_rng(3).standard_normal((3, 5, 8)) * 3, jnp.float32)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 4)), jnp.float32)
    plain = lambda h: jax.nn.silu(h[..., :4]) * h[..., 4:]  # noqa: E731
    np.testing.assert_allclose(cpu_fused.silu_glu(h), plain(h), rtol=1e-6, atol=1e-6)
    g_ref = jax.grad(lambda h: jnp.sum(plain(h) * w))(h)
    np.testing.assert_allclose(cpu_fused._silu_glu_grad(h, w), g_ref, rtol=1e-5, atol=1e-6)
    g16 = cpu_fused._silu_glu_grad(h.astype(jnp.bfloat16), w)
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), g_ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("with_norm", [True, False], ids=["qk_norm", "no_norm"])
def test_norm_rope_equals_layer_norm_then_rope(with_norm):
    """rope.norm_rope (one custom VJP for QK-norm + RoPE + rounding) against plain autodiff
    of ``apply_rope(layer_norm(x) * scale + bias)``: float32 value and gradients (x, scale,
    bias) tight; with a bf16 output the gradients stay float32 and within bf16 accuracy;
    inside forward_mode the tangent is the plain one."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 16, 8)) * 2 + 0.5, jnp.float32)  # (B, H, L, Dh)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    cos, sin = R.rope_tables(4, 4, 8)
    norm = L.LayerNorm(8, eps=1e-5, rngs=nnx.Rngs(0)) if with_norm else None
    if with_norm:
        norm.scale[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
        norm.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    graphdef, state = nnx.split(norm)

    def plain(state, x):
        y = x
        if with_norm:
            y = L.layer_norm(x, 1e-5, state["scale"][...], state["bias"][...])
        return R.apply_rope(y, cos, sin)

    def ours(state, x, dtype=jnp.float32):
        return R.norm_rope(x, nnx.merge(graphdef, state) if with_norm else None, cos, sin, dtype)

    def loss(f, **kw):
        return lambda s, x: jnp.sum(f(s, x, **kw).astype(jnp.float32) * w)

    np.testing.assert_allclose(ours(state, x), plain(state, x), rtol=1e-5, atol=1e-5)
    g_s, g_x = jax.grad(loss(ours), argnums=(0, 1))(state, x)
    r_s, r_x = jax.grad(loss(plain), argnums=(0, 1))(state, x)
    np.testing.assert_allclose(g_x, r_x, rtol=1e-4, atol=1e-5)
    for name in (["scale", "bias"] if with_norm else []):
        np.testing.assert_allclose(g_s[name][...], r_s[name][...], rtol=1e-4, atol=1e-5)

    y16 = ours(state, x, jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    g16_s, g16_x = jax.grad(loss(ours, dtype=jnp.bfloat16), argnums=(0, 1))(state, x)
    assert g16_x.dtype == jnp.float32
    for got, ref in [(g16_x, r_x)] + ([(g16_s[n][...], r_s[n][...]) for n in ("scale", "bias")]
                                      if with_norm else []):
        assert np.linalg.norm(np.asarray(got) - ref) <= 0.03 * np.linalg.norm(ref), (got, ref)

    tangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    with forward_mode():
        _, t = jax.jvp(lambda x: ours(state, x), (x,), (tangent,))
    _, t_ref = jax.jvp(lambda x: plain(state, x), (x,), (tangent,))
    np.testing.assert_allclose(t, t_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_silu_glu_equals_dense_then_silu_glu(use_bias, layouts):
    """layers.dense_silu_glu (float32 pre-activation, one custom VJP for projection +
    activation) against plain autodiff of ``silu(h[:H]) * h[H:]``, ``h = x @ W + b``: float32
    value and gradients (x, kernel, bias) tight; in bf16 the input gradient is bf16, the
    parameter gradients float32, all within bf16 accuracy of the float32 ones; inside
    forward_mode the tangent is the plain one."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)      # 3-D: rows flattened
    w = jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32)

    def build(dtype):
        d = L.Dense(8, 10, axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype,
                    rngs=nnx.Rngs(0))
        if use_bias:
            d.bias[...] = jnp.asarray(rng.standard_normal(10), jnp.float32)
        return nnx.split(d)

    def plain(params, x):
        h = x @ params["kernel"] + (params["bias"] if use_bias else 0.0)
        return jax.nn.silu(h[..., :5]) * h[..., 5:]

    graphdef, state = build(jnp.float32)
    kernel = state["kernel"][...]
    ref_params = {"kernel": kernel, **({"bias": state["bias"][...]} if use_bias else {})}

    def ours_loss(state, x, graphdef=graphdef):
        return jnp.sum(L.dense_silu_glu(nnx.merge(graphdef, state), x).astype(jnp.float32) * w)

    ref_loss = lambda p, x: jnp.sum(plain(p, x) * w)  # noqa: E731
    np.testing.assert_allclose(L.dense_silu_glu(nnx.merge(graphdef, state), x),
                               plain(ref_params, x), rtol=1e-5, atol=1e-6)
    g_state, g_x = jax.grad(ours_loss, argnums=(0, 1))(state, x)
    r_params, r_x = jax.grad(ref_loss, argnums=(0, 1))(ref_params, x)
    np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_state["kernel"][...], r_params["kernel"], rtol=1e-5, atol=1e-5)
    if use_bias:
        np.testing.assert_allclose(g_state["bias"][...], r_params["bias"], rtol=1e-5, atol=1e-5)

    graphdef16, state16 = build(jnp.bfloat16)
    state16["kernel"][...] = kernel
    if use_bias:
        state16["bias"][...] = ref_params["bias"]
    x16 = x.astype(jnp.bfloat16)
    g16_state, g16_x = jax.grad(lambda s, x: ours_loss(s, x, graphdef16), argnums=(0, 1))(
        state16, x16)
    assert g16_x.dtype == jnp.bfloat16 and g16_state["kernel"][...].dtype == jnp.float32
    for got, ref in [(g16_x, r_x), (g16_state["kernel"][...], r_params["kernel"])] + (
            [(g16_state["bias"][...], r_params["bias"])] if use_bias else []):
        got = np.asarray(got, np.float32)
        assert np.linalg.norm(got - ref) <= 0.03 * np.linalg.norm(ref), (got, ref)

    tangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    with forward_mode():
        _, t = jax.jvp(lambda x: L.dense_silu_glu(nnx.merge(graphdef, state), x), (x,),
                       (tangent,))
    _, t_ref = jax.jvp(lambda x: plain(ref_params, x), (x,), (tangent,))
    np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-5)


def _tiny_network_grads(dtype):
    """(custom-backward grads, plain-autodiff grads) of a loss on a tiny TiM network with REPA,
    as lists of float32 leaves; the params are the same (float32) for every dtype."""
    from configs import debug_cpu
    from tim_jax.models.functional import init_params, make_apply_fn

    mc = debug_cpu.get_config().model
    mc.dtype = dtype
    graphdef, params = init_params(mc, 0)
    # The zero-initialised final layer would make most gradients zero: give it weights.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(5), p.shape),
                          params)
    apply_fn = make_apply_fn(graphdef)
    rng = np.random.default_rng(6)
    b, s, ch = 4, mc.input_size, mc.in_channels
    x = jnp.asarray(rng.standard_normal((b, s, s, ch)), jnp.float32)
    t = jnp.asarray([0.9, 0.6, 0.4, 0.2], jnp.float32)
    r = jnp.asarray([0.5, 0.6, 0.0, 0.1], jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    n_tok = (s // mc.patch_size) ** 2
    z = jnp.asarray(rng.standard_normal((b, n_tok, mc.z_dim)), jnp.float32)

    def loss(p):
        F, h = apply_fn(p, x, t, r, y, return_proj=True)
        return jnp.mean(F ** 2) + jnp.mean(h * z)

    def plain_grad(p):
        with forward_mode():
            return jax.grad(loss)(p)

    ours = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    plain = jax.tree.leaves(jax.jit(plain_grad)(params))
    assert len(ours) == len(plain) > 20
    assert all(g.dtype == jnp.float32 for g in ours + plain)
    return [np.asarray(g) for g in ours], [np.asarray(g) for g in plain]


def test_network_gradient_equals_plain_autodiff_float32(layouts):
    """A whole (tiny) TiM network with REPA in float32: the gradient through the custom
    backward equals plain autodiff (the network traced in forward_mode) to 1e-5."""
    ours, plain = _tiny_network_grads("float32")
    for go, gp in zip(ours, plain):
        scale = float(np.max(np.abs(gp))) + 1e-12
        np.testing.assert_allclose(go / scale, gp / scale, rtol=1e-5, atol=1e-5)


def test_network_gradient_bfloat16_is_as_accurate_as_plain_autodiff(layouts):
    """bf16 compute: the custom backward (bf16 gradient matmuls, as torch autocast) and plain
    autodiff (float32 cotangents) both approximate the float32 gradient; per leaf, the custom
    one's relative L2 error stays within bf16 accuracy and within a small factor of plain's."""
    exact, _ = _tiny_network_grads("float32")
    ours, plain = _tiny_network_grads("bfloat16")

    def rel(g, ref):
        return float(np.linalg.norm(g - ref) / (np.linalg.norm(ref) + 1e-12))

    err_ours = np.array([rel(g, e) for g, e in zip(ours, exact)])
    err_plain = np.array([rel(g, e) for g, e in zip(plain, exact)])
    assert np.median(err_ours) < 0.02, err_ours
    assert np.max(err_ours) < 0.1, err_ours
    assert np.median(err_ours) <= 2.0 * np.median(err_plain) + 2e-3, (err_ours, err_plain)


def test_cpu_row_chunked_product_equals_the_single_product(monkeypatch):
    """Large CPU products run as a loop over row chunks (cpu_layouts.row_chunks): same values and
    gradients as the single product, bias and rounding included, in f32 and bf16."""
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    c = jnp.asarray(rng.standard_normal(5), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)

    def run(dtype):
        f = lambda a, b, c: matmul("mi,io->mo", a, b, dtype=dtype, bias=c, out_dtype=dtype)  # noqa: E731
        loss = lambda a, b, c: jnp.sum(f(a, b, c).astype(jnp.float32) * w)  # noqa: E731
        return jax.jit(f)(a, b, c), jax.jit(jax.grad(loss, (0, 1, 2)))(a, b, c)

    singles = {dt: run(dt) for dt in (jnp.float32, jnp.bfloat16)}
    assert cpu.row_chunks("mi,io->mo", a, b, c) == 1
    monkeypatch.setattr(cpu, "_CHUNK_MIN_BYTES", 64)  # 16 x 5 x 4 bytes -> 8 chunks
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 32)
    assert cpu.row_chunks("mi,io->mo", a, b, c) == 8
    with cpu.row_chunking(False):  # how the benchmark counts FLOPs (no loop in the program)
        assert cpu.row_chunks("mi,io->mo", a, b, c) == 1
    assert cpu.row_chunks("mi,io->mo", a[:3], b, c) == 1  # rows not divisible
    assert cpu.row_chunks("mo,io->mi", a[:, :5], b, None) == 8
    assert cpu.row_chunks("im,io->mo", a[:6], b[:, :5][:6], None) == 1  # m is not a's own index
    for dt, (y1, g1) in singles.items():
        y2, g2 = run(dt)
        tol = 1e-6 if dt == jnp.float32 else 8e-3  # summation order; one bf16 ulp
        np.testing.assert_allclose(np.asarray(y2, np.float32), np.asarray(y1, np.float32),
                                   rtol=tol, atol=tol)
        for x1, x2 in zip(g1, g2):
            np.testing.assert_allclose(x2, x1, rtol=1e-5, atol=1e-5)


def test_self_attention_with_scaled_rope_equals_scaled_logits():
    """SelfAttention folds the softmax scale Dh**-0.5 into the query's RoPE tables
    (rope.scaled_rope) and runs the attention with scale=1.0: the output and the input
    gradient equal the textbook ``softmax(q k^T * Dh**-0.5) v`` (float32, Dh = 8, whose scale
    is not a power of 2)."""
    rng = np.random.default_rng(5)
    dim, heads, dh = 16, 2, 8
    att = SelfAttention(dim, heads, qk_norm=True, distance_aware=False, rngs=nnx.Rngs(1))
    att.q_norm.scale[...] = jnp.asarray(rng.standard_normal(dh), jnp.float32)
    att.k_norm.bias[...] = jnp.asarray(rng.standard_normal(dh), jnp.float32)
    rope = R.rope_tables(4, 4, dh)                                   # (16, 8)
    x = jnp.asarray(rng.standard_normal((2, 16, dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 16, dim)), jnp.float32)

    def reference(x):
        qkv = x @ att.qkv.kernel[...] + att.qkv.bias[...]
        q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(2, 16, heads, dh).transpose(0, 2, 1, 3)
                   for i in range(3))
        q = R.apply_rope(L.layer_norm(q, 1e-5, att.q_norm.scale[...], att.q_norm.bias[...]), *rope)
        k = R.apply_rope(L.layer_norm(k, 1e-5, att.k_norm.scale[...], att.k_norm.bias[...]), *rope)
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * dh ** -0.5, axis=-1)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3).reshape(2, 16, dim)
        return o @ att.proj.kernel[...] + att.proj.bias[...]

    np.testing.assert_allclose(att(x, rope), reference(x), rtol=1e-5, atol=1e-5)
    gx = jax.grad(lambda x: jnp.sum(att(x, rope) * w))(x)
    gx_ref = jax.grad(lambda x: jnp.sum(reference(x) * w))(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
