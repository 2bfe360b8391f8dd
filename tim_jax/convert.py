"""``python -m tim_jax.convert``: the official checkpoint conversion CLI (``tim_jax.interop.convert``)."""
from tim_jax.interop.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
