"""``python -m tim_jax.evaluate``: FID / Inception Score vs number of steps of a class-conditional
TiM, and (``python -m tim_jax.evaluate prompts``) the GenEval / DPG-Bench / MJHQ-30K sample folders
of a text-to-image TiM. See docs/evaluation.md and :mod:`tim_jax.evaluation.cli`.

Run as a program, the process first re-executes itself with the CPU allocator setting where the
backend will be the CPU (:mod:`tim_jax.cpu_allocator`), before the heavy imports.
"""


def main(argv=None) -> int:
    from tim_jax.evaluation.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    from tim_jax import cpu_allocator

    cpu_allocator.maybe_reexec()
    raise SystemExit(main())
