"""FID-vs-steps evaluation (tim_jax.evaluation.generate / chunks / reference / cli), tiny networks.

Networks: the official c2i_tiny fixture converted with ``tim_jax.convert`` (random weights, 16 x 16
images through ``sd_vae_tiny``). Feature network: a tiny random conv net (8 features, 10 classes)
stands in for the FID Inception everywhere but in one wrapper test, the CLI test included (its
Inception loader is patched): the real one costs ~1 s per image and ~10 s per compile on 2 CPU
cores, and one 2048-D ``sqrtm`` FID several minutes there. The wrapper test loads pytorch-fid's
architecture with the seeded random weights of ``_make/make_fid_inception.py`` and compares
``load_inception`` / ``FeatureNet`` with pytorch-fid's outputs in ``fid_inception/io.npz``.
"""
import importlib.util
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from conftest import parity_path
from tim_jax.evaluation import chunks as ch
from tim_jax.evaluation import cli
from tim_jax.evaluation.fid import GaussianMoments, fid, load_reference_statistics
from tim_jax.evaluation.generate import (C2IGenerator, FeatureNet, SamplerSettings, class_labels,
                                         guided_steps, load_codec)
from tim_jax.evaluation.reference import (FeatureRunner, reference_from_image_npz,
                                          reference_from_records)

FEATURE_TOL = 1e-5  # rel. max |diff| of features made on 1 vs 8 devices (fp32 reduction order)


class TinyFeatures(nnx.Module):
    """A random stand-in for the Inception: images [0, 1] -> (pool (B, 8), logits (B, 10))."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        pool = jax.nn.gelu(self.conv(2.0 * x - 1.0)).mean(axis=(1, 2))
        return pool, self.fc(pool)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from tim_jax.interop import convert

    out = tmp_path_factory.mktemp("c2i_converted")
    src = parity_path("c2i_tiny") / "model.safetensors"
    assert convert.main(["--official", str(src), "--preset", "c2i_tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def vae():
    return parity_path("sd_vae_tiny")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from safetensors.numpy import save_file

    from tim_jax.evaluation.inception import torch_state_dict_shapes

    recipe = parity_path("_make") / "make_fid_inception.py"
    spec = importlib.util.spec_from_file_location("make_fid_inception", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.safetensors"
    save_file(module.make_weights(torch_state_dict_shapes()), str(path))
    return path


@pytest.fixture(scope="module")
def network(converted):
    from tim_jax.inference import load_network

    return load_network(converted, dtype="float32")


@pytest.fixture(scope="module")
def tiny_features():
    return FeatureNet(TinyFeatures(nnx.Rngs(0)), size=16, name="tiny")


def _generator(network, vae, features, devices, batch_size, **kw):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    return C2IGenerator(network.model_config, network.graphdef, network.params,
                        network.transport, load_codec(vae), features, mesh=mesh,
                        batch_size=batch_size, seed=0, **kw)


@pytest.fixture(scope="module")
def gen8(network, vae, tiny_features):
    assert len(jax.devices()) == 8
    return _generator(network, vae, tiny_features, 8, 8)


# ----------------------------------------------------------------------------------------------
def test_labels_uniform_as_the_pipeline_and_balanced_exact():
    from tim_jax.inference import random_labels

    uni = class_labels(1000, 10, seed=3)
    np.testing.assert_array_equal(uni, random_labels(1000, 10, 3))
    assert uni.dtype == np.int32 and np.bincount(uni, minlength=10).min() < 100  # not balanced
    bal = class_labels(1003, 10, seed=3, balance="balanced")
    counts = np.bincount(bal, minlength=10)
    assert counts.tolist() == [101] * 3 + [100] * 7
    np.testing.assert_array_equal(bal, class_labels(1003, 10, seed=3, balance="balanced"))
    assert not np.array_equal(bal, class_labels(1003, 10, seed=4, balance="balanced"))
    with pytest.raises(ValueError, match="balance"):
        class_labels(10, 10, balance="sorted")


def test_nfe_counts_guided_steps(network):
    t = network.transport  # OT-FM, T_max = 1: grid 1, .75, .5, .25 -> guided where 0 < t < .7
    assert guided_steps(t, SamplerSettings(4, cfg_scale=1.5, cfg_high=0.7)) == 2
    assert guided_steps(t, SamplerSettings(4, cfg_scale=1.0, cfg_high=0.7)) == 0
    assert guided_steps(t, SamplerSettings(1, cfg_scale=4.0)) == 0  # t = T_max is never guided
    with pytest.raises(ValueError, match="low < high"):
        SamplerSettings(2, cfg_low=0.5, cfg_high=0.5)


def test_samples_do_not_depend_on_devices_or_batch(network, vae, tiny_features, gen8):
    """Global indices 5..16 on 8 devices (batches of 8) and on 1 device (batches of 3): the same
    pixels bit for bit, features equal to fp32 round-off; and the pixels are the pipeline's."""
    from tim_jax.inference import TiMPipeline

    labels = class_labels(17, 10, seed=0)
    idx = np.arange(5, 17)
    s = SamplerSettings(1)
    a = gen8.generate(idx, labels[idx], s, return_images=True)
    gen1 = _generator(network, vae, tiny_features, 1, 3)
    b = gen1.generate(idx, labels[idx], s, return_images=True)
    assert a["images"].shape == (12, 16, 16, 3) and a["images"].dtype == np.uint8
    assert a["images"].std() > 1  # not a constant image
    np.testing.assert_array_equal(a["images"], b["images"])
    for k in ("pool", "logits"):
        assert np.abs(a[k] - b[k]).max() <= FEATURE_TOL * np.abs(a[k]).max(), k
    pipe = TiMPipeline(network.model_config, network.graphdef, network.params, load_codec(vae),
                       transport=network.transport, mesh=gen8.mesh)
    ref = pipe(labels=labels.tolist(), num_steps=1, seed=0, batch_size=8).images
    np.testing.assert_array_equal(a["images"], ref[5:17])


