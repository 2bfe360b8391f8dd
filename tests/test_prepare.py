"""python -m tim_jax.prepare (tim_jax.data.prepare*) and the record format (tim_jax.data.records).

Tiny inputs made here (28 files in 3 class folders: corrupt, truncated, grayscale, palette, RGBA,
CMYK, smaller than the crop) through the tiny SD-VAE fixture (spatial factor 2, 4 channels).
The references are computed here, independently of the pipeline: the ADM centre crop with PIL,
pixels to [-1, 1], and ``codec.encode`` of one crop at a time with the documented per-record key
``split(fold_in(key(seed), index))``. Stored latents are float16: tolerance
|stored - ref| <= 2**-11 |ref| (float16 rounding) + 1e-5 max|ref| (the project's fp32 bar, for
the batched / sharded vs single-image fp32 computation).

The jitted functions here and in the pipeline compile with XLA optimisation level 0 (a test-time
saving; it does not change what is computed).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tim_jax.data import prepare, prepare_shards, records
from tim_jax.data.prepare_images import native_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parity")
SD_VAE = os.path.join(FIXTURES, "sd_vae_tiny")
DC_AE = os.path.join(FIXTURES, "dc_ae_tiny")
FAST = {"xla_backend_optimization_level": 0}
SIZE = 32


def _fixture(path):
    if not os.path.isdir(path):
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


def _smooth(rng, w, h):
    """A smooth random RGB image (compresses like a photo)."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def _make_folder(root):
    """28 image files (26 readable) in 3 classes, plus a non-image file that is not listed."""
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (64, 64), (100, 60), (40, 72), (37, 53), (80, 45), (33, 90)]
    for c, cls in enumerate(("cat", "dog", "eel")):
        os.makedirs(os.path.join(root, cls))
        for j, (w, h) in enumerate(sizes):
            ext = ".JPEG" if (c + j) % 2 else ".png"
            _smooth(rng, w + c, h).save(os.path.join(root, cls, f"img{j}{ext}"))
    img = _smooth(rng, 50, 40)
    img.convert("L").save(os.path.join(root, "cat", "gray.png"))
    img.convert("P").save(os.path.join(root, "dog", "palette.png"))
    rgba = np.concatenate([np.asarray(img), rng.integers(0, 256, (40, 50, 1), np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(root, "dog", "rgba.png"))
    img.convert("CMYK").save(os.path.join(root, "eel", "cmyk.jpg"), "JPEG")
    _smooth(rng, 20, 14).save(os.path.join(root, "eel", "small.png"))
    with open(os.path.join(root, "cat", "corrupt.jpg"), "wb") as f:
        f.write(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    full = os.path.join(root, "eel", "full.jpg")
    _smooth(rng, 64, 64).save(full, quality=95)
    data = open(full, "rb").read()
    os.remove(full)
    with open(os.path.join(root, "dog", "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(root, "eel", "notes.txt"), "w") as f:
        f.write("not an image")


def _run(*argv):
    return prepare.main([str(a) for a in argv], compiler_options=FAST)


def _read_all(out):
    import grain.python as gp

    src = gp.ArrayRecordDataSource(records.shard_paths(out))
    return [records.decode_record(src[i]) for i in range(len(src))]


def _mtimes(out):
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in sorted(os.listdir(out))}


def _ref_crop(path, size):
    """ADM centre crop, written out here from guided-diffusion's center_crop_arr."""
    img = Image.open(path).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.Resampling.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


@pytest.fixture(scope="module")
def codec():
    from tim_jax.encoders.autoencoder import load_autoencoder

    return load_autoencoder(_fixture(SD_VAE))


@pytest.fixture(scope="module")
def ref_encode(codec):
    fn = jax.jit(codec.encode_fn, static_argnums=3, compiler_options=FAST)

    def encode(crop_u8, index, seed=0, which=0):
        x = (crop_u8.astype(np.float32) / 255.0 - 0.5) / 0.5
        key = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))[which]
        return np.asarray(fn(codec.params, x[None], key, True))[0]
    return encode


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("images"))
    _make_folder(root)
    return root


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records") / "sdvae")
    assert _run("--images", images, "--vae", _fixture(SD_VAE), "--size", SIZE, "--out", out,
                "--shards", 4, "--batch-size", 8, "--keep-images", "--workers", 2) == 0
    return out


def _close(stored, ref):
    err = np.abs(stored.astype(np.float32) - ref)
    bound = 2.0 ** -11 * np.abs(ref) + 1e-5 * np.abs(ref).max()
    assert np.all(err <= bound), f"max err {err.max()}, max|ref| {np.abs(ref).max()}"


def test_manifest_counts_and_skipped(prepared):
    m = records.read_manifest(prepared)
    assert m["format"] == "tim_jax.latents" and m["version"] == 1
    assert m["num_inputs"] == 28 and m["num_records"] == 26
    assert [s["file"] for s in m["shards"]] == [records.shard_file_name(s, 4) for s in range(4)]
    assert sum(s["num_records"] for s in m["shards"]) == 26
    assert {s["key"] for s in m["skipped"]} == {"cat/corrupt.jpg", "dog/truncated.jpg"}
    assert all(s["reason"].startswith("unreadable image") for s in m["skipped"])
    conv = {c["key"]: c["note"] for c in m["converted"]}
    assert conv == {"cat/gray.png": "converted L to RGB", "dog/palette.png": "converted P to RGB",
                    "dog/rgba.png": "converted RGBA to RGB", "eel/cmyk.jpg":
                    "converted CMYK to RGB"}
    assert [(u["key"], u["size"]) for u in m["upsampled"]] == [("eel/small.png", [20, 14])]
    assert m["class_names"] == ["cat", "dog", "eel"] and m["num_classes"] == 3
    assert m["latent_shape"] == [16, 16, 4] and m["native"] is False and m["image_size"] == 32
    assert m["fields"]["latent"] == {"kind": "array", "dtype": "float16", "shape": [16, 16, 4]}
    assert m["fields"]["label"]["kind"] == "int" and m["fields"]["image"]["kind"] == "bytes"
    assert m["vae"]["spatial_factor"] == 2 and m["vae"]["class_name"] == "AutoencoderKL"
    assert m["normalisation"]["posterior"] == "sample" and m["normalisation"]["seed"] == 0
    np.testing.assert_allclose(m["normalisation"]["std"], [1 / 0.18215] * 4, rtol=1e-6)


def test_records_match_reference_encode(prepared, images, ref_encode):
    recs = _read_all(prepared)
    assert len(recs) == 26
    labels = {"cat": 0, "dog": 1, "eel": 2}
    order = [r["index"] for r in recs]  # shard s holds indices = s (mod 4), ascending
    assert order == sorted(order, key=lambda i: (i % 4, i))
    for r in recs:
        assert r["latent"].dtype == np.float16 and r["latent"].shape == (16, 16, 4)
        assert r["latent_flip"].shape == (16, 16, 4)
        assert r["label"] == labels[r["key"].split("/")[0]]
    for r in recs[::3] + [x for x in recs if x["key"] in ("eel/cmyk.jpg", "eel/small.png")]:
        crop = _ref_crop(os.path.join(images, r["key"]), SIZE)
        np.testing.assert_array_equal(np.asarray(Image.open(
            __import__("io").BytesIO(r["image"]))), crop)  # --keep-images: lossless PNG
        _close(r["latent"], ref_encode(crop, r["index"], which=0))
        _close(r["latent_flip"], ref_encode(crop[:, ::-1], r["index"], which=1))


def test_rerun_is_noop_and_settings_are_pinned(prepared, images):
    before = _mtimes(prepared)
    assert _run("--images", images, "--vae", SD_VAE, "--size", SIZE, "--out", prepared,
                "--shards", 4, "--batch-size", 8, "--keep-images", "--workers", 2) == 0
    assert _mtimes(prepared) == before
    with pytest.raises(SystemExit) as e:  # another seed into the same directory: refused
        _run("--images", images, "--vae", SD_VAE, "--size", SIZE, "--out", prepared,
             "--shards", 4, "--keep-images", "--seed", 1)
    assert e.value.code == 2
    assert _mtimes(prepared) == before


def test_resume_after_kill(prepared, images, tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(prepared, out)
    names = [records.shard_file_name(s, 4) for s in range(4)]
    original = {n: open(os.path.join(prepared, n), "rb").read() for n in names}
    os.remove(os.path.join(out, records.MANIFEST))
    os.remove(os.path.join(out, names[1]))             # killed while writing shard 1 ...
    with open(os.path.join(out, names[1] + ".tmp"), "wb") as f:
        f.write(b"half a shard")
    os.remove(os.path.join(out, names[2]))             # ... and before shard 2
    os.remove(os.path.join(out, names[2] + prepare_shards.META_SUFFIX))
    kept = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in (names[0], names[3])}
    assert _run("--images", images, "--vae", SD_VAE, "--size", SIZE, "--out", out,
                "--shards", 4, "--batch-size", 8, "--keep-images", "--workers", 2) == 0
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in kept} == kept
    for n in names:  # remade shards are byte-identical (per-record noise keys)
        assert open(os.path.join(out, n), "rb").read() == original[n], n
    a, b = records.read_manifest(prepared), records.read_manifest(out)
    assert {**a, "created": 0} == {**b, "created": 0}


