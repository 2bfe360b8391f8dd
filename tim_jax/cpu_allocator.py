"""Re-exec the current process with glibc malloc tuned for XLA:CPU, on CPU hosts only.

XLA:CPU frees and re-allocates multi-GB temporary buffers on every executable run. With the
default glibc settings those buffers are served by ``mmap`` and returned by ``munmap``, so every
training step faults their pages back in; keeping freed memory inside one heap arena (and
asking for transparent huge pages) removes that cost (figures: ``docs/cpu-performance.md``).
The setting must be in the environment before the interpreter starts, so the CLIs call
:func:`maybe_reexec` first: it replaces the process (``os.execve``) with an identical one that
has ``GLIBC_TUNABLES`` set.

Rules (in order):
  * only on Linux (glibc);
  * ``TIM_JAX_NO_REEXEC=1`` opts out;
  * a ``GLIBC_TUNABLES`` that is already set (to anything) is respected, never overwritten;
  * only where JAX's backend will be the CPU (:func:`cpu_backend_expected`): ``JAX_PLATFORMS``
    names only ``cpu``, or it is unset and no GPU/TPU is visible (device files, without importing
    JAX). On a GPU/TPU host the host allocator is not the bottleneck and ``arena_max=1`` would
    serialise the input pipeline's threads on one malloc lock;
  * the interpreter's original command line (``sys.orig_argv``) is replayed, so
    ``python -m tim_jax.train ...`` and console scripts come back exactly as launched;
  * an interactive or stdin-fed interpreter (nothing to replay) is left alone.
"""
from __future__ import annotations

import os
import sys

GLIBC_TUNABLES_VALUE = (
    "glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=68719476736:"
    "glibc.malloc.arena_max=1:"
    "glibc.malloc.top_pad=1073741824:"
    "glibc.malloc.hugetlb=1"
)
"""The exact ``GLIBC_TUNABLES`` value: no mmap'd chunks, no trimming, one arena, 1 GiB top pad,
transparent huge pages for the heap (``hugetlb=1``)."""

OPT_OUT_ENV = "TIM_JAX_NO_REEXEC"
_MARKER_ENV = "TIM_JAX_ALLOCATOR_REEXECED"  # set in the child; guards against exec loops


def reexec_argv() -> list[str] | None:
    """The argv that relaunches this interpreter as it was launched, or None if impossible.

    ``sys.orig_argv`` holds the interpreter's own command line (``['python', '-m',
    'tim_jax.train', '--workdir', ...]``), unlike ``sys.argv`` whose ``argv[0]`` is the module's
    file path for ``python -m`` (re-running that path as a script would break the package's
    imports).
    """
    orig = list(getattr(sys, "orig_argv", []) or [])
    if len(orig) < 2:
        return None  # bare interactive interpreter
    if sys.flags.interactive or (sys.argv and sys.argv[0] in ("", "-")):
        return None  # `python -i`, `python` < stdin, or an embedded interpreter
    return [sys.executable or orig[0]] + orig[1:]


# Device files of accelerators JAX would pick over the CPU: NVIDIA GPUs, AMD GPUs (ROCm), TPU
# chips (v4 and later expose /dev/accel*, older ones /dev/vfio groups with libtpu installed).
_ACCELERATOR_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*")


def accelerator_visible(globs=_ACCELERATOR_GLOBS) -> bool:
    """Whether a GPU/TPU device file is present (checked without importing JAX)."""
    import glob
    import importlib.util

    if any(glob.glob(g) for g in globs):
        return True
    return bool(glob.glob("/dev/vfio/[0-9]*")) and importlib.util.find_spec("libtpu") is not None


def cpu_backend_expected(environ: dict | None = None, accelerator: bool | None = None) -> bool:
    """Whether JAX's default backend will be the CPU: ``JAX_PLATFORMS`` (or the older
    ``JAX_PLATFORM_NAME``) names only ``cpu``, or neither is set and no accelerator is visible."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    names = {p.strip().lower() for p in platforms.split(",") if p.strip()}
    if names:
        return names == {"cpu"}
    return not (accelerator_visible() if accelerator is None else accelerator)


def should_reexec(environ: dict | None = None, platform: str | None = None,
                  accelerator: bool | None = None) -> bool:
    """Whether :func:`maybe_reexec` would replace the process (see the module rules);
    ``accelerator`` overrides the device-file check (for tests)."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return False
    if environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    if "GLIBC_TUNABLES" in environ or environ.get(_MARKER_ENV):
        return False
    return cpu_backend_expected(environ, accelerator)


def maybe_reexec() -> None:
    """Replace the current process with one that runs under :data:`GLIBC_TUNABLES_VALUE`.

    Returns normally (doing nothing) when the rules in the module docstring say no. Call it
    before any heavy work: everything done before it is done twice. Output buffers are
    flushed first so nothing printed so far is lost.
    """
    if not should_reexec():
        return
    argv = reexec_argv()
    if argv is None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES_VALUE
    env[_MARKER_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
