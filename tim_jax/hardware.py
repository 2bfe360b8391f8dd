"""What the hardware computes natively: the default compute dtype of ``model.dtype = "auto"``.

bfloat16 is the default on GPU and TPU, and on a CPU that has native bf16 arithmetic (x86
AVX512-BF16 or AMX-BF16, Arm BF16). Elsewhere XLA:CPU emulates bf16 matmuls through float32
and they run slower than float32 ones, so the default there is float32. An explicit
``model.dtype`` ("float32" | "bfloat16") always wins.
"""
from __future__ import annotations

import functools

import jax

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")   # x86 flags; "bf16" on Arm (cpuinfo Features)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags from /proc/cpuinfo (empty where it is absent)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    flags: set = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(flags=None) -> bool:
    """Whether the CPU computes bf16 products natively (AVX512-BF16, AMX-BF16, Arm BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in _BF16_CPU_FLAGS)


def default_compute_dtype(backend: str | None = None, flags=None) -> str:
    """"bfloat16" on GPU/TPU and on a CPU with native bf16, else "float32"."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"


def describe_compute_dtype(requested: str) -> str:
    """One line for the logs: the dtype a ``model.dtype`` value resolves to, and why."""
    if requested != "auto":
        return f"compute dtype {requested} (set in the config)"
    backend = jax.default_backend()
    chosen = default_compute_dtype(backend)
    why = (f"backend {backend}" if backend != "cpu" else
           "CPU with native bf16" if chosen == "bfloat16" else "CPU without native bf16")
    return f"compute dtype {chosen} (auto: {why})"


def resolve_config_dtype(config) -> str:
    """Replaces ``config.model.dtype == "auto"`` by the dtype it resolves to (in place) and
    returns the :func:`describe_compute_dtype` line; the CLIs call it and print the line."""
    requested = str(config.model.get("dtype", "float32"))
    line = describe_compute_dtype(requested)
    if requested == "auto":
        config.model.dtype = default_compute_dtype()
    return line
