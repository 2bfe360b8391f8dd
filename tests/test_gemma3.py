"""Gemma-3 text encoder and the official TiM caption path (tim_jax.encoders.gemma3 /
text_encoder) against transformers-made fixtures.

Tolerance: fp32 parity at valid positions, max |diff| <= 1e-5 * max |ref| (the project's bar).
"""
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tim_jax.encoders.gemma3 import Gemma3TextEncoder, make_encode_fn, parity_check, parse_config
from tim_jax.encoders.text_encoder import (encode_prompts, escape_caption, load_tokenizer,
                                           null_features)

RTOL = 1e-5  # of max |ref|


def fixture(name: str) -> Path:
    path = Path(__file__).parent / "fixtures" / "parity" / name
    if not path.is_dir():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


@pytest.fixture(scope="module")
def tiny():
    folder = fixture("gemma3_tiny")
    io = dict(np.load(folder / "io.npz"))
    return folder, io, Gemma3TextEncoder.from_pretrained(folder)


def _run(enc, ids, mask=None):
    """The encoder through its jitted pure path (one compile per shape; eager op-by-op
    dispatch is slow)."""
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    graphdef, params = nnx.split(enc)
    return np.asarray(make_encode_fn(graphdef)(params, ids, mask))


def _legacy_config(config: dict) -> dict:
    """The same architecture written the transformers 4.5x way."""
    legacy = {k: v for k, v in config.items()
              if k not in ("layer_types", "rope_parameters", "_sliding_window_pattern")}
    rp = config["rope_parameters"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    legacy.update(rope_theta=rp["full_attention"]["rope_theta"], rope_scaling=None,
                  rope_local_base_freq=rp["sliding_attention"]["rope_theta"],
                  sliding_window_pattern=2, transformers_version="4.52.4")
    return legacy


def _folder_with(tmp_path, config, weights=None, name="m"):
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    if weights is None:
        shutil.copy(fixture("gemma3_tiny") / "model.safetensors", out / "model.safetensors")
    else:
        save_file(weights, str(out / "model.safetensors"))
    return out


# ---------------------------------------------------------------- network parity

def test_parity_valid_positions(tiny):
    folder, io, enc = tiny
    res = parity_check(folder)
    assert res["n_valid"] == int(io["attention_mask"].sum())
    assert res["max_rel"] <= RTOL, res
    # the pure jitted path gives the same numbers
    graphdef, params = nnx.split(enc)
    out = np.asarray(make_encode_fn(graphdef)(params, jnp.asarray(io["input_ids"], jnp.int32),
                                              jnp.asarray(io["attention_mask"], jnp.int32)))
    valid = io["attention_mask"].astype(bool)
    ref = io["last_hidden_state"]
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out[valid] - ref[valid]).max() <= RTOL * np.abs(ref[valid]).max()


def test_both_config_forms_identical(tiny, tmp_path):
    folder, io, enc = tiny
    config = json.loads((folder / "config.json").read_text())
    legacy = _legacy_config(config)
    assert parse_config(legacy) == parse_config(config)
    enc_legacy = Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, legacy))
    a = _run(enc, io["input_ids"], io["attention_mask"])
    b = _run(enc_legacy, io["input_ids"], io["attention_mask"])
    np.testing.assert_array_equal(a, b)
    # the RoPE bases are read, not assumed: swapping them changes the output
    swapped = dict(legacy, rope_theta=10_000.0, rope_local_base_freq=1_000_000.0)
    enc_swapped = Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, swapped, name="s"))
    assert np.abs(_run(enc_swapped, io["input_ids"], io["attention_mask"]) - a).max() > 1e-3


def _np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + w)


