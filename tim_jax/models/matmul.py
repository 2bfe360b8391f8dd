"""THE matmul of the TiM networks: ``matmul(spec, a, b, dtype=..., bias=..., out_dtype=...)``,
a two-operand einsum with both operands cast to the compute ``dtype``, float32 accumulation, an
optional bias added in float32 and one rounding to ``out_dtype``. Every Dense layer, the patch
embedding and the attention products go through it; the SwiGLU input projection goes through
``layers.dense_silu_glu``, which shares its forward product and its backward
(:func:`matmul_grads`).

It carries a ``jax.custom_vjp`` because plain autodiff gets mixed precision and CPU layouts
wrong in the backward pass (measured with jax 0.10.2 on this project's 2-core Xeon with
AVX512-BF16/AMX; figures are GFLOP/s at the TiM shapes):

* The cotangent of a ``dot(bf16, bf16) -> f32`` is float32, so autodiff's gradient matmuls are
  ``dot(f32, bf16)``, which XLA runs in float32 (~240) instead of bf16 x bf16 -> f32 (~1100).
  Here the backward casts the cotangent to ``dtype`` first, as torch autocast does, and returns
  each gradient in its operand's dtype: a float32 weight cast inside gets an un-rounded float32
  gradient. With ``out_dtype=dtype`` the layer's cotangent arrives in ``dtype`` and no float32
  copy of it is materialised; the bias gradient is summed in float32.
* A contraction over an index that is not the first operand's minor one (the weight gradient
  ``x^T g``, the attention's ``P^T dO`` and ``dS^T q``) is sent by XLA:CPU to an upcast or
  Eigen kernel (bf16: 160-240; attention 4-D: ~50). For bf16 the backward transposes that
  operand explicitly (contracted index last) and splits the index into (n/2, 2), a free
  reshape that reaches the fast dot (bf16: 600-1260 with the transpose; attention ~250). A
  (2, n/2) split, tried first, left XLA a strided transpose loop that is very slow for
  power-of-two widths (31 ms for a (4096, 1024) activation, 5 ms now). A run of several
  contracted indices (the (B, N) tokens of a 3-D input) is merged first. float32 operands are
  left alone (Eigen's f32 kernel takes the transposed operand; a split was 1.1-1.7x slower).
  The result equals the unsplit sum up to float32 summation order.
* The transpose the bf16 weight gradient needs is made in the forward pass, right after the
  operand is computed, and saved as the residual instead of the operand
  (:func:`grad_residuals`): in the backward pass the activation has long left the cache and
  XLA:CPU's transpose of it ran about 2.5x slower. The weight gradient is then a plain
  row-major product with one contracted index (S/2 step 1.029-1.036x, B/4 1.005-1.013x).
* An output written in another index order than dot_general's (batch, a's free, b's free),
  e.g. the heads-first projections ``"bni,ithd->tbhnd"``, has its cotangent transposed back
  once, not once inside each of the two gradient matmuls.
* ``bias`` may be one row per sample (``(B, 1, N)``, the interval-aware qkv term): added in
  float32 before the single rounding, its gradient summed over the broadcast axes.

Measured on TiM-S/2 (batch 16, bf16, gradient of F and the REPA projection, one core): 5.2 s
per value_and_grad before this session's changes (plain autodiff: about 2x that), 3.9 s after.

Forward-mode AD (``jax.jvp``, used by the TiM ``jvp`` derivative) cannot pass through a
``custom_vjp``: inside :func:`tim_jax.autodiff.forward_mode` the op is the plain einsum.

Specs are explicit two-operand einsums (``"A,B->C"``, no ellipsis) in which every index of an
operand appears in the other operand or in the output, so the reversed specs are valid:
``dA = einsum("C,B->A", g, b)`` and ``dB = einsum("A,C->B", a, g)``.
"""
from __future__ import annotations

import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from tim_jax.autodiff import in_forward_mode, trace_switch

Array = jax.Array


