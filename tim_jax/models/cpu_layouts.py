"""XLA:CPU-specific code paths of the TiM networks, behind one trace-time switch.

:func:`cpu_layouts` decides, while a function is traced, whether the network uses the layouts
and hand-written backward passes that exist for XLA:CPU (measurements and reasons:
``docs/cpu-performance.md``). It is on when JAX's default backend is the CPU and off on GPU/TPU,
where the plain path (plain einsums, plain autodiff) is used; :func:`use_cpu_layouts` or the
environment variable ``TIM_JAX_CPU_LAYOUTS=0|1`` overrides it (tests run both paths on a CPU).
Both paths compute the same function; only float32 summation order differs.

This module holds the layout helpers of the matmul backward (operands transposed so the
contracted index is minor, split into (n/2, 2) behind an ``optimization_barrier``; the weight
gradient's operand transposed in the forward pass; row chunking of large products) and the
attention's ``dP = dO V^T`` split. The custom VJPs built on them live in
:mod:`tim_jax.models.cpu_fused`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os

import jax
import jax.numpy as jnp

Array = jax.Array

_OVERRIDE = contextvars.ContextVar("tim_jax_cpu_layouts", default=None)
ENV_VAR = "TIM_JAX_CPU_LAYOUTS"


def cpu_layouts() -> bool:
    """Whether the current trace uses the XLA:CPU layouts: the :func:`use_cpu_layouts`
    override, else ``TIM_JAX_CPU_LAYOUTS`` (0/1), else ``jax.default_backend() == "cpu"``."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def use_cpu_layouts(enabled: bool | None):
    """Within the context (at trace time) the CPU layouts are forced on (True), off (False) or
    chosen by the backend (None)."""
    token = _OVERRIDE.set(None if enabled is None else bool(enabled))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def custom_backward() -> bool:
    """Whether to use the hand-written (``custom_vjp``) backward passes of
    :mod:`tim_jax.models.cpu_fused`: CPU layouts on and not inside
    :func:`tim_jax.autodiff.forward_mode` (``jax.jvp`` cannot pass through a custom VJP)."""
    from tim_jax.autodiff import in_forward_mode

    return cpu_layouts() and not in_forward_mode()


# -------------------------------------------------------------------------------------------
# einsum spec helpers


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``"A,B->C"`` -> (A, B, C); ValueError unless an explicit two-operand matmul-type einsum."""
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


def fresh_index(spec: str) -> str:
    """An index letter not used in ``spec``."""
    return next(ch for ch in "zyxwvutsrqponmlkjihgfedcba" if ch not in spec)


def index_sizes(sa: str, sb: str, a, b) -> dict:
    """Each index of the two operands -> its size."""
    return {**dict(zip(sa, a.shape)), **dict(zip(sb, b.shape))}


def einsum_f32(spec, a, b, dtype, precision=None):
    """``einsum(spec, a, b)`` with both operands cast to ``dtype``, float32 accumulation and
    result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)


def _merge_shape(shape, axis, count):
    return (*shape[:axis], math.prod(shape[axis:axis + count]), *shape[axis + count:])


