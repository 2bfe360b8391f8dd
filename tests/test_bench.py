"""The training benchmark CLI (tim_jax.bench) on the tiny debug config: it runs, and every figure
it prints parses and is consistent with the others (no timing thresholds: the machine is noisy).

The side-by-side mode needs a torch interpreter and an official checkout; its test runs where
``TIM_JAX_TORCH_PYTHON`` / ``TIM_JAX_OFFICIAL_REPO`` (default: ``../venv_torch/bin/python`` and
``../official`` beside the repo) exist, and is skipped with the reason otherwise.
"""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import c2i_s2_256, debug_cpu
from tim_jax import bench

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = os.environ.get("TIM_JAX_TORCH_PYTHON", str(REPO.parent / "venv_torch/bin/python"))
OFFICIAL_REPO = os.environ.get("TIM_JAX_OFFICIAL_REPO", str(REPO.parent / "official"))
FAST = ["--config", "configs/debug_cpu.py", "--warmup", "1", "--peak_n", "128", "--peak_reps", "2"]


def run_cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "tim_jax.bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(bench.RESULT_PREFIX)]
    assert len(lines) == 1, proc.stdout
    return proc.stdout, json.loads(lines[0][len(bench.RESULT_PREFIX):])


def field(report, name, last=False):
    """The text after ``name   :`` on its report line (the last such line with ``last``)."""
    found = re.findall(rf"^{re.escape(name)}\s*: (.*)$", report, re.M)
    assert found, f"no {name!r} line in:\n{report}"
    return found[-1] if last else found[0]


def first_float(text):
    return float(re.search(r"[-+]?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", text).group(0).replace(",", ""))


def check_train_result(res, report, batch_size):
    st = res["step_s"]
    assert res["batch_size"] == batch_size and st["n"] >= 1
    assert 0 < st["min"] <= st["median"] <= st["max"]
    assert res["lower_s"] > 0 and res["compile_s"] > 0
    assert math.isclose(res["images_per_s"], batch_size / st["median"], rel_tol=1e-9)
    assert res["flops"] > 0 and res["peak"]["flops_per_s"] > 0
    assert math.isclose(res["flop_floor_s"], res["flops"] / res["peak"]["flops_per_s"],
                        rel_tol=1e-9)
    assert math.isclose(res["floor_multiple"], st["median"] / res["flop_floor_s"], rel_tol=1e-9)
    assert math.isclose(res["peak_fraction"], 1.0 / res["floor_multiple"], rel_tol=1e-9)
    assert res["peak"]["dtype"] == res["compute_dtype"]
    assert (res["peak_fp32"] is None) == (res["compute_dtype"] == "float32")
    assert ("fp32 matmul peak" in report) == (res["peak_fp32"] is not None)
    mem = res["memory"]
    assert mem["peak"] > 0 and mem["argument"] > 0
    assert math.isfinite(res["loss"])
    # the printed lines carry the same numbers (at their printed precision)
    assert math.isclose(first_float(field(report, "step time")), st["median"], abs_tol=1e-4)
    assert math.isclose(first_float(field(report, "images/s")), res["images_per_s"],
                        rel_tol=1e-3, abs_tol=1e-3)
    assert math.isclose(first_float(field(report, "FLOPs/step")), res["flops"] / 1e9,
                        abs_tol=0.01)
    assert math.isclose(first_float(field(report, "FLOP floor")), res["flop_floor_s"],
                        abs_tol=1e-4)
    assert f"{res['floor_multiple']:.2f}x floor" in field(report, "FLOP floor")
    assert first_float(field(report, "lower / compile")) > 0
    assert field(report, "memory (compiled)").startswith("peak ")


def test_train_cli_bf16_floor_uses_the_bf16_peak():
    """A bf16 config: the floor is taken at the bf16 x bf16 -> fp32 matmul peak (the networks'
    matmul), and the fp32 peak is reported beside it."""
    report, res = run_cli("train", *FAST, "--steps", "1", "--config.model.dtype=bfloat16")
    check_train_result(res, report, debug_cpu.get_config().data.global_batch_size)
    assert res["compute_dtype"] == "bfloat16" and res["peak_fp32"]["dtype"] == "float32"
    assert "(bfloat16 x bfloat16 -> fp32 128^3" in field(report, "matmul peak")


def test_train_cli_on_debug_config():
    report, res = run_cli("train", *FAST, "--steps", "2")
    check_train_result(res, report, debug_cpu.get_config().data.global_batch_size)
    assert res["step_s"]["n"] == 2
    # the CLI re-execs itself with the glibc-malloc setting (tim_jax._allocator)
    from tim_jax import _allocator
    expect = os.environ.get("GLIBC_TUNABLES", _allocator.GLIBC_TUNABLES_VALUE)
    if _allocator.should_reexec() or "GLIBC_TUNABLES" in os.environ:
        assert res["allocator"] == expect


