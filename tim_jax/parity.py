"""``python -m tim_jax.parity``: the parity CLI (``tim_jax.interop.parity``)."""
from tim_jax.interop.parity import main

if __name__ == "__main__":
    raise SystemExit(main())
