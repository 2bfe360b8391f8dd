"""Shared pieces of the flash-attention kernels: configuration, padding geometry, the
``pallas_call`` wrapper with per-backend compiler parameters, and small in-kernel helpers.

Arrays are heads-first: q (B, H, Lq, Dh), k/v (B, H, Lk, Dh). Inside the kernels the head dim is
padded with zeros to ``Dp`` (next power of two, >= 16: Triton tiles are powers of two) and the
sequence lengths to a multiple of the blocks; padded keys get -inf logits, padded queries are
sliced off. Row statistics (running max, log-sum-exp) are kept in base 2 (``exp2``/``log2``,
with ``log2(e)`` folded into the logit scale), as Triton's fast exponential is base 2.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
MIN_BLOCK = 16            # smallest tile edge: Triton dots need >= 16 along every dim
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PLATFORMS = ("interpret", "gpu", "tpu")

# Default (block_q, block_k) per platform: forward / JVP kernels, then the backward kernels.
DEFAULT_BLOCKS = {
    "interpret": ((128, 128), (128, 128)),   # few, large grid steps: interpret mode is per-step
    "gpu": ((64, 64), (64, 64)),             # fits the JVP kernel's two fp32 accumulators
    "tpu": ((128, 128), (128, 128)),         # MXU/lane-sized tiles
}


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static kernel options (hashable: a primitive parameter / custom_jvp nondiff argument).

    ``block_*`` are the requested tile edges (powers of two >= 16); they are clamped to the
    padded sequence length per call. ``platform`` selects the compiler parameters.
    """

    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    platform: str


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Padded sizes and clamped blocks of one call."""

    lq: int
    lk: int
    dh: int
    lq_pad: int
    lk_pad: int
    dp: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with: next power of two, at least 16."""
    return max(MIN_BLOCK, next_pow2(head_dim))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def geometry(cfg: FlashConfig, lq: int, lk: int, dh: int) -> Geometry:
    """Clamp the blocks to the lengths and pad the lengths to a multiple of every block."""
    cq = lambda b: min(b, max(MIN_BLOCK, next_pow2(lq)))
    ck = lambda b: min(b, max(MIN_BLOCK, next_pow2(lk)))
    bq, bk, bqb, bkb = cq(cfg.block_q), ck(cfg.block_k), cq(cfg.block_q_bwd), ck(cfg.block_k_bwd)
    # Blocks are powers of two, so the largest one is a multiple of the others.
    return Geometry(lq, lk, dh, _round_up(lq, max(bq, bqb)), _round_up(lk, max(bk, bkb)),
                    padded_head_dim(dh), bq, bk, bqb, bkb)


def pad_to(x: jax.Array, length: int, depth: int | None = None) -> jax.Array:
    """Zero-pad axis 2 (sequence) to ``length`` and, for 4-D x, axis 3 (head dim) to ``depth``."""
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, length - x.shape[2])
    if depth is not None:
        widths[3] = (0, depth - x.shape[3])
    if all(w == (0, 0) for w in widths):
        return x
    return jnp.pad(x, widths)


def unpad(x: jax.Array, length: int, depth: int | None = None) -> jax.Array:
    """Inverse of :func:`pad_to`."""
    if x.shape[2] != length:
        x = x[:, :, :length]
    if depth is not None and x.shape[3] != depth:
        x = x[..., :depth]
    return x


# ----------------------------------------------------------------------------- in-kernel helpers
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_NN = (((1,), (0,)), ((), ()))   # a @ b
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation."""
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)


def block_slice(j, block: int):
    """``pl.ds`` of block ``j`` (with the alignment hint the compilers use)."""
    return pl.ds(pl.multiple_of(j * block, block), block)


def mask_tail_keys(s, start, kv_len: int, kv_len_padded: int):
    """-inf logits for key columns at or past ``kv_len`` (a no-op when nothing is padded).

    s: (block_q, block_k) logits of the key block starting at ``start``.
    """
    if kv_len == kv_len_padded:
        return s
    cols = start + jnp.arange(s.shape[1], dtype=jnp.int32)
    return jnp.where((cols < kv_len)[None, :], s, -jnp.inf)


# ------------------------------------------------------------------------------- pallas_call
def compiler_params(cfg: FlashConfig, head_dim_padded: int, ndim_grid: int):
    """Backend compiler parameters (None in interpret mode)."""
    if cfg.interpret:
        return None
    if cfg.platform == "gpu":
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4 if head_dim_padded <= 64 else 8, num_stages=2)
    if cfg.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * ndim_grid)
    raise ValueError(f"flash_attention: unknown platform {cfg.platform!r}; one of {PLATFORMS}")


def call(kernel, *, cfg: FlashConfig, head_dim_padded: int, grid, in_specs, out_specs,
         out_shape, name: str):
    """``pl.pallas_call`` with the interpret flag and compiler parameters of ``cfg``."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, name=name,
        compiler_params=compiler_params(cfg, head_dim_padded, len(grid)))


def rows_as_column(cfg: FlashConfig) -> bool:
    """Layout of per-query row statistics (lse, delta) in HBM: (B, H, L) on GPU / interpret,
    (B, H, L, 1) on TPU, whose block rule wants the last two block dims (8k, full)."""
    return cfg.platform == "tpu"


def rows_to_kernel_layout(x: jax.Array, cfg: FlashConfig) -> jax.Array:
    """(B, H, L) row statistic -> the layout the kernels read."""
    return x[..., None] if rows_as_column(cfg) else x


def rows_from_kernel_layout(x: jax.Array) -> jax.Array:
    """Inverse of :func:`rows_to_kernel_layout`."""
    return x[..., 0] if x.ndim == 4 else x


def row_block(block: int, cfg: FlashConfig) -> pl.BlockSpec:
    """BlockSpec of the (block,) slice of a row statistic at grid (b, h, i)."""
    if rows_as_column(cfg):
        return pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def row_full(length: int, cfg: FlashConfig) -> pl.BlockSpec:
    """BlockSpec of the whole row statistic of head (b, h): sliced in the kernel."""
    if rows_as_column(cfg):
        return pl.BlockSpec((None, None, length, 1), lambda b, h, i: (b, h, 0, 0))
    return pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))


def column(x):
    """In-kernel: a row statistic read from either layout, as a (n, 1) column."""
    return x if x.ndim == 2 else x[:, None]


def tile_block(block: int, depth: int) -> pl.BlockSpec:
    """BlockSpec of a (block, depth) tile of a (B, H, L, depth) array at grid (b, h, i)."""
    return pl.BlockSpec((None, None, block, depth), lambda b, h, i: (b, h, i, 0))


def tile_full(length: int, depth: int) -> pl.BlockSpec:
    """BlockSpec of the whole (length, depth) sequence of head (b, h): sliced in the kernel."""
    return pl.BlockSpec((None, None, length, depth), lambda b, h, i: (b, h, 0, 0))
