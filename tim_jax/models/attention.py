"""THE attention dispatch of tim_jax: every model calls only ``attention(q, k, v, impl=...)``.

Layout (heads-first)::

    q: (B, H, Lq, Dh)    k: (B, H, Lk, Dh)    v: (B, H, Lk, Dh)    ->    o: (B, H, Lq, Dh)

Softmax attention without mask, scale ``Dh ** -0.5`` (torch ``F.scaled_dot_product_attention``
default) unless ``scale`` is given. q/k/v come in the compute dtype; the logits and the softmax
are float32; ``o`` has q's dtype.

Implementations (``impl``):

* ``"xla"`` (default): heads-first einsums, float32 logits and softmax, normalisation after
  the PV product. With the XLA:CPU layouts (:mod:`tim_jax.models.cpu_layouts`) its backward is
  ``cpu_fused.attention``'s hand-written one; elsewhere, and under ``jax.jvp``, plain autodiff.
  Above ``blocked_attention.BLOCKED_THRESHOLD_LOGITS`` logits per head (long sequences, e.g.
  native-resolution images) it switches to ``"blocked"`` on every backend: the same values in
  memory linear in tokens.
* ``"blocked"``: :func:`tim_jax.models.blocked_attention.blocked_attention`, online softmax over
  key blocks (and query blocks of 1024), a recomputing backward; pure XLA.
* ``"xla_softmax"``: the same einsums with ``jax.nn.softmax`` before PV (the textbook order).
* ``"dot_product"``: ``jax.nn.dot_product_attention`` (implementation chosen by JAX; on GPU it
  may pick cuDNN, which has no forward-mode AD).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``: GPU only, fp16/bf16,
  no ``jax.jvp``.
* ``"flash"``: tim_jax's Pallas kernels (:mod:`tim_jax.models.kernels.flash_attention`):
  forward, backward and a forward-mode (``jax.jvp``) kernel; Triton on GPU, interpret mode on
  CPU (tests only).
* ``"auto"``: ``"flash"`` where a same-card benchmark recorded that it wins
  (:data:`FLASH_MEASURED_WINS`, empty until a GPU run fills it: docs/benchmarks.md), else
  ``"xla"``. The choice is logged once per shape.

More implementations plug in with ``register_attention`` without touching the models: a
registered function takes ``(q, k, v, *, scale)`` in the layout above and returns ``o``.
Models validate ``config.model.attention_impl`` against the registry when they are built.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax

from tim_jax.models import cpu_fused
from tim_jax.models.blocked_attention import blocked_attention, use_blocked
from tim_jax.models.cpu_layouts import custom_backward
from tim_jax.models.matmul import matmul

Array = jax.Array
log = logging.getLogger(__name__)
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
                    description="heads-first einsums, fp32 softmax normalised after PV (default)")
def _xla_attention(q, k, v, *, scale):
    if use_blocked(q.shape[2], k.shape[2]):
        return _blocked(q, k, v, scale=scale)
    if custom_backward():
        return cpu_fused.attention(q, k, v, scale)
    return cpu_fused.attention_forward(q, k, v, scale)[0]


@register_attention("blocked", supports_jvp=True,
                    description="online softmax over key/query blocks, linear memory (pure XLA)")
def _blocked(q, k, v, *, scale):
    return blocked_attention(q, k, v, scale=scale, block_q=1024 if q.shape[2] > 1024 else None)


@register_attention("flash", supports_jvp=True,
                    description="Pallas flash attention: forward, backward and JVP kernels")
def _flash_attention(q, k, v, *, scale):
    from tim_jax.models.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, scale=scale)


# Backends (jax.default_backend()) -> the fewest query tokens from which the "flash" kernel
# was measured faster than "xla" on that backend in the same run (docs/benchmarks.md). Empty:
# no device measurement yet, so "auto" is "xla" everywhere.
FLASH_MEASURED_WINS: dict[str, int] = {}
_LOGGED: set = set()


def auto_impl(q: Array, k: Array) -> str:
    """The implementation ``impl="auto"`` runs for these shapes on this backend."""
    backend = jax.default_backend()
    min_tokens = FLASH_MEASURED_WINS.get(backend)
    name = "flash" if min_tokens is not None and q.shape[2] >= min_tokens else "xla"
    key = (backend, q.shape, k.shape, str(q.dtype), name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("attention impl auto -> %s for q %s, k %s, %s on %s", name, q.shape, k.shape,
                 q.dtype, backend)
    return name


@register_attention("auto", supports_jvp=True,
                    description="flash where a benchmark on this backend showed it wins, else xla")
def _auto_attention(q, k, v, *, scale):
    return get_attention_impl(auto_impl(q, k)).fn(q, k, v, scale=scale)


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