def test_compiled_costs_count_a_matmul():
    n = 64
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
    costs = bench.compiled_costs(compiled)
    assert math.isclose(costs["flops"], 2 * n ** 3, rel_tol=0.01)
    assert costs["argument_bytes"] == 2 * n * n * 4 and costs["output_bytes"] == n * n * 4
    st = bench.step_stats([1.0, 3.0, 2.0])
    assert st == {"median": 2.0, "min": 1.0, "max": 3.0, "spread": 1.0, "n": 3}
    with pytest.raises(ValueError, match="steps"):
        bench.step_stats([])


def test_s2_preset_and_official_spec():
    cfg = c2i_s2_256.get_config()
    from tim_jax import train_state
    _, abstract, _ = train_state.abstract_model(cfg)
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
    assert n == 39_086_736          # the official TiM with these constructor values
    cfg.data.global_batch_size = 16
    spec = bench.official_spec(cfg, OFFICIAL_REPO)
    assert spec["model"] == dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
        mlp_ratio=4.0, lora_hidden_size=128, encoder_depth=4, projector_dim=2048, z_dim=768,
        num_classes=1000, class_dropout_prob=0.1, new_condition="t-r", use_new_embed=True,
        distance_aware=True, qk_norm=True)
    assert spec["transition_loss"] == dict(
        diffusion_ratio=0.5, consistency_ratio=0.1, derivative_type="dde",
        differential_epsilon=0.005, weight_t_and_r=True, weight_time_type="sqrt",
        weight_time_tangent=True, weight_time_sigmoid=False)
    assert spec["optim"] == {"lr": 1e-4 * 16 / 256, "betas": [0.9, 0.95], "weight_decay": 0.01,
                             "eps": 1e-6}
    assert spec["max_grad_norm"] == 1.0 and spec["ema_decay"] == 0.9999
    assert spec["transport"]["name"] == "OT_FM" and spec["transport"]["params"]["P_mean"] == -0.4
    assert spec["batch_size"] == 16 and spec["attn_type"] == "fused_attn"
    assert spec["autocast_bf16"] is True                # the official mixed_precision: bf16
    cfg.model.dtype = "float32"                         # fp32 model -> fp32 official step
    assert bench.official_spec(cfg, OFFICIAL_REPO)["autocast_bf16"] is False


def test_bad_command_lines_exit_2(capsys):
    assert bench.main(["bench", "--config", "configs/debug_cpu.py"]) == 2
    assert "mode" in capsys.readouterr().err
    assert bench.main(["bench", "sprint", "--config", "configs/debug_cpu.py"]) == 2
    assert bench.main(["bench", "train"]) == 2
    assert "--config" in capsys.readouterr().err
    assert bench.main(["bench", "official", "--config", "configs/debug_cpu.py"]) == 2
    assert "--official-repo" in capsys.readouterr().err
    assert bench.main(["bench", "official", "--config", "configs/debug_cpu.py",
                       "--official-repo", "/nonexistent", "--torch-python", "/nonexistent"]) == 2
    assert "--torch-python" in capsys.readouterr().err
    assert bench.main(["bench", "official", "--config", "configs/debug_cpu.py", "--official-repo",
                       "/nonexistent", "--torch-python", "/nonexistent",
                       "--torch-device", "tpu"]) == 2      # cpu or cuda only
    assert "torch_device" in capsys.readouterr().err


def skip_without_torch_or_official():
    if not os.path.isfile(TORCH_PYTHON):
        pytest.skip(f"no torch interpreter at {TORCH_PYTHON} (set TIM_JAX_TORCH_PYTHON)")
    if not os.path.isfile(os.path.join(OFFICIAL_REPO, "tim/models/c2i/tim_model.py")):
        pytest.skip(f"no official TiM checkout at {OFFICIAL_REPO} (set TIM_JAX_OFFICIAL_REPO)")


