"""Human-readable reports of the benchmark results (one ``name : value`` per line).

The result dicts are those of :func:`tim_jax.bench.train.run_train_bench` and
:func:`tim_jax.bench.official.run_official_bench`; the CLI prints these reports, then the dict as JSON.
"""
from __future__ import annotations

import json
from typing import Optional

RESULT_PREFIX = "BENCH_RESULT "   # the machine-readable last line of every benchmark


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



def print_result(report: str, res: dict, json_path: Optional[str] = None) -> None:
    """Prints the human-readable ``report``, then ``BENCH_RESULT {json}``; also writes that JSON
    to ``json_path`` when given."""
    print(report)
    line = json.dumps(res)
    print(RESULT_PREFIX + line, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            f.write(line + "\n")
