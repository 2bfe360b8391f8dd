"""Tests of the TiM networks (tim_jax.models): official parity, layouts, dtypes, RoPE grid order,
t2i cross-attention numerics, init recipe, jvp, input validation, attention dispatch.

References:
* ``tests/fixtures/parity/c2i_tiny`` (official PyTorch outputs with randomised weights);
* ``np_official_forward`` below: a float64 numpy re-implementation of the official forward
  (``tim/models/{c2i,t2i}/tim_model.py``) that reads official state-dict keys directly, NCHW.
Tolerances are relative to the output scale (max |ref|) and stated per test.
"""
import json
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parity_path
from flax import nnx

from tim_jax.models import (
    NEW_CONDITIONS,
    abstract_model,
    attention_impls,
    build_model,
    make_apply_fn,
    model_config,
    params_from_pure_dict,
    stack_block_params,
    unstack_block_params,
)
from tim_jax.autodiff import forward_mode
from tim_jax.models import attention as A
from tim_jax.models import layers as L
from tim_jax.models import rope as R
from tim_jax.models.functional import init_params, split_model

# --------------------------------------------------------------------------------------------
# official state dict <-> tim_jax params (a small test-local loader; the full converter with
# wrapper handling and reports is tim_jax/convert.py)


def _path(key):
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def official_to_pure(sd):
    """Official torch-layout state dict -> nested pure dict in tim_jax layout (list blocks)."""
    flat = {}
    for key, v in sd.items():
        *mod, leaf = _path(key)
        if mod[-1] == "fc1_x":
            continue
        if mod[-1] == "fc1_g":
            other = np.asarray(sd[key.replace("fc1_g", "fc1_x")])
            mod = mod[:-1] + ["fc1"]
            if leaf == "weight":
                flat[(*mod, "kernel")] = np.concatenate([v.T, other.T], axis=-1)
            else:
                flat[(*mod, "bias")] = np.concatenate([v, other])
            continue
        if leaf == "weight":
            if mod[-1] in ("q_norm", "k_norm", "norm"):
                flat[(*mod, "scale")] = v
            elif mod[-1] == "embedding_table":
                flat[(*mod, "embedding")] = v
            elif v.ndim == 4:
                flat[(*mod, "kernel")] = v.transpose(2, 3, 1, 0)
            else:
                flat[(*mod, "kernel")] = v.T
        else:
            flat[(*mod, leaf)] = v
    pure = {}
    for path, v in flat.items():
        d = pure
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = jnp.asarray(v, jnp.float32)
    return pure


