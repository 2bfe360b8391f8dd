"""DINOv2 REPA encoder (tim_jax.encoders.dinov2) and the torch-semantics resizes it uses,
against numbers from transformers 5.24 / torch 2.13 (fixtures: parity/dinov2_tiny,
parity/dinov2_tiny_interp, parity/resize; generators in parity/_make/).

Tolerances (fp32): encoder outputs max|diff| <= 1e-5 * max|ref| (the project's bar);
resizes max|diff| <= 1e-6 * max|ref| (two 4-tap float32 passes; torch and we differ only by
float32 rounding of the weights and sums, a few ulps).
"""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.encoders.dinov2 import Dinov2Encoder, parity_check, repa_size
from tim_jax.encoders.resize import resize_bicubic, resize_bilinear_align_corners

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
TINY = FIXTURES / "dinov2_tiny"
INTERP = FIXTURES / "dinov2_tiny_interp" / "io.npz"
RESIZE = FIXTURES / "resize" / "resize.npz"
NET_TOL = 1e-5
RESIZE_TOL = 1e-6


def rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nhwc(x):
    return jnp.asarray(x).transpose(0, 2, 3, 1)


@nnx.jit
def run(model, x):
    """The encoder forward, jitted (one compile instead of one per eager op)."""
    return model(x)


@nnx.jit(static_argnums=2)
def features(model, images, size):
    return model.patch_features(images, size=size)


@pytest.fixture(scope="module")
def model():
    return Dinov2Encoder.from_pretrained(TINY)


def test_parity_fixture_output(model):
    io = np.load(TINY / "io.npz")
    out = run(model, nhwc(io["pixel_values"]))
    assert out.shape == (2, 65, 32)
    assert rel_err(out, io["last_hidden_state"]) <= NET_TOL


def test_parity_check_report():
    report = parity_check(TINY)["last_hidden_state"]
    assert report["passed"] and report["max_rel_err"] <= NET_TOL
    assert report["max_abs_err"] >= 0 and report["tolerance"] == NET_TOL


@pytest.mark.parametrize("case", ["h48w40", "h50w42", "h20w36"])
def test_position_embedding_interpolation(model, case):
    io = np.load(INTERP)
    x = io[f"{case}/pixel_values"]
    h, w = x.shape[2:]
    pos = model.position_embeddings(h // 4, w // 4)
    assert rel_err(pos, io[f"{case}/position_embeddings"][0]) <= NET_TOL
    assert rel_err(run(model, nhwc(x)), io[f"{case}/last_hidden_state"]) <= NET_TOL


def test_repa_patch_features(model):
    io = np.load(INTERP)
    feats = features(model, nhwc(io["repa/images"]), int(io["repa/size"]))
    assert feats.shape == (2, 81, 32)
    assert rel_err(feats, io["repa/features"]) <= NET_TOL


def test_patch_features_default_size_and_frozen(model):
    assert (repa_size(256, 256), repa_size(512, 512)) == (224, 448)
    g = jax.jit(jax.grad(lambda x: model.patch_features(x, size=8).sum()))(jnp.ones((1, 8, 8, 3)))
    assert not np.any(np.asarray(g))                        # target: gradient stopped
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 0   # no trainable params
    with pytest.raises(ValueError, match="pass size="):
        model.patch_features(jnp.zeros((1, 64, 64, 3)))


def test_bfloat16_compute_close(model):
    io = np.load(TINY / "io.npz")
    bf = Dinov2Encoder.from_pretrained(TINY, dtype=jnp.bfloat16)
    out = run(bf, nhwc(io["pixel_values"]))
    assert out.dtype == jnp.float32     # final LayerNorm in float32
    assert rel_err(out, io["last_hidden_state"]) <= 5e-2


@pytest.mark.parametrize("mode", ["bicubic", "bilinear_ac"])
def test_resize_matches_torch(mode):
    data = np.load(RESIZE)
    names = sorted({k.rsplit("/", 1)[0] for k in data.files if k.startswith(mode + "/")})
    assert len(names) >= 3
    fn = resize_bicubic if mode == "bicubic" else resize_bilinear_align_corners
    for name in names:
        ref = data[f"{name}/y"]
        ours = np.asarray(fn(nhwc(data[f"{name}/x"]), ref.shape[2:])).transpose(0, 3, 1, 2)
        assert rel_err(ours, ref) <= RESIZE_TOL, name


def test_resize_identity_and_bad_input():
    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
    assert np.array_equal(np.asarray(resize_bicubic(x, (5, 6))), np.asarray(x))
    with pytest.raises(ValueError, match="H, W, C"):
        resize_bicubic(jnp.zeros((5, 6)), 3)
    with pytest.raises(ValueError, match=">= 1"):
        resize_bicubic(x, (0, 4))


def _copy_folder(tmp_path, edit_config=None, edit_weights=None):
    from safetensors.numpy import load_file, save_file
    out = tmp_path / "m"
    out.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(TINY / "model.safetensors"))
    if edit_weights:
        edit_weights(weights)
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_clear_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dinov2Encoder.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(TINY / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        Dinov2Encoder.from_pretrained(empty)
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        Dinov2Encoder.from_pretrained(
            _copy_folder(tmp_path, edit_config=lambda c: c.update(model_type="dinov2_with_registers")))


def test_missing_and_unused_weights_named(tmp_path):
    def edit(w):
        del w["encoder.layer.1.mlp.fc2.weight"]
        w["encoder.layer.2.norm1.weight"] = np.ones(32, np.float32)
    with pytest.raises(ValueError) as e:
        Dinov2Encoder.from_pretrained(_copy_folder(tmp_path, edit_weights=edit))
    msg = str(e.value)
    assert "missing weights: encoder.layer.1.mlp.fc2.weight" in msg
    assert "unused weights: encoder.layer.2.norm1.weight" in msg


def test_shape_mismatch_named(tmp_path):
    folder = _copy_folder(tmp_path, edit_config=lambda c: c.update(mlp_ratio=2))
    with pytest.raises(ValueError, match="mlp.fc1.weight.*shape"):
        Dinov2Encoder.from_pretrained(folder)


def test_bad_pixel_values(model):
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="smaller than one"):
        model(jnp.zeros((1, 2, 32, 3)))
