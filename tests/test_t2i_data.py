"""T2I data: captions encoded at preparation (tim_jax.data.captions, ``prepare --text-encoder``),
read back by data.source="arrayrecord" as the network's cond, trained with configs/t2i_xl1.py.

A captioned folder of 10 images goes through the tiny SD-VAE and the tiny Gemma-3 fixture
(embedding widened to the tiny tokenizer's 577 ids with seeded noise, as tests/test_gemma3.py
does). The reference is the official caption path of tim_jax.encoders.text_encoder
(``encode_prompts`` / ``null_features``, float32, run here on the same captions); its own parity
with transformers is tests/test_gemma3.py's. Tolerances:
  stored features (float16): |stored - ref| <= 2**-11 |ref| (float16 rounding) + 1e-5 max|ref|
  (the project's fp32 bar: the sharded batch-8 call vs encode_prompts' own batch);
  null caption (float32): |null - ref| <= 1e-5 max|ref|.
"""
import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from configs import t2i_xl1
from tim_jax import objective
from tim_jax.data import arrayrecord as ar
from tim_jax.data import pipeline, prepare, records
from tim_jax.encoders.gemma3 import Gemma3TextEncoder
from tim_jax.encoders.text_encoder import encode_prompts, load_tokenizer, null_features
from tim_jax.models import presets
from tim_jax.training import cli
from tim_jax.training import step as tstep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parity")
FAST = {"xla_backend_optimization_level": 0}
SIZE = 16  # pixels; the tiny SD-VAE halves it: 8 x 8 x 4 latents
CAPTIONS = ["a red cube on a wooden table", "", "café — naïve\nline two",
            "two dogs " * 12, "a cat", "blue sky over the sea at noon",
            "tab\tand \\backslash and \"quotes\"", "zwei Hündchen", "a", "the end of the list"]


def _fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.isdir(path):
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


def _tol(ref, rel):
    return rel * np.abs(ref) + 1e-5 * np.abs(ref).max()


