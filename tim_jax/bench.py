"""Training-speed benchmarks: the tim_jax train step alone, or side by side with the official one.

    python -m tim_jax.bench train --config configs/c2i_s2_256.py --config.data.global_batch_size=16 \
        [--steps 5] [--warmup 2]
    python -m tim_jax.bench official --config configs/c2i_s2_256.py \
        --config.data.global_batch_size=16 --official-repo /path/to/TiM \
        --torch-python /path/to/torch-venv/bin/python [--rounds 4] [--round-steps 2] \
        [--torch-device cuda] [--gemm-rounds 3]

**train** builds the real training state and the whole jitted step of :mod:`tim_jax.train_step`
(full objective as configured: DDE or JVP derivative, REPA against ``z_dim`` targets, label
dropout, clipping, AdamW, every EMA), times ``--steps`` steps on one fixed synthetic batch after
``--warmup`` steps, and prints

* the step time (median, min, max, spread = (max - min) / median) and images/s;
* the lowering and compile times;
* FLOPs per step from XLA's cost analysis of the compiled step (every op, elementwise included;
  an SPMD program's per-device count times the device count, so replicated work counts once
  per device);
* the machine's matmul peak in the config's compute dtype (``model.dtype``: fp32, or
  bf16 x bf16 -> fp32 as the networks run it), measured in the same run (median of
  ``--peak-reps`` jitted ``--peak-n``-cubed matmuls), the achieved FLOP/s and its share of that
  peak, the FLOP floor (FLOPs / peak) and the step time as a multiple of it; for a bf16 config
  also the fp32 peak and the floor at it;
* the compiled program's memory analysis (arguments, outputs, temporaries, peak), the process'
  max RSS and the minor page faults per step (~0 when the allocator setting is active).

**official** does the same for tim_jax and, in a subprocess run by ``--torch-python``, the
official PyTorch step (:mod:`tim_jax.bench_torch_driver`: the official network with SDPA
attention, ``TransitionSchedule``, AdamW, clipping and EMA, same sizes and batch). The two are
**interleaved**: round i runs ``--round-steps`` timed steps of each (alternating which goes
first), with the other process idle. Each turn opens with ``--turn-warmup`` untimed steps
(default 1): a process that sat idle while the other ran starts cold. Measured here, the
official step ran 5-17 % slower right after a tim_jax turn than after its own, which made the
rounds tim_jax opened read higher than those torch opened. The speed-up is the median over
rounds of ``torch round median / jax round median``, which cancels most of the machine's slow
drift.
``--torch-device`` (``cpu``, the default, or ``cuda``) is where the official step runs; JAX
always uses its default backend. ``--gemm-rounds k`` then also times the step's main GEMMs
alone (:func:`gemm_cases`: the linear layers, the largest weight and input gradients, the
attention logits) on both sides in the compute dtype, interleaved per product, and prints
torch/jax per product: the step's gap split by library. On a GPU machine
(``launch/bench_gpu.sh`` runs this) use::

    TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false python -m tim_jax.bench official \
        ... --torch-device cuda --peak_n 8192

``--peak_n 8192``: a 2048-cubed matmul is too short to reach a GPU's peak (both sides' peaks,
and so the FLOP floors, use it). ``TIM_JAX_NO_REEXEC=1`` (recommended, not required) skips the
re-exec under the glibc-malloc setting described below: it is tuned for XLA:CPU's multi-GB host
buffers, gains nothing when XLA runs on the GPU, and its single malloc arena can only add
host-side lock contention; the torch subprocess runs with the default allocator either way.
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` stops JAX from reserving 75 % of the GPU's memory up
front, which would leave too little for torch on the same GPU. With ``cuda`` where torch sees
no GPU, the driver stops at once and the CLI exits 2 naming the problem.

Both modes print a human-readable report and finally one line ``BENCH_RESULT {json}`` with every
figure (keys documented in :func:`run_train_bench` / :func:`run_official_bench`); ``--json PATH``
also writes that JSON to a file.

The CLI re-execs itself first with the glibc-malloc setting of :mod:`tim_jax._allocator`
(XLA:CPU is ~1.3x slower without it); ``TIM_JAX_NO_REEXEC=1`` measures the default allocator.
Timings on a shared or small machine are noisy (+-10-15 % per process): compare variants only
with paired, interleaved runs (the ``official`` mode, or several processes).
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: they would be paid twice
    from tim_jax import _allocator

    _allocator.maybe_reexec()

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "matmul_peak", "step_stats", "compiled_costs", "JaxStepBench", "build_jax_bench",
    "official_spec", "TorchOfficialStep", "run_train_bench", "run_official_bench",
    "format_train_report", "format_official_report", "gemm_cases", "time_jax_gemm", "main",
]

RESULT_PREFIX = "BENCH_RESULT "
MODES = ("train", "official")


# ----------------------------------------------------------------------------------------------
# small measurement helpers
def _loadavg() -> Optional[list[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def _cpu_info() -> str:
    """``"<model name>, <n> CPUs"`` of this machine (timings only compare on the same CPU)."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def step_stats(times: Sequence[float]) -> dict:
    """``{median, min, max, spread, n}`` of step times in seconds; spread = (max-min)/median."""
    if not times:
        raise ValueError("no step times to summarise (steps must be >= 1)")
    med = statistics.median(times)
    return {"median": med, "min": min(times), "max": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0, "n": len(times)}


