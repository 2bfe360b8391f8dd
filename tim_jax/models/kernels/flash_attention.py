"""Pallas flash attention with a backward (``jax.grad``) and a forward-mode (``jax.jvp``) kernel.

``flash_attention(q, k, v, *, scale)`` computes ``softmax(scale * q k^T) v`` per head without
materialising the (Lq, Lk) matrix:

    q: (B, H, Lq, Dh)    k, v: (B, H, Lk, Dh)    ->    o: (B, H, Lq, Dh) in q's dtype

No mask; self- (Lk == Lq) or cross-attention; any lengths >= 1 and any head dim (padded inside:
lengths to a multiple of the blocks, with -inf logits on padded keys; Dh with zeros to a power
of two >= 16). q, k, v share one dtype: float32, bfloat16 or float16; logits, softmax and every
accumulation are float32, matmul inputs stay in the input dtype (P is cast to it before P v).

Kernels (grid (B, H, blocks), key/query loop inside each program):

* forward: online softmax; saves the base-2 log-sum-exp ``lse`` (B, H, Lq) float32;
* backward: dq kernel and dk/dv kernel (FlashAttention-2), rebuilding P from q, k and ``lse``;
  residuals kept between forward and backward: q, k, v, o, lse (gradients in input dtypes);
* JVP: ``(o, do)`` in one pass (sCM tangent formula, see ``flash_attention_jvp``).

Autodiff structure (details in ``flash_attention_autodiff``): the public function is a
``jax.custom_jvp`` (symbolic zeros) whose rule binds the JVP primitive. ``jax.jvp`` evaluates it
with the JVP kernel. ``jax.grad`` / ``jax.vjp`` / ``jax.linearize`` / ``jax.checkpoint``
partially evaluate it into the forward kernel (known) and a linear tangent primitive, whose
transpose is the backward kernels — the role a ``custom_vjp`` would play, which cannot sit under
a ``custom_jvp``. Second-order use (e.g. ``jax.grad`` of a function of the ``jax.jvp``
tangent) raises a NotImplementedError. ``jax.jit`` and ``jax.vmap`` work in every mode.

``interpret=None`` runs Pallas interpret mode on CPU and compiled kernels on GPU (Triton) or
TPU (Mosaic). The GPU and TPU lowerings are emitted without error (checked with ``jax.export``
for platforms cuda and tpu) but have not been compiled or run on a device; on TPU the whole K/V
sequence of a head sits in one VMEM block, which bounds the length, so
:func:`flash_attention_supported` reports False for TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from tim_jax.models.kernels import flash_attention_common as fc
from tim_jax.models.kernels.flash_attention_autodiff import jvp_p, kernel_calls
from tim_jax.models.kernels.flash_attention_fwd import flash_forward

__all__ = ["flash_attention", "flash_attention_supported", "kernel_calls"]

_GPU_BACKENDS = ("gpu", "cuda", "rocm")
MAX_HEAD_DIM = 256   # padded head dim the GPU tiles are sized for


def flash_attention_supported(backend: str, dtype, head_dim: int) -> bool:
    """Whether :func:`flash_attention` runs for this backend ("cpu" = interpret mode, "gpu" /
    "cuda" / "rocm" = Triton, "tpu"), input dtype and head dim."""
    if jnp.dtype(dtype) not in fc.DTYPES or not (1 <= int(head_dim)):
        return False
    backend = backend.lower()
    if backend == "cpu":
        return True
    if backend in _GPU_BACKENDS:
        return fc.padded_head_dim(head_dim) <= MAX_HEAD_DIM
    return False   # TPU: not validated (see the module docstring); unknown backends: no


def _resolve_platform(interpret: bool | None) -> tuple[bool, str]:
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if interpret:
        return True, "interpret"
    if backend in _GPU_BACKENDS:
        return False, "gpu"
    if backend == "tpu":
        return False, "tpu"
    raise ValueError(f"flash_attention: compiled kernels need a GPU or TPU backend, the default "
                     f"backend is {backend!r}; pass interpret=True (or None) to run on it")


def _check_block(name: str, value: int) -> int:
    if not isinstance(value, int) or value < fc.MIN_BLOCK or value & (value - 1):
        raise ValueError(f"flash_attention: {name}={value!r} must be a power of two >= "
                         f"{fc.MIN_BLOCK}")
    return value


def _check_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"flash_attention: {name} must be (B, H, L, Dh), got shape "
                             f"{getattr(x, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in fc.DTYPES:
        raise ValueError(f"flash_attention: q, k, v must share one dtype among "
                         f"{[d.name for d in fc.DTYPES]}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: expected q (B, H, Lq, Dh) and k, v (B, H, Lk, Dh), "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"flash_attention: empty input, q {q.shape}, k {k.shape}")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    block_q: int | None = None, block_k: int | None = None,
                    block_q_bwd: int | None = None, block_k_bwd: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Softmax attention ``o = softmax(scale q k^T) v``; layout in the module docstring.

    scale: Python float (static). block_q / block_k: query / key tile of the forward and JVP
    kernels, block_q_bwd / block_k_bwd: of the backward kernels (defaults per backend in
    ``flash_attention_common.DEFAULT_BLOCKS``; powers of two >= 16, clamped to the lengths).
    interpret: None = interpret mode on CPU, compiled on GPU/TPU; True forces interpret mode.
    """
    _check_inputs(q, k, v)
    try:
        scale = float(scale)
    except TypeError as err:
        raise TypeError("flash_attention: scale must be a Python float (it is static)") from err
    interpret, platform = _resolve_platform(interpret)
    (dq, dk), (dqb, dkb) = fc.DEFAULT_BLOCKS[platform]
    block_q = _check_block("block_q", dq if block_q is None else block_q)
    block_k = _check_block("block_k", dk if block_k is None else block_k)
    block_q_bwd = _check_block("block_q_bwd", dqb if block_q_bwd is None else block_q_bwd)
    block_k_bwd = _check_block("block_k_bwd", dkb if block_k_bwd is None else block_k_bwd)
    cfg = fc.FlashConfig(scale, block_q, block_k, block_q_bwd, block_k_bwd, interpret, platform)
    return _flash_attention(cfg, q, k, v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash_attention(cfg: fc.FlashConfig, q, k, v):
    return flash_forward(q, k, v, cfg, return_lse=False)


def _flash_attention_jvp(cfg: fc.FlashConfig, primals, tangents):
    q, k, v = primals
    has = tuple(not isinstance(t, SymbolicZero) for t in tangents)
    if not any(has):
        o = flash_forward(q, k, v, cfg, return_lse=False)
        return o, jnp.zeros_like(o)
    present = [t.astype(p.dtype) for p, t, h in zip(primals, tangents, has) if h]
    o, do = jvp_p.bind(q, k, v, *present, cfg=cfg, has=has)
    return o, do


_flash_attention.defjvp(_flash_attention_jvp, symbolic_zeros=True)