def _parse(spec: str) -> tuple[str, str, str]:
    if spec.count("->") != 1 or spec.split("->")[0].count(",") != 1 or "." in spec:
        raise ValueError(f"matmul spec {spec!r} must be explicit 'A,B->C' (two operands, no ...)")
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    if any(len(set(idx)) != len(idx) for idx in (a, b, out)):
        raise ValueError(f"matmul spec {spec!r}: an index repeats within one operand or output")
    for name, idx, other in (("first", a, b), ("second", b, a)):
        missing = set(idx) - set(out) - set(other)
        if missing:
            raise ValueError(f"matmul spec {spec!r}: indices {sorted(missing)} of the {name} "
                             "operand are summed within it (not a matmul-type contraction)")
    return a, b, out


def _fresh_index(spec: str) -> str:
    """An index letter not used in ``spec``."""
    return next(ch for ch in "zyxwvutsrqponmlkjihgfedcba" if ch not in spec)


def _index_sizes(sa: str, sb: str, a, b) -> dict:
    """Each index of the two operands -> its size."""
    return {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}


def einsum_f32(spec, a, b, dtype, precision=None):
    """``einsum(spec, a, b)`` with both operands cast to ``dtype`` and float32 accumulation and
    result: the forward product of :func:`matmul`, for custom backward passes."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)


def grad_einsum_f32(spec, a, b, dtype, precision=None):
    """:func:`einsum_f32` for the gradient matmuls, with one layout trick for reduced-precision
    (bf16) operands. XLA:CPU runs a contraction over an index that is NOT the minor (last)
    index of the first operand (the weight gradient ``x^T g``, the attention's ``P^T dO`` and
    ``dS^T q``) as a float32 (upcast) Eigen dot, or, once that index is split, behind a
    strided transpose loop that is very slow for power-of-two widths (31 ms for a
    (4096, 1024) bf16 activation). Here the first operand is transposed explicitly (the
    contracted index moved last, materialised behind an ``optimization_barrier`` so XLA keeps
    it a plain transpose) and the contracted index is split into (n/2, 2) in both operands, a
    free reshape that XLA's fast bf16 dot takes. The sum is the same up to float32 summation
    order. float32 operands are left alone: Eigen's f32 kernel takes the transposed operand
    directly, and the split measured 1.1-1.7x slower there."""
    sa, sb, out = _parse(spec)
    contracted = [c for c in sa if c in sb and c not in out]
    if len(contracted) > 1 and jnp.dtype(dtype) != jnp.float32:
        # several contracted indices forming one run, in the same order, in both operands
        # (the weight gradient of a (B, N, in) input): merged into one index (a free reshape)
        run = "".join(contracted)
        if run in sa and run in sb:
            merged = _fresh_index(spec)
            a = a.reshape(_merge_shape(a.shape, sa.index(run), len(run)))
            b = b.reshape(_merge_shape(b.shape, sb.index(run), len(run)))
            sa, sb = sa.replace(run, merged), sb.replace(run, merged)
            spec, contracted = f"{sa},{sb}->{out}", [merged]
    if (jnp.dtype(dtype) != jnp.float32 and len(contracted) == 1
            and sa[-1] != contracted[0]):
        c = contracted[0]
        n = a.shape[sa.index(c)]
        if n % 2 == 0 and n >= 4:
            new = _fresh_index(spec)
            a = jax.lax.optimization_barrier(jnp.moveaxis(a.astype(dtype), sa.index(c), -1))
            sa = sa.replace(c, "") + c
            a = a.reshape(*a.shape[:-1], n // 2, 2)
            b = b.reshape(_split_shape(b.shape, sb.index(c), n))
            spec = f"{sa + new},{sb.replace(c, c + new)}->{out}"
    return einsum_f32(spec, a, b, dtype, precision)


def _merge_shape(shape, axis, count):
    return (*shape[:axis], math.prod(shape[axis:axis + count]), *shape[axis + count:])


def _split_shape(shape, axis, n):
    return (*shape[:axis], n // 2, 2, *shape[axis + 1:])


def _canonical_output(sa: str, sb: str, out: str) -> str:
    """The output indices in the order dot_general produces them: batch, a's free, b's free."""
    return ("".join(c for c in sa if c in sb and c in out)
            + "".join(c for c in sa if c in out and c not in sb)
            + "".join(c for c in sb if c in out and c not in sa))


def _weight_grad_plan(spec: str, dtype, sizes: dict) -> tuple[str, str] | None:
    """How the weight gradient ``db = a^T g`` of ``spec`` reads a pre-transposed ``a``, or None.

    For a reduced-precision ``dtype`` whose contraction (the indices ``a`` shares with the
    output but not with ``b``: the tokens of a Dense input) is one run of indices in the same
    order in ``a`` and in the canonical output, with an even total size: returns
    ``(db_spec, run)``, the run merged into one fresh index and moved last in ``a``
    (``"mi,mo->io"`` becomes ``"iz,zo->io"``: a plain row-major product). ``sizes``: index
    -> size (only the run's sizes are read)."""
    if jnp.dtype(dtype) == jnp.float32:
        return None
    sa, sb, out = _parse(spec)
    canon = _canonical_output(sa, sb, out)
    run = "".join(c for c in sa if c in canon and c not in sb)
    if not run or run not in sa or run not in canon or math.prod(sizes[c] for c in run) % 2:
        return None
    merged = _fresh_index(spec)
    a_t = sa.replace(run, "") + merged
    return f"{a_t},{canon.replace(run, merged)}->{sb}", run


def _contracted_last(a: Array, sa: str, run: str) -> Array:
    """``a`` with the index run ``run`` merged into one axis and moved last, materialised as
    a row-major array: the (n/2, 2) reshape behind an ``optimization_barrier`` keeps XLA from
    turning the transpose into a relabelled layout (see :func:`grad_einsum_f32`), and the
    reshape back gives the dot a single contracted index (XLA:CPU's bf16 dot is faster on one
    contracted index than on two)."""
    i = sa.index(run)
    a = jnp.moveaxis(a.reshape(_merge_shape(a.shape, i, len(run))), i, -1)
    n = a.shape[-1]
    return jax.lax.optimization_barrier(a.reshape(*a.shape[:-1], n // 2, 2)).reshape(a.shape)


def grad_residuals(spec: str, a: Array, b: Array, *, dtype) -> tuple[Array, Array]:
    """``(a_residual, a_forward)``: what a custom VJP ending in :func:`matmul_grads` saves for
    the first operand (already cast to ``dtype``), and the ``a`` its forward product uses.

    For a bf16 weight gradient (see :func:`_weight_grad_plan`) the residual is ``a`` transposed
    for ``db = a^T g``, written in the forward pass right after ``a`` (the two are tied by an
    ``optimization_barrier``) instead of in the backward pass: there the activation has long
    left the cache and XLA:CPU's transpose ran 2.5x slower than on a hot array (S/2 step: the
    backward's bf16 transposes took ~360 ms of thread time). Otherwise ``(a, a)``.
    S/2 step 1.029-1.036x, B/4 1.005-1.013x (paired, in one process)."""
    sa, sb, _ = _parse(spec)
    plan = _weight_grad_plan(spec, dtype, _index_sizes(sa, sb, a, b))
    if plan is None:
        return a, a
    _, run = plan
    a_t = _contracted_last(a, sa, run)
    return jax.lax.optimization_barrier((a_t, a))


# XLA:CPU's bf16 dot slows down 2-4x once its float32 result outgrows the cache, unless a long
# contraction hides it (measured with jax 0.10.2 on the 2-core Xeon, (M, K, N): result MiB ->
# ms, bias and bf16 rounding included): (1024, 768, 4096): 16 -> 5.6; (4096, 384, 2048):
# 32 -> 16.4; (4096, 768, 3072): 48 -> 38.1; (4096, 2048, 2048): 32 -> 46 (fine: K = 2048).
# Products with a result over _CPU_CHUNK_MIN_BYTES and K <= _CPU_CHUNK_MAX_K run as a loop over
# row chunks of at most _CPU_CHUNK_BYTES each: (4096, 384, 2048) 16.4 -> 9.3 ms,
# (4096, 768, 3072) 38.1 -> 22.9 ms, (2048, 1152, 4608) 35.9 -> 24.3 ms.
_CPU_CHUNK_MIN_BYTES = 24 << 20
_CPU_CHUNK_BYTES = 12 << 20
_CPU_CHUNK_MAX_K = 1536


_ROW_CHUNKING = contextvars.ContextVar("tim_jax_row_chunking", default=True)


def row_chunking(enabled: bool):
    """Trace-time switch for the CPU row chunking of large products (on by default). The
    benchmark traces with it off to count FLOPs: XLA's cost analysis counts a loop body once."""
    return trace_switch(_ROW_CHUNKING, bool(enabled))


def _row_chunks(spec, a, b, bias) -> int:
    """How many row chunks ``_forward`` splits a product into (1: none). Only on the CPU
    backend, for a first operand whose leading index leads the output, a row bias, and a
    short contraction with a float32 result larger than _CPU_CHUNK_MIN_BYTES."""
    sa, sb, out = _parse(spec)
    if (not _ROW_CHUNKING.get() or jax.default_backend() != "cpu" or sa[0] != out[0]
            or sa[0] in sb):
        return 1
    if bias is not None and bias.ndim > 1:
        return 1
    sizes = _index_sizes(sa, sb, a, b)
    k = math.prod(sizes[c] for c in sa if c in sb and c not in out)
    out_bytes = 4 * math.prod(sizes[c] for c in out)
    m, chunks = a.shape[0], 1
    if k > _CPU_CHUNK_MAX_K or out_bytes <= _CPU_CHUNK_MIN_BYTES:
        return 1
    while out_bytes // chunks > _CPU_CHUNK_BYTES and m % (2 * chunks) == 0 and chunks < 8:
        chunks *= 2
    return chunks


def _forward(spec, a, b, bias, dtype, precision, out_dtype):
    def product(a):
        y = einsum_f32(spec, a, b, dtype, precision)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(out_dtype)

    chunks = _row_chunks(spec, a, b, bias)
    if chunks == 1:
        return product(a)
    y = jax.lax.map(product, a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:]))
    return y.reshape(chunks * y.shape[1], *y.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6, 7))