def test_killed_run_resumes_to_the_same_numbers(gen8, tmp_path):
    plan = ch.ChunkPlan(num_samples=20, chunk_size=6)  # chunks of 6, 6, 6, 2
    labels = class_labels(20, 10, seed=0)
    s = SamplerSettings(1)

    def make(a, b):
        out = gen8.generate(np.arange(a, b), labels[a:b], s)
        return {**out, "labels": labels[a:b], "indices": np.arange(a, b)}

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert ch.make_chunks(whole, plan.all(), make, "fp") == 4
    assert ch.make_chunks(parts, plan.all(), make, "fp", budget=2) == 2  # "killed" here
    assert len(ch.missing_chunks(parts, plan.all(), "fp")) == 2
    (parts / ".00000012.tmp99.npz").write_bytes(b"partial")  # a write cut short: ignored
    ch.chunk_path(parts, 12).write_bytes(b"not a zip")  # a corrupt chunk: made again
    ch.write_chunk(ch.chunk_path(parts, 18), {"pool": np.zeros((2, 8))}, "other")  # foreign
    with pytest.raises(FileNotFoundError, match="missing"):
        ch.collect(parts, plan, "fp")
    assert ch.make_chunks(parts, plan.all(), make, "fp") == 2
    a, b = ch.collect(whole, plan, "fp", labels=True), ch.collect(parts, plan, "fp", labels=True)
    assert a["moments"].count == 20
    np.testing.assert_array_equal(a["moments"].mean, b["moments"].mean)
    np.testing.assert_array_equal(a["moments"].scatter, b["moments"].scatter)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    np.testing.assert_array_equal(b["labels"], labels)
    # processes split the chunks round robin, together exactly once
    split = [plan.for_process(p, 3) for p in range(3)]
    assert sorted(c for part in split for c in part) == plan.all()


