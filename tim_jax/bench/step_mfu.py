"""The whole train step's speed and MFU per derivative and attention implementation.

    python -m tim_jax.bench.step_mfu [--config configs/c2i_xl2_256.py:synthetic] [--batch 256]
        [--micro-batch 32] [--derivative dde,jvp] [--attention xla,flash,cudnn,auto]
        [--variants dde:flash,jvp:xla] [--dtype bfloat16] [--steps 5] [--warmup 2]
        [--peak-n 8192] [--trace-steps 2] [--set model.remat=full ...] [--out DIR]
        [--budget-s 0] [--quick]

For each variant (derivative x attention, or the ``--variants`` list in order) it builds the
full train step of ``python -m tim_jax.bench train`` (``build_jax_bench``: real state, full objective
with ``objective.derivative`` set, REPA, AdamW, EMA; AOT-compiled, one fixed synthetic batch),
runs ``--warmup`` untimed steps and ``--steps`` timed ones, and reports the step time (median,
min, max), images/s, FLOPs per step, the achieved FLOP/s and the MFU: FLOPs per step / median
step time / the matmul peak in the compute dtype (``matmul_peak``: median of ``--peak-reps``
``--peak-n``-cubed matmuls, bf16 x bf16 -> fp32 for bf16), measured once in the same process.

FLOPs per step: XLA's cost analysis of the compiled step (``compiled_costs``, every op).
Two corrections, both recorded in the JSON: (1) with gradient accumulation (``--micro-batch``:
``optim.grad_accum_steps = batch / micro``, the micro-batches run in a ``lax.scan`` whose body
XLA counts once) the count is multiplied by the number of micro-batches (the optimizer update is
then over-counted, well under 1 % of a large model's step); (2) Pallas and cuDNN attention run
as custom calls XLA does not count, so a flash/cudnn/auto variant takes the FLOPs of the "xla"
variant of the same derivative when that ran in the same process (``flops_source``).
``flops_per_param_token`` = FLOPs / (batch x tokens x parameters) is a sanity check of the
count: about 6 for a forward + backward where every parameter acts on every token, less for the
per-image ones (embeddings, adaLN modulation), more with the derivative's extra forwards.
``--micro-batch 32`` by default: the official per-GPU batch (256 over 8 GPUs); a TiM-XL/2 step
of 256 rows without accumulation does not fit one 80 GB card. 0: no accumulation.

``--trace-steps N`` records a ``jax.profiler`` trace of N more steps per variant in
``<out>/trace_<derivative>_<attention>/`` (with a Perfetto JSON) and reads from it the 10 ops
with the most time (device XLA ops on a GPU, XLA:CPU thunks on a CPU), per step.

Output: ``<out>/step_mfu.json`` (keys in :func:`run`) and ``step_mfu.md``, rewritten after each
variant. Failures (compile errors, out of memory) are caught per variant and reported by type.
``--quick``: the tiny ``configs/debug_cpu.py`` (batch 8) on CPU, for the tests.
"""
from __future__ import annotations

import argparse
import ast
import collections
import gc
import glob
import gzip
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from tim_jax import atomic_files
from tim_jax.models import attention as attention_mod

from tim_jax.bench import train as bench  # the train-step measurement of `bench train`

REPO = pathlib.Path(__file__).resolve().parents[2]
DERIVATIVES = ("dde", "jvp")
CUSTOM_CALL_ATTENTION = ("flash", "cudnn", "dot_product", "auto")
JSON_NAME, MD_NAME = "step_mfu.json", "step_mfu.md"
QUICK = dict(config="configs/debug_cpu.py", batch=8, micro_batch=0, steps=2, warmup=1,
             peak_n=256, peak_reps=2, trace_steps=1)


