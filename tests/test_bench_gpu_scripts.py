"""The GPU measurement scripts, exercised on the CPU: ``tim_jax.bench.attention_kernels --quick`` and
``tim_jax.bench.step_mfu --quick`` run end to end (flash in Pallas interpret mode, the tiny debug
config) and write JSON with the documented keys and self-consistent figures;
``launch/bench_gpu_kernels.sh --dry-run`` prints its stages without running anything.

The two quick runs are started together as subprocesses (each compile is mostly one thread;
the machine has two cores). The step run is limited to ``dde:xla`` plus ``jvp:cudnn`` (reported
n/a: cuDNN has no forward-mode AD): each XLA:CPU compile of the whole step is the slow part, and
the jvp step itself is covered by the train-step tests (here ``variant_config`` is checked to set
it). Timings are not checked (noisy machine); the attention outputs are checked against the
float32 "xla" reference the bench itself reports (max |x - ref| / max |ref|).
"""
import gzip
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# bf16 inputs and outputs: one bf16 rounding of o (or of the gradients) is up to 2^-8 = 3.9e-3
# relative to the element; 1.5e-2 of max|ref| leaves room for the accumulated roundings of the
# bf16 matmul inputs while still failing for a wrong softmax, scale or layout (errors ~1).
BF16_REL_TOL = 1.5e-2
AK_KEYS = {"backend", "device", "jax", "dtype", "heads", "head_dims", "tokens", "tokens_per_call",
           "impls", "modes", "flop_factor", "reps", "cells", "best",
           "suggested_flash_measured_wins", "elapsed_s", "complete"}
SM_KEYS = {"config", "backend", "device", "jax", "dtype", "overrides", "flash_measured_wins",
           "peak", "variants", "elapsed_s", "complete"}
SM_VARIANT_KEYS = {"derivative", "attention", "status", "batch_size", "grad_accum_steps",
                   "micro_batch", "n_params", "lower_s", "compile_s", "memory", "flops_xla",
                   "flops_counted", "flops_per_step", "flops_source", "step_s", "images_per_s",
                   "tokens", "flops_per_param_token",
                   "achieved_flops_per_s", "mfu", "loss", "trace_dir", "top_ops"}


def _env():
    """The scripts' environment: one CPU device, as a plain command line gets (conftest asks
    for 8 host devices in this process), and no device-tool $OUT."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("OUT", None)
    return env


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Both --quick runs, concurrently: {name: (out_dir, stdout)}."""
    procs = {}
    runs = (("ak", "tim_jax.bench.attention_kernels", []),
            ("sm", "tim_jax.bench.step_mfu", ["--variants", "dde:xla,jvp:cudnn"]))
    for name, module, extra in runs:
        out = tmp_path_factory.mktemp(name)
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", module, "--quick", "--out", str(out), *extra], cwd=REPO,
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = {}
    for name, (out, proc) in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-4000:]
        done[name] = (out, stdout)
    return done


