"""``python -m tim_jax.bench.sample``: the sampler-speed benchmark (tim_jax alone, or side by side
with the official sampler).

The side-by-side test needs a torch interpreter and an official checkout at
``TIM_JAX_TORCH_PYTHON`` / ``TIM_JAX_OFFICIAL_REPO`` (default: ``../venv_torch/bin/python`` and
``../official`` beside the repo) and is skipped with the reason otherwise.
"""
import json
import os
import pathlib

import numpy as np
import pytest

from tim_jax.bench import sample
from tim_jax.transports import make_transport

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = os.environ.get("TIM_JAX_TORCH_PYTHON", str(REPO.parent / "venv_torch/bin/python"))
OFFICIAL_REPO = os.environ.get("TIM_JAX_OFFICIAL_REPO", str(REPO.parent / "official"))
# the project's fp32 bar: max |diff| <= 1e-5 * max |ref|. The official sampler keeps its state in
# float64 and ours in float32; the network is the same fp32 function on both sides.
LATENT_RTOL = 1e-5


def field(text: str, name: str) -> str:
    """The value of the report line ``name : value``."""
    rows = [ln.split(":", 1)[1].strip() for ln in text.splitlines()
            if ln.split(":", 1)[0].strip() == name]
    assert len(rows) == 1, (name, text)
    return rows[0]


def test_guided_steps_follow_the_sampler_window():
    """Guided where s > 1 and cfg_low T_max < t_k < cfg_high T_max, strictly, on the float32
    grid: t = 1 (the first step) and t = 0.7 at the window's edge are not guided."""
    ot = make_transport("OT_FM")
    assert sample.guided_steps(ot, 4, 1.5, 0.0, 0.7) == [False, False, True, True]
    assert sample.guided_steps(ot, 10, 1.5, 0.0, 0.7) == [False] * 4 + [True] * 6
    assert sample.guided_steps(ot, 4, 1.0, 0.0, 1.0) == [False] * 4
    assert sample.guided_steps(ot, 8, 1.5, 0.0, 0.7) == [False] * 3 + [True] * 5


