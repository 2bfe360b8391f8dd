"""The train step's main GEMMs alone (``official --gemm-rounds``): where the two libraries differ.

:func:`gemm_cases` lists the products of a c2i config's step at its global batch; :func:`time_jax_gemm` times one
as the tim_jax networks compute it (the torch side: :mod:`tim_jax.interop.torch_driver`).
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from tim_jax.bench.train import call_times

GEMM_KINDS = ("linear", "linear_glu", "weight_grad", "input_grad", "logits")


def gemm_cases(config) -> list[dict]:
    """The main GEMMs of a c2i config's train step at its global batch, as both frameworks run
    them: ``kind`` "linear" (x (t, i) times a weight to (t, o), bias added, rounded to the
    compute dtype), "linear_glu" (the same to (t, 2h), then SiLU-GLU to (t, h): the SwiGLU
    input projection with its activation), "weight_grad" (x^T g: (i, o) from x (t, i) and
    g (t, o)), "input_grad" (g W^T: (t, i)) and "logits" (q k^T of the attention: (b, l, l)
    from (b, l, d))."""
    from tim_jax.models.backbone import mlp_hidden_features

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
    bias and rounding), the forward of the SwiGLU projection, or the backward products, with
    the CPU layouts (:mod:`tim_jax.models.cpu_layouts`) where they are on."""
    from tim_jax.models import cpu_fused
    from tim_jax.models import cpu_layouts as cpu
    from tim_jax.models.matmul import matmul

    if case["kind"] not in GEMM_KINDS:
        raise ValueError(f"GEMM kind {case['kind']!r}; allowed: {GEMM_KINDS}")
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    if case["kind"] == "logits":
        shape = (case["b"], case["l"], case["d"])
        args = [jax.random.normal(k, shape, dt) for k in keys[:2]]
        fn = lambda q, k: cpu.einsum_f32("bqd,bkd->bqk", q, k, dt)  # noqa: E731
    else:
        t, i, o = case["t"], case["i"], case["o"]
        x = jax.random.normal(keys[0], (t, i), dt)
        w = jax.random.normal(keys[1], (i, o), jnp.float32) * 0.05
        g = jax.random.normal(keys[2], (t, o), dt)
        if case["kind"] == "linear":
            args = [x, w, jnp.zeros((o,), jnp.float32)]
            fn = lambda x, w, c: matmul("ti,io->to", x, w, dtype=dt, bias=c,  # noqa: E731
                                        out_dtype=dt)
        elif case["kind"] == "linear_glu":
            args = [x, w, jnp.zeros((o,), jnp.float32)]
            fn = lambda x, w, c: cpu_fused.dense_silu_glu_op(x, w, c, dt, None)  # noqa: E731
        elif case["kind"] == "weight_grad":
            args = [x, g]
            fn = lambda x, g: cpu.grad_einsum_f32("ti,to->io", x, g, dt)  # noqa: E731
        else:
            args = [g, w.astype(dt)]
            fn = lambda g, w: cpu.grad_einsum_f32("to,io->ti", g, w, dt)  # noqa: E731
    return statistics.median(call_times(jax.jit(fn), args, reps))

