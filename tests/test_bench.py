"""The training benchmark (tim_jax.bench): its command line (--help, both flag spellings, config overrides, the
error paths), the FLOPs it reports for a known config against a hand count of the step's matmuls, its reports
of known (fake) timings, and the official side-by-side schedule. No timing thresholds: the machine is noisy.

The tests that run the official PyTorch step need a torch interpreter and an official checkout: they run where
``TIM_JAX_TORCH_PYTHON`` / ``TIM_JAX_OFFICIAL_REPO`` (default: ``../venv_torch/bin/python`` and ``../official``
beside the repo) exist, and are skipped with the reason otherwise.
"""
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from configs import c2i_s2_256, debug_cpu
from tim_jax.bench import cli, gemms, official, report, train

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = os.environ.get("TIM_JAX_TORCH_PYTHON", str(REPO.parent / "venv_torch/bin/python"))
OFFICIAL_REPO = os.environ.get("TIM_JAX_OFFICIAL_REPO", str(REPO.parent / "official"))
DEBUG = ["--config", "configs/debug_cpu.py"]


def run_cli(*args, timeout=600, one_device=False):
    """``python -m tim_jax.bench ARGS``; with ``one_device`` without the 8 fake CPU devices of conftest.py."""
    env = dict(os.environ)
    if one_device:
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  env.get("XLA_FLAGS", "")).strip()
    return subprocess.run([sys.executable, "-m", "tim_jax.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def bench_result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(cli.RESULT_PREFIX)]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0][len(cli.RESULT_PREFIX):])


def field(report_text, name, last=False):
    """The text after ``name   :`` on its report line (the last such line with ``last``)."""
    found = re.findall(rf"^{re.escape(name)}\s*: (.*)$", report_text, re.M)
    assert found, f"no {name!r} line in:\n{report_text}"
    return found[-1] if last else found[0]


# ------------------------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("argv, needles", [
    (["--help"], ["MODE", "train", "official"]),
    (["train", "--help"], ["--steps", "--peak-n N, --peak_n N", "--config FILE[:ARG]"]),
    (["official", "-h"], ["--official-repo DIR, --official_repo DIR", "--torch-device", "--gemm-rounds"]),
    (["--config", "configs/no_such_file.py", "official", "--help"], ["--torch-python"]),   # no config is loaded
])
def test_help_prints_usage_and_exits_0(argv, needles):
    proc = run_cli(*argv, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tim_jax.bench"), proc.stdout
    for needle in needles:
        assert needle in proc.stdout, (needle, proc.stdout)


def test_flags_take_both_spellings_the_mode_anywhere_and_config_overrides():
    args, config = cli.parse_command_line([
        "bench", "--peak-n", "64", "official", *DEBUG, "--config.data.global_batch_size=16",
        "--config.model.dtype", "bfloat16", "--official_repo", "/r", "--torch-python", "/p", "--round_steps", "3",
        "--turn-warmup=0", "--torch-flops", "--gemm_rounds=2", "--torch_glibc_tunables", "glibc.malloc.hugetlb=1"])
    assert (args.mode, args.peak_n, args.peak_reps, args.official_repo, args.torch_python) == (
        "official", 64, 7, "/r", "/p")
    assert (args.round_steps, args.turn_warmup, args.torch_flops, args.gemm_rounds) == (3, 0, True, 2)
    assert args.torch_glibc_tunables == "glibc.malloc.hugetlb=1" and args.torch_device == "cpu"
    assert config.data.global_batch_size == 16 and config.model.dtype == "bfloat16"
    assert config.model.hidden_size == debug_cpu.get_config().model.hidden_size
    for flag, want in (("--torch_flops=false", False), ("--notorch_flops", False), ("--torch-flops=1", True)):
        args, _ = cli.parse_command_line(["bench", "official", *DEBUG, "--official-repo", "/r",
                                          "--torch_python", "/p", flag])
        assert args.torch_flops is want, flag
    args, _ = cli.parse_command_line(["bench", *DEBUG, "--steps", "3", "train", "--peak_reps=1", "--json", "x"])
    assert (args.mode, args.steps, args.peak_reps, args.json, args.warmup) == ("train", 3, 1, "x", 2)


@pytest.mark.parametrize("argv, needle", [
    (DEBUG, "give a mode"),
    (["sprint", *DEBUG], "sprint"),
    (["train"], "--config=<configs/file.py[:arg]> is required"),
    (["train", "--config", "configs/no_such_file.py"], "no_such_file.py"),
    (["train", *DEBUG, "--config.model.no_such_field=1"], "no_such_field"),
    (["train", *DEBUG, "--config.data.global_batch_size=many"], "global_batch_size"),
    (["train", *DEBUG, "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["train", *DEBUG, "--rounds", "2"], "unrecognized arguments: --rounds"),     # an official-only flag
    (["train", *DEBUG, "--steps", "0"], "--steps must be >= 1"),
    (["official", *DEBUG], "the following arguments are required: --official-repo"),
    (["official", *DEBUG, "--official-repo", "/x", "--torch-python", "/x", "--torch-device", "tpu"],
     "invalid choice: 'tpu'"),
    (["official", *DEBUG, "--official-repo", "/nonexistent", "--torch-python", "/nonexistent"],
     "--torch-python '/nonexistent' is not a file"),
])
def test_bad_command_lines_exit_2_naming_the_problem(argv, needle, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------------
# what the train benchmark measures


def step_matmul_flops(config) -> int:
    """Hand count of the block matmuls of one TiM train step (c2i, DDE derivative, no guidance), in FLOPs.

    Per token and block the forward pass multiplies by the qkv (D x 3D), output (D x D), SwiGLU fc1 (D x 2h) and
    fc2 (h x D) weights and does the attention's QK^T and PV (N x D each, over all heads): 8 D^2 + 6 D h + 4 N D
    FLOPs (2 per multiply-add). The step runs the network forward on the 2 (B - n_diffusion) rows of the DDE
    central difference (r < t rows only), forward on the B rows of the loss, and backward on them (two products
    per forward product: input and weight gradients). The embedders, adaLN, final layer and REPA projector are
    left out (a few percent), so this is a lower bound that the matmuls of the blocks alone reach.
    """
    m, b = config.model, int(config.data.global_batch_size)
    d, n = int(m.hidden_size), (int(m.input_size) // int(m.patch_size)) ** 2
    h = (int(d * float(m.mlp_ratio)) * 2) // 3
    n_diffusion = round(float(config.objective.diffusion_ratio) * b)
    rows = 2 * (b - n_diffusion) + 3 * b
    return rows * n * int(m.depth) * (8 * d * d + 6 * d * h + 4 * n * d)


WIDE = ["--config.model.hidden_size=512", "--config.model.num_heads=4"]   # the blocks' matmuls dominate


def test_train_cli_end_to_end_on_a_known_config(tmp_path):
    """``train`` on the debug config widened to 512 in bf16, on one device: the reported FLOPs lie between the hand
    count of the blocks' matmuls and 1.2x it (XLA counts every op: the rest is elementwise work, the optimizer and
    the small layers; measured 1.08x). A lost pass falls below the bound, an extra forward pass on the batch (+25 %)
    above it. One device, because the count of an SPMD program is per device times the device count, so work
    replicated on every device (the optimizer update of replicated params) counts once per device. The floor uses
    the bf16 peak with the fp32 peak beside it; the JSON line, the --json file and the report agree."""
    out = tmp_path / "res.json"
    proc = run_cli("train", *DEBUG, *WIDE, "--config.model.dtype=bfloat16", "--warmup", "1", "--steps", "2",
                   "--peak-n", "128", "--peak_reps", "2", "--json", str(out), one_device=True)
    res = bench_result(proc)
    assert json.loads(out.read_text()) == res
    assert "compute dtype bfloat16 (set in the config)" in proc.stderr
    config = debug_cpu.get_config()
    config.model.hidden_size, config.model.num_heads = 512, 4
    hand = step_matmul_flops(config)
    assert hand <= res["flops"] <= 1.2 * hand, (res["flops"], hand, res["flops"] / hand)
    assert res["batch_size"] == config.data.global_batch_size and res["step_s"]["n"] == 2 and res["devices"] == 1
    assert res["compute_dtype"] == "bfloat16" and res["peak"]["dtype"] == "bfloat16"
    assert res["peak_fp32"]["dtype"] == "float32" and (res["peak"]["n"], res["peak"]["reps"]) == (128, 2)
    assert math.isfinite(res["loss"]) and res["memory"]["peak"] >= res["memory"]["argument"] > 0
    text = proc.stdout
    assert "(bfloat16 x bfloat16 -> fp32 128^3, median of 2" in field(text, "matmul peak")
    assert field(text, "fp32 matmul peak").startswith(f"{res['peak_fp32']['flops_per_s'] / 1e9:.2f} GFLOP/s")
    assert field(text, "FLOPs/step").startswith(f"{res['flops'] / 1e9:.2f} GFLOP")
    assert field(text, "step time").startswith(f"{res['step_s']['median']:.4f} s median")
    from tim_jax import cpu_allocator         # the CLI re-execs itself with the glibc-malloc setting
    if cpu_allocator.should_reexec() or "GLIBC_TUNABLES" in os.environ:
        assert res["allocator"] == os.environ.get("GLIBC_TUNABLES", cpu_allocator.GLIBC_TUNABLES_VALUE)


def test_compiled_costs_of_known_programs():
    """XLA's cost analysis counts a matmul as 2 n^3 and a ``lax.map`` body once (why ``build_jax_bench`` takes
    the FLOPs of a step traced without the CPU row chunking)."""
    n = 64
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile()
    costs = train.compiled_costs(compiled, num_devices=3)
    assert math.isclose(costs["flops"], 3 * 2 * n ** 3, rel_tol=0.01)
    assert costs["argument_bytes"] == 2 * n * n * 4 and costs["output_bytes"] == n * n * 4
    chunked = jax.jit(lambda a, w: jax.lax.map(lambda x: x @ w, a.reshape(8, n // 8, n)))
    flops = train.compiled_costs(chunked.lower(jnp.ones((n, n)), jnp.ones((n, n))).compile())["flops"]
    assert math.isclose(flops, 2 * n ** 3 / 8, rel_tol=0.01)


def fake_bench(flops=2e9, n_params=1234):
    return SimpleNamespace(costs={"flops": flops, "argument_bytes": 2 ** 30, "temp_bytes": 2 ** 29,
                                  "output_bytes": 2 ** 30, "alias_bytes": 2 ** 30, "peak_bytes": 3 * 2 ** 29},
                           n_params=n_params, lower_s=1.5, compile_s=2.25, last_loss=0.5)


def test_train_report_of_known_timings():
    """Step times 0.1, 0.2, 0.4 s at batch 8, 2 GFLOP per step, a 100 GFLOP/s bf16 peak and a 50 GFLOP/s fp32
    peak: every derived figure, worked out by hand, through the real result and report code."""
    config = debug_cpu.get_config()
    peak = {"flops_per_s": 1e11, "median_s": 0.01, "min_s": 0.01, "n": 128, "reps": 2, "dtype": "bfloat16"}
    peak32 = dict(peak, flops_per_s=5e10, dtype="float32")
    res = train.train_result(config, fake_bench(), [0.2, 0.1, 0.4], (peak, peak32), 3.0, None)
    assert res["step_s"] == {"median": 0.2, "min": 0.1, "max": 0.4, "spread": pytest.approx(1.5), "n": 3}
    assert res["images_per_s"] == pytest.approx(40.0) and res["flop_floor_s"] == pytest.approx(0.02)
    assert res["floor_multiple"] == pytest.approx(10.0) and res["peak_fraction"] == pytest.approx(0.1)
    assert res["memory"] == {"argument": 2 ** 30, "temp": 2 ** 29, "output": 2 ** 30, "alias": 2 ** 30,
                             "peak": 3 * 2 ** 29}
    text = report.format_train_report(res)
    assert field(text, "step time") == "0.2000 s median (min 0.1000, max 0.4000, spread 150.0 %, n=3)"
    assert field(text, "images/s") == "40.000"
    assert field(text, "FLOPs/step") == "2.00 GFLOP (XLA cost analysis)"
    assert field(text, "matmul peak").startswith("100.00 GFLOP/s (bfloat16 x bfloat16 -> fp32 128^3")
    assert field(text, "fp32 matmul peak") == "50.00 GFLOP/s (floor at fp32 peak: 0.0400 s)"
    assert field(text, "achieved") == "10.00 GFLOP/s = 10.0 % of peak"
    assert field(text, "FLOP floor") == "0.0200 s; step = 10.00x floor"
    assert field(text, "memory (compiled)") == ("peak 1.50 GiB (args 1.00 GiB, temp 0.50 GiB, out 1.00 GiB, "
                                                "aliased 1.00 GiB)")
    assert field(text, "lower / compile") == "1.50 s / 2.25 s"
    with pytest.raises(ValueError, match="steps"):
        train.step_stats([])


def test_compute_dtype_resolves_auto_like_the_networks(monkeypatch):
    config = debug_cpu.get_config()
    for name in ("float32", "bfloat16"):
        config.model.dtype = name
        assert train.compute_dtype(config) == name
    import tim_jax.hardware as hardware
    config.model.dtype = "auto"
    assert train.compute_dtype(config) == hardware.default_compute_dtype()
    monkeypatch.setattr(hardware, "default_compute_dtype", lambda: "bfloat16")
    assert train.compute_dtype(config) == "bfloat16"
    assert official.official_spec(config, OFFICIAL_REPO)["autocast_bf16"] is True
    config.model.dtype = "float32"
    peak, peak32 = train.compute_peaks(config, n=8, reps=1)
    assert peak["dtype"] == "float32" and peak32 is None and peak["flops_per_s"] > 0


# ------------------------------------------------------------------------------------------------------------------
# the official side by side


def test_s2_preset_and_official_spec():
    cfg = c2i_s2_256.get_config()
    from tim_jax.training import state as train_state
    _, abstract, _ = train_state.abstract_run_params(cfg)
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
    assert n == 39_086_736          # the official TiM with these constructor values
    cfg.data.global_batch_size = 16
    cfg.model.dtype = "bfloat16"
    spec = official.official_spec(cfg, OFFICIAL_REPO)
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
    assert official.official_spec(cfg, OFFICIAL_REPO)["autocast_bf16"] is False


def test_gemm_cases_of_s2_and_jax_timing():
    """The GEMM comparison's products follow the config (S/2 at batch 16: 4096 tokens, width
    384, SwiGLU hidden 1024, 6 heads of 64 over 256 tokens), and every kind times on JAX."""
    cfg = c2i_s2_256.get_config()
    cfg.data.global_batch_size = 16
    cases = {c["name"]: c for c in gemms.gemm_cases(cfg)}
    assert cases["MLP fc1 + SiLU-GLU"] == dict(name="MLP fc1 + SiLU-GLU", kind="linear_glu",
                                               t=4096, i=384, o=2048)
    assert cases["qkv weight gradient"]["o"] == 3 * 384
    assert cases["attention logits"] == dict(name="attention logits", kind="logits", b=96,
                                             l=256, d=64)
    assert gemms.gemm_shape(cases["fc1 weight gradient"]) == "(384x4096)(4096x2048)"
    assert {c["kind"] for c in cases.values()} == set(gemms.GEMM_KINDS)
    small = [dict(name="a", kind="linear", t=8, i=4, o=6),
             dict(name="g", kind="linear_glu", t=8, i=4, o=6),
             dict(name="b", kind="weight_grad", t=8, i=4, o=6),
             dict(name="c", kind="input_grad", t=8, i=4, o=6),
             dict(name="d", kind="logits", b=2, l=8, d=4)]
    for case in small:
        for dtype in ("float32", "bfloat16"):
            assert gemms.time_jax_gemm(case, dtype, reps=2) > 0
    with pytest.raises(ValueError, match="GEMM kind"):
        gemms.time_jax_gemm(dict(name="x", kind="conv", t=1, i=1, o=1), "float32")


class _FakeSides:
    """Fake JAX bench and torch step for :func:`official.run_official_bench`: they log each
    ``run(k)`` call; the torch step's first step is 20 % slower when the JAX side ran last (a
    cold process), every other step takes 1 s (JAX 0.8 s)."""

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
        """Patch ``official`` (with the monkeypatch ``mp``) to use these sides and a fixed peak."""
        peak = {"flops_per_s": 1e12, "median_s": 1.0, "n": 8, "reps": 1, "dtype": "bfloat16"}
        mp.setattr(official, "TorchOfficialStep", self.torch_cls)
        mp.setattr(official, "build_jax_bench", lambda config: self.jax)
        mp.setattr(official, "compute_peaks", lambda config, n, reps: (peak, peak))
        return self


@pytest.mark.parametrize("turn_warmup", [0, 1])
def test_official_rounds_open_each_turn_with_untimed_steps(monkeypatch, turn_warmup):
    sides = _FakeSides().install(monkeypatch)
    config = c2i_s2_256.get_config()
    res = official.run_official_bench(config, official_repo="/x", torch_python=sys.executable,
                                      rounds=4, round_steps=2, turn_warmup=turn_warmup, warmup=1)
    turn = {who: ([(who, turn_warmup)] if turn_warmup else []) + [(who, 2)]
            for who in ("jax", "torch")}
    assert sides.calls == [("jax", 1), ("torch", 1)] + 2 * (
        turn["jax"] + turn["torch"] + turn["torch"] + turn["jax"])
    assert [r["first"] for r in res["rounds"]] == ["jax", "torch", "jax", "torch"]
    assert res["turn_warmup"] == turn_warmup and res["round_steps"] == 2
    by_first = res["speedup_by_first"]
    report_text = report.format_official_report(res)
    if turn_warmup:   # the cold step is untimed: every round measures 1.0 / 0.8
        assert by_first["jax"] == pytest.approx(1.25) and by_first["torch"] == pytest.approx(1.25)
        assert res["speedup"] == pytest.approx(1.25) and res["speedup_best"] == pytest.approx(1.25)
        assert field(report_text, "speed-up").startswith("1.250x (median of per-round torch/jax; range "
                                                         "1.250-1.250")
    else:             # timed cold steps inflate the ratio of the rounds JAX opened
        assert by_first["jax"] == pytest.approx(1.1 / 0.8) and by_first["torch"] == pytest.approx(1.25)
        assert (res["speedup_min"], res["speedup_max"]) == (pytest.approx(1.25), pytest.approx(1.1 / 0.8))
    assert res["torch"]["images_per_s"] == pytest.approx(config.data.global_batch_size / 1.0)
    assert f"jax-first rounds {by_first['jax']:.3f}x" in field(report_text, "by opener")
    assert f"({turn_warmup} untimed step(s) open each turn)" in field(report_text, "by opener")
    assert sides.torch_tunables is None and res["torch"]["glibc_tunables"] is None
    assert field(report_text, "allocator", last=True) == "default (GLIBC_TUNABLES unset)"
    with pytest.raises(ValueError, match="turn-warmup"):
        official.run_official_bench(config, official_repo="/x", torch_python=sys.executable,
                                    turn_warmup=-1)


def test_torch_side_allocator_is_glibc_default_unless_asked(monkeypatch):
    """The official step runs without tim_jax's GLIBC_TUNABLES and XLA_FLAGS; ``--torch-glibc-
    tunables`` sets a value for it (e.g. huge pages only), reported with the result."""
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "XLA_FLAGS": "--x", "PATH": "/bin"}
    assert official.torch_env(environ) == {"PATH": "/bin"}
    assert official.torch_env(environ, "glibc.malloc.hugetlb=1") == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    sides = _FakeSides().install(monkeypatch)
    res = official.run_official_bench(c2i_s2_256.get_config(), official_repo="/x",
                                      torch_python=sys.executable, rounds=1, warmup=0,
                                      torch_glibc_tunables="glibc.malloc.hugetlb=1")
    assert sides.torch_tunables == "glibc.malloc.hugetlb=1"
    assert res["torch"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    assert field(report.format_official_report(res), "allocator", last=True) == "glibc.malloc.hugetlb=1"


def skip_without_torch_or_official():
    if not os.path.isfile(TORCH_PYTHON):
        pytest.skip(f"no torch interpreter at {TORCH_PYTHON} (set TIM_JAX_TORCH_PYTHON)")
    if not os.path.isfile(os.path.join(OFFICIAL_REPO, "tim/models/c2i/tim_model.py")):
        pytest.skip(f"no official TiM checkout at {OFFICIAL_REPO} (set TIM_JAX_OFFICIAL_REPO)")


@pytest.mark.torch
def test_torch_device_cuda_without_cuda_fails_early(capsys, monkeypatch):
    """``--torch-device cuda`` where torch sees no GPU: exit 2 naming the problem, before the
    official model is built (CUDA hidden, so this holds on a GPU machine too)."""
    skip_without_torch_or_official()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cli.main(["bench", "official", *DEBUG, "--official-repo", OFFICIAL_REPO,
                     "--torch-python", TORCH_PYTHON, "--torch-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: torch driver: device 'cuda' (--torch-device cuda)" in err, err
    assert "CUDA is not available" in err and "Traceback" not in err, err
    # a spec with nothing else: the check comes before anything reads the model spec
    with pytest.raises(ValueError, match="CUDA is not available"):
        official.TorchOfficialStep(TORCH_PYTHON, {"official_repo": OFFICIAL_REPO, "device": "cuda"})


@pytest.mark.torch
def test_official_side_by_side_on_debug_config():
    """Both steps really run, on the same architecture, in the announced schedule, with the GEMM table."""
    skip_without_torch_or_official()
    proc = run_cli("official", *DEBUG, "--warmup", "1", "--peak_n", "128", "--peak-reps", "2", "--rounds", "2",
                   "--round_steps", "1", "--gemm-rounds", "1", "--gemm-reps", "2",
                   "--official-repo", OFFICIAL_REPO, "--torch-python", TORCH_PYTHON)
    res = bench_result(proc)
    text = proc.stdout
    gemm_rows = res["gemms"]
    assert [g["name"] for g in gemm_rows] == [c["name"] for c in gemms.gemm_cases(debug_cpu.get_config())]
    for g in gemm_rows:
        assert g["jax_s"] > 0 and g["torch_s"] > 0 and g["dtype"] == "float32"
        row = [ln for ln in text.splitlines() if ln.startswith(g["name"])]
        assert len(row) == 1 and g["shape"] in row[0], text
    t = res["torch"]
    assert t["n_params"] == res["jax"]["n_params"]   # same architecture on both sides
    assert t["step_s"]["n"] == 2 and res["jax"]["step_s"]["n"] == 2 and math.isfinite(t["loss"])
    assert t["peak"]["n"] == 128 and t["peak"]["reps"] == 2 and t["peak"]["flops_per_s"] > 0
    assert t["autocast_bf16"] is False and field(text, "precision") == "fp32"
    assert t["device"] == "cpu" and field(text, "torch").startswith(f"{t['version']} on cpu, ")
    assert [r["first"] for r in res["rounds"]] == ["jax", "torch"]
    assert res["turn_warmup"] == 1 and set(res["speedup_by_first"]) == {"jax", "torch"}
    assert field(text, "speed-up").startswith(f"{res['speedup']:.3f}x")