def pure_to_official(pure):
    """Inverse of ``official_to_pure`` (list layout)."""
    sd = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
                continue
            mod = list(prefix)
            v = np.asarray(v, np.float64)
            if mod[-1] == "fc1":
                h = v.shape[-1] // 2
                base = ".".join(map(str, mod[:-1]))
                name = "weight" if k == "kernel" else "bias"
                g, x = (v[:, :h].T, v[:, h:].T) if k == "kernel" else (v[:h], v[h:])
                sd[f"{base}.fc1_g.{name}"], sd[f"{base}.fc1_x.{name}"] = g, x
                continue
            base = ".".join(map(str, mod))
            if k == "kernel":
                sd[base + ".weight"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            elif k in ("scale", "embedding"):
                sd[base + ".weight"] = v
            else:
                sd[base + "." + k] = v
    walk(pure, ())
    return sd


# --------------------------------------------------------------------------------------------
# float64 numpy re-implementation of the official forward (NCHW, torch-layout weights)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def np_official_forward(sd, cfg, x, t, r, cond, kind="c2i"):
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    p, d_model, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    dh = d_model // heads

    def lin(name, v):
        out = v @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if name + ".bias" in sd else out

    def swiglu(name, v):
        return lin(name + ".fc2", _silu(lin(name + ".fc1_g", v)) * lin(name + ".fc1_x", v))

    def ln(v, eps, name=None):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        out = (v - mu) / np.sqrt(var + eps)
        return out * sd[name + ".weight"] + sd[name + ".bias"] if name else out

    def temb(name, tt):
        half = 128
        freqs = np.exp(-math.log(10000) * np.arange(half) / half)
        args = np.asarray(tt, np.float64)[:, None] * freqs[None]
        e = np.concatenate([np.cos(args), np.sin(args)], -1)
        return lin(name + ".mlp.2", _silu(lin(name + ".mlp.0", e)))

    def rot(v):
        v2 = v.reshape(*v.shape[:-1], -1, 2)
        return np.stack([-v2[..., 1], v2[..., 0]], -1).reshape(v.shape)

    def attend(q, k, v):
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(dh)
        s = np.exp(s - s.max(-1, keepdims=True))
        return (s / s.sum(-1, keepdims=True)) @ v

    x = np.asarray(x, np.float64)
    b, c_in, hh, ww = x.shape
    h, w = hh // p, ww // p
    patches = x.reshape(b, c_in, h, p, w, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    tok = patches @ sd["x_embedder.proj.weight"].reshape(d_model, -1).T + sd["x_embedder.proj.bias"]
    e_t = temb("t_embedder", t)
    de = "delta_embedder" if cfg["use_new_embed"] else "t_embedder"
    t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
    nc = cfg["new_condition"]
    delta = {"t-r": lambda: temb(de, t - r), "r": lambda: temb(de, r),
             "t,r": lambda: e_t + temb(de, r), "t,t-r": lambda: e_t + temb(de, t - r),
             "r,t-r": lambda: temb("t_embedder", r) + temb(de, t - r),
             "t,r,t-r": lambda: e_t + temb("t_embedder", r) + temb(de, t - r)}[nc]()[:, None]
    c = e_t[:, None] + delta
    if kind == "c2i":
        c = c + sd["y_embedder.embedding_table.weight"][np.asarray(cond)][:, None]
    else:
        y = swiglu("y_embedder.mlp", ln(np.asarray(cond, np.float64), 1e-5, "y_embedder.norm"))

    # RoPE exactly as rope.py: meshgrid(..., indexing='xy'), cached tables, [h-part | w-part].
    half = dh // 2
    freqs = 1.0 / (10000 ** (np.arange(0, half, 2) / half))
    cached = np.repeat(np.arange(1024)[:, None] * freqs[None], 2, axis=-1)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="xy"), 0).reshape(2, -1)
    ang = np.concatenate([cached[grid[0]], cached[grid[1]]], -1)
    cos, sin = np.cos(ang), np.sin(ang)

    def heads_first(v, n):
        return v.reshape(b, n, heads, dh).transpose(0, 2, 1, 3)

    def merge(o):
        return o.transpose(0, 2, 1, 3).reshape(b, -1, d_model)

    n_mod = 6 if kind == "c2i" else 9
    h_proj = None
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        mods = np.split(swiglu(pre + "adaLN_modulation", c), n_mod, -1)
        # self-attention
        hid = ln(tok, 1e-6) * (1 + mods[1]) + mods[0]
        qkv = lin(pre + "attn.qkv", hid)
        if cfg["distance_aware"]:
            qkv = qkv + lin(pre + "attn.qkv_d", delta)
        qkv = qkv.reshape(b, h * w, 3, heads, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        if cfg["qk_norm"]:
            q, k = ln(q, 1e-5, pre + "attn.q_norm"), ln(k, 1e-5, pre + "attn.k_norm")
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        tok = tok + mods[2] * lin(pre + "attn.proj", merge(attend(q, k, v)))
        if kind == "t2i":
            hid = ln(tok, 1e-6) * (1 + mods[4]) + mods[3]
            q = heads_first(lin(pre + "cross_attn.q", hid), h * w)
            kv = lin(pre + "cross_attn.kv", ln(y, 1e-6))
            kv = kv.reshape(b, y.shape[1], 2, heads, dh).transpose(2, 0, 3, 1, 4)
            k, v = kv
            if cfg["qk_norm"]:
                q = ln(q, 1e-5, pre + "cross_attn.q_norm")
                k = ln(k, 1e-5, pre + "cross_attn.k_norm")
            q = q * cos + rot(q) * sin
            tok = tok + mods[5] * lin(pre + "cross_attn.proj", merge(attend(q, k, v)))
        sh, sc, g = mods[-3:]
        tok = tok + g * swiglu(pre + "mlp", ln(tok, 1e-6) * (1 + sc) + sh)
        if i + 1 == cfg["encoder_depth"]:
            h_proj = lin("projector.4", _silu(lin("projector.2", _silu(lin("projector.0", tok)))))
    shift, scale = np.split(swiglu("final_layer.adaLN_modulation", c), 2, -1)
    out = lin("final_layer.linear", ln(tok, 1e-6) * (1 + scale) + shift)
    out = out.reshape(b, h, w, p, p, c_in).transpose(0, 5, 1, 3, 2, 4).reshape(b, c_in, hh, ww)
    return out, h_proj


# --------------------------------------------------------------------------------------------
# fixtures / helpers


def _nhwc(a):
    return jnp.asarray(a).transpose(0, 2, 3, 1)


def _rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny():
    """The official c2i_tiny fixture: config, state dict, io, our config + pure params."""
    from safetensors.numpy import load_file

    path = parity_path("c2i_tiny")
    cfg = json.loads((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    io = dict(np.load(path / "io.npz"))
    ours = model_config("c2i_tiny")
    for k, v in cfg.items():  # the preset IS the fixture's architecture
        assert ours[k] == v, k
    return dict(cfg=cfg, sd=sd, io=io, model_cfg=ours, pure=official_to_pure(sd))


def _forward(model_cfg, pure, x, t, r, cond, return_proj=True):
    graphdef, _ = abstract_model(model_cfg)
    params = params_from_pure_dict(model_cfg, pure)
    apply_fn = make_apply_fn(graphdef)
    fn = jax.jit(lambda p, x, t, r, c: apply_fn(p, x, t, r, c, return_proj=return_proj))
    return fn(params, x, t, r, cond)


def _case(io):
    return (_nhwc(io["case0/x"]), jnp.asarray(io["case0/t"]), jnp.asarray(io["case0/r"]),
            jnp.asarray(io["case0/y"], jnp.int32))


# --------------------------------------------------------------------------------------------
# official parity


def test_numpy_reference_matches_official_fixture(tiny):
    """Validates the numpy reference itself against the official PyTorch outputs."""
    io = tiny["io"]
    out, hp = np_official_forward(tiny["sd"], tiny["cfg"], io["case0/x"], io["case0/t"],
                                  io["case0/r"], io["case0/y"])
    assert _rel_err(out, io["case0/out"]) < 1e-5
    assert _rel_err(hp, io["case0/h_proj"]) < 1e-5


def test_c2i_parity_with_official(tiny, layouts):
    """F and h_proj equal the official fp32 outputs to 1e-5 of the output scale, with the CPU
    layouts and on the plain (GPU/TPU) path."""
    io = tiny["io"]
    out, hp = _forward(tiny["model_cfg"], tiny["pure"], *_case(io))
    assert out.dtype == jnp.float32 and hp.dtype == jnp.float32
    assert out.shape == _nhwc(io["case0/out"]).shape
    assert _rel_err(out, _nhwc(io["case0/out"])) < 1e-5
    assert _rel_err(hp, io["case0/h_proj"]) < 1e-5


def test_scan_layout_and_remat_match_list_layout(tiny):
    """scan_blocks=True (params stacked with stack_block_params) with remat gives the same F,
    h_proj and parameter gradients as the list layout (with the other remat flavour)."""
    io = tiny["io"]
    case = _case(io)
    stacked = stack_block_params(tiny["pure"])
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)
    back = unstack_block_params(stacked)  # layout round trip
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tiny["pure"])):
        np.testing.assert_array_equal(a, b)

    def value_and_grad(cfg, pure):
        graphdef, _ = abstract_model(cfg)
        apply_fn = make_apply_fn(graphdef)

        def loss(p):
            out, hp = apply_fn(p, *case, return_proj=True)
            return jnp.mean(out ** 2) + jnp.mean(hp ** 2), (out, hp)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params_from_pure_dict(cfg, pure))

    (_, (out_s, hp_s)), g_s = value_and_grad(
        model_config("c2i_tiny", scan_blocks=True, remat="dots_no_batch"), stacked)
    (_, (out_l, hp_l)), g_l = value_and_grad(model_config("c2i_tiny", remat="full"), tiny["pure"])
    for out, hp in ((out_s, hp_s), (out_l, hp_l)):
        assert _rel_err(out, _nhwc(io["case0/out"])) < 1e-5
        assert _rel_err(hp, io["case0/h_proj"]) < 1e-5
    g_s, g_l = nnx.to_pure_dict(g_s), stack_block_params(g_l)
    assert jax.tree.structure(g_s) == jax.tree.structure(g_l)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_l)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(g_s["blocks"]["attn"]["qkv_d"]["kernel"])).max() > 0


