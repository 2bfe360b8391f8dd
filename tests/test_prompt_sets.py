"""Text-to-image benchmark folders (tim_jax.evaluation.prompt_sets / prompts_cli).

The layouts are checked the way the evaluators read them (GenEval's ``evaluate_images.py``:
digit-named folders, ``metadata.jsonl`` read with ``json.load``, ``samples/\\d+.png``; DPG-Bench's
``compute_dpg_bench.py``: one image per ``<key>.png``, quadrants cropped in the order TL, TR, BL,
BR; MJHQ's scripts: ``*.jpg`` found recursively, named ``<category>/<key>.jpg``). Generation uses
a random ``t2i_tiny`` TiM (cap_feat_dim = 64 = the hidden size of ``gemma3_tiny``, 8 latent
channels as ``dc_ae_tiny``), every parameter random so that prompts and noise both matter.
"""
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import parity_path
from tim_jax.evaluation import prompt_sets as ps
from tim_jax.evaluation import prompts_cli


def _images(k, h=8, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (k, h, w, 3), dtype=np.uint8)


def test_shipped_prompt_files_and_their_sources():
    gen = ps.load_prompt_set("geneval")
    assert len(gen) == 553 and gen[0].key == "00000" and gen[552].key == "00552"
    assert gen[0].prompt == "a photo of a bench" and gen[0].metadata["tag"] == "single_object"
    assert {it.metadata["tag"] for it in gen} == {"single_object", "two_object", "counting",
                                                  "colors", "position", "color_attr"}
    dpg = ps.load_prompt_set("dpg")
    keys = [it.key for it in dpg]
    assert len(dpg) == 1065 == len(set(keys)) and "0" in keys
    assert "COCOval2014000000010363" in keys and all(it.prompt.strip() for it in dpg)
    source = (ps.PROMPTS_DIR / "SOURCE.md").read_text()
    for name in ("geneval_metadata.jsonl", "dpg_bench_prompts.jsonl", "MIT", "Apache-2.0",
                 "meta_data.json"):
        assert name in source, name
    assert "MIT License" in (ps.PROMPTS_DIR / "LICENSE.geneval").read_text()
    with pytest.raises(ValueError, match="not shipped"):
        ps.load_prompt_set("mjhq")
    with pytest.raises(ValueError, match="unknown prompt set"):
        ps.load_prompt_set("coco")


def test_other_prompt_sources(tmp_path):
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "b.txt").write_text("second prompt")
    (tmp_path / "dpg" / "a.txt").write_text("first prompt\n")
    items = ps.load_prompt_set("dpg", tmp_path / "dpg")
    assert [(it.key, it.prompt) for it in items] == [("a", "first prompt\n"),
                                                     ("b", "second prompt")]
    meta = {"k1": {"prompt": "a cat", "category": "animals"},
            "k0": {"prompt": "a car", "category": "vehicles"}}
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    items = ps.load_prompt_set("mjhq", tmp_path / "meta_data.json")
    assert [(it.key, it.category) for it in items] == [("k1", "animals"), ("k0", "vehicles")]
    (tmp_path / "bad.json").write_text(json.dumps({"k": {"prompt": "no category"}}))
    with pytest.raises(ValueError, match="meta_data.json"):
        ps.load_prompt_set("mjhq", tmp_path / "bad.json")


def test_layouts_as_the_evaluators_read_them(tmp_path):
    gen = ps.load_prompt_set("geneval")[:2]
    for i, it in enumerate(gen):
        ps.write_item("geneval", it, _images(4, seed=i), tmp_path / "geneval")
    found = {}
    for sub in os.listdir(tmp_path / "geneval"):  # evaluate_images.py's walk
        folder = tmp_path / "geneval" / sub
        assert folder.is_dir() and sub.isdigit()
        with open(folder / "metadata.jsonl") as fp:
            meta = json.load(fp)
        names = sorted(n for n in os.listdir(folder / "samples") if re.match(r"\d+\.png", n))
        found[sub] = (meta, names)
        samples = np.stack([np.asarray(Image.open(folder / "samples" / n)) for n in names])
        np.testing.assert_array_equal(samples, _images(4, seed=int(sub)))
        grid = np.asarray(Image.open(folder / "grid.png"))
        np.testing.assert_array_equal(grid[:8, 6:], samples[1])  # row 0, column 1
    assert found == {"00000": (gen[0].metadata, ["00000.png", "00001.png", "00002.png",
                                                 "00003.png"]),
                     "00001": (gen[1].metadata, ["00000.png", "00001.png", "00002.png",
                                                 "00003.png"])}
    dpg = ps.load_prompt_set("dpg")[:1]
    ps.write_item("dpg", dpg[0], _images(4), tmp_path / "dpg")
    assert os.listdir(tmp_path / "dpg") == [f"{dpg[0].key}.png"]
    image = Image.open(tmp_path / "dpg" / f"{dpg[0].key}.png")
    width, height = image.size
    w, h = width // 2, height // 2
    crops = [(0, 0, w, h), (w, 0, width, h), (0, h, w, height), (w, h, width, height)]
    for k, box in enumerate(crops):  # compute_dpg_bench.py's quadrants, --pic-num 4
        np.testing.assert_array_equal(np.asarray(image.crop(box)), _images(4)[k])
    item = ps.PromptItem("k7", "a cat", category="animals")
    ps.write_item("mjhq", item, _images(1, 16, 16), tmp_path / "mjhq")
    files = sorted((tmp_path / "mjhq").rglob("*.jpg"))
    assert [str(f.relative_to(tmp_path / "mjhq")) for f in files] == ["animals/k7.jpg"]
    assert Image.open(files[0]).size == (16, 16)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left


# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t2i_model():
    from tim_jax.models import init_params, model_config

    cfg = model_config("t2i_tiny", cap_feat_dim=64, in_channels=8)
    graphdef, params = init_params(cfg, key=0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: np.asarray(rng.standard_normal(p.shape) * 0.05,
                                               np.float32), params)
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def pipe(t2i_model):
    from tim_jax.encoders.autoencoder import load_autoencoder
    from tim_jax.encoders.gemma3 import Gemma3TextEncoder
    from tim_jax.encoders.text_encoder import load_tokenizer
    from tim_jax.inference import TiMPipeline

    cfg, graphdef, params = t2i_model
    # max_length 8: every prompt here is cut to 8 tokens, so all calls share one shape
    return TiMPipeline(cfg, graphdef, params, load_autoencoder(parity_path("dc_ae_tiny")),
                       text_encoder=Gemma3TextEncoder.from_pretrained(parity_path("gemma3_tiny")),
                       tokenizer=load_tokenizer(parity_path("gemma3_tiny_tokenizer")),
                       max_length=8)


def test_generation_resumes_and_is_deterministic(pipe, tmp_path):
    items = ps.load_prompt_set("geneval")[:3]  # groups of 2: [0, 1], [2]
    kw = dict(steps=[1], prompts_per_call=2, seed=0, cfg_scale=1.0)
    first = ps.generate_prompt_set(pipe, "geneval", items, tmp_path, max_groups=1, **kw)
    assert first == {"made": 1, "complete": False}
    out = tmp_path / "steps1"
    assert sorted(os.listdir(out)) == ["00000", "00001"]
    stamp = os.stat(out / "00000" / "samples" / "00000.png").st_mtime_ns
    assert ps.generate_prompt_set(pipe, "geneval", items, tmp_path, **kw) == {
        "made": 1, "complete": True}
    assert os.stat(out / "00000" / "samples" / "00000.png").st_mtime_ns == stamp  # not redone
    read = lambda i, k: np.asarray(Image.open(out / f"{i:05d}" / "samples" / f"{k:05d}.png"))
    assert read(0, 0).shape == (16, 16, 3)
    assert not np.array_equal(read(0, 0), read(0, 1))  # distinct noise per sample
    assert not np.array_equal(read(0, 0), read(2, 0))  # and per group (other seed)
    kept = read(2, 3)
    os.remove(out / "00002" / "samples" / "00003.png")  # a lost file: its group is redone
    assert ps.generate_prompt_set(pipe, "geneval", items, tmp_path, **kw)["made"] == 1
    np.testing.assert_array_equal(read(2, 3), kept)
    # the other sets through the same pipeline (one compiled shape: 8 rows, 8 tokens)
    dpg = ps.load_prompt_set("dpg")[:2]
    ps.generate_prompt_set(pipe, "dpg", dpg, tmp_path / "dpg", **kw)
    assert sorted(os.listdir(tmp_path / "dpg" / "steps1")) == sorted(f"{it.key}.png" for it in dpg)
    assert Image.open(tmp_path / "dpg" / "steps1" / f"{dpg[0].key}.png").size == (32, 32)
    mj = [ps.PromptItem(f"m{i}", f"a photo of thing number {i}", category=c)
          for i, c in enumerate(["animals", "food", "animals"])]
    ps.generate_prompt_set(pipe, "mjhq", mj, tmp_path / "mjhq", steps=[1], prompts_per_call=3,
                           cfg_scale=1.0)
    assert sorted(str(p.relative_to(tmp_path / "mjhq" / "steps1"))
                  for p in (tmp_path / "mjhq").rglob("*.jpg")) == [
        "animals/m0.jpg", "animals/m2.jpg", "food/m1.jpg"]
    with pytest.raises(ValueError, match="4 samples"):
        ps.generate_prompt_set(pipe, "dpg", dpg, tmp_path / "x", steps=[1], samples_per_prompt=2)


def test_cli_writes_the_geneval_folders(t2i_model, tmp_path, capsys):
    from tim_jax.interop.convert import save_converted

    cfg, _, params = t2i_model
    ckpt = save_converted(tmp_path / "t2i", cfg, params)
    def argv(cfg="1.0", kind="geneval"):
        return ["--set", kind, "--limit", "2", "--prompts-per-call", "2", "--steps", "1",
                "--checkpoint", str(ckpt), "--vae", str(parity_path("dc_ae_tiny")),
                "--text-encoder", str(parity_path("gemma3_tiny")),
                "--tokenizer", str(parity_path("gemma3_tiny_tokenizer")), "--cfg", cfg,
                "--no-progress", "--out", str(tmp_path / "out")]

    assert prompts_cli.main(argv()) == 0
    folder = tmp_path / "out" / "geneval" / "steps1"
    assert sorted(os.listdir(folder)) == ["00000", "00001"]
    assert len(os.listdir(folder / "00001" / "samples")) == 4
    assert "evaluate_images.py" in capsys.readouterr().out
    settings = json.loads((tmp_path / "out" / "geneval" / "run.json").read_text())["settings"]
    assert settings["samples_per_prompt"] == 4 and settings["cfg_scale"] == 1.0
    with pytest.raises(SystemExit, match="cfg_scale"):
        prompts_cli.main(argv(cfg="2.0"))
    with pytest.raises(SystemExit):
        prompts_cli.main(argv(kind="mjhq"))  # MJHQ needs --prompts
    assert "--set mjhq needs --prompts" in capsys.readouterr().err