def test_gemm_cases_of_s2_and_jax_timing():
    """The GEMM comparison's products follow the config (S/2 at batch 16: 4096 tokens, width
    384, SwiGLU hidden 1024, 6 heads of 64 over 256 tokens), and every kind times on JAX."""
    cfg = c2i_s2_256.get_config()
    cfg.data.global_batch_size = 16
    cases = {c["name"]: c for c in bench.gemm_cases(cfg)}
    assert cases["MLP fc1 + SiLU-GLU"] == dict(name="MLP fc1 + SiLU-GLU", kind="linear_glu",
                                               t=4096, i=384, o=2048)
    assert cases["qkv weight gradient"]["o"] == 3 * 384
    assert cases["attention logits"] == dict(name="attention logits", kind="logits", b=96,
                                             l=256, d=64)
    assert bench.gemm_shape(cases["fc1 weight gradient"]) == "(384x4096)(4096x2048)"
    assert {c["kind"] for c in cases.values()} == set(bench.GEMM_KINDS)
    small = [dict(name="a", kind="linear", t=8, i=4, o=6),
             dict(name="g", kind="linear_glu", t=8, i=4, o=6),
             dict(name="b", kind="weight_grad", t=8, i=4, o=6),
             dict(name="c", kind="input_grad", t=8, i=4, o=6),
             dict(name="d", kind="logits", b=2, l=8, d=4)]
    for case in small:
        for dtype in ("float32", "bfloat16"):
            assert bench.time_jax_gemm(case, dtype, reps=2) > 0
    with pytest.raises(ValueError, match="GEMM kind"):
        bench.time_jax_gemm(dict(name="x", kind="conv", t=1, i=1, o=1), "float32")


