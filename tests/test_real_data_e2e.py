"""Training on real data, through the two CLIs a user runs (configs/c2i_records_debug.py):

    python -m tim_jax.prepare --images DIR --vae tests/fixtures/parity/sd_vae_tiny --size 32 \\
        --out REC --keep-images
    python -m tim_jax.train --config configs/c2i_records_debug.py --config.data.path=REC --workdir W

The image folder is made here: 27 files in 3 class folders (wide 64x32 and tall 32x64 images,
JPEG and PNG, one grayscale, one CMYK JPEG, one corrupt file that prepare skips).

1. fixed size: a straight 8-step run; the same command SIGKILLed right after its step-4
   checkpoint commits (a fault injected from the test, as in tests/test_train_cli.py), then
   restarted: every step's loss and grad norm in metrics.jsonl and the final state equal the
   straight run's bit for bit (26 records, batch 8: the runs cross two epoch boundaries).
2. REPA online: the DINOv2 fixture (width 32, patch 4) computes the targets in the step from
   the records' images (``data.images``); ``proj_loss`` is in the metrics, finite and > 0 (it is
   exactly 0 without an encoder).
3. native resolution (``prepare --native``): two latent shapes (10x22 and 22x10); the step
   compiles once per bucket shape (JAX_LOG_COMPILES counts the ``jit(step)`` compilations and
   names their batch shapes), the losses are finite, and a resume from the earlier checkpoint
   redoes the later steps bit for bit (the SIGKILL variant is marked slow).

Runs: subprocesses with one CPU device, sharing one persistent compilation cache (only the
first run of each step shape compiles it), at XLA optimisation level 0 (a test-time saving:
every run of a comparison uses the same flags, so the bit-for-bit claims are unaffected).
"""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from tim_jax.training import checkpointing

import train_runs  # tests/train_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "parity")
CONFIG = "configs/c2i_records_debug.py"
STEP_COMPILE = re.compile(r"Compiling jit\(step\) with global shapes")


def _fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.isdir(path):
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    e = dict(os.environ)
    for k in ("GLIBC_TUNABLES", "TIM_JAX_NO_REEXEC", "TIM_JAX_ALLOCATOR_REEXECED", "TIM_DISTRIBUTED"):
        e.pop(k, None)
    e.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_LOG_COMPILES="1")
    return e


# ---- inputs -----------------------------------------------------------------------------------
def _smooth(rng, w, h):
    """A smooth random RGB image (compresses like a photo)."""
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """27 files, 26 readable: per class 4 wide (64x32) + 4 tall (32x64); a grayscale wide PNG,
    a CMYK tall JPEG and a corrupt .jpg."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("ant", "bee", "cow")):
        (root / cls).mkdir()
        for j in range(8):
            size = (64, 32) if j % 2 else (32, 64)
            ext = ".jpg" if (c + j) % 3 else ".png"
            _smooth(rng, *size).save(root / cls / f"img{j}{ext}")
    _smooth(rng, 64, 32).convert("L").save(root / "ant" / "gray.png")
    _smooth(rng, 32, 64).convert("CMYK").save(root / "bee" / "cmyk.jpg", "JPEG")
    (root / "cow" / "corrupt.jpg").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return root


def _prepare(env, images, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "tim_jax.prepare", "--images", str(images),
         "--vae", _fixture("sd_vae_tiny"), "--size", "32", "--out", str(out),
         "--shards", "2", "--batch-size", "16", "--workers", "2", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_records"] == 26 and manifest["num_classes"] == 3
    assert [s["key"] for s in manifest["skipped"]] == ["cow/corrupt.jpg"]
    assert sorted(c["note"] for c in manifest["converted"]) == ["converted CMYK to RGB",
                                                               "converted L to RGB"]
    return manifest


@pytest.fixture(scope="module")
def records(env, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "rec"
    manifest = _prepare(env, images, out, "--keep-images")
    assert manifest["latent_shape"] == [16, 16, 4] and "image" in manifest["fields"]
    return out


@pytest.fixture(scope="module")
def native_records(env, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "native"
    manifest = _prepare(env, images, out, "--native", "--patch-size", "2")
    assert manifest["native"] and manifest["latent_shape"] is None
    buckets = {tuple(b["latent_hw"]): b["num_records"] for b in manifest["latent_buckets"]}
    # 64x32 -> area cap 32**2 -> 44x20 px (multiples of 2 x patch 2) -> 22x10 latents
    assert buckets == {(10, 22): 13, (22, 10): 13}, buckets
    return out


# ---- runs -------------------------------------------------------------------------------------
def _args(data_path, workdir, *extra):
    return ["--config", CONFIG, f"--config.data.path={data_path}", "--workdir", str(workdir),
            "--config.log.tensorboard=False", *extra]


def _train(env, *args):
    """``python -m tim_jax.train ARGS`` to the end."""
    proc = subprocess.run([sys.executable, "-m", "tim_jax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


# A fault injected from the test, not from the training loop: the CLI runs with
# Checkpointer.save wrapped so that the first periodic save waits for its commit, prints
# "checkpoint committed: step N" and then sleeps, leaving time for the test's SIGKILL.
_PAUSE_AFTER_FIRST_SAVE = train_runs.pause_after_first_save(sleep_s=600)


def _train_killed_after_first_checkpoint(env, workdir, *args):
    """The CLI SIGKILLed once its first checkpoint has committed; returns that step."""
    err = open(str(workdir) + ".err", "w")
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_AFTER_FIRST_SAVE, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(900, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"checkpoint committed: step (\d+)", line)
            if found:
                break
        else:
            raise AssertionError(f"no checkpoint committed; stdout:\n{''.join(lines)[-3000:]}\n"
                                 f"stderr:\n{open(str(workdir) + '.err').read()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        err.close()
    assert proc.returncode == -signal.SIGKILL
    return int(found.group(1))


_records = train_runs.metrics_records


def _state_numpy(workdir, step):
    """Every leaf of a saved train state, as numpy, keyed by its path."""
    return train_runs.flat_numpy(train_runs.saved_state(workdir, step))


def _assert_same_run(workdir, reference, steps):
    """Every step's loss and grad norm in metrics.jsonl and the final state: bit-identical."""
    got, want = _records(workdir), _records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert np.isfinite(w["loss"]) and np.isfinite(w["grad_norm"]), w
        assert (g["step"], g["loss"], g["grad_norm"]) == (w["step"], w["loss"], w["grad_norm"])
    final, ref_final = _state_numpy(workdir, steps), _state_numpy(reference, steps)
    assert final.keys() == ref_final.keys() and len(final) > 50
    for k in ref_final:
        np.testing.assert_array_equal(final[k], ref_final[k], err_msg=k)