def _split_shape(shape, axis, n):
    return (*shape[:axis], n // 2, 2, *shape[axis + 1:])


def canonical_output(sa: str, sb: str, out: str) -> str:
    """The output indices in the order dot_general produces them: batch, a's free, b's free."""
    return ("".join(c for c in sa if c in sb and c in out)
            + "".join(c for c in sa if c in out and c not in sb)
            + "".join(c for c in sb if c in out and c not in sa))


# -------------------------------------------------------------------------------------------
# the gradient products


def grad_einsum_f32(spec, a, b, dtype, precision=None):
    """:func:`einsum_f32` for a gradient product. For a reduced-precision ``dtype`` whose
    contraction is not over the first operand's minor index (``x^T g``, ``P^T dO``), the first
    operand is transposed explicitly (contracted index last, behind an
    ``optimization_barrier``) and the contracted index split into (n/2, 2) in both operands, a
    reshape XLA:CPU's bf16 dot takes; several contracted indices forming one run are merged
    first. float32 operands keep the plain product. Same sum up to summation order."""
    sa, sb, out = parse_spec(spec)
    contracted = [c for c in sa if c in sb and c not in out]
    if len(contracted) > 1 and jnp.dtype(dtype) != jnp.float32:
        run = "".join(contracted)
        if run in sa and run in sb:
            merged = fresh_index(spec)
            a = a.reshape(_merge_shape(a.shape, sa.index(run), len(run)))
            b = b.reshape(_merge_shape(b.shape, sb.index(run), len(run)))
            sa, sb = sa.replace(run, merged), sb.replace(run, merged)
            spec, contracted = f"{sa},{sb}->{out}", [merged]
    if (jnp.dtype(dtype) != jnp.float32 and len(contracted) == 1
            and sa[-1] != contracted[0]):
        c = contracted[0]
        n = a.shape[sa.index(c)]
        if n % 2 == 0 and n >= 4:
            new = fresh_index(spec)
            a = jax.lax.optimization_barrier(jnp.moveaxis(a.astype(dtype), sa.index(c), -1))
            sa = sa.replace(c, "") + c
            a = a.reshape(*a.shape[:-1], n // 2, 2)
            b = b.reshape(_split_shape(b.shape, sb.index(c), n))
            spec = f"{sa + new},{sb.replace(c, c + new)}->{out}"
    return einsum_f32(spec, a, b, dtype, precision)


def weight_grad_plan(spec: str, dtype, sizes: dict) -> tuple[str, str] | None:
    """How the weight gradient ``db = a^T g`` reads a pre-transposed ``a``, or None.

    For a reduced-precision ``dtype`` whose contraction (the indices ``a`` shares with the
    output only: the tokens of a Dense input) is one run in the same order in ``a`` and in the
    canonical output, with an even size: ``(db_spec, run)``, the run merged into one fresh
    index moved last in ``a`` (``"mi,mo->io"`` becomes ``"iz,zo->io"``)."""
    if jnp.dtype(dtype) == jnp.float32:
        return None
    sa, sb, out = parse_spec(spec)
    canon = canonical_output(sa, sb, out)
    run = "".join(c for c in sa if c in canon and c not in sb)
    if not run or run not in sa or run not in canon or math.prod(sizes[c] for c in run) % 2:
        return None
    merged = fresh_index(spec)
    a_t = sa.replace(run, "") + merged
    return f"{a_t},{canon.replace(run, merged)}->{sb}", run


def _contracted_last(a: Array, sa: str, run: str) -> Array:
    """``a`` with the index run ``run`` merged into one axis and moved last, materialised
    row-major (the (n/2, 2) reshape behind an ``optimization_barrier`` keeps XLA from turning
    the transpose into a relabelled layout)."""
    i = sa.index(run)
    a = jnp.moveaxis(a.reshape(_merge_shape(a.shape, i, len(run))), i, -1)
    n = a.shape[-1]
    return jax.lax.optimization_barrier(a.reshape(*a.shape[:-1], n // 2, 2)).reshape(a.shape)


def grad_residuals(spec: str, a: Array, b: Array, *, dtype) -> tuple[Array, Array]:
    """``(a_residual, a_forward)`` for a custom VJP ending in ``matmul_grads``: with a
    :func:`weight_grad_plan`, ``a`` transposed for ``db = a^T g`` right after it is computed
    (tied to the forward product by an ``optimization_barrier``); otherwise ``(a, a)``."""
    sa, sb, _ = parse_spec(spec)
    plan = weight_grad_plan(spec, dtype, index_sizes(sa, sb, a, b))
    if plan is None:
        return a, a
    _, run = plan
    return jax.lax.optimization_barrier((_contracted_last(a, sa, run), a))


def weight_grad(spec: str, a_res: Array, g: Array, out: str, plan, dtype, precision):
    """``db`` from a :func:`grad_residuals` first operand and the canonical-order cotangent."""
    db_spec, run = plan
    g = g.reshape(_merge_shape(g.shape, out.index(run), len(run)))
    return einsum_f32(db_spec, a_res, g, dtype, precision)


def dp_product(g_l: Array, v: Array, dt) -> Array:
    """``dP = dO V^T`` (B, H, Lq, Lk) float32, contracting the head dim as (Dh/2, 2) for bf16
    so XLA:CPU keeps the dot in bf16 when ``dO`` arrives with a permuted layout."""
    d = g_l.shape[-1]
    if d % 2 or jnp.dtype(dt) == jnp.float32:
        return einsum_f32("bhqd,bhkd->bhqk", g_l, v, dt)
    split = lambda x: x.reshape(*x.shape[:-1], d // 2, 2)  # noqa: E731
    return einsum_f32("bhqzy,bhkzy->bhqk", split(g_l), split(v), dt)


# -------------------------------------------------------------------------------------------
# row chunking: XLA:CPU's bf16 dot slows down once its float32 result outgrows the cache

_CHUNK_MIN_BYTES = 24 << 20
_CHUNK_BYTES = 12 << 20
_CHUNK_MAX_K = 1536

_ROW_CHUNKING = contextvars.ContextVar("tim_jax_row_chunking", default=True)


@contextlib.contextmanager
def row_chunking(enabled: bool):
    """Trace-time switch for the row chunking (on by default with the CPU layouts). The
    benchmark traces with it off to count FLOPs: XLA's cost analysis counts a loop body once."""
    token = _ROW_CHUNKING.set(bool(enabled))
    try:
        yield
    finally:
        _ROW_CHUNKING.reset(token)


def row_chunks(spec, a, b, bias) -> int:
    """How many row chunks a product is split into (1: none): with the CPU layouts, for a first
    operand whose leading index leads the output, a row bias, and a short contraction with a
    float32 result over ``_CHUNK_MIN_BYTES``."""
    sa, sb, out = parse_spec(spec)
    if not (_ROW_CHUNKING.get() and cpu_layouts()) or sa[0] != out[0] or sa[0] in sb:
        return 1
    if bias is not None and bias.ndim > 1:
        return 1
    sizes = index_sizes(sa, sb, a, b)
    k = math.prod(sizes[c] for c in sa if c in sb and c not in out)
    out_bytes = 4 * math.prod(sizes[c] for c in out)
    m, chunks = a.shape[0], 1
    if k > _CHUNK_MAX_K or out_bytes <= _CHUNK_MIN_BYTES:
        return 1
    while out_bytes // chunks > _CHUNK_BYTES and m % (2 * chunks) == 0 and chunks < 8:
        chunks *= 2
    return chunks