def load_config(spec: str):
    """``get_config([arg])`` of the ml_collections file ``path[:arg]`` (relative paths: from the
    current directory, then from the repository root)."""
    path, _, arg = spec.partition(":")
    for cand in (pathlib.Path(path), REPO / path):
        if cand.is_file():
            break
    else:
        raise ValueError(f"config file {path!r} not found (cwd {os.getcwd()}, repo {REPO})")
    if str(REPO) not in sys.path:  # config files import `configs.base`
        sys.path.insert(0, str(REPO))
    mod_spec = importlib.util.spec_from_file_location(f"_step_mfu_cfg_{cand.stem}", cand)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def set_field(config, dotted: str, value) -> None:
    """``config.a.b = value`` for an existing field; ValueError naming an unknown one."""
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise ValueError(f"--set {dotted}: no config section {name!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"--set {dotted}: no config field {leaf!r} (have {sorted(node)})")
    node[leaf] = value


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def variant_config(base_spec: str, *, derivative, attention, batch, micro_batch, dtype,
                   overrides: Sequence[tuple[str, object]]):
    """The config of one variant: the file's config with batch, accumulation, compute dtype,
    ``objective.derivative`` and ``model.attention_impl`` set, then ``overrides``."""
    config = load_config(base_spec)
    k = 1
    if micro_batch:
        if batch % micro_batch:
            raise ValueError(f"--batch {batch} is not a multiple of --micro-batch {micro_batch}")
        k = batch // micro_batch
    for key, val in (("data.global_batch_size", batch), ("optim.grad_accum_steps", k),
                     ("model.dtype", dtype), ("objective.derivative", derivative),
                     ("model.attention_impl", attention), *overrides):
        set_field(config, key, val)
    return config


def top_ops(trace_dir: str, steps: int, k: int = 10) -> Optional[dict]:
    """The ``k`` ops with the most total time in the Perfetto trace under ``trace_dir``:
    ``{"source", "ops": [{name, ms_per_step, count_per_step, share}], "total_ms_per_step"}``
    (share of the summed op time of that source); None where no trace file is found."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return None
    with gzip.open(sorted(files)[-1]) as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    device = {p for p, n in procs.items() if n.startswith("/device:")}
    pick = {t for t, n in threads.items() if t[0] in device and n == "XLA Ops"}
    source = "XLA ops on the device"
    if not pick:
        pick = {t for t, n in threads.items() if t[0] in device and n.startswith("Stream")}
        source = "device kernels (streams)"
    if not pick:
        pick = {t for t, n in threads.items() if n.startswith("tf_XLA")}
        source = "XLA:CPU threads"
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if (e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in pick
                and not str(e.get("name", "")).startswith("ThunkExecutor")):  # CPU wrappers
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    all_us = sum(total.values())
    ops = [{"name": n, "ms_per_step": us / 1e3 / steps, "count_per_step": count[n] / steps,
            "share": us / all_us if all_us else 0.0} for n, us in total.most_common(k)]
    return {"source": source, "ops": ops, "total_ms_per_step": all_us / 1e3 / steps}


def _error_status(err: BaseException) -> tuple[str, str]:
    text = f"{type(err).__name__}: {err}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return ("OOM" if oom else "error"), text.strip().splitlines()[0][:300]


def measure_variant(config, *, steps, warmup, trace_steps, trace_dir, mem_limit) -> dict:
    """Compiles, warms up, times (and optionally traces) the step of ``config``."""
    k = int(config.optim.grad_accum_steps)
    b = int(config.data.global_batch_size)
    m = config.model
    res = {"batch_size": b, "grad_accum_steps": k, "micro_batch": b // k,
           "tokens": (int(m.input_size) // int(m.patch_size)) ** 2}
    jb = bench.build_jax_bench(config)
    res.update(n_params=jb.n_params, lower_s=jb.lower_s, compile_s=jb.compile_s,
               memory={key[:-6]: v for key, v in jb.costs.items() if key.endswith("_bytes")})
    flops = float(jb.costs["flops"])
    compiled = getattr(jb, "_step", None)  # JaxStepBench keeps the compiled step here
    loop = None if compiled is None else " while(" in compiled.as_text()
    res["accum_loop_in_hlo"] = loop
    res["flops_xla"] = flops
    res["flops_counted"] = flops * (k if k > 1 and loop is not False else 1)
    peak_bytes = res["memory"].get("peak")
    if mem_limit and peak_bytes and peak_bytes > mem_limit:
        res["status"] = "OOM-skipped"
        res["error"] = (f"compiled peak {peak_bytes / 2 ** 30:.1f} GiB > device limit "
                        f"{mem_limit / 2 ** 30:.1f} GiB")
        return res
    jb.run(warmup)
    times = jb.run(steps)
    res["step_s"] = bench.step_stats(times)
    res["images_per_s"] = b / res["step_s"]["median"]
    res["loss"] = jb.last_loss
    res["status"] = "ok"
    if trace_steps:
        try:  # optional: a profiler failure keeps the timings
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            try:
                jb.run(trace_steps)
            finally:
                jax.profiler.stop_trace()
            res["trace_dir"] = trace_dir
            res["top_ops"] = top_ops(trace_dir, trace_steps)
        except Exception as err:  # noqa: BLE001
            res["trace_error"] = f"{type(err).__name__}: {err}"[:300]
    return res


def finalise(variants: list, peak: dict) -> None:
    """Sets ``flops_per_step``/``flops_source``/``achieved_flops_per_s``/``mfu`` of each measured
    variant (custom-call attention variants take the xla variant's FLOPs when it ran)."""
    xla = {v["derivative"]: v["flops_counted"] for v in variants
           if v.get("attention") == "xla" and "flops_counted" in v}
    for v in variants:
        if "flops_counted" not in v:
            continue
        custom = v["attention"] in CUSTOM_CALL_ATTENTION
        if custom and v["derivative"] in xla:
            v["flops_per_step"], v["flops_source"] = xla[v["derivative"]], "xla variant"
        else:
            v["flops_per_step"] = v["flops_counted"]
            v["flops_source"] = ("own step; attention custom calls not counted" if custom
                                 else "own step")
        if v.get("n_params") and v.get("tokens"):
            v["flops_per_param_token"] = v["flops_per_step"] / (
                v["batch_size"] * v["tokens"] * v["n_params"])
        if "step_s" in v:
            v["achieved_flops_per_s"] = v["flops_per_step"] / v["step_s"]["median"]
            v["mfu"] = v["achieved_flops_per_s"] / peak["flops_per_s"]


def format_markdown(res: dict) -> str:
    pk = res["peak"]
    lines = [f"### Train step MFU ({res['config']}, {res['device']}, jax {res['jax']}, "
             f"{res['dtype']})", "",
             f"Matmul peak ({pk['dtype']} {pk['n']}³, median of {pk['reps']}): "
             f"{pk['flops_per_s'] / 1e12:.1f} TFLOP/s. FLOPs: XLA cost analysis of the step "
             "(× micro-batches; flash/cudnn take the xla variant's count).", "",
             "| derivative | attention | batch (micro×k) | s/step | img/s | TFLOP/step | "
             "FLOP/(param·token) | TFLOP/s | MFU | compiled peak GiB | compile s | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for v in res["variants"]:
        st = (v.get("step_s") or {}).get("median")
        mem = (v.get("memory") or {}).get("peak")
        status = v["status"] + (f" ({v['error']})" if v.get("error") else "")
        lines.append(
            f"| {v['derivative']} | {v['attention']} | {v.get('batch_size', '')} "
            f"({v.get('micro_batch', '')}×{v.get('grad_accum_steps', '')}) | {f(st, '.4f')} | "
            f"{f(v.get('images_per_s'), '.1f')} | "
            f"{f(v.get('flops_per_step') and v['flops_per_step'] / 1e12, '.2f')} | "
            f"{f(v.get('flops_per_param_token'), '.2f')} | "
            f"{f(v.get('achieved_flops_per_s') and v['achieved_flops_per_s'] / 1e12, '.1f')} | "
            f"{f(v.get('mfu') and 100 * v['mfu'], '.1f')}{'%' if v.get('mfu') else ''} | "
            f"{f(mem and mem / 2 ** 30, '.2f')} | {f(v.get('compile_s'), '.1f')} | "
            f"{status.replace('|', '/')} |")
    for v in res["variants"]:
        top = v.get("top_ops")
        if not top:
            continue
        lines += ["", f"Top ops, {v['derivative']} / {v['attention']} ({top['source']}, "
                      f"{top['total_ms_per_step']:.2f} ms per step in all):", "",
                  "| op | ms/step | calls/step | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['name'][:80]}` | {o['ms_per_step']:.3f} | {o['count_per_step']:.0f} | "
                  f"{100 * o['share']:.1f}% |" for o in top["ops"]]
    return "\n".join(lines) + "\n"


def _write(out_dir: str, res: dict) -> None:
    atomic_files.write_text(os.path.join(out_dir, JSON_NAME), json.dumps(res, indent=1))
    atomic_files.write_text(os.path.join(out_dir, MD_NAME), format_markdown(res))


def run(*, config, variants, batch, micro_batch, dtype, steps, warmup, peak_n, peak_reps,
        trace_steps, overrides, out_dir, budget_s) -> dict:
    """Measures each (derivative, attention) of ``variants`` and writes the results. JSON keys:
    ``config``, ``backend``, ``device``, ``jax``, ``dtype``, ``peak`` (``matmul_peak``),
    ``flash_measured_wins`` (what "auto" reads), ``variants`` (each: derivative, attention,
    status, error?, batch_size, grad_accum_steps, micro_batch, n_params, lower_s, compile_s,
    memory, tokens, flops_xla, flops_counted, accum_loop_in_hlo, flops_per_step, flops_source,
    flops_per_param_token, step_s,
    images_per_s, achieved_flops_per_s, mfu, loss, trace_dir?, top_ops?, trace_error?), ``elapsed_s``,
    ``complete``."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    res = {"config": config, "backend": jax.default_backend(),
           "device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
           "dtype": dtype, "overrides": [list(o) for o in overrides],
           "flash_measured_wins": dict(attention_mod.FLASH_MEASURED_WINS),
           "peak": bench.matmul_peak(peak_n, peak_reps, jnp.dtype(dtype)), "variants": [],
           "complete": False}
    try:
        mem_limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - no memory stats (CPU)
        mem_limit = None
    for derivative, attention in variants:
        v = {"derivative": derivative, "attention": attention}
        res["variants"].append(v)
        if budget_s and time.perf_counter() - t0 > budget_s:
            v["status"] = "skipped (budget)"
        elif derivative == "jvp" and not attention_mod.get_attention_impl(attention).supports_jvp:
            v["status"], v["error"] = "n/a", f"{attention} has no forward-mode AD"
        else:
            print(f"=== {derivative} / {attention}", flush=True)
            try:
                cfg = variant_config(config, derivative=derivative, attention=attention,
                                     batch=batch, micro_batch=micro_batch, dtype=dtype,
                                     overrides=overrides)
                v.update(measure_variant(cfg, steps=steps, warmup=warmup,
                                         trace_steps=trace_steps, mem_limit=mem_limit,
                                         trace_dir=os.path.join(
                                             out_dir, f"trace_{derivative}_{attention}")))
            except Exception as err:  # noqa: BLE001 - every failure is reported per variant
                v["status"], v["error"] = _error_status(err)
            gc.collect()
        finalise(res["variants"], res["peak"])
        res["elapsed_s"] = time.perf_counter() - t0
        _write(out_dir, res)
        print(f"{derivative} / {attention}: {v['status']} {v.get('error', '')} "
              f"step {v.get('step_s', {}).get('median', float('nan')):.4f} s, "
              f"MFU {100 * v.get('mfu', float('nan')):.1f} %", flush=True)
    res["complete"] = True
    res["elapsed_s"] = time.perf_counter() - t0
    _write(out_dir, res)
    return res


def _variants(a, parser) -> list[tuple[str, str]]:
    if a.variants:
        pairs = []
        for item in a.variants.split(","):
            d, sep, att = item.strip().partition(":")
            if not sep:
                parser.error(f"--variants: {item!r} is not DERIVATIVE:ATTENTION")
            pairs.append((d, att))
    else:
        pairs = [(d.strip(), att.strip()) for d in a.derivative.split(",") if d.strip()
                 for att in a.attention.split(",") if att.strip()]
    for d, att in pairs:
        if d not in DERIVATIVES:
            parser.error(f"derivative {d!r}: expected one of {DERIVATIVES}")
        try:
            attention_mod.get_attention_impl(att)
        except ValueError as err:
            parser.error(str(err))
    if not pairs:
        parser.error("no variant to run")
    return pairs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/c2i_xl2_256.py:synthetic", help="path[:arg]")
    p.add_argument("--batch", type=int, default=256, help="global batch per step")
    p.add_argument("--micro-batch", type=int, default=32,
                   help="rows per accumulated micro-batch (0: no accumulation)")
    p.add_argument("--derivative", default="dde,jvp")
    p.add_argument("--attention", default="xla")
    p.add_argument("--variants", default="", help="DERIV:ATTN,... (overrides the product)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--trace-steps", type=int, default=0, help="profile this many steps (0: off)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. model.remat=full (repeatable)")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench_gpu_out")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new variant after this many seconds (0: no limit)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (" + str(QUICK) + ")")
    a = p.parse_args(argv)
    if a.quick:
        for key, val in QUICK.items():
            setattr(a, key, val)
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.micro_batch < 0 or a.trace_steps < 0:
        p.error("--steps/--batch must be >= 1, --warmup/--micro-batch/--trace-steps >= 0")
    overrides = []
    for item in a.set:
        key, sep, val = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        overrides.append((key.strip(), parse_value(val.strip())))
    variants = _variants(a, p)
    try:
        variant_config(a.config, derivative=variants[0][0], attention=variants[0][1],
                       batch=a.batch, micro_batch=a.micro_batch, dtype=a.dtype,
                       overrides=overrides)  # bad config/overrides fail before any compile
    except ValueError as err:
        p.error(str(err))
    res = run(config=a.config, variants=variants, batch=a.batch, micro_batch=a.micro_batch,
              dtype=a.dtype, steps=a.steps, warmup=a.warmup, peak_n=a.peak_n,
              peak_reps=a.peak_reps, trace_steps=a.trace_steps, overrides=overrides,
              out_dir=a.out, budget_s=a.budget_s)
    print(format_markdown(res))
    print(f"wrote {os.path.join(a.out, JSON_NAME)} and {MD_NAME}")
    return 0 if any(v["status"] == "ok" for v in res["variants"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