def test_attention_kernels_quick(quick_runs):
    out, stdout = quick_runs["ak"]
    res = json.loads((out / "attention_kernels.json").read_text())
    assert AK_KEYS <= set(res) and res["complete"] and res["backend"] == "cpu"
    cells = {(c["mode"], c["impl"]): c for c in res["cells"]}
    assert set(cells) == {(m, i) for m in ("forward", "fwd_bwd", "jvp")
                          for i in ("flash", "cudnn", "xla")}
    b, h, (n,), (d,) = cells["forward", "xla"]["batch"], res["heads"], res["tokens"], res["head_dims"]
    assert b == res["tokens_per_call"] // n
    for (mode, impl), c in cells.items():
        if impl == "cudnn":  # no cuDNN on the CPU: reported per cell, the run went on
            assert c["status"] == ("n/a" if mode == "jvp" else "error"), c
            continue
        assert c["status"] == "ok", c
        assert c["flops"] == 4 * b * h * n * n * d * res["flop_factor"][mode]
        assert math.isclose(c["tflops"], c["flops"] / c["median_s"] / 1e12, rel_tol=1e-9)
        assert 0 < c["min_s"] <= c["median_s"] and c["inner"] >= 1
        mem = c["memory"]
        assert mem["total"] == mem["temp"] + mem["argument"] + mem["output"] > 0
        assert 0 <= c["max_rel_err"] <= BF16_REL_TOL, c
    kernels = {m: cells[m, "flash"]["kernels"] for m in ("forward", "fwd_bwd", "jvp")}
    assert kernels["forward"] == {"flash_attention_fwd": 1}
    assert set(kernels["fwd_bwd"]) == {"flash_attention_fwd", "flash_attention_dq",
                                       "flash_attention_dkdv"}
    assert kernels["jvp"] == {"flash_attention_jvp": 1}
    assert set(res["best"][f"{n}x{d}"]) == {"forward", "fwd_bwd", "jvp"}
    assert list(res["suggested_flash_measured_wins"]) == ["cpu"]
    md = (out / "attention_kernels.md").read_text()
    assert md.count(f"| {d} | {n} | {b} |") == len(cells) and "Suggested `FLASH_MEASURED_WINS`" in md
    assert "| flash |" in stdout


def test_step_mfu_quick(quick_runs):
    out, stdout = quick_runs["sm"]
    res = json.loads((out / "step_mfu.json").read_text())
    assert SM_KEYS <= set(res) and res["complete"] and res["dtype"] == "bfloat16"
    assert [(v["derivative"], v["attention"], v["status"]) for v in res["variants"]] == [
        ("dde", "xla", "ok"), ("jvp", "cudnn", "n/a")]
    peak = res["peak"]["flops_per_s"]
    for v in res["variants"][:1]:
        assert SM_VARIANT_KEYS <= set(v), sorted(SM_VARIANT_KEYS - set(v))
        assert v["status"] == "ok" and v["batch_size"] == 8 and v["grad_accum_steps"] == 1
        st = v["step_s"]
        assert 0 < st["min"] <= st["median"] <= st["max"]
        assert math.isclose(v["images_per_s"], 8 / st["median"], rel_tol=1e-9)
        assert v["flops_per_step"] == v["flops_counted"] == v["flops_xla"] > 0
        assert v["tokens"] == 16 and math.isclose(  # debug config: (8 / 2)^2 tokens
            v["flops_per_param_token"], v["flops_per_step"] / (8 * 16 * v["n_params"]))
        assert math.isclose(v["mfu"], v["flops_per_step"] / st["median"] / peak, rel_tol=1e-9)
        assert math.isfinite(v["loss"]) and v["memory"]["peak"] > 0
        top = v["top_ops"]
        assert top["source"] == "XLA:CPU threads" and 0 < len(top["ops"]) <= 10
        assert sorted((o["ms_per_step"] for o in top["ops"]), reverse=True) == \
            [o["ms_per_step"] for o in top["ops"]]
        assert pathlib.Path(v["trace_dir"]).is_dir()
    assert "no forward-mode AD" in res["variants"][1]["error"]
    md = (out / "step_mfu.md").read_text()
    assert "| dde | xla | 8 (8×1) |" in md and "| jvp | cudnn |" in md
    assert "Top ops, dde / xla" in md


