"""tim_jax against the parity fixtures (tests/fixtures/parity), through tim_jax.parity.

Tolerances (tim_jax.interop.parity_report.TOLERANCES): network and projector outputs 1e-5 of the
output scale (fp32), sampler trajectories 1e-4 of the scale (the error of the network compounds
over the steps), transports 1e-10 (float64), time weights 1e-6, sample_t quantiles within 5
Monte-Carlo standard errors; encoder folders: the encoder module's PARITY_TOLERANCE, else 1e-5.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import REPO_ROOT, parity_path
from tim_jax.interop import parity


def _assert_all_pass(results, min_count):
    assert len(results) >= min_count
    failed = [r for r in results if not r.passed]
    assert not failed, parity.format_table(failed)


@pytest.fixture(scope="module")
def c2i_model():
    return parity.load_fixture_model(parity_path("c2i_tiny"))


def test_network_outputs_match(c2i_model):
    results = parity.check_network(parity_path("c2i_tiny"), model=c2i_model)
    names = {r.quantity for r in results}
    assert {"network/case0/out", "network/case0/h_proj"} <= names
    _assert_all_pass(results, 2)
    for r in results:
        assert r.tolerance == 1e-5 and r.max_rel_err <= 1e-5


def test_network_outputs_match_scanned_blocks():
    results = parity.check_network(parity_path("c2i_tiny"), scan_blocks=True)
    _assert_all_pass(results, 2)


def test_sampler_trajectories_match_fp32_state(c2i_model):
    results = parity.check_sampler(parity_path("c2i_tiny"), model=c2i_model, state_dtypes=("float32",))
    # three settings: 1 step, 4 steps, 4 steps with windowed CFG
    _assert_all_pass(results, 3)
    assert all(r.tolerance == 1e-4 for r in results)


def test_sampler_trajectories_match_fp64_state(c2i_model):
    # the official float64 state; the guided 4-step setting (the other two differ only in steps /
    # guidance, which the float32 test covers; `python -m tim_jax.parity --state-f64` runs all)
    results = parity.check_sampler(parity_path("c2i_tiny"), model=c2i_model,
                                   state_dtypes=("float64",), settings=("s2",))
    _assert_all_pass(results, 1)
    assert results[0].quantity == "sampler/s2/traj[float64]"


def test_transports_match_in_float64():
    results = parity.check_transports(parity_path("transports"))
    # 5 transports x (x_t, v_t, c_noise, target, target_enhanced, x_r, sample_t)
    _assert_all_pass(results, 35)
    exact = [r for r in results if not r.quantity.endswith("sample_t")]
    assert max(r.max_rel_err for r in exact) <= 1e-10


def test_time_weights_match():
    results = parity.check_time_weights(parity_path("time_weights"))
    _assert_all_pass(results, 30)  # 5 types x 3 warps x 2 bases


def test_compare_detects_errors():
    ref = np.linspace(-2.0, 2.0, 50)
    ok = parity.compare("d", "q", ref + 1e-7, ref, 1e-6)
    bad = parity.compare("d", "q", ref + 1e-4, ref, 1e-6)
    nan = parity.compare("d", "q", np.where(ref > 0, np.nan, ref), ref, 1e-6)
    assert ok.passed and np.isclose(ok.max_rel_err, 1e-7 / 2, rtol=1e-3)
    assert not bad.passed and np.isclose(bad.max_abs_err, 1e-4, rtol=1e-3)
    assert not nan.passed
    with pytest.raises(parity.ParityInputError, match="shape"):
        parity.compare("d", "q", ref[:3], ref, 1e-6)


def test_sample_t_check_detects_a_wrong_distribution():
    from tim_jax.transports import make_transport

    ref_dir = parity_path("transports")
    q = np.load(ref_dir / "transports.npz")["OT_FM/sample_t_quantiles"]
    good = parity.sample_t_check("d", "OT_FM", make_transport("OT_FM", P_mean=-0.4, P_std=1.0), q)
    bad = parity.sample_t_check("d", "OT_FM", make_transport("OT_FM", P_mean=-0.35, P_std=1.0), q)
    assert good.passed and not bad.passed, (good, bad)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _copy_fixture(src: pathlib.Path, dst: pathlib.Path, skip=()) -> pathlib.Path:
    """Writable copy of a (read-only) fixture directory without the files in ``skip``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


