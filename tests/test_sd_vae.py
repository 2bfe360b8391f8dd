"""SD-VAE (diffusers AutoencoderKL) port, TiM latent codec and tiled decoding.

Reference: tests/fixtures/parity/sd_vae_tiny (diffusers 0.42.1, torch 2.13 CPU fp32, random
weights): io.npz x (2,3,32,32) NCHW, posterior_mean/logvar (2,4,16,16), z, decoded.
fp32 tolerance: max|diff| <= 1e-5 * max|ref| (the project's bar).
"""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tim_jax.encoders import hub
from tim_jax.encoders.autoencoder import LatentCodec, load_autoencoder
from tim_jax.encoders.sd_vae import AutoencoderKL, SDVAEConfig, VAEWeight, parity_check
from tim_jax.encoders.vae_tiling import decode_tiled, tile_starts

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
SD = FIXTURES / "sd_vae_tiny"
FP32_REL = 1e-5
# bfloat16 keeps 8 mantissa bits (relative rounding ~2e-3 per op); over ~20 conv/norm layers
# the errors compound to ~1e-2 of the output scale (measured ~2e-2 max): bound 5e-2.
BF16_REL = 5e-2


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def hand_std(config: dict) -> np.float32:
    """The official wrappers' std: sqrt(running_var), running_var = float32(1) / sf**2; the
    running mean is 0 and shift_factor is not used."""
    var = np.float32(1.0) / np.float32(config["scaling_factor"] ** 2)
    return np.float32(np.sqrt(var))


@pytest.fixture(scope="module")
def io():
    assert (SD / "io.npz").is_file(), f"missing fixture {SD}"
    return dict(np.load(SD / "io.npz"))


@pytest.fixture(scope="module")
def codec():
    return load_autoencoder(SD)


def copy_fixture(tmp_path, edit_config=None, edit_weights=None) -> Path:
    """A copy of sd_vae_tiny (config/weights optionally edited)."""
    folder = tmp_path / "vae"
    folder.mkdir()
    config = hub.read_config(SD)
    if edit_config:
        edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
    if edit_weights is None:
        shutil.copy(SD / "diffusion_pytorch_model.safetensors", folder)
    else:
        from safetensors.numpy import save_file
        save_file(edit_weights(hub.read_weights(SD)),
                  str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


# -- network parity ------------------------------------------------------------------------
def test_parity_encode_moments_and_decode():
    report = parity_check(SD)
    assert set(report) == {"posterior_mean", "posterior_logvar", "decoded"}
    for name, r in report.items():
        assert r["max_rel_err"] <= FP32_REL, (name, r)
        assert r["passed"]


def _old_names(weights, as_conv=False):
    out = {}
    for k, v in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if as_conv and k.endswith(".weight"):
                    v = v[:, :, None, None]
        out[k] = v
    return out


@pytest.mark.parametrize("as_conv", [False, True], ids=["old_names", "old_names_1x1conv"])
def test_old_attention_key_names(tmp_path, as_conv):
    folder = copy_fixture(tmp_path, edit_weights=lambda w: _old_names(w, as_conv))
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in hub.read_weights(folder)
    old = nnx.to_flat_state(nnx.state(AutoencoderKL.from_pretrained(folder), VAEWeight))
    new = dict(nnx.to_flat_state(nnx.state(AutoencoderKL.from_pretrained(SD), VAEWeight)))
    assert len(old) == len(new) > 0
    for path, var in old:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(new[path][...]))
    # the attention projection really came from the renamed keys
    w = hub.read_weights(SD)["decoder.mid_block.attentions.0.to_out.0.weight"]
    k = dict(old)[("decoder", "mid_block", "attentions", 0, "to_out", 0, "kernel")]
    np.testing.assert_array_equal(np.asarray(k[...]), w.T)


def test_missing_and_unused_keys_are_listed():
    model = AutoencoderKL(SDVAEConfig.from_hub(hub.read_config(SD)))
    state = hub.read_weights(SD)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.bias.*decoder\.extra\.weight"):
        model.load_torch_state(state)


# -- codec: TiM normalisation ----------------------------------------------------------------
def test_codec_attributes(codec):
    config = hub.read_config(SD)
    assert isinstance(codec, LatentCodec) and codec.kind == "AutoencoderKL"
    assert codec.spatial_factor == 2 ** (len(config["block_out_channels"]) - 1) == 2
    assert codec.latent_channels == config["latent_channels"] == 4
    assert codec.stochastic
    np.testing.assert_array_equal(codec.mean, np.zeros(4, np.float32))
    np.testing.assert_array_equal(codec.std, np.full(4, hand_std(config)))


def test_codec_round_trip_against_official_formulas(codec, io):
    std = hand_std(hub.read_config(SD))          # 1 / 0.18215, float32
    lat = np.asarray(codec.encode(nhwc(io["x"]), sample=False))
    ref = nhwc(io["posterior_mean"]) / std        # (mean - 0) / std
    assert lat.dtype == np.float32 and lat.shape == (2, 16, 16, 4)
    assert rel_err(lat, ref) <= FP32_REL
    images = np.asarray(codec.decode(nhwc(io["z"]) / std))   # latents * std + 0 = z
    assert images.shape == (2, 32, 32, 3)
    assert rel_err(images, nhwc(io["decoded"])) <= FP32_REL