def _call_times(f, args: Sequence, reps: int) -> list[float]:
    """Seconds of ``reps`` calls ``f(*args)`` (results waited for) after one untimed call
    (compilation, warm-up)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(n: int = 2048, reps: int = 7, dtype=jnp.float32) -> dict:
    """The machine's matmul throughput: median FLOP/s of ``reps`` jitted (n, n) @ (n, n) calls
    with operands in ``dtype`` and float32 accumulation/output (the networks' matmul, see
    :mod:`tim_jax.models.matmul`).

    Returns ``{"flops_per_s", "min_s", "median_s", "n", "reps", "dtype"}``; FLOPs per call =
    2 n^3. One untimed call compiles and warms up first.
    """
    if n < 1 or reps < 1:
        raise ValueError(f"peak matmul needs n >= 1 and reps >= 1, got n={n}, reps={reps}")
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    times = _call_times(mm, (a, b), reps)
    med = statistics.median(times)
    return {"flops_per_s": 2.0 * n ** 3 / med, "median_s": med, "min_s": min(times), "n": n,
            "reps": reps, "dtype": jnp.dtype(dtype).name}


def compute_peaks(config, n: int = 2048, reps: int = 7) -> tuple[dict, Optional[dict]]:
    """``(peak, peak_fp32)``: the matmul peak in the config's compute dtype (``model.dtype``),
    which the FLOP floor uses, and the float32 peak when the compute dtype differs (else None).
    """
    dtype = jnp.dtype(_cfg_get(config.model, "dtype", "float32"))
    peak = matmul_peak(n, reps, dtype)
    return peak, (None if dtype == jnp.float32 else matmul_peak(n, reps, jnp.float32))


def compiled_costs(compiled, num_devices: int = 1) -> dict:
    """FLOPs and memory of a compiled executable (``jax.stages.Compiled``).

    ``flops``: XLA's cost-analysis count of the per-device program times ``num_devices`` (every
    op, not only matmuls). Memory (bytes, per device): ``argument``, ``output``, ``alias``
    (outputs sharing donated inputs), ``temp`` and ``peak``: argument + output + temp - alias,
    or XLA's own peak figure where that is larger (on CPU it counts the arguments only).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan"))) * num_devices
    mem = compiled.memory_analysis()
    out = {"flops": flops}
    if mem is not None:
        arg, outb = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
        xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
        out.update(argument_bytes=arg, output_bytes=outb, alias_bytes=alias, temp_bytes=temp,
                   peak_bytes=max(xla_peak, arg + outb + temp - alias))
    return out


# ----------------------------------------------------------------------------------------------
# the tim_jax step
class JaxStepBench:
    """A compiled tim_jax train step, its state and one fixed device batch.

    ``run(k)`` takes k steps (the state is donated and replaced each time) and returns their
    wall times in seconds, each measured to the loss being ready on the host.
    """

    def __init__(self, config, *, step, state, batch, lower_s, compile_s, costs, n_params):
        self.config, self._step, self.state, self.batch = config, step, state, batch
        self.lower_s, self.compile_s, self.costs, self.n_params = lower_s, compile_s, costs, n_params
        self.last_loss = float("nan")

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.state, metrics = self._step(self.state, self.batch)
            self.last_loss = float(metrics["loss"])  # waits for the step
            times.append(time.perf_counter() - t0)
        return times


def build_jax_bench(config) -> JaxStepBench:
    """State, batch and the AOT-compiled whole step of :mod:`tim_jax.train_step` for ``config``.

    The batch is the first batch of the configured data pipeline (``data.source``), placed with
    the step's batch sharding; the same batch is reused every step (the pipeline is not timed).
    """
    from tim_jax import data, sharding, train_state, train_step

    mesh = sharding.make_mesh(config)
    state, shardings, graphdef = train_state.create_train_state(config, mesh)
    host_batch = next(data.make_train_iterator(config, process_index=0, process_count=1))
    batch = data.to_global(host_batch, sharding.batch_sharding(mesh))
    step = train_step.make_train_step(config, graphdef, mesh, shardings)
    t0 = time.perf_counter()
    lowered = step.jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(state.params)))
    costs = compiled_costs(compiled, num_devices=mesh.size)
    if jax.default_backend() == "cpu":
        # FLOPs from the same step traced without the CPU row chunking of large matmuls:
        # XLA's cost analysis counts a loop body once (memory figures stay the real ones).
        # Compiled only when the chunking changed the program.
        from tim_jax.models.matmul import row_chunking

        with row_chunking(False):
            plain = train_step.make_train_step(config, graphdef, mesh, shardings)
            plain_lowered = plain.jitted.lower(state, batch)
        if plain_lowered.as_text() != lowered.as_text():
            costs["flops"] = compiled_costs(plain_lowered.compile(),
                                            num_devices=mesh.size)["flops"]
    return JaxStepBench(config, step=compiled, state=state, batch=batch, lower_s=t1 - t0,
                        compile_s=t2 - t1, costs=costs, n_params=n_params)


