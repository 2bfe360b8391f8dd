"""``python -m tim_jax.prepare``: encode an image dataset into TiM latent records
(:mod:`tim_jax.data.prepare`; format: ``docs/data-format.md``).

The process first re-executes itself with the CPU allocator setting where the backend will be
the CPU (:mod:`tim_jax.cpu_allocator`), before the heavy imports.
"""
from tim_jax import cpu_allocator

if __name__ == "__main__":   # only when run as a program, never on import
    cpu_allocator.maybe_reexec()

from tim_jax.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