def test_process_split_gives_the_same_shards(prepared, images, tmp_path):
    out = str(tmp_path / "two_procs")
    common = ["--images", images, "--vae", SD_VAE, "--size", SIZE, "--out", out, "--shards", 4,
              "--batch-size", 8, "--keep-images", "--workers", 2, "--process-count", 2]
    assert _run(*common, "--process-index", 1) == 0
    assert not os.path.exists(os.path.join(out, records.MANIFEST))  # process 0 writes it
    assert _run(*common, "--process-index", 0) == 0
    for s in range(4):
        n = records.shard_file_name(s, 4)
        assert open(os.path.join(out, n), "rb").read() == \
            open(os.path.join(prepared, n), "rb").read()
    assert records.read_manifest(out)["num_records"] == 26


def test_native_resolution(tmp_path, ref_encode):
    root = tmp_path / "nr"
    sizes = {"a/wide.png": (58, 34), "a/tall.png": (34, 58), "a/wide2.png": (57, 35),
             "b/big.png": (200, 120)}
    rng = np.random.default_rng(1)
    for key, (w, h) in sizes.items():
        os.makedirs(root / os.path.dirname(key), exist_ok=True)
        _smooth(rng, w, h).save(root / key)
    out = str(tmp_path / "nr_out")
    assert _run("--images", root, "--vae", SD_VAE, "--size", SIZE, "--out", out, "--native",
                "--max-area", 2048, "--patch-size", 2, "--batch-size", 8, "--shards", 2) == 0
    m = records.read_manifest(out)
    assert m["native"] is True and m["latent_shape"] is None and m["native_multiple"] == 4
    assert m["fields"]["latent"]["shape"] == [None, None, 4]
    recs = _read_all(out)
    assert len(recs) == 4
    for r in recs:
        w, h = sizes[r["key"]]
        h_lat, w_lat, _ = r["latent"].shape
        assert (w_lat * 2) % 4 == 0 and (h_lat * 2) % 4 == 0        # factor 2 x patch 2
        assert w_lat * h_lat * 4 <= 2048                               # the area cap
        if w * h < 2048:  # the official rule: sides floored to multiples of 4
            assert (w_lat * 2, h_lat * 2) == (w // 4 * 4, h // 4 * 4)
        assert r["latent_flip"].shape == r["latent"].shape
    # 200x120 is over the cap: sqrt(200/120) * sqrt(2048) = 58.4 -> 56, 58.4 * 120/200 -> 32
    shapes = {r["key"]: r["latent"].shape[:2] for r in recs}
    assert shapes == {"a/wide.png": (16, 28), "a/wide2.png": (16, 28), "b/big.png": (16, 28),
                      "a/tall.png": (28, 16)}
    np.testing.assert_array_equal(np.load(os.path.join(out, m["latent_shapes_file"])),
                                  [r["latent"].shape for r in recs])
    assert m["latent_buckets"] == [{"latent_hw": [16, 28], "num_records": 3},
                                   {"latent_hw": [28, 16], "num_records": 1}]
    big = next(r for r in recs if r["key"] == "b/big.png")
    resized = np.asarray(Image.open(root / "b/big.png").resize((56, 32),
                                                              Image.Resampling.BICUBIC))
    _close(big["latent"], ref_encode(resized, big["index"]))
    _close(big["latent_flip"], ref_encode(resized[:, ::-1], big["index"], which=1))


def test_native_size_follows_official_formula():
    assert native_size(500, 375, 16, 256 ** 2) == (288, 208)  # sqrt(4/3)*256=295.6 -> 288
    assert native_size(200, 100, 16, 256 ** 2) == (192, 96)   # under the cap: floored
    assert native_size(10, 5, 16, 256 ** 2) == (16, 16)       # at least one multiple
    # degenerate aspect ratios: the official rule raises the 1-pixel side to 16 and keeps
    # 10000 (over the cap); here the long side is shortened to fit the cap
    assert native_size(1, 10000, 16, 256 ** 2) == (16, 4096)
    assert native_size(100000, 3, 16, 256 ** 2) == (4096, 16)


def test_captions_jsonl(tmp_path):
    root = tmp_path / "t2i"
    os.makedirs(root / "sub")
    rng = np.random.default_rng(2)
    for name in ("x.png", "sub/y.jpg"):
        _smooth(rng, 40, 36).save(root / name)
    lines = [{"image": "x.png", "caption": "a red ball"},
             {"image": "sub/y.jpg", "caption": "zwei Hündchen \u2014 ok"},
             {"image": "missing.png", "caption": "gone"}]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = str(tmp_path / "t2i_out")
    assert _run("--images", root, "--captions", jsonl, "--vae", SD_VAE, "--size", SIZE,
                "--out", out, "--shards", 2, "--batch-size", 8) == 0
    m = records.read_manifest(out)
    assert m["num_records"] == 2 and m["class_names"] == []
    assert [(s["key"], s["reason"].split(":")[0]) for s in m["skipped"]] == \
        [("missing.png", "FileNotFoundError")]
    recs = {r["key"]: r for r in _read_all(out)}
    assert recs["x.png"]["caption"] == "a red ball" and recs["x.png"]["label"] == -1
    assert recs["sub/y.jpg"]["caption"] == lines[1]["caption"]
    assert "image" not in recs["x.png"]


def test_tfds_data_source(tmp_path):
    import io

    import tensorflow_datasets as tfds

    rng = np.random.default_rng(3)

    class TinyPrepareImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["u", "v"]),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                buf = io.BytesIO()
                _smooth(rng, 40 + i, 36).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 2, "file_name": f"im{i}.png"}

    data_dir = str(tmp_path / "tfds")
    TinyPrepareImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    out = str(tmp_path / "tfds_out")
    assert _run("--tfds", "tiny_prepare_images", "--data-dir", data_dir, "--vae", SD_VAE,
                "--size", SIZE, "--out", out, "--shards", 2, "--batch-size", 8) == 0
    assert "tensorflow" not in sys.modules
    m = records.read_manifest(out)
    assert m["num_records"] == 5 and m["class_names"] == ["u", "v"]
    recs = _read_all(out)
    assert sorted(r["key"] for r in recs) == [f"im{i}.png" for i in range(5)]
    assert all(r["label"] == int(r["key"][2]) % 2 for r in recs)


