"""``python -m tim_jax.demo``: the CPU demo (``tim_jax.demo.cli``).

The process first re-executes itself with the CPU allocator setting where the backend will be
the CPU (:mod:`tim_jax.cpu_allocator`), before the heavy imports.
"""
from tim_jax import cpu_allocator

cpu_allocator.maybe_reexec()

from tim_jax.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