def _kill_resume_matches_straight(env, tmp_path, data_path, steps, every):
    """Straight run vs SIGKILL after the first checkpoint + resume with the same command.
    Returns (straight, resumed) processes."""
    extra = (f"--config.train.num_steps={steps}", f"--config.ckpt.every_steps={every}")
    reference = tmp_path / "straight"
    straight = _train(env, *_args(data_path, reference, *extra))
    workdir = tmp_path / "killed"
    killed_at = _train_killed_after_first_checkpoint(env, workdir, *_args(data_path, workdir, *extra))
    assert killed_at == every and checkpointing.latest_step(workdir) == every
    assert [r["step"] for r in _records(workdir)] == list(range(1, every + 1))
    resumed = _train(env, *_args(data_path, workdir, *extra))
    assert f"at step {every}" in resumed.stderr and "resumed from" in resumed.stderr
    _assert_same_run(workdir, reference, steps)
    return straight, resumed


# ---- tests ------------------------------------------------------------------------------------
def test_prepare_train_kill_resume_is_bit_identical(env, records, tmp_path):
    straight, _ = _kill_resume_matches_straight(env, tmp_path, records, steps=8, every=4)
    assert "checkpoint committed: step 8" in straight.stdout
    recs = _records(tmp_path / "straight")
    assert all(r["proj_loss"] == 0.0 for r in recs)  # no REPA encoder: no REPA loss
    assert len(STEP_COMPILE.findall(straight.stderr)) == 1  # one latent shape: one step program
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["data"]["source"] == "arrayrecord" and saved["data"]["path"] == str(records)


def test_repa_targets_online_from_the_records_images(env, records, tmp_path):
    workdir = tmp_path / "repa"
    proc = _train(env, *_args(records, workdir, "--config.train.num_steps=2",
                              "--config.objective.repa_encoder=dinov2",
                              f"--config.objective.repa_encoder_path={_fixture('dinov2_tiny')}",
                              "--config.data.images=True", "--config.model.z_dim=32"))
    recs = _records(workdir)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert np.isfinite(r["loss"]) and np.isfinite(r["proj_loss"]), r
        assert 0.0 < r["proj_loss"] <= 2.0, r  # 1 - cosine, averaged
    assert len(STEP_COMPILE.findall(proc.stderr)) == 1


def _step_compiles(stderr):
    """(count of jit(step) compilations, the distinct latent (h, w) of their batch "x")."""
    lines = [line for line in stderr.splitlines() if STEP_COMPILE.search(line)]
    shapes = {tuple(int(v) for v in hw) for line in lines
              for hw in re.findall(r"float32\[8,(\d+),(\d+),4\]", line)}
    return len(lines), shapes


def test_native_resolution_buckets_compile_once_each_and_resume_exactly(env, native_records, tmp_path):
    """Straight 6 steps (checkpoints at 3 and 6); then a copy of the run without its step-6
    checkpoint is resumed with the same command (from step 3) and must redo steps 4-6 exactly.
    (The SIGKILL variant of the same is the slow test below.)"""
    extra = ("--config.train.num_steps=6", "--config.ckpt.every_steps=3")
    reference = tmp_path / "straight"
    straight = _train(env, *_args(native_records, reference, *extra))
    # 2 buckets of 13 records, batch 8: one batch of each per epoch, in a seeded order
    assert _step_compiles(straight.stderr) == (2, {(10, 22), (22, 10)})
    workdir = tmp_path / "resumed"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / checkpointing.CHECKPOINT_SUBDIR / "6")
    assert checkpointing.latest_step(workdir) == 3
    resumed = _train(env, *_args(native_records, workdir, *extra))
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr
    count, shapes = _step_compiles(resumed.stderr)
    assert count <= 2 and shapes <= {(10, 22), (22, 10)}
    _assert_same_run(workdir, reference, 6)