@pytest.mark.torch
def test_torch_device_cuda_without_cuda_fails_early(capsys, monkeypatch):
    """``--torch-device cuda`` where torch sees no GPU: exit 2 naming the problem, before the
    official model is built (CUDA hidden, so this holds on a GPU machine too)."""
    skip_without_torch_or_official()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert bench.main(["bench", "official", "--config", "configs/debug_cpu.py",
                       "--official-repo", OFFICIAL_REPO, "--torch-python", TORCH_PYTHON,
                       "--torch-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: torch driver: device 'cuda' (--torch-device cuda)" in err, err
    assert "CUDA is not available" in err and "Traceback" not in err, err
    # a spec with nothing else: the check comes before anything reads the model spec
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.TorchOfficialStep(TORCH_PYTHON, {"official_repo": OFFICIAL_REPO, "device": "cuda"})


@pytest.mark.torch
def test_official_side_by_side_on_debug_config():
    skip_without_torch_or_official()
    report, res = run_cli("official", *FAST, "--rounds", "2", "--round_steps", "1",
                          "--gemm-rounds", "1", "--gemm-reps", "2",
                          "--official-repo", OFFICIAL_REPO, "--torch-python", TORCH_PYTHON)
    gemms = res["gemms"]
    assert [g["name"] for g in gemms] == [c["name"] for c in
                                          bench.gemm_cases(debug_cpu.get_config())]
    for g in gemms:
        assert g["jax_s"] > 0 and g["torch_s"] > 0 and g["dtype"] == "float32"
        assert math.isclose(g["ratio"], g["torch_s"] / g["jax_s"], rel_tol=1e-9)
        row = [ln for ln in report.splitlines() if ln.startswith(g["name"])]
        assert len(row) == 1 and g["shape"] in row[0], report
    check_train_result(res["jax"], report, debug_cpu.get_config().data.global_batch_size)
    t = res["torch"]
    assert t["n_params"] == res["jax"]["n_params"]   # same architecture on both sides
    assert t["step_s"]["n"] == 2 and math.isfinite(t["loss"])
    assert t["peak"]["n"] == 128 and t["peak"]["reps"] == 2 and t["peak"]["flops_per_s"] > 0
    assert t["autocast_bf16"] is False and field(report, "precision") == "fp32"
    assert t["device"] == "cpu" and field(report, "torch").startswith(f"{t['version']} on cpu, ")
    torch_peak_line = [ln for ln in report.splitlines() if "torch fp32 128^3, median of 2" in ln]
    assert len(torch_peak_line) == 1 and torch_peak_line[0].endswith("x XLA's fp32"), report
    assert [r["first"] for r in res["rounds"]] == ["jax", "torch"]
    assert res["turn_warmup"] == 1 and set(res["speedup_by_first"]) == {"jax", "torch"}
    ratios = sorted(r["torch_median"] / r["jax_median"] for r in res["rounds"])
    assert math.isclose(res["speedup"], (ratios[0] + ratios[1]) / 2, rel_tol=1e-9)
    assert math.isclose(first_float(field(report, "speed-up")), res["speedup"], abs_tol=1e-3)


class _FakeSides:
    """Fake JAX bench and torch step for :func:`bench.run_official_bench`: they log each
    ``run(k)`` call; the torch step's first step is 20 % slower when the JAX side ran last (a
    cold process, as measured on the real machine), every other step takes 1 s (JAX 0.8 s)."""

    def __init__(self):
        self.calls = []
        sides = self

        class Jax:
            costs = {"flops": 1e9, "peak_bytes": 1}
            n_params, lower_s, compile_s, last_loss = 1, 0.0, 0.0, 1.0

            def run(self, k):
                sides.calls.append(("jax", k))
                return [0.8] * k

        class Torch:
            info = {"n_params": 1, "torch": "fake", "threads": 2, "build_s": 0.0}

            def __init__(self, python, spec, glibc_tunables=None):
                sides.torch_tunables = glibc_tunables

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def matmul_peak(self, n, reps):
                return {"flops_per_s": 1e9, "median_s": 1.0, "n": n, "reps": reps}

            def run(self, k):
                cold = bool(sides.calls) and sides.calls[-1][0] == "jax"
                sides.calls.append(("torch", k))
                return {"times": [1.2 if cold else 1.0] + [1.0] * (k - 1), "loss": 1.0,
                        "minflt_per_step": 0.0, "maxrss_mib": 1.0}

        self.jax, self.torch_cls = Jax(), Torch

    def install(self, mp):
        """Patch ``bench`` (with the monkeypatch ``mp``) to use these sides and a fixed peak."""
        peak = {"flops_per_s": 1e12, "median_s": 1.0, "n": 8, "reps": 1, "dtype": "bfloat16"}
        mp.setattr(bench, "TorchOfficialStep", self.torch_cls)
        mp.setattr(bench, "build_jax_bench", lambda config: self.jax)
        mp.setattr(bench, "compute_peaks", lambda config, n, reps: (peak, peak))
        return self


@pytest.mark.parametrize("turn_warmup", [0, 1])
def test_official_rounds_open_each_turn_with_untimed_steps(monkeypatch, turn_warmup):
    sides = _FakeSides().install(monkeypatch)
    config = c2i_s2_256.get_config()
    res = bench.run_official_bench(config, official_repo="/x", torch_python=sys.executable,
                                   rounds=4, round_steps=2, turn_warmup=turn_warmup, warmup=1)
    turn = {who: ([(who, turn_warmup)] if turn_warmup else []) + [(who, 2)]
            for who in ("jax", "torch")}
    assert sides.calls == [("jax", 1), ("torch", 1)] + 2 * (
        turn["jax"] + turn["torch"] + turn["torch"] + turn["jax"])
    assert [r["first"] for r in res["rounds"]] == ["jax", "torch", "jax", "torch"]
    assert res["turn_warmup"] == turn_warmup and res["round_steps"] == 2
    by_first = res["speedup_by_first"]
    if turn_warmup:   # the cold step is untimed: every round measures 1.0 / 0.8
        assert by_first["jax"] == pytest.approx(1.25) and by_first["torch"] == pytest.approx(1.25)
    else:             # timed cold steps inflate the ratio of the rounds JAX opened
        assert by_first["jax"] == pytest.approx(1.1 / 0.8) and by_first["torch"] == pytest.approx(1.25)
    report = bench.format_official_report(res)
    assert f"jax-first rounds {by_first['jax']:.3f}x" in field(report, "by opener")
    assert f"({turn_warmup} untimed step(s) open each turn)" in field(report, "by opener")
    assert sides.torch_tunables is None and res["torch"]["glibc_tunables"] is None
    assert field(report, "allocator", last=True) == "default (GLIBC_TUNABLES unset)"
    with pytest.raises(ValueError, match="turn-warmup"):
        bench.run_official_bench(config, official_repo="/x", torch_python=sys.executable,
                                 turn_warmup=-1)


def test_torch_side_allocator_is_glibc_default_unless_asked(monkeypatch):
    """The official step runs without tim_jax's GLIBC_TUNABLES and XLA_FLAGS; ``--torch-glibc-
    tunables`` sets a value for it (e.g. huge pages only), reported with the result."""
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "XLA_FLAGS": "--x", "PATH": "/bin"}
    assert bench.torch_env(environ) == {"PATH": "/bin"}
    assert bench.torch_env(environ, "glibc.malloc.hugetlb=1") == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    sides = _FakeSides().install(monkeypatch)
    res = bench.run_official_bench(c2i_s2_256.get_config(), official_repo="/x",
                                   torch_python=sys.executable, rounds=1, warmup=0,
                                   torch_glibc_tunables="glibc.malloc.hugetlb=1")
    assert sides.torch_tunables == "glibc.malloc.hugetlb=1"
    assert res["torch"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    report = bench.format_official_report(res)
    assert field(report, "allocator", last=True) == "glibc.malloc.hugetlb=1"