def _mm(spec, a, b, bias, dtype, precision, out_dtype, in_dtypes):
    del in_dtypes  # static a, b dtypes and bias (dtype, shape), for the backward
    return _forward(spec, a, b, bias, dtype, precision, out_dtype)


def _mm_fwd(spec, a, b, bias, dtype, precision, out_dtype, in_dtypes):
    del in_dtypes
    # Cast once: the residuals are the operands in the compute dtype, what the backward
    # multiplies with (the cast inside _forward is then a no-op); ``a`` as grad_residuals
    # prepares it for the weight gradient.
    a, b = a.astype(dtype), b.astype(dtype)
    a_res, a = grad_residuals(spec, a, b, dtype=dtype)
    return _forward(spec, a, b, bias, dtype, precision, out_dtype), (a_res, b)


def _mm_bwd(spec, dtype, precision, out_dtype, in_dtypes, res, g):
    del out_dtype
    return matmul_grads(spec, *res, g, dtype=dtype, precision=precision, in_dtypes=in_dtypes)


def operand_dtypes(a: Array, b: Array, bias: Array | None) -> tuple:
    """The static ``in_dtypes`` of :func:`matmul_grads`: ``(a dtype, b dtype, bias_info)``,
    ``bias_info`` None or ``(bias dtype, bias shape)``, taken before the operands are cast."""
    return (jnp.dtype(a.dtype), jnp.dtype(b.dtype),
            None if bias is None else (jnp.dtype(bias.dtype), tuple(bias.shape)))


