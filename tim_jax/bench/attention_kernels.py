"""Attention kernels alone: tim_jax's Pallas flash kernel against cuDNN, "xla" and "blocked".

    python -m tim_jax.bench.attention_kernels [--out DIR] [--tokens 256,1024,4096,16384]
        [--head-dims 72,64] [--heads 16] [--tokens-per-call 65536] [--dtype bfloat16]
        [--impls flash,cudnn,xla,blocked] [--modes forward,fwd_bwd,jvp] [--reps 10]
        [--check-max-tokens 1024] [--max-logits-gib 24] [--budget-s 0] [--quick]

Self-attention (Lq = Lk = L), H heads, head dim D, batch B = max(1, tokens_per_call // L), one
device. Each cell (D, L, mode, impl) is jitted, lowered and compiled once, then called after two
warm-up calls: ``--reps`` samples of ``inner`` back-to-back calls each (``inner`` sized so that
a sample lasts >= 2 ms; results waited for), median and min seconds per call.

Implementations: ``flash`` (:func:`tim_jax.models.kernels.flash_attention.flash_attention`,
default blocks; ``flash:BQxBK`` sets block_q/block_k of the forward and JVP kernels), ``cudnn``
(``jax.nn.dot_product_attention(implementation="cudnn")`` called in its own (B, L, H, D) layout:
no transposes timed), and any name of the attention dispatch (``xla``, ``blocked``,
``xla_softmax``, ...), heads-first (B, H, L, D). "xla" above 2048^2 logits per head *is*
"blocked" (``use_blocked``): those cells are not run again and point at the blocked ones.

Modes: ``forward`` (o); ``fwd_bwd`` (dq, dk, dv = grad of sum(o * w), w a fixed random float32
array: the forward and the backward); ``jvp`` (``jax.jvp`` with tangents for q, k and v: o and
its tangent). cuDNN has no forward-mode AD: its jvp cells read ``n/a``.

FLOPs counted (matmul FLOPs, 2 per multiply-add, no recomputation counted):
forward 4*B*H*L*L*D (S = q k^T, o = P v); fwd_bwd 3x that (backward: dv = P^T do, dP = do v^T,
dq = dS k, dk = dS^T q); jvp 3x (tangent of S: dq k^T + q dk^T; tangent of o: dP v + P dv).
TFLOP/s = those FLOPs / median seconds. FlashAttention papers count the backward as 2.5x the
forward (its recomputed S); multiply our fwd_bwd TFLOP/s by 3.5/3 to compare with them.

Memory: ``compiled.memory_analysis()`` temp + argument + output bytes (no device memory
needed). Materialising paths whose float32 logits estimate (B*H*L*L*4 bytes times 2 for
forward, 4 with a derivative) exceeds ``--max-logits-gib`` are ``OOM-skipped`` with the estimate,
as are programs whose compiled total exceeds the device's memory limit; compile or run errors
(runtime OOM included) are caught per cell and reported by type. Correctness: at
L <= ``--check-max-tokens``, max |x - ref| / max |ref| over the outputs, ref = "xla" on the same
inputs cast to float32 under ``jax.default_matmul_precision("highest")`` (first 2 batch rows).

Output (``--out``, default ``$OUT`` or ``./bench_gpu_out``): ``attention_kernels.json`` (keys in
:func:`run`) and ``attention_kernels.md``, rewritten after every cell, so a run killed by a
timeout keeps what it measured. ``--quick``: tiny CPU smoke run (flash in Pallas interpret mode).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax import atomic_files
from tim_jax.models import attention as attention_mod
from tim_jax.models.kernels.flash_attention import flash_attention, kernel_calls

try:  # jax.jvp through the CPU custom-VJP attention needs the forward-mode switch
    from tim_jax.autodiff import forward_mode
except ImportError:  # pragma: no cover - module moved: plain autodiff everywhere but XLA:CPU
    forward_mode = contextlib.nullcontext

MODES = ("forward", "fwd_bwd", "jvp")
FLOP_FACTOR = {"forward": 1.0, "fwd_bwd": 3.0, "jvp": 3.0}   # times 4*B*H*L*L*D
_MATERIALISED_FACTOR = {"forward": 2, "fwd_bwd": 4, "jvp": 4}  # float32 (L, L) arrays alive
JSON_NAME, MD_NAME = "attention_kernels.json", "attention_kernels.md"
QUICK = dict(tokens="32", head_dims="16", heads=2, tokens_per_call=64, reps=2,
             check_max_tokens=32, impls="flash,cudnn,xla")


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, mode: str) -> float:
    """Matmul FLOPs of one call in ``mode`` (counting in the module docstring)."""
    return 4.0 * batch * heads * lq * lk * head_dim * FLOP_FACTOR[mode]


def impl_spec(name: str, scale: float):
    """``(fn(q, k, v) -> o, layout, supports_jvp)``; layout "bhld" (heads-first) or "blhd"."""
    if name == "cudnn":
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale,
                                                          implementation="cudnn")
        return fn, "blhd", False
    if name == "flash" or name.startswith("flash:"):
        blocks = {}
        if ":" in name:
            try:
                bq, bk = (int(x) for x in name.split(":", 1)[1].lower().split("x"))
            except ValueError:
                raise ValueError(f"impl {name!r}: expected flash:BQxBK, e.g. flash:128x64") from None
            blocks = dict(block_q=bq, block_k=bk)
        return (lambda q, k, v: flash_attention(q, k, v, scale=scale, **blocks)), "bhld", True
    impl = attention_mod.get_attention_impl(name)  # ValueError listing the registered ones
    return (lambda q, k, v: attention_mod.attention(q, k, v, impl=name, scale=scale)), "bhld", \
        impl.supports_jvp


def mode_program(attn, mode: str):
    """The function of the mode's arguments: forward (q, k, v) -> o; fwd_bwd (q, k, v, w) ->
    (dq, dk, dv); jvp (q, k, v, tq, tk, tv) -> (o, do)."""
    if mode == "forward":
        return attn
    if mode == "fwd_bwd":
        def fwd_bwd(q, k, v, w):
            loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w)
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        return fwd_bwd
    if mode == "jvp":
        def jvp(q, k, v, tq, tk, tv):
            with forward_mode():
                return jax.jvp(attn, (q, k, v), (tq, tk, tv))
        return jvp
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def make_inputs(batch, heads, tokens, head_dim, dtype, seed=0) -> dict:
    """Heads-first arrays q, k, v, tq, tk, tv (``dtype``) and w (float32), (B, H, L, D)."""
    keys = jax.random.split(jax.random.key(seed), 7)
    shape = (batch, heads, tokens, head_dim)
    out = {n: jax.random.normal(kk, shape, dtype) for n, kk in
           zip(("q", "k", "v", "tq", "tk", "tv"), keys[:6])}
    out["w"] = jax.random.normal(keys[6], shape, jnp.float32)
    return out


def mode_args(inputs: dict, mode: str, layout: str) -> tuple:
    names = {"forward": "qkv", "fwd_bwd": ("q", "k", "v", "w"),
             "jvp": ("q", "k", "v", "tq", "tk", "tv")}[mode]
    tr = (lambda x: x.transpose(0, 2, 1, 3)) if layout == "blhd" else (lambda x: x)
    return tuple(tr(inputs[n]) for n in names)


def to_heads_first(out, layout: str) -> list:
    leaves = jax.tree.leaves(out)
    return [x.transpose(0, 2, 1, 3) if layout == "blhd" else x for x in leaves]


def time_calls(f, args, reps: int, min_sample_s: float = 2e-3) -> dict:
    """Seconds per call of ``f(*args)`` (two warm-up calls first): ``reps`` samples of
    ``inner`` back-to-back calls (waited for at the end of each sample)."""
    for _ in range(2):
        jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = time.perf_counter() - t0
    inner = int(min(50, max(1, math.ceil(min_sample_s / max(one, 1e-9)))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "inner": inner,
            "reps": reps}


def memory_of(compiled) -> Optional[dict]:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("temp", "argument", "output")}
    out["total"] = sum(out.values())
    return out


def device_memory_limit() -> Optional[int]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats (CPU)
        return None
    return stats.get("bytes_limit")


def max_rel_err(got: Sequence, ref: Sequence) -> float:
    """max |got - ref| / max |ref| over all outputs (float64 on the host)."""
    num = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))))
              for g, r in zip(got, ref))
    den = max(float(np.max(np.abs(np.asarray(r, np.float64)))) for r in ref)
    return num / den if den > 0 else float("nan")


def _error_status(err: BaseException) -> tuple[str, str]:
    text = f"{type(err).__name__}: {err}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return ("OOM" if oom else "error"), text.strip().splitlines()[0][:300]


def _blocked_alias(impl: str, tokens: int) -> bool:
    use_blocked = getattr(attention_mod, "use_blocked", None)
    return impl == "xla" and use_blocked is not None and bool(use_blocked(tokens, tokens))


def run_cell(impl, mode, inputs, shape, *, scale, max_logits_gib, mem_limit, reps,
             reference) -> dict:
    """One (impl, mode) measurement on ``inputs`` of ``shape`` = (B, H, L, D)."""
    b, h, n, d = shape
    cell = {"impl": impl, "mode": mode, "batch": b, "tokens": n, "head_dim": d,
            "flops": attention_flops(b, h, n, n, d, mode)}
    fn, layout, jvp_ok = impl_spec(impl, scale)
    if mode == "jvp" and not jvp_ok:
        return {**cell, "status": "n/a", "note": "no forward-mode AD"}
    if _blocked_alias(impl, n):
        return {**cell, "status": "same as blocked",
                "note": "xla switches to blocked above 2048^2 logits per head"}
    if impl in ("xla", "xla_softmax", "dot_product"):
        est = b * h * n * n * 4 * _MATERIALISED_FACTOR[mode] / 2 ** 30
        if est > max_logits_gib:
            return {**cell, "status": "OOM-skipped", "estimate_gib": est,
                    "note": f"~{est:.1f} GiB of float32 logits > {max_logits_gib} GiB"}
    args = mode_args(inputs, mode, layout)
    prog = mode_program(fn, mode)
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(prog).lower(*args).compile()
        cell["compile_s"] = time.perf_counter() - t0
        cell["memory"] = memory_of(compiled)
        if impl.startswith("flash"):
            cell["kernels"] = kernel_calls(jax.make_jaxpr(prog)(*args))
        total = (cell["memory"] or {}).get("total")
        if mem_limit and total and total > mem_limit:
            return {**cell, "status": "OOM-skipped", "estimate_gib": total / 2 ** 30,
                    "note": f"compiled {total / 2 ** 30:.1f} GiB > device limit "
                            f"{mem_limit / 2 ** 30:.1f} GiB"}
        cell.update(time_calls(compiled, args, reps))
        cell["median_ms"] = 1e3 * cell["median_s"]
        cell["tflops"] = cell["flops"] / cell["median_s"] / 1e12
        if reference is not None:
            nb = reference["rows"]
            got = [x[:nb] for x in to_heads_first(compiled(*args), layout)]
            cell["max_rel_err"] = max_rel_err(got, reference[mode])
        cell["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - every failure is reported per cell
        cell["status"], cell["error"] = _error_status(err)
    return cell


def reference_outputs(inputs: dict, modes, scale: float, rows: int = 2) -> dict:
    """The fp32 "xla" outputs of each mode on the first ``rows`` batch rows."""
    small = {k: v[:rows].astype(jnp.float32) for k, v in inputs.items()}
    attn = lambda q, k, v: attention_mod.attention(q, k, v, impl="xla", scale=scale)
    ref = {"rows": rows}
    with jax.default_matmul_precision("highest"):
        for mode in modes:
            out = jax.jit(mode_program(attn, mode))(*mode_args(small, mode, "bhld"))
            ref[mode] = [np.asarray(x) for x in jax.tree.leaves(out)]
    return ref


def summarise(cells: list, head_dims, tokens, modes, impls) -> tuple[dict, dict]:
    """``best``: per "LxD" and mode, the fastest impl that ran; ``suggested_flash_measured_wins``:
    {backend: the fewest tokens from which flash beat xla (blocked where xla is blocked) in
    fwd_bwd and jvp at every measured size, at the first head dim; null if never}."""
    ok = {(c["head_dim"], c["tokens"], c["mode"], c["impl"]): c for c in cells
          if c.get("status") == "ok"}
    best = {}
    for d in head_dims:
        for n in tokens:
            for mode in modes:
                runs = [(ok[(d, n, mode, i)]["median_s"], i) for i in impls
                        if (d, n, mode, i) in ok]
                if runs:
                    best.setdefault(f"{n}x{d}", {})[mode] = min(runs)[1]
    d0, wins = head_dims[0], None
    for n in (sorted(tokens, reverse=True) if {"fwd_bwd", "jvp"} & set(modes) else ()):
        base = "blocked" if _blocked_alias("xla", n) else "xla"
        beat = all((d0, n, m, "flash") in ok and (d0, n, m, base) in ok
                   and ok[(d0, n, m, "flash")]["median_s"] < ok[(d0, n, m, base)]["median_s"]
                   for m in ("fwd_bwd", "jvp") if m in modes)
        if not beat:
            break
        wins = n
    return best, {jax.default_backend(): wins}


def format_markdown(res: dict) -> str:
    """The Markdown report: one row per cell, then the fastest impl per shape and mode."""
    lines = [f"### Attention kernels ({res['device']}, jax {res['jax']}, {res['dtype']}, "
             f"H={res['heads']}, {res['tokens_per_call']} tokens per call)", "",
             "FLOPs: forward 4·B·H·L²·D; fwd_bwd ×3; jvp ×3 (matmuls only, no recompute). "
             "Memory: compiled temp+args+out. Error: max|x−ref|/max|ref| vs fp32 xla.", "",
             "| D | L | B | mode | impl | ms (median) | TFLOP/s | memory MiB | compile s "
             "| max rel err | status |", "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    for c in res["cells"]:
        mem = (c.get("memory") or {}).get("total")
        status = c["status"] + (f" ({c.get('error') or c.get('note')})"
                                if c["status"] != "ok" and (c.get("error") or c.get("note"))
                                else "")
        lines.append(f"| {c['head_dim']} | {c['tokens']} | {c['batch']} | {c['mode']} | "
                     f"{c['impl']} | {f(c.get('median_ms'), '.3f')} | {f(c.get('tflops'), '.1f')}"
                     f" | {f(None if mem is None else mem / 2 ** 20, '.1f')} | "
                     f"{f(c.get('compile_s'), '.1f')} | {f(c.get('max_rel_err'), '.2e')} | "
                     f"{status.replace('|', '/')} |")
    lines += ["", "| L×D | " + " | ".join(res["modes"]) + " |",
              "|---|" + "---|" * len(res["modes"])]
    for shape, per in res["best"].items():
        lines.append(f"| {shape} | " + " | ".join(per.get(m, "") for m in res["modes"]) + " |")
    lines += ["", f"Suggested `FLASH_MEASURED_WINS`: `{res['suggested_flash_measured_wins']}` "
                  "(None: flash did not win at the largest size; keep the dict empty)."]
    return "\n".join(lines) + "\n"


def _write(out_dir: str, res: dict) -> None:
    atomic_files.write_text(os.path.join(out_dir, JSON_NAME), json.dumps(res, indent=1))
    atomic_files.write_text(os.path.join(out_dir, MD_NAME), format_markdown(res))


def run(*, out_dir: str, tokens, head_dims, heads, tokens_per_call, dtype, impls, modes,
        reps, check_max_tokens, max_logits_gib, budget_s) -> dict:
    """Measures every cell and writes the results. JSON keys: ``backend``, ``device``, ``jax``,
    ``dtype``, ``heads``, ``head_dims``, ``tokens``, ``tokens_per_call``, ``impls``, ``modes``,
    ``flop_factor``, ``reps``, ``cells`` (each: head_dim, tokens, batch, mode, impl, status, and
    where measured median_s/min_s/median_ms/inner/tflops/flops/compile_s/memory/max_rel_err/
    kernels, else error or note), ``best``, ``suggested_flash_measured_wins``, ``elapsed_s``,
    ``complete``."""
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    res = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
           "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "heads": heads,
           "head_dims": list(head_dims), "tokens": list(tokens),
           "tokens_per_call": tokens_per_call, "impls": list(impls), "modes": list(modes),
           "flop_factor": FLOP_FACTOR, "reps": reps, "cells": [], "best": {},
           "suggested_flash_measured_wins": {}, "complete": False}
    mem_limit = device_memory_limit()
    for d in head_dims:
        for n in tokens:
            b = max(1, tokens_per_call // n)
            inputs = make_inputs(b, heads, n, d, dtype, seed=n * 1000 + d)
            ref = (reference_outputs(inputs, modes, d ** -0.5) if n <= check_max_tokens else None)
            for mode in modes:
                for impl in impls:
                    if budget_s and time.perf_counter() - t_start > budget_s:
                        cell = {"impl": impl, "mode": mode, "batch": b, "tokens": n,
                                "head_dim": d, "status": "skipped (budget)"}
                    else:
                        cell = run_cell(impl, mode, inputs, (b, heads, n, d), scale=d ** -0.5,
                                        max_logits_gib=max_logits_gib, mem_limit=mem_limit,
                                        reps=reps, reference=ref)
                    res["cells"].append(cell)
                    res["best"], res["suggested_flash_measured_wins"] = summarise(
                        res["cells"], head_dims, tokens, modes, impls)
                    res["elapsed_s"] = time.perf_counter() - t_start
                    _write(out_dir, res)
                    print(f"D={d} L={n} B={b} {mode:8s} {impl:10s} {cell['status']:>10s} "
                          f"{cell.get('median_ms', float('nan')):10.3f} ms "
                          f"{cell.get('tflops', float('nan')):7.1f} TFLOP/s "
                          f"{cell.get('error', '')}", flush=True)
            del inputs
    res["complete"] = True
    res["elapsed_s"] = time.perf_counter() - t_start
    _write(out_dir, res)
    return res


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise SystemExit(f"error: --{name} must be positive integers, got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench_gpu_out")
    p.add_argument("--tokens", default="256,1024,4096,16384")
    p.add_argument("--head-dims", default="72,64")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens-per-call", type=int, default=65536,
                   help="batch = max(1, this // tokens)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--impls", default="flash,cudnn,xla,blocked")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--reps", type=int, default=10, help="timed samples per cell (median)")
    p.add_argument("--check-max-tokens", type=int, default=1024,
                   help="correctness vs fp32 xla up to this many tokens")
    p.add_argument("--max-logits-gib", type=float, default=24.0,
                   help="skip materialising paths whose float32 logits estimate exceeds this")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new cell after this many seconds (0: no limit)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (" + str(QUICK) + ")")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; expected a subset of {MODES}")
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    try:
        for i in impls:
            impl_spec(i, 1.0)
    except ValueError as err:
        p.error(str(err))
    if a.reps < 1 or a.heads < 1 or a.tokens_per_call < 1:
        p.error("--reps, --heads and --tokens-per-call must be >= 1")
    res = run(out_dir=a.out, tokens=_ints(a.tokens, "tokens"),
              head_dims=_ints(a.head_dims, "head-dims"), heads=a.heads,
              tokens_per_call=a.tokens_per_call, dtype=jnp.dtype(a.dtype), impls=impls,
              modes=modes, reps=a.reps, check_max_tokens=a.check_max_tokens,
              max_logits_gib=a.max_logits_gib, budget_s=a.budget_s)
    print(format_markdown(res))
    print(f"wrote {os.path.join(a.out, JSON_NAME)} and {MD_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