def test_reference_from_images_and_records(gen8, tmp_path):
    from PIL import Image

    from tim_jax.data import records

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 16, 16, 3), dtype=np.uint8)
    runner = FeatureRunner(gen8.features, mesh=gen8.mesh, batch_size=8)
    pool, _ = runner(images)
    want = GaussianMoments.of(pool)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    got = reference_from_image_npz(tmp_path / "ref.npz", runner)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    d = tmp_path / "records"
    d.mkdir()
    blobs = []
    for i, im in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(im).save(png, format="PNG")
        blobs.append(records.encode_record({"latent": np.zeros((2, 2, 4), np.float16),
                                            "label": i % 10, "image": png.getvalue()}))
    name = records.shard_file_name(0, 1)
    records.write_shard(str(d / name), blobs)
    records.write_manifest(str(d), {"num_records": 11, "shards": [{"file": name,
                                                                   "num_records": 11}]})
    got = reference_from_records(d, runner)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    np.testing.assert_allclose(got.covariance(), want.covariance(), rtol=1e-9, atol=1e-12)
    assert reference_from_records(d, runner, limit=5).count == 5


# ----------------------------------------------------------------------------------------------
def test_inception_wrapper_matches_pytorch_fid(inception_file):
    """``load_inception`` resizes uint8 pixels / 255 itself (torch bilinear to 299) and runs the
    model without its own resize: pytorch-fid's pool3 features on the fid_inception fixture
    (pytorch-fid 0.3.0, same seeded weights), and the bias-free logits fc(pool3) - fc.bias of the
    ADM evaluator's Inception Score."""
    from tim_jax.evaluation.generate import load_inception

    with np.load(parity_path("fid_inception") / "io.npz") as f:
        images, pool_ref, logits_ref = f["images"], f["pool"], f["logits"]
    features = load_inception(inception_file)
    assert features.size == 299 and features.dim == 2048
    assert load_inception(inception_file) is features  # loaded once per process
    pixels = jnp.asarray(images.transpose(0, 2, 3, 1) * 255.0)  # float "pixels": x / 255 = images
    pool, logits = jax.jit(features.apply)(features.state, pixels)
    assert np.abs(pool - pool_ref).max() <= FEATURE_TOL * np.abs(pool_ref).max()
    bias = np.asarray(nnx.merge(features.graph, features.state).fc.bias.get_value())
    want = logits_ref - bias  # |bias| ~ 0.1: the bias-free logits differ clearly from torch's
    assert np.abs(logits - want).max() <= FEATURE_TOL * np.abs(want).max()
    with pytest.raises(ValueError, match=">= 75"):
        load_inception(inception_file, size=64)


def _args(converted, vae, inception_file, out, *extra):
    return ["--checkpoint", str(converted), "--vae", str(vae), "--inception", str(inception_file),
            "--inception-size", "75", "--num-samples", "16", "--batch-size", "8",
            "--no-progress", "--out", str(out), *extra]


