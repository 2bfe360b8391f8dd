"""THE attention dispatch of tim_jax: every model calls only ``attention(q, k, v, impl=...)``.

Layout (heads-first, the fastest on CPU and natural for TPU/GPU kernels)::

    q: (B, H, Lq, Dh)    k: (B, H, Lk, Dh)    v: (B, H, Lk, Dh)    ->    o: (B, H, Lq, Dh)

Softmax attention without mask, scale ``Dh ** -0.5`` (torch ``F.scaled_dot_product_attention``
default) unless ``scale`` is given. q/k/v come in the compute dtype; the logits and the softmax
are float32; ``o`` has q's dtype.

Implementations (``impl``):

* ``"xla"``: heads-first einsums, float32 logits and softmax, normalisation AFTER the PV product
  (``o = (exp(s - max) @ v) / rowsum``), with a hand-written backward pass (a ``custom_vjp``:
  ``e`` kept in the compute dtype, ``dS = P * (dP - rowsum(dO * O))`` in one pass, gradient
  matmuls in the compute dtype with the layouts of :mod:`tim_jax.models.matmul`). bf16
  forward+backward of one S/2 block's attention (B=16, H=6, L=256, one core): 50 ms vs 61 ms
  for autodiff of the same forward. ``jax.grad`` works as usual and ``jax.jvp`` (the TiM
  ``jvp`` derivative) inside :func:`tim_jax.autodiff.forward_mode`, where it is plain autodiff.
  The default.
* ``"xla_softmax"``: the same einsums with ``jax.nn.softmax`` before PV (the textbook order).
* ``"dot_product"``: ``jax.nn.dot_product_attention`` (implementation chosen by JAX; on GPU it
  may pick cuDNN, which has no forward-mode AD).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU only, fp16/bf16 only,
  no ``jax.jvp``.

More implementations (e.g. a Pallas flash kernel) plug in with ``register_attention`` without
touching the models: a registered function takes ``(q, k, v, *, scale)`` in the layout above and
returns ``o``. Models validate ``config.model.attention_impl`` against the registry when they are
built, so register before building.

CPU figures (2-core AMD EPYC, jax 0.10.2, fp32, allocator fix of cpu-perf.md on; B=16, H=6, L=256,
Dh=64, attention only, median of 15 calls; ``python -m tim_jax.models.attention``). The machine was
shared with other jobs (load average ~3 on 2 cores), so only the ratios mean much:

    impl           fwd ms   fwd+bwd ms   jvp ms
    xla             17.6      94.4        69.4
    xla_softmax     22.7      95.9        75.7
    dot_product     45.7     115.2       166.6

Three more runs under heavier load (~11) kept the forward order (xla 1.7-2.9x faster than
xla_softmax and 3.3-4.2x faster than dot_product); the fwd+bwd of xla and xla_softmax swapped
places between runs (noise). This agrees with /work/shared/notes/cpu-perf.md section 3 (idle
machine: normalise-after-PV 23 ms fwd vs 43 ms for softmax-then-PV; dot_product_attention
slowest). ``xla`` has the fastest forward and jvp, so it is the default.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from tim_jax.autodiff import in_forward_mode
from tim_jax.models.matmul import einsum_f32, grad_einsum_f32, matmul

Array = jax.Array
AttentionFn = Callable[..., Array]  # fn(q, k, v, *, scale: float) -> o


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """A registered attention implementation."""

    name: str
    fn: AttentionFn
    supports_jvp: bool   # whether jax.jvp passes through it (needed by derivative='jvp')
    description: str = ""


_REGISTRY: dict[str, AttentionImpl] = {}


def register_attention(name: str, *, supports_jvp: bool, description: str = "",
                       overwrite: bool = False):
    """Decorator registering ``fn(q, k, v, *, scale) -> o`` (layout in the module docstring)
    under ``name``."""

    def deco(fn: AttentionFn) -> AttentionFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"attention impl {name!r} is already registered")
        _REGISTRY[name] = AttentionImpl(name, fn, supports_jvp, description)
        return fn

    return deco


def attention_impls() -> tuple[str, ...]:
    """Names of the registered implementations."""
    return tuple(_REGISTRY)


def get_attention_impl(name: str) -> AttentionImpl:
    """The registered implementation ``name``; ValueError listing the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"attention_impl={name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def attention(q: Array, k: Array, v: Array, *, impl: str = "xla", scale: float | None = None) -> Array:
    """Softmax attention, heads-first layout (see the module docstring). Returns (B, H, Lq, Dh)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects (B, H, L, Dh) q/k/v; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return get_attention_impl(impl).fn(q, k, v, scale=scale)


def _logits(q: Array, k: Array, scale: float) -> Array:
    return matmul("bhqd,bhkd->bhqk", q, k, dtype=q.dtype) * scale


@register_attention("xla", supports_jvp=True,
                    description="heads-first einsums, fp32 softmax normalised after PV, fused "
                                "backward (default)")
def _xla_attention(q, k, v, *, scale):
    if in_forward_mode():  # plain jnp: jax.jvp passes through
        return _attention_forward(q, k, v, scale)[0]
    return _fused_attention(q, k, v, scale)


def _attention_forward(q, k, v, scale):
    """o (B, H, Lq, Dh) in q.dtype, plus the residuals of the backward pass: the unnormalised
    probabilities ``e = exp(s - max)`` in the compute dtype (B, H, Lq, Lk) and their row sums
    ``l`` (B, H, Lq, 1) float32."""
    dt = q.dtype
    s = einsum_f32("bhqd,bhkd->bhqk", q, k, dt) * scale
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    l = jnp.sum(e, axis=-1, keepdims=True)
    e = e.astype(dt)
    o = (einsum_f32("bhqk,bhkd->bhqd", e, v, dt) / l).astype(dt)
    return o, e, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_attention(q, k, v, scale):
    """The ``xla`` attention with a hand-written backward pass (the FlashAttention algebra
    without tiling): ``P = e / l`` is kept from the forward pass in the compute dtype and
    ``dS = P * (dP - rowsum(dO * O))`` is one elementwise pass. Plain autodiff of
    normalise-after-PV differentiates the division and the max-subtraction too, and XLA:CPU
    splits its row sums into slow reduce-windows."""
    return _attention_forward(q, k, v, scale)[0]


def _fused_attention_fwd(q, k, v, scale):
    o, e, l = _attention_forward(q, k, v, scale)
    return o, (q, k, v, o, e, l)


def _fused_attention_bwd(scale, res, g):
    q, k, v, o, e, l = res
    dt = q.dtype
    f32 = jnp.float32
    inv_l = 1.0 / l
    g32 = g.astype(f32)
    g_l = (g32 * inv_l).astype(dt)                                  # dO / l
    d_l = jnp.sum(g32 * o.astype(f32), axis=-1, keepdims=True) * inv_l   # rowsum(dO*O) / l
    dv = grad_einsum_f32("bhqk,bhqd->bhkd", e, g_l, dt)                # P^T dO
    dp_l = _dp_product(g_l, v, dt)                                   # dP / l
    ds = (e.astype(f32) * (dp_l - d_l)).astype(dt)                  # P * (dP - D)
    dq = einsum_f32("bhqk,bhkd->bhqd", ds, k, dt) * scale
    dk = grad_einsum_f32("bhqk,bhqd->bhkd", ds, q, dt) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def _dp_product(g_l: Array, v: Array, dt) -> Array:
    """``dP = dO V^T`` (B, H, Lq, Lk) float32 from bf16 ``dO`` (B, H, Lq, Dh) and ``V``.

    ``dO`` reaches the backward as a transpose of the output projection's input gradient
    (tokens-major, turned heads-first). XLA gives a transpose's result a permuted layout, its
    elementwise consumers inherit it, and XLA:CPU's operand upcaster turns a bf16 dot with such
    an operand into a float32 dot (~60 instead of ~600 GFLOP/s). Contracting the head dim as
    (Dh/2, 2), a reshape XLA keeps, gives the dot a row-major operand and keeps it in bf16;
    the sum is the same up to float32 summation order. float32 operands are not upcast and
    keep the plain product (as in ``matmul.grad_einsum_f32``)."""
    d = g_l.shape[-1]
    if d % 2 or jnp.dtype(dt) == jnp.float32:
        return einsum_f32("bhqd,bhkd->bhqk", g_l, v, dt)
    split = lambda x: x.reshape(*x.shape[:-1], d // 2, 2)  # noqa: E731
    return einsum_f32("bhqzy,bhkzy->bhqk", split(g_l), split(v), dt)


@register_attention("xla_softmax", supports_jvp=True,
                    description="heads-first einsums, jax.nn.softmax (fp32) before PV")
def _xla_softmax_attention(q, k, v, *, scale):
    p = jax.nn.softmax(_logits(q, k, scale), axis=-1)
    o = matmul("bhqk,bhkd->bhqd", p, v, dtype=v.dtype)
    return o.astype(q.dtype)


def _dpa(q, k, v, *, scale, implementation):
    # jax.nn.dot_product_attention is (B, L, H, Dh).
    o = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        scale=scale, implementation=implementation)
    return o.transpose(0, 2, 1, 3)


@register_attention("dot_product", supports_jvp=False,
                    description="jax.nn.dot_product_attention, implementation chosen by JAX")
def _dot_product_attention(q, k, v, *, scale):
    return _dpa(q, k, v, scale=scale, implementation=None)


@register_attention("cudnn", supports_jvp=False,
                    description="jax.nn.dot_product_attention(implementation='cudnn'); GPU, bf16/fp16")
def _cudnn_attention(q, k, v, *, scale):
    return _dpa(q, k, v, scale=scale, implementation="cudnn")


def _benchmark(b=16, h=6, l=256, d=64, reps=15):  # pragma: no cover - manual measurement
    import time

    import numpy as np

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (b, h, l, d), jnp.float32) for kk in keys)
    for name in attention_impls():
        if name == "cudnn" and jax.default_backend() != "gpu":
            continue
        f = lambda q, k, v, name=name: attention(q, k, v, impl=name)  # noqa: E731
        fwd = jax.jit(f)
        bwd = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](g))
        jvp = jax.jit(lambda q, k, v, f=f: jax.jvp(f, (q, k, v), (g, g, g)))
        row = [name]
        for fn in (fwd, bwd, jvp):
            try:
                jax.block_until_ready(fn(q, k, v))
            except Exception:  # noqa: BLE001 - jvp through a custom_vjp kernel
                row.append("   n/a")
                continue
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                ts.append(time.perf_counter() - t0)
            row.append(f"{1e3 * float(np.median(ts)):7.1f}")
        print("  ".join(row))


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
