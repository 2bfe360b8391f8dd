"""AutoencoderDC (DC-AE) port: parity with diffusers on tests/fixtures/parity/dc_ae_tiny, the
bfloat16 option, jit, errors, and the real f32c32 architecture's shapes."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.encoders.dc_ae import AutoencoderDC, parity_check
from tim_jax.encoders.dc_ae_blocks import relu_linear_attention, relu_quadratic_attention

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "dc_ae_tiny"
FP32_TOL = 1e-5   # max|ours - ref| <= FP32_TOL * max|ref| (the project's fp32 bar)
BF16_TOL = 5e-2   # bf16 keeps 8 mantissa bits (~4e-3 per rounding), compounded over ~15 layers

# mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (same architecture as sana-1.0: diffusers'
# scripts/convert_dcae_to_diffusers.py, "dc-ae-f32c32-sana-1.0")
F32C32_SANA = {
    "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3] * 6,
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "encoder_out_shortcut": True,
    "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 0.41407,
}


def nhwc(a):
    return jnp.asarray(a).transpose(0, 2, 3, 1)


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def io():
    assert (FIXTURE / "io.npz").is_file(), f"parity fixture missing: {FIXTURE}"
    return dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def ae():
    return AutoencoderDC.from_pretrained(FIXTURE)


def test_fp32_parity_with_diffusers(ae):
    """parity_check runs encode and decode under nnx.jit against the diffusers outputs."""
    assert (ae.spatial_factor, ae.latent_channels, ae.scaling_factor) == (2, 8, 0.41407)
    report = parity_check(FIXTURE)
    assert set(report) == {"latent", "decoded"}
    for name, r in report.items():
        assert r["tolerance"] == FP32_TOL
        assert r["passed"] and r["max_rel_err"] <= FP32_TOL, (name, r)


def test_jit_through_split_merge(ae, io):
    graphdef, state = nnx.split(ae)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    latent = encode(state, nhwc(io["x"]))
    assert latent.shape == (2, 16, 16, 8) and latent.dtype == jnp.float32
    assert rel_err(latent, io["latent"]) <= FP32_TOL


def test_bfloat16_close(io):
    ae16 = AutoencoderDC.from_pretrained(FIXTURE, dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.float32
               for _, v in nnx.to_flat_state(nnx.state(ae16)))  # weights stay float32
    latent = nnx.jit(lambda m, x: m.encode(x))(ae16, nhwc(io["x"]))
    decoded = nnx.jit(lambda m, z: m.decode(z))(ae16, nhwc(io["z"]))
    assert latent.dtype == decoded.dtype == jnp.float32
    assert rel_err(latent, io["latent"]) <= BF16_TOL
    assert rel_err(decoded, io["decoded"]) <= BF16_TOL


def test_quadratic_form_equals_linear_form():
    """diffusers switches to the quadratic form when H*W <= attention_head_dim (the fixture's
    16x16 maps never do); both forms compute the same function."""
    rng = np.random.default_rng(0)
    shape = (2, 6, 3, 8)  # (B, N tokens, groups, head_dim)
    q, k = (np.maximum(rng.standard_normal(shape, np.float32), 0) for _ in range(2))
    v = rng.standard_normal(shape, np.float32)
    both = jax.jit(lambda q, k, v: (relu_quadratic_attention(q, k, v),
                                    relu_linear_attention(q, k, v)))
    quadratic, linear = both(q, k, v)
    np.testing.assert_allclose(quadratic, linear, rtol=1e-5, atol=1e-6)


def test_real_f32c32_shapes_without_weights():
    abstract = nnx.eval_shape(lambda: AutoencoderDC(F32C32_SANA))
    assert (abstract.spatial_factor, abstract.latent_channels) == (32, 32)
    assert abstract.scaling_factor == 0.41407
    graphdef, state = nnx.split(abstract)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    latent = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, x)
    assert latent.shape == (2, 8, 8, 32) and latent.dtype == jnp.float32
    image = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, latent)
    assert image.shape == (2, 256, 256, 3)
    small = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)  # 4x4 maps: quadratic form
    latent = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, small)
    assert latent.shape == (1, 4, 4, 32)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoencoderDC.from_pretrained(tmp_path / "nowhere")


def _edited_copy(tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(FIXTURE, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("field,value,match", [
    ("encoder_block_types", ["ResBlock", "AttnBlock"],
     r"encoder_block_types\[1\]='AttnBlock' is not supported.*EfficientViTBlock"),
    ("upsample_block_type", "bilinear", r"upsample_block_type='bilinear'.*interpolate"),
    ("decoder_norm_types", "layer_norm", r"decoder_norm_types\[0\]='layer_norm'.*batch_norm"),
    ("decoder_act_fns", ["silu"], r"decoder_act_fns has 1 entries, the config has 2 levels"),
    ("mystery_field", 1, r"unknown AutoencoderDC config fields \['mystery_field'\]"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderDC.from_pretrained(_edited_copy(tmp_path, **{field: value}))


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    # two blocks at level 1: the checkpoint lacks the second; no attention kernels: unused
    folder = _edited_copy(tmp_path, encoder_layers_per_block=[1, 2])
    with pytest.raises(ValueError, match=r"missing weights: encoder\.down_blocks\.1\.1\."):
        AutoencoderDC.from_pretrained(folder)
    folder = _edited_copy(tmp_path / "b", encoder_qkv_multiscales=[[], []])
    with pytest.raises(ValueError, match=r"unused weights: encoder\.down_blocks\.1\.0\.attn"):
        AutoencoderDC.from_pretrained(folder)


def test_bad_input_shapes(ae):
    with pytest.raises(ValueError, match=r"expected images \(B, H, W, 3\)"):
        ae.encode(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="not a multiple of the spatial factor 2"):
        ae.encode(jnp.zeros((1, 33, 32, 3)))
    with pytest.raises(ValueError, match=r"expected latents \(B, h, w, 8\)"):
        ae.decode(jnp.zeros((1, 8, 16, 16)))
