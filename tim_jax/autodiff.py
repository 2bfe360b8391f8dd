"""Trace-time switch between the fast custom backward passes and plain autodiff.

Some network ops (:func:`tim_jax.models.matmul.matmul`, :func:`tim_jax.models.layers.silu_glu`)
carry a ``jax.custom_vjp`` that keeps the backward pass in the compute dtype with XLA-friendly
layouts. ``jax.jvp`` (forward mode) cannot pass through a ``custom_vjp``, so code that takes a
JVP of the network traces it inside :func:`forward_mode`, where those ops are plain jnp
(differentiable in both directions). The TiM objective's ``jvp`` derivative does this itself::

    with tim_jax.autodiff.forward_mode():
        out, tangent = jax.jvp(lambda x: apply_fn(params, x, t, r, y), (x,), (v,))

The switch is read while tracing (a ``contextvars.ContextVar``), so it costs nothing at run time.
"""
from __future__ import annotations

import contextlib
import contextvars

_FORWARD_MODE = contextvars.ContextVar("tim_jax_forward_mode", default=False)


@contextlib.contextmanager
def trace_switch(var: contextvars.ContextVar, value):
    """Sets the trace-time switch ``var`` to ``value`` within the context (restored after)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def forward_mode():
    """Within this context (at trace time) the network ops use plain autodiff, so ``jax.jvp``
    passes through them."""
    return trace_switch(_FORWARD_MODE, True)


def in_forward_mode() -> bool:
    """Whether the current trace is inside :func:`forward_mode`."""
    return _FORWARD_MODE.get()