def matmul_grads(spec: str, a: Array, b: Array, g: Array, *, dtype, precision=None,
                 in_dtypes) -> tuple:
    """The backward pass of :func:`matmul`: ``(da, db, dbias)`` for the cotangent ``g`` of its
    output, for custom VJPs that end in a matmul (``layers.dense_silu_glu``). ``a``: the first
    residual of :func:`grad_residuals` (the operand cast to ``dtype``, transposed for the
    weight gradient where that applies); ``b``: the second operand cast to ``dtype``;
    ``in_dtypes``: :func:`operand_dtypes` of the original operands (no bias: dbias None). Each
    gradient comes back in its operand's original dtype."""
    sa, sb, out = _parse(spec)
    a_dtype, b_dtype, bias_info = in_dtypes
    dbias = None
    if bias_info is not None:
        bias_dtype, bias_shape = bias_info
        lead = g.ndim - len(bias_shape)
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(bias_shape[:-1])
                                          if n == 1)
        dbias = g.astype(jnp.float32).sum(axis=axes).reshape(bias_shape).astype(bias_dtype)
    plan = _weight_grad_plan(spec, dtype, {**dict(zip(out, g.shape)), **dict(zip(sb, b.shape))})
    g = g.astype(dtype)
    # The output in the order dot_general produces (batch, a's free, b's free): an output
    # written in another order (the heads-first projections) is transposed back ONCE here
    # instead of inside each of the two gradient matmuls.
    canon = _canonical_output(sa, sb, out)
    if canon != out:
        g = jnp.transpose(g, [out.index(c) for c in canon])
        out = canon
    da = grad_einsum_f32(f"{out},{sb}->{sa}", g, b, dtype, precision).astype(a_dtype)
    if plan is None:
        db = grad_einsum_f32(f"{sa},{out}->{sb}", a, g, dtype, precision)
    else:  # a arrives transposed (grad_residuals): a plain product with g, its run merged
        db_spec, run = plan
        g = g.reshape(_merge_shape(g.shape, out.index(run), len(run)))
        db = einsum_f32(db_spec, a, g, dtype, precision)
    return da, db.astype(b_dtype), dbias


