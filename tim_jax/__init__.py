"""tim_jax: Transition Models (TiM, arXiv 2509.04394) in JAX / Flax NNX."""

__version__ = "0.1.0"