def _np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def test_pad_positions_are_flash_attention_2_rows(tiny):
    """Pad query rows get a zero attention output (flash-attn-2 unpad/pad), so their feature is
    the pad embedding run through the MLP branches only: computed by hand here in numpy."""
    folder, io, enc = tiny
    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    eps = config["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][config["pad_token_id"]] * np.float32(
        np.sqrt(config["hidden_size"]))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = np.zeros(config["num_attention_heads"] * config["head_dim"]) @ w[
            p + "self_attn.o_proj.weight"].T
        h = h + _np_rms(attn, w[p + "post_attention_layernorm.weight"], eps)
        x = _np_rms(h, w[p + "pre_feedforward_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        m = (_np_gelu_tanh(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        h = h + _np_rms(m, w[p + "post_feedforward_layernorm.weight"], eps)
    expected = _np_rms(h, w["model.norm.weight"], eps)

    ids, mask = io["input_ids"], io["attention_mask"]
    out = _run(enc, ids, mask)
    pad = ~mask.astype(bool)
    assert pad.any()
    got = out[pad]  # (n_pad, hidden)
    assert np.abs(got - expected[None]).max() <= RTOL * np.abs(expected).max()
    # eager attention (io.npz) lets pad rows attend: different values, as documented
    assert np.abs(io["last_hidden_state"][pad] - expected[None]).max() > 1e-3
    # the valid positions do not see the pad positions, whatever tokens sit there
    ids2 = np.where(pad, 7, ids)
    out2 = _run(enc, ids2, mask)
    np.testing.assert_allclose(out2[~pad], out[~pad], rtol=0, atol=1e-6)


def _tiny_variant(tmp_path, name, n_layers=2, vocab=None, **changes):
    """The tiny fixture's weights (first ``n_layers`` layers; embedding rows appended with
    seeded numpy noise up to ``vocab``) under a changed config: no random init to run."""
    folder = fixture("gemma3_tiny")
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=n_layers, layer_types=config["layer_types"][:n_layers])
    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    if vocab is not None:
        emb = weights["model.embed_tokens.weight"]
        extra = np.random.default_rng(0).normal(0, emb.std(), (vocab - len(emb), emb.shape[1]))
        weights["model.embed_tokens.weight"] = np.concatenate([emb, extra.astype(np.float32)])
        config["vocab_size"] = vocab
    config.update(changes)
    return Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, config, weights, name))


def test_sliding_window_and_ignored_softcap(tmp_path):
    ids = np.array([[2, 11, 12, 13, 14, 15, 16, 17]], np.int32)
    ids_b = ids.copy()
    ids_b[0, 1] = 99  # change token 1
    # one sliding layer, window 3: positions >= 1 + 3 cannot see token 1
    enc = _tiny_variant(tmp_path, "s", 1, sliding_window=3)
    assert enc.spec.layer_types == ("sliding_attention",)
    d = np.abs(_run(enc, ids) - _run(enc, ids_b)).max(-1)[0]
    assert (d[1:4] > 1e-4).all() and (d[4:] == 0).all() and d[0] == 0, d
    enc_full = _tiny_variant(tmp_path, "f", 1, sliding_window=3, layer_types=["full_attention"])
    d = np.abs(_run(enc_full, ids) - _run(enc_full, ids_b)).max(-1)[0]
    assert (d[1:] > 1e-4).all() and d[0] == 0, d
    # transformers' Gemma3 attention never applies attn_logit_softcapping (checked with 5.24
    # eager: identical outputs with and without it); neither does this port
    capped = _tiny_variant(tmp_path, "c", 1, sliding_window=3, layer_types=["full_attention"],
                           attn_logit_softcapping=0.05)
    np.testing.assert_array_equal(_run(capped, ids), _run(enc_full, ids))


def test_bfloat16_compute(tiny):
    folder, io, enc = tiny
    enc16 = Gemma3TextEncoder.from_pretrained(folder, dtype=jnp.bfloat16)
    valid = io["attention_mask"].astype(bool)
    out = _run(enc16, io["input_ids"], io["attention_mask"])
    ref = io["last_hidden_state"]
    assert out.dtype == np.float32
    # bf16 has 8 mantissa bits; two layers of rounding stay within a few percent of the scale
    assert np.abs(out[valid] - ref[valid]).max() <= 5e-2 * np.abs(ref[valid]).max()


# ---------------------------------------------------------------- tokenizer and captions

def test_tokenizer_ids_equal_transformers():
    folder = fixture("gemma3_tiny_tokenizer")
    data = json.loads((folder / "ids.json").read_text())
    tok = load_tokenizer(folder)
    assert len(data["cases"]) >= 8
    for case in data["cases"]:
        text = escape_caption(case["caption"]) if case["escaped"] else case["caption"]
        assert text == case["text"]
        ids, mask = tok([text], data["max_length"])
        assert ids.dtype == np.int32 and ids.shape == (1, data["max_length"])
        assert ids[0].tolist() == case["input_ids"], case["text"][:40]
        assert mask[0].tolist() == case["attention_mask"], case["text"][:40]
    lengths = [sum(c["attention_mask"]) for c in data["cases"]]
    assert min(lengths) == 1 and max(lengths) == data["max_length"]  # null and truncated