def test_dc_ae_is_deterministic(images, tmp_path):
    from tim_jax.encoders.autoencoder import load_autoencoder

    out = str(tmp_path / "dcae")
    assert _run("--images", images, "--vae", _fixture(DC_AE), "--size", SIZE, "--out", out,
                "--shards", 1, "--batch-size", 32, "--latent-dtype", "float32") == 0
    m = records.read_manifest(out)
    assert m["normalisation"]["posterior"] == "deterministic" and "seed" not in m["normalisation"]
    recs = _read_all(out)
    codec = load_autoencoder(DC_AE)
    crops = np.stack([_ref_crop(os.path.join(images, r["key"]), SIZE) for r in recs])
    x = (crops.astype(np.float32) / 255.0 - 0.5) / 0.5
    fn = jax.jit(codec.encode_fn, static_argnums=3, compiler_options=FAST)
    ref = np.asarray(fn(codec.params, np.concatenate([x, x[:, :, ::-1]]), None, False))
    got = np.concatenate([np.stack([r["latent"] for r in recs]),
                          np.stack([r["latent_flip"] for r in recs])])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_bad_arguments_exit_2(images, tmp_path, capsys):
    empty = tmp_path / "empty"
    os.makedirs(empty / "some_class")
    cases = [
        (["--images", images, "--vae", str(tmp_path / "nope"), "--out", tmp_path / "o1"],
         "does not exist"),
        (["--images", empty, "--vae", SD_VAE, "--out", tmp_path / "o2"], "no images"),
        (["--images", images, "--vae", SD_VAE, "--size", 33, "--out", tmp_path / "o3"],
         "not a multiple of the VAE's spatial factor 2"),
        (["--images", images, "--vae", SD_VAE, "--native", "--max-area", 8,
          "--out", tmp_path / "o4"], "--max-area 8"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            _run(*argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_cli_help_and_error_in_a_subprocess(tmp_path):
    env = {**os.environ, "TIM_JAX_NO_REEXEC": "1"}
    cmd = [sys.executable, "-m", "tim_jax.prepare"]
    r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and "--native" in r.stdout and "--keep-images" in r.stdout
    r = subprocess.run(cmd + ["--images", str(tmp_path), "--vae", SD_VAE, "--out",
                              str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 2 and "no class sub-folders" in r.stderr


def test_record_format_roundtrip(tmp_path):
    arr = np.arange(24, dtype=">f4").reshape(2, 3, 4)[:, ::2]  # big-endian, non-contiguous
    fields = {"latent": arr, "n": 7, "neg": -1, "s": "h\u00e9llo", "b": b"\x00\x01",
              "flag": np.array([True, False]), "scalar": np.float16(1.5)}
    out = records.decode_record(records.encode_record(fields))
    np.testing.assert_array_equal(out["latent"], arr)
    assert out["latent"].dtype == np.float32 and not out["latent"].flags.writeable
    assert out["n"] == 7 and out["neg"] == -1 and out["s"] == "h\u00e9llo" and out["b"] == b"\0\1"
    assert out["flag"].tolist() == [True, False] and out["scalar"] == np.float16(1.5)
    with pytest.raises(ValueError, match="magic"):
        records.decode_record(b"nope" + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        records.decode_record(records.encode_record(fields)[:-8])
    with pytest.raises(TypeError, match="unsupported"):
        records.encode_record({"x": [1, 2]})
    path = str(tmp_path / "s.array_record")

    def fail(_count):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        records.write_shard(path, [b"a"], before_commit=fail)
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    assert records.write_shard(path, [records.encode_record(fields)] * 3) == 3
    assert records.write_shard(str(tmp_path / "empty.array_record"), []) == 0
    records.write_manifest(str(tmp_path), {"shards": [{"file": "s.array_record",
                                                       "num_records": 3}]})
    assert records.shard_paths(str(tmp_path)) == [path]
    with open(tmp_path / records.MANIFEST, "w") as f:
        json.dump({"format": "tim_jax.latents", "version": 99}, f)
    with pytest.raises(ValueError, match="version"):
        records.read_manifest(str(tmp_path))


def test_pixel_conversion_is_bit_exact():
    """uint8 -> [-1, 1] equals float32 (v / 255 - 0.5) / 0.5 (torchvision's ToTensor +
    Normalize(0.5) computes exactly this in float32) for all 256 values, inside jit."""
    from tim_jax.data.prepare_encode import pixels_to_unit_range

    v = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    want = (v.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(np.asarray(jax.jit(pixels_to_unit_range)(v)), want)
