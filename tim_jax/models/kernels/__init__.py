"""Pallas kernels of tim_jax (flash attention: forward, backward and forward-mode JVP)."""
