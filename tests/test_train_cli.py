"""The train CLI end to end (configs/debug_cpu.py, 8 fake CPU devices).

Subprocess runs share one JAX compilation cache, so only the first compiles the step:
  * a straight 8-step run (metrics.jsonl fields, TensorBoard events, sample grids);
  * the same run SIGKILLed right after its step-4 checkpoint commits, then restarted: the
    resumed steps 5-8 have bit-identical losses and the final state is bit-identical;
  * SIGTERM mid-run: a checkpoint is saved and the process exits 0;
  * a batch with NaNs: exit code 3 naming the step, the previous checkpoint stays the newest.
Bad command lines and configs are checked in-process (they fail before anything compiles).
"""
import json
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from tim_jax import cpu_allocator
from tim_jax.training import checkpointing, export
from tim_jax.training import cli as train

import train_runs  # tests/train_runs.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config", "configs/debug_cpu.py", "--config.train.num_steps=8",
        "--config.train.log_every=1", "--config.ckpt.every_steps=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    e = dict(os.environ)
    for k in ("GLIBC_TUNABLES", "TIM_JAX_NO_REEXEC", "TIM_JAX_ALLOCATOR_REEXECED",
              "TIM_DISTRIBUTED"):
        e.pop(k, None)
    e.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    return e


def _cli(env, workdir, *extra, timeout=600, **env_extra):
    return subprocess.run([sys.executable, "-m", "tim_jax.train", *BASE, "--workdir", str(workdir), *extra],
                          cwd=REPO, env=dict(env, **env_extra), capture_output=True, text=True,
                          timeout=timeout)


# A fault injected from the test, not from the training loop: the CLI runs with
# Checkpointer.save wrapped so that the first periodic save waits for its commit, prints
# "checkpoint committed: step N" and then sleeps, leaving time for the test's SIGKILL.
_PAUSE_AFTER_FIRST_SAVE = train_runs.pause_after_first_save(sleep_s=120)


def _popen(env, workdir, *extra, pause_after_first_save=False, **env_extra):
    err = open(os.path.join(os.path.dirname(str(workdir)), os.path.basename(str(workdir)) + ".err"), "w")
    entry = ["-c", _PAUSE_AFTER_FIRST_SAVE] if pause_after_first_save else ["-m", "tim_jax.train"]
    proc = subprocess.Popen([sys.executable, *entry, *BASE, "--workdir", str(workdir), *extra],
                            cwd=REPO, env=dict(env, **env_extra), stdout=subprocess.PIPE, stderr=err,
                            text=True)
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    return proc, watchdog


def _read_until(proc, marker):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never printed; stdout:\n{''.join(lines)[-3000:]}")


_records = train_runs.metrics_records
_state_numpy = train_runs.saved_state   # every leaf numpy (no model or mesh needed)
_flat = train_runs.flat_numpy


