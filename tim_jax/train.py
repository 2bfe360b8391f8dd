"""``python -m tim_jax.train``: the training CLI (``tim_jax.training.cli``).

The process first re-executes itself with the CPU allocator setting where the backend will be
the CPU (:mod:`tim_jax.cpu_allocator`), before the heavy imports.
"""
from tim_jax import cpu_allocator

if __name__ == "__main__":   # only when run as a program, never on import
    cpu_allocator.maybe_reexec()

from tim_jax.training.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