def _run_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "tim_jax.parity", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_passes_on_the_real_fixtures(capsys):
    # in-process (reuses the compiled network/sampler of the tests above); the module entry point
    # itself is exercised by test_cli_entry_point
    dirs = [parity_path("c2i_tiny"), parity_path("transports"), parity_path("time_weights")]
    rc = parity.main([str(d) for d in dirs])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    checks = [ln for ln in lines if ln.startswith(("PASS", "FAIL"))]
    assert len(checks) == 2 + 3 + 35 + 30 and all(ln.startswith("PASS") for ln in checks)
    assert "PASS  c2i_tiny  network/case0/out  max abs err " in out
    for col in ("max abs err", "max rel err", "<= 1e-05"):
        assert col in checks[0]
    assert lines[-1] == "70 passed, 0 failed; 3 folders: 0 skipped, 0 unusable"


def test_cli_entry_point(tmp_path):
    """`python -m tim_jax.parity` on a helper folder (skipped), an encoder Hub folder (checked by
    tim_jax.encoders.gemma3, whose report is one flat dict), and a folder of an unknown kind (an
    error naming it): exit status 2."""
    unknown = tmp_path / "mystery_fixture"
    unknown.mkdir()
    np.savez(unknown / "io.npz", a=np.zeros(3))
    proc = _run_cli(parity_path("_make"), parity_path("gemma3_tiny"), unknown)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SKIP  _make  no config.json and no .npz file")
    line = next(ln for ln in proc.stdout.splitlines() if "  gemma3_tiny  " in ln)
    assert line.startswith("PASS  gemma3_tiny  gemma3/output  max abs err"), line
    assert "tim_jax.encoders.gemma3.parity_check" in line
    assert "ERROR mystery_fixture" in proc.stderr and "unknown fixture kind" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "1 passed, 0 failed; 3 folders: 1 skipped, 1 unusable"


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        parity.main(["--help"])
    assert e.value.code == 0
    assert "python -m tim_jax.parity tests/fixtures/parity/*/" in capsys.readouterr().out


# every folder under tests/fixtures/parity, and the checks its files call for (None: skipped)
FIXTURE_KINDS = {
    "_make": None,
    "c2i_tiny": ["network", "sampler"],
    "dc_ae_tiny": ["tim_jax.encoders.dc_ae"],
    "dinov2_tiny": ["tim_jax.encoders.dinov2"],
    "dinov2_tiny_interp": ["check_dinov2_interp"],
    "fid_inception": ["check_fid_inception"],
    "gemma3_tiny": ["tim_jax.encoders.gemma3"],
    "gemma3_tiny_tokenizer": None,
    "radio_tiny": ["tim_jax.encoders.radio"],
    "resize": ["check_resize"],
    "sd_vae_tiny": ["tim_jax.encoders.sd_vae"],
    "time_weights": ["time_weights"],
    "transports": ["transports"],
}


def test_every_fixture_folder_has_a_kind():
    """`python -m tim_jax.parity tests/fixtures/parity/*/` handles each folder: a new folder must
    be added here (and get a check, or be a helper folder)."""
    folders = sorted(p.name for p in parity_path("c2i_tiny").parent.iterdir() if p.is_dir())
    assert folders == sorted(FIXTURE_KINDS)
    for name, want in FIXTURE_KINDS.items():
        if want is None:
            with pytest.raises(parity.NotAFixture, match="no config.json and no .npz"):
                parity.fixture_checks(parity_path(name))
        else:
            assert [n for n, _ in parity.fixture_checks(parity_path(name))] == want, name


def _fake_encoder(monkeypatch, module_name, report, tolerance=None):
    """Replace an encoder module by one whose parity_check returns ``report``; returns the list
    of folders it was called with."""
    calls = []
    module = types.ModuleType(module_name)
    module.parity_check = lambda folder: calls.append(pathlib.Path(folder)) or report
    if tolerance is not None:
        module.PARITY_TOLERANCE = tolerance
    monkeypatch.setitem(sys.modules, module_name, module)
    return calls


def _hub_folder(root: pathlib.Path, name: str, **config) -> pathlib.Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    np.savez(folder / "io.npz", x=np.zeros(2))
    return folder


