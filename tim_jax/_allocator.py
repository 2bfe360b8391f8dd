"""Re-exec the current process with glibc malloc tuned for XLA:CPU.

XLA:CPU frees and re-allocates multi-GB temporary buffers on every executable run. With the
default glibc settings those buffers are served by ``mmap`` and returned by ``munmap``, so
every training step faults all their pages back in (about 1M minor faults and 4-5 s of system
time per step for a TiM-B step on a 2-core host; see ``/work/shared/notes/cpu-perf.md`` §2).
Keeping freed memory inside one heap arena removes the faults and makes a CPU step about
1.3-1.5x faster. The setting has to be in the environment *before* the interpreter starts, so
entry points call :func:`maybe_reexec` first thing: it replaces the process (``os.execve``)
with an identical one that has ``GLIBC_TUNABLES`` set.

Rules (in order):
  * only on Linux (glibc); elsewhere nothing happens;
  * ``TIM_JAX_NO_REEXEC=1`` opts out (the TPU/GPU launchers in ``launch/`` set it: the host
    allocator is not the bottleneck there, and ``arena_max=1`` would serialise the input
    pipeline's threads on one malloc lock);
  * a ``GLIBC_TUNABLES`` that is already set (to anything) is respected, never overwritten;
  * the interpreter's original command line (``sys.orig_argv``) is replayed, so
    ``python -m tim_jax.train ...``, console scripts (``tim-train``), ``python -X ... script.py``
    and ``python -c`` all come back exactly as they were launched;
  * an interactive or stdin-fed interpreter (nothing to replay) is left alone.

Memory is not returned to the OS while the process lives (``trim_threshold`` = 64 GiB), and
the heap grows in 1 GiB steps (``top_pad``); peak RSS is unchanged in the measurements above.

``glibc.malloc.hugetlb=1`` (glibc >= 2.35; older versions ignore unknown tunables) makes malloc
``madvise`` its heap for transparent huge pages. Hosts whose THP mode is ``madvise`` (the
default of many distributions, and this project's CPU machine) otherwise give the heap 4 KiB
pages, and a train step walks GBs of temporaries through the TLB. Measured with four
processes side by side, two with and two without it, interleaved turns, 6 rounds: the S/2
step 2.65/2.70 s against 2.86/2.77 s, the B/4 step 1.87/1.95 s against 2.12/2.00 s (about
1.05x and 1.08x). With THP ``never`` it does nothing; with ``always`` the heap has huge pages anyway.
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


def should_reexec(environ: dict | None = None, platform: str | None = None) -> bool:
    """Whether :func:`maybe_reexec` would replace the process (see the module rules)."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return False
    if environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    if "GLIBC_TUNABLES" in environ or environ.get(_MARKER_ENV):
        return False
    return True


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
