"""TiMPipeline (tim_jax.inference) on the tiny fixtures: the official c2i_tiny network with the
tiny SD-VAE, and a t2i network (random weights) with the tiny Gemma-3 and the tiny DC-AE.

Checks: preset inference from the official file; shapes at a non-square size; determinism per
seed and no recompilation on a repeated call; the same pictures on 1 device (batches of 2) as
on the 8 fake devices (one padded batch); the latents equal ``tim_jax.sampler.sample`` called
directly on the documented noise, and the pixels equal the codec's decode of them; tiled
decoding equals ``decode_tiled`` of the codec; the error messages; the EMA-export loader; the
training SampleHook decoding through ``config.sample.vae``; T2I end to end.

Tolerance for the latents: max |diff| <= 1e-5 * max |ref| (fp32, the project's bar; the two
sides run the same ops on different batch sizes / device counts). Pixels: a decoded value on a
uint8 rounding boundary may land one level apart, so pixels are compared to within 1 level.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tim_jax import sampler, transports
from tim_jax.encoders.autoencoder import load_autoencoder
from tim_jax.inference import TiMPipeline, load_network
from tim_jax.inference.images import to_uint8
from tim_jax.models import make_apply_fn

RTOL = 1e-5
LABELS = [1, 2, 9]
H, W = 16, 24          # pixels; tiny SD-VAE factor 2 x patch 2 -> steps of 4; latent 8 x 12
SETTINGS = dict(num_steps=2, cfg_scale=2.0, cfg_interval=(0.0, 0.7), height=H, width=W)


def fixture(name: str) -> Path:
    path = Path(__file__).parent / "fixtures" / "parity" / name
    if not path.is_dir():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


def _close(got, ref, what):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))))
    bound = RTOL * float(np.max(np.abs(ref)))
    assert err <= bound, f"{what}: max |diff| {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def c2i():
    return load_network(fixture("c2i_tiny") / "model.safetensors", dtype="float32")


@pytest.fixture(scope="module")
def sd_vae():
    return load_autoencoder(fixture("sd_vae_tiny"))


@pytest.fixture(scope="module")
def pipe8(c2i, sd_vae):
    assert jax.local_device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return TiMPipeline(c2i.model_config, c2i.graphdef, c2i.params, sd_vae,
                       transport=c2i.transport)


@pytest.fixture(scope="module")
def out8(pipe8):
    return pipe8(labels=LABELS, seed=0, **SETTINGS)


def test_official_file_preset_is_inferred(c2i):
    assert (c2i.preset, c2i.source_kind, c2i.model_config.kind) == ("c2i_tiny", "official", "c2i")
    assert isinstance(c2i.transport, transports.OT_FM)


def test_non_square_output(pipe8, out8):
    assert out8.images.shape == (3, H, W, 3) and out8.images.dtype == np.uint8
    assert out8.latents.shape == (3, H // 2, W // 2, 4) and out8.latents.dtype == np.float32
    assert [im.size for im in out8.pil()] == [(W, H)] * 3
    assert out8.labels == tuple(LABELS)
    assert out8.grid().shape == (2 * (H + 2) + 2, 2 * (W + 2) + 2, 3)
    assert pipe8.num_devices == 8 and out8.images.std() > 0


def test_deterministic_per_seed_without_recompiling(pipe8, out8):
    traces = pipe8.traces
    again = pipe8(labels=LABELS, seed=0, **SETTINGS)
    np.testing.assert_array_equal(again.latents, out8.latents)
    np.testing.assert_array_equal(again.images, out8.images)
    other = pipe8(labels=LABELS, seed=1, **SETTINGS)
    assert pipe8.traces == traces, "a repeated request must reuse the compiled sampler"
    assert np.abs(other.latents - out8.latents).max() > 0.1


def test_one_device_in_batches_of_two_gives_the_same_pictures(c2i, sd_vae, out8):
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    pipe1 = TiMPipeline(c2i.model_config, c2i.graphdef, c2i.params, sd_vae, mesh=mesh)
    out1 = pipe1(labels=LABELS, seed=0, batch_size=2, **SETTINGS)   # batches [0, 1], [2 + pad]
    assert pipe1.num_devices == 1
    _close(out1.latents, out8.latents, "1 device vs 8 devices")
    assert np.abs(out1.images.astype(int) - out8.images).max() <= 1


def test_latents_are_the_sampler_on_the_documented_noise(c2i, sd_vae, out8):
    shape = (H // 2, W // 2, 4)
    key = jax.random.key(0)
    z = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(3)])
    ref = sampler.sample(make_apply_fn(c2i.graphdef), c2i.params, z, jnp.asarray(LABELS),
                         jnp.int32(10), transport=transports.OT_FM(), num_steps=2,
                         cfg_scale=2.0, cfg_low=0.0, cfg_high=0.7)
    _close(out8.latents, ref, "pipeline latents vs sampler.sample")
    pixels = to_uint8(sd_vae.decode(out8.latents))
    assert np.abs(pixels.astype(int) - out8.images).max() <= 1


def test_tiled_decoding(pipe8, sd_vae, out8):
    from tim_jax.encoders.vae_tiling import decode_tiled

    saved = pipe8.tile_above, pipe8.tile, pipe8.tile_overlap
    pipe8.tile_above, pipe8.tile, pipe8.tile_overlap = 4, 8, 2     # latent 8 x 12 -> 2 tiles
    try:
        tiled = pipe8(labels=LABELS, seed=0, **SETTINGS)
    finally:
        pipe8.tile_above, pipe8.tile, pipe8.tile_overlap = saved
    np.testing.assert_array_equal(tiled.latents, out8.latents)
    ref = to_uint8(decode_tiled(sd_vae.decode, out8.latents, tile=8, overlap=2))
    assert tiled.images.shape == out8.images.shape
    assert np.abs(tiled.images.astype(int) - ref).max() <= 1


def test_size_errors_name_the_nearest_valid_sizes(pipe8):
    with pytest.raises(ValueError, match=r"multiples of 4 = VAE factor 2 x patch size 2.*"
                                         r"height 14 \(nearest valid: 12 or 16\)"):
        pipe8(labels=[1], height=14, width=W)
    with pytest.raises(ValueError, match=r"width 2 \(nearest valid: 4\)"):
        pipe8.make_request([1], height=H, width=2)


def test_request_errors(pipe8):
    with pytest.raises(ValueError, match=r"label\(s\) \[10\] outside the model's classes 0\.\.9"):
        pipe8.make_request([1, 10])
    with pytest.raises(ValueError, match="class-conditional .* not prompts"):
        pipe8.make_request(prompts=["a cat"])
    with pytest.raises(ValueError, match="low < high"):
        pipe8.make_request([1], cfg_interval=(0.7, 0.2))
    with pytest.raises(ValueError, match="num_steps"):
        pipe8.make_request([1], num_steps=0)
    with pytest.raises(ValueError, match="integers"):
        pipe8.make_request([1.5])


def test_mismatched_files_are_rejected():
    ckpt = fixture("c2i_tiny") / "model.safetensors"
    with pytest.raises(ValueError, match="8 latent channels .* in_channels=4"):
        TiMPipeline.from_pretrained(ckpt, fixture("dc_ae_tiny"), dtype="float32")
    with pytest.raises(ValueError, match="class-conditional"):
        TiMPipeline.from_pretrained(ckpt, fixture("sd_vae_tiny"), fixture("gemma3_tiny"))
    with pytest.raises(ValueError, match="kind='c2i' vs 't2i'"):
        TiMPipeline.from_pretrained(ckpt, fixture("sd_vae_tiny"), preset="t2i_tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TiMPipeline.from_pretrained(ckpt.with_name("absent.safetensors"), fixture("sd_vae_tiny"))


def test_ema_export_directory(c2i, tmp_path):
    import orbax.checkpoint as ocp
    from flax import nnx

    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(c2i.params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp_path / "ema_params").absolute(), pure)
    run = {"model": c2i.model_config.to_dict(),
           "transport": {"name": "OT_FM", "P_mean": -0.4, "T_max": 1.0, "w_gt": 1.0}}
    (tmp_path / "export.json").write_text(json.dumps({"step": 7, "decay": None, "config": run}))
    net = load_network(tmp_path, dtype="float32")
    assert net.source_kind == "ema_export" and net.transport.P_mean == -0.4
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(net.params), pure)


def test_sample_hook_decodes_through_the_vae(tmp_path):
    from tim_jax.training.metrics import SampleHook, save_image_grid

    cfg = ml_collections.ConfigDict(dict(
        every_steps=1, num_steps=(1,), num_images=2, cfg_scale=1.0, cfg_low=0.0, cfg_high=1.0,
        stochasticity_ratio=0.0, mode="transition", vae=str(fixture("sd_vae_tiny"))))
    def apply_fn(params, x, t, r, cond):    # a stand-in network: what is tested is the decode
        return params["w"] * x + cond[:, None, None, None]

    params = {"w": jnp.float32(0.3)}
    kw = dict(shape=(8, 8, 4), cond=np.array([1.0, -1.0], np.float32), null_cond=None, seed=0)
    hook = SampleHook(apply_fn, transports.OT_FM(), cfg, out_dir=str(tmp_path / "grids"), **kw)
    (path,) = hook(3, params)
    latents = np.asarray(hook._fn(params, hook._z, hook._cond, hook._null, hook._rng,
                                  num_steps=1))
    ref = save_image_grid(str(tmp_path / "ref.png"), np.asarray(hook.codec.decode(latents)))
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path)), ref)
    cfg.vae = str(fixture("dc_ae_tiny"))
    with pytest.raises(ValueError, match="8 latent channels but the samples have 4"):
        SampleHook(apply_fn, transports.OT_FM(), cfg, out_dir=str(tmp_path), **kw)


# ------------------------------------------------------------------------------------------
# T2I: random t2i network sized for the tiny Gemma (hidden 64) and the tiny DC-AE (8 channels)
@pytest.fixture(scope="module")
def t2i_parts():
    from tim_jax.encoders.gemma3 import Gemma3TextEncoder
    from tim_jax.encoders.text_encoder import load_tokenizer
    from flax import nnx, traverse_util

    from tim_jax.models import abstract_model, model_config, params_from_pure_dict

    cfg = model_config("t2i_tiny", cap_feat_dim=64, in_channels=8)
    graphdef, shapes = abstract_model(cfg)
    # random weights (the official init zeroes the output layers; and init_params is a long
    # compile): N(0, 0.05^2), norm scales 1 + N(0, 0.05^2)
    rng = np.random.default_rng(0)

    def fill(path, a):
        noise = 0.05 * rng.standard_normal(a.shape).astype(np.float32)
        return noise + np.float32(path[-1] == "scale")

    pure = traverse_util.unflatten_dict({k: fill(k, v) for k, v in traverse_util.flatten_dict(
        nnx.to_pure_dict(shapes)).items()})
    params = params_from_pure_dict(cfg, pure)
    enc = Gemma3TextEncoder.from_pretrained(fixture("gemma3_tiny"))
    tok = load_tokenizer(fixture("gemma3_tiny_tokenizer"))
    return cfg, graphdef, params, load_autoencoder(fixture("dc_ae_tiny")), enc, tok


def test_t2i_end_to_end(t2i_parts):
    from tim_jax.encoders.text_encoder import encode_prompts

    cfg, graphdef, params, dc_ae, enc, tok = t2i_parts
    pipe = TiMPipeline(cfg, graphdef, params, dc_ae, text_encoder=enc, tokenizer=tok)
    prompts = ["a photo of a dog", "blue sky"]           # token ids inside gemma3_tiny's 512
    req = pipe.make_request(prompts=prompts, num_steps=1, cfg_scale=2.5, height=16, width=8)
    assert pipe.guided_steps(req) == 0      # one step from t = T_max: never guided (official)
    out = pipe.run(req)
    assert out.images.shape == (2, 16, 8, 3) and out.images.dtype == np.uint8
    assert out.latents.shape == (2, 8, 4, 8) and np.isfinite(out.latents).all()
    assert np.abs(out.latents[0] - out.latents[1]).max() > 0.1
    feats, null = pipe.prompt_encoder(prompts)
    # the official features: each prompt at max_length, cut to the longest prompt (6 tokens,
    # BOS included); null: "" at max_length cut likewise (null_features; rows are independent,
    # so one batch with "" appended gives both, and the same compiled shape as the pipeline)
    ref, mask = encode_prompts(tok, enc, prompts + [""], cut_to_longest=False)
    length = int(mask[:2].sum(-1).max())
    assert length == 6 and feats.shape == (2, 6, 64) and null.shape == (1, 6, 64)
    np.testing.assert_allclose(feats, ref[:2, :6], rtol=0, atol=RTOL * np.abs(ref).max())
    np.testing.assert_allclose(null, ref[2:, :6], rtol=0, atol=RTOL * np.abs(ref).max())
    with pytest.raises(ValueError, match="outside the text encoder's vocabulary of 512"):
        pipe.make_request(prompts=["a red cat"])                  # 'cat' piece id 528
    with pytest.raises(ValueError, match="text-to-image .* give prompts"):
        pipe.make_request([1])


def test_t2i_text_encoder_must_fit_the_model(t2i_parts):
    from tim_jax.models import model_config

    _, _, _, dc_ae, enc, tok = t2i_parts
    with pytest.raises(ValueError, match="hidden size is 64 .* cap_feat_dim=48"):
        TiMPipeline(model_config("t2i_tiny", in_channels=8), None, None, dc_ae,
                    text_encoder=enc, tokenizer=tok)
    with pytest.raises(ValueError, match="needs a text encoder and a tokenizer"):
        TiMPipeline(model_config("t2i_tiny", cap_feat_dim=64, in_channels=8), None, None, dc_ae)