def test_encoder_folders_dispatch_on_config_json(tmp_path, monkeypatch, capsys):
    """config.json's _class_name / model_type picks the encoder module; a check passes when its
    relative error is within the module's PARITY_TOLERANCE, else 1e-5."""
    e = "tim_jax.encoders."
    cases = {  # folder: (config, module, report, module tolerance, expected verdicts)
        "vae": ({"_class_name": "AutoencoderKL"}, e + "sd_vae",
                {"posterior_mean": {"max_abs_err": 2e-6, "max_rel_err": 9e-6},
                 "decoded": {"max_abs_err": 3e-5, "max_rel_err": 1.1e-5}}, None, ["PASS", "FAIL"]),
        "dcae": ({"_class_name": "AutoencoderDC"}, e + "dc_ae",
                 {"latent": {"max_abs_err": 3e-5, "max_rel_err": 3e-5}}, 1e-4, ["PASS"]),
        "gemma": ({"model_type": "gemma3_text"}, e + "gemma3",
                  {"max_abs": 1e-5, "max_rel": 2e-6, "ref_scale": 5.0, "n_valid": 17}, None, ["PASS"]),
        "dino": ({"model_type": "dinov2"}, e + "dinov2",
                 {"last_hidden_state": {"max_abs_err": 1e-7, "max_rel_err": 1e-8, "passed": False}},
                 1e-5, ["FAIL"]),
        "radio": ({"model_type": "radio_vit"}, e + "radio",
                  {"a/summary": {"max_abs_err": 1e-6, "max_rel_err": float("nan")}}, 1e-5, ["FAIL"]),
    }
    calls, folders = {}, {}
    for name, (config, module, report, tol, _) in cases.items():
        folders[name] = _hub_folder(tmp_path, name, **config)
        calls[name] = _fake_encoder(monkeypatch, module, report, tol)
    assert parity.main([str(f) for f in folders.values()]) == 1
    out = capsys.readouterr().out
    for name, (_, module, report, tol, verdicts) in cases.items():
        assert calls[name] == [folders[name]], name
        lines = [ln for ln in out.splitlines() if f"  {name}  " in ln]
        assert [ln.split()[0] for ln in lines] == verdicts, (name, lines)
        assert all(f"{module}.parity_check" in ln for ln in lines)
        assert all(f"{tol or 1e-5:.0e}" in ln for ln in lines)
    assert "PASS  gemma  gemma3/output  max abs err 1.000e-05  max rel err 2.000e-06" in out
    assert "n_valid 17" in out

    unknown = _hub_folder(tmp_path, "unet", _class_name="UNet2DConditionModel")
    assert parity.main([str(folders["gemma"]), str(unknown)]) == 2
    out, err = capsys.readouterr()
    assert "ERROR unet" in err and "_class_name='UNet2DConditionModel'" in err
    assert "AutoencoderKL" in err and "PASS  gemma" in out

    _fake_encoder(monkeypatch, e + "dinov2", {"last_hidden_state": {"max_abs_err": 1.0}})
    with pytest.raises(parity.ParityInputError, match="no max relative error"):
        parity.check_directory(folders["dino"])