@pytest.fixture(scope="module")
def straight_run(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    proc = _cli(env, workdir, "--config.sample.every_steps=4")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir, proc


def test_straight_run_writes_metrics_tensorboard_samples(straight_run):
    workdir, proc = straight_run
    recs = _records(workdir)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        for key in ("step", "loss", "grad_norm", "lr", "img_per_s"):
            assert key in r, (key, r)
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0
    assert recs[0]["lr"] == pytest.approx(1e-3)
    assert "step 8 |" in proc.stdout and "checkpoint committed: step 4" in proc.stdout
    assert "tqdm" not in proc.stdout and "\r" not in proc.stdout  # no progress bar off a terminal
    events = [f for f in os.listdir(workdir / "tb") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(workdir / "tb" / events[0]) > 0
    pngs = sorted(os.listdir(workdir / "samples"))
    assert pngs == [f"step_0000000{s}_nfe{n}.png" for s in (4, 8) for n in (1, 4)]
    from PIL import Image

    img = np.asarray(Image.open(workdir / "samples" / pngs[-1]))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    assert checkpointing.latest_step(workdir) == 8
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 8 and saved["model"]["hidden_size"] == 32
    assert "GLIBC_TUNABLES=" + cpu_allocator.GLIBC_TUNABLES_VALUE in proc.stderr  # the CLI re-exec'd


def test_sigkill_after_checkpoint_then_resume_is_exact(env, straight_run, tmp_path):
    reference, _ = straight_run
    workdir = tmp_path / "run"
    proc, dog = _popen(env, workdir, pause_after_first_save=True)
    try:
        _read_until(proc, "checkpoint committed: step 4")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        dog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert checkpointing.latest_step(workdir) == 4
    assert [r["step"] for r in _records(workdir)] == [1, 2, 3, 4]

    resumed = _cli(env, workdir)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    got, want = _records(workdir), _records(reference)
    assert [r["step"] for r in got] == list(range(1, 9))
    for g, w in zip(got[4:], want[4:]):  # steps 5-8: the same batches, rngs and updates
        assert (g["step"], g["loss"], g["grad_norm"]) == (w["step"], w["loss"], w["grad_norm"])
    final, ref_final = _flat(_state_numpy(workdir, 8)), _flat(_state_numpy(reference, 8))
    assert final.keys() == ref_final.keys() and len(final) > 100
    for k in ref_final:
        np.testing.assert_array_equal(final[k], ref_final[k], err_msg=k)


def test_sigterm_saves_and_exits_cleanly(env, tmp_path):
    workdir = tmp_path / "run"
    proc, dog = _popen(env, workdir, "--config.train.num_steps=100000", "--config.ckpt.every_steps=0",
                       "--config.train.log_every=1")
    try:
        _read_until(proc, "step 3 |")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        dog.cancel()
        proc.kill()
    assert proc.returncode == 0
    assert "stop requested (SIGTERM/preemption)" in out
    step = checkpointing.latest_step(workdir)
    assert step is not None and step >= 3
    assert f"checkpoint committed: step {step}" in out
    assert _records(workdir)[-1]["step"] == step


def test_nonfinite_batch_stops_with_the_step_and_keeps_last_checkpoint(env, tmp_path):
    from configs import debug_cpu

    m = debug_cpu.get_config().model
    n, tokens = 48, (m.input_size // m.patch_size) ** 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, m.input_size, m.input_size, m.in_channels)).astype(np.float32)
    x[16:24] = np.nan  # rows of the third batch (unshuffled, 8 rows per step)
    np.savez(tmp_path / "lat.npz", x=x, cond=rng.integers(0, m.num_classes, n).astype(np.int32),
             repa_target=rng.standard_normal((n, tokens, m.z_dim)).astype(np.float32))
    workdir = tmp_path / "run"
    proc = _cli(env, workdir, "--config.data.source=array", f"--config.data.path={tmp_path / 'lat.npz'}",
                "--config.data.shuffle=False", "--config.ckpt.every_steps=2")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss or gradient norm at step 3" in proc.stderr
    assert "Newest checkpoint: step 2" in proc.stderr
    assert os.listdir(workdir / checkpointing.CHECKPOINT_SUBDIR) == ["2"]  # nothing after it
    state = _flat(_state_numpy(workdir, 2))
    assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")
    assert [r["step"] for r in _records(workdir)] == [1, 2]


# ---- bad input: in-process, before anything compiles ---------------------------------------
def _snapshot(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[p] = os.stat(p).st_mtime_ns
    return out


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("--config.optim.lrr=1", "Did you mean 'optim.lr'?"),
    ("--config.modle.depth=2", "'<root>' has no field 'modle'"),
    ("--config.optim.lr=fast", "could not convert string to float: 'fast'"),
    ("--config.data.global_batch_size=1.5", "--config.data.global_batch_size=1.5"),
    ("--config.data.global_batch_size=12", "data.global_batch_size=12 must be a positive multiple of devices (8)"),
    ("--config.data.source=imagenet", "data.source must be 'synthetic' or 'array'"),
    ("--config.train.log_every=0", "train.log_every must be an int >= 1"),
])
def test_bad_overrides_fail_before_compiling(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    code = train.main(["tim_jax.train", "--config", os.path.join(REPO, "configs/debug_cpu.py"),
                       "--workdir", str(workdir), override])
    err = capsys.readouterr().err
    assert code == train.EXIT_USAGE
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert not workdir.exists()  # nothing written


def test_missing_flags(tmp_path, capsys):
    assert train.main(["tim_jax.train", "--workdir", str(tmp_path)]) == train.EXIT_USAGE
    assert "--config=" in capsys.readouterr().err
    assert train.main(["tim_jax.train", "--config", os.path.join(REPO, "configs/debug_cpu.py")]) == 2
    assert "--workdir=" in capsys.readouterr().err


def test_workdir_of_another_architecture_is_refused_untouched(straight_run, capsys):
    workdir, _ = straight_run
    before = _snapshot(workdir)
    code = train.main(["tim_jax.train", "--config", os.path.join(REPO, "configs/debug_cpu.py"),
                       "--workdir", str(workdir), "--config.model.hidden_size=64",
                       "--config.train.num_steps=16"])
    err = capsys.readouterr().err
    assert code == train.EXIT_USAGE
    assert "holds a checkpoint of another architecture" in err
    assert "model.hidden_size: checkpoint has 32, this run has 64" in err
    assert _snapshot(workdir) == before


def test_t2i_trains_from_the_cli_with_guided_sample_grids(tmp_path, capsys):
    """configs/debug_cpu.py:t2i: the text-conditional network trains (caption dropout to the synthetic
    empty prompt), and the sample hook draws CFG-guided grids against that null caption."""
    workdir = tmp_path / "t2i"
    code = train.main(["tim_jax.train", "--config", os.path.join(REPO, "configs/debug_cpu.py") + ":t2i",
                       "--workdir", str(workdir), "--config.train.num_steps=2", "--config.train.log_every=1",
                       "--config.ckpt.every_steps=2", "--config.sample.every_steps=2",
                       "--config.sample.cfg_scale=2.0", "--config.sample.num_steps=(1,)"])
    assert code == 0, capsys.readouterr().err[-3000:]
    recs = _records(workdir)
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    assert os.listdir(workdir / "samples") == ["step_00000002_nfe1.png"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["kind"] == "t2i" and saved["data"]["caption_length"] == 8


def test_t2i_null_caption_errors(tmp_path, capsys):
    cfg = os.path.join(REPO, "configs/debug_cpu.py") + ":t2i"
    bad_shape = tmp_path / "null_bad.npy"
    np.save(bad_shape, np.zeros((8, 47), np.float32))
    nonfinite = tmp_path / "null_nan.npy"
    np.save(nonfinite, np.full((8, 48), np.nan, np.float32))
    corrupt = tmp_path / "null_corrupt.npy"
    corrupt.write_bytes(b"not a numpy file")
    cases = [
        (f"--config.data.null_caption={tmp_path / 'missing.npy'}", "cannot read it as a .npy array"),
        (f"--config.data.null_caption={corrupt}", "cannot read it as a .npy array"),
        (f"--config.data.null_caption={bad_shape}", "shape (8, 47), expected (caption_length, 48)"),
        (f"--config.data.null_caption={nonfinite}", "must hold finite floats"),
    ]
    for override, message in cases:
        workdir = tmp_path / "run"
        code = train.main(["tim_jax.train", "--config", cfg, "--workdir", str(workdir), override])
        err = capsys.readouterr().err
        assert code == train.EXIT_USAGE and message in err, (override, err)
        assert not workdir.exists()
    # the array source has no empty prompt of its own
    data_path = tmp_path / "latents.npz"
    np.savez(data_path, x=np.zeros((16, 8, 8, 4), np.float32), cond=np.zeros((16, 8, 48), np.float32))
    code = train.main(["tim_jax.train", "--config", cfg, "--workdir", str(tmp_path / "run"),
                       "--config.data.source=array", f"--config.data.path={data_path}",
                       "--config.data.use_repa_target=False"])
    assert code == train.EXIT_USAGE and "data.null_caption must name a .npy file" in capsys.readouterr().err
    code = train.main(["tim_jax.train", "--config", os.path.join(REPO, "configs/debug_cpu.py") + ":x2i",
                       "--workdir", str(tmp_path / "run")])
    assert code == train.EXIT_USAGE and "kind must be 'c2i' or 't2i', got 'x2i'" in capsys.readouterr().err


# ---- the allocator re-exec -----------------------------------------------------------------
_PROBE = """
from tim_jax import cpu_allocator
cpu_allocator.maybe_reexec()
import json, os, sys
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "name": __name__, "spec": __spec__.name if __spec__ else None}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec is Linux-only")
def test_allocator_reexec_preserves_python_m_and_respects_opt_outs(tmp_path):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(_PROBE)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("GLIBC_TUNABLES", "TIM_JAX_NO_REEXEC", "TIM_JAX_ALLOCATOR_REEXECED")}
    base_env["PYTHONPATH"] = os.pathsep.join([REPO, str(tmp_path)])

    def probe(cmd, **extra):
        out = subprocess.run([sys.executable, *cmd], env=dict(base_env, **extra), cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    r = probe(["-m", "probe_pkg.probe", "pos", "--flag=1", "-x"])
    assert r == {"tunables": cpu_allocator.GLIBC_TUNABLES_VALUE, "argv": ["pos", "--flag=1", "-x"],
                 "name": "__main__", "spec": "probe_pkg.probe"}
    r = probe([str(pkg / "probe.py"), "a b"])
    assert r["tunables"] == cpu_allocator.GLIBC_TUNABLES_VALUE and r["argv"] == ["a b"]
    assert probe(["-m", "probe_pkg.probe"], TIM_JAX_NO_REEXEC="1")["tunables"] is None
    assert probe(["-m", "probe_pkg.probe"], GLIBC_TUNABLES="glibc.malloc.arena_max=2")["tunables"] == \
        "glibc.malloc.arena_max=2"


def test_allocator_rules():
    assert cpu_allocator.should_reexec({}, "linux", accelerator=False)
    assert not cpu_allocator.should_reexec({}, "darwin", accelerator=False)
    # never on a host whose backend will be a GPU/TPU
    assert not cpu_allocator.should_reexec({}, "linux", accelerator=True)
    assert not cpu_allocator.should_reexec({"JAX_PLATFORMS": "cuda"}, "linux", accelerator=False)
    assert not cpu_allocator.should_reexec({"JAX_PLATFORMS": "tpu,cpu"}, "linux", accelerator=False)
    assert cpu_allocator.should_reexec({"JAX_PLATFORMS": "cpu"}, "linux", accelerator=True)
    assert not cpu_allocator.should_reexec({"TIM_JAX_NO_REEXEC": "1"}, "linux")
    assert not cpu_allocator.should_reexec({"GLIBC_TUNABLES": ""}, "linux")
    assert not cpu_allocator.should_reexec({"TIM_JAX_ALLOCATOR_REEXECED": "1"}, "linux")
    assert cpu_allocator.GLIBC_TUNABLES_VALUE == (
        "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
        "glibc.malloc.arena_max=1:glibc.malloc.top_pad=1073741824:glibc.malloc.hugetlb=1")


# ---- EMA export of a trained run -----------------------------------------------------------
def test_export_ema_of_a_run_loads_as_a_model(straight_run, tmp_path, capsys):
    from tim_jax.models.functional import make_apply_fn

    workdir, _ = straight_run
    assert export.main([str(workdir), str(tmp_path / "ema")]) == 0
    assert "exported EMA 0.999 of step 8" in capsys.readouterr().out
    graphdef, params, config = export.load_ema_model(tmp_path / "ema")
    assert config.model.hidden_size == 32
    ema = _flat(_state_numpy(workdir, 8)["ema_params"]["0.999"])
    got = _flat(params)
    assert len(got) == len(ema) > 20
    for (k1, a), (k2, b) in zip(sorted(got.items()), sorted(ema.items())):
        np.testing.assert_array_equal(a, b, err_msg=k1)
    m = config.model
    x = np.zeros((2, m.input_size, m.input_size, m.in_channels), np.float32)
    t = np.full((2,), 0.5, np.float32)
    out = jax.jit(make_apply_fn(graphdef))(params, x, t, t, np.array([1, 2], np.int32))
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))
    assert export.main([str(tmp_path / "none"), str(tmp_path / "x")]) == 2


# ---- metric writers --------------------------------------------------------------------------
def test_metric_writer_sinks_and_display(tmp_path):
    import io

    from tim_jax.training import metrics

    stream = io.StringIO()
    with metrics.MetricWriter(str(tmp_path / "w"), stream=stream, total_steps=10) as w:
        w.write(5, {"loss": 0.5, "lr": np.float32(1e-4)})
    assert stream.getvalue().startswith("step 5 | loss 0.5000 | lr 1.000e-04")
    assert json.loads((tmp_path / "w" / "metrics.jsonl").read_text()) == {
        "step": 5, "loss": 0.5, "lr": pytest.approx(1e-4)}
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "w" / "tb"))
    with metrics.MetricWriter(str(tmp_path / "off"), enabled=False) as w:  # processes > 0
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()

    rng = np.random.default_rng(0)
    lat = rng.normal(size=(3, 4, 4, 4)).astype(np.float32) * 5 + 2  # 4-channel latents
    disp = metrics.to_display(lat)
    assert disp.shape == (3, 4, 4, 3)
    for c in range(3):  # first 3 channels, each min-max normalised over the whole batch
        np.testing.assert_allclose(disp[..., c].min(), 0.0, atol=1e-6)
        np.testing.assert_allclose(disp[..., c].max(), 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.to_display(np.full((1, 2, 2, 3), 0.0))[0, 0, 0], 0.5)
    assert metrics.to_display(np.ones((1, 2, 2, 1))).shape == (1, 2, 2, 3)
    grid = metrics.make_grid(disp, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