def _wide_gemma(folder, vocab):
    """gemma3_tiny with its embedding widened to ``vocab`` rows (seeded noise), saved in folder."""
    src = _fixture("gemma3_tiny")
    config = json.load(open(os.path.join(src, "config.json")))
    weights = load_file(os.path.join(src, "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    extra = np.random.default_rng(0).normal(0, emb.std(), (vocab - len(emb), emb.shape[1]))
    weights["model.embed_tokens.weight"] = np.concatenate([emb, extra.astype(np.float32)])
    config["vocab_size"] = vocab
    os.makedirs(folder)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder


def _prepare(*argv):
    return prepare.main([str(a) for a in argv], compiler_options=FAST)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    rng = np.random.default_rng(0)
    lines = []
    for i, text in enumerate(CAPTIONS):
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((20 + i, 18), Image.Resampling.BILINEAR).save(
            root / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "caption": text}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    tok_dir = _fixture("gemma3_tiny_tokenizer")
    tok = load_tokenizer(tok_dir)
    enc_dir = _wide_gemma(str(root / "gemma"), tok.tokenizer.get_vocab_size())
    out = root / "records"
    args = ["--images", root, "--captions", root / "captions.jsonl",
            "--vae", _fixture("sd_vae_tiny"), "--size", SIZE, "--text-encoder", enc_dir,
            "--tokenizer", tok_dir, "--text-dtype", "float32", "--shards", 2,
            "--batch-size", 4, "--out", out]
    assert _prepare(*args) == 0
    enc = Gemma3TextEncoder.from_pretrained(enc_dir)
    ref, mask = encode_prompts(tok, enc, CAPTIONS, cut_to_longest=False)
    return dict(out=str(out), args=args, tok=tok, enc=enc, enc_dir=enc_dir, ref=ref, mask=mask,
                lengths=mask.sum(-1), dim=enc.spec.hidden_size)


def _records(out):
    """The decoded records in the global (record id) order."""
    src = grain.sources.ArrayRecordDataSource(records.shard_paths(out))
    return [records.decode_record(src[i]) for i in range(len(src))]


def _config(t2i):
    """configs/t2i_xl1.py with a tiny network whose cap_feat_dim is the records' hidden size."""
    config = t2i_xl1.get_config()
    config.model = presets.model_config("t2i_tiny", cap_feat_dim=t2i["dim"], depth=1,
                                        hidden_size=32, num_heads=2, lora_hidden_size=16,
                                        projector_dim=32, **presets.knobs_of(config.model))
    config.model.dtype = "float32"
    config.data.path = t2i["out"]
    config.data.global_batch_size = 8
    return config


def test_records_hold_the_official_caption_features(t2i):
    recs = {int(r["index"]): r for r in _records(t2i["out"])}
    ref, lengths = t2i["ref"], t2i["lengths"]
    assert sorted(recs) == list(range(len(CAPTIONS)))
    for i, text in enumerate(CAPTIONS):
        f = recs[i]["caption_features"]
        assert recs[i]["caption"] == text and recs[i]["label"] == -1
        assert f.dtype == np.float16 and f.shape == (lengths[i], t2i["dim"]), (i, f.shape)
        want = ref[i, :lengths[i]]
        assert (np.abs(f.astype(np.float32) - want) <= _tol(want, 2.0 ** -11)).all(), i
    assert lengths[1] == 1 and lengths.max() > 20  # "" is BOS alone; the long one is long
    man = records.read_manifest(t2i["out"])
    te = man["text_encoder"]
    assert te["hidden_size"] == t2i["dim"] and te["caption_max_tokens"] == lengths.max()
    assert (te["dtype"], te["max_length"], te["escape"]) == ("float32", 256, "unicode-escape")
    assert man["fields"]["caption_features"]["shape"] == [None, t2i["dim"]]


def test_null_caption_files_are_the_encoded_empty_prompt(t2i):
    full = np.load(os.path.join(t2i["out"], "null_caption_full.npy"))
    cut = np.load(os.path.join(t2i["out"], "null_caption.npy"))
    ref = null_features(t2i["tok"], t2i["enc"], 256)[0]
    assert full.dtype == np.float32 and full.shape == (256, t2i["dim"])
    assert (np.abs(full - ref) <= 1e-5 * np.abs(ref).max()).all()
    np.testing.assert_array_equal(cut, full[:t2i["lengths"].max()])
    # a rerun with the same arguments makes nothing and keeps the files
    assert _prepare(*t2i["args"]) == 0
    np.testing.assert_array_equal(np.load(os.path.join(t2i["out"], "null_caption.npy")), cut)


def test_batches_are_the_official_features_padded_with_pad_rows(t2i):
    config = _config(t2i)
    assert config.data.null_caption == os.path.join(t2i["out"], "null_caption.npy")
    source = ar.source_from_config(config)
    it = ar.make_arrayrecord_iterator(source, global_batch_size=8, seed=3, flip=False,
                                      with_ids=True)
    null = np.load(config.data.null_caption)
    length = len(null)
    recs = _records(t2i["out"])
    for _ in range(2):
        batch = next(it)
        cond = batch["cond"]
        assert cond.shape == (8, length, t2i["dim"]) and cond.dtype == np.float32
        rows = [recs[int(r)] for r in batch["record_id"]]
        idx = [int(r["index"]) for r in rows]  # caption i of CAPTIONS
        # the official input: this batch's captions encoded and cut to its longest prompt
        official, _ = encode_prompts(t2i["tok"], t2i["enc"], [CAPTIONS[i] for i in idx])
        cut = official.shape[1]
        assert (np.abs(cond[:, :cut] - official) <= _tol(official, 2.0 ** -11)).all()
        # beyond it: the encoder's pad-token feature (the same for every prompt and position)
        np.testing.assert_array_equal(cond[:, cut:],
                                      np.broadcast_to(null[cut:], cond[:, cut:].shape))
        np.testing.assert_array_equal(batch["x"], np.stack([r["latent"] for r in rows]))
        # no caption dropout in the data (the objective does it): real tokens are kept
        for row, i in enumerate(idx):
            if CAPTIONS[i]:
                assert np.abs(cond[row, 1] - null[1]).max() > 1e-3


def test_caption_dropout_is_ten_percent_deterministic_and_the_null_caption(t2i):
    config = _config(t2i)
    rate = tstep.make_objective_config(config).label_dropout
    assert rate == 0.1  # the official proportion_empty_prompts
    null = np.load(config.data.null_caption)
    feats = pipeline.make_source(config)[0]["cond"]
    cond = np.broadcast_to(feats, (5000,) + feats.shape)
    key = jax.random.key(7)
    dropped, mask = objective.drop_cond(key, cond, tstep.null_cond(config, null), rate)
    again, mask2 = objective.drop_cond(key, cond, tstep.null_cond(config, null), rate)
    mask, dropped = np.asarray(mask), np.asarray(dropped)
    assert abs(mask.mean() - 0.1) < 0.02  # binomial sd 0.0042 at n = 5000
    np.testing.assert_array_equal(mask, np.asarray(mask2))
    np.testing.assert_array_equal(dropped, np.asarray(again))
    np.testing.assert_array_equal(dropped[mask], np.broadcast_to(null, dropped[mask].shape))
    np.testing.assert_array_equal(dropped[~mask], cond[~mask])
    other = np.asarray(objective.drop_cond(jax.random.key(8), cond, null, rate)[1])
    assert not np.array_equal(mask, other)


def test_train_a_few_steps_from_the_records(t2i, tmp_path):
    """``python -m tim_jax.train --config configs/t2i_xl1.py --config.data.path=RECORDS`` with a
    tiny network (cap_feat_dim = the records' hidden size), one CPU device, XLA optimisation
    level 0 (a test-time saving)."""
    tiny = dict(depth=1, hidden_size=32, num_heads=2, lora_hidden_size=16, projector_dim=32,
                z_dim=32, encoder_depth=1, cap_feat_dim=t2i["dim"], patch_size=2, in_channels=4,
                input_size=8, dtype="float32")
    argv = [sys.executable, "-m", "tim_jax.train", "--config", "configs/t2i_xl1.py",
            "--workdir", str(tmp_path / "run"), f"--config.data.path={t2i['out']}",
            *(f"--config.model.{k}={v}" for k, v in tiny.items()),
            "--config.data.global_batch_size=8", "--config.train.num_steps=3",
            "--config.train.log_every=1", "--config.ckpt.every_steps=0",
            "--config.ckpt.async_save=False", "--config.sample.every_steps=0",
            "--config.log.tensorboard=False"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TIM_JAX_NO_REEXEC="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                         "--xla_backend_optimization_level=0")
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["frac_null_cond"] <= 1.0 for r in rows)


def test_cli_with_empty_data_path_fails_before_compiling(tmp_path, capsys):
    argv = ["tim_jax.train", "--config", os.path.join(ROOT, "configs", "t2i_xl1.py"),
            "--workdir", str(tmp_path / "w")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "null_caption.npy" in err, err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_bad_inputs_are_named(t2i, tmp_path):
    images, jsonl, vae = t2i["args"][1], t2i["args"][3], _fixture("sd_vae_tiny")
    for extra in (["--text-encoder", t2i["enc_dir"]],                 # without --captions
                  ["--captions", jsonl, "--tokenizer", t2i["enc_dir"]]):  # without --text-encoder
        with pytest.raises(SystemExit) as e:
            _prepare("--images", images, "--vae", vae, *extra, "--out", tmp_path / "x")
        assert e.value.code == 2
    # records without caption features
    bare = tmp_path / "bare"
    assert _prepare("--images", images, "--captions", jsonl, "--vae", vae, "--size", SIZE,
                    "--shards", 1, "--batch-size", 4, "--out", bare) == 0
    config = _config(t2i)
    config.data.path = str(bare)
    config.data.null_caption = os.path.join(t2i["out"], "null_caption.npy")
    with pytest.raises(ValueError, match="caption_features"):
        ar.source_from_config(config)
    # a null caption of another encoder, or of the wrong width / length
    config = _config(t2i)
    null = np.load(config.data.null_caption)
    for bad, match in ((null + 0.5, "BOS feature differs"), (null[:2], r"must be \(>= ")):
        np.save(tmp_path / "bad.npy", bad)
        config.data.null_caption = str(tmp_path / "bad.npy")
        with pytest.raises(ValueError, match=match):
            ar.source_from_config(config)
    config = _config(t2i)
    config.model.cap_feat_dim = t2i["dim"] + 1
    with pytest.raises(ValueError, match="cap_feat_dim"):
        ar.source_from_config(config)
