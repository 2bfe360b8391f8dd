"""RADIO REPA encoder (tim_jax.encoders.radio) against the official vendored RADIO of TiM
(fixture parity/radio_tiny, made by parity/_make/radio_tiny.py: random weights, converted with
tim_jax.encoders.radio_convert).

Tolerance (fp32): max|diff| <= 1e-5 * max|ref| (the project's bar) for the summary, the spatial
features (three input sizes: the stored grid and two interpolated grids) and the REPA target.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.encoders.radio import RadioEncoder, parity_check

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "radio_tiny"
TOL = 1e-5
CASES = ["h64w64", "h32w48", "h96w80"]


def rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nhwc(x):
    return jnp.asarray(x).transpose(0, 2, 3, 1)


@nnx.jit
def run(model, x):
    return model(x)


@nnx.jit(static_argnums=2)
def target(model, images, num_tokens):
    return model.patch_features(images, num_tokens=num_tokens)


@pytest.fixture(scope="module")
def model():
    return RadioEncoder.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def io():
    return np.load(FIXTURE / "io.npz")


@pytest.mark.parametrize("case", CASES)
def test_parity_summary_and_features(model, io, case):
    summary, features = run(model, nhwc(io[f"{case}/images"]))
    assert rel_err(summary, io[f"{case}/summary"]) <= TOL
    assert rel_err(features, io[f"{case}/features"]) <= TOL


def test_repa_target_as_official_trainer(model, io):
    feats = target(model, nhwc(io["repa/images"]), int(io["repa/num_tokens"]))
    assert feats.shape == (2, 9, 64)
    assert rel_err(feats, io["repa/features"]) <= TOL


def test_parity_check_report():
    report = parity_check(FIXTURE)
    assert set(report) == {f"{c}/{o}" for c in CASES for o in ("summary", "features")}
    assert all(r["passed"] and r["max_rel_err"] <= TOL for r in report.values())


def test_token_count_mismatch_names_both(model):
    imgs = jnp.zeros((1, 40, 40, 3))
    with pytest.raises(ValueError, match=r"RADIO gives 9 patch tokens .* but 16 tokens"):
        model.patch_features(imgs, size=48, num_tokens=16)
    with pytest.raises(ValueError, match="not a square"):
        model.patch_features(imgs, num_tokens=10)
    with pytest.raises(ValueError, match="pass size="):
        model.patch_features(imgs)


def test_bad_resolution_and_shape(model):
    with pytest.raises(ValueError, match="multiple of the patch size 16.*nearest supported"):
        model(jnp.zeros((1, 40, 48, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))


def test_frozen(model):
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 0
    g = jax.jit(jax.grad(lambda x: model.patch_features(x, size=16).sum()))(
        jnp.ones((1, 16, 16, 3)))
    assert not np.any(np.asarray(g))


def _folder(tmp_path, edit_config=None, edit_weights=None):
    from safetensors.numpy import load_file, save_file
    out = tmp_path / "radio"
    out.mkdir()
    cfg = json.loads((FIXTURE / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(FIXTURE / "model.safetensors"))
    if edit_weights:
        edit_weights(weights)
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RadioEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="radio_convert"):
        RadioEncoder.from_pretrained(_folder(tmp_path, lambda c: c.update(model_type="vit")))


def test_position_count_mismatch_named(tmp_path):
    folder = _folder(tmp_path, lambda c: c.update(max_grid=[5, 5]))
    with pytest.raises(ValueError, match="pos_embed holds 16 positions.*5x5 needs 25"):
        RadioEncoder.from_pretrained(folder)


def test_missing_and_unused_weights_named(tmp_path):
    def edit(w):
        del w["blocks.1.attn.proj.bias"]
        w["blocks.1.attn.norm.weight"] = np.ones(64, np.float32)
    with pytest.raises(ValueError) as e:
        RadioEncoder.from_pretrained(_folder(tmp_path, edit_weights=edit))
    assert "missing weights: blocks.1.attn.proj.bias" in str(e.value)
    assert "unused weights: blocks.1.attn.norm.weight" in str(e.value)


def test_converter_logic_without_torch():
    """radio_convert's config/key logic (the torch read itself ran when the fixture was made)."""
    from argparse import Namespace

    from tim_jax.encoders.radio_convert import radio_config, select_tensors
    from safetensors.numpy import load_file
    weights = load_file(str(FIXTURE / "model.safetensors"))
    state = {f"base_model.{k}": v for k, v in weights.items() if not k.startswith("input_")}
    state["base_model.norm.weight"] = np.ones(64, np.float32)
    state["_heads.clip.weight"] = np.ones((8, 64), np.float32)
    model_sd, extra, dropped = select_tensors(state, final_norm=False)
    assert "norm.weight" not in model_sd and set(dropped) == {"base_model.norm.weight",
                                                             "_heads.clip.weight"}
    teachers = [{"name": "clip"}, {"name": "dino_v2"}, {"name": "clip"},
                {"name": "sam", "use_summary": False}]
    args = Namespace(model="vit_base_patch16_224", model_kwargs={"num_heads": 2},
                     cpe_max_size=64, teachers=teachers, cls_token_per_teacher=True)
    cfg = radio_config(args, model_sd)
    expected = json.loads((FIXTURE / "config.json").read_text())
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "max_grid", "num_cls_tokens",
                "num_registers", "summary_idxs", "cpe_mode", "final_norm"):
        assert cfg[key] == expected[key], key
    with pytest.raises(ValueError, match="pos_embed holds 16 positions"):
        radio_config(Namespace(**{**vars(args), "cpe_max_size": 96}), model_sd)
    with pytest.raises(ValueError, match="num_heads="):
        radio_config(Namespace(**{**vars(args), "model": "my_vit", "model_kwargs": {}}), model_sd)