def _floor_fields(flops: float, peak: float, median_s: float) -> dict:
    floor = flops / peak
    return {"flop_floor_s": floor, "floor_multiple": median_s / floor,
            "achieved_flops_per_s": flops / median_s, "peak_fraction": flops / median_s / peak}


def run_train_bench(config, *, steps: int = 5, warmup: int = 2, peak_n: int = 2048,
                    peak_reps: int = 7) -> dict:
    """Benchmarks the tim_jax step of ``config``; returns the result dict.

    Keys: ``batch_size``, ``n_params``, ``devices``, ``lower_s``, ``compile_s``, ``step_s``
    ({median, min, max, spread, n}), ``images_per_s``, ``flops`` (per step), ``peak``
    (:func:`matmul_peak`), ``achieved_flops_per_s``, ``peak_fraction``, ``flop_floor_s``,
    ``floor_multiple``, ``memory`` (bytes: argument/output/alias/temp/peak), ``maxrss_mib``,
    ``minflt_per_step``, ``allocator`` (the GLIBC_TUNABLES in effect or null), ``loss``,
    ``cpu`` (model name and CPU count), ``jax`` (version),
    ``loadavg_start`` / ``loadavg_end`` (1/5/15-min load averages).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    load0 = _loadavg()
    peaks = compute_peaks(config, peak_n, peak_reps)
    bench = build_jax_bench(config)
    bench.run(warmup)
    f0 = _minflt()
    times = bench.run(steps)
    minflt = (_minflt() - f0) / steps
    return _train_result(config, bench, times, peaks, minflt, load0)


def _train_result(config, bench: JaxStepBench, times, peaks, minflt, load0) -> dict:
    st = step_stats(times)
    peak, peak_fp32 = peaks
    b = int(config.data.global_batch_size)
    mem = {k[:-6]: v for k, v in bench.costs.items() if k.endswith("_bytes")}
    return {
        "batch_size": b, "n_params": bench.n_params, "devices": jax.device_count(),
        "backend": jax.default_backend(), "cpu": _cpu_info(), "jax": jax.__version__,
        "lower_s": bench.lower_s, "compile_s": bench.compile_s,
        "step_s": st, "images_per_s": b / st["median"], "flops": bench.costs["flops"],
        "compute_dtype": peak["dtype"], "peak": peak, "peak_fp32": peak_fp32,
        **_floor_fields(bench.costs["flops"], peak["flops_per_s"], st["median"]),
        "memory": mem, "maxrss_mib": _maxrss_mib(), "minflt_per_step": minflt,
        "allocator": os.environ.get("GLIBC_TUNABLES"), "loss": bench.last_loss,
        "loadavg_start": load0, "loadavg_end": _loadavg(),
    }


def _gib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _peak_kind(pk: dict) -> str:
    dt = pk.get("dtype", "float32")
    return "fp32" if dt == "float32" else f"{dt} x {dt} -> fp32"


def format_train_report(res: dict, title: str = "tim_jax train step") -> str:
    """The human-readable report of :func:`run_train_bench` (one ``name: value`` per line)."""
    st, pk, mem = res["step_s"], res["peak"], res["memory"]
    lines = [
        f"== {title} ==",
        f"machine           : {res['cpu']}; jax {res['jax']}",
        f"batch size        : {res['batch_size']} ({res['devices']} {res['backend']} device(s))",
        f"params            : {res['n_params']:,}",
        f"lower / compile   : {res['lower_s']:.2f} s / {res['compile_s']:.2f} s",
        f"step time         : {st['median']:.4f} s median (min {st['min']:.4f}, max "
        f"{st['max']:.4f}, spread {100 * st['spread']:.1f} %, n={st['n']})",
        f"images/s          : {res['images_per_s']:.3f}",
        f"FLOPs/step        : {res['flops'] / 1e9:.2f} GFLOP (XLA cost analysis)",
        f"matmul peak       : {pk['flops_per_s'] / 1e9:.2f} GFLOP/s ({_peak_kind(pk)} "
        f"{pk['n']}^3, median of {pk['reps']}; the compute dtype, used for the floor)",
        *([f"fp32 matmul peak  : {res['peak_fp32']['flops_per_s'] / 1e9:.2f} GFLOP/s (floor "
           f"at fp32 peak: {res['flops'] / res['peak_fp32']['flops_per_s']:.4f} s)"]
          if res.get("peak_fp32") else []),
        f"achieved          : {res['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s = "
        f"{100 * res['peak_fraction']:.1f} % of peak",
        f"FLOP floor        : {res['flop_floor_s']:.4f} s; step = {res['floor_multiple']:.2f}x "
        f"floor",
        f"memory (compiled) : peak {_gib(mem.get('peak'))} (args {_gib(mem.get('argument'))}, "
        f"temp {_gib(mem.get('temp'))}, out {_gib(mem.get('output'))}, aliased "
        f"{_gib(mem.get('alias'))})",
        f"max RSS           : {res['maxrss_mib']:.0f} MiB",
        f"minor faults/step : {res['minflt_per_step']:.0f}",
        f"allocator         : {res['allocator'] or 'default (GLIBC_TUNABLES unset)'}",
        f"loss (last step)  : {res['loss']:.5g}",
        f"load average      : start {res['loadavg_start']}, end {res['loadavg_end']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the official PyTorch step, in a subprocess
def _cfg_get(node, key, default):
    return node[key] if key in node else default


def official_spec(config, official_repo: str, *, attn_type: str = "fused_attn",
                  seed: int = 0, threads: int = 0, device: str = "cpu") -> dict:
    """The spec of the official step (:mod:`tim_jax.bench_torch_driver`) matching ``config``.

    Maps the tim_jax config names onto the official constructor / ``TransitionSchedule`` /
    trainer arguments; only class-conditional (``model.kind='c2i'``) models are supported.
    The official trainer keeps one EMA model: the first of ``ema.decays`` is used.
    ``model.dtype='bfloat16'`` runs the official loss under ``torch.autocast(device, bfloat16)``
    (what the official ``mixed_precision: bf16`` does), so both sides compute in the same precision.
    ``threads``: torch intra-op threads (0: torch's default, one per core). ``device``: where
    the official step runs, ``"cpu"`` or ``"cuda"``.
    """
    from tim_jax import optim

    m, ob, tr, op = config.model, config.objective, config.transport, config.optim
    if m.kind != "c2i":
        raise ValueError(f"the official comparison supports model.kind='c2i' only, got {m.kind!r}")
    if int(op.grad_accum_steps) != 1:
        raise ValueError("the official comparison needs optim.grad_accum_steps=1 (the official "
                         f"step has no in-step accumulation), got {op.grad_accum_steps}")
    keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
            "mlp_ratio", "lora_hidden_size", "encoder_depth", "projector_dim", "z_dim",
            "num_classes", "class_dropout_prob", "new_condition", "use_new_embed",
            "distance_aware", "qk_norm")
    model = {k: m[k] for k in keys}
    model["mlp_ratio"] = float(model["mlp_ratio"])
    decays = tuple(config.ema.decays)
    return {
        "official_repo": os.path.abspath(official_repo),
        "model": model,
        "transport": {"name": tr.name, "params": {k: v for k, v in tr.items() if k != "name"}},
        "transition_loss": {
            "diffusion_ratio": ob.diffusion_ratio, "consistency_ratio": ob.consistency_ratio,
            "derivative_type": ob.derivative, "differential_epsilon": ob.dde_delta,
            "weight_t_and_r": ob.weight_base == "t_and_r", "weight_time_type": ob.weight_type,
            "weight_time_tangent": ob.weight_warp == "tangent",
            "weight_time_sigmoid": ob.weight_warp == "sigmoid",
        },
        "label_dropout": float(_cfg_get(ob, "label_dropout", 0.1)),
        "proj_coeff": float(ob.repa_coeff),
        "optim": {"lr": float(optim.effective_lr(config)), "betas": [op.b1, op.b2],
                  "weight_decay": op.weight_decay, "eps": op.eps},
        "max_grad_norm": float(op.grad_clip),
        "ema_decay": float(decays[0]) if decays else 0.0,
        "batch_size": int(config.data.global_batch_size),
        "attn_type": attn_type,
        # the official trainer's accelerate mixed_precision='bf16' = torch.autocast(bf16) around the loss
        "autocast_bf16": str(m.get("dtype", "float32")) == "bfloat16",
        "seed": int(seed),
        "threads": int(threads),
        "device": device,
    }


# ----------------------------------------------------------------------------------------------
# the step's GEMMs alone (official mode, --gemm_rounds): where the two libraries differ
GEMM_KINDS = ("linear", "linear_glu", "weight_grad", "input_grad", "logits")


def gemm_cases(config) -> list[dict]:
    """The main GEMMs of a c2i config's train step at its global batch, as both frameworks run
    them: ``kind`` "linear" (x (t, i) times a weight to (t, o), bias added, rounded to the
    compute dtype), "linear_glu" (the same to (t, 2h), then SiLU-GLU to (t, h): the SwiGLU
    input projection with its activation), "weight_grad" (x^T g: (i, o) from x (t, i) and
    g (t, o)), "input_grad" (g W^T: (t, i)) and "logits" (q k^T of the attention: (b, l, l)
    from (b, l, d))."""
    from tim_jax.models.c2i import mlp_hidden_features

    m = config.model
    if m.kind != "c2i":
        raise ValueError(f"the GEMM comparison supports model.kind='c2i' only, got {m.kind!r}")
    b = int(config.data.global_batch_size)
    n = (int(m.input_size) // int(m.patch_size)) ** 2
    d, heads = int(m.hidden_size), int(m.num_heads)
    h = mlp_hidden_features(d, float(m.mlp_ratio))
    t = b * n
    return [
        dict(name="qkv projection", kind="linear", t=t, i=d, o=3 * d),
        dict(name="attention out proj", kind="linear", t=t, i=d, o=d),
        dict(name="MLP fc1 + SiLU-GLU", kind="linear_glu", t=t, i=d, o=2 * h),
        dict(name="MLP fc2", kind="linear", t=t, i=h, o=d),
        dict(name="fc1 weight gradient", kind="weight_grad", t=t, i=d, o=2 * h),
        dict(name="fc1 input gradient", kind="input_grad", t=t, i=d, o=2 * h),
        dict(name="qkv weight gradient", kind="weight_grad", t=t, i=d, o=3 * d),
        dict(name="attention logits", kind="logits", b=b * heads, l=n, d=d // heads),
    ]


def gemm_shape(case: dict) -> str:
    """The product of one :func:`gemm_cases` entry as text, e.g. ``(4096x384)(384x2048)``."""
    if case["kind"] == "logits":
        return f"{case['b']} x ({case['l']}x{case['d']})({case['d']}x{case['l']})"
    t, i, o = case["t"], case["i"], case["o"]
    return {"linear": f"({t}x{i})({i}x{o})", "linear_glu": f"({t}x{i})({i}x{o})",
            "weight_grad": f"({i}x{t})({t}x{o})",
            "input_grad": f"({t}x{o})({o}x{i})"}[case["kind"]]


def time_jax_gemm(case: dict, dtype, reps: int = 7) -> float:
    """Median seconds of ``reps`` calls (after one untimed) of one :func:`gemm_cases` product
    as the tim_jax networks compute it: :func:`tim_jax.models.matmul.matmul` (forward, with
    bias and rounding), the forward of :func:`tim_jax.models.layers.dense_silu_glu`, or the
    backward products (``grad_einsum_f32``)."""
    from tim_jax.models import layers
    from tim_jax.models import matmul as mm

    if case["kind"] not in GEMM_KINDS:
        raise ValueError(f"GEMM kind {case['kind']!r}; allowed: {GEMM_KINDS}")
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    if case["kind"] == "logits":
        shape = (case["b"], case["l"], case["d"])
        args = [jax.random.normal(k, shape, dt) for k in keys[:2]]
        fn = lambda q, k: mm.einsum_f32("bqd,bkd->bqk", q, k, dt)  # noqa: E731
    else:
        t, i, o = case["t"], case["i"], case["o"]
        x = jax.random.normal(keys[0], (t, i), dt)
        w = jax.random.normal(keys[1], (i, o), jnp.float32) * 0.05
        g = jax.random.normal(keys[2], (t, o), dt)
        if case["kind"] == "linear":
            args = [x, w, jnp.zeros((o,), jnp.float32)]
            fn = lambda x, w, c: mm.matmul("ti,io->to", x, w, dtype=dt, bias=c,  # noqa: E731
                                           out_dtype=dt)
        elif case["kind"] == "linear_glu":
            args = [x, w, jnp.zeros((o,), jnp.float32)]
            fn = lambda x, w, c: layers._dense_glu_forward(x, w, c, dt, None)[0]  # noqa: E731
        elif case["kind"] == "weight_grad":
            args = [x, g]
            fn = lambda x, g: mm.grad_einsum_f32("ti,to->io", x, g, dt)  # noqa: E731
        else:
            args = [g, w.astype(dt)]
            fn = lambda g, w: mm.grad_einsum_f32("to,io->ti", g, w, dt)  # noqa: E731
    return statistics.median(_call_times(jax.jit(fn), args, reps))


def torch_env(environ, glibc_tunables: Optional[str] = None) -> dict:
    """The torch driver's environment: ``environ`` without tim_jax's allocator setting and
    XLA flags, so the official step runs with glibc's default allocator, unless
    ``glibc_tunables`` asks for one explicitly."""
    env = {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = glibc_tunables
    return env


class TorchOfficialStep:
    """The official step in a subprocess of ``torch_python`` (see :mod:`tim_jax.bench_torch_driver`).

    Start-up builds the model (the call blocks until the driver reports ready). ``run(k)``
    returns the driver's answer: ``{"times": [...], "loss", "minflt_per_step", "maxrss_mib"}``.
    Use as a context manager, or call :meth:`close`.
    """

    DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_torch_driver.py")

    def __init__(self, torch_python: str, spec: dict, timeout_s: float = 3600.0,
                 glibc_tunables: Optional[str] = None):
        if not os.path.isfile(torch_python):
            raise ValueError(f"--torch-python {torch_python!r} is not a file (a Python with "
                             "torch, timm and einops, e.g. <venv>/bin/python)")
        repo = spec["official_repo"]
        if not os.path.isfile(os.path.join(repo, "tim", "models", "c2i", "tim_model.py")):
            raise ValueError(f"--official-repo {repo!r} is not a checkout of the official TiM "
                             "(no tim/models/c2i/tim_model.py)")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [torch_python, self.DRIVER, "--spec", json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=torch_env(os.environ, glibc_tunables))
        self.timeout_s = timeout_s
        self.info = self._read()
        if not self.info.get("ready"):
            self.close()
            if "error" in self.info:  # a set-up problem the driver names (e.g. no CUDA)
                raise ValueError(f"torch driver: {self.info['error']}")
            raise RuntimeError(f"torch driver did not start: {self.info}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read()[-4000:]
            raise RuntimeError(f"the torch driver exited (code {self.proc.poll()}); its stderr:\n"
                               f"{tail}")
        return json.loads(line)

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"torch driver: {out['error']}")
        return out

    def run(self, steps: int) -> dict:
        return self._ask({"op": "run", "steps": int(steps)})

    def flops(self) -> int:
        return int(self._ask({"op": "flops"})["flops"])

    def matmul_peak(self, n: int = 2048, reps: int = 7) -> dict:
        """torch's fp32 matmul speed on the spec's device, measured like :func:`matmul_peak`."""
        return self._ask({"op": "peak", "n": int(n), "reps": int(reps)})

    def gemm(self, case: dict, dtype: str, reps: int = 7) -> float:
        """Median seconds of one :func:`gemm_cases` product in torch (``dtype`` operands, as
        autocast runs it), measured like :func:`time_jax_gemm`."""
        return float(self._ask({"op": "gemm", "case": case, "dtype": str(dtype),
                                "reps": int(reps)})["median_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_official_bench(config, *, official_repo: str, torch_python: str, rounds: int = 4,
                       round_steps: int = 2, turn_warmup: int = 1, warmup: int = 2,
                       peak_n: int = 2048,
                       peak_reps: int = 7, torch_flops: bool = False,
                       torch_threads: int = 0, torch_device: str = "cpu",
                       gemm_rounds: int = 0, gemm_reps: int = 7,
                       torch_glibc_tunables: Optional[str] = None) -> dict:
    """Paired, interleaved tim_jax vs official-torch benchmark; returns the result dict.

    ``torch_glibc_tunables``: a ``GLIBC_TUNABLES`` value for the torch process (default None:
    glibc's default allocator, the one the official code gets; a check of the comparison, e.g.
    with the transparent huge pages of ``glibc.malloc.hugetlb=1`` on the torch side too).

    ``torch_device``: where the official step runs (``"cpu"`` or ``"cuda"``; see the module
    docstring for the settings a GPU run wants).

    Keys: ``jax`` (the :func:`run_train_bench` dict over all timed rounds), ``torch``
    ({``device`` (``torch_device``), ``step_s``, ``images_per_s``, ``n_params``, ``version``,
    ``threads``, ``build_s``, ``minflt_per_step``, ``maxrss_mib``, ``loss``, ``shims``, ``peak``
    (torch's fp32 matmul speed on that device, measured like the JAX one; TF32 allowed on
    CUDA), on CUDA ``device_name`` and ``cuda_max_allocated_mib`` (torch's peak GPU memory),
    optionally ``flops`` from torch's FlopCounter (matmuls and attention only) and
    ``floor_multiple`` against the JAX FLOP count}),
    ``rounds`` (per round: ``jax_median``, ``torch_median``, ``ratio``, ``first``),
    ``round_steps`` and ``turn_warmup`` (timed and untimed steps per turn),
    ``speedup_by_first`` (median ratio of the rounds each side opened: a check for order
    effects; the two should agree within the noise), ``speedup``
    (median of the per-round ratios torch/jax; > 1 means tim_jax is faster) and its
    ``speedup_min`` / ``speedup_max`` over rounds, ``speedup_best`` (fastest torch step /
    fastest tim_jax step: the least load-sensitive figure on a shared machine),
    ``loadavg_start`` / ``loadavg_end``. With ``gemm_rounds > 0`` also ``gemms``: per
    :func:`gemm_cases` product ``jax_s`` / ``torch_s`` (medians over rounds of each side's
    median of ``gemm_reps`` calls, interleaved per product and round) and ``ratio`` (median of
    the per-round torch/jax; > 1: XLA faster), in the config's compute dtype.
    """
    if (rounds < 1 or round_steps < 1 or warmup < 0 or turn_warmup < 0 or gemm_rounds < 0
            or gemm_reps < 1):
        raise ValueError(f"--rounds, --round-steps and --gemm-reps must be >= 1 and --warmup, "
                         f"--turn-warmup, --gemm-rounds >= 0, got {rounds}, {round_steps}, "
                         f"{gemm_reps}, {warmup}, {turn_warmup}, {gemm_rounds}")
    load0 = _loadavg()
    if torch_device not in ("cpu", "cuda"):
        raise ValueError(f"--torch-device must be 'cpu' or 'cuda', got {torch_device!r}")
    spec = official_spec(config, official_repo, seed=int(config.seed), threads=torch_threads,
                         device=torch_device)
    with TorchOfficialStep(torch_python, spec, glibc_tunables=torch_glibc_tunables) as torch_step:
        peaks = compute_peaks(config, peak_n, peak_reps)
        torch_peak = torch_step.matmul_peak(peak_n, peak_reps)
        bench = build_jax_bench(config)
        bench.run(warmup)
        torch_step.run(warmup)
        t_flops = torch_step.flops() if torch_flops else None
        per_round, jax_times, torch_times, minflt, torch_last = [], [], [], 0, {}
        for i in range(rounds):
            order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
            got = {}
            for who in order:
                if who == "jax":
                    if turn_warmup:
                        bench.run(turn_warmup)
                    f0 = _minflt()
                    got["jax"] = bench.run(round_steps)
                    minflt += _minflt() - f0
                else:
                    if turn_warmup:
                        torch_step.run(turn_warmup)
                    torch_last = torch_step.run(round_steps)
                    got["torch"] = torch_last["times"]
            jm, tm = statistics.median(got["jax"]), statistics.median(got["torch"])
            per_round.append({"jax_median": jm, "torch_median": tm, "ratio": tm / jm,
                              "first": order[0]})
            jax_times += got["jax"]
            torch_times += got["torch"]
        gemms = []
        if gemm_rounds:
            dtype = str(config.model.get("dtype", "float32"))
            for case in gemm_cases(config):
                js, ts = [], []
                for i in range(gemm_rounds):
                    for who in (("jax", "torch") if i % 2 == 0 else ("torch", "jax")):
                        if who == "jax":
                            js.append(time_jax_gemm(case, dtype, gemm_reps))
                        else:
                            ts.append(torch_step.gemm(case, dtype, gemm_reps))
                gemms.append({**case, "shape": gemm_shape(case), "dtype": dtype,
                              "jax_s": statistics.median(js), "torch_s": statistics.median(ts),
                              "ratio": statistics.median(t / j for t, j in zip(ts, js))})
        info = torch_step.info
    jax_res = _train_result(config, bench, jax_times, peaks, minflt / len(jax_times), load0)
    b = int(config.data.global_batch_size)
    tst = step_stats(torch_times)
    torch_res = {
        "device": torch_device, "step_s": tst, "images_per_s": b / tst["median"],
        "n_params": info["n_params"],
        "version": info["torch"], "threads": info["threads"], "build_s": info["build_s"],
        "minflt_per_step": torch_last.get("minflt_per_step"),
        "maxrss_mib": torch_last.get("maxrss_mib"), "loss": torch_last.get("loss"),
        "shims": {k: info[k] for k in ("torchvision_shim", "cuda_rng_shim") if k in info},
        "floor_multiple": tst["median"] / jax_res["flop_floor_s"], "peak": torch_peak,
        "autocast_bf16": bool(spec["autocast_bf16"]),
        "glibc_tunables": torch_glibc_tunables or None,
    }
    if "device_name" in info:
        torch_res["device_name"] = info["device_name"]
    if "cuda_max_allocated_mib" in torch_last:
        torch_res["cuda_max_allocated_mib"] = torch_last["cuda_max_allocated_mib"]
    if t_flops is not None:
        torch_res["flops"] = t_flops
    ratios = [r["ratio"] for r in per_round]
    by_first = {who: statistics.median(r["ratio"] for r in per_round if r["first"] == who)
                for who in ("jax", "torch") if any(r["first"] == who for r in per_round)}
    extra = {"gemms": gemms} if gemm_rounds else {}
    return {"jax": jax_res, "torch": torch_res, "rounds": per_round, **extra,
            "round_steps": round_steps, "turn_warmup": turn_warmup,
            "speedup_by_first": by_first,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "speedup_best": tst["min"] / jax_res["step_s"]["min"],
            "loadavg_start": load0, "loadavg_end": _loadavg()}


def format_official_report(res: dict) -> str:
    """Human-readable report of :func:`run_official_bench`."""
    j, t = res["jax"], res["torch"]
    lines = [format_train_report(j, "tim_jax train step (interleaved rounds)"), "",
             "== official PyTorch step (same session, interleaved) ==",
             f"torch             : {t['version']} on {t.get('device', 'cpu')}"
             + (f" ({t['device_name']})" if t.get("device_name") else "")
             + f", {t['threads']} threads, build "
             f"{t['build_s']:.1f} s, shims {t['shims']}",
             "precision         : " + ("bf16 autocast (official mixed_precision: bf16)"
                                       if t.get("autocast_bf16") else "fp32"),
             f"params            : {t['n_params']:,}" + (
                 "" if t["n_params"] == j["n_params"] else
                 f"  (tim_jax: {j['n_params']:,}: DIFFERENT)"),
             f"step time         : {t['step_s']['median']:.4f} s median (min "
             f"{t['step_s']['min']:.4f}, max {t['step_s']['max']:.4f}, spread "
             f"{100 * t['step_s']['spread']:.1f} %, n={t['step_s']['n']})",
             f"images/s          : {t['images_per_s']:.3f}",
             f"step vs JAX floor : {t['floor_multiple']:.2f}x the tim_jax FLOP floor",
             f"matmul peak       : {t['peak']['flops_per_s'] / 1e9:.2f} GFLOP/s (torch fp32 "
             + ("" if t.get("device", "cpu") == "cpu" else "with TF32 allowed, on cuda, ")
             + f"{t['peak']['n']}^3, median of {t['peak']['reps']}) = "
             f"{t['peak']['flops_per_s'] / (j['peak_fp32'] or j['peak'])['flops_per_s']:.2f}x "
             "XLA's fp32"]
    if "flops" in t:
        lines.append(f"FLOPs/step        : {t['flops'] / 1e9:.2f} GFLOP (torch FlopCounter: "
                     "matmuls + attention only)")
    if "cuda_max_allocated_mib" in t:
        lines.append(f"GPU memory        : {t['cuda_max_allocated_mib'] / 1024:.2f} GiB (torch "
                     "max_memory_allocated)")
    lines += [f"minor faults/step : {t['minflt_per_step']:.0f}",
              f"max RSS           : {t['maxrss_mib']:.0f} MiB",
              f"allocator         : {t.get('glibc_tunables') or 'default (GLIBC_TUNABLES unset)'}",
              "",
              "== comparison ==",
              "rounds (torch/jax): " + ", ".join(
                  f"{r['torch_median']:.3f}/{r['jax_median']:.3f}={r['ratio']:.3f}"
                  for r in res["rounds"]),
              f"speed-up          : {res['speedup']:.3f}x (median of per-round torch/jax; "
              f"range {res['speedup_min']:.3f}-{res['speedup_max']:.3f}; > 1: tim_jax faster)",
              f"speed-up, best    : {res['speedup_best']:.3f}x (fastest torch step / fastest "
              "tim_jax step)",
              "by opener        : " + ", ".join(
                  f"{who}-first rounds {v:.3f}x" for who, v in res["speedup_by_first"].items())
              + f" ({res['turn_warmup']} untimed step(s) open each turn)",
              f"tim_jax floor mult: {j['floor_multiple']:.2f}x",
              f"load average      : start {res['loadavg_start']}, end {res['loadavg_end']}"]
    if res.get("gemms"):
        g0 = res["gemms"][0]
        lines += ["", f"== the step's GEMMs alone ({g0['dtype']} operands, same shapes; "
                      "torch/jax > 1: XLA faster) ==",
                  f"{'product':22s} {'shape':28s} {'tim_jax ms':>10s} {'torch ms':>9s} "
                  f"{'torch/jax':>9s}"]
        lines += [f"{g['name']:22s} {g['shape']:28s} {1e3 * g['jax_s']:10.3f} "
                  f"{1e3 * g['torch_s']:9.3f} {g['ratio']:9.3f}" for g in res["gemms"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
def _parse(argv: Sequence[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file[:arg]",
                                    flag_values=fv, lock_config=True)
    flags.DEFINE_integer("steps", 5, "train: timed steps", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed steps after compiling (each framework)",
                         flag_values=fv)
    flags.DEFINE_integer("peak_n", 2048, "side of the square fp32 matmul timed as the peak",
                         flag_values=fv)
    flags.DEFINE_integer("peak_reps", 7, "timed repetitions of the peak matmul", flag_values=fv)
    flags.DEFINE_string("official_repo", None, "official: checkout of WZDTHU/TiM", flag_values=fv)
    flags.DEFINE_string("torch_python", None, "official: interpreter with torch+timm+einops",
                        flag_values=fv)
    flags.DEFINE_integer("rounds", 4, "official: interleaved rounds", flag_values=fv)
    flags.DEFINE_integer("round_steps", 2, "official: timed steps of each framework per round",
                         flag_values=fv)
    flags.DEFINE_integer("turn_warmup", 1, "official: untimed steps that open each framework's "
                         "turn in a round (the process was idle while the other ran)",
                         flag_values=fv)
    flags.DEFINE_boolean("torch_flops", False, "official: also count torch FLOPs (one extra "
                         "step under torch's FlopCounter)", flag_values=fv)
    flags.DEFINE_integer("torch_threads", 0, "official: torch intra-op threads (0: torch's "
                         "default)", flag_values=fv)
    flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"], "official: device of the official "
                      "step (JAX uses its default backend); with cuda also pass --peak_n 8192 and "
                      "set TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false (see the "
                      "module docstring)", flag_values=fv)
    flags.DEFINE_integer("gemm_rounds", 0, "official: also time the step's main GEMMs alone "
                         "on both sides, this many interleaved rounds (0: off)", flag_values=fv)
    flags.DEFINE_integer("gemm_reps", 7, "official: calls per GEMM and round (median)",
                         flag_values=fv)
    flags.DEFINE_string("torch_glibc_tunables", None, "official: GLIBC_TUNABLES of the torch "
                        "process (default: unset, glibc's default allocator)", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the result JSON to this file", flag_values=fv)
    # accept the dashed spellings (--official-repo) as well as absl's underscores
    norm = []
    for a in argv:
        if a.startswith("--") and not a.startswith("--config"):
            name, eq, val = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + val
        norm.append(a)
    try:
        rest = fv(norm, known_only=False)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad command line: {e}") from None
    modes = rest[1:]
    if len(modes) != 1 or modes[0] not in MODES:
        raise ValueError(f"give exactly one mode out of {MODES}, got {modes}")
    if fv["config"].value is None:
        raise ValueError("--config=<configs/file.py[:arg]> is required")
    if modes[0] == "official" and not (fv["official_repo"].value and fv["torch_python"].value):
        raise ValueError("official mode needs --official-repo and --torch-python")
    return modes[0], fv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring); returns the exit code (2: bad usage)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        mode, fv = _parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    config = fv["config"].value
    common = dict(warmup=fv["warmup"].value, peak_n=fv["peak_n"].value,
                  peak_reps=fv["peak_reps"].value)
    try:
        if mode == "train":
            res = run_train_bench(config, steps=fv["steps"].value, **common)
            report = format_train_report(res)
        else:
            res = run_official_bench(config, official_repo=fv["official_repo"].value,
                                     torch_python=fv["torch_python"].value,
                                     rounds=fv["rounds"].value,
                                     round_steps=fv["round_steps"].value,
                                     turn_warmup=fv["turn_warmup"].value,
                                     torch_flops=fv["torch_flops"].value,
                                     torch_threads=fv["torch_threads"].value,
                                     torch_device=fv["torch_device"].value,
                                     gemm_rounds=fv["gemm_rounds"].value,
                                     gemm_reps=fv["gemm_reps"].value,
                                     torch_glibc_tunables=fv["torch_glibc_tunables"].value,
                                     **common)
            report = format_official_report(res)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(report)
    line = json.dumps(res)
    print(RESULT_PREFIX + line, flush=True)
    if fv["json"].value:
        with open(fv["json"].value, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