def test_escape_caption_matches_official_codec():
    assert escape_caption('caf\u00e9\n\\ "x"') == 'caf\\xe9\\n\\\\ "x"'
    assert escape_caption("") == ""


@pytest.fixture(scope="module")
def caption_setup(tmp_path_factory):
    tok = load_tokenizer(fixture("gemma3_tiny_tokenizer"))
    vocab = tok.tokenizer.get_vocab_size()  # 577 > the tiny model's 512: widen its embedding
    enc = _tiny_variant(tmp_path_factory.mktemp("cap"), "m", vocab=vocab)
    return tok, enc


def test_encode_prompts_cut_and_null(caption_setup):
    tok, enc = caption_setup
    prompts = ["a photo of a cat", "", "a painting of a mountain lake at sunset, oil on canvas"]
    feats, mask = encode_prompts(tok, enc, prompts, max_length=32)
    ids, full_mask = tok([escape_caption(p) for p in prompts], 32)
    longest = int(full_mask.sum(-1).max())
    assert feats.shape == (3, longest, 64) and feats.dtype == np.float32
    np.testing.assert_array_equal(mask, full_mask[:, :longest])
    full = _run(enc, ids, full_mask)
    np.testing.assert_array_equal(feats, full[:, :longest])
    # causal + zero pad rows: running on the cut batch alone gives the same features
    np.testing.assert_allclose(_run(enc, ids[:, :longest], full_mask[:, :longest]),
                               feats, rtol=0, atol=1e-5)
    # the null condition: "" at max_length, cut to the batch's length, repeated
    null = null_features(tok, enc, longest, batch_size=3, max_length=32)
    assert null.shape == (3, longest, 64)
    np.testing.assert_allclose(null, np.repeat(feats[1:2], 3, 0), rtol=0, atol=1e-5)
    assert not np.allclose(null[0], feats[0], atol=1e-3)
    uncut, m = encode_prompts(tok, enc, prompts, max_length=32, cut_to_longest=False)
    assert uncut.shape == (3, 32, 64) and m.shape == (3, 32)
    # escaping happens before tokenising
    raw = "caf\u00e9 \u2014 ok"
    a, _ = encode_prompts(tok, enc, [raw], max_length=32)
    b, _ = encode_prompts(tok, enc, [escape_caption(raw)], max_length=32, escape=False)
    c, _ = encode_prompts(tok, enc, [raw], max_length=32, escape=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.allclose(a, c)


# ---------------------------------------------------------------- clear errors

def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*convert"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(fixture("gemma3_tiny_tokenizer"))
    with pytest.raises(TypeError):
        tok("one string", 16)


def test_loader_errors(tmp_path):
    folder = fixture("gemma3_tiny")
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model_type"):
        parse_config(dict(config, model_type="llama"))
    with pytest.raises(NotImplementedError, match="yarn"):
        parse_config(dict(config, rope_parameters={
            "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    with pytest.raises(NotImplementedError, match="bidirectional"):
        parse_config(dict(config, use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="layer_types"):
        parse_config(dict(config, layer_types=["sliding_attention"]))
    missing = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj"):
        Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, config, missing, "a"))
    extra = dict(weights, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match="not used.*q_proj.bias"):
        Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, config, extra, "b"))
    bad = dict(weights, **{"model.norm.weight": np.zeros(65, np.float32)})
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, config, bad, "c"))
    with pytest.raises(FileNotFoundError):
        Gemma3TextEncoder.from_pretrained(tmp_path / "absent")
    # keys without "model." and an lm_head are accepted
    renamed = {k[len("model."):]: v for k, v in weights.items()}
    renamed["lm_head.weight"] = weights["model.embed_tokens.weight"]
    enc = Gemma3TextEncoder.from_pretrained(_folder_with(tmp_path, config, renamed, "d"))
    with pytest.raises(ValueError, match="vocab_size"):
        enc(jnp.array([[2, 600]]), jnp.array([[1, 1]]))
