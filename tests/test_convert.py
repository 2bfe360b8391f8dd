"""Official checkpoint import/export (python -m tim_jax.convert, tim_jax.interop.*) on the c2i_tiny
fixture (official TiM state dict, random weights) and small variants. Round trips are bit-exact:
the conversion only transposes, splits and concatenates float32 tensors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import REPO_ROOT, parity_path
from tim_jax.interop import convert
from tim_jax.models import functional


@pytest.fixture(scope="module")
def fixture():
    d = parity_path("c2i_tiny")
    official = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    return d, official, sd


@pytest.fixture(scope="module")
def cfg(fixture):
    return convert.model_config_from_official(fixture[1], dtype="float32")


# ----------------------------------------------------------------------------------------------
# reading and wrappers
# ----------------------------------------------------------------------------------------------
def test_load_safetensors_is_the_raw_state_dict(fixture):
    d, _, sd = fixture
    loaded = convert.load_official_state_dict(d / "model.safetensors")
    assert loaded.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(loaded[k], sd[k])


def test_wrappers_are_unwrapped(fixture):
    _, _, sd = fixture
    ema_sd = {k: v + 1 for k, v in sd.items()}
    variants = {
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled ddp": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "nested": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": 3},
        "model+ema": {"model": sd, "ema": ema_sd, "optimizer": {"lr": 1e-4}},
        "model+step": {"model": sd, "global_step": np.array(5)},
    }
    for name, raw in variants.items():
        out = convert.normalize_state_dict(raw)
        assert out.keys() == sd.keys(), name
        np.testing.assert_array_equal(out["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    ema = convert.normalize_state_dict(variants["model+ema"], ema=True)
    np.testing.assert_array_equal(ema["projector.0.bias"], ema_sd["projector.0.bias"])
    only_ema = convert.normalize_state_dict({"ema": {f"module.{k}": v for k, v in ema_sd.items()}})
    np.testing.assert_array_equal(only_ema["projector.0.bias"], ema_sd["projector.0.bias"])
    deep = convert.normalize_state_dict({"state_dict": variants["model+ema"]}, ema=True)
    np.testing.assert_array_equal(deep["projector.0.bias"], ema_sd["projector.0.bias"])
    with pytest.raises(ValueError, match="ema=True but no EMA sub-dict"):
        convert.normalize_state_dict({"model": sd}, ema=True)
    with pytest.raises(ValueError, match="no state dict found"):
        convert.normalize_state_dict({"optimizer": {"lr": 1.0}, "step": 1})


def test_wrapped_safetensors_file_loads(fixture, tmp_path):
    _, _, sd = fixture
    path = tmp_path / "ddp.safetensors"
    save_file({f"module._orig_mod.{k}": v for k, v in sd.items()}, str(path))
    loaded = convert.load_official_state_dict(path)
    assert loaded.keys() == sd.keys()


def test_corrupt_and_unsupported_files(fixture, tmp_path):
    d, _, _ = fixture
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((d / "model.safetensors").read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"not safetensors at all")
    for p in (truncated, garbage):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            convert.load_official_state_dict(p)
    with pytest.raises(ValueError, match="does not exist"):
        convert.load_official_state_dict(tmp_path / "absent.safetensors")
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint extension"):
        convert.load_official_state_dict(odd)


def test_torch_pickle_without_torch_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match=r"tim-jax\[torch\]"):
        convert.load_official_state_dict(p)


@pytest.mark.torch
def test_torch_pickle_roundtrip(fixture, tmp_path):
    torch = pytest.importorskip("torch")
    _, _, sd = fixture
    p = tmp_path / "model.pth"
    tensors = {f"module.{k}": torch.from_numpy(v.copy()) for k, v in sd.items()}
    tensors["module.t_embedder.mlp.0.weight"] = tensors["module.t_embedder.mlp.0.weight"].bfloat16()
    torch.save({"ema": tensors, "step": 7}, p)
    loaded = convert.load_official_state_dict(p, ema=True)
    assert loaded.keys() == sd.keys()
    assert loaded["t_embedder.mlp.0.weight"].dtype == np.float32  # bf16 widened
    np.testing.assert_array_equal(loaded["x_embedder.proj.weight"], sd["x_embedder.proj.weight"])
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="torch.load"):
        convert.load_official_state_dict(corrupt)


# ----------------------------------------------------------------------------------------------
# architecture checks
# ----------------------------------------------------------------------------------------------
def test_official_shapes_match_the_fixture(fixture, cfg):
    _, _, sd = fixture
    shapes = convert.official_param_shapes(cfg)
    assert shapes == {k: v.shape for k, v in sd.items()}
    inferred = convert.infer_official_config(sd)
    for k in ("depth", "hidden_size", "patch_size", "in_channels", "num_heads",
              "lora_hidden_size", "projector_dim", "z_dim"):
        assert inferred[k] == fixture[1][k], k
    assert inferred["label_rows"] == fixture[1]["num_classes"] + 1
    assert inferred["kind"] == "c2i" and inferred["use_new_embed"] and inferred["distance_aware"]


def test_missing_block_is_reported(fixture, cfg):
    _, _, sd = fixture
    cut = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    with pytest.raises(ValueError) as e:
        convert.official_to_params(cut, cfg)
    msg = str(e.value)
    assert "depth=2 vs 3" in msg
    assert "missing keys (21)" in msg and "blocks.2.* (21 keys per block" in msg


def test_wrong_width_and_extra_keys_are_reported(fixture, cfg):
    _, _, sd = fixture
    bad = dict(sd)
    bad["blocks.1.attn.proj.weight"] = np.zeros((64, 32), np.float32)
    bad["pos_embed"] = np.zeros((1, 16, 64), np.float32)
    with pytest.raises(ValueError) as e:
        convert.official_to_params(bad, cfg)
    msg = str(e.value)
    assert "unexpected keys (1)" in msg and "pos_embed" in msg
    assert "blocks.1.attn.proj.weight: (64, 32) vs (64, 64)" in msg


def test_other_hidden_size_is_named(fixture):
    _, official, sd = fixture
    wide = convert.model_config_from_official({**official, "hidden_size": 128, "lora_hidden_size": 24})
    with pytest.raises(ValueError, match="hidden_size=64 vs 128"):
        convert.official_to_params(sd, wide)


def test_model_config_from_official_rejects_unknown_fields(fixture):
    _, official, _ = fixture
    with pytest.raises(ValueError, match="fields tim_jax does not know"):
        convert.model_config_from_official({**official, "use_rope_v2": True})


# ----------------------------------------------------------------------------------------------
# mapping round trips
# ----------------------------------------------------------------------------------------------
def test_flat_mapping_is_a_bijection(fixture):
    _, _, sd = fixture
    flat = convert.official_to_flat(sd)
    fc1 = flat[("blocks", 0, "mlp", "fc1", "kernel")]
    assert fc1.shape == (64, 2 * 170)
    np.testing.assert_array_equal(fc1[:, :170], sd["blocks.0.mlp.fc1_g.weight"].T)
    np.testing.assert_array_equal(flat[("x_embedder", "proj", "kernel")],
                                  sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0))
    back = convert.flat_to_official(flat)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


@pytest.mark.parametrize("scan", [False, True])
def test_import_export_import_roundtrip(fixture, scan, tmp_path):
    d, official, sd = fixture
    cfg = convert.model_config_from_official(official, scan_blocks=scan)
    params = convert.official_to_params(sd, cfg)
    out = tmp_path / "export.safetensors"
    convert.export_official_safetensors(params, cfg, out)
    exported = load_file(str(out))
    assert exported.keys() == sd.keys()
    for k in sd:
        assert exported[k].dtype == np.float32
        np.testing.assert_array_equal(exported[k], sd[k])
    again = convert.official_to_params(convert.load_official_state_dict(out), cfg)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(params), nnx.to_pure_dict(again))


def test_params_match_the_model_structure(fixture, cfg):
    params = convert.official_to_params(fixture[2], cfg)
    want = jax_shapes(nnx.to_pure_dict(functional.abstract_params(cfg)))
    got = jax_shapes(nnx.to_pure_dict(params))
    assert got == want


def jax_shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


# ----------------------------------------------------------------------------------------------
# CLI + converted directory
# ----------------------------------------------------------------------------------------------
def test_cli_convert_then_load_gives_the_official_outputs(fixture, tmp_path):
    import jax.numpy as jnp

    d, _, sd = fixture
    out = tmp_path / "converted"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tim_jax.convert", "--official", str(d / "model.safetensors"),
         "--config-json", str(d / "config.json"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "model_config.json").is_file() and (out / "params").is_dir()
    meta = json.loads((out / "conversion.json").read_text())
    assert meta["num_tensors"] == len(sd) and len(meta["source_sha256"]) == 64

    cfg, params = convert.load_converted(out)
    io = np.load(d / "io.npz")
    apply_fn = jax.jit(functional.make_apply_fn(functional.abstract_model(cfg)[0]),
                       static_argnames="return_proj")
    x = jnp.asarray(np.moveaxis(io["case0/x"], 1, -1))
    y = jnp.asarray(io["case0/y"].astype(np.int32))
    F, h = apply_fn(params, x, jnp.asarray(io["case0/t"]), jnp.asarray(io["case0/r"]), y, return_proj=True)
    ref = io["case0/out"]
    np.testing.assert_allclose(np.moveaxis(np.asarray(F), -1, 1), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(h), io["case0/h_proj"], rtol=0,
                               atol=1e-5 * np.abs(io["case0/h_proj"]).max())

    # the same directory restacked for scan_blocks
    _, scanned = convert.load_converted(out, scan_blocks=True)
    back = convert.params_to_official(scanned)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])

    # exported back with the README's command: every tensor of the official file, bit-exact
    exported = tmp_path / "exported.safetensors"
    assert convert.main(["--export", str(out), "--out", str(exported)]) == 0
    _assert_same_state_dict(load_file(str(exported)), sd)


def _assert_same_state_dict(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cli_exports_a_training_runs_ema_export(fixture, tmp_path, capsys):
    """A run's checkpoint (scanned blocks, EMA params = the fixture's weights) through
    `python -m tim_jax.training.export` and then `python -m tim_jax.convert --export`: the
    official file is the fixture's state dict again, bit-exact."""
    from tim_jax.training import export
    from tim_jax.training.checkpointing import Checkpointer

    d, official, sd = fixture
    cfg = convert.model_config_from_official(official, scan_blocks=True)
    ema = nnx.to_pure_dict(convert.official_to_params(sd, cfg))
    raw = jax.tree.map(lambda a: a * 0 + 1, ema)  # online params: differ from the EMA ones
    with Checkpointer(tmp_path / "run", every_steps=1) as ck:
        ck.save(5, {"params": raw, "ema_params": ema}, config={"model": cfg.to_dict()})
    export.export_ema(tmp_path / "run", None, tmp_path / "ema")
    out = tmp_path / "ema_official.safetensors"
    assert convert.main(["--export", str(tmp_path / "ema"), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    _assert_same_state_dict(load_file(str(out)), sd)


def test_cli_arguments(tmp_path, capsys):
    for argv in (["--help"], ["-h"]):
        with pytest.raises(SystemExit) as e:
            convert.main(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--export DIR --out FILE.safetensors" in text and "--official FILE" in text
    wrong = {
        "--out": (["--export", str(tmp_path)], "the following arguments are required: --out"),
        "neither": (["--out", str(tmp_path / "o")], "give --official FILE"),
        "both": (["--official", "a.safetensors", "--export", "d", "--out", "o"], "exclude each other"),
        "import flag": (["--export", "d", "--preset", "c2i_tiny", "--out", "o.safetensors"],
                        "--preset only apply to an import"),
        "no arch": (["--official", "a.safetensors", "--out", "o"], "--preset NAME or --config-json"),
    }
    for name, (argv, message) in wrong.items():
        try:
            rc = convert.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        assert rc == 2, name
        assert message in capsys.readouterr().err, name
    assert convert.main(["--export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "neither a converted tim_jax directory" in err and "export.json" in err


def test_cli_reports_a_wrong_architecture(fixture, tmp_path, capsys):
    d, official, sd = fixture
    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, str(cut))
    rc = convert.main(["--official", str(cut), "--config-json", str(d / "config.json"),
                       "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "missing keys (21)" in err and "blocks.1.* (21 keys per block" in err


def test_load_converted_rejects_other_directories(tmp_path):
    with pytest.raises(ValueError, match="not a converted tim_jax checkpoint"):
        convert.load_converted(tmp_path)


@pytest.mark.parametrize("preset,overrides", [
    ("t2i_tiny", {}),
    ("t2i_tiny", {"scan_blocks": True}),
    ("c2i_tiny", {"use_new_embed": False, "distance_aware": False, "qk_norm": False,
                  "lora_hidden_size": None, "class_dropout_prob": 0.0}),
])
def test_mapping_agrees_with_the_models_for_other_architectures(preset, overrides):
    """tim_jax params of other architectures map onto exactly the official keys/shapes (derived
    from the official constructors) and back, bit-exactly (values: distinct random numbers)."""
    from tim_jax.models import presets

    cfg = presets.model_config(preset, **overrides)
    abstract = nnx.to_pure_dict(functional.abstract_params(cfg))
    rng = np.random.default_rng(0)
    pure = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
    sd = convert.params_to_official(pure, cfg)  # validates keys and shapes against the config
    assert {k: v.shape for k, v in sd.items()} == convert.official_param_shapes(cfg)
    back = convert.official_to_pure_params(sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, pure)
