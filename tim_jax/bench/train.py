"""The ``train`` benchmark: the whole jitted tim_jax train step of a config, timed on one fixed batch.

:func:`run_train_bench` builds the real training state and step of :mod:`tim_jax.training.step` (the full
objective as configured: DDE or JVP derivative, REPA, label dropout, clipping, AdamW, every EMA), times steps after
a warm-up, and sets them against the FLOPs of the compiled step (XLA's cost analysis) and the machine's matmul
peak measured in the same run, in the config's compute dtype. Result keys: :func:`run_train_bench`; the report:
:func:`tim_jax.bench.report.format_train_report`; measured figures: ``docs/benchmarks.md``.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------------
# the machine
def loadavg() -> Optional[list[float]]:
    """The 1/5/15-minute load averages (None where /proc/loadavg is absent)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def cpu_info() -> str:
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


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def maxrss_mib() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# measurement helpers
def step_stats(times: Sequence[float]) -> dict:
    """``{median, min, max, spread, n}`` of step times in seconds; spread = (max-min)/median."""
    if not times:
        raise ValueError("no step times to summarise (steps must be >= 1)")
    med = statistics.median(times)
    return {"median": med, "min": min(times), "max": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0, "n": len(times)}


def call_times(f, args: Sequence, reps: int) -> list[float]:
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
    times = call_times(mm, (a, b), reps)
    med = statistics.median(times)
    return {"flops_per_s": 2.0 * n ** 3 / med, "median_s": med, "min_s": min(times), "n": n,
            "reps": reps, "dtype": jnp.dtype(dtype).name}


def compute_dtype(config) -> str:
    """The config's compute dtype name: ``model.dtype`` (default float32), with "auto" resolved
    as the networks resolve it (:func:`tim_jax.hardware.default_compute_dtype`)."""
    from tim_jax.hardware import default_compute_dtype

    name = str(config.model.get("dtype", "float32"))
    return default_compute_dtype() if name == "auto" else jnp.dtype(name).name


def compute_peaks(config, n: int = 2048, reps: int = 7) -> tuple[dict, Optional[dict]]:
    """``(peak, peak_fp32)``: the matmul peak in the config's compute dtype (:func:`compute_dtype`),
    which the FLOP floor uses, and the float32 peak when the compute dtype differs (else None).
    """
    dtype = jnp.dtype(compute_dtype(config))
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
    """State, batch and the AOT-compiled whole step of :mod:`tim_jax.training.step` for ``config``.

    The batch is the first batch of the configured data pipeline (``data.source``), placed with
    the step's batch sharding; the same batch is reused every step (the pipeline is not timed).
    ``costs["flops"]`` counts the step without the CPU row chunking (see below); the memory
    figures are those of the compiled (chunked) step.
    """
    from tim_jax.data import pipeline as data
    from tim_jax.training import sharding
    from tim_jax.training import state as train_state
    from tim_jax.training import step as train_step

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
    from tim_jax.models.cpu_layouts import cpu_layouts, row_chunking

    if cpu_layouts():
        # FLOPs from the same step traced without the CPU row chunking of large matmuls:
        # XLA's cost analysis counts a loop body once. Compiled only when the chunking changed
        # the program.
        with row_chunking(False):
            plain = train_step.make_train_step(config, graphdef, mesh, shardings)
            plain_lowered = plain.jitted.lower(state, batch)
        if plain_lowered.as_text() != lowered.as_text():
            costs["flops"] = compiled_costs(plain_lowered.compile(),
                                            num_devices=mesh.size)["flops"]
    return JaxStepBench(config, step=compiled, state=state, batch=batch, lower_s=t1 - t0,
                        compile_s=t2 - t1, costs=costs, n_params=n_params)


def _floor_fields(flops: float, peak: float, median_s: float) -> dict:
    """The step against the FLOP floor: the time ``flops`` take at ``peak`` FLOP/s."""
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
    load0 = loadavg()
    peaks = compute_peaks(config, peak_n, peak_reps)
    bench = build_jax_bench(config)
    bench.run(warmup)
    f0 = minor_faults()
    times = bench.run(steps)
    minflt = (minor_faults() - f0) / steps
    return train_result(config, bench, times, peaks, minflt, load0)


def train_result(config, bench: JaxStepBench, times: Sequence[float], peaks: tuple, minflt: float,
                 load0: Optional[list]) -> dict:
    """The :func:`run_train_bench` dict of measured step ``times`` (s) of ``bench``, the
    :func:`compute_peaks` pair ``peaks``, minor faults per step and the load at the start."""
    st = step_stats(times)
    peak, peak_fp32 = peaks
    b = int(config.data.global_batch_size)
    mem = {k[:-6]: v for k, v in bench.costs.items() if k.endswith("_bytes")}
    return {
        "batch_size": b, "n_params": bench.n_params, "devices": jax.device_count(),
        "backend": jax.default_backend(), "cpu": cpu_info(), "jax": jax.__version__,
        "lower_s": bench.lower_s, "compile_s": bench.compile_s,
        "step_s": st, "images_per_s": b / st["median"], "flops": bench.costs["flops"],
        "compute_dtype": peak["dtype"], "peak": peak, "peak_fp32": peak_fp32,
        **_floor_fields(bench.costs["flops"], peak["flops_per_s"], st["median"]),
        "memory": mem, "maxrss_mib": maxrss_mib(), "minflt_per_step": minflt,
        "allocator": os.environ.get("GLIBC_TUNABLES"), "loss": bench.last_loss,
        "loadavg_start": load0, "loadavg_end": loadavg(),
    }

