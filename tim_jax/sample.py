"""``python -m tim_jax.sample``: the sampling CLI (``tim_jax.inference.cli``).

The process first re-executes itself with the CPU allocator setting where the backend will be
the CPU (:mod:`tim_jax.cpu_allocator`), before the heavy imports.
"""
from tim_jax import cpu_allocator

if __name__ == "__main__":   # only when run as a program, never on import
    cpu_allocator.maybe_reexec()

from tim_jax.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