def test_codec_encode_samples_the_posterior(codec, io):
    x = nhwc(io["x"])
    with pytest.raises(ValueError, match="key"):
        codec.encode(x)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    a, b, c = (np.asarray(codec.encode(x, k)) for k in (k0, k0, k1))
    np.testing.assert_array_equal(a, b)            # deterministic per key
    assert np.abs(a - c).max() > 0.1               # other key, other draw
    std = hand_std(hub.read_config(SD))
    mean, logvar = nhwc(io["posterior_mean"]), nhwc(io["posterior_logvar"])
    noise = np.asarray(jax.random.normal(k0, mean.shape, jnp.float32))
    # z = mean + exp(0.5 * logvar) * eps with the torch reference moments
    assert rel_err(a * std, mean + np.exp(0.5 * logvar) * noise) <= FP32_REL
    eps = (a * std - mean) / np.exp(0.5 * logvar)  # 2048 standard normal draws
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1.0) < 0.1


def test_shift_factor_is_ignored_as_in_official(tmp_path):
    folder = copy_fixture(tmp_path, edit_config=lambda c: c.update(shift_factor=0.5))
    config = hub.read_config(folder)
    codec = LatentCodec(AutoencoderKL(SDVAEConfig.from_hub(config)), kind="AutoencoderKL",
                        spatial_factor=2, latent_channels=4,
                        scaling_factor=config["scaling_factor"])
    np.testing.assert_array_equal(codec.mean, 0.0)
    np.testing.assert_array_equal(codec.std, hand_std(config))


def test_bfloat16_option(io):
    model = AutoencoderKL.from_pretrained(SD, dtype=jnp.bfloat16)
    mean, logvar = model.encode_moments(jnp.asarray(nhwc(io["x"])))
    decoded = model.decode(jnp.asarray(nhwc(io["z"])))
    assert mean.dtype == decoded.dtype == jnp.float32
    assert rel_err(mean, nhwc(io["posterior_mean"])) <= BF16_REL
    assert rel_err(logvar, nhwc(io["posterior_logvar"])) <= BF16_REL
    assert rel_err(decoded, nhwc(io["decoded"])) <= BF16_REL


# -- DC-AE dispatch (with a stand-in network: the real port lives in dc_ae.py) -------------------
class _FakeDC(nnx.Module):
    def __init__(self):
        self.scale = VAEWeight(jnp.float32(2.0))

    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32):
        return cls()

    def encode(self, x):      # (B, H, W, 3) -> (B, H/2, W/2, 8)
        return jnp.tile(x[:, ::2, ::2, :1], (1, 1, 1, 8)) * self.scale[...]

    def decode(self, z):
        return jnp.repeat(jnp.repeat(z[..., :3], 2, axis=1), 2, axis=2)