@pytest.mark.slow
def test_native_resolution_sigkill_then_resume_is_bit_identical(env, native_records, tmp_path):
    straight, resumed = _kill_resume_matches_straight(env, tmp_path, native_records, steps=6, every=3)
    assert _step_compiles(straight.stderr) == (2, {(10, 22), (22, 10)})
    assert _step_compiles(resumed.stderr)[0] <= 2


# ---- bad input: in-process, before anything compiles or is written ----------------------------
def _usage_error(capsys, workdir, config, *overrides):
    from tim_jax.training import cli

    code = cli.main(["tim_jax.train", "--config", os.path.join(REPO, config), "--workdir",
                     str(workdir), *overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == cli.EXIT_USAGE and len(errors) == 1, err[-3000:]
    assert not workdir.exists()  # nothing written
    return errors[0]


def test_missing_or_wrong_record_directories_are_usage_errors(native_records, tmp_path, capsys):
    run = tmp_path / "run"
    assert "data.path must be set" in _usage_error(capsys, run, CONFIG)
    assert "python -m tim_jax.prepare" in _usage_error(capsys, run, CONFIG)
    missing = tmp_path / "no_such_dir"
    err = _usage_error(capsys, run, CONFIG, f"--config.data.path={missing}")
    assert "is not a directory (expected the output of `python -m tim_jax.prepare`)" in err
    repa = ("--config.objective.repa_encoder=dinov2", "--config.data.images=True",
            f"--config.objective.repa_encoder_path={_fixture('dinov2_tiny')}")
    err = _usage_error(capsys, run, CONFIG, f"--config.data.path={missing}", *repa)
    assert "is not a directory (expected the output of `python -m tim_jax.prepare`)" in err
    err = _usage_error(capsys, run, CONFIG, f"--config.data.path={native_records}", *repa)
    assert "have no 'image' field" in err and "--keep-images" in err  # prepared without images
    err = _usage_error(capsys, run, CONFIG, f"--config.data.path={native_records}", *repa[:2],
                       f"--config.objective.repa_encoder_path={missing}")
    assert f"objective.repa_encoder_path={str(missing)!r} is not a folder" in err


OFFICIAL_BATCH = {"c2i_b4_256": 1024, "c2i_xl2_256": 512, "c2i_xl1_512": 512}  # per-GPU x GPUs


@pytest.mark.parametrize("name", sorted(OFFICIAL_BATCH))
def test_official_configs_read_records_with_the_official_recipe(name):
    module = importlib.import_module(f"configs.{name}")
    records, synthetic = module.get_config(), module.get_config("synthetic")
    for c in (records, synthetic):
        assert c.data.global_batch_size == OFFICIAL_BATCH[name] and c.optim.scale_lr
        assert (c.optim.lr, c.optim.base_batch_size, c.optim.b1, c.optim.b2, c.optim.eps,
                c.optim.weight_decay, c.optim.grad_clip, c.optim.schedule, c.optim.warmup_steps) == (
            1e-4, 256, 0.9, 0.95, 1e-6, 0.01, 1.0, "constant", 0)
        assert tuple(c.ema.decays) == (0.9999,) and c.objective.repa_coeff == 1.0
        assert c.model.z_dim == 768 and not c.transport.enhance_target  # RADIO v2.5-B width
        assert (c.ckpt.every_steps, c.ckpt.keep) == (2000, 2)
    assert (records.data.source, records.data.path, records.data.images,
            records.data.use_repa_target, records.objective.repa_encoder,
            records.objective.repa_encoder_path) == ("arrayrecord", "", True, False, "radio", "")
    assert (synthetic.data.source, synthetic.data.use_repa_target,
            synthetic.objective.repa_encoder) == ("synthetic", True, "")
    with pytest.raises(ValueError, match="one of .'records', 'synthetic'."):
        module.get_config("imagenet")


def test_official_config_as_shipped_names_the_missing_paths(tmp_path, capsys):
    """Run as it is, an official config asks for the RADIO folder (checked first), then for
    data.path, pointing at `python -m tim_jax.prepare` (B/4 here; the others share the code)."""
    config = "configs/c2i_b4_256.py"
    assert "needs objective.repa_encoder_path" in _usage_error(capsys, tmp_path / "run", config)
    err = _usage_error(capsys, tmp_path / "run", config, "--config.model.z_dim=64",
                       f"--config.objective.repa_encoder_path={_fixture('radio_tiny')}")
    assert "data.path must be set" in err and "python -m tim_jax.prepare" in err
