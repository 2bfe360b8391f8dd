"""The Colab notebook ``launch/colab/tim_jax_colab.ipynb`` runs end to end on tiny local files.

Its code cells are executed in order, in one namespace, in a fresh CPU Python process (no
Jupyter kernel: nbclient/nbformat are not needed; the notebook is read as JSON and every code
cell is plain Python). As papermill does, the cell tagged ``parameters`` runs as written and an
injected cell right after it points every path at the tiny fixtures (official-layout c2i_tiny
+ tiny SD-VAE; a converted t2i directory with random weights + tiny DC-AE + tiny Gemma-3) and
turns INSTALL / DOWNLOAD off, so nothing is installed or downloaded. The test checks that the
checkpoint was converted and that every grid PNG was written with the expected size.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab" / "tim_jax_colab.ipynb"

DRIVER = r'''
import json, sys, traceback
notebook, overrides, record = sys.argv[1:4]
cells = [c for c in json.load(open(notebook))["cells"] if c["cell_type"] == "code"]
namespace = {"__name__": "__main__"}
for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    exec(compile(source, f"<notebook cell {i}>", "exec"), namespace)
    if "parameters" in cell.get("metadata", {}).get("tags", []):
        exec(compile(open(overrides).read(), "<injected parameters>", "exec"), namespace)
json.dump({"GRIDS": namespace["GRIDS"], "C2I_WEIGHTS": namespace["C2I_WEIGHTS"]},
          open(record, "w"))
'''


def fixture(name: str) -> Path:
    path = Path(__file__).parent / "fixtures" / "parity" / name
    if not path.is_dir():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


def _random_t2i_dir(path: Path) -> Path:
    """A converted t2i directory sized for the tiny Gemma (hidden 64) and DC-AE (8 channels)."""
    from flax import nnx, traverse_util

    from tim_jax.interop import convert
    from tim_jax.models import abstract_model, model_config, params_from_pure_dict

    cfg = model_config("t2i_tiny", cap_feat_dim=64, in_channels=8)
    _, shapes = abstract_model(cfg)
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(shapes))
    pure = traverse_util.unflatten_dict({
        k: 0.05 * rng.standard_normal(v.shape).astype(np.float32) + np.float32(k[-1] == "scale")
        for k, v in flat.items()})
    return convert.save_converted(path, cfg, params_from_pure_dict(cfg, pure))


def test_parameters_cell_is_unique_and_downloads_are_conditional():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    source = "".join(tagged[0]["source"])
    for name in ("REPO_URL", "INSTALL", "DOWNLOAD", "GoodEnough/TiM-C2I", "GoodEnough/TiM-T2I",
                 "stabilityai/sd-vae-ft-ema", "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
                 "google/gemma-3-1b-it"):
        assert name in source, name
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    for src in code:
        if "hf_hub_download(" in src or "snapshot_download(" in src:
            assert "if DOWNLOAD:" in src
        if '"pip", "install"' in src:
            assert "if INSTALL:" in src


def test_notebook_runs_on_tiny_checkpoints(tmp_path):
    work = tmp_path / "work"
    t2i = _random_t2i_dir(tmp_path / "t2i_converted")
    overrides = {
        "INSTALL": False, "DOWNLOAD": False, "WORK_DIR": str(work),
        "C2I_CHECKPOINT": str(fixture("c2i_tiny") / "model.safetensors"), "C2I_PRESET": "c2i_tiny",
        "C2I_VAE": str(fixture("sd_vae_tiny")),
        "T2I_CHECKPOINT": str(t2i), "T2I_VAE": str(fixture("dc_ae_tiny")),
        "TEXT_ENCODER": str(fixture("gemma3_tiny")),
        "TOKENIZER": str(fixture("gemma3_tiny_tokenizer")),
        "DTYPE": "float32", "CLASS_LABELS": [1, 2, 3], "C2I_SIZE": (16, 24),
        "C2I_STEP_COUNTS": [1, 2], "PROMPTS": ["a photo of a dog", "blue sky"],
        "T2I_SIZE": (16, 16), "T2I_STEP_COUNTS": [1],
    }
    params = tmp_path / "parameters.py"
    params.write_text("".join(f"{k} = {v!r}\n" for k, v in overrides.items()))
    record = tmp_path / "record.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(NOTEBOOK), str(params), str(record)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(record.read_text())
    assert (Path(got["C2I_WEIGHTS"]) / "model_config.json").is_file()   # converted by the notebook
    sizes = {name: Image.open(path).size for name, path in got["GRIDS"].items()}
    assert sizes == {"c2i_1steps": (3 * (24 + 2) + 2, 16 + 4),
                     "c2i_2steps": (3 * (24 + 2) + 2, 16 + 4),
                     "t2i_1steps": (2 * (16 + 2) + 2, 16 + 4)}
    assert all(Path(p).parent == work / "grids" for p in got["GRIDS"].values())
    c2i = [np.asarray(Image.open(got["GRIDS"][f"c2i_{n}steps"])) for n in (1, 2)]
    assert not np.array_equal(*c2i)