def test_cli_end_to_end_resumes_and_writes_fid_per_step_count(converted, vae, inception_file,
                                                               tiny_features, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr("tim_jax.evaluation.generate.load_inception",
                        lambda path, size=299, dtype=None: tiny_features)
    # the reference: statistics of another generated set (seed 1)
    assert cli.main(_args(converted, vae, inception_file, tmp_path / "ref", "--steps", "1",
                          "--seed", "1")) == 0
    ref = tmp_path / "ref" / "stats" / "steps1.npz"
    mu_r, sigma_r = load_reference_statistics(ref)
    run = _args(converted, vae, inception_file, tmp_path / "run", "--steps", "1,2",
                "--chunk-size", "6", "--ref", str(ref), "--save-png", "2")
    assert cli.main(run + ["--max-chunks", "2"]) == cli.INCOMPLETE  # "killed"
    assert not (tmp_path / "run" / "results.json").exists()
    assert len(list((tmp_path / "run" / "chunks" / "steps1").glob("*.npz"))) == 2
    assert cli.main(run) == 0  # resumed
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["steps"] for r in res["results"]] == [1, 2]
    for r in res["results"]:
        mu, sigma = load_reference_statistics(tmp_path / "run" / "stats" / f"steps{r['steps']}.npz")
        assert r["num_samples"] == 16 and r["nfe"] == r["steps"]
        assert r["fid"] == pytest.approx(fid(mu, sigma, mu_r, sigma_r), rel=1e-12)
        assert r["fid"] > 0 and r["inception_score"] >= 1.0
        assert sorted(p.name for p in (tmp_path / "run" / "png" / f"steps{r['steps']}").iterdir()) \
            == ["000000.png", "000001.png"]
    assert (tmp_path / "run" / "fid_vs_nfe.png").stat().st_size > 1000
    assert "| 2 | 2 |" in (tmp_path / "run" / "results.md").read_text()
    # the same run without interruption (and with the ADM-style npz) gives the same numbers
    assert cli.main(_args(converted, vae, inception_file, tmp_path / "whole", "--steps", "1,2",
                          "--chunk-size", "6", "--ref", str(ref), "--save-npz")) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert [r["fid"] for r in whole["results"]] == [r["fid"] for r in res["results"]]
    with np.load(tmp_path / "whole" / "samples" / "steps1.npz") as f:
        assert f["arr_0"].shape == (16, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        from PIL import Image

        png = np.asarray(Image.open(tmp_path / "run" / "png" / "steps1" / "000001.png"))
        np.testing.assert_array_equal(f["arr_0"][1], png)
        np.testing.assert_array_equal(f["arr_1"], class_labels(16, 10, seed=0))
    # other settings in the same directory: refused, naming the difference
    with pytest.raises(SystemExit, match="cfg_scale"):
        cli.main(run + ["--cfg", "1.5"])


def test_cli_reports_bad_input_before_loading(converted, vae, inception_file, tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err

    for argv in (["--help"], ["prompts", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    helps = capsys.readouterr().out
    assert "--cfg-interval" in helps and "--ref-from-records" in helps and "geneval" in helps
    base = _args(converted, vae, inception_file, tmp_path / "o")
    missing = _args(converted, vae, tmp_path / "none.safetensors", tmp_path / "o")
    assert "pt_inception-2015-12-05" in error_of(missing)  # the download address
    assert "convert" in error_of(_args(converted, vae, tmp_path / "w.pth", tmp_path / "o"))
    assert "does not exist" in error_of(base + ["--ref", str(tmp_path / "nope.npz")])
    assert "step counts" in error_of(base + ["--steps", "0,2"])
    assert "LOW < HIGH" in error_of(base + ["--cfg-interval", "0.7,0.2"])
    assert "no config.json" in error_of(_args(converted, tmp_path, inception_file, tmp_path / "o"))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="--ref-images"):  # an images-only file given as --ref
        cli.main(base + ["--ref", str(tmp_path / "images.npz")])
    assert not (tmp_path / "o" / "chunks").exists()


def test_cli_processes_share_the_chunks(converted, vae, inception_file, tiny_features, tmp_path,
                                        monkeypatch):
    """Two processes on one directory (chunks 0, 2 and 1): the statistics of one process alone."""
    monkeypatch.setattr("tim_jax.evaluation.generate.load_inception",
                        lambda path, size=299, dtype=None: tiny_features)
    common = ["--steps", "1", "--chunk-size", "6", "--wait-timeout", "0"]
    shared = _args(converted, vae, inception_file, tmp_path / "shared", *common)
    with pytest.raises(TimeoutError, match="1 of 3 chunks still missing"):
        cli.main(shared + ["--process-index", "0", "--process-count", "2"])
    assert cli.main(shared + ["--process-index", "1", "--process-count", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "shared" / "chunks" / "steps1").iterdir()) == [
        "00000000.npz", "00000006.npz", "00000012.npz"]
    assert not (tmp_path / "shared" / "results.json").exists()  # process 0 writes them
    assert cli.main(shared + ["--process-index", "0", "--process-count", "2"]) == 0
    assert cli.main(_args(converted, vae, inception_file, tmp_path / "alone", *common)) == 0
    a = load_reference_statistics(tmp_path / "shared" / "stats" / "steps1.npz")
    b = load_reference_statistics(tmp_path / "alone" / "stats" / "steps1.npz")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