def test_step_mfu_config_flops_and_trace_parsing(tmp_path):
    """Cheap in-process checks of what the quick run cannot reach on a CPU: the variant config,
    the FLOP corrections (accumulation, custom-call attention) and the GPU trace layout."""
    from tim_jax.bench import step_mfu as sm

    cfg = sm.variant_config("configs/debug_cpu.py", derivative="jvp", attention="flash",
                            batch=8, micro_batch=2, dtype="bfloat16",
                            overrides=[("model.remat", "full")])
    assert (cfg.objective.derivative, cfg.model.attention_impl, cfg.optim.grad_accum_steps,
            cfg.data.global_batch_size, cfg.model.dtype, cfg.model.remat) == \
        ("jvp", "flash", 4, 8, "bfloat16", "full")
    with pytest.raises(ValueError, match="no config field 'nope'"):
        sm.variant_config("configs/debug_cpu.py", derivative="dde", attention="xla", batch=8,
                          micro_batch=0, dtype="float32", overrides=[("model.nope", 1)])
    with pytest.raises(ValueError, match="not a multiple"):
        sm.variant_config("configs/debug_cpu.py", derivative="dde", attention="xla", batch=8,
                          micro_batch=3, dtype="float32", overrides=[])

    step = {"median": 2.0}
    variants = [{"derivative": "dde", "attention": "flash", "flops_counted": 9.0, "step_s": step},
                {"derivative": "dde", "attention": "xla", "flops_counted": 10.0, "step_s": step},
                {"derivative": "jvp", "attention": "flash", "flops_counted": 7.0, "step_s": step}]
    sm.finalise(variants, {"flops_per_s": 10.0})
    assert [v["flops_per_step"] for v in variants] == [10.0, 10.0, 7.0]
    assert variants[0]["flops_source"] == "xla variant" and variants[0]["mfu"] == 0.5
    assert "not counted" in variants[2]["flops_source"]

    # a GPU-like Perfetto trace: device ops on the "XLA Ops" line, kernels on a stream line
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 5, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 6, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "python"}}]
    ev = [{"ph": "X", "pid": 1, "tid": 5, "name": n, "dur": d}
          for n, d in (("fusion.1", 300.0), ("gemm.2", 500.0), ("fusion.1", 100.0))]
    ev += [{"ph": "X", "pid": 1, "tid": 6, "name": "sm90_kernel", "dur": 900.0},
           {"ph": "X", "pid": 2, "tid": 9, "name": "host_op", "dur": 5000.0}]
    trace = tmp_path / "plugins" / "profile" / "run1"
    trace.mkdir(parents=True)
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": meta + ev}, fh)
    top = sm.top_ops(str(tmp_path), steps=2)
    assert top["source"] == "XLA ops on the device"
    assert [(o["name"], o["ms_per_step"], o["count_per_step"]) for o in top["ops"]] == \
        [("gemm.2", 0.25, 0.5), ("fusion.1", 0.2, 1.0)]
    assert math.isclose(top["total_ms_per_step"], 0.45) and math.isclose(
        sum(o["share"] for o in top["ops"]), 1.0)
    assert sm.top_ops(str(tmp_path / "none"), steps=1) is None


def test_launcher_dry_run_prints_the_stages(tmp_path):
    out = tmp_path / "never_written"

    def dry(**env):
        proc = subprocess.run(["bash", str(REPO / "launch/bench_gpu_kernels.sh"), "--dry-run"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**_env(), "OUT_DIR": str(out), **env})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = dry()
    stages = [l.split()[2] for l in text.splitlines() if l.startswith("=== stage ")]
    assert stages == ["setup:", "attention_kernels", "step_mfu", "official_xl2:", "summary:"]
    assert "-m tim_jax.bench.attention_kernels --out " + str(out) in text
    assert "-m tim_jax.bench.step_mfu --config configs/c2i_xl2_256.py:synthetic --batch 256 " \
           "--micro-batch 32 --variants dde:" in text and "--trace-steps 2" in text
    assert "official_xl2: skipped" in text
    with_official = dry(OFFICIAL_REPO="/somewhere/TiM", STAGES="official")
    assert "-m tim_jax.bench official --config configs/c2i_xl2_256.py:synthetic " in with_official
    assert "--official-repo /somewhere/TiM" in with_official
    assert "attention_kernels: not in STAGES" in with_official
    assert not out.exists()  # a dry run writes nothing
    bad = subprocess.run(["bash", str(REPO / "launch/bench_gpu_kernels.sh"), "--bogus"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