def test_dc_ae_dispatch_and_normalisation(monkeypatch):
    fake = types.ModuleType("tim_jax.encoders.dc_ae")
    fake.AutoencoderDC = _FakeDC
    monkeypatch.setitem(sys.modules, "tim_jax.encoders.dc_ae", fake)
    config = hub.read_config(FIXTURES / "dc_ae_tiny")
    codec = load_autoencoder(FIXTURES / "dc_ae_tiny")
    assert codec.kind == "AutoencoderDC" and not codec.stochastic
    assert codec.spatial_factor == 2 ** (len(config["encoder_block_out_channels"]) - 1)
    assert codec.latent_channels == config["latent_channels"]
    x = np.linspace(-1, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    std = hand_std(config)
    lat = np.asarray(codec.encode(x))              # deterministic, no key needed
    np.testing.assert_allclose(lat, np.tile(x[:, ::2, ::2, :1], (1, 1, 1, 8)) * 2 / std,
                               rtol=1e-6)
    out = np.asarray(codec.decode(lat))
    np.testing.assert_allclose(out, np.repeat(np.repeat(lat[..., :3] * std, 2, 1), 2, 2),
                               rtol=1e-6)


# -- errors --------------------------------------------------------------------------------
def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(tmp_path / "absent")
    folder = copy_fixture(tmp_path, edit_config=lambda c: c.update(_class_name="VQModel"))
    with pytest.raises(ValueError, match=r"VQModel.*AutoencoderKL.*AutoencoderDC"):
        load_autoencoder(folder)
    with pytest.raises(ValueError, match=r"AttnDownEncoderBlock2D.*DownEncoderBlock2D"):
        SDVAEConfig.from_hub({**hub.read_config(SD), "down_block_types":
                              ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="up_block_types"):
        SDVAEConfig.from_hub({**hub.read_config(SD), "up_block_types": ["UpBlock2D"] * 2})
    codec = LatentCodec(AutoencoderKL(SDVAEConfig.from_hub(hub.read_config(SD))),
                        kind="AutoencoderKL", spatial_factor=2, latent_channels=4,
                        scaling_factor=0.18215)
    with pytest.raises(ValueError, match="multiple"):
        codec.encode(np.zeros((1, 31, 32, 3), np.float32), sample=False)
    with pytest.raises(ValueError, match="NHWC"):
        codec.encode(np.zeros((1, 3, 32, 32), np.float32), sample=False)


# -- tiled decoding ---------------------------------------------------------------------------
def test_tile_starts():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(28, 12, 4) == [0, 8, 16]
    assert tile_starts(30, 12, 4) == [0, 8, 16, 18]


def _local_decode(z):
    """A local stand-in decoder (f = 4): x4 nearest upsampling, then each pixel averages the 3x3
    neighbouring latent cells (zero outside). An output pixel depends only on latent cells within
    1 of its own, so a tiled decode equals the untiled one wherever no interior tile edge is
    within 1 latent cell."""
    up = jnp.repeat(jnp.repeat(jnp.tanh(z[..., :3]), 4, axis=1), 4, axis=2)
    pad = jnp.pad(up, ((0, 0), (4, 4), (4, 4), (0, 0)))
    h, w = up.shape[1:3]
    return sum(pad[:, 4 + dy:4 + dy + h, 4 + dx:4 + dx + w]
               for dy in (-4, 0, 4) for dx in (-4, 0, 4)) / 9.0


def test_tiled_decode_local_decoder_matches_untiled():
    z = jax.random.normal(jax.random.key(3), (2, 28, 30, 4))
    decode = jax.jit(_local_decode)
    full = np.asarray(decode(z))
    tiled = decode_tiled(decode, z, tile=12, overlap=4)
    assert tiled.shape == full.shape == (2, 112, 120, 3)
    # interior pixels: >= 1 latent cell (4 px) from every interior tile edge
    f, mask = 4, np.ones(full.shape[1:3], bool)
    for axis, length in ((0, 28), (1, 30)):
        for s in tile_starts(length, 12, 4):
            for edge in (s, s + 12):
                if 0 < edge < length:
                    sl = [slice(None), slice(None)]
                    sl[axis] = slice((edge - 1) * f, (edge + 1) * f)
                    mask[tuple(sl)] = False
    assert mask.mean() > 0.3
    np.testing.assert_allclose(tiled[:, mask], full[:, mask], atol=1e-6)
    # at the tile edges the zero padding of a tile is blended in: bounded by the data scale
    assert np.abs(tiled - full).max() <= np.abs(full).max()


def test_tiled_decode_of_the_vae(codec, io):
    """The tiny VAE (f = 2) on the fixture latent (16x16; same shapes as the round-trip test,
    so no extra compile for the untiled decode): tiles 8 with overlap 4, starts 0, 4, 8. Away
    from seams each pixel is exactly its tile's decode; in an overlap a convex blend of the
    tiles there; the whole stays close to the untiled decode (GroupNorm statistics and the
    mid-block attention are computed per tile, so exact equality is not expected)."""
    z = nhwc(io["z"]) / hand_std(hub.read_config(SD))
    tiled = decode_tiled(codec.decode, z, tile=8, overlap=4)
    full = np.asarray(codec.decode(z))
    assert tiled.shape == full.shape == (2, 32, 32, 3)
    starts = tile_starts(16, 8, 4)
    assert starts == [0, 4, 8]
    tiles = {(r, c): np.asarray(codec.decode(z[:, r:r + 8, c:c + 8]))
             for r in starts for c in starts}
    f = 2
    # tile (0, 0) alone covers latent rows/cols [0, 4): exact
    np.testing.assert_allclose(tiled[:, :4 * f, :4 * f], tiles[0, 0][:, :4 * f, :4 * f],
                               rtol=0, atol=1e-6)
    # rows [4, 8) x cols [0, 4) are shared by tiles (0, 0) and (4, 0) only
    a = tiles[0, 0][:, 4 * f:8 * f, :4 * f]
    b = tiles[4, 0][:, :4 * f, :4 * f]
    seam = tiled[:, 4 * f:8 * f, :4 * f]
    assert np.all(seam >= np.minimum(a, b) - 1e-6) and np.all(seam <= np.maximum(a, b) + 1e-6)
    assert np.abs(seam - a).max() > 1e-3 and np.abs(seam - b).max() > 1e-3   # really blended
    # sanity: the same picture as the untiled decode. With random weights and tiles half the
    # latent, per-tile GroupNorm statistics differ much (measured correlation 0.91 at tile 8,
    # 0.99 at tile 12), hence only a loose bound.
    assert np.corrcoef(tiled.ravel(), full.ravel())[0, 1] > 0.8


def test_tiled_decode_single_tile_is_untiled(codec, io):
    z = nhwc(io["z"])[:, :8, :8]
    np.testing.assert_allclose(decode_tiled(codec.decode, z, tile=16, overlap=4),
                               np.asarray(codec.decode(z)), rtol=0, atol=0)
