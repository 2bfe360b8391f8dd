"""``python -m tim_jax.sample`` (tim_jax.inference.cli): the issue's acceptance test and the
error paths.

Acceptance (two subprocesses, as a user runs them): convert the official-layout c2i_tiny
fixture with ``python -m tim_jax.convert``, then sample labels 1,2 at 1 and 4 steps at a
non-square 24x16 (WxH; the tiny SD-VAE has factor 2 and c2i_tiny patch 2, so sides step by 4
pixels) and check the PNGs, grids and settings.json. Bad input is checked in-process through
``cli.main`` (it fails before anything is compiled: the sampling step is patched to fail the
test if reached) and once through the real entry point for the exit status.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tim_jax.inference import cli

REPO = Path(__file__).resolve().parents[1]
W, H = 24, 16


def fixture(name: str) -> Path:
    path = Path(__file__).parent / "fixtures" / "parity" / name
    if not path.is_dir():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_convert_then_sample_writes_pngs_of_the_requested_size(tmp_path):
    ckpt = tmp_path / "c2i_tiny_converted"
    conv = _run("tim_jax.convert", "--official",
                str(fixture("c2i_tiny") / "model.safetensors"), "--preset", "c2i_tiny",
                "--out", str(ckpt))
    assert conv.returncode == 0, conv.stderr
    out = tmp_path / "samples"
    proc = _run("tim_jax.sample", "--checkpoint", str(ckpt), "--vae", str(fixture("sd_vae_tiny")),
                "--labels", "1,2", "--steps", "1,4", "--size", f"{W}x{H}", "--seed", "0",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["steps"] == [1, 4] and settings["labels"] == [1, 2]
    assert (settings["width"], settings["height"], settings["seed"]) == (W, H, 0)
    assert settings["model_config"]["kind"] == "c2i" and settings["vae_kind"] == "AutoencoderKL"
    pictures = {}
    for steps in (1, 4):
        files = settings["files"][str(steps)]
        assert files["images"] == [f"steps_{steps}/0000_class1.png",
                                   f"steps_{steps}/0001_class2.png"]
        for name in files["images"]:
            im = Image.open(out / name)
            assert (im.size, im.mode) == ((W, H), "RGB")
        pictures[steps] = np.stack([np.asarray(Image.open(out / n)) for n in files["images"]])
        grid = Image.open(out / files["grid"])
        assert grid.size == (2 * (W + 2) + 2, H + 4)
    assert not np.array_equal(pictures[1], pictures[4])
    assert not np.array_equal(pictures[1][0], pictures[1][1])


def test_bad_size_exits_2_through_the_entry_point(tmp_path):
    proc = _run("tim_jax.sample", "--checkpoint", str(fixture("c2i_tiny") / "model.safetensors"),
                "--vae", str(fixture("sd_vae_tiny")), "--labels", "1", "--steps", "1",
                "--size", "25x16", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "error: image size 25x16 (WxH) is not valid" in proc.stderr
    assert "width 25 (nearest valid: 24 or 28)" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_help():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*a, **k):
        pytest.fail("reached sampling: the input should have been rejected before")

    monkeypatch.setattr(cli, "generate", fail)


def _c2i_args(tmp_path, *extra, vae="sd_vae_tiny"):
    return ["--checkpoint", str(fixture("c2i_tiny") / "model.safetensors"),
            "--vae", str(fixture(vae)), "--steps", "1", "--out", str(tmp_path / "o"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--labels", "1,10"], "label(s) [10] outside the model's classes 0..9"),
    (["--prompt", "a cat"], "class-conditional (c2i) model: give class labels, not prompts"),
    (["--labels", "1", "--size", "30x16"], "width 30 (nearest valid: 28 or 32)"),
    (["--labels", "1", "--steps", "1,x"], "--steps '1,x' must be comma-separated integers"),
    (["--labels", "1", "--steps", "0"], "--steps must be integers >= 1"),
    (["--labels", "1", "--cfg-interval", "0.6"], "--cfg-interval '0.6' must be LOW,HIGH"),
    (["--labels", "1", "--cfg-interval", "0.6,0.2"], "cfg_interval needs low < high"),
    (["--labels", "1", "--stochasticity", "1.0"], "stochasticity must be in [0.0, 1.0)"),
    (["--labels", "1", "--preset", "c2i_b2_256"], "does not match the model config"),
    (["--labels", "1", "--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_exits_2_before_compiling(tmp_path, capsys, no_sampling, extra, message):
    assert cli.main(_c2i_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_mismatched_and_missing_files(tmp_path, capsys, no_sampling):
    assert cli.main(_c2i_args(tmp_path, "--labels", "1", vae="dc_ae_tiny")) == 2
    assert "8 latent channels but the TiM checkpoint" in capsys.readouterr().err
    args = _c2i_args(tmp_path, "--labels", "1")
    args[1] = str(tmp_path / "absent.safetensors")
    assert cli.main(args) == 2
    assert "error: --checkpoint " in capsys.readouterr().err
    assert cli.main(_c2i_args(tmp_path, "--labels", "1", "--text-encoder",
                              str(fixture("gemma3_tiny")))) == 2
    assert "class-conditional (c2i) model: it takes class labels, no text encoder" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:            # no condition at all: argparse, status 2
        cli.main(_c2i_args(tmp_path))
    assert e.value.code == 2


def test_random_labels_are_drawn_before_compiling(tmp_path):
    args = cli.build_parser().parse_args(_c2i_args(tmp_path, "--labels", "random:6", "--seed",
                                                   "3", "--steps", "1,2", "--per-condition", "2"))
    pipe, requests = cli.prepare(args)
    labels = requests[0].labels
    assert len(labels) == 12 and all(0 <= v < 10 for v in labels)
    assert labels[0::2] == labels[1::2]                    # each label twice, side by side
    assert [r.num_steps for r in requests] == [1, 2] and pipe.traces == 0
    again = cli.prepare(args)[1][0].labels
    assert again == labels


def test_text_model_input_checks(tmp_path, capsys, no_sampling):
    """A converted t2i directory (random weights sized for the tiny Gemma and DC-AE)."""
    import jax
    from flax import nnx

    from tim_jax.interop import convert
    from tim_jax.models import abstract_model, model_config, params_from_pure_dict

    cfg = model_config("t2i_tiny", cap_feat_dim=64, in_channels=8)
    _, shapes = abstract_model(cfg)
    params = params_from_pure_dict(cfg, jax.tree.map(
        lambda a: np.zeros(a.shape, np.float32), nnx.to_pure_dict(shapes)))
    ckpt = convert.save_converted(tmp_path / "t2i", cfg, params)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\n\nblue sky\n")
    base = ["--checkpoint", str(ckpt), "--vae", str(fixture("dc_ae_tiny")),
            "--text-encoder", str(fixture("gemma3_tiny")),
            "--tokenizer", str(fixture("gemma3_tiny_tokenizer")), "--steps", "1",
            "--size", "16x8", "--out", str(tmp_path / "o")]
    pipe, requests = cli.prepare(cli.build_parser().parse_args(base + ["--prompts-file",
                                                                      str(prompts)]))
    assert requests[0].prompts == ("a photo of a dog", "blue sky") and pipe.kind == "t2i"
    assert (requests[0].height, requests[0].width) == (8, 16)
    assert cli.main(base + ["--labels", "1"]) == 2
    assert "text-to-image (t2i) model: give prompts" in capsys.readouterr().err
    assert cli.main(base + ["--prompt", "a red cat"]) == 2
    assert "outside the text encoder's vocabulary of 512" in capsys.readouterr().err
    no_text = [a for a in base if a not in ("--text-encoder", str(fixture("gemma3_tiny")))]
    assert cli.main(no_text + ["--prompt", "blue sky"]) == 2
    assert "text-to-image (t2i) model: give the text encoder" in capsys.readouterr().err