def test_bf16_compute_close_to_fp32(tiny):
    """bf16 matmuls: F stays float32 and within 3e-2 of the fp32 output scale."""
    io = tiny["io"]
    out, hp = _forward(model_config("c2i_tiny", dtype="bfloat16"), tiny["pure"], *_case(io))
    assert out.dtype == jnp.float32 and hp.dtype == jnp.float32
    assert _rel_err(out, _nhwc(io["case0/out"])) < 3e-2
    assert _rel_err(hp, io["case0/h_proj"]) < 3e-2


# --------------------------------------------------------------------------------------------
# RoPE grid order (non-square)


def test_rope_tables_follow_official_grid_order():
    """rope_tables(h, w) == direct numpy evaluation of rope.py for a non-square 4x2 token grid."""
    h, w, dh = 4, 2, 16
    half = dh // 2
    freqs = 1.0 / (10000 ** (np.arange(0, half, 2) / half))
    cached = np.repeat(np.arange(1024)[:, None] * freqs[None], 2, axis=-1)
    gx, gy = np.meshgrid(np.arange(h), np.arange(w), indexing="xy")   # torch meshgrid 'xy'
    grid = np.stack([gx, gy]).reshape(2, -1)
    ang = np.concatenate([cached[grid[0]], cached[grid[1]]], -1)
    cos, sin = R.rope_tables(h, w, dh)
    np.testing.assert_allclose(cos, np.cos(ang), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(ang), atol=1e-6)
    # the quirk: token k (row-major over h rows of w cols) gets (k mod h, k div h), which is NOT
    # (col, row) when h != w: token 2 = (row 1, col 0) gets g0 = 2, g1 = 0.
    g0, g1 = R.rope_grid(h, w)
    assert (g0[2], g1[2]) == (2, 0)
    np.testing.assert_array_equal(grid[0], g0)
    np.testing.assert_array_equal(grid[1], g1)