def test_presets_and_config_files_resolve():
    cfg, tr, src = sample.resolve_preset("c2i_b4_256", "float32")
    assert (cfg.patch_size, cfg.hidden_size, tr.name, src) == (4, 768, "OT_FM", "preset c2i_b4_256")
    cfg, tr, src = sample.resolve_preset("c2i_s2_256", "bfloat16")   # configs/c2i_s2_256.py
    assert (cfg.hidden_size, cfg.patch_size, cfg.dtype, tr.P_mean) == (384, 2, "bfloat16", -0.4)
    assert src.startswith("config ") and src.endswith("c2i_s2_256.py")
    assert sample.latent_side(cfg, 256) == 32
    with pytest.raises(ValueError, match="multiple of 16"):
        sample.latent_side(cfg, 200)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "no_such_model"], "neither a model preset"),
    (["--quick", "--official-repo", "/x"], "needs both --official-repo and --torch-python"),
    (["--quick", "--rounds", "0"], "must be >= 1"),
    (["--quick", "--cfg-interval", "0.7,0.2"], "low < high"),
])
def test_bad_command_lines_exit_2_naming_the_problem(capsys, argv, message):
    assert sample.main(["prog", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_cli_dispatches_the_sample_mode(capsys):
    """``python -m tim_jax.bench sample ...`` is this benchmark, with its own options."""
    from tim_jax.bench import cli

    assert cli.main(["prog", "sample", "--help"]) == 0
    assert "--official-repo" in capsys.readouterr().out
    assert cli.main(["prog", "sample", "--preset", "no_such_model"]) == 2
    assert "neither a model preset" in capsys.readouterr().err
    assert cli.main(["prog", "--help"]) == 0
    assert "'sample --help'" in capsys.readouterr().out


def test_quick_run_of_the_jax_side(tmp_path):
    """A real, tiny run: the sampler compiles once, its calls are timed and reported."""
    out = tmp_path / "res.json"
    assert sample.main(["prog", "--quick", "--steps", "2", "--rounds", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    j = res["jax"]
    assert (res["preset"], res["batch"], res["latent"], res["num_steps"]) == ("c2i_tiny", 2, [8, 8, 4], 2)
    assert (res["guided_steps"], res["rows_per_call"], res["nfe_per_call"]) == (1, 2 + 4, 2)
    assert j["lower_s"] > 0 and j["compile_s"] > 0 and j["call_s"]["n"] == 1
    assert j["ms_per_nfe"] == pytest.approx(1e3 * j["call_s"]["median"] / 2)
    assert j["images_per_s"] == pytest.approx(2 / j["call_s"]["median"])
    assert "torch" not in res and "rounds" not in res


class _FakeSides:
    """Both samplers with programmed times: each turn's first call is a slow (10 s) untimed
    one; then JAX takes 0.5 s in round 0 and 0.25 s in round 1, torch 1.0 s in both."""

    def __init__(self):
        self.calls, self.jax_lat = [], np.linspace(-3, 2, 2 * 8 * 8 * 4, dtype=np.float32).reshape(2, 8, 8, 4)
        sides = self

        class Jax:
            def __init__(self, graphdef, params, z, y, **kw):
                self.lower_s, self.compile_s, self.n_params = 1.5, 2.5, 305_660
                sides.jax_kw, sides.z = kw, z

            def latents(self):
                return sides.jax_lat

            def run(self, k):
                sides.calls.append(("jax", k))
                t = 0.5 if sum(w == "jax" for w, _ in sides.calls) == 1 else 0.25
                return [10.0] + [t] * (k - 1)

        class Torch:
            def __init__(self, torch_python, spec, command, **kw):
                sides.spec, sides.command = spec, command
                self.info = {"torch": "2.x", "threads": 2}

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def sample(self, calls, save=None):
                sides.calls.append(("torch", calls))
                if save:   # the official latents differ from ours by 1e-3 in one place
                    lat = sides.jax_lat.copy()
                    lat[1, 2, 3, 0] += 1e-3
                    np.save(save, lat.transpose(0, 3, 1, 2))
                    sides.inputs = dict(np.load(sides.command["inputs"]))
                return {"times": [10.0] + [1.0] * (calls - 1), "n_params": 305_660, "build_s": 0.5,
                        "attn_type": "fused_attn", "precision": "float32"}

        self.jax_cls, self.torch_cls = Jax, Torch


def test_report_arithmetic_with_fake_timings(monkeypatch, capsys, tmp_path):
    """The whole bench path (real params, export, inputs file, rounds, report) with both samplers
    replaced by programmed times: untimed opening calls are left out, ratios are per round."""
    sides = _FakeSides()
    monkeypatch.setattr(sample, "JaxSampler", sides.jax_cls)
    monkeypatch.setattr(sample, "TorchOfficialSampler", sides.torch_cls)
    out = tmp_path / "res.json"
    assert sample.main(["prog", "--quick", "--official-repo", "/official", "--torch-python", "/py",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    text = capsys.readouterr().out
    # first calls (the latents check), then turns jax, torch | torch, jax: 1 untimed + 1 timed
    assert sides.calls == [("torch", 0), ("jax", 2), ("torch", 2), ("torch", 2), ("jax", 2)]
    assert [(r["jax_median"], r["torch_median"], r["ratio"], r["first"]) for r in res["rounds"]] == [
        (0.5, 1.0, 2.0, "jax"), (0.25, 1.0, 4.0, "torch")]
    assert (res["speedup"], res["speedup_min"], res["speedup_max"], res["speedup_best"]) == (3.0, 2.0, 4.0, 4.0)
    assert res["speedup_by_first"] == {"jax": 2.0, "torch": 4.0}
    # 4 steps on the grid 1, .75, .5, .25 with the window (0, 0.7): the last two guided (2B rows)
    assert (res["nfe_per_call"], res["guided_steps"], res["rows_per_call"]) == (4, 2, 2 + 2 + 4 + 4)
    j, t = res["jax"], res["torch"]
    assert j["call_s"]["median"] == 0.375 and j["ms_per_nfe"] == pytest.approx(375.0 / 4)
    assert j["images_per_s"] == pytest.approx(2 / 0.375) and t["images_per_s"] == pytest.approx(2.0)
    assert t["ms_per_nfe"] == pytest.approx(250.0) and (j["compile_s"], j["lower_s"]) == (2.5, 1.5)
    assert res["latents_max_abs_err"] == pytest.approx(1e-3, rel=1e-3)
    assert res["latents_max_rel_err"] == pytest.approx(1e-3 / 3.0, rel=1e-3)
    # the official side gets the same noise (NCHW), labels and null label, and the settings
    z = sides.inputs["z"]
    assert z.shape == (2, 4, 8, 8) and np.array_equal(z.transpose(0, 2, 3, 1), sides.z)
    assert np.array_equal(sides.inputs["y_null"], [10, 10])
    c = sides.command
    assert (c["num_steps"], c["cfg_scale"], c["cfg_low"], c["cfg_high"], c["T_max"]) == (4, 1.5, 0.0, 0.7, 1.0)
    assert sides.spec["mode"] == "sample" and sides.spec["precision"] == "float32"
    assert sides.spec["model"]["hidden_size"] == 64 and sides.spec["transport"]["name"] == "OT_FM"
    assert sides.jax_kw["num_steps"] == 4 and sides.jax_kw["num_classes"] == 10
    assert field(text, "speed-up per NFE").startswith("3.000x (median of per-round torch/jax; range "
                                                      "2.000-4.000")
    assert field(text, "rounds (torch/jax)") == "1.000/0.500=2.000, 1.000/0.250=4.000"
    assert field(text, "tim_jax call") == "375.0 ms median (min 250.0, max 500.0, n=2) = 93.75 ms/NFE, 5.333 images/s"
    assert field(text, "official call").endswith("= 250.00 ms/NFE, 2.000 images/s")
    assert field(text, "NFE convention").endswith("4 NFEs, 12 rows per sampler call")
    assert field(text, "by opener").startswith("jax-first rounds 2.000x, torch-first rounds 4.000x")


def _skip_without_torch_or_official():
    if not os.path.isfile(TORCH_PYTHON):
        pytest.skip(f"no torch interpreter at {TORCH_PYTHON} (set TIM_JAX_TORCH_PYTHON)")
    if not os.path.isfile(os.path.join(OFFICIAL_REPO, "tim/models/c2i/tim_model.py")):
        pytest.skip(f"no official TiM checkout at {OFFICIAL_REPO} (set TIM_JAX_OFFICIAL_REPO)")


@pytest.mark.torch
def test_tiny_side_by_side_with_the_official_sampler(tmp_path):
    """Both samplers really run on the same weights, noise and labels and end on the same latents."""
    _skip_without_torch_or_official()
    out = tmp_path / "res.json"
    assert sample.main(["prog", "--quick", "--steps", "2", "--rounds", "1", "--torch-threads", "1",
                        "--official-repo", OFFICIAL_REPO, "--torch-python", TORCH_PYTHON,
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    t = res["torch"]
    assert t["n_params"] == res["jax"]["n_params"] == 305_660
    assert (t["precision"], t["attn_type"], t["device"]) == ("float32", "fused_attn", "cpu")
    assert res["latents_max_abs"] > 0.5   # not the noise returned unchanged by zeroed outputs
    assert res["latents_max_rel_err"] <= LATENT_RTOL, res["latents_max_rel_err"]
    assert len(res["rounds"]) == 1 and res["rounds"][0]["ratio"] > 0 and t["call_s"]["n"] == 1