_mm.defvjp(_mm_fwd, _mm_bwd)


def matmul(spec: str, a: Array, b: Array, *, dtype=jnp.float32, precision=None,
           bias: Array | None = None, out_dtype=jnp.float32) -> Array:
    """``(einsum(spec, a, b) + bias).astype(out_dtype)``: both operands cast to ``dtype``,
    float32 accumulation, the bias added in float32 before the single rounding to
    ``out_dtype``. ``bias`` is (N,) for an output (..., N), or any shape that broadcasts to the
    output with its last axis full, e.g. (B, 1, N): one bias row per sample. The gradients are
    ``dtype x dtype -> float32`` matmuls too (see the module docstring); inside
    :func:`forward_mode` it is plain autodiff."""
    spec = spec.replace(" ", "")
    sa, sb, out = _parse(spec)
    if len(sa) != a.ndim or len(sb) != b.ndim:
        raise ValueError(f"matmul spec {spec!r} does not fit operands of shapes {a.shape}, "
                         f"{b.shape}")
    if bias is not None:
        sizes = _index_sizes(sa, sb, a, b)
        out_shape = tuple(sizes[i] for i in out)
        fits = (0 < bias.ndim <= len(out_shape) and bias.shape[-1] == out_shape[-1] and all(
            n in (1, m) for n, m in zip(bias.shape[::-1], out_shape[::-1])))
        if not fits:
            raise ValueError(f"matmul bias of shape {bias.shape} must be ({sizes[out[-1]]},) or "
                             f"broadcast to the output shape {out_shape} with its last axis "
                             f"full (e.g. one row per sample, index {out[-1]!r} last)")
    dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype)
    if in_forward_mode():
        return _forward(spec, a, b, bias, dtype, precision, out_dtype)
    return _mm(spec, a, b, bias, dtype, precision, out_dtype, operand_dtypes(a, b, bias))