def test_non_square_latent_matches_numpy_reference(tiny):
    """An 8x4 latent (4x2 tokens) through the whole network equals the numpy official forward."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 4)).astype(np.float32)
    t, r, y = np.array([0.7, 0.3], np.float32), np.array([0.2, 0.3], np.float32), np.array([3, 10])
    ref_out, ref_hp = np_official_forward(tiny["sd"], tiny["cfg"], x, t, r, y)
    out, hp = _forward(tiny["model_cfg"], tiny["pure"], _nhwc(x), jnp.asarray(t), jnp.asarray(r),
                       jnp.asarray(y, jnp.int32))
    assert out.shape == (2, 8, 4, 4)
    assert _rel_err(out, _nhwc(ref_out)) < 1e-5
    assert _rel_err(hp, ref_hp) < 1e-5


# --------------------------------------------------------------------------------------------
# t2i


def _random_pure(model_cfg, seed):
    """Random params (non-zero everywhere, O(1) activations) in tim_jax layout."""
    _, abstract = abstract_model(model_cfg)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, v in nnx.to_flat_state(abstract):
        shape = v.shape
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            val = rng.standard_normal(shape) * (0.7 / math.sqrt(fan_in))
        elif path[-1] == "scale":
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "embedding":
            val = rng.standard_normal(shape)
        else:
            val = 0.1 * rng.standard_normal(shape)
        flat[path] = val.astype(np.float32)
    pure = {}
    for path, v in flat.items():
        d = pure
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = jnp.asarray(v)
    return pure


def test_t2i_forward_and_cross_attention_match_numpy_reference():
    """t2i_tiny with random weights: shapes, and F/h_proj equal the numpy official forward
    (self- + cross-attention with q-only RoPE, no mask) to 1e-5, on a non-square latent."""
    cfg = model_config("t2i_tiny")
    pure = _random_pure(cfg, 0)
    sd = pure_to_official(pure)
    assert "blocks.0.cross_attn.kv.weight" in sd and "y_embedder.mlp.fc1_g.weight" in sd
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 8, 4)).astype(np.float32)
    cap = rng.standard_normal((2, 5, cfg.cap_feat_dim)).astype(np.float32)
    t, r = np.array([0.9, 0.4], np.float32), np.array([0.1, 0.4], np.float32)
    off_cfg = {k: cfg[k] for k in ("patch_size", "hidden_size", "num_heads", "depth", "qk_norm",
                                   "use_new_embed", "new_condition", "distance_aware",
                                   "encoder_depth")}
    ref_out, ref_hp = np_official_forward(sd, off_cfg, x, t, r, cap, kind="t2i")
    out, hp = _forward(cfg, pure, _nhwc(x), jnp.asarray(t), jnp.asarray(r), jnp.asarray(cap))
    assert out.shape == (2, 8, 4, 4) and out.dtype == jnp.float32
    assert hp.shape == (2, 8, cfg.z_dim)
    assert np.abs(ref_out).max() > 0.1  # the check is not vacuous
    assert _rel_err(out, _nhwc(ref_out)) < 1e-5
    assert _rel_err(hp, ref_hp) < 1e-5


# --------------------------------------------------------------------------------------------
# init recipe


def _xavier_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_init_matches_official_recipe():
    """Zero-init adaLN fc2 / final layer (so F == 0 at init), xavier-uniform linears (fused fc1
    halves each with their own fans), N(0, 0.02) t-embedder / label table / caption SwiGLU,
    zero biases, LayerNorm scale 1."""
    cfg = model_config("t2i_tiny", depth=1)
    graphdef, params = init_params(cfg, 0)
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}
    d = 64
    for path, v in flat.items():
        name = "/".join(map(str, path))
        if path[-1] == "bias":
            assert not v.any(), name
        if "adaLN_modulation" in path and "fc2" in path:
            assert not v.any(), name
        if path[-1] == "scale":
            np.testing.assert_array_equal(v, 1.0)
    assert not flat[("final_layer", "linear", "kernel")].any()
    # xavier-uniform: qkv (64 -> 192); fused mlp fc1: each half (64 -> 170) with its own bound
    qkv = flat[("blocks", 0, "attn", "qkv", "kernel")]
    bound = _xavier_bound(d, 3 * d)
    assert np.abs(qkv).max() <= bound and abs(qkv.std() - bound / math.sqrt(3)) < 0.05 * bound
    fc1 = flat[("blocks", 0, "mlp", "fc1", "kernel")]
    hid = fc1.shape[1] // 2
    bound = _xavier_bound(d, hid)
    for half in (fc1[:, :hid], fc1[:, hid:]):
        assert np.abs(half).max() <= bound and abs(half.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert not np.allclose(fc1[:, :hid], fc1[:, hid:])
    # patch embedding: xavier on the (D, C*p*p) view
    pk = flat[("x_embedder", "proj", "kernel")]
    assert np.abs(pk).max() <= _xavier_bound(4 * 2 * 2, d)
    # N(0, 0.02): t_embedder (not delta_embedder), caption SwiGLU weights
    for path in [("t_embedder", "mlp", 0, "kernel"), ("t_embedder", "mlp", 2, "kernel"),
                 ("y_embedder", "mlp", "fc1", "kernel"), ("y_embedder", "mlp", "fc2", "kernel")]:
        assert abs(flat[path].std() - 0.02) < 0.002, path
    de = flat[("delta_embedder", "mlp", 0, "kernel")]
    assert np.abs(de).max() <= _xavier_bound(256, d) and de.std() > 0.04
    # F is exactly zero at init; h_proj is not
    apply_fn = make_apply_fn(graphdef)
    x = jnp.ones((2, 8, 8, 4))
    out, hp = jax.jit(lambda p: apply_fn(p, x, jnp.array([0.5, 0.2]), jnp.array([0.1, 0.2]),
                                         jnp.ones((2, 3, 48)), return_proj=True))(params)
    assert not np.asarray(out).any() and np.abs(np.asarray(hp)).max() > 0


def test_label_table_init_and_null_row():
    from tim_jax.models.c2i import LabelEmbedder

    table = np.asarray(LabelEmbedder(10, 64, 0.1, rngs=nnx.Rngs(0)).embedding_table.embedding[...])
    assert table.shape == (11, 64)  # 10 classes + null row
    assert abs(table.std() - 0.02) < 0.003
    m0 = nnx.eval_shape(lambda: build_model(
        model_config("c2i_tiny", class_dropout_prob=0.0), rngs=0))
    assert m0.y_embedder.embedding_table.embedding.shape == (10, 64)  # official: no null row


# --------------------------------------------------------------------------------------------
# conditioning variants, jvp


@pytest.mark.parametrize("new_condition", NEW_CONDITIONS)
def test_new_condition_interval_embedding(tiny, new_condition):
    """time_embeddings follows the official get_delta_embed for every new_condition."""
    cfg = model_config("c2i_tiny", new_condition=new_condition, depth=1, encoder_depth=1)
    m = nnx.eval_shape(lambda: build_model(cfg, rngs=0))  # abstract; the embedders get values:
    pure = tiny["pure"]
    nnx.update(m.t_embedder, nnx.State(pure["t_embedder"]))
    nnx.update(m.delta_embedder, nnx.State(pure["delta_embedder"]))
    t, r = jnp.array([0.9, 0.5]), jnp.array([0.3, 0.5])
    emb_t, delta = m.time_embeddings(t, r)
    T, D = m.t_embedder, m.delta_embedder
    want = {"t-r": D(t - r), "r": D(r), "t,r": T(t) + D(r), "t,t-r": T(t) + D(t - r),
            "r,t-r": T(r) + D(t - r), "t,r,t-r": T(t) + T(r) + D(t - r)}[new_condition]
    np.testing.assert_allclose(emb_t, T(t), rtol=1e-6)
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-6)
    # and the numpy official formula on the embeddings' own weights
    sd = pure_to_official({"t_embedder": pure["t_embedder"], "delta_embedder": pure["delta_embedder"]})
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)

    def np_emb(name, tt):
        a = np.asarray(tt, np.float64)[:, None] * freqs
        e = np.concatenate([np.cos(a), np.sin(a)], -1)
        hdn = e @ sd[f"{name}.mlp.0.weight"].T + sd[f"{name}.mlp.0.bias"]
        hdn = hdn / (1 + np.exp(-hdn))
        return hdn @ sd[f"{name}.mlp.2.weight"].T + sd[f"{name}.mlp.2.bias"]

    np.testing.assert_allclose(emb_t, np_emb("t_embedder", t), rtol=1e-4, atol=1e-5)


def test_jvp_through_model_matches_finite_difference(tiny):
    """jax.jvp of F w.r.t. (x_t, t, r) along (v, 1, 0) with impl='xla' ~ central difference."""
    io = tiny["io"]
    x, t, r, y = _case(io)
    graphdef, _ = abstract_model(tiny["model_cfg"])
    params = params_from_pure_dict(tiny["model_cfg"], tiny["pure"])
    apply_fn = make_apply_fn(graphdef)
    v = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)

    def f(xx, tt, rr):
        return apply_fn(params, xx, tt, rr, y)

    eps = 1e-3

    @jax.jit
    def both():
        with forward_mode():
            tangent = jax.jvp(f, (x, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))[1]
        fd = (f(x + eps * v, t + eps, r) - f(x - eps * v, t - eps, r)) / (2 * eps)
        return tangent, fd

    tangent, fd = both()
    assert _rel_err(tangent, fd) < 1e-2
    assert A.get_attention_impl("xla").supports_jvp


# --------------------------------------------------------------------------------------------
# input validation


def test_bad_inputs_raise(tiny):
    graphdef, _ = abstract_model(tiny["model_cfg"])
    params = params_from_pure_dict(tiny["model_cfg"], tiny["pure"])
    apply_fn = make_apply_fn(graphdef)
    t = jnp.array([0.5, 0.5])
    y = jnp.array([1, 2], jnp.int32)
    with pytest.raises(ValueError, match=r"H=9, W=8 .*patch_size=2"):
        apply_fn(params, jnp.zeros((2, 9, 8, 4)), t, t, y)
    with pytest.raises(ValueError, match="in_channels=4"):
        apply_fn(params, jnp.zeros((2, 8, 8, 3)), t, t, y)
    with pytest.raises(ValueError, match="NHWC"):
        apply_fn(params, jnp.zeros((2, 8, 8)), t, t, y)
    with pytest.raises(ValueError, match="integer class labels"):
        apply_fn(params, jnp.zeros((2, 8, 8, 4)), t, t, jnp.zeros((2,)))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        apply_fn(params, jnp.zeros((2, 8, 8, 4)), jnp.zeros((3,)), t, y)
    for field, value, msg in [("new_condition", "t+r", "new_condition='t\\+r'; allowed"),
                              ("attention_impl", "flash9", "attention_impl='flash9'; registered"),
                              ("dtype", "float16", "dtype='float16'; allowed"),
                              ("remat", "some", "remat='some'; allowed"),
                              ("encoder_depth", 4, "encoder_depth=4 must be in"),
                              ("num_heads", 3, "divisible by num_heads=3"),
                              ("matmul_precision", "max", "matmul_precision='max'")]:
        with pytest.raises(ValueError, match=msg):
            nnx.eval_shape(lambda: build_model(model_config("c2i_tiny", **{field: value}), rngs=0))
    with pytest.raises(ValueError, match="unknown model preset 'c2i_xxl'.*c2i_xl2_256"):
        model_config("c2i_xxl")
    t2i = model_config("t2i_tiny")
    g2, p2 = abstract_model(t2i)
    with pytest.raises(ValueError, match=r"\(B, M, cap_feat_dim\)"):
        nnx.eval_shape(lambda: nnx.merge(g2, p2)(jnp.zeros((2, 8, 8, 4)), t, t, jnp.zeros((2, 5, 7))))


def test_split_model_only_params_and_pure_dict_apply(tiny):
    m = nnx.eval_shape(lambda: build_model(tiny["model_cfg"], rngs=nnx.Rngs(3)))
    graphdef, abstract = split_model(m)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(abstract))
    # apply_fn accepts the nnx.State or the equivalent pure nested dict: both merge to the same
    params = params_from_pure_dict(tiny["model_cfg"], tiny["pure"])
    a, b = nnx.merge(graphdef, params), nnx.merge(graphdef, tiny["pure"])
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        assert pa == pb
        np.testing.assert_array_equal(va[...], vb[...])


# --------------------------------------------------------------------------------------------
# attention dispatch


def test_attention_impls_agree_with_numpy():
    rng = np.random.default_rng(0)  # numpy draws: eager jax.random compiles slowly on CPU
    q, tq = (jnp.asarray(rng.standard_normal((2, 3, 5, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, 3, 7, 8)), jnp.float32) for _ in range(2))
    s = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))

    @jax.jit
    def run(q, k, v):
        outs = {impl: A.attention(q, k, v, impl=impl) for impl in ("xla", "xla_softmax", "dot_product")}
        bf = A.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
        with forward_mode():
            jvps = [jax.jvp(lambda a, i=i: A.attention(a, k, v, impl=i), (q,), (tq,))[1]
                    for i in ("xla", "xla_softmax")]
        return outs, bf, jvps

    outs, bf, (j1, j2) = run(q, k, v)
    for impl, o in outs.items():
        np.testing.assert_allclose(o, ref, atol=2e-6, err_msg=impl)
    # bf16 inputs keep a bf16 output (fp32 softmax inside)
    assert bf.dtype == jnp.bfloat16 and np.abs(np.asarray(bf, np.float32) - ref).max() < 3e-2
    # jvp through the two plain-jnp impls agree
    np.testing.assert_allclose(j1, j2, atol=1e-5)


def _attention_ref64(q, k, v):
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


def test_fused_attention_gradient_matches_float64_reference():
    """The default ``xla`` attention has a hand-written backward (P kept from the forward pass,
    dS = P * (dP - rowsum(dO * O))): float32 gradients equal plain autodiff of the textbook
    softmax to 1e-5; bfloat16 ones (bf16 dq/dk/dv, the products in bf16) are within bf16
    accuracy of a float64 finite-difference-free reference (autodiff of the same math in
    float64 via numpy's exact formulas)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 10, 8)), jnp.float32) for _ in range(3))
    g = jnp.asarray(rng.standard_normal((2, 3, 10, 8)), jnp.float32)

    def textbook(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8), axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    _, vjp_ref = jax.vjp(textbook, q, k, v)
    _, vjp = jax.vjp(lambda *a: A.attention(*a, impl="xla"), q, k, v)
    for ours, ref in zip(jax.jit(vjp)(g), vjp_ref(g)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    q16, k16, v16, g16 = (x.astype(jnp.bfloat16) for x in (q, k, v, g))
    o16, vjp16 = jax.vjp(lambda *a: A.attention(*a, impl="xla"), q16, k16, v16)
    grads16 = jax.jit(vjp16)(g16)
    # float64 reference gradients on the bf16-rounded inputs (exact softmax-attention VJP)
    _, vjp64 = jax.vjp(textbook, *(x.astype(jnp.float32) for x in (q16, k16, v16)))
    refs = vjp64(g16.astype(jnp.float32))
    assert o16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o16, np.float32), _attention_ref64(q16, k16, v16),
                               atol=3e-2)
    for ours, ref in zip(grads16, refs):
        assert ours.dtype == jnp.bfloat16
        err = np.abs(np.asarray(ours, np.float32) - np.asarray(ref))
        assert err.max() <= 0.03 * np.abs(np.asarray(ref)).max() + 1e-2, err.max()