@pytest.mark.slow
def test_documented_command_passes_on_every_fixture():
    """The README's command, every folder checked for real (the encoder modules' own tests cover
    them in the default run)."""
    dirs = sorted(str(p) + "/" for p in parity_path("c2i_tiny").parent.iterdir() if p.is_dir())
    proc = _run_cli(*dirs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and proc.stdout.count("SKIP") == 2


def test_cli_fails_on_a_perturbed_copy(tmp_path, capsys):
    src = parity_path("time_weights")
    dst = _copy_fixture(src, tmp_path / "tw", skip=("time_weights.npz",))
    data = dict(np.load(src / "time_weights.npz"))
    data["sqrt/tangent/t_and_r"] = data["sqrt/tangent/t_and_r"] * np.float32(1.001)
    np.savez(dst / "time_weights.npz", **data)
    assert parity.main([str(dst)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "time_weights/sqrt/tangent/t_and_r" in out


def test_cli_fails_on_a_perturbed_network_copy(tmp_path, capsys):
    src = parity_path("c2i_tiny")
    dst = _copy_fixture(src, tmp_path / "c2i", skip=("io.npz", "sampler.npz"))
    data = dict(np.load(src / "io.npz"))
    data["case0/out"] = data["case0/out"].copy()
    data["case0/out"][0, 0, 0, 0] += 1e-3 * np.abs(data["case0/out"]).max()
    np.savez(dst / "io.npz", **data)
    assert parity.main([str(dst)]) == 1
    out = capsys.readouterr().out
    assert "network/case0/out" in out and "FAIL" in out


def test_cli_unusable_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert parity.main([str(empty)]) == 2  # skipped, so nothing was checked
    out, err = capsys.readouterr()
    assert "SKIP  empty  no config.json and no .npz" in out and "nothing was checked" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "time_weights.npz").write_bytes(b"this is not a zip archive")
    assert parity.main([str(corrupt)]) == 2
    assert "not a readable .npz" in capsys.readouterr().err

    assert parity.main([str(tmp_path / "does_not_exist")]) == 2
    assert "does_not_exist: not a directory" in capsys.readouterr().err

    half = tmp_path / "half"  # network outputs without the network
    half.mkdir()
    shutil.copyfile(parity_path("c2i_tiny") / "io.npz", half / "io.npz")
    assert parity.main([str(half), str(parity_path("time_weights"))]) == 2
    out, err = capsys.readouterr()
    assert "ERROR half" in err and "unknown fixture kind" in err and "config.json" in err
    assert out.count("PASS") == 30  # the other folder is still checked

    no_weights = _copy_fixture(parity_path("c2i_tiny"), tmp_path / "no_weights",
                               skip=("model.safetensors",))
    assert parity.main([str(no_weights)]) == 2
    assert "need model.safetensors" in capsys.readouterr().err


def test_cli_wrong_architecture_is_unusable(tmp_path, capsys):
    src = parity_path("c2i_tiny")
    dst = _copy_fixture(src, tmp_path / "wrong", skip=("sampler.npz",))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["depth"] = cfg["depth"] + 1
    (dst / "config.json").write_text(json.dumps(cfg))
    assert parity.main([str(dst)]) == 2
    err = capsys.readouterr().err
    assert "depth=3 vs 4" in err and "missing keys" in err


def _official_repo() -> pathlib.Path:
    repo = pathlib.Path(os.environ.get("TIM_OFFICIAL_REPO", REPO_ROOT.parent / "official"))
    if not (repo / "tim" / "models").is_dir():
        pytest.skip(f"official TiM checkout absent ({repo}; set TIM_OFFICIAL_REPO)")
    return repo


def _assert_live_ok(results, depth, n_precisions=2):
    fp32 = [r for r in results if r.quantity.endswith("[fp32]")]
    bf16 = [r for r in results if r.quantity.endswith("[bf16]")]
    assert len(fp32) >= depth + 3 and len(bf16) == (len(fp32) if n_precisions == 2 else 0)
    _assert_all_pass(results, n_precisions * (depth + 3))
    assert max(r.max_rel_err for r in fp32) <= 1e-5


@pytest.mark.torch
def test_live_mode_c2i_fixture():
    pytest.importorskip("torch")
    results = parity.live_compare(parity_path("c2i_tiny"), official_repo=str(_official_repo()),
                                  batch=2, seed=0)
    _assert_live_ok(results, depth=3)


@pytest.mark.torch
def test_live_mode_t2i_exported_weights(tmp_path):
    """t2i: random tim_jax weights exported to the official layout load strictly into the official
    network, which then computes the same function stage by stage."""
    pytest.importorskip("torch")
    import jax

    from tim_jax.interop import convert
    from tim_jax.models import functional, presets

    repo = _official_repo()
    cfg = presets.model_config("t2i_tiny")
    from flax import nnx

    abstract = nnx.to_pure_dict(functional.abstract_params(cfg))
    noise = np.random.default_rng(1)
    # every tensor random (norm scales around 1), so no zero-init layer hides a mapping error
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: ((1.0 if path[-1].key == "scale" else 0.0)
                         + 0.15 * noise.standard_normal(a.shape)).astype(np.float32), abstract)
    convert.export_official_safetensors(params, cfg, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(convert.model_config_to_official(cfg)))
    results = parity.live_compare(tmp_path, official_repo=str(repo), batch=2, seed=0,
                                  precisions=("fp32",))
    assert any(r.quantity == "live/y_embedder[fp32]" for r in results)
    _assert_live_ok(results, depth=2, n_precisions=1)
