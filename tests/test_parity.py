"""tim_jax against the official-TiM parity fixtures (../shared/parity), through tim_jax.parity.

Tolerances (tim_jax.parity.TOLERANCES): network and projector outputs 1e-5 of the output scale
(fp32), sampler trajectories 1e-4 of the scale, transports 1e-10 (float64), time weights 1e-6,
sample_t quantiles within 5 Monte-Carlo standard errors.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, parity_path
from tim_jax import parity


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
    good = parity._sample_t_check("d", "OT_FM", make_transport("OT_FM", P_mean=-0.4, P_std=1.0), q)
    bad = parity._sample_t_check("d", "OT_FM", make_transport("OT_FM", P_mean=-0.35, P_std=1.0), q)
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
    assert "FAIL" not in out
    assert out.count("PASS") == 2 + 3 + 35 + 30
    for col in ("quantity", "max abs err", "max rel err", "tolerance"):
        assert col in out


def test_cli_entry_point():
    """`python -m tim_jax.parity` itself (the cheap fixture; main() is tested in-process above)."""
    proc = _run_cli(parity_path("time_weights"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 30 and "FAIL" not in proc.stdout


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
    assert parity.main([str(empty)]) == 2
    assert "no fixture files" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "time_weights.npz").write_bytes(b"this is not a zip archive")
    assert parity.main([str(corrupt)]) == 2
    assert "not a readable .npz" in capsys.readouterr().err

    assert parity.main([str(tmp_path / "does_not_exist")]) == 2

    half = tmp_path / "half"
    half.mkdir()
    shutil.copyfile(parity_path("c2i_tiny") / "io.npz", half / "io.npz")
    assert parity.main([str(half)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_wrong_architecture_is_unusable(tmp_path, capsys):
    import json

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
    import json

    import jax

    from tim_jax import convert
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
