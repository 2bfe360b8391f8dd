"""Compiled memory (and time) of plain vs blocked attention as the token count grows.

    python -m tim_jax.bench.attention_memory [--heads 16] [--head-dim 72] [--batch 1] \
        [--tokens 256,1024,4096,16384] [--dtype bfloat16] [--mode forward|grad|jvp] \
        [--block-k 1024] [--block-q N] [--repeats 3] [--time-max-tokens N] [--plain-max-gb 8]

For each token count L (self-attention, Lq = Lk = L, layout (B, H, L, Dh)) it compiles

* ``plain``: a local plain-softmax reference (float32 (B, H, L, L) logits, ``jax.nn.softmax``,
  PV product), and
* ``blocked``: :func:`tim_jax.models.blocked_attention.blocked_attention`,

in the chosen mode: ``forward`` (o), ``grad`` (dq, dk, dv from a cotangent: the VJP) or
``jvp`` (the tangent of o, traced inside :func:`tim_jax.autodiff.forward_mode`), and prints
from ``jax.jit(f).lower(...).compile().memory_analysis()`` the temporaries, arguments and
outputs (their sum is the "total"), XLA's own peak estimate where the field exists, the total
bytes per token and its ratio to the previous size (about 1 when the memory is linear in tokens,
about the token ratio when it is quadratic), and the median time per call over ``--repeats``
calls after one warm-up (0 repeats or L above ``--time-max-tokens``: not timed). The plain path
is skipped where its float32 logits alone, B * H * L * L * 4 bytes, exceed ``--plain-max-gb``.
Compilation only needs shapes, so the memory columns cost no device memory.

XLA:CPU by default hands a whole plain attention (both products and the softmax) to one
YNNPACK fusion whose scratch memory is not in ``memory_analysis`` (its temp reads 0 however
large the logits). Unless ``--cpu-ynn-fusion`` is given, the bench therefore appends
``--xla_cpu_experimental_ynn_fusion_type=`` (no YNN fusions) to ``XLA_FLAGS`` before the backend
starts (ignored on other backends); rows whose program still holds a YNN fusion (backend
already started by the caller) are marked ``*``.
"""
from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp

from tim_jax.autodiff import forward_mode
from tim_jax.models.blocked_attention import blocked_attention

_NO_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")


def plain_attention(q, k, v, *, scale):
    """Reference: float32 (B, H, Lq, Lk) logits and softmax, o in q's dtype."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype)


def _program(attn, mode: str):
    """The function of (q, k, v, t) to compile; t is the cotangent (grad) or tangent (jvp)."""
    if mode == "forward":
        return lambda q, k, v, t: attn(q, k, v)
    if mode == "grad":
        def grad(q, k, v, t):
            _, vjp = jax.vjp(attn, q, k, v)
            return vjp(t)
        return grad
    if mode == "jvp":
        def jvp(q, k, v, t):
            with forward_mode():
                return jax.jvp(attn, (q, k, v), (t, k, v))[1]
        return jvp
    raise ValueError(f"unknown mode {mode!r}; expected forward, grad or jvp")


def _memory(compiled) -> dict[str, int | None]:
    stats = compiled.memory_analysis()
    out = {f: getattr(stats, f, None) for f in _FIELDS}
    out["total"] = sum(v for v in out.values() if v is not None)
    out["peak"] = getattr(stats, "peak_memory_in_bytes", None)
    return out


def _time(compiled, args, repeats: int) -> float:
    from tim_jax.bench.train import call_times

    return statistics.median(call_times(compiled, args, repeats))


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:10.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", default="256,1024,4096,16384",
                   help="comma-separated token counts (Lq = Lk)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--mode", default="forward", choices=("forward", "grad", "jvp"))
    p.add_argument("--block-k", type=int, default=1024)
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (0: no timing)")
    p.add_argument("--time-max-tokens", type=int, default=None,
                   help="time only token counts up to this (default: all)")
    p.add_argument("--cpu-ynn-fusion", action="store_true",
                   help="keep XLA:CPU's YNNPACK fusions (their scratch is not counted)")
    p.add_argument("--plain-max-gb", type=float, default=8.0,
                   help="skip the plain path where its float32 logits exceed this many GB")
    a = p.parse_args(argv)
    try:
        tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers; got {a.tokens!r}")
    if not tokens or min(tokens) < 1:
        p.error(f"--tokens must be positive; got {a.tokens!r}")
    if not a.cpu_ynn_fusion and _NO_YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_YNN_FLAG}".strip()
    dtype = jnp.dtype(a.dtype)
    scale = a.head_dim ** -0.5
    impls = {
        "plain": lambda q, k, v: plain_attention(q, k, v, scale=scale),
        "blocked": lambda q, k, v: blocked_attention(q, k, v, scale=scale, block_k=a.block_k,
                                                     block_q=a.block_q),
    }
    stats_fields = [f for f in dir(jax.jit(lambda x: x).lower(1.0).compile().memory_analysis())
                    if f.endswith("_in_bytes")]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, mode {a.mode}, "
          f"B={a.batch} H={a.heads} Dh={a.head_dim} {a.dtype}, block_k={a.block_k} "
          f"block_q={a.block_q}")
    print(f"memory_analysis fields: {', '.join(stats_fields)}")
    print("total = temp + argument + output (MiB); bytes/token ratio vs the previous size; "
          "* = holds a YNNPACK fusion (its scratch not counted)")
    header = (f"{'impl':8s} {'tokens':>7s} {'temp':>10s} {'argument':>10s} {'output':>10s} "
              f"{'total':>10s} {'xla peak':>10s} {'B/token':>12s} {'ratio':>6s} {'ms/call':>10s}")
    print(header)
    for name, attn in impls.items():
        prog = jax.jit(_program(attn, a.mode))
        prev = None
        for n in tokens:
            shape = (a.batch, a.heads, n, a.head_dim)
            logits_gb = a.batch * a.heads * n * n * 4 / 1e9
            if name == "plain" and logits_gb > a.plain_max_gb:
                print(f"{name:8s} {n:7d} skipped ({logits_gb:.1f} GB of logits)")
                prev = None
                continue
            spec = jax.ShapeDtypeStruct(shape, dtype)
            compiled = prog.lower(spec, spec, spec, spec).compile()
            mem = _memory(compiled)
            mark = "*" if "__ynn_fusion" in compiled.as_text() else " "
            per_token = mem["total"] / n
            ratio = "-" if prev is None else f"{per_token / prev:6.2f}"
            prev = per_token
            ms = "-"
            if a.repeats > 0 and (a.time_max_tokens is None or n <= a.time_max_tokens):
                keys = jax.random.split(jax.random.key(n), 4)
                args = [jax.random.normal(kk, shape, dtype) for kk in keys]
                ms = f"{_time(compiled, args, a.repeats) * 1e3:10.1f}"
            print(f"{name:7s}{mark} {n:7d} {_mib(mem['temp_size_in_bytes'])} "
                  f"{_mib(mem['argument_size_in_bytes'])} {_mib(mem['output_size_in_bytes'])} "
                  f"{_mib(mem['total'])} {_mib(mem['peak'])} {per_token:12.0f} {ratio:>6s} "
                  f"{ms:>10s}", flush=True)
    return 0


if __name__ == "__main__":
    main()