def _dot_operand_dtypes(hlo_text: str):
    """(lhs dtype, rhs dtype, op_name) of every dot in an optimized HLO module's text."""
    out = []
    for m in re.finditer(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", hlo_text):
        scope = hlo_text[hlo_text.rfind("\n%", 0, m.start()):m.start()]  # its computation

        def dtype(name):
            d = re.search(r"%" + re.escape(name) + r" = (\w+)\[", scope)
            return d.group(1) if d else "?"

        op = re.search(r'op_name="([^"]*)"', m.group(3))
        out.append((dtype(m.group(1)), dtype(m.group(2)), op.group(1) if op else ""))
    return out


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout rule")
def test_bf16_attention_dots_stay_bf16_in_the_backward(tiny):
    """Every attention product of the bf16 model's gradient is a bf16 x bf16 dot in the
    compiled program. The attention cotangent dO reaches the backward as a transpose of the
    output projection's input gradient; without ``attention._dp_product``'s split of the
    head dim XLA upcast ``dP = dO V^T`` to a float32 dot (10x slower on CPU)."""
    cfg = model_config("c2i_tiny", dtype="bfloat16")
    graphdef, _ = abstract_model(cfg)
    params = params_from_pure_dict(cfg, tiny["pure"])
    apply_fn = make_apply_fn(graphdef)
    x, t, r, y = _case(tiny["io"])
    grad = jax.jit(jax.grad(lambda p: jnp.mean(apply_fn(p, x, t, r, y) ** 2)))
    dots = _dot_operand_dtypes(grad.lower(params).compile().as_text())
    attn = [d for d in dots if re.search(r"\(bh\w*,bh\w*->bh\w*\)", d[2])]
    assert len(attn) >= 6 * cfg.depth, dots  # forward QK, PV; backward dP, dQ, dV, dK
    assert all(d[:2] == ("bf16", "bf16") for d in attn), [d for d in attn if "f32" in d[:2]]


def test_project_heads_equals_dense_then_head_split():
    """``project_heads`` (the heads-first qkv / kv / q projections) equals the fused Dense
    followed by the (parts, H, Dh) split and the heads-first transpose, with the per-sample
    bias offset added before rounding; in float32 its gradients equal plain autodiff's."""
    from tim_jax.models import attention_layers as AL
    from tim_jax.models import layers as Lm
    rng = np.random.default_rng(2)
    dense = Lm.Dense(8, 3 * 8, axes=(None, None), rngs=nnx.Rngs(0))
    dense.bias[...] = jnp.asarray(rng.standard_normal(24), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    off = jnp.asarray(rng.standard_normal((2, 1, 24)), jnp.float32)

    def reference(kernel, bias, x, off):
        y = x @ kernel + bias + off
        y = y.reshape(2, 5, 3, 2, 4).transpose(2, 0, 3, 1, 4)
        return [y[i] for i in range(3)]

    outs = AL.project_heads(dense, x, 3, 2, off)
    refs = reference(dense.kernel[...], dense.bias[...], x, off)
    for o, r in zip(outs, refs):
        assert o.shape == (2, 2, 5, 4)
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5)
    (q_only,) = AL.project_heads(Lm.Dense(8, 8, axes=(None, None), rngs=nnx.Rngs(1)), x, 1, 2)
    assert q_only.shape == (2, 2, 5, 4)

    w = [jnp.asarray(rng.standard_normal((2, 2, 5, 4)), jnp.float32) for _ in range(3)]

    def loss(fn, kernel, bias, x, off):
        return sum(jnp.sum(o * wi) for o, wi in zip(fn(kernel, bias, x, off), w))

    def ours(kernel, bias, x, off):  # a Dense stand-in holding traced arrays
        d = types.SimpleNamespace(kernel=kernel, bias=bias, dtype=dense.dtype,
                                  precision=dense.precision)
        return AL.project_heads(d, x, 3, 2, off)

    args = (dense.kernel[...], dense.bias[...], x, off)
    g_ref = jax.grad(lambda *a: loss(reference, *a), (0, 1, 2, 3))(*args)
    g_ours = jax.grad(lambda *a: loss(ours, *a), (0, 1, 2, 3))(*args)
    for go, gr in zip(g_ours, g_ref):
        np.testing.assert_allclose(go, gr, rtol=1e-5, atol=1e-5)


def test_attention_registry():
    assert {"xla", "xla_softmax", "dot_product", "cudnn"} <= set(attention_impls())
    with pytest.raises(ValueError, match="attention_impl='nope'; registered"):
        A.get_attention_impl("nope")
    with pytest.raises(ValueError, match="already registered"):
        A.register_attention("xla", supports_jvp=True)(lambda q, k, v, *, scale: q)

    @A.register_attention("test_double_v", supports_jvp=True, overwrite=True)
    def _impl(q, k, v, *, scale):
        return 2 * A.get_attention_impl("xla").fn(q, k, v, scale=scale)

    x = jnp.ones((1, 1, 2, 4))
    np.testing.assert_allclose(A.attention(x, x, x, impl="test_double_v"), 2 * x)
    # a model built with the new impl dispatches to it
    m = nnx.eval_shape(lambda: build_model(model_config("c2i_tiny", attention_impl="test_double_v"), rngs=0))
    assert m.blocks[0].attn.attention_impl == "test_double_v"
    with pytest.raises(ValueError, match="expects"):
        A.attention(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)))


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_on_gpu():
    """cuDNN fused attention (bf16) against the default 'xla' impl; runs only on a CUDA GPU."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 128, 64)), jnp.bfloat16) for _ in range(3))
    ref = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="xla"))(q, k, v)
    got = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="cudnn"))(q, k, v)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=2e-2)
